//! The Rayon pool every parallel kernel runs in: one size knob, safe across fork().
//!
//! The size comes from [`set_num_threads`] or else the `SMAQ_RS_NUM_THREADS` environment variable
//! or else the number of CPUs. A pool's worker threads do not survive `fork()` (torch DataLoader
//! workers fork), so the pool remembers the pid that built it and a forked child builds its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);

fn default_threads() -> usize {
    std::env::var("SMAQ_RS_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads the pool uses (building nothing).
pub fn num_threads() -> usize {
    match REQUESTED.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the pool size; 0 restores the default. Takes effect on the next parallel call.
pub fn set_num_threads(n: usize) {
    REQUESTED.store(n, Ordering::Relaxed);
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, old)) = guard.take() {
        // Dropping the last handle joins nothing; idle workers exit on their own.
        drop(old);
    }
}

fn pool() -> Arc<rayon::ThreadPool> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, p)) = guard.as_ref() {
        if *owner == pid && p.current_num_threads() == num_threads() {
            return p.clone();
        }
        if *owner != pid {
            // Inherited across fork(): its threads do not exist here. Leak it rather than touch it.
            std::mem::forget(guard.take());
        }
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads())
            .thread_name(|i| format!("smaq-rs-{i}"))
            .build()
            .expect("failed to start the smaq_rs thread pool"),
    );
    *guard = Some((pid, p.clone()));
    p
}

/// Runs `f` inside the smaq_rs pool (nested calls from a worker stay in the current pool).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    pool().install(f)
}

/// Whether work cut in `pieces` pieces goes to the pool. A single piece runs on the calling
/// thread: handing it to a pool worker and waiting for the result costs two thread wake-ups
/// (90 us per call measured on the 2-core test machine, against 7 us for a whole fp16 encode
/// of a small tensor).
pub fn parallel(pieces: usize) -> bool {
    pieces > 1
}

/// `f(i, chunk)` for each `size`-long chunk of `x` (the last may be shorter), in order; in
/// parallel in the pool unless there is one chunk ([`parallel`]).
pub fn map_chunks<T: Sync, R: Send>(
    x: &[T],
    size: usize,
    f: impl Fn(usize, &[T]) -> R + Send + Sync,
) -> Vec<R> {
    use rayon::prelude::*;
    assert!(size > 0, "chunk size is zero");
    if parallel(x.len().div_ceil(size)) {
        install(|| {
            x.par_chunks(size)
                .enumerate()
                .map(|(i, c)| f(i, c))
                .collect()
        })
    } else {
        x.chunks(size).enumerate().map(|(i, c)| f(i, c)).collect()
    }
}

/// Calls `f(i, chunk)` for each `size`-long chunk of `buf` (the last may be shorter); in
/// parallel in the pool unless there is one chunk ([`parallel`]). Stops at an error (which one,
/// when several chunks fail in parallel, is not specified).
pub fn try_for_each_chunk_mut<T: Send, E: Send>(
    buf: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) -> Result<(), E> + Send + Sync,
) -> Result<(), E> {
    use rayon::prelude::*;
    assert!(size > 0, "chunk size is zero");
    if parallel(buf.len().div_ceil(size)) {
        install(|| {
            buf.par_chunks_mut(size)
                .enumerate()
                .try_for_each(|(i, c)| f(i, c))
        })
    } else {
        buf.chunks_mut(size)
            .enumerate()
            .try_for_each(|(i, c)| f(i, c))
    }
}

/// [`try_for_each_chunk_mut`] for work that cannot fail.
pub fn for_each_chunk_mut<T: Send>(
    buf: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Send + Sync,
) {
    let ok: Result<(), std::convert::Infallible> = try_for_each_chunk_mut(buf, size, |i, c| {
        f(i, c);
        Ok(())
    });
    let Ok(()) = ok;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_visited_once_with_its_index() {
        for (len, size) in [
            (0usize, 4usize),
            (3, 4),
            (4, 4),
            (5, 4),
            (1000, 7),
            (1 << 16, 1000),
        ] {
            let mut v = vec![usize::MAX; len];
            for_each_chunk_mut(&mut v, size, |i, c| {
                assert!(
                    c.len() == size || (i + 1) * size >= len,
                    "chunk {i} is short"
                );
                for (j, x) in c.iter_mut().enumerate() {
                    *x = i * size + j;
                }
            });
            assert!(
                v.iter().enumerate().all(|(k, &x)| x == k),
                "len {len} size {size}"
            );
            let firsts = map_chunks(&v, size, |i, c| (i, c[0]));
            assert_eq!(
                firsts,
                (0..len.div_ceil(size))
                    .map(|i| (i, i * size))
                    .collect::<Vec<_>>()
            );
            let err =
                try_for_each_chunk_mut(&mut v, size, |i, _| if i == 1 { Err(i) } else { Ok(()) });
            assert_eq!(err, if len > size { Err(1) } else { Ok(()) });
        }
    }
}

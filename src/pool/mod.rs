//! The threads every parallel kernel runs on: one size knob, safe across fork().
//!
//! The size comes from [`set_num_threads`] or else the `SMAQ_RS_NUM_THREADS` environment variable
//! or else the number of CPUs. Work goes to a Rayon pool; the chunk helpers ([`map_chunks`],
//! [`try_for_each_chunk_mut`], [`for_each_index`]), which carry the codecs' hot loops, run instead
//! as a parallel region of the host's OpenMP team where the process has one (torch's libgomp;
//! see [`openmp`]), so that they do not compete with its spinning workers. `SMAQ_RS_THREADS=rayon`
//! keeps everything on Rayon. A pool's worker threads do not survive `fork()` (torch DataLoader
//! workers fork), so the pool remembers the pid that built it and a forked child builds its own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(target_os = "linux")]
mod openmp;

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

/// Runs `work` in the pool while `consume` runs on the calling thread (a pipeline: the pool
/// produces, the caller uses each result as it arrives, typically through a channel that
/// `work` owns the sending end of, so that the receiving loop ends when `work` does). Returns
/// both results once both are done; a panic in `work` is raised here after `consume` returns.
/// On a pool worker (nested), `work` runs first and `consume` after it.
pub fn alongside<A: Send, B>(
    work: impl FnOnce() -> A + Send,
    consume: impl FnOnce() -> B,
) -> (A, B) {
    if rayon::current_thread_index().is_some() {
        let a = work();
        return (a, consume());
    }
    let mut a = None;
    let b = pool().in_place_scope(|s| {
        s.spawn(|_| a = Some(work()));
        consume()
    });
    (a.expect("the scope waits for its spawned work"), b)
}

/// Whether work cut in `pieces` pieces goes to the pool. A single piece runs on the calling
/// thread: handing it to a pool worker and waiting for the result costs two thread wake-ups
/// (90 us per call measured on the 2-core test machine, against 7 us for a whole fp16 encode
/// of a small tensor).
pub fn parallel(pieces: usize) -> bool {
    pieces > 1
}

/// Which threads the chunk helpers use in this process now: `"openmp"` (the host's team) or
/// `"rayon"`.
pub fn backend() -> &'static str {
    #[cfg(target_os = "linux")]
    if openmp::team().is_some() {
        return "openmp";
    }
    "rayon"
}

/// `f(&mut state, i)` for every `i` in `0..n`, each once, in parallel unless `n` is 1 (or
/// nested inside other parallel work); `init` makes a worker's state (each worker makes at
/// least one). On the host's OpenMP team where there is one, else in the Rayon pool.
pub fn for_each_index<S>(
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    let serial = || {
        let mut s = init();
        (0..n).for_each(|i| f(&mut s, i));
    };
    if n == 0 {
        return;
    }
    let threads = num_threads().min(n);
    if !parallel(n) || threads < 2 {
        return serial();
    }
    #[cfg(target_os = "linux")]
    {
        if openmp::in_region() {
            return serial();
        }
        if rayon::current_thread_index().is_none() {
            if let Some(team) = openmp::team() {
                let next = openmp::Counter::new(n);
                team.run(threads, &|| {
                    let mut s = init();
                    while let Some(i) = next.take() {
                        f(&mut s, i);
                    }
                });
                return;
            }
        }
    }
    use rayon::prelude::*;
    install(|| (0..n).into_par_iter().for_each_init(&init, |s, i| f(s, i)));
}

/// `f(&mut state, i)` for `i` in `0..n`, collected in order ([`for_each_index`]).
pub fn map_index<S, R: Send>(
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) -> R + Sync + Send,
) -> Vec<R> {
    if !parallel(n) {
        let mut s = init();
        return (0..n).map(|i| f(&mut s, i)).collect();
    }
    let slots: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    for_each_index(n, init, |s, i| {
        let r = f(s, i);
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every index ran")
        })
        .collect()
}

/// `f(&mut state, item)` for each of `items` (which own or borrow disjoint data), collected in
/// order ([`for_each_index`]).
pub fn map_items<I: Send, S, R: Send>(
    items: Vec<I>,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, I) -> R + Sync + Send,
) -> Vec<R> {
    if !parallel(items.len()) {
        let mut s = init();
        return items.into_iter().map(|it| f(&mut s, it)).collect();
    }
    // Each task takes its own item out (uncontended locks).
    let cells: Vec<Mutex<Option<I>>> = items.into_iter().map(|it| Mutex::new(Some(it))).collect();
    map_index(cells.len(), init, |s, i| {
        let it = cells[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        f(s, it.expect("each item is taken once"))
    })
}

/// `f(i, chunk)` for each `size`-long chunk of `x` (the last may be shorter), in order; in
/// parallel ([`for_each_index`]) unless there is one chunk ([`parallel`]).
pub fn map_chunks<T: Sync, R: Send>(
    x: &[T],
    size: usize,
    f: impl Fn(usize, &[T]) -> R + Send + Sync,
) -> Vec<R> {
    assert!(size > 0, "chunk size is zero");
    map_index(
        x.len().div_ceil(size),
        || (),
        |_, i| f(i, &x[i * size..((i + 1) * size).min(x.len())]),
    )
}

/// Calls `f(i, chunk)` for each `size`-long chunk of `buf` (the last may be shorter); in
/// parallel ([`for_each_index`]) unless there is one chunk ([`parallel`]). Stops at an error
/// (which one, when several chunks fail in parallel, is not specified).
pub fn try_for_each_chunk_mut<T: Send, E: Send>(
    buf: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) -> Result<(), E> + Send + Sync,
) -> Result<(), E> {
    assert!(size > 0, "chunk size is zero");
    let n = buf.len().div_ceil(size);
    if !parallel(n) {
        return buf
            .chunks_mut(size)
            .enumerate()
            .try_for_each(|(i, c)| f(i, c));
    }
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<E>> = Mutex::new(None);
    let chunks: Vec<(usize, &mut [T])> = buf.chunks_mut(size).enumerate().collect();
    map_items(
        chunks,
        || (),
        |_, (i, c)| {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = f(i, c) {
                failed.store(true, Ordering::Relaxed);
                error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
        },
    );
    match error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
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

    /// With a libgomp loaded (the system's here; torch's in the Python tests), the chunk helpers
    /// run on its team: every index once, results in order, the first error returned, a panic
    /// raised again in the caller, nested work inline, and more than one thread at work.
    #[test]
    #[cfg(target_os = "linux")]
    fn openmp_team_runs_the_chunk_helpers() {
        use std::collections::HashSet;
        use std::sync::atomic::AtomicU32;

        let Some(team) = openmp::team_from(c"libgomp.so.1") else {
            eprintln!("no libgomp.so.1 on this machine: the OpenMP path is tested from Python");
            return;
        };
        assert_eq!(backend(), "openmp");
        let seen: Vec<AtomicU32> = (0..500).map(|_| AtomicU32::new(0)).collect();
        let threads = Mutex::new(HashSet::new());
        for_each_index(
            seen.len(),
            || (),
            |_, i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
                threads.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_micros(200));
            },
        );
        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        if num_threads() > 1 {
            assert!(
                threads.lock().unwrap().len() > 1,
                "one thread did all the work"
            );
        }
        let x: Vec<u64> = (0..100_000).collect();
        let sums = map_chunks(&x, 1000, |i, c| {
            // Nested: runs inline on the team's thread.
            let inner = map_chunks(c, 10, |_, d| d.iter().sum::<u64>());
            (i, inner.iter().sum::<u64>())
        });
        let want: Vec<(usize, u64)> = x
            .chunks(1000)
            .enumerate()
            .map(|(i, c)| (i, c.iter().sum()))
            .collect();
        assert_eq!(sums, want);
        let mut v = vec![0u32; 10_000];
        let r = try_for_each_chunk_mut(&mut v, 100, |i, c| {
            c.iter_mut().for_each(|e| *e = i as u32);
            if i == 37 {
                Err(i)
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err(37));
        assert!(v[3700..3800].iter().all(|&e| e == 37));
        let caught = std::panic::catch_unwind(|| {
            for_each_index(64, || (), |_, i| assert!(i != 40, "task 40 fails"));
        });
        assert!(
            caught.is_err(),
            "a panic on the team is raised again in the caller"
        );
        // The team still works after a panic.
        let mut w = vec![0u8; 4096];
        for_each_chunk_mut(&mut w, 64, |_, c| c.fill(1));
        assert!(w.iter().all(|&e| e == 1));
        let _ = team;
    }

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

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

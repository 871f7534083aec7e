//! Output buffers: one allocation, written once, huge pages for large ones, and recycled.
//!
//! Large packed buffers are kept when freed (up to a byte limit) and handed to the next encode
//! of a similar size: a fresh buffer costs a page fault and a kernel-zeroed page per 4 KiB (or
//! 2 MiB) on first write, which measured as much as the encoding itself (float16: 21 -> 6 ms for
//! 16M values in a loop). See [`recycle`] and [`empty_cache`].

use std::sync::Mutex;

/// A buffer of `len` bytes with capacity for `tail` more (appending the checksum later does not
/// reallocate), whose bytes `init` initializes (typically chunk by chunk in parallel, each chunk
/// through [`zero_init`] just before it is written, while it is in cache). Nothing is written
/// here: unlike calloc, which zeroes a reused heap block with one serial memset before any work
/// starts. Large buffers come from the cache of recycled ones when it has one of the right size,
/// else are fresh and marked for transparent huge pages (see [`advise_huge_pages`]).
///
/// # Safety
/// `init` must initialize all `len` bytes of the slice it is given.
pub unsafe fn init_with_tail(
    len: usize,
    tail: usize,
    init: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]),
) -> Vec<u8> {
    let mut v = take(len + tail).unwrap_or_else(|| {
        let v = Vec::with_capacity(len + tail);
        advise_huge_pages(v.as_ptr(), len + tail);
        v
    });
    init(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `init` initialized the first `len` bytes; capacity >= len.
    unsafe { v.set_len(len) };
    v
}

/// A zeroed vector of `n` elements (calloc: fresh pages are not written), its pages marked for
/// transparent huge pages when large: a decoded tensor's output.
pub fn zeroed_vec<T: bytemuck::Zeroable + Copy>(n: usize) -> Vec<T> {
    let v: Vec<T> = bytemuck::zeroed_vec(n);
    advise_huge_pages(v.as_ptr().cast(), std::mem::size_of_val(v.as_slice()));
    v
}

/// Zeroes `s` and returns it as initialized bytes.
pub fn zero_init(s: &mut [std::mem::MaybeUninit<u8>]) -> &mut [u8] {
    s.fill(std::mem::MaybeUninit::new(0));
    // SAFETY: every byte was just initialized; MaybeUninit<u8> and u8 have the same layout.
    unsafe { &mut *(s as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) }
}

/// Buffers at least this large get `MADV_HUGEPAGE`.
const HUGE_PAGE_MIN: usize = 8 << 20;

/// Asks Linux to back the 2 MiB-aligned middle of a large, not yet written buffer with
/// transparent huge pages (where THP is in `madvise` or `always` mode). A fresh 32 MiB output
/// otherwise takes 8192 page faults, which measured as more than half the CPU time of an fp16
/// encode (1.5 -> 0.6-0.75 ns per value with it). Advisory only: contents and correctness do not
/// change. `SMAQ_RS_HUGEPAGES=0` turns it off.
pub(crate) fn advise_huge_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if len < HUGE_PAGE_MIN || std::env::var_os("SMAQ_RS_HUGEPAGES").is_some_and(|v| v == "0") {
            return;
        }
        let start = ptr as usize;
        let a = (start + HUGE - 1) & !(HUGE - 1);
        let end = (start + len) & !(HUGE - 1);
        if end > a {
            // SAFETY: [a, end) lies inside the live allocation of `len` bytes at `ptr` and is
            // page-aligned; MADV_HUGEPAGE only changes how the kernel backs it. Failure is
            // harmless.
            unsafe { libc::madvise(a as *mut libc::c_void, end - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len, HUGE_PAGE_MIN);
}

/// Buffers at least this large are recycled (smaller ones are cheap to allocate).
const CACHE_MIN: usize = HUGE_PAGE_MIN;

/// Default limit of the cache, in MiB (`SMAQ_RS_BUFFER_CACHE_MB` overrides; 0 turns it off).
const CACHE_DEFAULT_MB: usize = 256;

/// Kept vectors, most recent last, and their total capacity.
type Pool = (Vec<Vec<u8>>, usize);

/// Recycled buffers.
static CACHE: Mutex<Pool> = Mutex::new((Vec::new(), 0));

fn cache_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("SMAQ_RS_BUFFER_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(CACHE_DEFAULT_MB)
            .saturating_mul(1 << 20)
    })
}

fn lock(pool: &'static Mutex<Pool>) -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves the list consistent (plain pushes and removals).
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

fn cache() -> std::sync::MutexGuard<'static, Pool> {
    lock(&CACHE)
}

/// Frees everything `pool` keeps; returns the bytes released.
fn drain(pool: &'static Mutex<Pool>) -> usize {
    let mut p = lock(pool);
    p.0.clear();
    std::mem::take(&mut p.1)
}

/// Keeps a large buffer that is no longer needed for a later [`init_with_tail`] (dropping the
/// oldest kept ones beyond the limit); small buffers are simply freed.
pub fn recycle(mut v: Vec<u8>) {
    let limit = cache_limit();
    if v.capacity() < CACHE_MIN || v.capacity() > limit {
        return;
    }
    v.clear();
    let mut c = cache();
    c.1 += v.capacity();
    c.0.push(v);
    while c.1 > limit {
        let old = c.0.remove(0);
        c.1 -= old.capacity();
    }
}

/// The smallest kept buffer with room for `cap` bytes and at most twice that (a much larger one
/// would hold memory the new tensor does not use).
fn take(cap: usize) -> Option<Vec<u8>> {
    if cap < CACHE_MIN {
        return None;
    }
    let mut c = cache();
    let (i, _) =
        c.0.iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= cap && v.capacity() / 2 <= cap)
            .min_by_key(|(_, v)| v.capacity())?;
    let v = c.0.remove(i);
    c.1 -= v.capacity();
    Some(v)
}

/// Frees every kept buffer, scratch vectors included, and asks the allocator to give free
/// memory back to the system (glibc keeps freed blocks of a few MiB in its heap otherwise, so
/// the process would not shrink); returns the bytes released.
pub fn empty_cache() -> usize {
    let n = drain(&CACHE) + drain(&SCRATCH);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
    n
}

/// Bytes held by kept buffers and scratch vectors.
pub fn cached_bytes() -> usize {
    cache().1 + scratch_pool().1
}

/// Kept scratch vectors.
static SCRATCH: Mutex<Pool> = Mutex::new((Vec::new(), 0));

/// Most bytes of scratch vectors kept (within the cache limit too).
const SCRATCH_LIMIT: usize = 64 << 20;

fn scratch_pool() -> std::sync::MutexGuard<'static, Pool> {
    lock(&SCRATCH)
}

/// An empty vector with room for `cap` bytes, for a short-lived side stream (a chunk's extra
/// bits, written by a worker and copied into the packed buffer at the end): a recently returned
/// one when there is one. A fresh heap block costs a page fault per 4 KiB touched, as the heap
/// shrinks back after every call; 1024 chunks of SmaQ side streams measured 4100 faults per
/// encode of 64M values.
pub fn scratch(cap: usize) -> Vec<u8> {
    let kept = {
        let mut s = scratch_pool();
        let v = s.0.pop();
        if let Some(v) = &v {
            s.1 -= v.capacity();
        }
        v
    };
    match kept {
        Some(mut v) => {
            v.clear();
            v.reserve(cap);
            v
        }
        None => Vec::with_capacity(cap),
    }
}

/// Returns a vector from [`scratch`] (or any other) for reuse, within [`SCRATCH_LIMIT`] and the
/// cache limit; else it is freed.
pub fn give_scratch(v: Vec<u8>) {
    let cap = v.capacity();
    let mut s = scratch_pool();
    if cap > 0 && s.1 + cap <= SCRATCH_LIMIT.min(cache_limit()) {
        s.1 += cap;
        s.0.push(v);
    }
}

/// Returns the whole pages of `v`'s spare capacity to the system: a recycled buffer larger than
/// its new contents then holds no more resident memory than the contents (a fresh buffer's
/// spare pages were never touched, and this costs one system call).
pub fn release_spare(v: &mut Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        if v.capacity() < CACHE_MIN {
            return;
        }
        let start = v.as_ptr() as usize;
        let a = (start + v.len()).next_multiple_of(PAGE);
        let end = (start + v.capacity()) & !(PAGE - 1);
        if end > a {
            // SAFETY: [a, end) lies inside the spare capacity of `v` (past its initialized
            // bytes) and is page-aligned; MADV_DONTNEED makes those pages read as zero on next
            // touch, which no initialized byte can observe.
            unsafe { libc::madvise(a as *mut libc::c_void, end - a, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache is process-wide: these checks run in one test so they do not interleave.
    #[test]
    fn recycled_buffers_are_reused_by_size_and_released() {
        empty_cache();
        let big = CACHE_MIN * 2;
        // SAFETY: the closure initializes all `big` bytes.
        let v = unsafe {
            init_with_tail(big, 8, |b| {
                zero_init(b)[7] = 7;
            })
        };
        let ptr = v.as_ptr();
        recycle(v);
        assert!(cached_bytes() >= big);
        // Too large a buffer for a small request, or too small for a large one: not taken.
        assert!(take(big / 4).is_none());
        assert!(take(big * 2).is_none());
        // SAFETY: as above.
        let mut w = unsafe { init_with_tail(big - 100, 8, |b| zero_init(b)[0] = 1) };
        assert_eq!(w.as_ptr(), ptr, "the kept buffer was reused");
        assert_eq!((w.len(), w[0], w[7]), (big - 100, 1, 0));
        assert_eq!(cached_bytes(), 0);
        w.truncate(10);
        release_spare(&mut w);
        assert_eq!(w[..], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        recycle(w);
        assert!(empty_cache() >= big);
        assert_eq!(cached_bytes(), 0);
        // Small buffers are not kept.
        recycle(vec![0u8; 100]);
        assert_eq!(cached_bytes(), 0);
        // Scratch vectors come back empty with the room asked for, the last returned first.
        let mut a = scratch(1000);
        a.extend_from_slice(&[9; 500]);
        let pa = a.as_ptr();
        give_scratch(a);
        assert!(cached_bytes() >= 1000);
        let b = scratch(800);
        assert_eq!((b.as_ptr(), b.len()), (pa, 0));
        assert!(b.capacity() >= 800);
        assert!(scratch(10).capacity() >= 10);
        give_scratch(b);
        assert!(empty_cache() >= 1000);
        assert_eq!(cached_bytes(), 0);
    }
}

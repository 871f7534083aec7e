//! Output buffers: one allocation, lazily zeroed, huge pages for large ones.

/// A zeroed buffer of `len` bytes with capacity for `tail` more: one allocation (calloc: fresh
/// pages cost no memset), so appending the checksum later does not reallocate. Large buffers are
/// marked for transparent huge pages before their first write (see [`advise_huge_pages`]).
pub fn zeroed_with_tail(len: usize, tail: usize) -> Vec<u8> {
    let mut v = vec![0u8; len + tail];
    advise_huge_pages(v.as_ptr(), v.len());
    v.truncate(len);
    v
}

/// A buffer of `len` bytes with capacity for `tail` more, like [`zeroed_with_tail`], whose bytes
/// `init` initializes (typically chunk by chunk in parallel, each chunk through [`zero_init`]
/// just before it is written, while it is in cache). Unlike calloc, which zeroes a reused heap
/// block with one serial memset before any work starts, nothing is written here.
///
/// # Safety
/// `init` must initialize all `len` bytes of the slice it is given.
pub unsafe fn init_with_tail(
    len: usize,
    tail: usize,
    init: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]),
) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(len + tail);
    advise_huge_pages(v.as_ptr(), len + tail);
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
fn advise_huge_pages(ptr: *const u8, len: usize) {
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

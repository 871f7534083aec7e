//! What the quantizing kernels of several codecs (float, int, BDI) read and write: input
//! elements viewed as float32 ([`ToF32`]), code words ([`Code`]), and the AVX-512 store that
//! narrows codes held in 32-bit lanes into 8-, 16- or 32-bit code words
//! ([`store_codes_avx512`], with optional non-temporal stores; docs/CODECS.md, "Floating point").

use crate::dtype::Element;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Input elements as float32 (a view for float32, a converted copy otherwise).
pub(crate) trait ToF32: Element {
    fn with_f32<R>(x: &[Self], f: impl FnOnce(&[f32]) -> R) -> R;
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
}
impl ToF32 for f32 {
    fn with_f32<R>(x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
        f(x)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}
impl ToF32 for f64 {
    fn with_f32<R>(x: &[f64], f: impl FnOnce(&[f32]) -> R) -> R {
        let tmp: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        f(&tmp)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [f64]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as f64;
        }
    }
}
macro_rules! half_to_f32 {
    ($t:ty) => {
        impl ToF32 for $t {
            fn with_f32<R>(x: &[$t], f: impl FnOnce(&[f32]) -> R) -> R {
                let mut tmp = vec![0f32; x.len()];
                <$t as crate::simd::Widen>::widen(x, &mut tmp);
                f(&tmp)
            }
            fn from_f32_slice(src: &[f32], dst: &mut [$t]) {
                dst.convert_from_f32_slice(src)
            }
        }
    };
}
half_to_f32!(f16);
half_to_f32!(bf16);

/// A code word type the kernels write.
pub(crate) trait Code: Copy + Default + Send + Sync + 'static {
    fn from_u32(v: u32) -> Self;
}
impl Code for u8 {
    #[inline(always)]
    fn from_u32(v: u32) -> Self {
        v as u8
    }
}
impl Code for u16 {
    #[inline(always)]
    fn from_u32(v: u32) -> Self {
        v as u16
    }
}
impl Code for u32 {
    #[inline(always)]
    fn from_u32(v: u32) -> Self {
        v
    }
}

/// For `n` codes of `size` bytes written at address `dst`: how many go before the first 64-byte
/// boundary (written with ordinary stores), and whether the rest can be streamed (non-temporal
/// stores need that alignment; a `dst` misaligned for its element type, which the platform's
/// allocators never give, is not streamed).
#[cfg(target_arch = "x86_64")]
pub(crate) fn stream_head(dst: usize, size: usize, n: usize, stream: bool) -> (usize, bool) {
    if !stream || !dst.is_multiple_of(size) {
        return (0, false);
    }
    let head = (dst.wrapping_neg() % 64 / size).min(n);
    (head, (dst + head * size).is_multiple_of(64))
}

/// Writes `n` codes to `dst` (8-, 16- or 32-bit elements `O`): `code(i, mask)` gives the codes
/// of elements i..i + 16 as 32-bit lanes, reading only the lanes set in `mask` (all 16 except
/// at the end). 64 codes per iteration are narrowed with saturating packs (the codes fit their
/// width) and one permutation, then stored with one full-width store: narrowing stores
/// (`vpmovdb` to memory) are slow on some CPUs (AMD Zen 4).
///
/// `stream`: the full-width stores bypass the cache (non-temporal,
/// [`crate::simd::stream_output`]), after masked stores up to the first 64-byte boundary; a
/// store fence ends the call.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn store_codes_avx512<O: Code>(
    dst: *mut O,
    n: usize,
    stream: bool,
    mut code: impl FnMut(usize, std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512i,
) {
    use std::arch::x86_64::*;
    let osize = std::mem::size_of::<O>();
    debug_assert!(osize == 1 || osize == 2 || osize == 4);
    const ALL: __mmask16 = 0xffff;
    // Stores codes i..end (at most 16) with a masked narrowing store.
    macro_rules! masked {
        ($i:expr, $end:expr) => {{
            let (i, end): (usize, usize) = ($i, $end);
            let k: __mmask16 = if end - i >= 16 {
                ALL
            } else {
                ((1u32 << (end - i)) - 1) as u16
            };
            let c = code(i, k);
            // SAFETY: only lanes below `end` <= n are written.
            unsafe {
                match osize {
                    1 => _mm512_mask_cvtepi32_storeu_epi8(dst.add(i).cast(), k, c),
                    2 => _mm512_mask_cvtepi32_storeu_epi16(dst.add(i).cast(), k, c),
                    _ => _mm512_mask_storeu_epi32(dst.add(i).cast(), k, c),
                }
            }
        }};
    }
    let (head, stream) = stream_head(dst as usize, osize, n, stream);
    let mut i = 0;
    while i < head {
        masked!(i, head.min(i + 16));
        i += 16.min(head - i);
    }
    // SAFETY: the full-width stores write dst[i..i + 64] with i + 64 <= n, 64-byte aligned when
    // streaming.
    let store = |at: *mut O, v: __m512i| unsafe {
        if stream {
            _mm512_stream_si512(at.cast(), v)
        } else {
            _mm512_storeu_si512(at.cast(), v)
        }
    };
    // SAFETY (whole loop): the caller guarantees `dst` is valid for `n` writes.
    unsafe {
        while i + 64 <= n {
            let c0 = code(i, ALL);
            let c1 = code(i + 16, ALL);
            let c2 = code(i + 32, ALL);
            let c3 = code(i + 48, ALL);
            match osize {
                1 => {
                    // Per 128-bit lane L, the packs leave dwords c0[4L..], c1[4L..], c2[4L..],
                    // c3[4L..]: the permutation puts them back in element order.
                    let b = _mm512_packus_epi16(
                        _mm512_packus_epi32(c0, c1),
                        _mm512_packus_epi32(c2, c3),
                    );
                    let idx =
                        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
                    store(dst.add(i), _mm512_permutexvar_epi32(idx, b));
                }
                2 => {
                    // Per lane L, qwords c0[4L..], c1[4L..] (and c2, c3 in the second pack).
                    let idx = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
                    store(
                        dst.add(i),
                        _mm512_permutexvar_epi64(idx, _mm512_packus_epi32(c0, c1)),
                    );
                    store(
                        dst.add(i + 32),
                        _mm512_permutexvar_epi64(idx, _mm512_packus_epi32(c2, c3)),
                    );
                }
                _ => {
                    store(dst.add(i), c0);
                    store(dst.add(i + 16), c1);
                    store(dst.add(i + 32), c2);
                    store(dst.add(i + 48), c3);
                }
            }
            i += 64;
        }
    }
    while i < n {
        masked!(i, n.min(i + 16));
        i += 16;
    }
    if stream {
        _mm_sfence();
    }
}

//! The float encoders' x86-64 kernels (docs/CODECS.md, "Floating point"): [`to_code`] compiled
//! for AVX2, its nearest-even rounding in AVX-512 registers, and IEEE float16 through the
//! hardware conversion (`vcvtps2ph`, F16C and AVX-512). Each gives the portable code's bits
//! (tested below); `encode.rs` picks one at run time ([`crate::simd`]).
//!
//! [`to_code`]: super::minifloat::to_code

use super::encode::codes_body;
use super::minifloat::RoundingPlan;
use crate::codec::kernel_io::{store_codes_avx512, stream_head, Code};
use std::arch::x86_64::*;

/// [`codes_body`] compiled for AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn codes_avx2<O: Code, const R: u8>(
    x: &[f32],
    out: &mut [O],
    p: &RoundingPlan,
    key: u32,
) {
    codes_body::<O, R>(x, out, p, key)
}

/// `to_code` with nearest-even rounding, 16 values per iteration in AVX-512 registers, for
/// 8-, 16- or 32-bit codes. The same integer steps as `to_code` (re-biased exponent, rounding
/// increment, overflow and special cases selected by masks) except the target-subnormal branch,
/// which rounds by adding 2^(24 - bias - mbits) in float32 (its ulp is the target's subnormal
/// spacing, so the FPU's nearest-even addition leaves round(|x| / spacing) in the low bits):
/// the same nearest-even result as `to_code`'s scale-and-round, in two instructions.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn codes_nearest_avx512<O: Code>(x: &[f32], out: &mut [O], p: &RoundingPlan) {
    let n = x.len().min(out.len());
    // SAFETY: `out` holds at least n codes.
    unsafe { codes_nearest_avx512_to(&x[..n], out.as_mut_ptr(), p, false) }
}

/// [`codes_nearest_avx512`] into `dst`, which may be uninitialized memory.
///
/// # Safety
/// AVX-512 F and BW are available, and `dst` is valid for writing `x.len()` values of `O`
/// (alignment is not needed). `stream`: as in [`store_codes_avx512`].
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn codes_nearest_avx512_to<O: Code>(
    x: &[f32],
    dst: *mut O,
    p: &RoundingPlan,
    stream: bool,
) {
    let (src, n) = (x.as_ptr(), x.len());
    let shift = _mm_cvtsi32_si128(p.shift as i32);
    let absm = _mm512_set1_epi32(0x7fff_ffff);
    let one = _mm512_set1_epi32(1);
    let half_m1 = _mm512_set1_epi32(((1u32 << p.shift) >> 1).wrapping_sub(1) as i32);
    let rebias = _mm512_set1_epi32(p.rebias as i32);
    let min_normal = _mm512_set1_epi32(p.min_normal as i32);
    let magic = _mm512_set1_epi32(p.sub_magic as i32);
    let max_code = _mm512_set1_epi32(p.max_code as i32);
    let overflow_code = _mm512_set1_epi32(p.overflow_code as i32);
    let inf_bits = _mm512_set1_epi32(0x7f80_0000);
    let inf_code = _mm512_set1_epi32(p.inf_input_code as i32);
    let nan_code = _mm512_set1_epi32(p.nan_code as i32);
    let sign_shift = _mm_cvtsi32_si128(p.sign_shift as i32);
    let e8 = p.e8;
    let code16 = |v: __m512i| -> __m512i {
        let a = _mm512_and_si512(v, absm);
        let odd = _mm512_and_si512(_mm512_srl_epi32(a, shift), one);
        let r = _mm512_add_epi32(half_m1, odd);
        let normal = _mm512_srl_epi32(_mm512_sub_epi32(_mm512_add_epi32(a, r), rebias), shift);
        let code = if e8 {
            normal
        } else {
            let sub = _mm512_sub_epi32(
                _mm512_castps_si512(_mm512_add_ps(
                    _mm512_castsi512_ps(a),
                    _mm512_castsi512_ps(magic),
                )),
                magic,
            );
            _mm512_mask_mov_epi32(normal, _mm512_cmplt_epu32_mask(a, min_normal), sub)
        };
        let code =
            _mm512_mask_mov_epi32(code, _mm512_cmpgt_epu32_mask(code, max_code), overflow_code);
        let code = _mm512_mask_mov_epi32(code, _mm512_cmpeq_epi32_mask(a, inf_bits), inf_code);
        let code = _mm512_mask_mov_epi32(code, _mm512_cmpgt_epu32_mask(a, inf_bits), nan_code);
        _mm512_or_si512(
            code,
            _mm512_sll_epi32(_mm512_srli_epi32::<31>(v), sign_shift),
        )
    };
    // SAFETY: `load` reads x[i..i + 16] for the i that `store_codes_avx512` passes, which keeps
    // i + 16 <= n (full loads) or masks the lanes past n.
    unsafe {
        store_codes_avx512(dst, n, stream, |i, k| {
            code16(_mm512_maskz_loadu_epi32(k, src.add(i).cast()))
        })
    }
}

/// IEEE float16 codes, nearest-even with overflow to Inf: `vcvtps2ph`, 16 values per iteration.
/// NaN keeps its sign and top payload bits (quieted), exactly as `half`'s software conversion.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn f16_codes_f16c(x: &[f32], out: &mut [u16]) {
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT;
    let n = x.len().min(out.len());
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: every load reads x[i..i + 8] and every store writes out[i..i + 8] with i + 8 <= n.
    unsafe {
        while i + 16 <= n {
            let a = _mm256_cvtps_ph::<RN>(_mm256_loadu_ps(src.add(i)));
            let b = _mm256_cvtps_ph::<RN>(_mm256_loadu_ps(src.add(i + 8)));
            _mm_storeu_si128(dst.add(i).cast(), a);
            _mm_storeu_si128(dst.add(i + 8).cast(), b);
            i += 16;
        }
        if i + 8 <= n {
            let a = _mm256_cvtps_ph::<RN>(_mm256_loadu_ps(src.add(i)));
            _mm_storeu_si128(dst.add(i).cast(), a);
            i += 8;
        }
    }
    if i < n {
        let mut buf = [0f32; 8];
        buf[..n - i].copy_from_slice(&x[i..n]);
        // SAFETY: `buf` holds 8 floats; the 8 codes go to a local array.
        let h: [u16; 8] =
            unsafe { std::mem::transmute(_mm256_cvtps_ph::<RN>(_mm256_loadu_ps(buf.as_ptr()))) };
        out[i..n].copy_from_slice(&h[..n - i]);
    }
}

/// [`f16_codes_f16c`] with 512-bit conversions (`vcvtps2ph` on 16 values, the same rounding and
/// NaN handling), writing into `dst`, which may be uninitialized. `stream`: non-temporal stores
/// from the first 64-byte boundary on, as in [`store_codes_avx512`].
///
/// # Safety
/// AVX-512 F is available and `dst` is valid for writing `x.len()` `u16` codes (alignment is
/// not needed).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn f16_codes_avx512_to(x: &[f32], dst: *mut u16, stream: bool) {
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let (src, n) = (x.as_ptr(), x.len());
    // Codes i..end (at most 16) with a masked store.
    // SAFETY: loads and stores touch only lanes below `end` <= n.
    let masked = |i: usize, end: usize| unsafe {
        let k = ((1u32 << (end - i)) - 1) as __mmask16;
        let h = _mm512_cvtps_ph::<RN>(_mm512_maskz_loadu_ps(k, src.add(i)));
        // Widened to 32-bit lanes for the masked narrowing store (AVX-512 F only).
        _mm512_mask_cvtepi32_storeu_epi16(dst.add(i).cast(), k, _mm512_cvtepu16_epi32(h));
    };
    let (head, stream) = stream_head(dst as usize, 2, n, stream);
    let mut i = 0;
    while i < head {
        let end = head.min(i + 16);
        masked(i, end);
        i = end;
    }
    // SAFETY: full loads read x[i..i + 32] and stores write dst[i..i + 32] with i + 32 <= n,
    // 64-byte aligned when streaming.
    unsafe {
        while i + 32 <= n {
            let a = _mm512_cvtps_ph::<RN>(_mm512_loadu_ps(src.add(i)));
            let b = _mm512_cvtps_ph::<RN>(_mm512_loadu_ps(src.add(i + 16)));
            if stream {
                let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                _mm512_stream_si512(dst.add(i).cast(), ab);
            } else {
                _mm256_storeu_si256(dst.add(i).cast(), a);
                _mm256_storeu_si256(dst.add(i + 16).cast(), b);
            }
            i += 32;
        }
    }
    while i < n {
        let end = n.min(i + 16);
        masked(i, end);
        i = end;
    }
    if stream {
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode::{codes_body, f16_codes_portable};
    use super::super::minifloat::{MiniFloat, NEAREST, STOCHASTIC, TRUNCATE};
    use super::super::test_values::{all_bits, boundaries};
    use super::*;

    #[test]
    fn avx512_float16_matches_portable() {
        if !crate::simd::avx512() {
            eprintln!("no AVX-512 here: F16C or the portable path runs");
            return;
        }
        let mut x = all_bits(100_003);
        x.extend(boundaries(MiniFloat::ieee(5, 10)));
        for len in (0..70).chain([x.len() - 1, x.len()]) {
            let mut a = vec![0u16; len];
            let mut b = vec![0u16; len];
            // SAFETY: AVX-512 F checked above; `a` holds len codes.
            unsafe { f16_codes_avx512_to(&x[..len], a.as_mut_ptr(), false) };
            f16_codes_portable(&x[..len], &mut b);
            assert_eq!(a, b, "length {len}");
        }
    }

    #[test]
    fn simd_codes_match_portable() {
        if !crate::simd::avx2() {
            eprintln!("no AVX2 here: only the portable path exists");
            return;
        }
        let x = all_bits(50_001);
        let fmts = [
            MiniFloat::ieee(5, 10),
            MiniFloat::ieee(8, 7),
            MiniFloat::ieee(5, 2),
            MiniFloat::E4M3FN,
            MiniFloat::ieee(8, 3),
        ];
        for f in fmts {
            for sat in [false, true] {
                let p = RoundingPlan::new(f, sat);
                for r in [NEAREST, STOCHASTIC, TRUNCATE] {
                    let mut a = vec![0u32; x.len()];
                    let mut b = vec![0u32; x.len()];
                    match r {
                        NEAREST => {
                            // SAFETY: AVX2 and FMA checked above.
                            unsafe { codes_avx2::<u32, NEAREST>(&x, &mut a, &p, 9) };
                            codes_body::<u32, NEAREST>(&x, &mut b, &p, 9);
                        }
                        STOCHASTIC => {
                            // SAFETY: as above.
                            unsafe { codes_avx2::<u32, STOCHASTIC>(&x, &mut a, &p, 9) };
                            codes_body::<u32, STOCHASTIC>(&x, &mut b, &p, 9);
                        }
                        _ => {
                            // SAFETY: as above.
                            unsafe { codes_avx2::<u32, TRUNCATE>(&x, &mut a, &p, 9) };
                            codes_body::<u32, TRUNCATE>(&x, &mut b, &p, 9);
                        }
                    }
                    assert_eq!(a, b, "{f:?} saturate={sat} rounding={r}");
                }
            }
        }
    }

    #[test]
    fn avx512_codes_match_portable() {
        if !crate::simd::avx512() {
            eprintln!("no AVX-512 here: the AVX2 and portable paths run");
            return;
        }
        let fmts = [
            MiniFloat::ieee(5, 2),
            MiniFloat::E4M3FN,
            MiniFloat::ieee(5, 10),
            MiniFloat::ieee(8, 7),
            MiniFloat::ieee(8, 3),
            MiniFloat::ieee(8, 22),
        ];
        let common = all_bits(30_001);
        for f in fmts {
            let mut x = boundaries(f);
            x.extend(&common);
            for sat in [false, true] {
                let p = RoundingPlan::new(f, sat);
                let mut want = vec![0u32; x.len()];
                codes_body::<u32, NEAREST>(&x, &mut want, &p, 0);
                for len in (0..40).chain([x.len() - 1, x.len()]) {
                    let w = &want[..len];
                    let mut a = vec![0u32; len];
                    // SAFETY: AVX-512 F and BW checked above.
                    unsafe { codes_nearest_avx512(&x[..len], &mut a, &p) };
                    assert_eq!(a, w, "{f:?} saturate={sat} len={len}");
                    if f.width() <= 16 {
                        let mut a = vec![0u16; len];
                        // SAFETY: as above.
                        unsafe { codes_nearest_avx512(&x[..len], &mut a, &p) };
                        assert!(a.iter().zip(w).all(|(&a, &w)| a as u32 == w), "{f:?}");
                    }
                    if f.width() <= 8 {
                        let mut a = vec![0u8; len];
                        // SAFETY: as above.
                        unsafe { codes_nearest_avx512(&x[..len], &mut a, &p) };
                        assert!(a.iter().zip(w).all(|(&a, &w)| a as u32 == w), "{f:?}");
                    }
                }
            }
        }
    }

    /// Non-temporal stores (`stream`) write the same codes as plain ones at every alignment of
    /// the output, and nothing outside it.
    #[test]
    fn streamed_codes_equal_plain_ones_at_every_offset() {
        if !crate::simd::avx512() {
            eprintln!("no AVX-512 here: nothing streams");
            return;
        }
        let x = all_bits(5_000);
        let p8 = RoundingPlan::new(MiniFloat::ieee(5, 2), false);
        let p16 = RoundingPlan::new(MiniFloat::ieee(8, 7), false);
        let mut want8 = vec![0u8; x.len()];
        let mut want16 = vec![0u16; x.len()];
        let mut want_f16 = vec![0u16; x.len()];
        codes_body::<u8, NEAREST>(&x, &mut want8, &p8, 0);
        codes_body::<u16, NEAREST>(&x, &mut want16, &p16, 0);
        f16_codes_portable(&x, &mut want_f16);
        let mut buf = vec![0xa5u8; 2 * x.len() + 256];
        let base = buf.as_ptr().align_offset(64);
        for off in 0..66 {
            for len in [0, 1, 15, 31, 33, 64, 100, 1000, 4999] {
                for kind in 0..3 {
                    buf.fill(0xa5);
                    let at = base + off;
                    let size = if kind == 0 { 1 } else { 2 };
                    let dst = buf[at..].as_mut_ptr();
                    // SAFETY: AVX-512 F and BW checked above; `buf` has room for len codes of
                    // `size` bytes after `at` (64 + 66 + 2 * 4999 < its length).
                    unsafe {
                        match kind {
                            0 => codes_nearest_avx512_to::<u8>(&x[..len], dst, &p8, true),
                            1 => codes_nearest_avx512_to::<u16>(&x[..len], dst.cast(), &p16, true),
                            _ => f16_codes_avx512_to(&x[..len], dst.cast(), true),
                        }
                    }
                    let got = &buf[at..at + size * len];
                    let want: Vec<u8> = match kind {
                        0 => want8[..len].to_vec(),
                        1 => want16[..len].iter().flat_map(|c| c.to_le_bytes()).collect(),
                        _ => want_f16[..len]
                            .iter()
                            .flat_map(|c| c.to_le_bytes())
                            .collect(),
                    };
                    assert!(got == &want[..], "kind {kind} offset {off} length {len}");
                    assert!(
                        buf[..at]
                            .iter()
                            .chain(&buf[at + size * len..])
                            .all(|&b| b == 0xa5),
                        "kind {kind} offset {off} length {len}: wrote outside the output"
                    );
                }
            }
        }
    }
}

//! The quantization kernel of the `int` codec: codes of a run of values from its affine map
//! (v = x * a + b, clamped to [0, cmax], plus 1/2 or a uniform u, floored; with u, the floor is
//! taken without rounding the sum), portable, AVX2 and
//! AVX-512 (nearest rounding), and the fused AVX-512 chunk kernel of 8-bit nearest codes
//! (statistics, group parameters and codes of whole groups). Every path gives the same codes.

use crate::rng::hash32;

/// The rounding code of `nearest` (1 stochastic, 2 dithered).
pub(super) const NEAREST: u8 = 0;

/// floor(q) for q in [0, 2^16] (callers clamp to [0, cmax] first, which also maps NaN to 0, then
/// add at most 1). Unlike `q as i32` (saturating, which LLVM does not vectorize) this is one
/// `vcvttps2dq` per 8 lanes.
#[inline(always)]
fn code_of(q: f32) -> u32 {
    // SAFETY: q is finite and in [0, 65536], which fits an i32.
    unsafe { q.to_int_unchecked::<i32>() as u32 }
}

/// Codes of one run: v = (x - lo) / step + zp, clamped to [0, cmax], plus 1/2 or u, floored.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quant_body<O: crate::codec::kernel_io::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
    stochastic: bool,
    key: u32,
    i0: u32,
) {
    if stochastic {
        for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let u = (hash32(key ^ hash32(i0 + i as u32)) >> 8) as f32 * (1.0 / 16_777_216.0);
            let q = (v.mul_add(a, b)).max(0.0).min(cmax);
            // floor(q + u) without rounding the sum: floor(q), plus one where u reaches the
            // fraction's complement. A value on the grid (fraction 0) never moves, where the
            // f32 sum q + u rounds up to the next integer for u within half an ulp of 1; and
            // the code never passes cmax.
            let f = code_of(q);
            *o = O::from_u32(f + u32::from(u >= 1.0 - (q - f as f32)));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            let q = (v.mul_add(a, b)).max(0.0).min(cmax) + 0.5;
            *o = O::from_u32(code_of(q));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn quant_avx2<O: crate::codec::kernel_io::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
    stochastic: bool,
    key: u32,
    i0: u32,
) {
    quant_body(x, out, a, b, cmax, stochastic, key, i0)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn quant<O: crate::codec::kernel_io::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
    stochastic: bool,
    key: u32,
    i0: u32,
) {
    #[cfg(target_arch = "x86_64")]
    if !stochastic && crate::simd::avx512() {
        // SAFETY: AVX-512 F and BW are present (checked at run time).
        return unsafe { quant_nearest_avx512(x, out, a, b, cmax) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { quant_avx2(x, out, a, b, cmax, stochastic, key, i0) };
    }
    // Without FMA, mul_add is a slow libm call: use separate multiply and add.
    let _ = (a, b);
    quant_body(x, out, a, b, cmax, stochastic, key, i0)
}

/// 8-bit nearest codes of one whole chunk of a fused layout whose groups are runs of `run`
/// values, `run` a multiple of 16, without SAWB: per group, the statistics (the AVX-512 kernel
/// of [`crate::stats::summarize`]), [`group_params`], the parameters written to `params`
/// (`pbytes` per group) and the codes (as [`quant_body`]). The last group may be shorter (the
/// tensor's end). Returns whether any value was NaN or +-Inf.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) fn chunk8_avx512(
    c: &super::IntConfig,
    f: &[f32],
    run: usize,
    out: &mut [u8],
    params: &mut [u8],
    put: impl Fn(&mut [u8], (f32, f32)),
) -> bool {
    debug_assert!(run.is_multiple_of(16) && run > 0);
    let pbytes = if c.absmax { 4 } else { 8 };
    let (cmax, zp) = (c.cmax() as f32, c.zp());
    let mut any_bad = 0u32;
    for ((xb, ob), pd) in f
        .chunks(run)
        .zip(out.chunks_mut(run))
        .zip(params.chunks_exact_mut(pbytes))
    {
        // SAFETY: AVX-512 F, BW, DQ and VL are enabled in this function.
        let (min, max, bad) = unsafe { crate::stats::simd::finite_lohi(xb) };
        any_bad |= bad as u32;
        let s = crate::stats::Summary {
            min: min as f64,
            max: max as f64,
            ..crate::stats::Summary::EMPTY
        };
        let (lo, step) = super::group_params(c, s);
        put(pd, (lo, step));
        let a = if step > 0.0 { 1.0 / step } else { 0.0 };
        let b = zp - lo * a;
        // SAFETY: AVX-512 F and BW are enabled in this function.
        unsafe { quant_nearest_avx512(xb, ob, a, b, cmax) };
    }
    any_bad != 0
}

/// [`quant_body`] with nearest rounding, 16 values per iteration, for 8- or 16-bit codes (cmax
/// must fit the code type: at most 255 for `u8`): the same operations (fused multiply-add, max
/// with 0 which maps NaN to 0, min with cmax, + 1/2, truncation).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quant_nearest_avx512<O: crate::codec::kernel_io::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
) {
    use std::arch::x86_64::*;
    let n = x.len().min(out.len());
    let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
    let (vmax, half, zero) = (
        _mm512_set1_ps(cmax),
        _mm512_set1_ps(0.5),
        _mm512_setzero_ps(),
    );
    let src = x.as_ptr();
    // SAFETY: `store_codes_avx512` asks for the codes of x[i..i + 16] with i + 16 <= n, or
    // masks the lanes past n; it writes out[..n].
    unsafe {
        crate::codec::kernel_io::store_codes_avx512(out.as_mut_ptr(), n, false, |i, k| {
            let v = _mm512_maskz_loadu_ps(k, src.add(i));
            // max_ps(q, 0) returns its second operand when q is NaN, like f32::max.
            let q = _mm512_max_ps(_mm512_fmadd_ps(v, va, vb), zero);
            _mm512_cvttps_epi32(_mm512_add_ps(_mm512_min_ps(q, vmax), half))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{gather, group_params, IntConfig};
    use super::*;
    use crate::rng::normal_f32 as normal;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_codes_match_portable() {
        if !crate::simd::avx2() {
            eprintln!("no AVX2 here: only the portable path exists");
            return;
        }
        let mut x = normal(10_000, 9);
        for (i, v) in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            1e-42,
        ]
        .into_iter()
        .enumerate()
        {
            x[37 * i + 3] = v;
        }
        for (a, b, cmax) in [
            (12.7f32, 127.0f32, 254.0f32),
            (3.1, 7.5, 15.0),
            (0.0, 0.0, 255.0),
        ] {
            for stochastic in [false, true] {
                let mut p = vec![0u8; x.len()];
                let mut q = vec![0u8; x.len()];
                // SAFETY: AVX2 and FMA checked above.
                unsafe { quant_avx2(&x, &mut p, a, b, cmax, stochastic, 5, 0) };
                quant_body(&x, &mut q, a, b, cmax, stochastic, 5, 0);
                assert_eq!(p, q);
            }
        }
    }

    /// Blocks where ties among signed zeros decide the stored minimum and maximum, plus
    /// non-finite values, huge values and subnormals.
    fn tricky_blocks(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        let pool = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.5,
            -3.0,
            1e-42,
            -1e-42,
            f32::MAX,
            -f32::MAX,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        (0..n)
            .map(|i| {
                let u = r.next_u64();
                // Mostly zeros of either sign, so whole blocks are zero or non-negative.
                let mode = (i / 64) % 4;
                match (mode, u % 16) {
                    (0, _) => [0.0f32, -0.0][(u >> 8) as usize % 2],
                    (1, k) if k < 12 => [0.0f32, -0.0][(u >> 8) as usize % 2],
                    (2, k) if k < 8 => [0.0f32, -0.0, 1.0, -2.0][(u >> 8) as usize % 4],
                    _ => pool[(u >> 8) as usize % pool.len()],
                }
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_codes_match_portable() {
        if !crate::simd::avx512() {
            eprintln!("no AVX-512 here: the AVX2 and portable paths run");
            return;
        }
        let mut x = normal(10_000, 9);
        x.extend(tricky_blocks(64 * 400, 4));
        x.extend((0..2000).map(|i| (i as f32 - 1000.0) * 0.25));
        // Codes: every tail length, 8- and 16-bit outputs.
        for (a, b, cmax) in [
            (12.7f32, 127.0f32, 254.0f32),
            (3.1, 7.5, 15.0),
            (0.0, 0.0, 255.0),
            (1e30, -3.0, 65535.0),
        ] {
            for len in (0..40).chain([x.len() - 3, x.len()]) {
                // 8-bit codes where they fit (cmax <= 255, as for every 8-bit encode).
                if cmax <= 255.0 {
                    let mut p = vec![0u8; len];
                    let mut q = vec![0u8; len];
                    // SAFETY: AVX-512 F, BW, DQ and VL checked above.
                    unsafe { quant_nearest_avx512(&x[..len], &mut p, a, b, cmax) };
                    quant_body(&x[..len], &mut q, a, b, cmax, false, 0, 0);
                    assert_eq!(p, q, "len {len}");
                }
                let mut p = vec![0u16; len];
                let mut q = vec![0u16; len];
                // SAFETY: as above.
                unsafe { quant_nearest_avx512(&x[..len], &mut p, a, b, cmax) };
                quant_body(&x[..len], &mut q, a, b, cmax, false, 0, 0);
                assert_eq!(p, q, "len {len}");
            }
        }
        // The fused chunk kernel against statistics, parameters and codes of the portable path.
        for absmax in [false, true] {
            for run in [16usize, 64, 4096] {
                let c = IntConfig {
                    absmax,
                    block_size: run as u32,
                    ..IntConfig::default()
                };
                let pbytes = if absmax { 4 } else { 8 };
                let put = |d: &mut [u8], (lo, step): (f32, f32)| {
                    if absmax {
                        d.copy_from_slice(&step.to_le_bytes());
                    } else {
                        d[..4].copy_from_slice(&lo.to_le_bytes());
                        d[4..].copy_from_slice(&step.to_le_bytes());
                    }
                };
                for len in [x.len(), x.len() - 5, run * 3, run + 1, 3] {
                    let f = &x[x.len() - len..];
                    let groups = len.div_ceil(run);
                    let (mut o1, mut p1) = (vec![0u8; len], vec![0u8; groups * pbytes]);
                    let (mut o2, mut p2) = (vec![0u8; len], vec![0u8; groups * pbytes]);
                    // SAFETY: as above.
                    let bad1 = unsafe { chunk8_avx512(&c, f, run, &mut o1, &mut p1, put) };
                    let mut bad2 = false;
                    for ((xb, ob), pd) in f
                        .chunks(run)
                        .zip(o2.chunks_mut(run))
                        .zip(p2.chunks_exact_mut(pbytes))
                    {
                        let s = crate::stats::summarize_portable(xb, gather(false));
                        bad2 |= s.nonfinite > 0;
                        let (lo, step) = group_params(&c, s);
                        put(pd, (lo, step));
                        let a = if step > 0.0 { 1.0 / step } else { 0.0 };
                        quant_body(xb, ob, a, c.zp() - lo * a, c.cmax() as f32, false, 0, 0);
                    }
                    assert_eq!(bad1, bad2, "absmax={absmax} run={run} len={len}");
                    assert_eq!(p1, p2, "absmax={absmax} run={run} len={len}");
                    assert_eq!(o1, o2, "absmax={absmax} run={run} len={len}");
                }
            }
        }
    }
}

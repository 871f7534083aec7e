//! The log domain (`log=true`, format version 2): the coded value of every element is ln(x),
//! through a portable f32 logarithm compiled again for AVX-512 and AVX2 (the same bits at every
//! level), and the statistics are taken over the logarithms of the positive finite elements.
//! Zeros are coded exactly; negative and non-finite values go to the exception list.

use crate::dtype::Element;
use crate::stats::{PieceStats, Spread, Stats};

/// The natural logarithm of a positive, finite, normal-or-subnormal f32, in f32 arithmetic that
/// the compiler vectorizes: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m-1)/(m+1))
/// to the s^9 term. Within 2e-7 plus one float32 ulp of ln x of the exact value (tested): far
/// below any SmaQ step. Plain f32 operations in a fixed order, so every machine gets the same bits.
#[inline(always)]
fn ln_f32(x: f32) -> f32 {
    // Subnormals: scale into the normal range first.
    let sub = x < f32::MIN_POSITIVE;
    let x = if sub { x * 16_777_216.0 } else { x };
    let bits = x.to_bits();
    // Exponent relative to the mantissa in [sqrt(1/2), sqrt(2)).
    let adj = bits.wrapping_sub(0x3f35_04f3); // bits of sqrt(1/2)
    let e = (adj as i32 >> 23) as f32 - if sub { 24.0 } else { 0.0 };
    let m = f32::from_bits((adj & 0x007f_ffff).wrapping_add(0x3f35_04f3));
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let poly = 1.0 + s2 * (1.0 / 3.0 + s2 * (0.2 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    e * std::f32::consts::LN_2 + 2.0 * s * poly
}

/// The log domain's coded value of an element `x` whose logarithm is `l` (when x is positive
/// and finite): `l` (the smallest normal f32 for x = 1, whose logarithm would read as the
/// exact-zero code), `zero` for a zero (0.0 to code it exactly, NaN to leave it out of the
/// statistics), NaN for anything else (kept exactly in the exception list).
#[inline(always)]
fn log_code(positive: bool, is_zero: bool, l: f32, zero: f32) -> f32 {
    if positive {
        if l == 0.0 {
            f32::MIN_POSITIVE
        } else {
            l
        }
    } else if is_zero {
        zero
    } else {
        f32::NAN
    }
}

/// [`log_code`] of an f32 (the vectorized logarithm).
#[inline(always)]
fn log_of_f32(x: f32, zero: f32) -> f32 {
    log_code(x > 0.0 && x < f32::INFINITY, x == 0.0, ln_f32(x), zero)
}

/// [`log_code`] of an element of any type: f64 values take the f64 logarithm (they may lie
/// outside float32's range).
#[inline]
fn log_of<T: Element>(v: T, zero: f32) -> f32 {
    if T::DTYPE == crate::dtype::DType::F64 {
        let f = v.to_f64();
        let positive = f > 0.0 && f.is_finite();
        log_code(
            positive,
            f == 0.0,
            if positive { f.ln() as f32 } else { 0.0 },
            zero,
        )
    } else {
        log_of_f32(v.to_f64() as f32, zero)
    }
}

/// The log domain's coded values of `x` into `out`.
pub(super) fn log_values<T: Element>(x: &[T], out: &mut Vec<f32>) {
    log_codes(x, out, 0.0);
}

/// The values the log domain's statistics are taken over: the logarithms of the positive finite
/// elements (zeros, which are coded exactly, are left out as NaN).
pub(super) fn log_stat_values<T: Element>(x: &[T], out: &mut Vec<f32>) {
    log_codes(x, out, f32::NAN);
}

/// [`log_of`] of every element of `x` into `out`, zeros becoming `zero`. The f32 loop is
/// compiled again for AVX-512 and AVX2 and chosen at run time: the same IEEE operations in the
/// same order (Rust never contracts a multiply and an add), so the same bits at every level.
fn log_codes<T: Element>(x: &[T], out: &mut Vec<f32>, zero: f32) {
    out.clear();
    let Some(x32) = as_f32(x) else {
        out.extend(x.iter().map(|&v| log_of(v, zero)));
        return;
    };
    out.resize(x32.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx512() {
            // SAFETY: the CPU has AVX-512 F/BW/DQ/VL (checked just above).
            return unsafe { log_f32_avx512(x32, out, zero) };
        }
        if crate::simd::avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { log_f32_avx2(x32, out, zero) };
        }
    }
    log_f32_loop(x32, out, zero);
}

#[inline(always)]
fn log_f32_loop(x: &[f32], out: &mut [f32], zero: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = log_of_f32(v, zero);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn log_f32_avx512(x: &[f32], out: &mut [f32], zero: f32) {
    log_f32_loop(x, out, zero)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn log_f32_avx2(x: &[f32], out: &mut [f32], zero: f32) {
    log_f32_loop(x, out, zero)
}

/// `x` as f32 values when T is f32 (the vectorized path).
pub(super) fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32.
        unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) }
    })
}

/// [`as_f32`] for a mutable slice.
pub(super) fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32.
        unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) }
    })
}

/// Exact statistics of the log domain, summed in blocks of [`PieceStats::BLOCK`] in parallel
/// (the same sums as adding the blocks one by one).
pub(super) fn log_stats<T: Element>(x: &[T], spread: Spread) -> Stats {
    let mut ps = PieceStats::new();
    let block = PieceStats::BLOCK;
    let mut buf = Vec::new();
    // The shift: the first block holding a finite value fixes it.
    let mut start = 0;
    while start < x.len() && ps.shift().is_none() {
        let end = (start + block).min(x.len());
        log_stat_values(&x[start..end], &mut buf);
        ps.add(&buf);
        start = end;
    }
    if let Some(shift) = ps.shift() {
        let rest = crate::pool::map_chunks(&x[start..], block, |_, c| {
            let mut b = Vec::new();
            log_stat_values(c, &mut b);
            PieceStats::moments(&b, shift)
        });
        for m in rest {
            ps.merge(m);
        }
    }
    ps.finish(spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::smaq::{round_trip, Rounding, SmaqConfig};
    use crate::codec::Encoder;
    use crate::rng::normal_f32 as normal;

    #[test]
    fn log_domain_keeps_relative_precision_zeros_and_the_rest_exactly() {
        // Adam's exp_avg_sq spans orders of magnitude: 1e-14 .. 1e-2 here.
        let mut x: Vec<f32> = normal(100_000, 15)
            .iter()
            .map(|v| (v * 3.0).exp() * 1e-8)
            .collect();
        x[0] = 0.0;
        x[1] = 1.0;
        x[2] = -3.0;
        x[3] = f32::NAN;
        x[4] = f32::INFINITY;
        x[5] = 1e30;
        let cfg = SmaqConfig {
            log: true,
            rounding: Rounding::Nearest,
            chunk_size: 8192,
            ..Default::default()
        };
        assert_eq!(cfg.format_version(), 2);
        let (y, h, _) = round_trip(&cfg, &x);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[2], -3.0);
        assert!(y[3].is_nan());
        assert_eq!(y[4], f32::INFINITY);
        let q = cfg.quant();
        // In the log domain: half a main step, half an outlier step, half a fine escape step.
        let std = h.h.std;
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate().skip(5) {
            let z = ((a as f64).ln() - h.h.mean).abs() / std;
            let half = if z <= q.t_main as f64 {
                0.5 / q.r_main as f64
            } else {
                0.5 / q.r_out as f64
            } * std;
            let err = ((b as f64).ln() - (a as f64).ln()).abs();
            assert!(err <= half * 1.001 + 1e-6, "element {i}: {a} -> {b}");
        }
        // A relative error for all magnitudes, where the linear grid loses the small values.
        let lin = SmaqConfig {
            rounding: Rounding::Nearest,
            all_positive: true,
            chunk_size: 8192,
            ..Default::default()
        };
        let (yl, _, _) = round_trip(&lin, &x);
        let small = |y: &[f32]| {
            x.iter()
                .zip(y)
                .skip(6)
                .filter(|(a, _)| **a < 1e-9)
                .map(|(a, b)| ((b - a) / a).abs() as f64)
                .sum::<f64>()
        };
        assert!(
            small(&y) * 100.0 < small(&yl),
            "{} vs {}",
            small(&y),
            small(&yl)
        );
    }

    #[test]
    fn fast_logarithm_is_within_an_ulp_of_libm() {
        // Error in units of (2e-7 + one f32 ulp of the result): the result's own rounding.
        let err = |y: f32| {
            let want = (y as f64).ln();
            (ln_f32(y) as f64 - want).abs() / (2e-7 + want.abs() * f32::EPSILON as f64)
        };
        let mut worst = 0f64;
        let mut x = f32::from_bits(1); // the smallest subnormal
        while x < f32::MAX / 2.0 {
            for y in [x, x * 1.000_001, x * 1.37, x * 1.999] {
                worst = worst.max(err(y));
            }
            x *= 1.9;
        }
        // Every mantissa near 1, where the cancellation would show.
        for i in 0..100_000u32 {
            worst = worst.max(err(f32::from_bits(0x3f80_0000 - 50_000 + i)));
        }
        assert!(worst <= 1.0, "worst {worst}");
        assert_eq!(log_of_f32(1.0, 0.0), f32::MIN_POSITIVE);
        assert_eq!(log_of_f32(0.0, 0.0), 0.0);
        assert!(log_of_f32(0.0, f32::NAN).is_nan());
        assert!(log_of_f32(-1.0, 0.0).is_nan());
        assert!(log_of_f32(f32::INFINITY, 0.0).is_nan());
        assert!(log_of_f32(f32::NAN, 0.0).is_nan());
    }

    #[test]
    fn vector_logarithms_give_the_portable_bits() {
        let mut rng = crate::rng::SplitMix64::new(11);
        let mut x: Vec<f32> = (0..10_000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .collect();
        x.extend([
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
        ]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -1.0]);
        for zero in [0.0, f32::NAN] {
            let mut want = vec![0f32; x.len()];
            log_f32_loop(&x, &mut want, zero);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            #[cfg(target_arch = "x86_64")]
            {
                let mut got = vec![0f32; x.len()];
                if crate::simd::avx512() {
                    // SAFETY: AVX-512 is present.
                    unsafe { log_f32_avx512(&x, &mut got, zero) };
                    assert_eq!(bits(&got), bits(&want));
                }
                if crate::simd::avx2() {
                    // SAFETY: AVX2 is present.
                    unsafe { log_f32_avx2(&x, &mut got, zero) };
                    assert_eq!(bits(&got), bits(&want));
                }
            }
            let mut got = Vec::new();
            log_codes(&x, &mut got, zero);
            assert_eq!(bits(&got), bits(&want));
        }
    }
}

//! S2FP8's per-tensor shift and squeeze (Cambier et al. 2020; docs/CODECS.md, "Floating
//! point"): an affine map of log2|x| fitted to the tensor so that its values fill e5m2's range,
//! applied before encoding and undone after decoding. Its two parameters, alpha and beta, are
//! stored in the codec's metadata.
//!
//! The transform of one value ([`LogShiftSqueeze::squeeze_one`],
//! [`LogShiftSqueeze::unsqueeze_one`]) is the definition every fast path reproduces bit for
//! bit: decoding applies it to the 256 code values once ([`LogShiftSqueeze::decode_table`]) and
//! encoding compares magnitudes with precomputed thresholds (`squeeze_codes.rs`). The fit of a
//! large tensor sums log2|x| from its exponent bits and a polynomial of its mantissa
//! ([`log2_stats`]) instead of one `log2` call per value.

use rayon::prelude::*;

use super::minifloat::MiniFloat;
use super::CHUNK;

/// Tensors with at least this many values are fitted by [`log2_stats`] and encoded through
/// thresholds (with nearest or truncating rounding); smaller ones take one `log2` per value (and
/// one `exp2` to encode), which costs less than the per-tensor set-up of the fast paths.
pub(super) const FAST_MIN: usize = CHUNK;

/// The transform y = sign(x) * 2^(alpha * log2|x| + beta): `beta` shifts and `alpha` squeezes
/// the logarithms of the magnitudes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct LogShiftSqueeze {
    pub(super) alpha: f32,
    pub(super) beta: f32,
}

impl LogShiftSqueeze {
    /// From the non-zero finite values: mu = mean(log2|x|), m = max(log2|x|); alpha maps m - mu
    /// to 15 and beta moves mu to 0. Below [`FAST_MIN`] values with one `log2` per value,
    /// otherwise through [`log2_stats`] (the same max; the mean to within float32 rounding).
    pub(super) fn fit(x: &[f32]) -> Self {
        if x.len() < FAST_MIN {
            Self::fit_exact(x)
        } else {
            Self::fit_fast(x)
        }
    }

    /// [`Self::fit`] with one `log2` per value.
    pub(super) fn fit_exact(x: &[f32]) -> Self {
        let (sum, cnt, max) = crate::pool::install(|| {
            x.par_chunks(CHUNK)
                .map(|c| {
                    let (mut s, mut n, mut m) = (0f64, 0u64, f64::NEG_INFINITY);
                    for &v in c {
                        let a = v.abs();
                        if a > 0.0 && a.is_finite() {
                            let l = a.log2() as f64;
                            s += l;
                            n += 1;
                            m = m.max(l);
                        }
                    }
                    (s, n, m)
                })
                .reduce(
                    || (0.0, 0, f64::NEG_INFINITY),
                    |a, b| (a.0 + b.0, a.1 + b.1, a.2.max(b.2)),
                )
        });
        Self::from_stats(sum, cnt, max)
    }

    /// [`Self::fit`] through [`log2_stats`]: the max is log2 of the largest magnitude (one
    /// `log2`, the same value as the max of the per-value `log2`s since `log2` is monotone:
    /// tested over every float32).
    pub(super) fn fit_fast(x: &[f32]) -> Self {
        let (sum, cnt, amax) = crate::pool::install(|| {
            x.par_chunks(CHUNK)
                .map(log2_stats)
                .reduce(|| (0.0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2.max(b.2)))
        });
        let max = if cnt == 0 {
            f64::NEG_INFINITY
        } else {
            f32::from_bits(amax).log2() as f64
        };
        Self::from_stats(sum, cnt, max)
    }

    /// alpha and beta from the sum and count of log2|x| over the non-zero finite values and
    /// their max.
    fn from_stats(sum: f64, cnt: u64, max: f64) -> Self {
        if cnt == 0 {
            return LogShiftSqueeze {
                alpha: 1.0,
                beta: 0.0,
            };
        }
        let mu = sum / cnt as f64;
        let alpha = if max - mu > 1e-6 {
            15.0 / (max - mu)
        } else {
            1.0
        };
        LogShiftSqueeze {
            alpha: alpha as f32,
            beta: (-alpha * mu) as f32,
        }
    }

    /// The squeezed value of `v` (NaN stays NaN): the definition of the transform.
    #[inline]
    pub(super) fn squeeze_one(&self, v: f32) -> f32 {
        let y = (self.alpha * v.abs().log2() + self.beta).exp2();
        if v.is_nan() {
            v
        } else {
            y.copysign(v)
        }
    }

    /// The squeezed values of `x` into `out` (same length), ready for the e5m2 codes.
    pub(super) fn squeeze(&self, x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = self.squeeze_one(v);
        }
    }

    /// The inverse's factor 1 / alpha, as [`Self::unsqueeze_one`] takes it.
    pub(super) fn inv_alpha(&self) -> f32 {
        1.0 / self.alpha
    }

    /// Undoes [`Self::squeeze_one`] on one decoded value (`inv` = [`Self::inv_alpha`];
    /// non-finite values stay as they are).
    #[inline]
    pub(super) fn unsqueeze_one(&self, inv: f32, v: f32) -> f32 {
        if v.is_finite() {
            ((v.abs().log2() - self.beta) * inv).exp2().copysign(v)
        } else {
            v
        }
    }

    /// The decoded value of every code of `fmt` (256 for e5m2): its value, unsqueezed.
    pub(super) fn decode_table(&self, fmt: MiniFloat) -> Vec<f32> {
        let inv = self.inv_alpha();
        (0..1u32 << fmt.width())
            .map(|c| self.unsqueeze_one(inv, fmt.value(c)))
            .collect()
    }
}

/// Per chunk: the sum of log2|x| over its non-zero finite values, their count, and the bits of
/// the largest such |x| (0 when there is none); with AVX-512 or AVX2 when the CPU has it (the
/// same sums: the portable loop compiled for those instruction sets).
pub(super) fn log2_stats(x: &[f32]) -> (f64, u64, u32) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() {
        // SAFETY: the CPU supports AVX-512 F, BW, DQ and VL (checked at run time).
        return unsafe { log2_stats_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { log2_stats_avx2(x) };
    }
    log2_stats_body(x)
}

/// [`log2_stats`] 16 values per iteration in AVX-512 registers, the portable loop's steps:
/// `vgetexpps` / `vgetmantps` give e and m (subnormals included), `vpermps` the three 16-entry
/// tables. e + hi is summed exactly in float32 lanes and the small rest in float32 lanes (at most
/// 0.05 each), both flushed to float64 every 256 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn log2_stats_avx512(x: &[f32]) -> (f64, u64, u32) {
    use std::arch::x86_64::*;
    let t = &*LOG2_TABLES;
    // SAFETY: each table holds 16 float32.
    let (inv, hi, lo) = unsafe {
        (
            _mm512_loadu_ps(t.inv.as_ptr()),
            _mm512_loadu_ps(t.hi.as_ptr()),
            _mm512_loadu_ps(t.lo.as_ptr()),
        )
    };
    let absm = _mm512_set1_epi32(0x7fff_ffff);
    let one_i = _mm512_set1_epi32(1);
    let finite_lim = _mm512_set1_epi32(0x7f7f_ffff);
    let one = _mm512_set1_ps(1.0);
    let c = LOG2_P.map(|v| _mm512_set1_ps(v));
    let (src, n) = (x.as_ptr(), x.len());
    let (mut sum, mut cnt) = (_mm512_setzero_pd(), 0u64);
    let mut mx = _mm512_setzero_si512();
    let mut i = 0;
    while i < n {
        let (mut se, mut sl) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let end = n.min(i + 256);
        while i < end {
            let k: __mmask16 = if end - i >= 16 {
                0xffff
            } else {
                ((1u32 << (end - i)) - 1) as u16
            };
            // SAFETY: only the lanes below end - i <= n - i are read.
            let v = unsafe { _mm512_maskz_loadu_epi32(k, src.add(i).cast()) };
            let a = _mm512_and_si512(v, absm);
            let ok = _mm512_mask_cmplt_epu32_mask(k, _mm512_sub_epi32(a, one_i), finite_lim);
            let af = _mm512_castsi512_ps(a);
            let m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_ZERO>(af);
            // The top 4 mantissa bits (of the normalized mantissa: m's own bits).
            let j = _mm512_srli_epi32::<19>(_mm512_castps_si512(m));
            let r = _mm512_fmsub_ps(m, _mm512_permutexvar_ps(j, inv), one);
            let p = _mm512_fmadd_ps(c[5], r, c[4]);
            let p = _mm512_fmadd_ps(p, r, c[3]);
            let p = _mm512_fmadd_ps(p, r, c[2]);
            let p = _mm512_fmadd_ps(p, r, c[1]);
            let p = _mm512_fmadd_ps(p, r, c[0]);
            let small = _mm512_fmadd_ps(p, r, _mm512_permutexvar_ps(j, lo));
            let big = _mm512_add_ps(_mm512_getexp_ps(af), _mm512_permutexvar_ps(j, hi));
            se = _mm512_mask_add_ps(se, ok, se, big);
            sl = _mm512_mask_add_ps(sl, ok, sl, small);
            mx = _mm512_mask_max_epu32(mx, ok, mx, a);
            cnt += ok.count_ones() as u64;
            i += 16;
        }
        let f = |v: __m512| {
            _mm512_add_pd(
                _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v)),
            )
        };
        sum = _mm512_add_pd(sum, _mm512_add_pd(f(se), f(sl)));
    }
    (_mm512_reduce_add_pd(sum), cnt, _mm512_reduce_max_epu32(mx))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log2_stats_avx2(x: &[f32]) -> (f64, u64, u32) {
    log2_stats_body(x)
}

/// Per value of the top 4 mantissa bits j (m in [1 + j/16, 1 + (j + 1)/16)): `inv` = 1 / c
/// rounded to float32, c = 1 + (j + 1/2) / 16, and hi + lo = -log2(inv) (the float32 `inv`
/// itself, so its rounding costs nothing), hi a multiple of 2^-12: e + hi is exact in float32,
/// and so are sums of up to 16 of them per lane.
struct Log2Tables {
    inv: [f32; 16],
    hi: [f32; 16],
    lo: [f32; 16],
}

static LOG2_TABLES: std::sync::LazyLock<Log2Tables> = std::sync::LazyLock::new(|| {
    let mut t = Log2Tables {
        inv: [0.0; 16],
        hi: [0.0; 16],
        lo: [0.0; 16],
    };
    for j in 0..16 {
        let inv = (1.0 / (1.0 + (j as f64 + 0.5) / 16.0)) as f32;
        let l = -(inv as f64).log2();
        let hi = (l * 4096.0).round() / 4096.0;
        t.inv[j] = inv;
        t.hi[j] = hi as f32;
        t.lo[j] = (l - hi) as f32;
    }
    t
});

/// log2(1 + r) = r (P0 + r (P1 + ... + r P5)), Pk = (-1)^k / ((k + 1) ln 2): for |r| <= 1/32
/// the next term is below 1e-11.
const LOG2_P: [f32; 6] = {
    let l = std::f64::consts::LOG2_E;
    [
        l as f32,
        (-l / 2.0) as f32,
        (l / 3.0) as f32,
        (-l / 4.0) as f32,
        (l / 5.0) as f32,
        (-l / 6.0) as f32,
    ]
};

/// One value's part of [`log2_stats`]: whether it counts (non-zero and finite) and log2|x| =
/// e + hi[j] + lo[j] + log2(1 + r), r = m inv[j] - 1 (|r| <= 1/32), m in [1, 2) and j its top 4
/// mantissa bits ([`Log2Tables`]): within float32 rounding of the small part (a few 1e-9).
#[inline(always)]
fn log2_parts(v: f32, t: &Log2Tables) -> (bool, f64) {
    let a = v.to_bits() & 0x7fff_ffff;
    let valid = a.wrapping_sub(1) < 0x7f7f_ffff;
    let sub = a < 0x0080_0000;
    // Subnormals scaled by 2^23 (exact) into the normal range.
    let an = if sub {
        (f32::from_bits(a) * 8_388_608.0).to_bits()
    } else {
        a
    };
    let m = f32::from_bits((an & 0x007f_ffff) | 0x3f80_0000);
    let j = ((an >> 19) & 15) as usize;
    let e = (an >> 23) as i32 - 127 - if sub { 23 } else { 0 };
    let r = m.mul_add(t.inv[j], -1.0);
    let c = &LOG2_P;
    let p = c[5].mul_add(r, c[4]);
    let p = p
        .mul_add(r, c[3])
        .mul_add(r, c[2])
        .mul_add(r, c[1])
        .mul_add(r, c[0]);
    let small = p.mul_add(r, t.lo[j]);
    let l = (e as f32 + t.hi[j]) as f64 + small as f64;
    if valid {
        (true, l)
    } else {
        (false, 0.0)
    }
}

/// The portable loop of [`log2_stats`].
#[inline(always)]
pub(super) fn log2_stats_body(x: &[f32]) -> (f64, u64, u32) {
    let t = &*LOG2_TABLES;
    let (mut sum, mut n, mut mx) = (0f64, 0u64, 0u32);
    for &v in x {
        let (ok, l) = log2_parts(v, t);
        sum += l;
        n += ok as u64;
        mx = mx.max(if ok { v.to_bits() & 0x7fff_ffff } else { 0 });
    }
    (sum, n, mx)
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{all_bits, round_trip};
    use super::super::{FloatConfig, Kind};
    use super::*;
    use crate::codec::{Encoder, Params};
    use crate::dtype::Data;
    use crate::rng::{normal_f32, SplitMix64};

    /// The decoder's inverse applied to each value on its own (`1 / alpha` once per tensor).
    fn unsqueeze_each(s: &LogShiftSqueeze, v: &mut [f32]) {
        let (inv, beta) = (1.0 / s.alpha, s.beta);
        for v in v.iter_mut() {
            if v.is_finite() {
                *v = ((v.abs().log2() - beta) * inv).exp2().copysign(*v);
            }
        }
    }

    #[test]
    fn decode_table_is_the_per_value_inverse() {
        let fmt = MiniFloat::ieee(5, 2);
        let mut params = vec![(1.0f32, 0.0f32), (1.5e7, -9e8), (0.05, 40.0), (3.3, -20.0)];
        params.push((
            LogShiftSqueeze::fit_exact(&normal_f32(1000, 2)).alpha,
            LogShiftSqueeze::fit_exact(&normal_f32(1000, 2)).beta,
        ));
        for (alpha, beta) in params {
            let s = LogShiftSqueeze { alpha, beta };
            let t = s.decode_table(fmt);
            let mut want: Vec<f32> = (0..256).map(|c| fmt.value(c)).collect();
            unsqueeze_each(&s, &mut want);
            assert_eq!(t.len(), 256);
            for (c, (a, b)) in t.iter().zip(&want).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{s:?} code {c}: {a:e} != {b:e}"
                );
            }
        }
        // And the decoder's output is the per-value inverse of each code's value.
        let mut x = normal_f32(3 << 16, 3);
        x.extend(all_bits(5000));
        let cfg = FloatConfig::from_params(Kind::S2fp8, &Params::new()).unwrap();
        let enc = cfg.encode(Data::F32(&x)).unwrap();
        let m = &enc.meta;
        let f = |i: usize| f32::from_le_bytes(m[i..i + 4].try_into().unwrap());
        let s = LogShiftSqueeze {
            alpha: f(m.len() - 8),
            beta: f(m.len() - 4),
        };
        let (y, _) = round_trip(Kind::S2fp8, &Params::new(), &x);
        let mut want: Vec<f32> = enc.payload.iter().map(|&c| fmt.value(c as u32)).collect();
        unsqueeze_each(&s, &mut want);
        for (a, b) in y.iter().zip(&want) {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        }
    }

    /// Tensors for the fit: normal, rows scaled by powers of two (gradient-like), log-uniform
    /// over float32's whole range with zeros, subnormals, infinities and NaNs mixed in.
    fn fit_inputs() -> Vec<Vec<f32>> {
        let mut r = SplitMix64::new(31);
        let mut grad = normal_f32(1 << 18, 32);
        for row in grad.chunks_mut(1000) {
            let k = (r.below(30) as f32 - 25.0).exp2();
            row.iter_mut().for_each(|v| *v *= k);
        }
        let mut wide: Vec<f32> = (0..1 << 18)
            .map(|_| (r.below(270) as f32 - 145.0 + (r.below(1000) as f32) * 1e-3).exp2())
            .collect();
        wide.extend(all_bits(50_000));
        vec![normal_f32(1 << 18, 30), grad, wide, vec![2.5; 1 << 17]]
    }

    #[test]
    fn log2_stats_match_per_value_log2() {
        for x in fit_inputs() {
            let (sum, n, amax) = log2_stats(&x);
            let (sum_p, n_p, amax_p) = log2_stats_body(&x);
            assert_eq!((n, amax), (n_p, amax_p));
            assert!((sum - sum_p).abs() / n as f64 <= 5e-9, "{sum} vs {sum_p}");
            let (mut want, mut wn, mut wmax) = (0f64, 0u64, 0u32);
            for &v in &x {
                let a = v.abs();
                if a > 0.0 && a.is_finite() {
                    want += (a as f64).log2();
                    wn += 1;
                    wmax = wmax.max(a.to_bits());
                }
            }
            assert_eq!(n, wn);
            assert_eq!(amax, wmax);
            // Each value within float32 rounding of its small part (ulp 2^-28 at most); the mean
            // within 5e-9: the float32 partial sums of the small parts round alike when all
            // values are equal (the constant tensor), and at random otherwise.
            let mean_err = (sum - want).abs() / n as f64;
            assert!(mean_err < 5e-9, "mean error {mean_err:e}");
            for &v in x.iter().step_by(97) {
                let a = v.abs();
                for (one, _, _) in [log2_stats(&[v]), log2_stats_body(&[v])] {
                    if a > 0.0 && a.is_finite() {
                        let d = (one - (a as f64).log2()).abs();
                        assert!(d < 5e-9, "{v:e}: {one} vs {}", (a as f64).log2());
                    } else {
                        assert_eq!(one, 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn fast_fit_is_the_exact_fit_within_rounding() {
        for x in fit_inputs() {
            let (a, b) = (
                LogShiftSqueeze::fit_fast(&x),
                LogShiftSqueeze::fit_exact(&x),
            );
            let ulps = |p: f32, q: f32| (p.to_bits() as i64 - q.to_bits() as i64).abs();
            assert!(ulps(a.alpha, b.alpha) <= 2, "{a:?} vs {b:?}");
            assert!(
                ulps(a.beta, b.beta) <= 2 || (a.beta - b.beta).abs() < 1e-6,
                "{a:?} vs {b:?}"
            );
        }
        assert_eq!(
            LogShiftSqueeze::fit_fast(&[0.0; 1 << 16]),
            LogShiftSqueeze::fit_exact(&[0.0; 1 << 16])
        );
    }

    #[test]
    fn s2fp8_relative_error() {
        // Log-uniform magnitudes over 2^-12..2^-4: squeezed into e5m2's range, the relative error
        // is about 2^-3 / alpha.
        let mut r = crate::rng::SplitMix64::new(8);
        let x: Vec<f32> = (0..50_000)
            .map(|i| {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                let v = (u * 8.0 - 12.0).exp2();
                if i % 2 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect();
        let (y, _) = round_trip(Kind::S2fp8, &Params::new(), &x);
        for (a, b) in x.iter().zip(&y) {
            // Near the bottom of the range the squeezed value is an e5m2 subnormal: less precise.
            let tol = if a.abs() > 2f32.powf(-10.5) {
                0.04
            } else {
                0.25
            };
            assert!(((a - b) / a).abs() < tol, "{a} -> {b}");
        }
    }
}

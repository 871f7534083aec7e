//! Mean and standard deviation of a tensor, ignoring NaN and +-Inf.

use crate::dtype::Element;
use crate::rng::SplitMix64;

/// Running moments of the finite values, shifted by `shift` for numerical stability.
#[derive(Debug, Clone, Copy)]
struct Moments {
    count: u64,
    sum: f64,
    sumsq: f64,
    min: f64,
    max: f64,
}

impl Moments {
    const EMPTY: Moments = Moments {
        count: 0,
        sum: 0.0,
        sumsq: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    fn merge(self, o: Moments) -> Moments {
        Moments {
            count: self.count + o.count,
            sum: self.sum + o.sum,
            sumsq: self.sumsq + o.sumsq,
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }

    /// Moments of one block: f32 data goes through an AVX2 kernel where the CPU has one;
    /// float16/bfloat16 blocks are widened to f32 (exactly) and take the same kernel.
    fn of<T: Element>(x: &[T], shift: f64) -> Moments {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::avx2() {
                if let Some(wide) = widen_half(x) {
                    return Self::of(&wide, shift);
                }
            }
            if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
                // SAFETY: T is f32, so the slice is a slice of f32.
                let x32 = unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) };
                if crate::simd::avx512() {
                    // SAFETY: AVX-512 F/DQ/VL are present (checked just above).
                    return unsafe { Moments::of_f32_avx512(x32, shift) };
                }
                if crate::simd::avx2() {
                    // SAFETY: AVX2 is present (checked just above).
                    return unsafe { Moments::of_f32_avx2(x32, shift) };
                }
            }
        }
        Moments::of_portable(x, shift)
    }

    /// f32 moments in AVX2, summed in f64 lanes (exact enough for any finite f32 range:
    /// squares of subnormals and of values near f32::MAX are representable in f64).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn of_f32_avx2(x: &[f32], shift: f64) -> Moments {
        use std::arch::x86_64::*;
        let sh = _mm256_set1_pd(shift);
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let (mut q0, mut q1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut count = _mm256_setzero_si256();
        let body = x.len() / 8 * 8;
        let mut i = 0;
        while i < body {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let bad = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp), exp);
            let badf = _mm256_castsi256_ps(bad);
            // Non-finite lanes contribute `shift`, i.e. zero after the subtraction.
            let vz = _mm256_blendv_ps(v, _mm256_set1_ps(shift as f32), badf);
            let d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(vz)), sh);
            let d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(vz)), sh);
            let keep0 = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(bad)));
            let keep1 =
                _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(bad)));
            let d0 = _mm256_andnot_pd(keep0, d0);
            let d1 = _mm256_andnot_pd(keep1, d1);
            s0 = _mm256_add_pd(s0, d0);
            s1 = _mm256_add_pd(s1, d1);
            q0 = _mm256_add_pd(q0, _mm256_mul_pd(d0, d0));
            q1 = _mm256_add_pd(q1, _mm256_mul_pd(d1, d1));
            lo = _mm256_min_ps(lo, _mm256_blendv_ps(v, _mm256_set1_ps(f32::INFINITY), badf));
            hi = _mm256_max_ps(
                hi,
                _mm256_blendv_ps(v, _mm256_set1_ps(f32::NEG_INFINITY), badf),
            );
            count = _mm256_sub_epi32(count, _mm256_xor_si256(bad, _mm256_set1_epi32(-1)));
            i += 8;
        }
        let mut m = Moments::EMPTY;
        let (mut a, mut b) = ([0f64; 4], [0f64; 4]);
        _mm256_storeu_pd(a.as_mut_ptr(), _mm256_add_pd(s0, s1));
        _mm256_storeu_pd(b.as_mut_ptr(), _mm256_add_pd(q0, q1));
        m.sum = a.iter().sum();
        m.sumsq = b.iter().sum();
        let (mut la, mut ha, mut ca) = ([0f32; 8], [0f32; 8], [0u32; 8]);
        _mm256_storeu_ps(la.as_mut_ptr(), lo);
        _mm256_storeu_ps(ha.as_mut_ptr(), hi);
        _mm256_storeu_si256(ca.as_mut_ptr() as *mut __m256i, count);
        m.count = ca.iter().map(|&c| c as u64).sum();
        m.min = la.iter().fold(f64::INFINITY, |a, &b| a.min(b as f64));
        m.max = ha.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        m.merge(Moments::of_portable(&x[body..], shift))
    }

    /// [`Moments::of_f32_avx2`] in AVX-512: the same eight f64 lanes (lane j sums the elements
    /// j mod 8, in order), the same operations and the same final reduction, so the result is
    /// bit-identical; non-finite lanes are masked instead of blended.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn of_f32_avx512(x: &[f32], shift: f64) -> Moments {
        use std::arch::x86_64::*;
        let sh = _mm512_set1_pd(shift);
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let mut s = _mm512_setzero_pd();
        let mut q = _mm512_setzero_pd();
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut count = 0u64;
        let body = x.len() / 8 * 8;
        let p = x.as_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 <= body <= x.len().
            let v = unsafe { _mm256_loadu_ps(p.add(i)) };
            let vb = _mm256_castps_si256(v);
            let ok = _mm256_cmpneq_epi32_mask(_mm256_and_si256(vb, exp), exp);
            // Finite lanes: widen, subtract the shift; the others are +0.0, as in AVX2.
            let d = _mm512_maskz_sub_pd(ok, _mm512_cvtps_pd(v), sh);
            s = _mm512_add_pd(s, d);
            q = _mm512_add_pd(q, _mm512_mul_pd(d, d));
            lo = _mm256_mask_min_ps(lo, ok, lo, v);
            hi = _mm256_mask_max_ps(hi, ok, hi, v);
            count += ok.count_ones() as u64;
            i += 8;
        }
        let mut m = Moments::EMPTY;
        let (mut sl, mut ql) = ([0f64; 8], [0f64; 8]);
        // SAFETY: both arrays hold eight f64.
        unsafe {
            _mm512_storeu_pd(sl.as_mut_ptr(), s);
            _mm512_storeu_pd(ql.as_mut_ptr(), q);
        }
        // The AVX2 kernel's order: its two 4-lane halves added lane-wise, then summed.
        let a: [f64; 4] = std::array::from_fn(|j| sl[j] + sl[j + 4]);
        let b: [f64; 4] = std::array::from_fn(|j| ql[j] + ql[j + 4]);
        m.sum = a.iter().sum();
        m.sumsq = b.iter().sum();
        let (mut la, mut ha) = ([0f32; 8], [0f32; 8]);
        // SAFETY: both arrays hold eight f32.
        unsafe {
            _mm256_storeu_ps(la.as_mut_ptr(), lo);
            _mm256_storeu_ps(ha.as_mut_ptr(), hi);
        }
        m.count = count;
        m.min = la.iter().fold(f64::INFINITY, |a, &b| a.min(b as f64));
        m.max = ha.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        m.merge(Moments::of_portable(&x[body..], shift))
    }

    /// Moments of one block, with 8 independent lanes.
    fn of_portable<T: Element>(x: &[T], shift: f64) -> Moments {
        const L: usize = 8;
        let (mut s, mut q, mut c) = ([0f64; L], [0f64; L], [0u64; L]);
        let (mut lo, mut hi) = ([f64::INFINITY; L], [f64::NEG_INFINITY; L]);
        let mut blocks = x.chunks_exact(L);
        for b in &mut blocks {
            for j in 0..L {
                let v = b[j].to_f64();
                let ok = v.is_finite();
                let d = if ok { v - shift } else { 0.0 };
                s[j] += d;
                q[j] += d * d;
                c[j] += ok as u64;
                lo[j] = if ok { lo[j].min(v) } else { lo[j] };
                hi[j] = if ok { hi[j].max(v) } else { hi[j] };
            }
        }
        let mut m = Moments::EMPTY;
        for j in 0..L {
            m = m.merge(Moments {
                count: c[j],
                sum: s[j],
                sumsq: q[j],
                min: lo[j],
                max: hi[j],
            });
        }
        for v in blocks
            .remainder()
            .iter()
            .map(|v| v.to_f64())
            .filter(|v| v.is_finite())
        {
            let d = v - shift;
            m = m.merge(Moments {
                count: 1,
                sum: d,
                sumsq: d * d,
                min: v,
                max: v,
            });
        }
        m
    }
}

/// `x` widened to f32 when it is float16 or bfloat16 (every value exactly; SIMD conversion).
#[cfg(target_arch = "x86_64")]
fn widen_half<T: Element>(x: &[T]) -> Option<Vec<f32>> {
    use half::slice::HalfFloatSliceExt;
    use std::any::TypeId;
    let mut out = vec![0f32; x.len()];
    if TypeId::of::<T>() == TypeId::of::<half::f16>() {
        // SAFETY: T is f16 (same type, same layout).
        let h = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<half::f16>(), x.len()) };
        h.convert_to_f32_slice(&mut out);
    } else if TypeId::of::<T>() == TypeId::of::<half::bf16>() {
        // SAFETY: T is bf16 (same type, same layout).
        let h = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<half::bf16>(), x.len()) };
        h.convert_to_f32_slice(&mut out);
    } else {
        return None;
    }
    Some(out)
}

/// How the statistics are gathered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Every finite element.
    Exact,
    /// `k` elements drawn uniformly with replacement under `seed` (non-finite draws are skipped).
    Sampled { k: u32, seed: u64 },
}

/// How the spread is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Population standard deviation.
    Std,
    /// (max - min) / sqrt(2 ln n): the expected range of n normal draws, inverted.
    Range,
}

/// Result of [`mean_std`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    /// Always finite and > 0 (1.0 when the data has no spread).
    pub std: f64,
    /// Finite values the statistics were computed from.
    pub count: u64,
}

/// Mean and spread of the finite values of `x`. Never returns NaN or a zero spread.
pub fn mean_std<T: Element>(x: &[T], sampling: Sampling, spread: Spread) -> Stats {
    let shift = x
        .iter()
        .map(|v| v.to_f64())
        .find(|v| v.is_finite())
        .unwrap_or(0.0);
    // Per-block moments in parallel, merged in block order: the result does not depend on the
    // number of threads (a tree reduction would add in a thread-dependent order).
    let exact = || {
        let blocks = crate::pool::map_chunks(x, 1 << 16, |_, c| Moments::of(c, shift));
        blocks.into_iter().fold(Moments::EMPTY, Moments::merge)
    };
    let m = match sampling {
        Sampling::Sampled { k, seed } if (k as usize) < x.len() => {
            let mut rng = SplitMix64::new(seed);
            let picks: Vec<T> = (0..k)
                .map(|_| x[rng.below(x.len() as u64) as usize])
                .collect();
            let m = Moments::of(&picks, shift);
            // Mostly non-finite draws say little about the rest: read everything instead.
            if m.count < (k as u64).min(64) {
                exact()
            } else {
                m
            }
        }
        _ => exact(),
    };
    finish(m, shift, spread)
}

/// Exact statistics of a tensor that is produced piece by piece and never held whole (the fused
/// optimizer step): feed the pieces in order with [`PieceStats::add`]. With pieces of
/// [`PieceStats::BLOCK`] values the result is bit for bit [`mean_std`] with
/// [`Sampling::Exact`] over the whole tensor; other piece lengths round the sums differently.
#[derive(Debug, Clone)]
pub struct PieceStats {
    shift: Option<f64>,
    m: Moments,
}

impl Default for PieceStats {
    fn default() -> Self {
        Self::new()
    }
}

impl PieceStats {
    /// The block length [`mean_std`] sums in.
    pub const BLOCK: usize = 1 << 16;

    pub fn new() -> Self {
        PieceStats {
            shift: None,
            m: Moments::EMPTY,
        }
    }

    /// The shift the sums are taken around: the tensor's first finite value, which the first
    /// piece holding one fixes. Pieces may be summed with [`PieceStats::moments`] in parallel
    /// once it is known.
    pub fn shift(&self) -> Option<f64> {
        self.shift
    }

    /// Adds the next piece (in tensor order).
    pub fn add<T: Element>(&mut self, x: &[T]) {
        if self.shift.is_none() {
            self.shift = x.iter().map(|v| v.to_f64()).find(|v| v.is_finite());
        }
        let m = Moments::of(x, self.shift.unwrap_or(0.0));
        self.merge(PieceMoments(m));
    }

    /// The moments of one piece around `shift`, to be merged in tensor order.
    pub fn moments<T: Element>(x: &[T], shift: f64) -> PieceMoments {
        PieceMoments(Moments::of(x, shift))
    }

    /// Merges the moments of the next piece (in tensor order), computed around [`Self::shift`].
    pub fn merge(&mut self, m: PieceMoments) {
        self.m = self.m.merge(m.0);
    }

    pub fn finish(&self, spread: Spread) -> Stats {
        finish(self.m, self.shift.unwrap_or(0.0), spread)
    }
}

/// The moments of one piece (see [`PieceStats::moments`]).
#[derive(Debug, Clone, Copy)]
pub struct PieceMoments(Moments);

fn finish(m: Moments, shift: f64, spread: Spread) -> Stats {
    if m.count == 0 {
        return Stats {
            mean: 0.0,
            std: 1.0,
            count: 0,
        };
    }
    let n = m.count as f64;
    let mut mean = shift + m.sum / n;
    let mut std = match spread {
        Spread::Std => (m.sumsq / n - (m.sum / n).powi(2)).max(0.0).sqrt(),
        Spread::Range if m.count > 1 => (m.max - m.min) / (2.0 * n.ln()).sqrt(),
        Spread::Range => 0.0,
    };
    if !mean.is_finite() || !std.is_finite() {
        // Only float64 data near f64::MAX can overflow the sums: fall back to the midrange and
        // half-range, which are always finite.
        mean = m.min * 0.5 + m.max * 0.5;
        std = m.max * 0.5 - m.min * 0.5;
    }
    if std.is_nan() || std <= 0.0 || !std.is_finite() {
        std = 1.0;
    }
    Stats {
        mean,
        std,
        count: m.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_matches_two_pass() {
        let x: Vec<f32> = (0..100_003)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 3.0)
            .collect();
        let s = mean_std(&x, Sampling::Exact, Spread::Std);
        let n = x.len() as f64;
        let mean: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((s.mean - mean).abs() < 1e-9);
        assert!((s.std - var.sqrt()).abs() < 1e-9);
        assert_eq!(s.count, x.len() as u64);
    }

    #[test]
    fn simd_matches_portable() {
        let mut x: Vec<f32> = (0..100_003)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 + 0.3)
            .collect();
        x[7] = f32::NAN;
        x[50_000] = f32::NEG_INFINITY;
        for shift in [0.0, 0.3, 1.0 / 3.0] {
            let a = Moments::of(&x, shift);
            let b = Moments::of_portable(&x, shift);
            assert_eq!(a.count, b.count);
            assert_eq!((a.min, a.max), (b.min, b.max));
            assert!((a.sum - b.sum).abs() <= 1e-9 * b.sumsq.sqrt());
            assert!((a.sumsq - b.sumsq).abs() <= 1e-12 * b.sumsq);
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_is_bit_identical_to_avx2() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("avx512f") && has!("avx512dq") && has!("avx512vl")) {
            return;
        }
        let mut x: Vec<f32> = (0..100_013)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.0137 - 2.9)
            .collect();
        for (j, v) in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            1e-40,
            3e38,
        ]
        .into_iter()
        .enumerate()
        {
            x[5 + 9 * j] = v;
            x[70_000 + j] = v;
        }
        for shift in [0.0, 0.3, -2.9, 1e30] {
            for len in [x.len(), 7, 8, 9, 64 * 1024] {
                let x = &x[..len];
                // SAFETY: the extensions were checked above.
                let (a, b) = unsafe {
                    (
                        Moments::of_f32_avx512(x, shift),
                        Moments::of_f32_avx2(x, shift),
                    )
                };
                assert_eq!(a.count, b.count);
                assert_eq!(a.sum.to_bits(), b.sum.to_bits(), "shift {shift} len {len}");
                assert_eq!(a.sumsq.to_bits(), b.sumsq.to_bits());
                assert_eq!(a.min.to_bits(), b.min.to_bits());
                assert_eq!(a.max.to_bits(), b.max.to_bits());
            }
        }
    }

    #[test]
    fn subnormal_and_huge_f32_spreads() {
        for scale in [1e-40f32, 1e37] {
            let x: Vec<f32> = (0..1000).map(|i| (i % 7) as f32 * scale).collect();
            let s = mean_std(&x, Sampling::Exact, Spread::Std);
            assert!(
                (s.std / (2.0 * scale as f64) - 1.0).abs() < 1e-3,
                "{scale}: {}",
                s.std
            );
        }
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let x = [1.0f32, f32::NAN, 3.0, f32::INFINITY, f32::NEG_INFINITY];
        let s = mean_std(&x, Sampling::Exact, Spread::Std);
        assert_eq!(s.mean, 2.0);
        assert_eq!(s.std, 1.0);
        assert_eq!(s.count, 2);
    }

    #[test]
    fn degenerate_inputs_give_unit_std() {
        for x in [vec![], vec![f32::NAN], vec![5.0f32; 10]] {
            let s = mean_std(&x, Sampling::Exact, Spread::Std);
            assert_eq!(s.std, 1.0);
            assert!(s.mean.is_finite());
        }
    }

    #[test]
    fn large_offset_is_stable() {
        // 1e6 + {0, 0.0625}: naive f32 or unshifted sums lose the spread entirely.
        let x: Vec<f32> = (0..1000).map(|i| 1e6 + (i % 2) as f32 * 0.0625).collect();
        let s = mean_std(&x, Sampling::Exact, Spread::Std);
        assert!((s.std - 0.03125).abs() < 1e-9, "{}", s.std);
    }

    #[test]
    fn sampled_is_close_and_reproducible() {
        let x: Vec<f32> = (0..1_000_000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let a = mean_std(&x, Sampling::Sampled { k: 4096, seed: 1 }, Spread::Std);
        let b = mean_std(&x, Sampling::Sampled { k: 4096, seed: 1 }, Spread::Std);
        let e = mean_std(&x, Sampling::Exact, Spread::Std);
        assert_eq!(a, b);
        assert!((a.mean - e.mean).abs() < 0.05 * e.std);
        assert!((a.std - e.std).abs() < 0.05 * e.std);
    }

    #[test]
    fn sampling_mostly_nan_falls_back_to_exact() {
        let mut x = vec![f32::NAN; 100_000];
        x[5] = 1.0;
        x[6] = 3.0;
        let s = mean_std(&x, Sampling::Sampled { k: 256, seed: 3 }, Spread::Std);
        assert_eq!((s.mean, s.std, s.count), (2.0, 1.0, 2));
    }

    #[test]
    fn range_std_of_uniform_spread() {
        let x: Vec<f64> = (0..1001).map(|i| i as f64).collect();
        let s = mean_std(&x, Sampling::Exact, Spread::Range);
        assert!((s.std - 1000.0 / (2.0 * 1001f64.ln()).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn f64_extremes_stay_finite() {
        let x = [f64::MAX, -f64::MAX, f64::MAX];
        let s = mean_std(&x, Sampling::Exact, Spread::Std);
        assert!(s.mean.is_finite() && s.std.is_finite() && s.std > 0.0);
    }

    #[test]
    fn piece_stats_equal_mean_std_in_blocks() {
        let mut x: Vec<f32> = crate::rng::normal_f32(300_000, 21)
            .iter()
            .map(|v| v * 3.0 + 1.0)
            .collect();
        x[0] = f32::NAN;
        x[1] = f32::INFINITY;
        for spread in [Spread::Std, Spread::Range] {
            let whole = mean_std(&x, Sampling::Exact, spread);
            let mut ps = PieceStats::new();
            for c in x.chunks(PieceStats::BLOCK) {
                ps.add(c);
            }
            assert_eq!(ps.finish(spread), whole);
        }
    }
}

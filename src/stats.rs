//! Reductions over tensors. One accumulator, [`Summary`] (gathered by [`summarize`], with
//! portable, AVX2 and AVX-512 kernels that give the same bits): counts, range and sums of a run
//! of values, with options for which values it takes in ([`Filter`]) and which sums it keeps
//! ([`Sums`]). Its users: the mean and spread below ([`mean_std`], [`PieceStats`]), the `int`
//! and `luq` codecs' group statistics, and the zero map's census (`crate::zmap`).

use crate::dtype::Element;
use crate::rng::SplitMix64;

/// Which values a [`Summary`] takes into its range and sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// The finite values; NaN and +-Inf are counted in `nonfinite`.
    Finite,
    /// Every value but NaN and zeros (+-Inf included): NaN is counted in `nan`, zeros in `zeros`
    /// and the first zero is kept (`first_zero`), so that [`Summary::range_with_zeros`] can
    /// give the extremes of every non-NaN value with the first of equal extremes winning.
    NonZero,
}

/// The sums a [`Summary`] gathers over the values it takes in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sums {
    /// None: only the counts and the range.
    None,
    /// `sum` and `sumsq` of `v - shift`, in eight f64 lanes: lane j adds the elements j mod 8 of
    /// the whole blocks of eight values in order (a value left out adds +0.0); the last
    /// `len % 8` values are added one by one after the lanes are reduced (the reduction order:
    /// [`summarize`]).
    Lanes { shift: f64 },
    /// `sumsq` and `sum_abs` of the values, each one running f64 sum in element order.
    Serial,
}

/// What [`summarize`] gathers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gather {
    pub filter: Filter,
    pub sums: Sums,
}

/// Counts, range and sums of a run of values (see [`Gather`] for which).
///
/// The range is kept in sixteen lanes (lane i mod 16 takes element i; within a lane the first
/// of equal values stays) reduced lowest lane first: among equal extremes (which differ only for
/// -0.0 and +0.0) the one in the lowest lane wins. Every kernel (portable, AVX2, AVX-512) gives
/// the same bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Values taken in.
    pub count: u64,
    /// NaN and +-Inf ([`Filter::Finite`] only).
    pub nonfinite: u64,
    /// NaN ([`Filter::NonZero`] only).
    pub nan: u64,
    /// Zeros ([`Filter::NonZero`] only).
    pub zeros: u64,
    /// The first zero (its sign), when `zeros > 0` ([`Filter::NonZero`] only).
    pub first_zero: f64,
    /// Smallest and largest value taken in (+Inf and -Inf when none).
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub sumsq: f64,
    pub sum_abs: f64,
}

impl Summary {
    pub const EMPTY: Summary = Summary {
        count: 0,
        nonfinite: 0,
        nan: 0,
        zeros: 0,
        first_zero: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        sum: 0.0,
        sumsq: 0.0,
        sum_abs: 0.0,
    };

    /// Combines with the summary of the values after these: on equal extremes these win, as
    /// `f64::min(self, o)` does.
    pub fn then(self, o: Summary) -> Summary {
        Summary {
            count: self.count + o.count,
            nonfinite: self.nonfinite + o.nonfinite,
            nan: self.nan + o.nan,
            zeros: self.zeros + o.zeros,
            first_zero: if self.zeros > 0 {
                self.first_zero
            } else {
                o.first_zero
            },
            min: if o.min < self.min { o.min } else { self.min },
            max: if o.max > self.max { o.max } else { self.max },
            sum: self.sum + o.sum,
            sumsq: self.sumsq + o.sumsq,
            sum_abs: self.sum_abs + o.sum_abs,
        }
    }

    /// Under [`Filter::NonZero`]: the smallest and largest non-NaN value, zeros included, the
    /// first zero standing for them all (so the first of equal extremes wins, as a sequential
    /// scan with strict comparisons: non-zero equal values have equal bits).
    pub fn range_with_zeros(&self) -> (f64, f64) {
        let (mut lo, mut hi) = (self.min, self.max);
        if self.zeros > 0 {
            if lo >= 0.0 {
                lo = self.first_zero;
            }
            if hi <= 0.0 {
                hi = self.first_zero;
            }
        }
        (lo, hi)
    }
}

/// Lanes of the range.
const RANGE_LANES: usize = 16;
/// Lanes of [`Sums::Lanes`].
const SUM_LANES: usize = 8;

/// The scalar state of [`summarize`]: the portable kernel, and the tail of the AVX2 one.
struct Lanes {
    lo: [f64; RANGE_LANES],
    hi: [f64; RANGE_LANES],
    s: [f64; SUM_LANES],
    q: [f64; SUM_LANES],
    nonfinite: u64,
    nan: u64,
    zeros: u64,
    first_zero: Option<f64>,
}

impl Lanes {
    const START: Lanes = Lanes {
        lo: [f64::INFINITY; RANGE_LANES],
        hi: [f64::NEG_INFINITY; RANGE_LANES],
        s: [0.0; SUM_LANES],
        q: [0.0; SUM_LANES],
        nonfinite: 0,
        nan: 0,
        zeros: 0,
        first_zero: None,
    };

    /// Whether `v` is taken in, counting it where it is not.
    #[inline(always)]
    fn take(&mut self, v: f64, filter: Filter) -> bool {
        match filter {
            Filter::Finite => {
                let ok = v.is_finite();
                self.nonfinite += !ok as u64;
                ok
            }
            Filter::NonZero => {
                let (nan, zero) = (v.is_nan(), v == 0.0);
                self.nan += nan as u64;
                self.zeros += zero as u64;
                if zero && self.first_zero.is_none() {
                    self.first_zero = Some(v);
                }
                !nan && !zero
            }
        }
    }

    /// Adds element `i` (value `v`); the sum lanes take it when `i < body8`.
    #[inline(always)]
    fn add(&mut self, i: usize, v: f64, g: &Gather, body8: usize) {
        let ok = self.take(v, g.filter);
        let j = i % RANGE_LANES;
        // `vminps`/`vmaxps` semantics: the new value wins only if strictly smaller / larger.
        let vl = if ok { v } else { f64::INFINITY };
        let vh = if ok { v } else { f64::NEG_INFINITY };
        self.lo[j] = if vl < self.lo[j] { vl } else { self.lo[j] };
        self.hi[j] = if vh > self.hi[j] { vh } else { self.hi[j] };
        if let Sums::Lanes { shift } = g.sums {
            if i < body8 {
                let d = if ok { v - shift } else { 0.0 };
                self.s[i % SUM_LANES] += d;
                self.q[i % SUM_LANES] += d * d;
            }
        }
    }

    /// The reduction of the range lanes, lowest lane first, and the summary of `x` (whose
    /// elements all went through [`Lanes::add`]).
    fn finish<T: Element>(self, x: &[T], g: &Gather, paired: bool) -> Summary {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for j in 0..RANGE_LANES {
            lo = if self.lo[j] < lo { self.lo[j] } else { lo };
            hi = if self.hi[j] > hi { self.hi[j] } else { hi };
        }
        let counts = Summary {
            nonfinite: self.nonfinite,
            nan: self.nan,
            zeros: self.zeros,
            first_zero: self.first_zero.unwrap_or(0.0),
            min: lo,
            max: hi,
            ..Summary::EMPTY
        };
        complete(counts, x, g, self.s, self.q, paired)
    }
}

/// The count and the sums of `x` added to a summary holding its counters and range; `s` and
/// `q` are the sum lanes over the whole blocks of eight.
///
/// Two reductions of the lanes exist, one per kernel family, so that each gives the bits it
/// always gave: the portable kernel adds the lanes one by one to 0.0, then the last values one
/// by one; the SIMD kernels add lane j and lane j + 4 (their two registers) and sum the four,
/// then add the sum of the last values (taken from 0.0).
#[inline(always)]
fn complete<T: Element>(
    mut m: Summary,
    x: &[T],
    g: &Gather,
    s: [f64; SUM_LANES],
    q: [f64; SUM_LANES],
    paired: bool,
) -> Summary {
    let n = x.len() as u64;
    m.count = match g.filter {
        Filter::Finite => n - m.nonfinite,
        Filter::NonZero => n - m.nan - m.zeros,
    };
    let taken = |v: f64| match g.filter {
        Filter::Finite => v.is_finite(),
        Filter::NonZero => !v.is_nan() && v != 0.0,
    };
    match g.sums {
        Sums::None => {}
        Sums::Lanes { shift } => {
            let rest = x[x.len() / SUM_LANES * SUM_LANES..]
                .iter()
                .map(|v| v.to_f64())
                .filter(|&v| taken(v));
            let (mut sum, mut sumsq) = (0.0, 0.0);
            if paired {
                let a: [f64; 4] = std::array::from_fn(|j| s[j] + s[j + 4]);
                let b: [f64; 4] = std::array::from_fn(|j| q[j] + q[j + 4]);
                let (mut rs, mut rq) = (0.0, 0.0);
                for v in rest {
                    let d = v - shift;
                    rs += d;
                    rq += d * d;
                }
                sum = a.iter().sum::<f64>() + rs;
                sumsq = b.iter().sum::<f64>() + rq;
            } else {
                for j in 0..SUM_LANES {
                    sum += s[j];
                    sumsq += q[j];
                }
                for v in rest {
                    let d = v - shift;
                    sum += d;
                    sumsq += d * d;
                }
            }
            m.sum = sum;
            m.sumsq = sumsq;
        }
        Sums::Serial => {
            for v in x.iter().map(|v| v.to_f64()).filter(|&v| taken(v)) {
                m.sumsq += v * v;
                m.sum_abs += v.abs();
            }
        }
    }
    m
}

/// The portable kernel of [`summarize`], for every element type.
pub(crate) fn summarize_portable<T: Element>(x: &[T], g: Gather) -> Summary {
    let mut l = Lanes::START;
    let body8 = x.len() / SUM_LANES * SUM_LANES;
    for (i, v) in x.iter().enumerate() {
        l.add(i, v.to_f64(), &g, body8);
    }
    l.finish(x, &g, false)
}

/// Counts, range and sums of `x` (see [`Gather`] and [`Summary`]). float32 takes an AVX-512 or
/// AVX2 kernel where the CPU has one, float16 and bfloat16 too (widened to f32 exactly, where
/// the CPU has AVX2); the others take the portable kernel. The counts and the range are the
/// same bits on every kernel; so are the sums under [`Sums::Serial`]; under [`Sums::Lanes`] the
/// lanes are the same and only their reduction differs between the portable and the SIMD
/// kernels (see `complete`).
pub fn summarize<T: Element>(x: &[T], g: Gather) -> Summary {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx2() {
            if let Some(wide) = widen_half(x) {
                return summarize(&wide, g);
            }
        }
        if let Some(f) = as_f32(x) {
            if crate::simd::avx512() {
                // SAFETY: AVX-512 F, BW, DQ and VL are present (checked just above).
                return unsafe { simd::summarize_avx512(f, g) };
            }
            if crate::simd::avx2() {
                // SAFETY: AVX2 and FMA are present (checked just above).
                return unsafe { simd::summarize_avx2(f, g) };
            }
        }
    }
    summarize_portable(x, g)
}

/// `x` as float32 when that is its element type.
#[cfg(target_arch = "x86_64")]
fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    as_type::<T, f32>(x)
}

/// `x` as a slice of `U` when `U` is its element type.
#[cfg(target_arch = "x86_64")]
fn as_type<T: 'static, U: 'static>(x: &[T]) -> Option<&[U]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>())
        // SAFETY: T is U (same type, same layout).
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<U>(), x.len()) })
}

/// The SIMD kernels of [`summarize`] for float32.
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use super::{complete, Filter, Gather, Lanes, Summary, Sums, RANGE_LANES, SUM_LANES};
    use std::arch::x86_64::*;

    /// [`super::summarize_portable`] in AVX2: the sixteen range lanes in two registers, the
    /// eight sum lanes in four (two for `sum`, two for `sumsq`); the tail goes through
    /// [`Lanes::add`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn summarize_avx2(x: &[f32], g: Gather) -> Summary {
        let n = x.len();
        let body = n / RANGE_LANES * RANGE_LANES;
        let body8 = n / SUM_LANES * SUM_LANES;
        let (lanes_sums, shift) = match g.sums {
            Sums::Lanes { shift } => (true, shift),
            _ => (false, 0.0),
        };
        let mut l = Lanes::START;
        let absm = _mm256_set1_epi32(0x7fff_ffff);
        let maxf = _mm256_set1_epi32(0x7f7f_ffff);
        let pinf = _mm256_set1_ps(f32::INFINITY);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let zero = _mm256_setzero_ps();
        let sh = _mm256_set1_pd(shift);
        let (mut lo0, mut lo1) = (pinf, pinf);
        let (mut hi0, mut hi1) = (ninf, ninf);
        let (mut s0, mut s1, mut q0, mut q1) = (
            _mm256_setzero_pd(),
            _mm256_setzero_pd(),
            _mm256_setzero_pd(),
            _mm256_setzero_pd(),
        );
        // Lanes left out (all ones) of the eight at `v`, counting them.
        let out = |v: __m256, base: usize, l: &mut Lanes| -> __m256 {
            match g.filter {
                Filter::Finite => {
                    let a = _mm256_and_si256(_mm256_castps_si256(v), absm);
                    let bad = _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, maxf));
                    l.nonfinite += _mm256_movemask_ps(bad).count_ones() as u64;
                    bad
                }
                Filter::NonZero => {
                    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
                    let z = _mm256_cmp_ps::<_CMP_EQ_OQ>(v, zero);
                    let zm = _mm256_movemask_ps(z) as u32;
                    l.nan += _mm256_movemask_ps(nan).count_ones() as u64;
                    l.zeros += zm.count_ones() as u64;
                    if zm != 0 && l.first_zero.is_none() {
                        // SAFETY: the lane is one of the eight values at `base`.
                        let z0 = unsafe { *x.get_unchecked(base + zm.trailing_zeros() as usize) };
                        l.first_zero = Some(z0 as f64);
                    }
                    _mm256_or_ps(nan, z)
                }
            }
        };
        let p = x.as_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 16 <= body <= x.len().
            let (v0, v1) = unsafe { (_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(p.add(i + 8))) };
            let n0 = out(v0, i, &mut l);
            let n1 = out(v1, i + 8, &mut l);
            // min_ps(a, b) = a < b ? a : b, as in Lanes::add.
            lo0 = _mm256_min_ps(_mm256_blendv_ps(v0, pinf, n0), lo0);
            lo1 = _mm256_min_ps(_mm256_blendv_ps(v1, pinf, n1), lo1);
            hi0 = _mm256_max_ps(_mm256_blendv_ps(v0, ninf, n0), hi0);
            hi1 = _mm256_max_ps(_mm256_blendv_ps(v1, ninf, n1), hi1);
            if lanes_sums {
                for (v, nb) in [(v0, n0), (v1, n1)] {
                    let nb = _mm256_castps_si256(nb);
                    let keep0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(nb));
                    let keep1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(nb));
                    let d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), sh);
                    let d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)), sh);
                    // Lanes left out add +0.0.
                    let d0 = _mm256_andnot_pd(_mm256_castsi256_pd(keep0), d0);
                    let d1 = _mm256_andnot_pd(_mm256_castsi256_pd(keep1), d1);
                    s0 = _mm256_add_pd(s0, d0);
                    s1 = _mm256_add_pd(s1, d1);
                    q0 = _mm256_add_pd(q0, _mm256_mul_pd(d0, d0));
                    q1 = _mm256_add_pd(q1, _mm256_mul_pd(d1, d1));
                }
            }
            i += RANGE_LANES;
        }
        let (mut lo, mut hi) = ([0f32; RANGE_LANES], [0f32; RANGE_LANES]);
        let (mut s, mut q) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
        // SAFETY: each array holds the lanes stored into it.
        unsafe {
            _mm256_storeu_ps(lo.as_mut_ptr(), lo0);
            _mm256_storeu_ps(lo.as_mut_ptr().add(8), lo1);
            _mm256_storeu_ps(hi.as_mut_ptr(), hi0);
            _mm256_storeu_ps(hi.as_mut_ptr().add(8), hi1);
            _mm256_storeu_pd(s.as_mut_ptr(), s0);
            _mm256_storeu_pd(s.as_mut_ptr().add(4), s1);
            _mm256_storeu_pd(q.as_mut_ptr(), q0);
            _mm256_storeu_pd(q.as_mut_ptr().add(4), q1);
        }
        l.lo = lo.map(|v| v as f64);
        l.hi = hi.map(|v| v as f64);
        l.s = s;
        l.q = q;
        for (i, &v) in x.iter().enumerate().skip(body) {
            l.add(i, v as f64, &g, body8);
        }
        l.finish(x, &g, true)
    }

    /// An element type that [`moments_avx512`] reads as float32, sixteen lanes at a time:
    /// float32 itself, and float16 and bfloat16 widened exactly as they are loaded (no widened
    /// copy of the tensor, and the same sums as over one).
    pub trait Lanes16: Copy {
        /// Sixteen values from `p`, as float32.
        ///
        /// # Safety
        /// The CPU has AVX-512 F, BW, DQ and VL; `p` points to sixteen readable values.
        unsafe fn load16(p: *const Self) -> __m512;
        /// One value as float32.
        fn widen(self) -> f32;
    }

    impl Lanes16 for f32 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: sixteen readable values (the caller's contract).
            unsafe { _mm512_loadu_ps(p) }
        }
        fn widen(self) -> f32 {
            self
        }
    }

    impl Lanes16 for half::bf16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        unsafe fn load16(p: *const half::bf16) -> __m512 {
            // SAFETY: sixteen readable 16-bit values (the caller's contract).
            let h = unsafe { _mm256_loadu_si256(p.cast()) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    impl Lanes16 for half::f16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            // SAFETY: sixteen readable 16-bit values (the caller's contract).
            _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) })
        }
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// Lanes holding NaN or +-Inf.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn nonfinite16(v: __m512) -> __mmask16 {
        let a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff));
        _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7f7f_ffff))
    }

    /// The lanes' reduction of the lo lanes in one register: the smallest value, the lowest
    /// lane among equal ones. Pairs of adjacent lane ranges are merged with `min(upper, lower)`,
    /// which keeps the lower range's value on ties, so the lowest lane wins exactly as in the
    /// sequential scan of [`Lanes::finish`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn first_min16(v: __m512) -> f32 {
        let v = _mm512_min_ps(_mm512_permute_ps::<0xb1>(v), v);
        let v = _mm512_min_ps(_mm512_permute_ps::<0x4e>(v), v);
        let v = _mm512_min_ps(_mm512_shuffle_f32x4::<0xb1>(v, v), v);
        let v = _mm512_min_ps(_mm512_shuffle_f32x4::<0x4e>(v, v), v);
        _mm512_cvtss_f32(v)
    }

    /// [`first_min16`] for the hi lanes: the largest value, the lowest lane among equal ones.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn first_max16(v: __m512) -> f32 {
        let v = _mm512_max_ps(_mm512_permute_ps::<0xb1>(v), v);
        let v = _mm512_max_ps(_mm512_permute_ps::<0x4e>(v), v);
        let v = _mm512_max_ps(_mm512_shuffle_f32x4::<0xb1>(v, v), v);
        let v = _mm512_max_ps(_mm512_shuffle_f32x4::<0x4e>(v, v), v);
        _mm512_cvtss_f32(v)
    }

    /// Count, range, `sum` and `sumsq` of the finite values of `x` around `shift` (see
    /// `super::moments`). Blocks of 1024 values take a fast path: `v - shift` summed and
    /// squared in f32 over four pairs of registers (sixteen terms per lane), then added to f64
    /// accumulators, so that a value's error is that of a 16-term f32 sum (about 1e-6
    /// relative) and no add waits on the one before it. A block whose f32 sums come out
    /// non-finite held a NaN, an infinity or a square beyond f32: it is summed again value by
    /// value in f64 with the non-finite values left out, as is the tail. The order of the sums
    /// is fixed by `x.len()` alone (never by threads).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, DQ and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub unsafe fn moments_avx512<T: Lanes16>(x: &[T], shift: f64) -> Summary {
        let full = x.len() / MomentsAcc::BLOCK * MomentsAcc::BLOCK;
        let p = x.as_ptr();
        let mut m = MomentsAcc::new(shift);
        let mut i = 0;
        while i < full {
            for j in (i..i + MomentsAcc::BLOCK).step_by(64) {
                // SAFETY: j + 64 <= i + BLOCK <= full <= n.
                let v = [0, 1, 2, 3].map(|r| unsafe { T::load16(p.add(j + 16 * r)) });
                m.add64(v);
            }
            m.end_block(&x[i..i + MomentsAcc::BLOCK]);
            i += MomentsAcc::BLOCK;
        }
        m.finish(&x[full..], x.len())
    }

    /// The state of [`moments_avx512`] between blocks of [`MomentsAcc::BLOCK`] values, for a
    /// kernel that reads the values anyway (SmaQ's encoder gathers a chunk's moments as it
    /// codes it): [`MomentsAcc::add64`] on each 64 values of a block, in order, then
    /// [`MomentsAcc::end_block`]; [`MomentsAcc::finish`] with the values after the last whole
    /// block. The sums are the very bits of [`moments_avx512`]'s over the same values.
    pub struct MomentsAcc {
        sh32: f32,
        delta: f64,
        sh: __m512,
        lo: __m512,
        hi: __m512,
        s64: __m512d,
        q64: __m512d,
        nonfinite: u64,
        // The current block's f32 sums and range.
        s: [__m512; 4],
        q: [__m512; 4],
        bl: __m512,
        bh: __m512,
    }

    impl MomentsAcc {
        /// Values per block.
        pub const BLOCK: usize = 1024;

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        pub fn new(shift: f64) -> Self {
            // The f32 path sums around the nearest f32 to `shift`; the f64 sums are moved to
            // `shift` at the end.
            let sh32 = shift as f32;
            let (pinf, ninf) = (
                _mm512_set1_ps(f32::INFINITY),
                _mm512_set1_ps(f32::NEG_INFINITY),
            );
            MomentsAcc {
                sh32,
                delta: sh32 as f64 - shift,
                sh: _mm512_set1_ps(sh32),
                lo: pinf,
                hi: ninf,
                s64: _mm512_setzero_pd(),
                q64: _mm512_setzero_pd(),
                nonfinite: 0,
                s: [_mm512_setzero_ps(); 4],
                q: [_mm512_setzero_ps(); 4],
                bl: pinf,
                bh: ninf,
            }
        }

        /// The next 64 values of the current block, as four registers in order.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        pub fn add64(&mut self, v: [__m512; 4]) {
            for (r, v) in v.into_iter().enumerate() {
                let d = _mm512_sub_ps(v, self.sh);
                self.s[r] = _mm512_add_ps(self.s[r], d);
                self.q[r] = _mm512_fmadd_ps(d, d, self.q[r]);
                // A NaN in `v` leaves the range alone (vminps returns its second operand).
                self.bl = _mm512_min_ps(v, self.bl);
                self.bh = _mm512_max_ps(v, self.bh);
            }
        }

        /// Closes the current block, whose values are `block` (read again only when its f32
        /// sums came out non-finite: a NaN or infinity in it, or a square beyond f32).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        pub fn end_block<T: Lanes16>(&mut self, block: &[T]) {
            let [s0, s1, s2, s3] = self.s;
            let [q0, q1, q2, q3] = self.q;
            let bs = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
            let bq = _mm512_add_ps(_mm512_add_ps(q0, q1), _mm512_add_ps(q2, q3));
            if nonfinite16(bs) | nonfinite16(bq) != 0 {
                self.careful(block);
            } else {
                let widen = |v: __m512| {
                    _mm512_add_pd(
                        _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v)),
                    )
                };
                self.s64 = _mm512_add_pd(self.s64, widen(bs));
                self.q64 = _mm512_add_pd(self.q64, widen(bq));
                self.lo = _mm512_min_ps(self.bl, self.lo);
                self.hi = _mm512_max_ps(self.bh, self.hi);
            }
            self.s = [_mm512_setzero_ps(); 4];
            self.q = [_mm512_setzero_ps(); 4];
            self.bl = _mm512_set1_ps(f32::INFINITY);
            self.bh = _mm512_set1_ps(f32::NEG_INFINITY);
        }

        /// Values one by one in f64 (around sh32), the non-finite ones counted.
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        fn careful<T: Lanes16>(&mut self, x: &[T]) {
            let (mut s, mut q) = (0f64, 0f64);
            let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
            for &v in x {
                let v = v.widen();
                if v.is_finite() {
                    let d = v as f64 - self.sh32 as f64;
                    s += d;
                    q += d * d;
                    l = l.min(v);
                    h = h.max(v);
                } else {
                    self.nonfinite += 1;
                }
            }
            let z = _mm512_setzero_pd();
            self.s64 = _mm512_add_pd(self.s64, _mm512_mask_mov_pd(z, 1, _mm512_set1_pd(s)));
            self.q64 = _mm512_add_pd(self.q64, _mm512_mask_mov_pd(z, 1, _mm512_set1_pd(q)));
            self.lo = _mm512_min_ps(_mm512_set1_ps(l), self.lo);
            self.hi = _mm512_max_ps(_mm512_set1_ps(h), self.hi);
        }

        /// The summary of `n` values: the blocks closed so far and `rest`, the values after
        /// them.
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        pub fn finish<T: Lanes16>(mut self, rest: &[T], n: usize) -> Summary {
            if !rest.is_empty() {
                self.careful(rest);
            }
            let count = n as u64 - self.nonfinite;
            // Around `shift`: sum (d + delta) and sum (d + delta)^2 over the d around sh32.
            let (s, q) = (
                _mm512_reduce_add_pd(self.s64),
                _mm512_reduce_add_pd(self.q64),
            );
            let (c, delta) = (count as f64, self.delta);
            Summary {
                count,
                nonfinite: self.nonfinite,
                min: first_min16(self.lo) as f64,
                max: first_max16(self.hi) as f64,
                sum: s + c * delta,
                sumsq: q + 2.0 * delta * s + c * delta * delta,
                ..Summary::EMPTY
            }
        }
    }

    /// [`super::summarize_portable`] in AVX-512: the sixteen range lanes are one register (the
    /// tail a masked load), reduced in registers; the eight sum lanes are one register per sum.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, DQ and VL.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub unsafe fn summarize_avx512(x: &[f32], g: Gather) -> Summary {
        // One compiled body per filter, with or without the sum lanes (small enough to inline
        // into a caller's loop over short groups).
        match (g.filter, g.sums) {
            (Filter::Finite, Sums::Lanes { .. }) => avx512_body::<false, true>(x, g),
            (Filter::Finite, _) => avx512_body::<false, false>(x, g),
            (Filter::NonZero, Sums::Lanes { .. }) => avx512_body::<true, true>(x, g),
            (Filter::NonZero, _) => avx512_body::<true, false>(x, g),
        }
    }

    /// The smallest and largest finite values of `x` (+Inf and -Inf when there is none) and
    /// whether any value was NaN or +-Inf: the lanes and operations of [`avx512_body`]'s
    /// general loop with every accumulator in a register. No target feature of its own and
    /// always inlined, so that it compiles into its callers: the int codec calls it once per
    /// group of a few dozen values.
    ///
    /// # Safety
    /// Only from functions that enable AVX-512 F, BW, DQ and VL.
    #[inline(always)]
    pub(crate) unsafe fn finite_lohi(x: &[f32]) -> (f32, f32, bool) {
        let n = x.len();
        let p = x.as_ptr();
        let full = n / 16 * 16;
        let pinf = _mm512_set1_ps(f32::INFINITY);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let (mut lo, mut hi) = (pinf, ninf);
        let mut bad: __mmask16 = 0;
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= n.
            let v = unsafe { _mm512_loadu_ps(p.add(i)) };
            let nf = nonfinite16(v);
            lo = _mm512_min_ps(_mm512_mask_mov_ps(v, nf, pinf), lo);
            hi = _mm512_max_ps(_mm512_mask_mov_ps(v, nf, ninf), hi);
            bad |= nf;
            i += 16;
        }
        if i < n {
            let k = ((1u32 << (n - i)) - 1) as __mmask16;
            // SAFETY: the lanes of `k` are the elements i..n.
            let v = unsafe { _mm512_maskz_loadu_ps(k, p.add(i)) };
            let nf = nonfinite16(v) & k;
            let take = k & !nf;
            lo = _mm512_min_ps(_mm512_mask_mov_ps(pinf, take, v), lo);
            hi = _mm512_max_ps(_mm512_mask_mov_ps(ninf, take, v), hi);
            bad |= nf;
        }
        (first_min16(lo), first_max16(hi), bad != 0)
    }

    /// [`finite_lohi`] as a [`Summary`] of the finite values (range, counts).
    ///
    /// # Safety
    /// Only from functions that enable AVX-512 F, BW, DQ and VL.
    #[inline(always)]
    unsafe fn finite_range(x: &[f32]) -> Summary {
        // SAFETY: the caller enables the features.
        let (lo, hi, bad) = unsafe { finite_lohi(x) };
        let nonfinite = if bad {
            x.iter().filter(|v| !v.is_finite()).count() as u64
        } else {
            0
        };
        Summary {
            count: x.len() as u64 - nonfinite,
            nonfinite,
            min: lo as f64,
            max: hi as f64,
            ..Summary::EMPTY
        }
    }

    /// [`summarize_avx512`] for one filter (`NONZERO`: [`Filter::NonZero`]) and with
    /// (`LANES`) or without the sum lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn avx512_body<const NONZERO: bool, const LANES: bool>(x: &[f32], g: Gather) -> Summary {
        let n = x.len();
        let body8 = n / SUM_LANES * SUM_LANES;
        let shift = match g.sums {
            Sums::Lanes { shift } => shift,
            _ => 0.0,
        };
        let pinf = _mm512_set1_ps(f32::INFINITY);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let sh = _mm512_set1_pd(shift);
        let (mut lo, mut hi) = (pinf, ninf);
        let (mut s, mut q) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let (mut nonfinite, mut nan, mut zeros) = (0u64, 0u64, 0u64);
        let mut first_zero = None;
        let p = x.as_ptr();
        let full = n / 16 * 16;
        if !NONZERO && !LANES {
            // SAFETY: this function enables AVX-512 F, BW, DQ and VL.
            let counts = unsafe { finite_range(x) };
            // Without sums nothing is left to `complete`.
            if matches!(g.sums, Sums::None) {
                return counts;
            }
            return complete(counts, x, &g, [0.0; SUM_LANES], [0.0; SUM_LANES], true);
        }
        // One block of sixteen lanes at `i`, `k` the lanes inside `x`.
        let mut step = |i: usize, k: __mmask16, v: __m512| {
            let take = if !NONZERO {
                let bad = nonfinite16(v) & k;
                nonfinite += bad.count_ones() as u64;
                k & !bad
            } else {
                let nm = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) & k;
                let zm = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, _mm512_setzero_ps()) & k;
                nan += nm.count_ones() as u64;
                zeros += zm.count_ones() as u64;
                if zm != 0 && first_zero.is_none() {
                    first_zero = Some(x[i + zm.trailing_zeros() as usize] as f64);
                }
                k & !(nm | zm)
            };
            // min_ps(a, b) = a < b ? a : b, as in Lanes::add.
            lo = _mm512_min_ps(_mm512_mask_mov_ps(pinf, take, v), lo);
            hi = _mm512_max_ps(_mm512_mask_mov_ps(ninf, take, v), hi);
            if LANES {
                let halves = [_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v)];
                for (h, v8) in halves.into_iter().enumerate() {
                    if i + 8 * h + 8 <= body8 {
                        // Lanes left out add +0.0.
                        let ok = (take >> (8 * h)) as u8;
                        let d = _mm512_maskz_sub_pd(ok, _mm512_cvtps_pd(v8), sh);
                        s = _mm512_add_pd(s, d);
                        q = _mm512_add_pd(q, _mm512_mul_pd(d, d));
                    }
                }
            }
        };
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 <= full <= n.
            step(i, u16::MAX, unsafe { _mm512_loadu_ps(p.add(i)) });
            i += 16;
        }
        if i < n {
            let k = ((1u32 << (n - i)) - 1) as __mmask16;
            // SAFETY: the lanes of `k` are the elements i..n.
            step(i, k, unsafe { _mm512_maskz_loadu_ps(k, p.add(i)) });
        }
        let (mut sl, mut ql) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
        // SAFETY: both arrays hold eight f64.
        unsafe {
            _mm512_storeu_pd(sl.as_mut_ptr(), s);
            _mm512_storeu_pd(ql.as_mut_ptr(), q);
        }
        let counts = Summary {
            nonfinite,
            nan,
            zeros,
            first_zero: first_zero.unwrap_or(0.0),
            min: first_min16(lo) as f64,
            max: first_max16(hi) as f64,
            ..Summary::EMPTY
        };
        complete(counts, x, &g, sl, ql, true)
    }
}

/// The moments [`mean_std`] needs: count, range, `sum` and `sumsq` of the finite values around
/// `shift`. float32 (and float16 / bfloat16, widened) takes an AVX-512 kernel where the CPU has
/// one: these statistics are a full pass before any SmaQ code is written, and the kernel keeps
/// eight f64 accumulators in flight instead of the one chain per sum that [`Sums::Lanes`]'s
/// fixed lane order allows, summing in f32 within blocks (4x fewer cycles per value: 0.08
/// against 0.32 ns on this project's Xeon, measured on 64K values in cache). Its sums agree
/// with an f64 scan to about 1e-7 relative, not bit for bit with [`summarize`]'s; every
/// statistic of SmaQ (whole tensor, pieces, log domain) is computed here, so they agree with
/// each other.
fn moments<T: Element>(x: &[T], shift: f64) -> Summary {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx512() {
            if let Some(f) = as_f32(x) {
                // SAFETY: AVX-512 F, BW, DQ and VL are present (checked just above).
                return unsafe { simd::moments_avx512(f, shift) };
            }
            if let Some(h) = as_type::<T, half::bf16>(x) {
                // SAFETY: as above.
                return unsafe { simd::moments_avx512(h, shift) };
            }
            if let Some(h) = as_type::<T, half::f16>(x) {
                // SAFETY: as above.
                return unsafe { simd::moments_avx512(h, shift) };
            }
        }
    }
    summarize(
        x,
        Gather {
            filter: Filter::Finite,
            sums: Sums::Lanes { shift },
        },
    )
}

/// `x` widened to f32 when it is float16 or bfloat16 (every value exactly; SIMD conversion).
#[cfg(target_arch = "x86_64")]
fn widen_half<T: Element>(x: &[T]) -> Option<Vec<f32>> {
    use crate::simd::Widen;
    use std::any::TypeId;
    let mut out = vec![0f32; x.len()];
    if TypeId::of::<T>() == TypeId::of::<half::f16>() {
        // SAFETY: T is f16 (same type, same layout).
        let h = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<half::f16>(), x.len()) };
        half::f16::widen(h, &mut out);
    } else if TypeId::of::<T>() == TypeId::of::<half::bf16>() {
        // SAFETY: T is bf16 (same type, same layout).
        let h = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<half::bf16>(), x.len()) };
        half::bf16::widen(h, &mut out);
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
        let blocks = crate::pool::map_chunks(x, 1 << 16, |_, c| moments(c, shift));
        blocks.into_iter().fold(Summary::EMPTY, Summary::then)
    };
    let m = match sampling {
        Sampling::Sampled { k, seed } if (k as usize) < x.len() => {
            let mut rng = SplitMix64::new(seed);
            let picks: Vec<T> = (0..k)
                .map(|_| x[rng.below(x.len() as u64) as usize])
                .collect();
            let m = moments(&picks, shift);
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
    m: Summary,
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
            m: Summary::EMPTY,
        }
    }

    /// Statistics summed around a `shift` known in advance; pieces may then be summed with
    /// [`PieceStats::moments`] in parallel from the start.
    pub fn with_shift(shift: f64) -> Self {
        PieceStats {
            shift: Some(shift),
            m: Summary::EMPTY,
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
        let m = moments(x, self.shift.unwrap_or(0.0));
        self.merge(PieceMoments(m));
    }

    /// The moments of one piece around `shift`, to be merged in tensor order.
    pub fn moments<T: Element>(x: &[T], shift: f64) -> PieceMoments {
        PieceMoments(moments(x, shift))
    }

    /// Merges the moments of the next piece (in tensor order), computed around [`Self::shift`].
    pub fn merge(&mut self, m: PieceMoments) {
        self.m = self.m.then(m.0);
    }

    pub fn finish(&self, spread: Spread) -> Stats {
        finish(self.m, self.shift.unwrap_or(0.0), spread)
    }
}

/// The moments of one piece (see [`PieceStats::moments`]).
#[derive(Debug, Clone, Copy)]
pub struct PieceMoments(Summary);

impl PieceMoments {
    /// What [`moments_avx512`](simd::moments_avx512) (through [`simd::MomentsAcc`]) returned.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn from_summary(s: Summary) -> Self {
        PieceMoments(s)
    }
}

fn finish(m: Summary, shift: f64, spread: Spread) -> Stats {
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
pub(crate) mod tests {
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
        // float32 data is summed in f32 in short runs (`moments`): exact to about 1e-7.
        let std = var.sqrt();
        assert!((s.mean - mean).abs() < 1e-6 * std, "{} {mean}", s.mean);
        assert!((s.std - std).abs() < 1e-6 * std, "{} {std}", s.std);
        assert_eq!(s.count, x.len() as u64);
        // The same values in f64 take the f64 sums: exact to rounding.
        let w: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let s = mean_std(&w, Sampling::Exact, Spread::Std);
        assert!((s.mean - mean).abs() < 1e-12 * std);
        assert!((s.std - std).abs() < 1e-12 * std);
    }

    /// The moments' kernel against a plain f64 scan: the same counts and range, sums equal to
    /// rounding, on every length around its 32-value steps and with every kind of special.
    #[test]
    fn moments_match_a_serial_scan() {
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 1000, 65_537] {
            let mut x = specials(n, n as u64 + 5);
            // Keep the sums away from f32::MAX: the check is of the kernel, not of overflow.
            for v in &mut x {
                if v.is_finite() && v.abs() > 1e30 {
                    *v = 3.5;
                }
            }
            let shift = 0.25;
            let m = moments(&x, shift);
            let fin: Vec<f64> = x
                .iter()
                .filter(|v| v.is_finite())
                .map(|&v| v as f64)
                .collect();
            assert_eq!(m.count, fin.len() as u64, "n = {n}");
            let (sum, sumsq) = fin.iter().fold((0.0, 0.0), |(s, q), &v| {
                (s + (v - shift), q + (v - shift) * (v - shift))
            });
            let scale = fin
                .iter()
                .map(|v| (v - shift).powi(2))
                .sum::<f64>()
                .max(1.0);
            assert!(
                (m.sum - sum).abs() <= 1e-12 * scale.sqrt() * n as f64,
                "n = {n}"
            );
            assert!((m.sumsq - sumsq).abs() <= 1e-12 * scale, "n = {n}");
            let lo = fin.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = fin.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!((m.min, m.max), (lo, hi), "n = {n}");
        }
    }

    /// float16 and bfloat16 moments, read by the kernel through its widening loads, are the
    /// very bits of the moments of the same values widened to float32 beforehand: blocks with
    /// and without specials, tails of every length.
    #[test]
    fn half_moments_are_those_of_the_widened_values() {
        for n in [0usize, 1, 17, 1023, 1024, 1025, 3000, 65_537] {
            for plain in [false, true] {
                let mut x = specials(n, n as u64 + 11);
                if plain {
                    // Finite blocks: the kernel's fast path.
                    x.iter_mut()
                        .filter(|v| !v.is_finite() || v.abs() > 1e4)
                        .for_each(|v| *v = 0.75);
                }
                half_against_widened(&x, n);
            }
        }
    }

    /// One case of the test above, both half types.
    fn half_against_widened(x: &[f32], n: usize) {
        let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        let wb: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        let wh: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        for (m, w) in [
            (moments(&b, 0.5), moments(&wb, 0.5)),
            (moments(&h, 0.5), moments(&wh, 0.5)),
        ] {
            assert_eq!(m.count, w.count, "n = {n}");
            assert_eq!(m.nonfinite, w.nonfinite, "n = {n}");
            for (a, c) in [
                (m.min, w.min),
                (m.max, w.max),
                (m.sum, w.sum),
                (m.sumsq, w.sumsq),
            ] {
                assert_eq!(a.to_bits(), c.to_bits(), "n = {n}: {a} against {c}");
            }
        }
    }

    /// Random values with every kind of special: NaN, +-Inf, +-0, subnormals, huge values, in
    /// runs of plain values, of zeros of both signs and of specials.
    pub(crate) fn specials(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        let pool = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-42,
            -1e-42,
            1e-39,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
        ];
        (0..n)
            .map(|i| {
                let u = r.next_u64();
                match ((i / 97) % 3, u % 8) {
                    (0, _) => ((u >> 20) as f32 / (1u64 << 44) as f32 - 0.5) * 7.0,
                    (1, k) if k < 5 => [0.0f32, -0.0][(u >> 9) as usize % 2],
                    _ => pool[(u >> 9) as usize % pool.len()],
                }
            })
            .collect()
    }

    /// A plain restatement of the rules of [`Summary`], [`Gather`] and `complete`, one lane at
    /// a time; `paired`: the SIMD kernels' reduction of the sum lanes.
    fn reference(x: &[f32], g: Gather, paired: bool) -> Summary {
        let taken = |v: f32| match g.filter {
            Filter::Finite => v.is_finite(),
            Filter::NonZero => !v.is_nan() && v != 0.0,
        };
        let n = x.len() as u64;
        let mut m = Summary::EMPTY;
        for lane in 0..16 {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for v in x.iter().skip(lane).step_by(16).filter(|v| taken(**v)) {
                let v = *v as f64;
                if v < lo {
                    lo = v;
                }
                if v > hi {
                    hi = v;
                }
            }
            if lo < m.min {
                m.min = lo;
            }
            if hi > m.max {
                m.max = hi;
            }
        }
        match g.filter {
            Filter::Finite => {
                m.nonfinite = x.iter().filter(|v| !v.is_finite()).count() as u64;
                m.count = n - m.nonfinite;
            }
            Filter::NonZero => {
                m.nan = x.iter().filter(|v| v.is_nan()).count() as u64;
                m.zeros = x.iter().filter(|v| **v == 0.0).count() as u64;
                m.first_zero = x.iter().find(|v| **v == 0.0).map_or(0.0, |&v| v as f64);
                m.count = n - m.nan - m.zeros;
            }
        }
        match g.sums {
            Sums::None => {}
            Sums::Lanes { shift } => {
                let body = x.len() / 8 * 8;
                let d = |v: f32| if taken(v) { v as f64 - shift } else { 0.0 };
                let lane = |j: usize| {
                    let (mut s, mut q) = (0.0, 0.0);
                    for &v in x[..body].iter().skip(j).step_by(8) {
                        s += d(v);
                        q += d(v) * d(v);
                    }
                    (s, q)
                };
                let rest: Vec<f64> = x[body..]
                    .iter()
                    .filter(|v| taken(**v))
                    .map(|&v| d(v))
                    .collect();
                if paired {
                    let pair = |j: usize| (lane(j).0 + lane(j + 4).0, lane(j).1 + lane(j + 4).1);
                    let (mut s, mut q) = pair(0);
                    for j in 1..4 {
                        s += pair(j).0;
                        q += pair(j).1;
                    }
                    let (mut rs, mut rq) = (0.0, 0.0);
                    for &e in &rest {
                        rs += e;
                        rq += e * e;
                    }
                    (m.sum, m.sumsq) = (s + rs, q + rq);
                } else {
                    for j in 0..8 {
                        m.sum += lane(j).0;
                        m.sumsq += lane(j).1;
                    }
                    for &e in &rest {
                        m.sum += e;
                        m.sumsq += e * e;
                    }
                }
            }
            Sums::Serial => {
                for v in x.iter().filter(|v| taken(**v)).map(|&v| v as f64) {
                    m.sumsq += v * v;
                    m.sum_abs += v.abs();
                }
            }
        }
        m
    }

    fn bits(m: &Summary) -> [u64; 10] {
        [
            m.count,
            m.nonfinite,
            m.nan,
            m.zeros,
            m.first_zero.to_bits(),
            m.min.to_bits(),
            m.max.to_bits(),
            m.sum.to_bits(),
            m.sumsq.to_bits(),
            m.sum_abs.to_bits(),
        ]
    }

    fn gathers() -> Vec<Gather> {
        let mut v = Vec::new();
        for filter in [Filter::Finite, Filter::NonZero] {
            for sums in [
                Sums::None,
                Sums::Serial,
                Sums::Lanes { shift: 0.0 },
                Sums::Lanes { shift: -2.9 },
                Sums::Lanes { shift: 1e30 },
            ] {
                v.push(Gather { filter, sums });
            }
        }
        v
    }

    /// Every kernel against the plain reference, bit for bit, on every tail length, with every
    /// kind of special value; other element types through the portable kernel.
    #[test]
    fn kernels_match_the_reference() {
        let mut x = specials(20_011, 7);
        x.extend(
            crate::rng::normal_f32(3000, 3)
                .iter()
                .map(|v| v * 3.0 + 1e6),
        );
        for g in gathers() {
            for start in [0usize, 5, 97] {
                for len in (0..70).chain([1000, 4099, 20_011]) {
                    let d = &x[start..(start + len).min(x.len())];
                    let (plain, paired) = (reference(d, g, false), reference(d, g, true));
                    let what = format!("{g:?} start {start} len {len}");
                    assert_eq!(bits(&summarize_portable(d, g)), bits(&plain), "{what}");
                    let w: Vec<f64> = d.iter().map(|&v| v as f64).collect();
                    assert_eq!(bits(&summarize(&w, g)), bits(&plain), "f64 {what}");
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::avx2() {
                        // SAFETY: AVX2 and FMA are present (checked).
                        let a = unsafe { simd::summarize_avx2(d, g) };
                        assert_eq!(bits(&a), bits(&paired), "avx2 {what}");
                        let h: Vec<half::f16> = d.iter().map(|&v| half::f16::from_f32(v)).collect();
                        let hw: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
                        let r = reference(&hw, g, true);
                        assert_eq!(bits(&summarize(&h, g)), bits(&r), "f16 {what}");
                    }
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::avx512() {
                        // SAFETY: AVX-512 F, BW, DQ and VL are present (checked).
                        let a = unsafe { simd::summarize_avx512(d, g) };
                        assert_eq!(bits(&a), bits(&paired), "avx512 {what}");
                    }
                }
            }
        }
    }

    /// [`Summary::then`] keeps the earlier of equal extremes, and pieces merged in order give
    /// the counts, range and serial sums of the whole.
    #[test]
    fn then_merges_in_order() {
        let z = |v: f64| Summary {
            min: v,
            max: v,
            ..Summary::EMPTY
        };
        for (a, b) in [(0.0, -0.0), (-0.0, 0.0)] {
            let (a, b) = std::hint::black_box((a, b));
            let m = z(a).then(z(b));
            assert_eq!(
                (m.min.to_bits(), m.max.to_bits()),
                (a.to_bits(), a.to_bits())
            );
        }
        let x = specials(4096, 11);
        let g = Gather {
            filter: Filter::NonZero,
            sums: Sums::None,
        };
        let whole = summarize(&x, g);
        let parts = x
            .chunks(512)
            .map(|c| summarize(c, g))
            .fold(Summary::EMPTY, Summary::then);
        assert_eq!(
            (parts.count, parts.nan, parts.zeros),
            (whole.count, whole.nan, whole.zeros)
        );
        assert_eq!(parts.first_zero.to_bits(), whole.first_zero.to_bits());
        assert_eq!(parts.min, whole.min);
        assert_eq!(parts.max, whole.max);
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

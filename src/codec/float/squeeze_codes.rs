//! S2FP8's codes without a `log2` and an `exp2` per value (docs/CODECS.md, "Floating point"):
//! with nearest or truncating rounding, the magnitude code of x, to_code(squeeze(|x|)), is a
//! non-decreasing step function of |x| (`log2` and `exp2` are monotone, tested over every
//! float32; multiplying by alpha > 0, adding beta and rounding to a code are monotone), and
//! positive float32 values are ordered as their bit patterns. So per tensor, [`SqueezeCoder`]
//! finds by bisection over bit patterns the smallest |x| of each code, through the per-value
//! definition itself; then a value's code is one lookup in a table of buckets of |x|'s bits
//! (each holding at most one threshold: its lower code and where in the bucket the next begins)
//! and one comparison. Buckets that hold several thresholds (huge alpha: a nearly constant
//! tensor) are marked, and their values take a bisection of the thresholds. The codes are those
//! of the per-value path, bit for bit (tested against it).

use super::minifloat::{to_code, RoundingPlan, NEAREST, TRUNCATE};
use super::shift_squeeze::LogShiftSqueeze;

/// A bucket entry: the code at the bucket's start in the top byte, and in the low 24 bits the
/// offset (from the bucket's start) where the next code begins, or the bucket's width when none
/// does. `COMPLEX`: the bucket holds more than one step.
const COMPLEX: u32 = 0xff00_0000;
/// The bit pattern of +Inf: magnitudes above it are NaN.
const INF: u32 = 0x7f80_0000;
/// At most this many buckets: beyond it the buckets widen (and more of them are marked complex).
const MAX_BUCKETS: u32 = 1 << 14;

/// The codes of one tensor's squeezed values, from its magnitude thresholds.
#[derive(Debug, Clone)]
pub(super) struct SqueezeCoder {
    /// `thr[k - 1]`: the smallest magnitude bits whose code is at least k, for k = 1..=`top`
    /// (`top` - 1 is the largest code the table gives).
    thr: Vec<u32>,
    /// The code of +Inf (the top code of finite and infinite magnitudes) and its threshold.
    top: u32,
    top_thr: u32,
    nan_code: u32,
    sign_shift: u32,
    /// Buckets of 2^shift bit patterns; the table starts at bucket `first` and ends at `first +
    /// table.len() - 1`, and magnitudes outside take the nearest end's entry (which holds no step).
    shift: u32,
    first: u32,
    table: Vec<u32>,
}

/// The magnitude code (sign bit excluded) of `a` (|x|'s bits) by the per-value definition:
/// the squeeze, then [`to_code`] with rounding `r` (nearest or truncate).
pub(super) fn reference_code(s: &LogShiftSqueeze, p: &RoundingPlan, r: u8, a: u32) -> u32 {
    let y = s.squeeze_one(f32::from_bits(a));
    let c = if r == NEAREST {
        to_code::<NEAREST>(y, 0, p)
    } else {
        to_code::<TRUNCATE>(y, 0, p)
    };
    c & ((1 << p.sign_shift) - 1)
}

impl SqueezeCoder {
    /// The thresholds and bucket table of transform `s` into the codes of plan `p` with
    /// rounding `r` (nearest or truncate; not stochastic).
    pub(super) fn new(s: &LogShiftSqueeze, p: &RoundingPlan, r: u8) -> Self {
        debug_assert!(r == NEAREST || r == TRUNCATE);
        let code = |a: u32| reference_code(s, p, r, a);
        let top = code(INF);
        // thr[k - 1] for k = 1..=top: bisection between the previous threshold (code < k
        // unless equal) and +Inf (code top >= k).
        let mut thr = Vec::with_capacity(top as usize);
        let mut lo = 0u32;
        for k in 1..=top {
            if code(lo) < k {
                let mut hi = INF;
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if code(mid) >= k {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                lo = hi;
            }
            thr.push(lo);
        }
        let top_thr = *thr.last().unwrap_or(&0);
        let mut c = SqueezeCoder {
            thr,
            top,
            top_thr,
            nan_code: p.nan_code,
            sign_shift: p.sign_shift,
            shift: 0,
            first: 0,
            table: Vec::new(),
        };
        c.build_table();
        c
    }

    /// The thresholds the table holds: codes 1..top - 1 (the top code is compared separately).
    fn table_thr(&self) -> &[u32] {
        &self.thr[..self.thr.len().saturating_sub(1)]
    }

    /// Bucket width 2^shift: the largest power of two not above the smallest gap between
    /// distinct thresholds (so a bucket holds at most one), widened if the table would exceed
    /// `MAX_BUCKETS`; then each bucket's entry.
    fn build_table(&mut self) {
        let t = self.table_thr();
        let (Some(&lo), Some(&hi)) = (t.first(), t.last()) else {
            // A single code below the top: every entry is code 0 without a step.
            self.shift = 23;
            self.table = vec![1 << 23];
            return;
        };
        let gap = t
            .windows(2)
            .filter(|w| w[1] > w[0])
            .map(|w| w[1] - w[0])
            .min()
            .unwrap_or(1 << 23);
        let mut shift = (31 - gap.leading_zeros()).min(23);
        while ((hi >> shift) - (lo >> shift)) + 3 > MAX_BUCKETS {
            shift += 1;
        }
        // One bucket below the first threshold's and one above the last's: neither holds a step,
        // so clamping the bucket index of any magnitude outside gives its code.
        let first = (lo >> shift).saturating_sub(1);
        let last = (hi >> shift) + 1;
        let width = 1u32 << shift;
        let mut table = Vec::with_capacity((last - first + 1) as usize);
        // i: the number of thresholds at or below the bucket's start (its code).
        let mut i = 0;
        for b in first..=last {
            let start = b << shift;
            while i < t.len() && t[i] <= start {
                i += 1;
            }
            let mut j = i;
            while j < t.len() && t[j] - start < width {
                j += 1;
            }
            table.push(match j - i {
                0 => ((i as u32) << 24) | width,
                1 => ((i as u32) << 24) | (t[i] - start),
                _ => COMPLEX,
            });
        }
        self.shift = shift;
        self.first = first;
        self.table = table;
    }

    /// The code of one float32 (sign included): what [`reference_code`] gives for |x| with x's
    /// sign bit on top.
    #[inline(always)]
    pub(super) fn code(&self, v: f32) -> u32 {
        let bits = v.to_bits();
        let a = bits & 0x7fff_ffff;
        let last = self.first + self.table.len() as u32 - 1;
        let b = (a >> self.shift).clamp(self.first, last);
        let e = self.table[(b - self.first) as usize];
        let mut c = (e >> 24) + ((a & ((1 << self.shift) - 1)) >= (e & 0x00ff_ffff)) as u32;
        if e == COMPLEX {
            c = self.complex_code(a);
        }
        if a >= self.top_thr {
            c = self.top;
        }
        if a > INF {
            c = self.nan_code;
        }
        c | ((bits >> 31) << self.sign_shift)
    }

    /// The code of a magnitude in a bucket with several steps: how many table thresholds are at
    /// or below it.
    #[cold]
    fn complex_code(&self, a: u32) -> u32 {
        self.table_thr().partition_point(|&t| t <= a) as u32
    }

    /// [`Self::complex_code`] of the lanes of `mags` set in `mask`, into `lanes`.
    #[cold]
    #[inline(never)]
    fn complex_lanes(&self, lanes: &mut [u32; 16], mags: &[u32; 16], mask: u16) {
        for (j, l) in lanes.iter_mut().enumerate() {
            if mask >> j & 1 == 1 {
                *l = self.complex_code(mags[j]);
            }
        }
    }

    /// The codes of `x` into `out` (same length), with AVX-512 or AVX2 when the CPU has it.
    pub(super) fn codes(&self, x: &[f32], out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx512() {
            // SAFETY: AVX-512 F and BW are present (checked at run time); `out` holds
            // x.len() codes.
            let n = x.len().min(out.len());
            return unsafe { self.codes_avx512_to(&x[..n], out.as_mut_ptr(), false) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { self.codes_avx2(x, out) };
        }
        self.codes_body(x, out)
    }

    #[inline(always)]
    fn codes_body(&self, x: &[f32], out: &mut [u8]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = self.code(v) as u8;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes_avx2(&self, x: &[f32], out: &mut [u8]) {
        self.codes_body(x, out)
    }

    /// [`Self::code`] over `x`, 16 values per iteration in AVX-512 registers (the bucket entries
    /// gathered), written to `dst`, which may be uninitialized memory.
    ///
    /// # Safety
    /// AVX-512 F and BW are available and `dst` is valid for writing `x.len()` bytes.
    /// `stream`: as in [`crate::codec::kernel_io::store_codes_avx512`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn codes_avx512_to(&self, x: &[f32], dst: *mut u8, stream: bool) {
        use std::arch::x86_64::*;
        let (src, n) = (x.as_ptr(), x.len());
        let absm = _mm512_set1_epi32(0x7fff_ffff);
        let shift = _mm_cvtsi32_si128(self.shift as i32);
        let first = _mm512_set1_epi32(self.first as i32);
        let last = _mm512_set1_epi32((self.first + self.table.len() as u32 - 1) as i32);
        let low = _mm512_set1_epi32(((1u32 << self.shift) - 1) as i32);
        let off = _mm512_set1_epi32(0x00ff_ffff);
        let one = _mm512_set1_epi32(1);
        let top_thr = _mm512_set1_epi32(self.top_thr as i32);
        let top = _mm512_set1_epi32(self.top as i32);
        let inf = _mm512_set1_epi32(INF as i32);
        let nan = _mm512_set1_epi32(self.nan_code as i32);
        let sign_shift = _mm_cvtsi32_si128(self.sign_shift as i32);
        let table = self.table.as_ptr().cast::<i32>();
        let code16 = |v: __m512i| -> __m512i {
            let a = _mm512_and_si512(v, absm);
            let b = _mm512_min_epu32(_mm512_max_epu32(_mm512_srl_epi32(a, shift), first), last);
            // SAFETY: every index is in 0..table.len() (clamped above).
            let e = unsafe { _mm512_i32gather_epi32::<4>(_mm512_sub_epi32(b, first), table) };
            let step = _mm512_cmpge_epu32_mask(_mm512_and_si512(a, low), _mm512_and_si512(e, off));
            let base = _mm512_srli_epi32::<24>(e);
            let mut c = _mm512_mask_add_epi32(base, step, base, one);
            let complex = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(COMPLEX as i32));
            if complex != 0 {
                let mut lanes = [0u32; 16];
                let mut mags = [0u32; 16];
                // SAFETY: both arrays hold 16 lanes.
                unsafe {
                    _mm512_storeu_si512(lanes.as_mut_ptr().cast(), c);
                    _mm512_storeu_si512(mags.as_mut_ptr().cast(), a);
                }
                self.complex_lanes(&mut lanes, &mags, complex);
                // SAFETY: `lanes` holds 16 lanes.
                c = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
            }
            let c = _mm512_mask_mov_epi32(c, _mm512_cmpge_epu32_mask(a, top_thr), top);
            let c = _mm512_mask_mov_epi32(c, _mm512_cmpgt_epu32_mask(a, inf), nan);
            _mm512_or_si512(c, _mm512_sll_epi32(_mm512_srli_epi32::<31>(v), sign_shift))
        };
        // SAFETY: `load` reads x[i..i + 16] for the i that `store_codes_avx512` passes, which
        // keeps i + 16 <= n (full loads) or masks the lanes past n.
        unsafe {
            crate::codec::kernel_io::store_codes_avx512(dst, n, stream, |i, k| {
                code16(_mm512_maskz_loadu_epi32(k, src.add(i).cast()))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::minifloat::MiniFloat;
    use super::super::test_values::all_bits;
    use super::super::{FloatConfig, Kind};
    use super::*;
    use crate::codec::{Encoder, Param, Params};
    use crate::dtype::Data;
    use crate::rng::{normal_f32, SplitMix64};
    use rayon::prelude::*;

    /// Every float32 bit pattern from `lo` to `hi` (inclusive) in ascending order of value, cut
    /// in pieces for the pool: `f` of each value is never below `f` of the one before.
    fn assert_monotone(lo: i64, hi: i64, value: impl Fn(i64) -> f32 + Sync, f: fn(f32) -> f32) {
        let pieces = 64;
        let step = (hi - lo) / pieces + 1;
        crate::pool::install(|| {
            (0..pieces).into_par_iter().for_each(|p| {
                let start = lo + p * step;
                let end = hi.min(start + step);
                let mut prev = f(value(start.max(lo + 1) - 1));
                for i in start..=end {
                    let y = f(value(i));
                    assert!(y >= prev, "{:e} -> {y:e} below {prev:e}", value(i));
                    prev = y;
                }
            })
        });
    }

    // The premise of the thresholds (and of the fit's max): log2 and exp2 are monotone, checked
    // over every float32 (about 2 and 4 billion calls: the two heaviest tests of the module).

    #[test]
    fn log2_is_monotone_over_every_float32() {
        // Every non-negative float32, in ascending order of bit patterns (of values).
        assert_monotone(0, 0x7f80_0000, |i| f32::from_bits(i as u32), f32::log2);
    }

    #[test]
    fn exp2_is_monotone_over_every_float32() {
        // i < 0: -|x| with bits -i (ascending values from -Inf up to -0), then +0 up to +Inf.
        let all = |i: i64| {
            if i < 0 {
                -f32::from_bits((-i) as u32)
            } else {
                f32::from_bits(i as u32)
            }
        };
        assert_monotone(-0x7f80_0000, 0x7f80_0000, all, f32::exp2);
    }

    /// The full code (sign included) of the per-value path: squeeze, then `to_code`.
    fn reference(s: &LogShiftSqueeze, p: &RoundingPlan, r: u8, v: f32) -> u32 {
        let y = s.squeeze_one(v);
        if r == NEAREST {
            to_code::<NEAREST>(y, 0, p)
        } else {
            to_code::<TRUNCATE>(y, 0, p)
        }
    }

    /// Values of every kind: normal, log-uniform magnitudes over all of float32's range,
    /// random bit patterns (subnormals, NaN payloads), zeros, infinities, NaNs.
    fn inputs() -> Vec<f32> {
        let mut r = SplitMix64::new(21);
        let mut x = normal_f32(20_000, 4);
        x.extend((0..20_000).map(|_| {
            let e = r.below(277) as f32 - 149.0;
            let v = (e + (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32).exp2();
            if r.next_u64() & 1 == 0 {
                v
            } else {
                -v
            }
        }));
        x.extend(all_bits(20_000));
        x.extend([
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            f32::MIN_POSITIVE,
            f32::MAX,
            -f32::MAX,
        ]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN]);
        x.extend([f32::from_bits(0x7f80_0001), f32::from_bits(0xffc0_0001)]);
        x
    }

    /// The transforms to test: fitted to a normal tensor, a nearly constant one (huge alpha),
    /// one spread over float32's whole range (small alpha), a tiny-valued one, and the extremes
    /// the fit can give (alpha up to 1.5e7, beta far from 0).
    fn squeezes() -> Vec<LogShiftSqueeze> {
        let mut r = SplitMix64::new(3);
        // log2 spread 2.75e-6 (alpha = 15 / (max - mu) about 5e6).
        let mut near_const = vec![1.0f32; 5000];
        near_const[7] = 1.0 + 2f32.powi(-19);
        let spread: Vec<f32> = (0..5000)
            .map(|_| (r.below(250) as f32 - 125.0).exp2())
            .collect();
        let tiny: Vec<f32> = normal_f32(5000, 9).iter().map(|v| v * 1e-30).collect();
        let mut s: Vec<LogShiftSqueeze> = [normal_f32(5000, 1), near_const, spread, tiny]
            .iter()
            .map(|x| LogShiftSqueeze::fit_exact(x))
            .collect();
        for (alpha, beta) in [
            (1.5e7, -9e8),
            (1.5e7, 3e7),
            (0.05, 40.0),
            (1.0, 0.0),
            (3.3, -20.0),
        ] {
            s.push(LogShiftSqueeze { alpha, beta });
        }
        assert!(s[1].alpha > 1e5, "{:?}", s[1]);
        assert!(s[2].alpha < 0.2, "{:?}", s[2]);
        s
    }

    #[test]
    fn threshold_codes_equal_the_per_value_path() {
        let fmt = MiniFloat::ieee(5, 2);
        let base = inputs();
        for s in squeezes() {
            for saturate in [true, false] {
                let p = RoundingPlan::new(fmt, saturate);
                for r in [NEAREST, TRUNCATE] {
                    let c = SqueezeCoder::new(&s, &p, r);
                    // Each threshold is where the code first reaches its k.
                    for (k, &t) in c.thr.iter().enumerate() {
                        assert!(reference_code(&s, &p, r, t) > k as u32);
                        assert!(t == 0 || reference_code(&s, &p, r, t - 1) <= k as u32);
                    }
                    // Values at and up to 3 ulps around every threshold, both signs.
                    let mut x = base.clone();
                    for &t in &c.thr {
                        for d in -3i64..=3 {
                            let b = (t as i64 + d).clamp(0, 0x7fff_ffff) as u32;
                            x.push(f32::from_bits(b));
                            x.push(-f32::from_bits(b));
                        }
                    }
                    let want: Vec<u8> = x.iter().map(|&v| reference(&s, &p, r, v) as u8).collect();
                    let one: Vec<u8> = x.iter().map(|&v| c.code(v) as u8).collect();
                    let mut fast = vec![0u8; x.len()];
                    c.codes(&x, &mut fast);
                    let mut portable = vec![0u8; x.len()];
                    c.codes_body(&x, &mut portable);
                    for (i, v) in x.iter().enumerate() {
                        let ctx = format!("{s:?} saturate={saturate} r={r}: {v:e}");
                        assert_eq!(one[i], want[i], "{ctx}");
                        assert_eq!(fast[i], want[i], "{ctx}");
                        assert_eq!(portable[i], want[i], "{ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn huge_alpha_marks_buckets_complex_and_stays_exact() {
        // alpha = 1.5e7: neighbouring float32 values many codes apart, buckets with several
        // steps: the bisection path must give the codes (checked in the test above too).
        let s = LogShiftSqueeze {
            alpha: 1.5e7,
            beta: -9e8,
        };
        let c = SqueezeCoder::new(&s, &RoundingPlan::new(MiniFloat::ieee(5, 2), true), NEAREST);
        assert!(c.table.contains(&COMPLEX));
    }

    /// The payload of an s2fp8 encoding of `x` with parameters `p`, and its alpha and beta.
    fn encode(x: &[f32], p: &Params) -> (Vec<u8>, LogShiftSqueeze) {
        let cfg = FloatConfig::from_params(Kind::S2fp8, p).unwrap();
        let enc = cfg.encode(Data::F32(x)).unwrap();
        let m = &enc.meta;
        let f = |i: usize| f32::from_le_bytes(m[i..i + 4].try_into().unwrap());
        let s = LogShiftSqueeze {
            alpha: f(m.len() - 8),
            beta: f(m.len() - 4),
        };
        (enc.payload.clone(), s)
    }

    #[test]
    fn encoder_writes_the_per_value_codes() {
        // Large tensors (the threshold path, several chunks and a partial one) with every
        // rounding and overflow mode: each byte is the per-value path's code under the stored
        // alpha and beta.
        let mut x = normal_f32(3 * (1 << 16) + 1001, 12);
        x.extend(inputs());
        let mut grad = normal_f32(1 << 17, 13);
        let mut r = SplitMix64::new(14);
        for row in grad.chunks_mut(512) {
            let scale = (r.below(40) as f32 - 30.0).exp2();
            row.iter_mut().for_each(|v| *v *= scale);
        }
        let fmt = MiniFloat::ieee(5, 2);
        for t in [&x, &grad] {
            for (rounding, ri) in [("nearest", NEAREST), ("truncate", TRUNCATE)] {
                for (overflow, saturate) in [("saturate", true), ("inf", false)] {
                    let mut p = Params::new();
                    p.insert("rounding".into(), Param::Str(rounding.into()));
                    p.insert("overflow".into(), Param::Str(overflow.into()));
                    let (payload, s) = encode(t, &p);
                    let plan = RoundingPlan::new(fmt, saturate);
                    assert_eq!(payload.len(), t.len());
                    for (v, &b) in t.iter().zip(&payload) {
                        assert_eq!(b as u32, reference(&s, &plan, ri, *v), "{rounding} {v:e}");
                    }
                }
            }
        }
        // Stochastic rounding keeps the per-value squeeze: codes are within one of nearest.
        let mut p = Params::new();
        p.insert("rounding".into(), Param::Str("stochastic".into()));
        p.insert("seed".into(), Param::Int(5));
        let n = normal_f32(1 << 17, 15);
        let (payload, s) = encode(&n, &p);
        let plan = RoundingPlan::new(fmt, true);
        for (v, &b) in n.iter().zip(&payload) {
            let y = s.squeeze_one(*v);
            let lo = to_code::<TRUNCATE>(y, 0, &plan) as u8;
            assert!(b == lo || b == lo + 1, "{v:e}: {b} vs {lo}");
        }
    }
}

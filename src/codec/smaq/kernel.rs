//! The hot loops of SmaQ: values to codes, codes to bytes, bytes to values.
//!
//! Layout of one chunk of `n` values, `o` of them outliers (docs/FORMAT.md):
//!
//! ```text
//!   primary  n * bits_main bits      per value, LSB first: flag (1 = outlier), sign, the low
//!                                    bits_main-2 bits of the magnitude
//!   extra    o * (bits_outlier - bits_main) bits
//!                                    per outlier, in order: the high bits of its magnitude
//! ```
//!
//! Each stream is rounded up to a whole byte. The primary stream is fixed-width, so eight values
//! always take exactly `bits_main` bytes: encode and decode work on groups of eight without any
//! serial dependency but the running position in the small extra stream. The main code with sign
//! set and magnitude 0 (never produced otherwise) stands for an exact 0.0.
//!
//! Three levels, chosen at run time ([`Isa::detect`]): AVX-512 (`kernel/avx512.rs`, 64 values
//! per step: fused encode for bits_main <= 8 and extra bits <= 4, table decode for full codes of
//! at most 8 bits), AVX2 (the module below, eight values per step, also the tails of the AVX-512
//! loops) and portable code. All three produce identical bytes and values; the tests run every
//! level the CPU has against the portable code.

use crate::bits::{peek64, BitWriter};
use crate::dtype::Element;
use crate::rng::uniform;
use crate::stats::{PieceMoments, PieceStats};
use half::{bf16, f16};

/// The code of an exact zero: main, sign set, magnitude 0.
pub const ZERO_CODE: u16 = 0b10;

/// The quantization grid shared by encoder and decoder.
#[derive(Debug, Clone, Copy)]
pub struct Quant {
    pub bits_main: u32,
    pub bits_outlier: u32,
    pub t_main: f32,
    pub t_outlier: f32,
    pub r_main: f32,
    pub r_out: f32,
    pub max_main: u32,
    pub max_out: u32,
}

impl Quant {
    /// Requires 3 <= bits_main <= bits_outlier <= 16 and 0 < t_main < t_outlier.
    pub fn new(bits_main: u8, bits_outlier: u8, t_main: f32, t_outlier: f32) -> Self {
        assert!(3 <= bits_main && bits_main <= bits_outlier && bits_outlier <= 16);
        let max_main = (1u32 << (bits_main - 2)) - 1;
        let max_out = (1u32 << (bits_outlier - 2)) - 1;
        Quant {
            bits_main: bits_main as u32,
            bits_outlier: bits_outlier as u32,
            t_main,
            t_outlier,
            r_main: max_main as f32 / t_main,
            r_out: max_out as f32 / (t_outlier - t_main),
            max_main,
            max_out,
        }
    }

    /// Bits of the extra stream per outlier.
    pub fn extra_bits(&self) -> u32 {
        self.bits_outlier - self.bits_main
    }

    /// Bytes of a chunk of `n` values of which `outliers` are outliers (exceptions excluded).
    pub fn chunk_bytes(&self, n: u64, outliers: u64) -> (u64, u64) {
        (
            (n * self.bits_main as u64).div_ceil(8),
            (outliers * self.extra_bits() as u64).div_ceil(8),
        )
    }

    /// The z-score of a full code (primary bits | extra bits << bits_main); None for exact zero.
    pub fn z_of(&self, key: u32) -> Option<f64> {
        let outlier = key & 1 == 1;
        let negative = key & 2 != 0;
        let z = if outlier {
            let low = (key >> 2) & self.max_main;
            let mag = low | (key >> self.bits_main) << (self.bits_main - 2);
            mag as f64 / self.r_out as f64 + self.t_main as f64
        } else {
            let mag = (key >> 2) & self.max_main;
            if mag == 0 && negative {
                return None;
            }
            mag as f64 / self.r_main as f64
        };
        Some(if negative { -z } else { z })
    }
}

/// How one chunk is turned into codes.
#[derive(Debug, Clone, Copy)]
pub struct Prep {
    pub q: Quant,
    pub mean: f64,
    pub inv_std: f64,
    /// Stochastic rounding stream key, or None for a constant offset `dither`.
    pub key: Option<u32>,
    /// 0.5 for nearest, 0 for truncation.
    pub dither: f32,
    /// The statistics are safe to use in f32 arithmetic (else the f64 path runs).
    pub f32_ok: bool,
}

impl Prep {
    pub fn f32_safe(mean: f64, std: f64) -> bool {
        mean.abs() < 1e30 && (1e-30..1e30).contains(&std)
    }
}

/// Tallies of one chunk.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counts {
    pub outliers: u32,
    /// Finite values beyond t_outlier.
    pub beyond: u32,
    pub nonfinite: u32,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.outliers += o.outliers;
        self.beyond += o.beyond;
        self.nonfinite += o.nonfinite;
    }
}

/// z-score, finiteness and exact-zero test of one element.
pub trait ZScore<T>: Fn(T) -> (f32, bool, bool) + Copy {}
impl<T, F: Fn(T) -> (f32, bool, bool) + Copy> ZScore<T> for F {}

/// The z-score in f64 arithmetic: exact for any element type and any statistics.
#[inline(always)]
pub fn z_f64<T: Element>(mean: f64, inv_std: f64) -> impl ZScore<T> {
    move |v: T| {
        let f = v.to_f64();
        (((f - mean) * inv_std) as f32, f.is_finite(), f == 0.0)
    }
}

/// The z-score in f32 arithmetic, the mean split in two f32 parts so that values near the mean
/// keep their precision. Only used when [`Prep::f32_safe`].
#[inline(always)]
fn z_f32(mean: f64, inv_std: f64) -> impl ZScore<f32> {
    let hi = mean as f32;
    let lo = (mean - hi as f64) as f32;
    let inv = inv_std as f32;
    move |v: f32| {
        let bits = v.to_bits();
        (
            ((v - hi) - lo) * inv,
            bits & 0x7f80_0000 != 0x7f80_0000,
            bits << 1 == 0,
        )
    }
}

/// Codes for `x` (whose first element is element `first` of the chunk) into `out`.
#[inline(always)]
fn codes_body<T: Copy, const STOCH: bool>(
    x: &[T],
    first: u32,
    p: &Prep,
    zf: impl ZScore<T>,
    out: &mut [u16],
) -> Counts {
    let q = &p.q;
    let (max_main, max_out) = (q.max_main as f32, q.max_out as f32);
    let key = p.key.unwrap_or(0);
    let (mut outliers, mut beyond, mut nonfinite) = (0u32, 0u32, 0u32);
    for (i, (&v, o)) in x.iter().zip(out.iter_mut()).enumerate() {
        let (z, finite, zero) = zf(v);
        let a = z.abs();
        let is_out = (a > q.t_main) & !zero;
        let d = if is_out { a - q.t_main } else { a };
        let r = if is_out { q.r_out } else { q.r_main };
        let mx = if is_out { max_out } else { max_main };
        let s = d * r;
        // `<` is false for NaN, so NaN (patched later from the exception list) takes `mx`.
        let s = if s < mx { s } else { mx };
        let u = if STOCH {
            uniform(key, first.wrapping_add(i as u32))
        } else {
            p.dither
        };
        // s + u is in [0, mx + 1): the truncating conversion is the floor.
        let mag = (s + u) as i32 as u32;
        let mag = mag.min(if is_out { q.max_out } else { q.max_main });
        let neg = (z < 0.0) & ((mag != 0) | is_out);
        let code = is_out as u32 | (neg as u32) << 1 | mag << 2;
        *o = if zero { ZERO_CODE } else { code as u16 };
        outliers += is_out as u32;
        beyond += ((a > q.t_outlier) & finite & !zero) as u32;
        nonfinite += !finite as u32;
    }
    Counts {
        outliers,
        beyond,
        nonfinite,
    }
}

#[inline(always)]
fn codes_with<T: Copy>(
    x: &[T],
    first: u32,
    p: &Prep,
    zf: impl ZScore<T>,
    out: &mut [u16],
) -> Counts {
    if p.key.is_some() {
        codes_body::<T, true>(x, first, p, zf, out)
    } else {
        codes_body::<T, false>(x, first, p, zf, out)
    }
}

/// f32 codes, in AVX2 when the CPU has it (detected at run time).
fn codes_f32(x: &[f32], first: u32, p: &Prep, out: &mut [u16]) -> Counts {
    let mut done = 0;
    let mut c = Counts::default();
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        (done, c) = unsafe { avx2::codes(x, first, p, out) };
    }
    let zf = z_f32(p.mean, p.inv_std);
    c.add(codes_with(
        &x[done..],
        first.wrapping_add(done as u32),
        p,
        zf,
        &mut out[done..],
    ));
    c
}

/// The SIMD level a kernel call may use. The kernels of every level produce identical bytes;
/// tests run each level the CPU has against the portable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub enum Isa {
    Portable,
    /// AVX2 + POPCNT (+ F16C for the 16-bit decode): [`crate::simd::avx2`].
    Avx2,
    /// AVX-512 F/BW/DQ/VL/VBMI/VBMI2 (and AVX2): [`crate::simd::avx512_vbmi`].
    Avx512,
}

impl Isa {
    /// The best level this CPU has (detected at run time, once, by [`crate::simd`]).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx512_vbmi() {
            return Isa::Avx512;
        }
        if crate::simd::avx2() {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    /// Every level up to [`Isa::detect`], for tests.
    #[cfg(test)]
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&l| l <= Isa::detect())
            .collect()
    }
}

/// Whether the fused encoder handles this configuration at this level.
fn fused_applies(isa: Isa, p: &Prep) -> bool {
    isa >= Isa::Avx2 && p.f32_ok && p.q.bits_main <= 8 && p.q.extra_bits() <= 4
}

/// Where a fused encode collects the candidates for the exception list and the escape stream:
/// the index (from the chunk's start) of every value outside `[lo, hi]` or NaN, as [`outside`]
/// finds them, found in the same pass as the codes.
pub struct Candidates<'a> {
    pub lo: f32,
    pub hi: f32,
    pub out: &'a mut Vec<u32>,
    /// The chunk's moments, when wanted and the kernel can gather them as it reads the values.
    pub moments: Option<&'a mut FusedMoments>,
}

impl<'a> Candidates<'a> {
    /// Candidates outside the f64 interval `[lo, hi]` (rounded inward to f32, see [`outside`]).
    pub fn new(lo: f64, hi: f64, out: &'a mut Vec<u32>) -> Self {
        let (lo, hi) = bounds_f32(lo, hi);
        Candidates {
            lo,
            hi,
            out,
            moments: None,
        }
    }
}

/// A chunk's moments around `shift` ([`PieceStats::moments`]), asked of the encoder: the AVX-512
/// kernel (float32, float16, bfloat16) gathers them in its pass over the values (`got`, the
/// very bits of `PieceStats::moments`), saving the encoder a pass over the chunk; elsewhere
/// `got` stays None and the caller gathers them.
pub struct FusedMoments {
    pub shift: f64,
    pub got: Option<PieceMoments>,
}

impl FusedMoments {
    pub fn new(shift: f64) -> Self {
        FusedMoments { shift, got: None }
    }

    /// The moments of `x`, the chunk just coded: as the kernel gathered them, else now.
    pub fn take<T: Element>(self, x: &[T]) -> PieceMoments {
        self.got
            .unwrap_or_else(|| PieceStats::moments(x, self.shift))
    }
}

/// Codes of one f32 chunk packed in a single pass (the SIMD fast path): the primary stream into
/// `primary` (exactly its size), the extra bits into `extra`, the candidates into `cands`
/// (`first` added to their indices). None when that path does not apply (no AVX2, statistics
/// unsafe in f32, or wide codes); nothing is written then.
pub fn encode_f32_fused(
    x: &[f32],
    first: u32,
    p: &Prep,
    primary: &mut [u8],
    extra: &mut BitWriter,
    cands: &mut Candidates<'_>,
) -> Option<Counts> {
    encode_f32_fused_with(Isa::detect(), x, first, p, primary, extra, cands)
}

/// [`encode_f32_fused`] at a given level (at most [`Isa::detect`]).
fn encode_f32_fused_with(
    isa: Isa,
    x: &[f32],
    first: u32,
    p: &Prep,
    primary: &mut [u8],
    extra: &mut BitWriter,
    cands: &mut Candidates<'_>,
) -> Option<Counts> {
    if !fused_applies(isa, p) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let bm = p.q.bits_main as usize;
        let (mut done, mut c) = (0, Counts::default());
        if isa >= Isa::Avx512 {
            // SAFETY: the CPU has every extension the AVX-512 kernel uses (Isa::detect).
            (done, c) = unsafe { avx512::encode(x, first, p, primary, extra, cands) };
        }
        // The candidates of the rest, which the AVX-512 loop did not see.
        outside_f32(
            &x[done..],
            cands.lo,
            cands.hi,
            first.wrapping_add(done as u32),
            cands.out,
        );
        // The rest (< 64 values after AVX-512): AVX2 for whole groups of eight.
        // SAFETY: AVX2 is present (fused_applies).
        let (d2, c2) = unsafe {
            avx2::encode(
                &x[done..],
                first.wrapping_add(done as u32),
                p,
                &mut primary[done / 8 * bm..],
                extra,
            )
        };
        c.add(c2);
        let done = done + d2;
        // The last < 8 values: portable codes, packed bit by bit.
        let rest = &x[done..];
        let mut codes = [0u16; 8];
        let zf = z_f32(p.mean, p.inv_std);
        let at = first.wrapping_add(done as u32);
        c.add(codes_with(rest, at, p, zf, &mut codes[..rest.len()]));
        pack_tail(
            &codes[..rest.len()],
            &p.q,
            &mut primary[done / 8 * bm..],
            extra,
        );
        Some(c)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// AVX2 kernels: the same IEEE operations as [`codes_body`] over [`z_f32`] in the same order,
/// eight lanes at a time, so they produce identical codes (tested).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Counts, Prep, ZERO_CODE};
    use crate::bits::{peek64, BitWriter};
    use std::arch::x86_64::*;

    /// For each 8-bit mask of outlier lanes, the rank of every lane among the outliers before it.
    static RANKS: [[u8; 8]; 256] = {
        let mut t = [[0u8; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let mut r = 0u8;
            let mut j = 0;
            while j < 8 {
                t[m][j] = r;
                r += ((m >> j) & 1) as u8;
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// Broadcast constants of one chunk.
    pub struct Consts {
        hi: __m256,
        lo: __m256,
        inv: __m256,
        t_main: __m256,
        t_out: __m256,
        r_main: __m256,
        r_out: __m256,
        mx_main: __m256,
        mx_out: __m256,
        mi_main: __m256i,
        mi_out: __m256i,
        dither: __m256,
        stoch: bool,
        /// The stochastic rounding stream key, and the element indices of lanes 0..8.
        key: __m256i,
        base: __m256i,
    }

    /// One step's codes (32-bit lanes) and masks.
    pub struct Step {
        pub code: __m256i,
        pub is_out: __m256i,
        beyond: __m256i,
        nonfin: __m256i,
    }

    impl Consts {
        #[target_feature(enable = "avx2")]
        pub fn new(p: &Prep, first: u32) -> Consts {
            let q = &p.q;
            let hi = p.mean as f32;
            let lo = (p.mean - hi as f64) as f32;
            Consts {
                hi: _mm256_set1_ps(hi),
                lo: _mm256_set1_ps(lo),
                inv: _mm256_set1_ps(p.inv_std as f32),
                t_main: _mm256_set1_ps(q.t_main),
                t_out: _mm256_set1_ps(q.t_outlier),
                r_main: _mm256_set1_ps(q.r_main),
                r_out: _mm256_set1_ps(q.r_out),
                mx_main: _mm256_set1_ps(q.max_main as f32),
                mx_out: _mm256_set1_ps(q.max_out as f32),
                mi_main: _mm256_set1_epi32(q.max_main as i32),
                mi_out: _mm256_set1_epi32(q.max_out as i32),
                dither: _mm256_set1_ps(p.dither),
                stoch: p.key.is_some(),
                key: _mm256_set1_epi32(p.key.unwrap_or(0) as i32),
                base: _mm256_add_epi32(
                    _mm256_set1_epi32(first as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                ),
            }
        }
    }

    /// Codes of the eight values at `x[i..i + 8]`.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn step(c: &Consts, x: *const f32, i: usize) -> Step {
        let zero_i = _mm256_setzero_si256();
        let v = _mm256_loadu_ps(x.add(i));
        let vb = _mm256_castps_si256(v);
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let z = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(v, c.hi), c.lo), c.inv);
        let a = _mm256_and_ps(z, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)));
        let zero = _mm256_cmpeq_epi32(_mm256_slli_epi32(vb, 1), zero_i);
        let nonfin = _mm256_cmpeq_epi32(_mm256_and_si256(vb, exp), exp);
        let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, c.t_main));
        let is_out = _mm256_andnot_si256(zero, gt);
        let out_ps = _mm256_castsi256_ps(is_out);
        let d = _mm256_sub_ps(a, _mm256_and_ps(out_ps, c.t_main));
        let r = _mm256_blendv_ps(c.r_main, c.r_out, out_ps);
        let mx = _mm256_blendv_ps(c.mx_main, c.mx_out, out_ps);
        // minps returns its second operand when the first is NaN, as the scalar `<` select does.
        let s = _mm256_min_ps(_mm256_mul_ps(d, r), mx);
        let u = if c.stoch {
            crate::rng::uniform8(c.key, _mm256_add_epi32(c.base, _mm256_set1_epi32(i as i32)))
        } else {
            c.dither
        };
        let mag = _mm256_cvttps_epi32(_mm256_add_ps(s, u));
        let mag = _mm256_min_epi32(mag, _mm256_blendv_epi8(c.mi_main, c.mi_out, is_out));
        let zneg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_setzero_ps()));
        let nz = _mm256_or_si256(
            _mm256_xor_si256(_mm256_cmpeq_epi32(mag, zero_i), _mm256_set1_epi32(-1)),
            is_out,
        );
        let neg = _mm256_and_si256(_mm256_and_si256(zneg, nz), _mm256_set1_epi32(2));
        let code = _mm256_or_si256(
            _mm256_or_si256(_mm256_and_si256(is_out, _mm256_set1_epi32(1)), neg),
            _mm256_slli_epi32(mag, 2),
        );
        let code = _mm256_blendv_epi8(code, _mm256_set1_epi32(ZERO_CODE as i32), zero);
        let beyond = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, c.t_out));
        let beyond = _mm256_andnot_si256(_mm256_or_si256(nonfin, zero), beyond);
        Step {
            code,
            is_out,
            beyond,
            nonfin,
        }
    }

    /// Adds one step's lane masks to the counts (movemask + popcount: no vector registers held).
    /// Returns the outlier lane mask.
    #[target_feature(enable = "avx2,popcnt")]
    #[inline]
    fn tally(c: &mut Counts, s: &Step) -> usize {
        let m = |v: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(v)) as u32;
        let out = m(s.is_out);
        c.outliers += out.count_ones();
        c.beyond += m(s.beyond).count_ones();
        c.nonfinite += m(s.nonfin).count_ones();
        out as usize
    }

    /// For each 8-bit mask, the positions of its set bits, first to last, then zeros: the
    /// `vpermd` indices that move the selected lanes of a vector to its front.
    static COMPRESS8: [[u32; 8]; 256] = {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut j, mut k) = (0, 0);
            while j < 8 {
                if m >> j & 1 == 1 {
                    t[m][k] = j as u32;
                    k += 1;
                }
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// [`super::outside_f32`] for the first len/8*8 values, eight at a time without a branch per
    /// candidate: the indices of the lanes outside `[lo, hi]` (or NaN) moved to the front of a
    /// vector through [`COMPRESS8`], the whole vector stored, the length advanced by their
    /// count. Returns the number of values done.
    ///
    /// # Safety
    /// The CPU has AVX2 and POPCNT.
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn outside(x: &[f32], lo: f32, hi: f32, base: u32, out: &mut Vec<u32>) -> usize {
        let n8 = x.len() / 8 * 8;
        let (l, h) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let inside = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GE_OQ>(v, l),
                _mm256_cmp_ps::<_CMP_LE_OQ>(v, h),
            );
            let m = !_mm256_movemask_ps(inside) as usize & 0xff;
            if out.capacity() - out.len() < 8 {
                out.reserve(1024);
            }
            let at = _mm256_add_epi32(_mm256_set1_epi32(base.wrapping_add(i as u32) as i32), lanes);
            let len = out.len();
            // SAFETY: eight u32 in the table row; len + 8 <= capacity (reserved above), and
            // the first len + popcount(m) slots are written.
            unsafe {
                let perm = _mm256_loadu_si256(COMPRESS8[m].as_ptr() as *const __m256i);
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(len) as *mut __m256i,
                    _mm256_permutevar8x32_epi32(at, perm),
                );
                out.set_len(len + m.count_ones() as usize);
            }
            i += 8;
        }
        n8
    }

    /// Codes for the first len/8*8 values, stored as u16.
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn codes(x: &[f32], first: u32, p: &Prep, out: &mut [u16]) -> (usize, Counts) {
        let n8 = x.len().min(out.len()) / 8 * 8;
        let c = Consts::new(p, first);
        let mut t = Counts::default();
        let mut i = 0;
        while i < n8 {
            let s = step(&c, x.as_ptr(), i);
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(s.code, s.code));
            _mm_storeu_si128(
                out.as_mut_ptr().add(i) as *mut __m128i,
                _mm256_castsi256_si128(packed),
            );
            tally(&mut t, &s);
            i += 8;
        }
        (n8, t)
    }

    /// OR of the eight 32-bit lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn or_lanes32(v: __m256i) -> u32 {
        let o = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let o = _mm_or_si128(o, _mm_shuffle_epi32::<0b1110>(o));
        let o = _mm_or_si128(o, _mm_shuffle_epi32::<0b0001>(o));
        _mm_cvtsi128_si32(o) as u32
    }

    /// Codes and packing fused, for bits_main <= 8 and extra bits <= 4: the first len/8*8 values
    /// go to `primary` (bits_main bytes per eight values) and `extra`.
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn encode(
        x: &[f32],
        first: u32,
        p: &Prep,
        primary: &mut [u8],
        extra: &mut BitWriter,
    ) -> (usize, Counts) {
        let (bm, ew) = (p.q.bits_main, p.q.extra_bits());
        let n8 = x.len() / 8 * 8;
        assert!(bm <= 8 && ew <= 4 && primary.len() >= n8 / 8 * bm as usize);
        // Groups whose 8-byte store stays inside `primary`; the rest store bm bytes.
        let wide = (primary.len().saturating_sub(8) / bm as usize * 8).min(n8);
        let c = Consts::new(p, first);
        let mut t = Counts::default();
        let pmask = _mm256_set1_epi32(((1u32 << bm) - 1) as i32);
        let b = bm as i64;
        let sh_lo = _mm256_setr_epi64x(0, b, 2 * b, 3 * b);
        let sh_hi = _mm256_setr_epi64x(4 * b, 5 * b, 6 * b, 7 * b);
        let bm_x = _mm_cvtsi32_si128(bm as i32);
        let ew_v = _mm256_set1_epi32(ew as i32);
        let mut i = 0;
        let mut at = 0usize;
        while i < n8 {
            let s = step(&c, x.as_ptr(), i);
            let m = tally(&mut t, &s);
            let k = _mm256_and_si256(s.code, pmask);
            let lo4 = _mm256_sllv_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(k)), sh_lo);
            let hi4 = _mm256_sllv_epi64(
                _mm256_cvtepu32_epi64(_mm256_extracti128_si256::<1>(k)),
                sh_hi,
            );
            let o = _mm256_or_si256(lo4, hi4);
            let o = _mm_or_si128(_mm256_castsi256_si128(o), _mm256_extracti128_si256::<1>(o));
            let w = (_mm_cvtsi128_si64(o) | _mm_extract_epi64::<1>(o)) as u64;
            if i < wide {
                std::ptr::write_unaligned(primary.as_mut_ptr().add(at) as *mut u64, w.to_le());
            } else {
                primary[at..at + bm as usize].copy_from_slice(&w.to_le_bytes()[..bm as usize]);
            }
            at += bm as usize;
            if ew > 0 && m != 0 {
                let ranks =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(RANKS[m].as_ptr() as *const __m128i));
                let e = _mm256_srl_epi32(s.code, bm_x);
                let e = _mm256_sllv_epi32(e, _mm256_mullo_epi32(ranks, ew_v));
                extra.put(or_lanes32(e), ew * m.count_ones());
            }
            i += 8;
        }
        (n8, t)
    }

    /// Decodes the first len/8*8 values through an f32 table with gathers, for bits_main <= 8
    /// and extra bits <= 4. Returns (values decoded, extra bits consumed).
    #[target_feature(enable = "avx2")]
    pub unsafe fn unpack_f32(
        primary: &[u8],
        extra: &[u8],
        bm: u32,
        ew: u32,
        lut: &[f32],
        out: &mut [f32],
    ) -> (usize, usize) {
        let dst = out.as_mut_ptr();
        gather_groups(primary, extra, bm, ew, lut, out.len(), |i, v| {
            _mm256_storeu_ps(dst.add(i), v)
        })
    }

    /// As [`unpack_f32`] into 16-bit floats: the table holds values exactly representable in
    /// the output type, so narrowing is exact (bfloat16: the high half; float16: F16C).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn unpack_16(
        primary: &[u8],
        extra: &[u8],
        bm: u32,
        ew: u32,
        lut: &[f32],
        out: &mut [u16],
        bfloat: bool,
    ) -> (usize, usize) {
        let dst = out.as_mut_ptr();
        gather_groups(primary, extra, bm, ew, lut, out.len(), |i, v| {
            let h = if bfloat {
                let w = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
                let p = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(w, w));
                _mm256_castsi256_si128(p)
            } else {
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
            };
            _mm_storeu_si128(dst.add(i) as *mut __m128i, h)
        })
    }

    /// The shared loop: eight codes per step through `lut`, handed to `store(index, values)`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn gather_groups(
        primary: &[u8],
        extra: &[u8],
        bm: u32,
        ew: u32,
        lut: &[f32],
        len: usize,
        mut store: impl FnMut(usize, __m256),
    ) -> (usize, usize) {
        assert!(bm <= 8 && ew <= 4 && lut.len() >= 1 << (bm + ew));
        let n8 = len / 8 * 8;
        let pmask = _mm256_set1_epi64x(((1u64 << bm) - 1) as i64);
        let b = bm as i64;
        let sh_lo = _mm256_setr_epi64x(0, b, 2 * b, 3 * b);
        let sh_hi = _mm256_setr_epi64x(4 * b, 5 * b, 6 * b, 7 * b);
        let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let one = _mm256_set1_epi32(1);
        let emask = _mm256_set1_epi32(((1u32 << ew) - 1) as i32);
        let ew_v = _mm256_set1_epi32(ew as i32);
        let bm_x = _mm_cvtsi32_si128(bm as i32);
        let mut xpos = 0usize;
        let mut i = 0;
        while i < n8 {
            let w = _mm256_set1_epi64x(peek64(primary, i * bm as usize) as i64);
            let lo4 = _mm256_and_si256(_mm256_srlv_epi64(w, sh_lo), pmask);
            let hi4 = _mm256_and_si256(_mm256_srlv_epi64(w, sh_hi), pmask);
            // lanes (k0, k4, k1, k5, ...) -> (k0, k1, ..., k7)
            let k = _mm256_permutevar8x32_epi32(
                _mm256_or_si256(lo4, _mm256_slli_epi64(hi4, 32)),
                order,
            );
            let f = _mm256_cmpeq_epi32(_mm256_and_si256(k, one), one);
            let m = _mm256_movemask_ps(_mm256_castsi256_ps(f)) as usize;
            let idx = if m != 0 && ew > 0 {
                let xv = _mm256_set1_epi32(peek64(extra, xpos) as u32 as i32);
                let ranks =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(RANKS[m].as_ptr() as *const __m128i));
                let e = _mm256_srlv_epi32(xv, _mm256_mullo_epi32(ranks, ew_v));
                let e = _mm256_and_si256(_mm256_and_si256(e, emask), f);
                xpos += (ew * m.count_ones()) as usize;
                _mm256_or_si256(k, _mm256_sll_epi32(e, bm_x))
            } else {
                k
            };
            store(i, _mm256_i32gather_ps::<4>(lut.as_ptr(), idx));
            i += 8;
        }
        (n8, xpos)
    }
}

/// Element types SmaQ encodes, each with its fastest code path.
pub trait Codes: Element {
    /// Codes packed in one pass, where a fused kernel exists (see [`encode_f32_fused`]), with
    /// the candidates outside `bounds` (see [`outside`]) collected into `cands` on the way.
    fn encode_fused(
        _x: &[Self],
        _p: &Prep,
        _primary: &mut [u8],
        _extra: &mut BitWriter,
        _bounds: (f64, f64),
        _cands: &mut Vec<u32>,
        _moments: Option<&mut FusedMoments>,
    ) -> Option<Counts> {
        None
    }

    /// Codes of one chunk into `out` (same length).
    fn codes(x: &[Self], p: &Prep, out: &mut [u16]) -> Counts {
        codes_with(x, 0, p, z_f64::<Self>(p.mean, p.inv_std), out)
    }

    /// See [`outside`].
    fn outside(x: &[Self], lo: f64, hi: f64, out: &mut Vec<u32>) {
        for (i, &v) in x.iter().enumerate() {
            let f = v.to_f64();
            if !(f >= lo && f <= hi) {
                out.push(i as u32);
            }
        }
    }
}

impl Codes for f64 {}

impl Codes for f32 {
    fn encode_fused(
        x: &[f32],
        p: &Prep,
        primary: &mut [u8],
        extra: &mut BitWriter,
        bounds: (f64, f64),
        cands: &mut Vec<u32>,
        moments: Option<&mut FusedMoments>,
    ) -> Option<Counts> {
        let mut c = Candidates::new(bounds.0, bounds.1, cands);
        c.moments = moments;
        encode_f32_fused(x, 0, p, primary, extra, &mut c)
    }
    fn codes(x: &[f32], p: &Prep, out: &mut [u16]) -> Counts {
        if p.f32_ok {
            codes_f32(x, 0, p, out)
        } else {
            codes_with(x, 0, p, z_f64::<f32>(p.mean, p.inv_std), out)
        }
    }
    fn outside(x: &[f32], lo: f64, hi: f64, out: &mut Vec<u32>) {
        let (l, h) = bounds_f32(lo, hi);
        outside_f32(x, l, h, 0, out)
    }
}

macro_rules! half_codes {
    ($t:ty) => {
        impl Codes for $t {
            fn encode_fused(
                x: &[$t],
                p: &Prep,
                primary: &mut [u8],
                extra: &mut BitWriter,
                bounds: (f64, f64),
                cands: &mut Vec<u32>,
                moments: Option<&mut FusedMoments>,
            ) -> Option<Counts> {
                let isa = Isa::detect();
                if !fused_applies(isa, p) {
                    return None;
                }
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx512 {
                    // The AVX-512 kernel reads the half values itself (and gathers the
                    // moments); the last < 64 values are widened and take the f32 path.
                    let mut found = Candidates::new(bounds.0, bounds.1, cands);
                    found.moments = moments;
                    // SAFETY: the CPU has every extension the AVX-512 kernel uses.
                    let (done, mut c) =
                        unsafe { avx512::encode(x, 0, p, primary, extra, &mut found) };
                    found.moments = None;
                    let rest = &x[done..];
                    let mut buf = [0f32; 64];
                    let w = &mut buf[..rest.len()];
                    <$t as crate::simd::Widen>::widen(rest, w);
                    let bm = p.q.bits_main as usize;
                    c.add(encode_f32_fused(
                        w,
                        done as u32,
                        p,
                        &mut primary[done / 8 * bm..],
                        extra,
                        &mut found,
                    )?);
                    return Some(c);
                }
                // Widen a block at a time (exact); blocks are multiples of 8 values, so each
                // block's primary stream starts on a byte.
                const B: usize = 1024;
                let bm = p.q.bits_main as usize;
                let mut buf = [0f32; B];
                let mut c = Counts::default();
                // Widening is exact, so the f32 bounds are as good as the element type's.
                let mut found = Candidates::new(bounds.0, bounds.1, cands);
                for (bi, xs) in x.chunks(B).enumerate() {
                    let w = &mut buf[..xs.len()];
                    <$t as crate::simd::Widen>::widen(xs, w);
                    let start = bi * B * bm / 8;
                    let end = start + (xs.len() * bm).div_ceil(8);
                    let first = (bi * B) as u32;
                    c.add(encode_f32_fused(
                        w,
                        first,
                        p,
                        &mut primary[start..end],
                        extra,
                        &mut found,
                    )?);
                }
                Some(c)
            }

            fn codes(x: &[$t], p: &Prep, out: &mut [u16]) -> Counts {
                if !p.f32_ok {
                    return codes_with(x, 0, p, z_f64::<$t>(p.mean, p.inv_std), out);
                }
                // Widen a block at a time (exact), then run the f32 kernel.
                const B: usize = 1024;
                let mut buf = [0f32; B];
                let mut c = Counts::default();
                for (bi, (xs, os)) in x.chunks(B).zip(out.chunks_mut(B)).enumerate() {
                    let w = &mut buf[..xs.len()];
                    <$t as crate::simd::Widen>::widen(xs, w);
                    c.add(codes_f32(w, (bi * B) as u32, p, os));
                }
                c
            }

            fn outside(x: &[$t], lo: f64, hi: f64, out: &mut Vec<u32>) {
                // Widening is exact, so the f32 bounds are as good as the element type's.
                const B: usize = 1024;
                let (l, h) = bounds_f32(lo, hi);
                let mut buf = [0f32; B];
                for (bi, xs) in x.chunks(B).enumerate() {
                    let w = &mut buf[..xs.len()];
                    <$t as crate::simd::Widen>::widen(xs, w);
                    outside_f32(w, l, h, (bi * B) as u32, out);
                }
            }
        }
    };
}
half_codes!(f16);
half_codes!(bf16);

/// Appends to `out` the index of every element of `x` outside `[lo, hi]` or NaN: the candidates
/// for the exception list and the escape stream, which are then checked exactly. Bounds are
/// widened to the element type conservatively, so no value outside the f64 interval is missed.
pub fn outside<T: Codes>(x: &[T], lo: f64, hi: f64, out: &mut Vec<u32>) {
    T::outside(x, lo, hi, out)
}

/// `[lo, hi]` rounded inward to f32 (the smallest f32 >= lo, the largest <= hi): for an f32 `v`,
/// `l <= v <= h` holds exactly when `lo <= v <= hi` does.
fn bounds_f32(lo: f64, hi: f64) -> (f32, f32) {
    let down = |v: f64| {
        let f = v as f32;
        if (f as f64) > v {
            f.next_down()
        } else {
            f
        }
    };
    let up = |v: f64| {
        let f = v as f32;
        if (f as f64) < v {
            f.next_up()
        } else {
            f
        }
    };
    // v < lo (f64) implies v < up(lo) in f32; v > hi implies v > down(hi).
    (up(lo), down(hi))
}

/// [`outside`] for f32, `base` added to every index.
fn outside_f32(x: &[f32], lo: f32, hi: f32, base: u32, out: &mut Vec<u32>) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        done = unsafe { avx512::outside(x, lo, hi, base, out) };
    } else if crate::simd::avx2() {
        // SAFETY: the CPU has AVX2 and POPCNT (checked just above).
        done = unsafe { avx2::outside(x, lo, hi, base, out) };
    }
    // Blocks of 16: one branch-free test per block, a scan only where something lies outside.
    let rest = &x[done..];
    let inside = |v: f32| v >= lo && v <= hi;
    for (b, blk) in rest.chunks(16).enumerate() {
        if blk.iter().fold(true, |acc, &v| acc & inside(v)) {
            continue;
        }
        let at = base + (done + b * 16) as u32;
        for (j, &v) in blk.iter().enumerate() {
            if !inside(v) {
                out.push(at + j as u32);
            }
        }
    }
}

/// Packs codes: the primary stream into `primary` (exactly ceil(len * bits_main / 8) bytes), the
/// outliers' extra bits appended to `extra`.
pub fn pack(codes: &[u16], q: &Quant, primary: &mut [u8], extra: &mut BitWriter) {
    let bm = q.bits_main;
    let pmask = (1u64 << bm) - 1;
    let groups = if bm <= 8 && q.extra_bits() <= 7 {
        codes.len() / 8
    } else {
        0
    };
    // Eight codes fill exactly `bm` primary bytes and at most 56 extra bits.
    for (g, c) in codes[..groups * 8].chunks_exact(8).enumerate() {
        let (mut w, mut xw, mut xn) = (0u64, 0u64, 0u32);
        for (j, &code) in c.iter().enumerate() {
            let code = code as u64;
            w |= (code & pmask) << (j as u32 * bm);
            // Main codes have no bits above bits_main: they add nothing.
            xw |= (code >> bm) << xn;
            xn += q.extra_bits() * (code & 1) as u32;
        }
        let at = g * bm as usize;
        primary[at..at + bm as usize].copy_from_slice(&w.to_le_bytes()[..bm as usize]);
        extra.put_wide(xw, xn);
    }
    pack_tail(
        &codes[groups * 8..],
        q,
        &mut primary[groups * bm as usize..],
        extra,
    );
}

/// Packs codes one at a time (any widths): primary bits into `primary`, extra bits to `extra`.
fn pack_tail(codes: &[u16], q: &Quant, primary: &mut [u8], extra: &mut BitWriter) {
    let (bm, ew) = (q.bits_main, q.extra_bits());
    let mut t = BitWriter::with_capacity_bits(codes.len() * bm as usize);
    for &code in codes {
        let code = code as u32;
        t.put(code & ((1 << bm) - 1), bm);
        let f = code & 1;
        extra.put((code >> bm) * f, ew * f);
    }
    let bytes = t.finish();
    primary[..bytes.len()].copy_from_slice(&bytes);
}

/// Decodes one chunk's primary and extra streams through `lut` (indexed by the full code).
/// Returns the number of extra bits consumed, which the caller checks against the index.
/// `stream`: write the output with non-temporal stores where the kernel can (a tensor larger
/// than the caches, [`crate::simd::stream_output`]); the values are the same either way.
pub fn unpack<T: Copy + 'static>(
    primary: &[u8],
    extra: &[u8],
    q: &Quant,
    lut: &[T],
    out: &mut [T],
    stream: bool,
) -> u64 {
    unpack_with(Isa::detect(), primary, extra, q, lut, out, stream)
}

/// [`unpack`] at a given level (at most [`Isa::detect`]).
fn unpack_with<T: Copy + 'static>(
    isa: Isa,
    primary: &[u8],
    extra: &[u8],
    q: &Quant,
    lut: &[T],
    out: &mut [T],
    stream: bool,
) -> u64 {
    let (bm, ew) = (q.bits_main, q.extra_bits());
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        if let Some(xpos) = unpack_avx512(primary, extra, q, lut, out, stream) {
            return xpos;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        if let Some(xpos) = unpack_16_simd(primary, extra, q, lut, out) {
            return xpos;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2
        && bm <= 8
        && ew <= 4
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
    {
        // SAFETY: T is f32 (checked), so these are f32 slices; AVX2 is present (isa).
        let (lut32, out32) = unsafe {
            (
                std::slice::from_raw_parts(lut.as_ptr() as *const f32, lut.len()),
                std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()),
            )
        };
        // SAFETY: AVX2 is present (isa >= Avx2 comes from Isa::detect).
        let (done, xpos) = unsafe { avx2::unpack_f32(primary, extra, bm, ew, lut32, out32) };
        return unpack_portable(primary, extra, q, lut, out, done, xpos);
    }
    let _ = isa;
    unpack_portable(primary, extra, q, lut, out, 0, 0)
}

/// The AVX-512 decode, when it applies (full codes of at most 8 bits; 16- or 32-bit plain
/// elements: f32, u32, f16, bf16). The caller has checked that the CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
fn unpack_avx512<T: Copy + 'static>(
    primary: &[u8],
    extra: &[u8],
    q: &Quant,
    lut: &[T],
    out: &mut [T],
    stream: bool,
) -> Option<u64> {
    use std::any::TypeId;
    let (bm, ew) = (q.bits_main, q.extra_bits());
    let t = TypeId::of::<T>();
    let plain = [
        TypeId::of::<f32>(),
        TypeId::of::<u32>(),
        TypeId::of::<f16>(),
        TypeId::of::<bf16>(),
    ];
    if bm + ew > 8 || lut.len() != 1 << (bm + ew) || !plain.contains(&t) {
        return None;
    }
    let size = std::mem::size_of::<T>();
    // SAFETY: T is one of f32, u32, f16, bf16 (checked): plain values without padding, any bit
    // pattern valid, so both slices may be viewed as their bytes.
    let (lut8, out8) = unsafe {
        (
            std::slice::from_raw_parts(lut.as_ptr() as *const u8, std::mem::size_of_val(lut)),
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, std::mem::size_of_val(out)),
        )
    };
    // SAFETY: the CPU has the AVX-512 extensions (the caller's isa comes from Isa::detect).
    let (done, xpos) = unsafe { avx512::unpack(primary, extra, bm, ew, lut8, out8, size, stream) };
    Some(unpack_portable(primary, extra, q, lut, out, done, xpos))
}

/// The float16/bfloat16 SIMD decode, when it applies (AVX2 + F16C, narrow codes).
#[cfg(target_arch = "x86_64")]
fn unpack_16_simd<T: Copy + 'static>(
    primary: &[u8],
    extra: &[u8],
    q: &Quant,
    lut: &[T],
    out: &mut [T],
) -> Option<u64> {
    use std::any::TypeId;
    let (bm, ew) = (q.bits_main, q.extra_bits());
    let bfloat = TypeId::of::<T>() == TypeId::of::<bf16>();
    if !(bfloat || TypeId::of::<T>() == TypeId::of::<f16>())
        || !(bm <= 8 && ew <= 4 && crate::simd::avx2())
    {
        return None;
    }
    // SAFETY: T is f16 or bf16 (checked), both plain 16-bit values.
    let (bits, out16) = unsafe {
        (
            std::slice::from_raw_parts(lut.as_ptr() as *const u16, lut.len()),
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u16, out.len()),
        )
    };
    let lut32: Vec<f32> = if bfloat {
        bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
    } else {
        bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect()
    };
    // SAFETY: AVX2 (the caller's isa) and F16C (checked above: part of the AVX2 level) are
    // present.
    let (done, xpos) = unsafe { avx2::unpack_16(primary, extra, bm, ew, &lut32, out16, bfloat) };
    Some(unpack_portable(primary, extra, q, lut, out, done, xpos))
}

/// Portable decoding of `out[start..]` (`start` a multiple of 8), the extra stream being at bit
/// `xpos`. Returns the extra stream position at the end.
fn unpack_portable<T: Copy>(
    primary: &[u8],
    extra: &[u8],
    q: &Quant,
    lut: &[T],
    out: &mut [T],
    start: usize,
    mut xpos: usize,
) -> u64 {
    debug_assert_eq!(start % 8, 0);
    let (bm, ew) = (q.bits_main as usize, q.extra_bits() as usize);
    let pmask = (1u64 << bm) - 1;
    let emask = (1u64 << ew) - 1;
    let lmask = lut.len() - 1;
    let key = |k: u64, e: u64| (k | e << bm) as usize & lmask;
    let out = &mut out[start..];
    let base = out.len() / 8 * 8;
    let mut groups = out.chunks_exact_mut(8);
    for (g, dst) in (&mut groups).enumerate() {
        let at = (start + g * 8) * bm;
        if bm <= 8 && ew <= 7 {
            // One load per stream per group: 8 primary codes, and at most 56 extra bits.
            let w = peek64(primary, at);
            let mut x = peek64(extra, xpos);
            for (j, o) in dst.iter_mut().enumerate() {
                let k = (w >> (j * bm)) & pmask;
                let f = k & 1;
                let e = x & emask & f.wrapping_neg();
                x >>= ew as u64 * f;
                xpos += ew * f as usize;
                *o = lut[key(k, e)];
            }
        } else {
            for (j, o) in dst.iter_mut().enumerate() {
                let k = peek64(primary, at + j * bm) & pmask;
                let f = k & 1;
                let e = peek64(extra, xpos) & emask & f.wrapping_neg();
                xpos += ew * f as usize;
                *o = lut[key(k, e)];
            }
        }
    }
    for (j, o) in groups.into_remainder().iter_mut().enumerate() {
        let k = peek64(primary, (start + base + j) * bm) & pmask;
        let f = k & 1;
        let e = peek64(extra, xpos) & emask & f.wrapping_neg();
        xpos += ew * f as usize;
        *o = lut[key(k, e)];
    }
    xpos as u64
}

/// The decode table: value of every full code (2^bits_outlier entries), clamped to the dtype's
/// finite range and, with `all_positive`, at 0.
pub fn table<T: Element>(q: &Quant, mean: f64, std: f64, all_positive: bool) -> Vec<T> {
    let floor = if all_positive { 0.0 } else { -T::MAX_F64 };
    (0..1u32 << q.bits_outlier)
        .map(|key| match q.z_of(key) {
            None => T::from_f64(0.0),
            Some(z) => T::from_f64((mean + z * std).clamp(floor, T::MAX_F64)),
        })
        .collect()
}

/// [`table`] for the log domain: each code's value is `exp(mean + z * std)`, the exact-zero
/// code 0.
pub fn table_log<T: Element>(q: &Quant, mean: f64, std: f64) -> Vec<T> {
    (0..1u32 << q.bits_outlier)
        .map(|key| match q.z_of(key) {
            None => T::from_f64(0.0),
            Some(z) => T::from_f64((mean + z * std).exp().min(T::MAX_F64)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Primary stream then extra stream of one chunk, as bytes.
    fn pack_chunk(codes: &[u16], q: &Quant) -> Vec<u8> {
        let mut primary = vec![0u8; q.chunk_bytes(codes.len() as u64, 0).0 as usize];
        let mut extra = BitWriter::default();
        pack(codes, q, &mut primary, &mut extra);
        primary.extend_from_slice(&extra.finish());
        primary
    }

    fn prep(q: Quant, key: Option<u32>) -> Prep {
        Prep {
            q,
            mean: 0.25,
            inv_std: 1.0 / 1.5,
            key,
            dither: 0.5,
            f32_ok: true,
        }
    }

    #[test]
    fn outside_finds_exactly_the_values_beyond_the_bounds() {
        let mut x: Vec<f32> = (0..10_007)
            .map(|i| ((i * 7919) % 2001) as f32 * 0.01 - 10.0)
            .collect();
        x[3] = f32::NAN;
        x[4000] = f32::INFINITY;
        x[9000] = f32::NEG_INFINITY;
        // Bounds that are not f32 values: the f32 just inside must not be reported.
        let (lo, hi) = (-7.123_456_789_012_f64, 6.543_210_987_654_f64);
        x[17] = (lo as f32).next_up();
        x[18] = (hi as f32).next_down();
        let want: Vec<u32> = x
            .iter()
            .enumerate()
            .filter(|(_, &v)| !(v as f64 >= lo && v as f64 <= hi))
            .map(|(i, _)| i as u32)
            .collect();
        let mut got = Vec::new();
        outside(&x, lo, hi, &mut got);
        // For f32 values, v >= up(lo) is exactly v >= lo: the f32 test is exact.
        let (l, h) = bounds_f32(lo, hi);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2() {
            // The AVX2 scan on its own (the AVX-512 one runs above where the CPU has it),
            // from an offset index and into a vector that already holds something.
            let mut v2 = vec![7u32];
            // SAFETY: AVX2 and POPCNT are present (checked just above).
            let done = unsafe { avx2::outside(&x, l, h, 100, &mut v2) };
            assert_eq!(done, x.len() / 8 * 8);
            let want2: Vec<u32> = [7]
                .into_iter()
                .chain(
                    want.iter()
                        .filter(|&&i| (i as usize) < done)
                        .map(|i| i + 100),
                )
                .collect();
            assert_eq!(v2, want2);
        }
        assert!(x[17] >= l && x[18] <= h);
        assert_eq!(got, want);
        let mut portable = Vec::new();
        <f64 as Codes>::outside(
            &x.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            lo,
            hi,
            &mut portable,
        );
        assert_eq!(portable, want);
        let halves: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let mut got16 = Vec::new();
        outside(&halves, lo, hi, &mut got16);
        let want16: Vec<u32> = halves
            .iter()
            .enumerate()
            .filter(|(_, v)| !(v.to_f64() >= lo && v.to_f64() <= hi))
            .map(|(i, _)| i as u32)
            .collect();
        assert_eq!(got16, want16);
    }

    #[test]
    fn simd_and_portable_codes_are_identical() {
        let q = Quant::new(6, 8, 1.0, 2.5);
        let mut x: Vec<f32> = (0..10_007)
            .map(|i| ((i * 7919) % 2001) as f32 * 0.004 - 4.0)
            .collect();
        x[3] = f32::NAN;
        x[9] = f32::INFINITY;
        x[10] = 0.0;
        x[11] = -0.0;
        x[12] = 1e30;
        for key in [None, Some(17)] {
            for dither in [0.0, 0.5] {
                let p = Prep {
                    dither,
                    ..prep(q, key)
                };
                let (mut a, mut b) = (vec![0u16; x.len()], vec![0u16; x.len()]);
                let ca = codes_f32(&x, 5, &p, &mut a);
                let cb = codes_with(&x, 5, &p, z_f32(p.mean, p.inv_std), &mut b);
                assert_eq!(ca, cb);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn f32_and_f64_z_paths_agree() {
        let q = Quant::new(6, 8, 1.0, 2.5);
        let x: Vec<f32> = (0..10_000)
            .map(|i| ((i * 7919) % 2001) as f32 * 0.004 - 4.0)
            .collect();
        for key in [None, Some(17)] {
            let p = prep(q, key);
            let (mut a, mut b) = (vec![0u16; x.len()], vec![0u16; x.len()]);
            let ca = codes_f32(&x, 0, &p, &mut a);
            let cb = codes_with(&x, 0, &p, z_f64::<f32>(p.mean, p.inv_std), &mut b);
            let differ = a.iter().zip(&b).filter(|(u, v)| u != v).count();
            // The two z computations may differ in the last bit, which moves a rounding
            // boundary for a handful of values at most.
            assert!(differ <= 5, "{differ} codes differ");
            assert!((ca.outliers as i64 - cb.outliers as i64).abs() <= 5);
        }
    }

    #[test]
    fn pack_unpack_every_width() {
        for bm in 3..=16u8 {
            for bo in [bm, (bm + 1).min(16), 8.max(bm), 16] {
                let q = Quant::new(bm, bo, 1.0, 3.0);
                let z: Vec<f32> = (0..1003)
                    .map(|i| ((i * 37) % 601) as f32 / 100.0 - 3.0)
                    .collect();
                let p = Prep {
                    q,
                    mean: 0.0,
                    inv_std: 1.0,
                    key: None,
                    dither: 0.5,
                    f32_ok: true,
                };
                let mut codes = vec![0u16; z.len()];
                let c = codes_f32(&z, 0, &p, &mut codes);
                let bytes = pack_chunk(&codes, &q);
                let (pb, eb) = q.chunk_bytes(z.len() as u64, c.outliers as u64);
                assert_eq!(bytes.len() as u64, pb + eb);
                let keys: Vec<u32> = (0..1u32 << bo).collect();
                let mut back = vec![0u32; z.len()];
                let used = unpack(
                    &bytes[..pb as usize],
                    &bytes[pb as usize..],
                    &q,
                    &keys,
                    &mut back,
                    false,
                );
                assert_eq!(used, c.outliers as u64 * q.extra_bits() as u64);
                for (a, b) in codes.iter().zip(&back) {
                    assert_eq!(*a as u32, *b, "bm={bm} bo={bo}");
                }
            }
        }
    }

    /// Values that exercise every lane class: main, outlier, beyond t_outlier, exact zeros of
    /// both signs, NaN, +-Inf, and values on the rounding and threshold boundaries.
    fn mixed_values(n: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 * 0.004 - 4.0)
            .collect();
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e30,
            -1e30,
            0.25 + 1.5, // z = t_main exactly
            0.25 - 1.5,
            0.25 + 3.75, // z = t_outlier exactly
            0.25,        // z = 0
            f32::MIN_POSITIVE,
        ];
        for (j, &v) in specials.iter().enumerate() {
            for at in [3 + j, 64 + 5 * j, 1000 + 7 * j, n - 1 - j] {
                if at < n {
                    x[at] = v;
                }
            }
        }
        x
    }

    #[test]
    fn fused_encode_and_simd_decode_match_portable() {
        // Lengths around the 64-value AVX-512 step and the 8-value AVX2 step.
        for n in [10_005usize, 4096, 64, 65, 127, 128 + 8 + 3, 7, 0] {
            let x = mixed_values(n);
            for (bm, bo) in [
                (6u8, 8u8),
                (4, 8),
                (8, 8),
                (3, 5),
                (5, 9),
                (3, 3),
                (8, 12),
                (7, 8),
                (5, 8),
                (4, 5),
                (6, 10),
                (4, 4),
            ] {
                let q = Quant::new(bm, bo, 1.0, 2.5);
                for key in [None, Some(99)] {
                    for dither in [0.0, 0.5] {
                        let p = Prep {
                            dither,
                            ..prep(q, key)
                        };
                        // From a multiple of 32 (the AVX-512 loop's pairs of values sharing
                        // a hash) and from elsewhere (stochastic rounding then skips it).
                        for first in [12_352, 12_345] {
                            check_fused_and_unpack(&x, &p, first);
                        }
                    }
                }
            }
        }
    }

    /// Every SIMD level's fused encode and decode of `x` against portable codes and decoding.
    fn check_fused_and_unpack(x: &[f32], p: &Prep, first: u32) {
        let q = p.q;
        let mut codes = vec![0u16; x.len()];
        let c = codes_with(x, first, p, z_f32(p.mean, p.inv_std), &mut codes);
        let bytes = pack_chunk(&codes, &q);
        let pb = q.chunk_bytes(x.len() as u64, 0).0 as usize;
        let tag = format!("bm={} bo={} n={}", q.bits_main, q.bits_outlier, x.len());
        for isa in Isa::all_available() {
            let mut primary = vec![0u8; pb];
            let mut extra = BitWriter::default();
            // Pending bits in the extra stream before the chunk: appended after them.
            extra.put(0b101, 3);
            // Candidates against bounds that leave some values out, found on the way: exactly
            // what the separate scan finds.
            let (lo, hi) = (p.mean - 1.7 / p.inv_std, p.mean + 2.1 / p.inv_std);
            let (mut found, mut scanned) = (Vec::new(), Vec::new());
            let mut cands = Candidates::new(lo, hi, &mut found);
            if let Some(cf) =
                encode_f32_fused_with(isa, x, first, p, &mut primary, &mut extra, &mut cands)
            {
                outside(x, lo, hi, &mut scanned);
                for i in &mut scanned {
                    *i += first;
                }
                assert_eq!(found, scanned, "{isa:?} {tag}");
                assert_eq!(cf, c, "{isa:?} {tag}");
                let mut want = BitWriter::default();
                want.put(0b101, 3);
                pack(&codes, &q, &mut vec![0u8; pb], &mut want);
                assert_eq!(extra.finish(), want.finish(), "{isa:?} {tag}");
                assert_eq!(primary, bytes[..pb], "{isa:?} {tag}");
            }
        }
        let lut = table::<f32>(&q, p.mean, 1.0 / p.inv_std, false);
        let (prim, extra) = bytes.split_at(pb);
        let mut b = vec![0f32; x.len()];
        let ub = unpack_portable(prim, extra, &q, &lut, &mut b, 0, 0);
        assert_eq!(ub, c.outliers as u64 * q.extra_bits() as u64);
        let keys: Vec<u32> = (0..1u32 << q.bits_outlier).collect();
        for isa in Isa::all_available() {
            // Non-temporal stores, at every alignment of the output (in 4-byte steps), give
            // the same values and touch nothing outside the output.
            for (stream, off) in [(false, 0), (true, 0), (true, 1), (true, 4), (true, 15)] {
                let mut buf = vec![-7f32; x.len() + 32];
                let a = &mut buf[off..off + x.len()];
                let ua = unpack_with(isa, prim, extra, &q, &lut, a, stream);
                assert_eq!(ua, ub, "{isa:?} {tag}");
                assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{isa:?} {tag} stream={stream} off={off}"
                );
                assert!(buf[..off]
                    .iter()
                    .chain(&buf[off + x.len()..])
                    .all(|&v| v == -7.0));
            }
            // The codes themselves, through an identity table.
            let mut k = vec![0u32; x.len()];
            unpack_with(isa, prim, extra, &q, &keys, &mut k, false);
            assert!(
                codes.iter().zip(&k).all(|(&u, &v)| u as u32 == v),
                "{isa:?} {tag}"
            );
        }
    }

    #[test]
    fn simd_decode_reads_only_its_streams() {
        // Outliers flagged in the primary stream with the extra stream cut short: every level
        // reads the missing bits as zero and reports the same position (the caller rejects it).
        let q = Quant::new(6, 8, 1.0, 2.5);
        let x = mixed_values(1000);
        let p = prep(q, Some(3));
        let mut codes = vec![0u16; x.len()];
        codes_f32(&x, 0, &p, &mut codes);
        let bytes = pack_chunk(&codes, &q);
        let pb = q.chunk_bytes(x.len() as u64, 0).0 as usize;
        let lut = table::<f32>(&q, p.mean, 1.0 / p.inv_std, false);
        for cut in [0usize, 1, 17, 40] {
            let extra = &bytes[pb..pb + cut];
            let mut want = vec![0f32; x.len()];
            let uw = unpack_portable(&bytes[..pb], extra, &q, &lut, &mut want, 0, 0);
            for isa in Isa::all_available() {
                let mut got = vec![0f32; x.len()];
                let ug = unpack_with(isa, &bytes[..pb], extra, &q, &lut, &mut got, true);
                assert_eq!(ug, uw);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// The moments the fused encode (float32, bfloat16, float16) gathers as it codes are the
    /// very bits of `PieceStats::moments` over the chunk: whole blocks, a tail, blocks holding
    /// NaN, infinities and values whose square is beyond f32; and the codes are those of an
    /// encode that was not asked for them.
    #[test]
    fn fused_moments_are_the_moments() {
        let q = Quant::new(6, 8, 1.0, 2.5);
        for n in [64usize, 1000, 1024, 5000, 65_553] {
            let mut x = crate::stats::tests::specials(n, n as u64);
            for (k, v) in x.iter_mut().enumerate() {
                // Two blocks in three for the fast path, the others with NaN and infinities.
                *v = match v.is_finite() {
                    true => v.clamp(-1e3, 1e3),
                    false if (k / 1024) % 3 != 0 => 0.5,
                    false => *v,
                };
            }
            if n > 60_000 {
                x[2500] = 3e20; // a square beyond f32 in a finite block (it swamps the sums)
            }
            let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            fused_moments_of(&x, q);
            fused_moments_of(&b, q);
            fused_moments_of(&h, q);
        }
    }

    /// One element type of the test above.
    fn fused_moments_of<T: Codes>(x: &[T], q: Quant) {
        let (n, p, bounds) = (x.len(), prep(q, Some(9)), (-1e3, 1e3));
        let encode = |mom: Option<&mut FusedMoments>| {
            let mut primary = vec![0u8; q.chunk_bytes(n as u64, 0).0 as usize];
            let (mut extra, mut found) = (BitWriter::default(), Vec::new());
            let c = T::encode_fused(x, &p, &mut primary, &mut extra, bounds, &mut found, mom);
            (c, primary, extra.finish(), found)
        };
        let mut fm = FusedMoments::new(0.3);
        let with = encode(Some(&mut fm));
        assert_eq!(with, encode(None), "{:?} n = {n}", T::DTYPE);
        if Isa::detect() >= Isa::Avx512 {
            let got = fm.got.expect("the AVX-512 kernel gathers the moments");
            let want = PieceStats::moments(x, 0.3);
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "{:?} n = {n}",
                T::DTYPE
            );
        }
    }

    #[test]
    fn half_fused_matches_codes_and_pack() {
        let q = Quant::new(6, 8, 1.0, 2.5);
        for n in [5003usize, 1024, 1024 + 64 + 9, 63] {
            let x32 = mixed_values(n);
            for key in [Some(5), None] {
                let p = prep(q, key);
                check_half_fused::<bf16>(&x32, &p);
                check_half_fused::<f16>(&x32, &p);
            }
        }
    }

    fn check_half_fused<T: Codes + HalfFloat>(x32: &[f32], p: &Prep) {
        let x: Vec<T> = x32.iter().map(|&v| T::from_f32(v)).collect();
        let q = p.q;
        let mut codes = vec![0u16; x.len()];
        let c = T::codes(&x, p, &mut codes);
        let bytes = pack_chunk(&codes, &q);
        let mut primary = vec![0u8; q.chunk_bytes(x.len() as u64, 0).0 as usize];
        let mut extra = BitWriter::default();
        let bounds = (p.mean - 1.9 / p.inv_std, p.mean + 2.2 / p.inv_std);
        let (mut found, mut scanned) = (Vec::new(), Vec::new());
        let cf = T::encode_fused(&x, p, &mut primary, &mut extra, bounds, &mut found, None);
        assert_eq!(cf.is_some(), Isa::detect() >= Isa::Avx2);
        if let Some(cf) = cf {
            outside(&x, bounds.0, bounds.1, &mut scanned);
            assert_eq!(found, scanned);
            assert_eq!(cf, c);
            primary.extend_from_slice(&extra.finish());
            assert_eq!(primary, bytes);
        }
    }

    /// float16 and bfloat16 from f32 (the test's element types).
    trait HalfFloat {
        fn from_f32(v: f32) -> Self;
    }
    impl HalfFloat for f16 {
        fn from_f32(v: f32) -> Self {
            f16::from_f32(v)
        }
    }
    impl HalfFloat for bf16 {
        fn from_f32(v: f32) -> Self {
            bf16::from_f32(v)
        }
    }

    #[test]
    fn half_simd_decode_matches_portable() {
        for (bm, bo) in [(6u8, 8u8), (4, 7), (5, 9)] {
            let q = Quant::new(bm, bo, 1.0, 2.5);
            for n in [4099usize, 64, 130] {
                let x = mixed_values(n);
                let p = prep(q, Some(1));
                let mut codes = vec![0u16; x.len()];
                codes_f32(&x, 0, &p, &mut codes);
                let bytes = pack_chunk(&codes, &q);
                let pb = q.chunk_bytes(x.len() as u64, 0).0 as usize;
                let (prim, extra) = bytes.split_at(pb);
                // Some f16 entries overflow: clamped.
                check_half_unpack(prim, extra, &q, &table::<f16>(&q, 1e3, 2e4, false));
                check_half_unpack(prim, extra, &q, &table::<bf16>(&q, 0.5, 1.5, false));
            }
        }
    }

    fn check_half_unpack<T: Copy + PartialEq + std::fmt::Debug + Default + 'static>(
        prim: &[u8],
        extra: &[u8],
        q: &Quant,
        lut: &[T],
    ) {
        let n = prim.len() * 8 / q.bits_main as usize;
        let mut want = vec![T::default(); n];
        let uw = unpack_portable(prim, extra, q, lut, &mut want, 0, 0);
        for isa in Isa::all_available() {
            for (stream, off) in [(false, 0), (true, 0), (true, 1), (true, 9)] {
                let mut buf = vec![T::default(); n + 40];
                let got = &mut buf[off..off + n];
                assert_eq!(unpack_with(isa, prim, extra, q, lut, got, stream), uw);
                assert_eq!(got, &want[..], "{isa:?} stream={stream} off={off}");
            }
        }
    }

    #[test]
    fn zero_code_is_exact_and_unique() {
        let q = Quant::new(6, 8, 1.0, 2.5);
        let x = [0.0f32, -0.0, 1e-9, -1e-9, 0.25];
        let p = prep(q, None);
        let mut codes = [0u16; 5];
        codes_f32(&x, 0, &p, &mut codes);
        assert_eq!(codes[0], ZERO_CODE);
        assert_eq!(codes[1], ZERO_CODE);
        assert!(codes[2..].iter().all(|&c| c != ZERO_CODE));
        let lut = table::<f32>(&q, 0.25, 1.5, false);
        assert_eq!(lut[ZERO_CODE as usize], 0.0);
    }
}

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

use crate::bits::{peek64, BitWriter};
use crate::dtype::Element;
use crate::rng::uniform;
use half::slice::HalfFloatSliceExt;
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
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { codes_f32_avx2(x, first, p, out) };
        }
    }
    codes_with(x, first, p, z_f32(p.mean, p.inv_std), out)
}

/// The AVX2 version of [`codes_body`] over [`z_f32`]: the same IEEE operations in the same
/// order, eight lanes at a time, so both produce identical codes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn codes_f32_avx2(x: &[f32], first: u32, p: &Prep, out: &mut [u16]) -> Counts {
    use std::arch::x86_64::*;
    let q = &p.q;
    let n8 = x.len().min(out.len()) / 8 * 8;
    let hi = p.mean as f32;
    let lo = (p.mean - hi as f64) as f32;
    let (hi, lo, inv) = (
        _mm256_set1_ps(hi),
        _mm256_set1_ps(lo),
        _mm256_set1_ps(p.inv_std as f32),
    );
    let (t_main, t_out) = (_mm256_set1_ps(q.t_main), _mm256_set1_ps(q.t_outlier));
    let (r_main, r_out) = (_mm256_set1_ps(q.r_main), _mm256_set1_ps(q.r_out));
    let (mx_main, mx_out) = (
        _mm256_set1_ps(q.max_main as f32),
        _mm256_set1_ps(q.max_out as f32),
    );
    let (mi_main, mi_out) = (
        _mm256_set1_epi32(q.max_main as i32),
        _mm256_set1_epi32(q.max_out as i32),
    );
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let exp = _mm256_set1_epi32(0x7f80_0000);
    let zero_i = _mm256_setzero_si256();
    let (one, two, zero_code) = (
        _mm256_set1_epi32(1),
        _mm256_set1_epi32(2),
        _mm256_set1_epi32(ZERO_CODE as i32),
    );
    let stoch = p.key.is_some();
    let dither = _mm256_set1_ps(p.dither);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let base = _mm256_set1_epi32(p.key.unwrap_or(0).wrapping_add(first) as i32);
    let (m1, m2) = (
        _mm256_set1_epi32(0x7feb_352d),
        _mm256_set1_epi32(0x846c_a68b_u32 as i32),
    );
    let scale24 = _mm256_set1_ps(1.0 / 16_777_216.0);
    let (mut c_out, mut c_beyond, mut c_nonfin) = (zero_i, zero_i, zero_i);
    let mut i = 0;
    while i < n8 {
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        let vb = _mm256_castps_si256(v);
        let z = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(v, hi), lo), inv);
        let a = _mm256_and_ps(z, abs);
        let zero = _mm256_cmpeq_epi32(_mm256_slli_epi32(vb, 1), zero_i);
        let nonfin = _mm256_cmpeq_epi32(_mm256_and_si256(vb, exp), exp);
        let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, t_main));
        let is_out = _mm256_andnot_si256(zero, gt);
        let out_ps = _mm256_castsi256_ps(is_out);
        let d = _mm256_sub_ps(a, _mm256_and_ps(out_ps, t_main));
        let r = _mm256_blendv_ps(r_main, r_out, out_ps);
        let mx = _mm256_blendv_ps(mx_main, mx_out, out_ps);
        // minps returns its second operand when the first is NaN, as the scalar `<` select does.
        let s = _mm256_min_ps(_mm256_mul_ps(d, r), mx);
        let u = if stoch {
            let mut h =
                _mm256_add_epi32(base, _mm256_add_epi32(lanes, _mm256_set1_epi32(i as i32)));
            h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
            h = _mm256_mullo_epi32(h, m1);
            h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
            h = _mm256_mullo_epi32(h, m2);
            h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), scale24)
        } else {
            dither
        };
        let mag = _mm256_cvttps_epi32(_mm256_add_ps(s, u));
        let mag = _mm256_min_epi32(mag, _mm256_blendv_epi8(mi_main, mi_out, is_out));
        let zneg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_setzero_ps()));
        let nz = _mm256_or_si256(
            _mm256_xor_si256(_mm256_cmpeq_epi32(mag, zero_i), _mm256_set1_epi32(-1)),
            is_out,
        );
        let neg = _mm256_and_si256(_mm256_and_si256(zneg, nz), two);
        let code = _mm256_or_si256(
            _mm256_or_si256(_mm256_and_si256(is_out, one), neg),
            _mm256_slli_epi32(mag, 2),
        );
        let code = _mm256_blendv_epi8(code, zero_code, zero);
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(code, code));
        _mm_storeu_si128(
            out.as_mut_ptr().add(i) as *mut __m128i,
            _mm256_castsi256_si128(packed),
        );
        let beyond = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, t_out));
        let beyond = _mm256_andnot_si256(_mm256_or_si256(nonfin, zero), beyond);
        c_out = _mm256_sub_epi32(c_out, is_out);
        c_beyond = _mm256_sub_epi32(c_beyond, beyond);
        c_nonfin = _mm256_sub_epi32(c_nonfin, nonfin);
        i += 8;
    }
    let sum = |v: __m256i| {
        let mut a = [0u32; 8];
        _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, v);
        a.iter().sum::<u32>()
    };
    let mut c = Counts {
        outliers: sum(c_out),
        beyond: sum(c_beyond),
        nonfinite: sum(c_nonfin),
    };
    c.add(codes_with(
        &x[n8..],
        first.wrapping_add(n8 as u32),
        p,
        z_f32(p.mean, p.inv_std),
        &mut out[n8..],
    ));
    c
}

/// Element types SmaQ encodes, each with its fastest code path.
pub trait Codes: Element {
    /// Codes of one chunk into `out` (same length).
    fn codes(x: &[Self], p: &Prep, out: &mut [u16]) -> Counts {
        codes_with(x, 0, p, z_f64::<Self>(p.mean, p.inv_std), out)
    }
}

impl Codes for f64 {}

impl Codes for f32 {
    fn codes(x: &[f32], p: &Prep, out: &mut [u16]) -> Counts {
        if p.f32_ok {
            codes_f32(x, 0, p, out)
        } else {
            codes_with(x, 0, p, z_f64::<f32>(p.mean, p.inv_std), out)
        }
    }
}

macro_rules! half_codes {
    ($t:ty) => {
        impl Codes for $t {
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
                    xs.convert_to_f32_slice(w);
                    c.add(codes_f32(w, (bi * B) as u32, p, os));
                }
                c
            }
        }
    };
}
half_codes!(f16);
half_codes!(bf16);

/// Packs codes into the chunk layout: primary stream then extra stream.
pub fn pack(codes: &[u16], q: &Quant, outliers: u32) -> Vec<u8> {
    let (bm, ew) = (q.bits_main, q.extra_bits());
    let (pbytes, ebytes) = q.chunk_bytes(codes.len() as u64, outliers as u64);
    let (pbytes, ebytes) = (pbytes as usize, ebytes as usize);
    let pmask = (1u64 << bm) - 1;
    let mut extra = BitWriter::with_capacity_bits(outliers as usize * ew as usize);
    // Appends one code's extra bits (main codes have none above bits_main: they add nothing).
    let put_extra = |w: &mut BitWriter, code: u16| {
        let f = code as u32 & 1;
        w.put((code as u32 >> bm) * f, ew * f);
    };
    let mut out = Vec::with_capacity(pbytes + ebytes + 8);
    let mut rest = codes;
    if bm <= 8 && ew <= 7 {
        // Eight codes fill exactly `bm` primary bytes and at most 56 extra bits.
        let groups = codes.len() / 8;
        out.resize(groups * bm as usize + 8, 0);
        for (g, c) in codes.chunks_exact(8).enumerate() {
            let (mut w, mut xw, mut xn) = (0u64, 0u64, 0u32);
            for (j, &code) in c.iter().enumerate() {
                let code = code as u64;
                w |= (code & pmask) << (j as u32 * bm);
                xw |= (code >> bm) << xn;
                xn += ew * (code & 1) as u32;
            }
            let at = g * bm as usize;
            out[at..at + 8].copy_from_slice(&w.to_le_bytes());
            extra.put_wide(xw, xn);
        }
        out.truncate(groups * bm as usize);
        rest = &codes[groups * 8..];
    }
    let mut tail = BitWriter::with_capacity_bits(rest.len() * bm as usize);
    for &code in rest {
        tail.put((code as u64 & pmask) as u32, bm);
        put_extra(&mut extra, code);
    }
    out.extend_from_slice(&tail.finish());
    debug_assert_eq!(out.len(), pbytes);
    debug_assert_eq!(extra.bit_len(), outliers as usize * ew as usize);
    out.extend_from_slice(&extra.finish());
    debug_assert_eq!(out.len(), pbytes + ebytes);
    out
}

/// Decodes one chunk's primary and extra streams through `lut` (indexed by the full code).
/// Returns the number of extra bits consumed, which the caller checks against the index.
pub fn unpack<T: Copy>(primary: &[u8], extra: &[u8], q: &Quant, lut: &[T], out: &mut [T]) -> u64 {
    let (bm, ew) = (q.bits_main, q.extra_bits());
    let pmask = (1u64 << bm) - 1;
    let emask = (1u64 << ew) - 1;
    let lmask = lut.len() - 1;
    let mut xpos = 0usize;
    let base = out.len() / 8 * 8;
    let mut groups = out.chunks_exact_mut(8);
    if bm <= 8 && ew <= 7 {
        for (g, dst) in (&mut groups).enumerate() {
            let w = peek64(primary, g * 8 * bm as usize);
            let mut x = peek64(extra, xpos);
            let start = xpos;
            for (j, o) in dst.iter_mut().enumerate() {
                let k = (w >> (j as u32 * bm)) & pmask;
                let f = k & 1;
                let e = x & emask & f.wrapping_neg();
                x >>= ew as u64 * f;
                xpos += (ew as u64 * f) as usize;
                *o = lut[(k | e << bm) as usize & lmask];
            }
            debug_assert!(xpos - start <= 56);
        }
    } else {
        for (g, dst) in (&mut groups).enumerate() {
            for (j, o) in dst.iter_mut().enumerate() {
                let k = peek64(primary, (g * 8 + j) * bm as usize) & pmask;
                let f = k & 1;
                let e = peek64(extra, xpos) & emask & f.wrapping_neg();
                xpos += (ew as u64 * f) as usize;
                *o = lut[(k | e << bm) as usize & lmask];
            }
        }
    }
    for (j, o) in groups.into_remainder().iter_mut().enumerate() {
        let k = peek64(primary, (base + j) * bm as usize) & pmask;
        let f = k & 1;
        let e = peek64(extra, xpos) & emask & f.wrapping_neg();
        xpos += (ew as u64 * f) as usize;
        *o = lut[(k | e << bm) as usize & lmask];
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

#[cfg(test)]
mod tests {
    use super::*;

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
                let bytes = pack(&codes, &q, c.outliers);
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
                );
                assert_eq!(used, c.outliers as u64 * q.extra_bits() as u64);
                for (a, b) in codes.iter().zip(&back) {
                    assert_eq!(*a as u32, *b, "bm={bm} bo={bo}");
                }
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

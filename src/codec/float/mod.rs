//! Floating-point encoders (docs/CODECS.md, "Floating point"):
//! `fp32` passthrough, `fp16` (e5m10), `bf16` (e8m7), `fp8` (e4m3fn or e5m2), `s2fp8` (Cambier et
//! al.) and `mantissa` (keep the float32 exponent and m mantissa bits: 1 + 8 + m bits per value).
//!
//! Every value becomes one code of `1 + e + m` bits (sign, biased exponent, mantissa), stored
//! little-endian: one byte per fp8 code, two per fp16/bf16 code, and LSB-first bit packing for the
//! other widths (`mantissa` with m != 7). Chunks hold a multiple of 8 values, so each chunk starts
//! on a byte boundary and chunks encode and decode in parallel without an index.
//!
//! Rounding: `nearest` (ties to even, like IEEE casts), `stochastic` (add uniform random bits below
//! the kept mantissa, then truncate: unbiased; seeded and recorded like SmaQ's) or `truncate`
//! (toward zero, what QML's mantissa truncation does).
//!
//! Overflow (finite values beyond the largest finite code), parameter `overflow`:
//! - `"inf"`: they become +-Inf (the IEEE cast: torch's `x.half()`); e4m3fn has no Inf, so they
//!   become NaN there (as torch's float8_e4m3fn cast does);
//! - `"saturate"`: they become +-max (448 for e4m3, 57344 for e5m2, 65504 for fp16...).
//!
//! Defaults: `inf` for fp16/bf16/mantissa, `saturate` for fp8 and s2fp8. NaN always stays NaN;
//! +-Inf stays +-Inf where the format has infinities (all but e4m3fn, where it saturates or becomes
//! NaN per `overflow`). Float64 input is first rounded to float32 (so `fp32` is exact for
//! float32/float16/bfloat16 input only); decoding writes the tensor's own dtype.

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::bits::{peek64, BitWriter};
use crate::dtype::{Data, DataMut, Element};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use crate::rng::{fresh_seed, hash32, stream_key};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Values per parallel chunk (a multiple of 8: every chunk starts on a byte boundary).
const CHUNK: usize = 1 << 16;

pub const ID_FP32: u16 = 2;
pub const ID_FP16: u16 = 3;
pub const ID_BF16: u16 = 4;
pub const ID_FP8: u16 = 5;
pub const ID_S2FP8: u16 = 6;
pub const ID_MANTISSA: u16 = 7;

const ROUNDINGS: [&str; 3] = ["nearest", "stochastic", "truncate"];
const OVERFLOWS: [&str; 2] = ["inf", "saturate"];
const FP8_FORMATS: [&str; 2] = ["e4m3", "e5m2"];

/// Which float codec (the registry entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fp32,
    Fp16,
    Bf16,
    /// `true`: e5m2, `false`: e4m3fn.
    Fp8 {
        e5m2: bool,
    },
    S2fp8,
    Mantissa {
        bits: u8,
    },
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fp32 => "fp32",
            Kind::Fp16 => "fp16",
            Kind::Bf16 => "bf16",
            Kind::Fp8 { .. } => "fp8",
            Kind::S2fp8 => "s2fp8",
            Kind::Mantissa { .. } => "mantissa",
        }
    }

    /// The code format, `None` for fp32.
    fn fmt(self) -> Option<Fmt> {
        Some(match self {
            Kind::Fp32 => return None,
            Kind::Fp16 => Fmt::ieee(5, 10),
            Kind::Bf16 => Fmt::ieee(8, 7),
            Kind::Fp8 { e5m2: true } | Kind::S2fp8 => Fmt::ieee(5, 2),
            Kind::Fp8 { e5m2: false } => Fmt {
                ebits: 4,
                mbits: 3,
                bias: 7,
                has_inf: false,
            },
            Kind::Mantissa { bits } => Fmt::ieee(8, bits as u32),
        })
    }
}

/// A small float format: sign, `ebits` exponent bits, `mbits` mantissa bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fmt {
    pub ebits: u32,
    pub mbits: u32,
    pub bias: i32,
    /// IEEE-style: the all-ones exponent holds Inf and NaN. Otherwise (e4m3fn) only the all-ones
    /// code is NaN and there is no infinity.
    pub has_inf: bool,
}

impl Fmt {
    pub const fn ieee(ebits: u32, mbits: u32) -> Self {
        Fmt {
            ebits,
            mbits,
            bias: (1 << (ebits - 1)) - 1,
            has_inf: true,
        }
    }
    pub fn width(self) -> u32 {
        1 + self.ebits + self.mbits
    }
    /// Largest finite magnitude code.
    fn max_code(self) -> u32 {
        if self.has_inf {
            (((1 << self.ebits) - 1) << self.mbits) - 1
        } else {
            (1 << (self.ebits + self.mbits)) - 2
        }
    }
    fn inf_code(self) -> u32 {
        ((1 << self.ebits) - 1) << self.mbits
    }
    fn nan_code(self) -> u32 {
        if self.has_inf {
            self.inf_code() | (1 << (self.mbits - 1))
        } else {
            (1 << (self.ebits + self.mbits)) - 1
        }
    }
    /// The value of a code (sign included), exactly.
    pub fn value(self, code: u32) -> f32 {
        let neg = code >> (self.ebits + self.mbits) & 1 == 1;
        let mag = code & ((1 << (self.ebits + self.mbits)) - 1);
        let e = (mag >> self.mbits) as i32;
        let m = mag & ((1 << self.mbits) - 1);
        let v = if self.has_inf && e == (1 << self.ebits) - 1 {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if !self.has_inf && mag == self.nan_code() {
            f32::NAN
        } else if e == 0 {
            m as f32 * (2f64.powi(1 - self.bias - self.mbits as i32)) as f32
        } else {
            ((1.0 + m as f64 / (1u64 << self.mbits) as f64) * 2f64.powi(e - self.bias)) as f32
        };
        if neg {
            -v
        } else {
            v
        }
    }
}

/// Everything the hot loop needs, precomputed.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Mantissa bits dropped from float32.
    shift: u32,
    /// (127 - bias) << 23: re-biases the exponent in the integer domain.
    rebias: u32,
    /// float32 bit pattern of the target's smallest normal (below it: subnormal path).
    min_normal: u32,
    /// 2^(bias - 1 + mbits): scales a subnormal to its integer mantissa.
    sub_scale: f32,
    /// float32 bits of 2^(24 - bias - mbits), whose ulp is the target's subnormal spacing
    /// 2^(1 - bias - mbits) (the AVX-512 kernel's subnormal rounding).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    sub_magic: u32,
    max_code: u32,
    nan_code: u32,
    /// Code of a finite overflow, and of +-Inf input.
    overflow_code: u32,
    inf_input_code: u32,
    sign_shift: u32,
    /// No subnormal path needed (8 exponent bits: float32's own subnormals shift directly).
    e8: bool,
}

impl Plan {
    fn new(f: Fmt, saturate: bool) -> Self {
        let e8 = f.ebits == 8;
        let overflow_code = if saturate {
            f.max_code()
        } else if f.has_inf {
            f.inf_code()
        } else {
            f.nan_code()
        };
        let inf_input_code = if f.has_inf {
            f.inf_code()
        } else {
            overflow_code
        };
        Plan {
            shift: 23 - f.mbits,
            rebias: if e8 { 0 } else { ((127 - f.bias) as u32) << 23 },
            min_normal: if e8 {
                0
            } else {
                ((1 - f.bias + 127) as u32) << 23
            },
            sub_scale: 2f32.powi(f.bias - 1 + f.mbits as i32),
            sub_magic: ((127 + 24 - f.bias - f.mbits as i32) as u32) << 23,
            max_code: f.max_code(),
            nan_code: f.nan_code(),
            overflow_code,
            inf_input_code,
            sign_shift: f.ebits + f.mbits,
            e8,
        }
    }
}

const NEAREST: u8 = 0;
const STOCHASTIC: u8 = 1;
const TRUNCATE: u8 = 2;

/// One float32 to one code. `h` is 32 random bits (stochastic rounding only).
#[inline(always)]
fn to_code<const R: u8>(x: f32, h: u32, p: &Plan) -> u32 {
    let bits = x.to_bits();
    let sign = (bits >> 31) << p.sign_shift;
    let a = bits & 0x7fff_ffff;
    let s = p.shift;
    let r = match R {
        NEAREST => ((1u32 << s) >> 1)
            .wrapping_sub(1)
            .wrapping_add((a >> s) & 1),
        STOCHASTIC => (h >> 1) >> (31 - s),
        _ => 0,
    };
    let normal = a.wrapping_add(r).wrapping_sub(p.rebias) >> s;
    let code = if p.e8 || a >= p.min_normal {
        normal
    } else {
        // Subnormal in the target: its integer mantissa is |x| * 2^(bias-1+m); 2^m is the
        // smallest normal code, so rounding up into it is correct.
        let q = f32::from_bits(a) * p.sub_scale;
        let qi = match R {
            NEAREST => (q + 12_582_912.0) - 12_582_912.0,
            STOCHASTIC => q + (h >> 8) as f32 * (1.0 / 16_777_216.0),
            _ => q,
        };
        small_to_u32(qi)
    };
    let code = if code > p.max_code {
        p.overflow_code
    } else {
        code
    };
    let code = if a >= 0x7f80_0000 {
        if a == 0x7f80_0000 {
            p.inf_input_code
        } else {
            p.nan_code
        }
    } else {
        code
    };
    sign | code
}

/// `q` (a subnormal's integer mantissa, at most 2^mbits, for the lanes that use it) as an integer.
/// Clamped so the conversion is defined for every lane: unlike `q as i32` (saturating, which
/// LLVM cannot vectorize), this compiles to one `vcvttps2dq` per 8 lanes. Max before min maps NaN
/// (from lanes that take the other branch) to 0.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp() keeps NaN, which must become 0 here
fn small_to_u32(q: f32) -> u32 {
    let q = q.max(0.0).min(131_072.0);
    // SAFETY: q is finite and in [0, 2^17], so it fits an i32.
    unsafe { q.to_int_unchecked::<i32>() as u32 }
}

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

#[inline(always)]
fn codes_body<O: Code, const R: u8>(x: &[f32], out: &mut [O], p: &Plan, key: u32) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let h = if R == STOCHASTIC {
            hash32(key ^ hash32(i as u32))
        } else {
            0
        };
        *o = O::from_u32(to_code::<R>(v, h, p));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn codes_avx2<O: Code, const R: u8>(x: &[f32], out: &mut [O], p: &Plan, key: u32) {
    codes_body::<O, R>(x, out, p, key)
}

/// [`to_code`] with nearest-even rounding, 16 values per iteration in AVX-512 registers, for
/// 8-, 16- or 32-bit codes. The same integer steps as `to_code` (re-biased exponent, rounding
/// increment, overflow and special cases selected by masks) except the target-subnormal branch,
/// which rounds by adding 2^(24 - bias - mbits) in float32 (its ulp is the target's subnormal
/// spacing, so the FPU's nearest-even addition leaves round(|x| / spacing) in the low bits):
/// the same nearest-even result as `to_code`'s scale-and-round, in two instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn codes_nearest_avx512<O: Code>(x: &[f32], out: &mut [O], p: &Plan) {
    let n = x.len().min(out.len());
    // SAFETY: `out` holds at least n codes.
    unsafe { codes_nearest_avx512_to(&x[..n], out.as_mut_ptr(), p, false) }
}

/// [`codes_nearest_avx512`] into `dst`, which may be uninitialized memory.
///
/// # Safety
/// AVX-512 F and BW are available, and `dst` is valid for writing `x.len()` values of `O`
/// (alignment is not needed). `stream`: as in [`store_codes_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn codes_nearest_avx512_to<O: Code>(x: &[f32], dst: *mut O, p: &Plan, stream: bool) {
    use std::arch::x86_64::*;
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

/// For `n` codes of `size` bytes written at address `dst`: how many go before the first 64-byte
/// boundary (written with ordinary stores), and whether the rest can be streamed (non-temporal
/// stores need that alignment; a `dst` misaligned for its element type, which the platform's
/// allocators never give, is not streamed).
#[cfg(target_arch = "x86_64")]
fn stream_head(dst: usize, size: usize, n: usize, stream: bool) -> (usize, bool) {
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
/// `stream`: the full-width stores bypass the cache (non-temporal, [`crate::simd::stream`]),
/// after masked stores up to the first 64-byte boundary; a store fence ends the call.
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

/// The AVX-512 level of [`crate::simd`] (`SMAQ_RS_AVX512=0` turns it off).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    crate::simd::avx512()
}

/// Codes of `x` into `out` (same length), with runtime AVX-512 / AVX2 dispatch.
fn codes<O: Code, const R: u8>(x: &[f32], out: &mut [O], p: &Plan, key: u32) {
    #[cfg(target_arch = "x86_64")]
    if R == NEAREST && has_avx512() {
        // SAFETY: the CPU supports AVX-512 F and BW (checked at run time).
        return unsafe { codes_nearest_avx512::<O>(x, out, p) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::codec::float::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { codes_avx2::<O, R>(x, out, p, key) };
    }
    codes_body::<O, R>(x, out, p, key)
}

fn codes_dyn<O: Code>(rounding: u8, x: &[f32], out: &mut [O], p: &Plan, key: u32) {
    match rounding {
        NEAREST => codes::<O, NEAREST>(x, out, p, key),
        STOCHASTIC => codes::<O, STOCHASTIC>(x, out, p, key),
        _ => codes::<O, TRUNCATE>(x, out, p, key),
    }
}

/// AVX2, FMA and F16C available ([`crate::simd::avx2`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    crate::simd::avx2()
}

/// IEEE float16 codes, nearest-even with overflow to Inf: `vcvtps2ph`, 16 values per iteration.
/// NaN keeps its sign and top payload bits (quieted), exactly as `half`'s software conversion.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_codes_f16c(x: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_codes_avx512_to(x: &[f32], dst: *mut u16, stream: bool) {
    use std::arch::x86_64::*;
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

/// IEEE float16 codes, nearest-even with overflow to Inf (the IEEE cast), F16C when available.
fn f16_codes(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and F16C (checked at run time).
        return unsafe { f16_codes_f16c(x, out) };
    }
    f16_codes_portable(x, out)
}

/// The portable float16 conversion (software, the same rounding and NaN handling as F16C).
fn f16_codes_portable(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16::from_f32_const(v).to_bits();
    }
}

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
                x.convert_to_f32_slice(&mut tmp);
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

/// The configuration of one float codec.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatConfig {
    pub kind: Kind,
    pub rounding: u8,
    pub saturate: bool,
    pub seed: Option<u64>,
}

impl FloatConfig {
    fn defaults(kind: Kind) -> Self {
        FloatConfig {
            kind,
            rounding: if matches!(kind, Kind::Mantissa { .. }) {
                TRUNCATE
            } else {
                NEAREST
            },
            saturate: matches!(kind, Kind::Fp8 { .. } | Kind::S2fp8),
            seed: None,
        }
    }

    pub fn from_params(kind: Kind, p: &Params) -> Result<Self> {
        let name = kind.name();
        let d = Self::defaults(kind);
        let mut r = ParamReader::new(name, p);
        let kind = match kind {
            Kind::Fp8 { e5m2 } => Kind::Fp8 {
                e5m2: r.choice("format", e5m2 as usize, &FP8_FORMATS)? == 1,
            },
            Kind::Mantissa { bits } => Kind::Mantissa {
                bits: r.int("mantissa_bits", bits as i64, 1, 22)? as u8,
            },
            k => k,
        };
        let (rounding, saturate, seed) = if kind == Kind::Fp32 {
            (NEAREST, false, None)
        } else {
            (
                r.choice("rounding", d.rounding as usize, &ROUNDINGS)? as u8,
                r.choice("overflow", d.saturate as usize, &OVERFLOWS)? == 1,
                r.opt_u64("seed")?,
            )
        };
        r.finish()?;
        Ok(FloatConfig {
            kind,
            rounding,
            saturate,
            seed,
        })
    }

    pub fn to_params(&self) -> Params {
        let mut v: Vec<(&str, Param)> = Vec::new();
        match self.kind {
            Kind::Fp32 => {}
            k => {
                if let Kind::Fp8 { e5m2 } = k {
                    v.push(("format", Param::Str(FP8_FORMATS[e5m2 as usize].into())));
                }
                if let Kind::Mantissa { bits } = k {
                    v.push(("mantissa_bits", Param::Int(bits as i64)));
                }
                v.push((
                    "rounding",
                    Param::Str(ROUNDINGS[self.rounding as usize].into()),
                ));
                v.push((
                    "overflow",
                    Param::Str(OVERFLOWS[self.saturate as usize].into()),
                ));
                v.push((
                    "seed",
                    self.seed.map_or(Param::None, |s| Param::Int(s as i64)),
                ));
            }
        }
        v.into_iter().map(|(k, p)| (k.to_string(), p)).collect()
    }
}

macro_rules! float_info {
    ($static:ident, $id:expr, $kind:expr, $doc:expr) => {
        pub static $static: CodecInfo = CodecInfo {
            id: $id,
            name: $kind.name_const(),
            doc: $doc,
            defaults: || FloatConfig::defaults($kind).to_params(),
            encoder: |p| Ok(Box::new(FloatConfig::from_params($kind, p)?)),
            decoder: |meta, frame| Ok(Box::new(FloatHeader::parse($kind, meta, frame)?)),
        };
    };
}

impl Kind {
    const fn name_const(self) -> &'static str {
        match self {
            Kind::Fp32 => "fp32",
            Kind::Fp16 => "fp16",
            Kind::Bf16 => "bf16",
            Kind::Fp8 { .. } => "fp8",
            Kind::S2fp8 => "s2fp8",
            Kind::Mantissa { .. } => "mantissa",
        }
    }
}

float_info!(
    INFO_FP32,
    ID_FP32,
    Kind::Fp32,
    "float32 passthrough: 32 bits per value, exact for float32/float16/bfloat16 input."
);
float_info!(
    INFO_FP16,
    ID_FP16,
    Kind::Fp16,
    "IEEE float16 (e5m10): nearest-even, stochastic or truncating rounding; overflow to Inf or \
     saturating."
);
float_info!(
    INFO_BF16,
    ID_BF16,
    Kind::Bf16,
    "bfloat16 (e8m7): nearest-even, stochastic or truncating rounding."
);
float_info!(
    INFO_FP8,
    ID_FP8,
    Kind::Fp8 { e5m2: false },
    "float8: format e4m3 (e4m3fn, max 448, no Inf) or e5m2 (IEEE-like, max 57344); saturating by \
     default."
);
float_info!(
    INFO_S2FP8,
    ID_S2FP8,
    Kind::S2fp8,
    "S2FP8 (Cambier et al. 2020): per-tensor shift and squeeze of log2|x| (alpha, beta), then e5m2."
);
float_info!(
    INFO_MANTISSA,
    ID_MANTISSA,
    Kind::Mantissa { bits: 7 },
    "Mantissa truncation (QML): float32 sign and exponent plus mantissa_bits mantissa bits, packed \
     (9 + mantissa_bits bits per value); truncating by default."
);

/// S2FP8's per-tensor transform: y = 2^(alpha * log2|x| + beta).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Squeeze {
    alpha: f32,
    beta: f32,
}

impl Squeeze {
    /// From the non-zero finite values: mu = mean(log2|x|), m = max(log2|x|).
    fn fit(x: &[f32]) -> Self {
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
        if cnt == 0 {
            return Squeeze {
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
        Squeeze {
            alpha: alpha as f32,
            beta: (-alpha * mu) as f32,
        }
    }
}

impl Encoder for FloatConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        Ok(Encoded::from_framed(self.encode_framed(x, 0, 0)?))
    }

    fn encode_framed(&self, x: Data<'_>, lead: usize, tail: usize) -> Result<(Vec<u8>, usize)> {
        let seed = self.seed_for_encode();
        crate::dispatch!(Data, x, |v| {
            let (meta, write) = self.prepare(v, seed);
            let start = lead + meta.len();
            let payload = write.payload_len(v.len());
            // No up-front zeroing: each chunk is written once by the AVX-512 kernels, or zeroed
            // just before its codes are written (in cache, in parallel).
            // SAFETY: the closure initializes every byte: the head through `zero_init`, each
            // chunk through `write`.
            let buf = unsafe {
                crate::buf::init_with_tail(start + payload, tail, |b| {
                    let (head, body) = b.split_at_mut(start);
                    crate::buf::zero_init(head)[lead..].copy_from_slice(&meta);
                    crate::pool::for_each_chunk_mut(body, write.chunk_bytes(), |ci, o| {
                        write.chunk(v, ci, o)
                    })
                })
            };
            Ok((buf, meta.len()))
        })
    }
}

impl FloatConfig {
    fn seed_for_encode(&self) -> u64 {
        match (self.rounding, self.seed) {
            (STOCHASTIC, None) => fresh_seed(),
            (_, s) => s.unwrap_or(0),
        }
    }

    /// The metadata of `x`'s encoding and how to write its payload chunk by chunk.
    fn prepare<T: ToF32>(&self, x: &[T], seed: u64) -> (Vec<u8>, ChunkWriter) {
        let cfg = FloatConfig {
            seed: (self.rounding == STOCHASTIC).then_some(seed),
            ..self.clone()
        };
        let Some(fmt) = self.kind.fmt() else {
            // fp32 passthrough.
            return (Header::new(cfg, None).write(), ChunkWriter::Copy);
        };
        let squeeze = (self.kind == Kind::S2fp8).then(|| {
            let mut fit = None;
            T::with_f32(x, |f| fit = Some(Squeeze::fit(f)));
            fit.unwrap()
        });
        let meta = Header::new(cfg, squeeze).write();
        let fast_f16 = self.kind == Kind::Fp16 && self.rounding == NEAREST && !self.saturate;
        let w = ChunkWriter::Codes {
            rounding: self.rounding,
            seed,
            squeeze,
            plan: Plan::new(fmt, self.saturate),
            width: fmt.width() as usize,
            fast_f16,
            stream: crate::simd::stream_output(x.len() * fmt.width() as usize / 8),
        };
        (meta, w)
    }
}

/// Writes the payload of one encoding chunk by chunk (`CHUNK` values each).
enum ChunkWriter {
    /// fp32 passthrough: the values' bytes.
    Copy,
    Codes {
        rounding: u8,
        seed: u64,
        squeeze: Option<Squeeze>,
        plan: Plan,
        width: usize,
        fast_f16: bool,
        /// Non-temporal stores (a payload larger than the caches, [`crate::simd::stream_output`]).
        stream: bool,
    },
}

impl ChunkWriter {
    fn width(&self) -> usize {
        match self {
            ChunkWriter::Copy => 32,
            ChunkWriter::Codes { width, .. } => *width,
        }
    }

    /// Payload bytes of one full chunk (CHUNK * width is a whole number of bytes).
    fn chunk_bytes(&self) -> usize {
        CHUNK * self.width() / 8
    }

    fn payload_len(&self, n: usize) -> usize {
        (n * self.width()).div_ceil(8)
    }

    /// Writes (initializes) every byte of chunk `ci` of the payload, `o`.
    fn chunk<T: ToF32>(&self, x: &[T], ci: usize, o: &mut [std::mem::MaybeUninit<u8>]) {
        let c = &x[ci * CHUNK..x.len().min((ci + 1) * CHUNK)];
        match *self {
            ChunkWriter::Copy => {
                let o = crate::buf::zero_init(o);
                T::with_f32(c, |f| o.copy_from_slice(bytemuck::cast_slice(f)));
            }
            ChunkWriter::Codes {
                rounding,
                seed,
                squeeze,
                ref plan,
                width,
                fast_f16,
                stream,
            } => encode_chunk(
                rounding, o, c, ci, seed, squeeze, plan, width, fast_f16, stream,
            ),
        }
    }
}

/// One chunk of a float encoding (`ChunkWriter::chunk`): squeeze (S2FP8) if asked, then the codes into `o`, which this
/// initializes (the AVX-512 kernels write every byte directly; other paths zero it first).
#[allow(clippy::too_many_arguments)]
fn encode_chunk<T: ToF32>(
    rounding: u8,
    o: &mut [std::mem::MaybeUninit<u8>],
    c: &[T],
    ci: usize,
    seed: u64,
    squeeze: Option<Squeeze>,
    plan: &Plan,
    width: usize,
    fast_f16: bool,
    stream: bool,
) {
    let key = stream_key(seed, ci as u64);
    #[cfg(target_arch = "x86_64")]
    if fast_f16 && o.len() == c.len() * 2 && has_avx512() {
        T::with_f32(c, |f| {
            // SAFETY: AVX-512 F is present (checked at run time); `o` holds exactly f.len()
            // 16-bit codes, all of which the kernel writes.
            unsafe { f16_codes_avx512_to(f, o.as_mut_ptr().cast(), stream) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if squeeze.is_none()
        && rounding == NEAREST
        && !fast_f16
        && (width == 8 || width == 16)
        && o.len() == c.len() * width / 8
        && has_avx512()
    {
        T::with_f32(c, |f| {
            let dst = o.as_mut_ptr();
            // SAFETY: AVX-512 F and BW are present (checked at run time); `o` holds exactly
            // f.len() codes of width / 8 bytes, all of which the kernel writes.
            unsafe {
                if width == 8 {
                    codes_nearest_avx512_to::<u8>(f, dst.cast(), plan, stream)
                } else {
                    codes_nearest_avx512_to::<u16>(f, dst.cast(), plan, stream)
                }
            }
        });
        return;
    }
    let o = crate::buf::zero_init(o);
    T::with_f32(c, |f| {
        let sq;
        let f = match squeeze {
            Some(s) => {
                sq = f
                    .iter()
                    .map(|&v| {
                        let y = (s.alpha * v.abs().log2() + s.beta).exp2();
                        if v.is_nan() {
                            v
                        } else {
                            y.copysign(v)
                        }
                    })
                    .collect::<Vec<f32>>();
                &sq[..]
            }
            None => f,
        };
        write_codes(rounding, f, o, plan, key, width, fast_f16)
    });
}

/// Codes of one chunk into its bytes.
/// `fast_f16`: IEEE float16 with nearest-even rounding and overflow to Inf, which is exactly the
/// hardware conversion (F16C `vcvtps2ph`, used by `half` when the CPU has it).
fn write_codes(
    rounding: u8,
    f: &[f32],
    o: &mut [u8],
    plan: &Plan,
    key: u32,
    width: usize,
    fast_f16: bool,
) {
    match width {
        8 => codes_dyn::<u8>(rounding, f, o, plan, key),
        16 => match bytemuck::try_cast_slice_mut::<u8, u16>(o) {
            // Little-endian target and an aligned chunk (the usual case): write codes in place.
            Ok(o16) if cfg!(target_endian = "little") => {
                if fast_f16 {
                    f16_codes(f, o16);
                } else {
                    codes_dyn::<u16>(rounding, f, o16, plan, key)
                }
            }
            _ => {
                // An odd offset (a caller's lead): the same codes through a buffer.
                let mut tmp = vec![0u16; f.len()];
                if fast_f16 {
                    f16_codes(f, &mut tmp);
                } else {
                    codes_dyn::<u16>(rounding, f, &mut tmp, plan, key);
                }
                for (d, s) in o.chunks_exact_mut(2).zip(&tmp) {
                    d.copy_from_slice(&s.to_le_bytes());
                }
            }
        },
        _ => {
            let mut tmp = vec![0u32; f.len()];
            codes_dyn::<u32>(rounding, f, &mut tmp, plan, key);
            let mut w = BitWriter::with_capacity_bits(f.len() * width);
            for &c in &tmp {
                w.put(c, width as u32);
            }
            o.copy_from_slice(&w.finish());
        }
    }
}

/// Metadata: rounding, overflow, seed, and S2FP8's alpha and beta.
#[derive(Debug, Clone)]
struct Header {
    cfg: FloatConfig,
    squeeze: Option<Squeeze>,
}

impl Header {
    fn new(cfg: FloatConfig, squeeze: Option<Squeeze>) -> Self {
        Header { cfg, squeeze }
    }

    fn write(&self) -> Vec<u8> {
        let c = &self.cfg;
        let mut w = LeWriter::default();
        let sub = match c.kind {
            Kind::Fp8 { e5m2 } => e5m2 as u8,
            Kind::Mantissa { bits } => bits,
            _ => 0,
        };
        w.u8(c.rounding).u8(c.saturate as u8).u8(sub).u8(0);
        w.u64(c.seed.unwrap_or(0));
        if let Some(s) = self.squeeze {
            w.f32(s.alpha).f32(s.beta);
        }
        w.0
    }
}

/// A float decoder opened on validated metadata.
pub struct FloatHeader {
    h: Header,
    numel: u64,
}

impl FloatHeader {
    fn parse(kind: Kind, meta: &[u8], frame: Frame) -> Result<Self> {
        let name = kind.name();
        let mut r = LeReader::new(meta, "float codec header");
        let rounding = r.u8("rounding")?;
        let saturate = r.u8("overflow")?;
        let sub = r.u8("format")?;
        let reserved = r.u8("reserved")?;
        let seed = r.u64("seed")?;
        ensure_format!(rounding <= 2, "{name}: unknown rounding mode {rounding}");
        ensure_format!(saturate <= 1, "{name}: unknown overflow mode {saturate}");
        ensure_format!(reserved == 0, "{name}: reserved byte is {reserved}, not 0");
        let kind = match kind {
            Kind::Fp8 { .. } => {
                ensure_format!(sub <= 1, "fp8: unknown format code {sub}");
                Kind::Fp8 { e5m2: sub == 1 }
            }
            Kind::Mantissa { .. } => {
                ensure_format!(
                    (1..=22).contains(&sub),
                    "mantissa: mantissa_bits {sub} not in 1..=22"
                );
                Kind::Mantissa { bits: sub }
            }
            k => {
                ensure_format!(sub == 0, "{name}: format byte is {sub}, not 0");
                k
            }
        };
        let squeeze = if kind == Kind::S2fp8 {
            let alpha = r.f32("alpha")?;
            let beta = r.f32("beta")?;
            ensure_format!(
                alpha.is_finite() && alpha > 0.0 && beta.is_finite(),
                "s2fp8: alpha={alpha}, beta={beta} are invalid"
            );
            Some(Squeeze { alpha, beta })
        } else {
            None
        };
        r.finish()?;
        let width = kind.fmt().map_or(32, |f| f.width()) as u64;
        let expected = frame
            .numel
            .checked_mul(width)
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| Error::Format(format!("{name}: element count overflows")))?;
        ensure_format!(
            frame.payload_len == expected,
            "{name}: payload is {} bytes, {} values of {width} bits need {expected}",
            frame.payload_len,
            frame.numel
        );
        let cfg = FloatConfig {
            kind,
            rounding,
            saturate: saturate == 1,
            seed: (rounding == STOCHASTIC).then_some(seed),
        };
        Ok(FloatHeader {
            h: Header::new(cfg, squeeze),
            numel: frame.numel,
        })
    }

    fn decode_typed<T: ToF32>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let fmt = self.h.cfg.kind.fmt();
        let width = fmt.map_or(32, |f| f.width()) as usize;
        // Lookup table for codes up to 16 bits (fp16 decodes through F16C-capable `half`).
        let lut: Vec<f32> = match fmt {
            Some(f) if width <= 16 && f.ebits != 8 && width != 16 => {
                (0..1u32 << width).map(|c| f.value(c)).collect()
            }
            _ => Vec::new(),
        };
        let squeeze = self.h.squeeze;
        let kind = self.h.cfg.kind;
        let src_len = CHUNK * width / 8;
        crate::pool::for_each_chunk_mut(out, CHUNK, |ci, dst| {
            let src = &payload[ci * src_len..payload.len().min((ci + 1) * src_len)];
            let mut tmp = vec![0f32; dst.len()];
            decode_chunk(kind, fmt, &lut, src, &mut tmp);
            if let Some(s) = squeeze {
                let (inv, beta) = (1.0 / s.alpha, s.beta);
                for v in tmp.iter_mut() {
                    if v.is_finite() {
                        *v = ((v.abs().log2() - beta) * inv).exp2().copysign(*v);
                    }
                }
            }
            T::from_f32_slice(&tmp, dst);
        });
        Ok(())
    }
}

fn decode_chunk(kind: Kind, fmt: Option<Fmt>, lut: &[f32], src: &[u8], dst: &mut [f32]) {
    match (kind, fmt) {
        (Kind::Fp32, _) => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes(s.try_into().unwrap());
            }
        }
        (Kind::Fp16, _) => {
            let h: Vec<f16> = src
                .chunks_exact(2)
                .map(|s| f16::from_bits(u16::from_le_bytes([s[0], s[1]])))
                .collect();
            h.convert_to_f32_slice(dst);
        }
        (_, Some(f)) if f.ebits == 8 => {
            let m = f.mbits;
            let width = f.width() as usize;
            for (i, d) in dst.iter_mut().enumerate() {
                let c = if width == 16 {
                    u16::from_le_bytes([src[2 * i], src[2 * i + 1]]) as u32
                } else {
                    (peek64(src, i * width) & ((1u64 << width) - 1)) as u32
                };
                *d = f32::from_bits(
                    ((c >> (8 + m)) << 31) | ((c & ((1 << (8 + m)) - 1)) << (23 - m)),
                );
            }
        }
        _ => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = lut[s as usize];
            }
        }
    }
}

impl Decoder for FloatHeader {
    fn params(&self) -> Params {
        self.h.cfg.to_params()
    }

    fn info(&self) -> Params {
        let mut p = Params::new();
        let width = self.h.cfg.kind.fmt().map_or(32, |f| f.width());
        p.insert("bits_per_code".into(), Param::Int(width as i64));
        if let Some(s) = self.h.squeeze {
            p.insert("alpha".into(), Param::Float(s.alpha as f64));
            p.insert("beta".into(), Param::Float(s.beta as f64));
        }
        p
    }

    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        super::check_out_len(out.len(), self.numel)?;
        crate::dispatch!(DataMut, out, |o| self.decode_typed(payload, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn round_trip(kind: Kind, p: &Params, x: &[f32]) -> (Vec<f32>, usize) {
        let cfg = FloatConfig::from_params(kind, p).unwrap();
        let enc = cfg.encode(Data::F32(x)).unwrap();
        let frame = Frame {
            version: crate::format::VERSION,
            dtype: DType::F32,
            numel: x.len() as u64,
            payload_len: enc.payload.len() as u64,
        };
        let h = FloatHeader::parse(kind, &enc.meta, frame).unwrap();
        let mut out = vec![0f32; x.len()];
        h.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
        (out, enc.payload.len())
    }

    fn samples() -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(5);
        let mut v: Vec<f32> = (0..200_000)
            .map(|_| {
                let bits = r.next_u64() as u32;
                f32::from_bits(bits)
            })
            .filter(|v| v.is_finite())
            .collect();
        v.extend([
            0.0, -0.0, 1.0, 65504.0, 65520.0, 1e-8, 5.96e-8, 448.0, 464.0, 1e30,
        ]);
        v
    }

    #[test]
    fn fp16_matches_half_crate() {
        let x = samples();
        let (y, n) = round_trip(Kind::Fp16, &Params::new(), &x);
        assert_eq!(n, x.len() * 2);
        for (a, b) in x.iter().zip(&y) {
            let want = f16::from_f32(*a).to_f32();
            assert!(want.to_bits() == b.to_bits(), "{a}: {b} != {want}");
        }
    }

    /// Every bit pattern class: random bits (NaN payloads, subnormals, huge values) and specials.
    fn all_bits(n: usize) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(11);
        let mut v: Vec<f32> = (0..n)
            .map(|_| f32::from_bits(r.next_u64() as u32))
            .collect();
        v.extend(samples().into_iter().take(20_000));
        v.extend([
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc1_2345),
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-45,
            65519.99,
            65520.0,
            -65520.0,
        ]);
        v
    }

    #[test]
    fn huge_page_buffers_round_trip() {
        // 16 MiB of fp32 and 8 MiB of fp16 output: both take the MADV_HUGEPAGE path.
        let x: Vec<f32> = (0..1 << 22).map(|i| (i as f32).sin() * 1e3).collect();
        let (y, n) = round_trip(Kind::Fp32, &Params::new(), &x);
        assert_eq!(n, x.len() * 4);
        assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
        let (y, n) = round_trip(Kind::Fp16, &Params::new(), &x);
        assert_eq!(n, x.len() * 2);
        assert!(x
            .iter()
            .zip(&y)
            .all(|(a, b)| f16::from_f32(*a).to_f32().to_bits() == b.to_bits()));
    }

    #[test]
    fn f16c_matches_portable_float16() {
        let x = all_bits(100_003);
        // Every length mod 16, so both the 16-wide loop and the padded tail are compared.
        for len in (x.len() - 17..=x.len()).chain(0..20) {
            let mut a = vec![0u16; len];
            let mut b = vec![0u16; len];
            f16_codes(&x[..len], &mut a);
            f16_codes_portable(&x[..len], &mut b);
            assert_eq!(a, b, "length {len}");
        }
        // And the portable path is the IEEE cast for non-NaN values.
        let mut b = vec![0u16; x.len()];
        f16_codes_portable(&x, &mut b);
        for (v, c) in x.iter().zip(&b) {
            if !v.is_nan() {
                assert_eq!(*c, f16::from_f32(*v).to_bits(), "{v}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_float16_matches_portable() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: F16C or the portable path runs");
            return;
        }
        let mut x = all_bits(100_003);
        x.extend(boundaries(Fmt::ieee(5, 10)));
        for len in (0..70).chain([x.len() - 1, x.len()]) {
            let mut a = vec![0u16; len];
            let mut b = vec![0u16; len];
            // SAFETY: AVX-512 F checked above; `a` holds len codes.
            unsafe { f16_codes_avx512_to(&x[..len], a.as_mut_ptr(), false) };
            f16_codes_portable(&x[..len], &mut b);
            assert_eq!(a, b, "length {len}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_codes_match_portable() {
        if !has_avx2() {
            eprintln!("no AVX2 here: only the portable path exists");
            return;
        }
        let x = all_bits(50_001);
        let fmts = [
            Fmt::ieee(5, 10),
            Fmt::ieee(8, 7),
            Fmt::ieee(5, 2),
            Fmt {
                ebits: 4,
                mbits: 3,
                bias: 7,
                has_inf: false,
            },
            Fmt::ieee(8, 3),
        ];
        for f in fmts {
            for sat in [false, true] {
                let p = Plan::new(f, sat);
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

    /// Values at and beside every rounding boundary of `f` (midpoints between neighbouring codes,
    /// one float32 ulp either side), the overflow threshold, and the subnormal range, both signs.
    fn boundaries(f: Fmt) -> Vec<f32> {
        let mut v = Vec::new();
        let top = f.max_code();
        // Every code of the 8- and 16-bit formats; for wider ones the lowest and highest codes
        // and a stride through the rest.
        let stride = (top / 100_000).max(1) as usize;
        let codes = (0..=top.min(4096))
            .chain((4096..top.saturating_sub(4096)).step_by(stride))
            .chain(top.saturating_sub(4096).max(4097)..=top);
        for c in codes {
            let lo = f.value(c) as f64;
            let hi = if c < top {
                f.value(c + 1) as f64
            } else {
                // One ulp above the largest finite value: its midpoint is the overflow threshold.
                lo + (lo - f.value(c - 1) as f64)
            };
            let mid = ((lo + hi) / 2.0) as f32;
            for m in [
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                v.push(m);
                v.push(-m);
            }
            v.push(lo as f32);
            v.push(-(lo as f32));
        }
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_codes_match_portable() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("no AVX-512 here: the AVX2 and portable paths run");
            return;
        }
        let e4m3 = Fmt {
            ebits: 4,
            mbits: 3,
            bias: 7,
            has_inf: false,
        };
        let fmts = [
            Fmt::ieee(5, 2),
            e4m3,
            Fmt::ieee(5, 10),
            Fmt::ieee(8, 7),
            Fmt::ieee(8, 3),
            Fmt::ieee(8, 22),
        ];
        let common = all_bits(30_001);
        for f in fmts {
            let mut x = boundaries(f);
            x.extend(&common);
            for sat in [false, true] {
                let p = Plan::new(f, sat);
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
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn streamed_codes_equal_plain_ones_at_every_offset() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("no AVX-512 here: nothing streams");
            return;
        }
        let x = all_bits(5_000);
        let p8 = Plan::new(Fmt::ieee(5, 2), false);
        let p16 = Plan::new(Fmt::ieee(8, 7), false);
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

    #[test]
    fn fp8_boundaries_are_nearest_even() {
        // Every midpoint between neighbouring codes (ties), one ulp either side, the overflow
        // threshold and the subnormals, through the encoder's dispatch, against brute force.
        let e4m3 = Fmt {
            ebits: 4,
            mbits: 3,
            bias: 7,
            has_inf: false,
        };
        for (e5m2, fmt) in [(false, e4m3), (true, Fmt::ieee(5, 2))] {
            let mut x = boundaries(fmt);
            x.extend([0.0, -0.0, f32::MIN_POSITIVE, -1e-45, 1e30, -1e30]);
            assert_fp8_nearest(e5m2, fmt, &x);
        }
    }

    #[test]
    fn bf16_matches_half_crate() {
        let x = samples();
        let (y, _) = round_trip(Kind::Bf16, &Params::new(), &x);
        for (a, b) in x.iter().zip(&y) {
            let want = bf16::from_f32(*a).to_f32();
            assert!(want.to_bits() == b.to_bits(), "{a}: {b} != {want}");
        }
    }

    /// Nearest-even against a brute-force search over every code of the format.
    /// Every value of `x` through fp8 (`e5m2` or e4m3, `fmt`) with both overflow modes gives
    /// the brute-force nearest code.
    fn assert_fp8_nearest(e5m2: bool, fmt: Fmt, x: &[f32]) {
        for sat in [true, false] {
            let mut p = Params::new();
            p.insert(
                "format".into(),
                Param::Str(FP8_FORMATS[e5m2 as usize].into()),
            );
            p.insert(
                "overflow".into(),
                Param::Str(OVERFLOWS[sat as usize].into()),
            );
            let (y, _) = round_trip(Kind::Fp8 { e5m2 }, &p, x);
            for (a, b) in x.iter().zip(&y) {
                let want = brute_nearest(fmt, *a, sat);
                assert!(
                    want.to_bits() == b.to_bits() || (want.is_nan() && b.is_nan()),
                    "e5m2={e5m2} sat={sat}: {a:e} -> {b:e}, want {want:e}"
                );
            }
        }
    }

    fn brute_nearest(f: Fmt, x: f32, saturate: bool) -> f32 {
        if x.is_nan() {
            return f32::NAN;
        }
        let n = 1u32 << (f.ebits + f.mbits);
        let mut best = (f64::INFINITY, 0u32);
        for c in 0..=f.max_code() {
            let d = (f.value(c) as f64 - x.abs() as f64).abs();
            if d < best.0 || (d == best.0 && c % 2 == 0) {
                best = (d, c);
            }
        }
        let max = f.value(f.max_code()) as f64;
        let ulp = max - f.value(f.max_code() - 1) as f64;
        let mut v = f.value(best.1);
        // Overflow: beyond the midpoint above max, or on it when ties-to-even rounds away from
        // max (an odd max code: IEEE formats; e4m3fn's max, 448, is even and keeps the tie).
        let thr = max + ulp / 2.0;
        let a = x.abs() as f64;
        if a > thr || (a == thr && f.max_code() % 2 == 1) {
            v = if saturate {
                max as f32
            } else if f.has_inf {
                f32::INFINITY
            } else {
                f.value(n - 1)
            };
        }
        v.copysign(x)
    }

    #[test]
    fn fp8_nearest_is_exact_nearest_even() {
        let mut x: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 - 10_000.0) * 0.0371)
            .collect();
        x.extend((0..2000).map(|i| (i as f32) * 1e-5));
        x.extend([1e6, -1e6, 500.0, 60000.0, 70000.0]);
        for (e5m2, fmt) in [
            (
                false,
                Fmt {
                    ebits: 4,
                    mbits: 3,
                    bias: 7,
                    has_inf: false,
                },
            ),
            (true, Fmt::ieee(5, 2)),
        ] {
            assert_fp8_nearest(e5m2, fmt, &x);
        }
    }

    #[test]
    fn stochastic_is_unbiased() {
        let x = vec![1.0f32 + 1.0 / 3.0 * 0.125; 1 << 18];
        let mut p = Params::new();
        p.insert("rounding".into(), Param::Str("stochastic".into()));
        p.insert("format".into(), Param::Str("e4m3".into()));
        p.insert("seed".into(), Param::Int(3));
        let (y, _) = round_trip(Kind::Fp8 { e5m2: false }, &p, &x);
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        assert!((mean - x[0] as f64).abs() < 2e-4, "mean {mean}");
        assert!(y.iter().all(|&v| v == 1.0 || v == 1.125));
    }

    #[test]
    fn mantissa_truncation_packs_and_floors() {
        let x = samples();
        for m in [1u8, 3, 7, 10, 22] {
            let mut p = Params::new();
            p.insert("mantissa_bits".into(), Param::Int(m as i64));
            let (y, n) = round_trip(Kind::Mantissa { bits: m }, &p, &x);
            assert_eq!(n, (x.len() * (9 + m as usize)).div_ceil(8));
            let mask = !((1u32 << (23 - m)) - 1);
            for (a, b) in x.iter().zip(&y) {
                assert_eq!(a.to_bits() & mask, b.to_bits(), "m={m}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn specials() {
        let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e9];
        let (y, _) = round_trip(Kind::Fp16, &Params::new(), &x);
        assert!(y[0].is_nan());
        assert_eq!(y[1], f32::INFINITY);
        assert_eq!(y[2], f32::NEG_INFINITY);
        assert_eq!(y[3].to_bits(), 0);
        assert_eq!(y[4].to_bits(), (-0.0f32).to_bits());
        assert_eq!(y[5], f32::INFINITY);
        let (y, _) = round_trip(Kind::Fp8 { e5m2: false }, &Params::new(), &x);
        assert!(y[0].is_nan());
        assert_eq!(y[1], 448.0);
        assert_eq!(y[2], -448.0);
        assert_eq!(y[5], 448.0);
        let (y, _) = round_trip(Kind::S2fp8, &Params::new(), &x);
        assert!(y[0].is_nan());
        assert_eq!(y[1], f32::INFINITY);
        assert_eq!(y[3], 0.0);
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

//! The float encode path (docs/CODECS.md, "Floating point"): the metadata and a writer for the
//! payload ([`FloatConfig::prepare`]), then each chunk of `CHUNK` values written in parallel
//! ([`ChunkWriter`]): S2FP8's codes from magnitude thresholds ([`SqueezeCoder`]), or (stochastic
//! rounding, small tensors) its values squeezed first and, like every other format's, turned
//! into codes by the fastest kernel the CPU runs (the x86 kernels in `x86.rs`, chosen at run
//! time through [`crate::simd`]) or the portable loop over [`to_code`], and stored as bytes,
//! 16-bit words or packed bits.

use super::header::Header;
use super::minifloat::{to_code, RoundingPlan, NEAREST, STOCHASTIC, TRUNCATE};
use super::shift_squeeze::{LogShiftSqueeze, FAST_MIN};
use super::squeeze_codes::SqueezeCoder;
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{FloatConfig, Kind, CHUNK};
use crate::bits::BitWriter;
use crate::codec::kernel_io::{Code, ToF32};
use crate::rng::{fresh_seed, hash32, stream_key};
use half::f16;

impl FloatConfig {
    pub(super) fn seed_for_encode(&self) -> u64 {
        match (self.rounding, self.seed) {
            (STOCHASTIC, None) => fresh_seed(),
            (_, s) => s.unwrap_or(0),
        }
    }

    /// The metadata of `x`'s encoding and how to write its payload chunk by chunk.
    pub(super) fn prepare<T: ToF32>(&self, x: &[T], seed: u64) -> (Vec<u8>, ChunkWriter) {
        let cfg = FloatConfig {
            seed: (self.rounding == STOCHASTIC).then_some(seed),
            ..self.clone()
        };
        let Some(fmt) = self.kind.format() else {
            // fp32 passthrough.
            return (Header::new(cfg, None).write(), ChunkWriter::Copy);
        };
        let squeeze = (self.kind == Kind::S2fp8).then(|| {
            let mut fit = None;
            T::with_f32(x, |f| fit = Some(LogShiftSqueeze::fit(f)));
            fit.unwrap()
        });
        let meta = Header::new(cfg, squeeze).write();
        let fast_f16 = self.kind == Kind::Fp16 && self.rounding == NEAREST && !self.saturate;
        let plan = RoundingPlan::new(fmt, self.saturate);
        // Large tensors, nearest or truncating rounding: codes from thresholds on |x|.
        let coder = squeeze
            .filter(|_| self.rounding != STOCHASTIC && x.len() >= FAST_MIN)
            .map(|s| SqueezeCoder::new(&s, &plan, self.rounding));
        let w = ChunkWriter::Codes {
            rounding: self.rounding,
            seed,
            squeeze,
            coder,
            plan,
            width: fmt.width() as usize,
            fast_f16,
            stream: crate::simd::stream_output(x.len() * fmt.width() as usize / 8),
        };
        (meta, w)
    }
}

/// Writes the payload of one encoding chunk by chunk (`CHUNK` values each).
pub(super) enum ChunkWriter {
    /// fp32 passthrough: the values' bytes.
    Copy,
    Codes {
        rounding: u8,
        seed: u64,
        squeeze: Option<LogShiftSqueeze>,
        /// S2FP8's codes from magnitude thresholds (instead of squeezing each value).
        coder: Option<SqueezeCoder>,
        plan: RoundingPlan,
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
    pub(super) fn chunk_bytes(&self) -> usize {
        CHUNK * self.width() / 8
    }

    pub(super) fn payload_len(&self, n: usize) -> usize {
        (n * self.width()).div_ceil(8)
    }

    /// Writes (initializes) every byte of chunk `ci` of the payload, `o`.
    pub(super) fn chunk<T: ToF32>(&self, x: &[T], ci: usize, o: &mut [std::mem::MaybeUninit<u8>]) {
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
                ref coder,
                ref plan,
                width,
                fast_f16,
                stream,
            } => {
                if let Some(coder) = coder {
                    return squeeze_chunk(coder, c, o, stream);
                }
                encode_chunk(
                    rounding, o, c, ci, seed, squeeze, plan, width, fast_f16, stream,
                )
            }
        }
    }
}

/// One chunk of a float encoding (`ChunkWriter::chunk`): squeeze (S2FP8) if asked, then the
/// codes into `o`, which this initializes (the AVX-512 kernels write every byte directly; other
/// paths zero it first).
#[allow(clippy::too_many_arguments)]
fn encode_chunk<T: ToF32>(
    rounding: u8,
    o: &mut [std::mem::MaybeUninit<u8>],
    c: &[T],
    ci: usize,
    seed: u64,
    squeeze: Option<LogShiftSqueeze>,
    plan: &RoundingPlan,
    width: usize,
    fast_f16: bool,
    stream: bool,
) {
    let key = stream_key(seed, ci as u64);
    #[cfg(target_arch = "x86_64")]
    if fast_f16 && o.len() == c.len() * 2 && crate::simd::avx512() {
        T::with_f32(c, |f| {
            // SAFETY: AVX-512 F is present (checked at run time); `o` holds exactly f.len()
            // 16-bit codes, all of which the kernel writes.
            unsafe { x86::f16_codes_avx512_to(f, o.as_mut_ptr().cast(), stream) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if squeeze.is_none()
        && rounding == NEAREST
        && !fast_f16
        && (width == 8 || width == 16)
        && o.len() == c.len() * width / 8
        && crate::simd::avx512()
    {
        T::with_f32(c, |f| {
            let dst = o.as_mut_ptr();
            // SAFETY: AVX-512 F and BW are present (checked at run time); `o` holds exactly
            // f.len() codes of width / 8 bytes, all of which the kernel writes.
            unsafe {
                if width == 8 {
                    x86::codes_nearest_avx512_to::<u8>(f, dst.cast(), plan, stream)
                } else {
                    x86::codes_nearest_avx512_to::<u16>(f, dst.cast(), plan, stream)
                }
            }
        });
        return;
    }
    let o = crate::buf::zero_init(o);
    T::with_f32(c, |f| {
        let mut sq = Vec::new();
        let f = match squeeze {
            Some(s) => {
                sq.resize(f.len(), 0.0);
                s.squeeze(f, &mut sq);
                &sq[..]
            }
            None => f,
        };
        write_codes(rounding, f, o, plan, key, width, fast_f16)
    });
}

/// One chunk of S2FP8 codes from `coder` into `o` (one byte per value), which this initializes.
fn squeeze_chunk<T: ToF32>(
    coder: &SqueezeCoder,
    c: &[T],
    o: &mut [std::mem::MaybeUninit<u8>],
    stream: bool,
) {
    T::with_f32(c, |f| {
        #[cfg(target_arch = "x86_64")]
        if o.len() == f.len() && crate::simd::avx512() {
            // SAFETY: AVX-512 F and BW are present (checked at run time); `o` holds exactly
            // f.len() bytes, all of which the kernel writes.
            return unsafe { coder.codes_avx512_to(f, o.as_mut_ptr().cast(), stream) };
        }
        coder.codes(f, crate::buf::zero_init(o))
    })
}

/// Codes of one chunk into its bytes.
/// `fast_f16`: IEEE float16 with nearest-even rounding and overflow to Inf, which is exactly the
/// hardware conversion (F16C `vcvtps2ph`, used by `half` when the CPU has it).
fn write_codes(
    rounding: u8,
    f: &[f32],
    o: &mut [u8],
    plan: &RoundingPlan,
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

/// The portable loop: [`to_code`] over `x` into `out`; stochastic rounding draws the random bits
/// of value i from `key` and i.
#[inline(always)]
pub(super) fn codes_body<O: Code, const R: u8>(
    x: &[f32],
    out: &mut [O],
    p: &RoundingPlan,
    key: u32,
) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let h = if R == STOCHASTIC {
            hash32(key ^ hash32(i as u32))
        } else {
            0
        };
        *o = O::from_u32(to_code::<R>(v, h, p));
    }
}

/// Codes of `x` into `out` (same length), with runtime AVX-512 / AVX2 dispatch.
fn codes<O: Code, const R: u8>(x: &[f32], out: &mut [O], p: &RoundingPlan, key: u32) {
    #[cfg(target_arch = "x86_64")]
    if R == NEAREST && crate::simd::avx512() {
        // SAFETY: the CPU supports AVX-512 F and BW (checked at run time).
        return unsafe { x86::codes_nearest_avx512::<O>(x, out, p) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { x86::codes_avx2::<O, R>(x, out, p, key) };
    }
    codes_body::<O, R>(x, out, p, key)
}

/// [`codes`] with the rounding mode known only at run time.
fn codes_dyn<O: Code>(rounding: u8, x: &[f32], out: &mut [O], p: &RoundingPlan, key: u32) {
    match rounding {
        NEAREST => codes::<O, NEAREST>(x, out, p, key),
        STOCHASTIC => codes::<O, STOCHASTIC>(x, out, p, key),
        _ => codes::<O, TRUNCATE>(x, out, p, key),
    }
}

/// IEEE float16 codes, nearest-even with overflow to Inf (the IEEE cast), F16C when available.
fn f16_codes(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU supports AVX2 and F16C (checked at run time).
        return unsafe { x86::f16_codes_f16c(x, out) };
    }
    f16_codes_portable(x, out)
}

/// The portable float16 conversion (software, the same rounding and NaN handling as F16C).
pub(super) fn f16_codes_portable(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16::from_f32_const(v).to_bits();
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::all_bits;
    use super::*;

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
}

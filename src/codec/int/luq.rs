//! The `luq` codec (docs/CODECS.md, "Integers"): logarithmic unbiased quantization for
//! gradients. Each value is a sign and a (bits - 1)-bit level j: 0, or alpha * 2^(j - levels)
//! with alpha = max |x| over the finite values; the level is chosen by stochastic rounding
//! between powers of two (pruning below the smallest level), which keeps the code unbiased.
//!
//! Payload: the codes, LSB-first bit-packed, then the exception list (NaN and +-Inf kept exactly,
//! `crate::codec::exceptions`).

use super::{stats, CHUNK};
use crate::bits::{pack_into, unpack};
use crate::codec::exceptions::{apply_exceptions, collect_exceptions, exception_bytes};
use crate::codec::kernel_io::ToF32;
use crate::codec::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::dtype::{Data, DataMut};
use crate::error::{ensure_format, Result};
use crate::le::{LeReader, LeWriter};
use crate::rng::{fresh_seed, hash32, stream_key};
use crate::stats::Summary;
use rayon::prelude::*;

pub const ID_LUQ: u16 = 9;

pub static INFO_LUQ: CodecInfo = CodecInfo {
    id: ID_LUQ,
    name: "luq",
    doc: "LUQ logarithmic unbiased quantization (gradients): sign + (bits-1)-bit power-of-two \
          level below max|x|, stochastic rounding and pruning; unbiased.",
    defaults: || LuqConfig::default().to_params(),
    encoder: |p| Ok(Box::new(LuqConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(LuqDecoder::parse(meta, frame)?)),
    keeps_zeros: |_| Ok(true),
};

/// The configuration of the `luq` codec.
#[derive(Debug, Clone, PartialEq)]
pub struct LuqConfig {
    pub bits: u8,
    pub seed: Option<u64>,
}

impl Default for LuqConfig {
    fn default() -> Self {
        LuqConfig {
            bits: 4,
            seed: None,
        }
    }
}

impl LuqConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let mut r = ParamReader::new("luq", p);
        let bits = r.int("bits", 4, 2, 8)? as u8;
        let seed = r.opt_u64("seed")?;
        r.finish()?;
        Ok(LuqConfig { bits, seed })
    }
    pub fn to_params(&self) -> Params {
        crate::codec::params::from_pairs([
            ("bits", Param::Int(self.bits as i64)),
            (
                "seed",
                self.seed.map_or(Param::None, |v| Param::Int(v as i64)),
            ),
        ])
    }
    /// Number of non-zero levels.
    fn levels(bits: u8) -> u32 {
        (1 << (bits - 1)) - 1
    }
}

impl Encoder for LuqConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        let seed = self.seed.unwrap_or_else(fresh_seed);
        crate::dispatch!(Data, x, |v| self.encode_typed(v, seed))
    }
}

impl LuqConfig {
    fn encode_typed<T: ToF32>(&self, x: &[T], seed: u64) -> Result<Encoded> {
        let alpha = crate::pool::install(|| {
            x.par_chunks(CHUNK)
                .map(|c| T::with_f32(c, |f| stats(f, false)))
                .reduce(|| Summary::EMPTY, Summary::then)
        });
        let alpha = if alpha.min <= alpha.max {
            (alpha.min as f32).abs().max((alpha.max as f32).abs())
        } else {
            0.0
        };
        let levels = Self::levels(self.bits);
        // Smallest level: alpha * 2^(1 - levels).
        let eps = alpha * 2f32.powi(1 - levels as i32);
        let inv_eps = if eps > 0.0 && eps.is_finite() {
            1.0 / eps
        } else {
            0.0
        };
        let width = self.bits as usize;
        let mut codes = vec![0u8; (x.len() * width).div_ceil(8)];
        let outs: Vec<(Vec<u8>, u64)> = crate::pool::install(|| {
            codes
                .par_chunks_mut(CHUNK * width / 8)
                .zip(x.par_chunks(CHUNK))
                .enumerate()
                .map(|(ci, (o, c))| {
                    let key = stream_key(seed, ci as u64);
                    T::with_f32(c, |f| {
                        let mut q = vec![0u16; f.len()];
                        for (i, (d, &v)) in q.iter_mut().zip(f).enumerate() {
                            let u =
                                (hash32(key ^ hash32(i as u32)) >> 8) as f32 * (1.0 / 16_777_216.0);
                            let r = v.abs() * inv_eps; // in units of the smallest level
                            let j = if !r.is_finite() {
                                0
                            } else if r < 1.0 {
                                (u < r) as u32 // prune to 0 or keep the smallest level
                            } else {
                                let e = (r.to_bits() >> 23) as i32 - 127; // floor(log2 r)
                                let frac =
                                    f32::from_bits((r.to_bits() & 0x007f_ffff) | 0x3f80_0000) - 1.0;
                                (e as u32 + 1 + (u < frac) as u32).min(levels)
                            };
                            let sign = (v.is_sign_negative() && j > 0) as u32;
                            *d = ((sign << (width - 1)) | j) as u16;
                        }
                        pack_into(&q, width as u32, o);
                    });
                    let mut exc = Vec::new();
                    let n = collect_exceptions(c, (ci * CHUNK) as u64, &mut exc);
                    (exc, n)
                })
                .collect()
        });
        let n_exc: u64 = outs.iter().map(|o| o.1).sum();
        let mut meta = LeWriter::default();
        meta.u8(self.bits)
            .bytes(&[0; 3])
            .f32(alpha)
            .u64(seed)
            .u64(n_exc);
        let mut payload = codes;
        for (e, _) in &outs {
            payload.extend_from_slice(e);
        }
        Ok(Encoded {
            meta: meta.0,
            payload,
        })
    }
}

/// A `luq` decoder.
pub struct LuqDecoder {
    bits: u8,
    alpha: f32,
    seed: u64,
    n_exc: u64,
    numel: u64,
    code_bytes: usize,
}

impl LuqDecoder {
    fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "luq header");
        let bits = r.u8("bits")?;
        let reserved = r.take(3, "reserved")?;
        let alpha = r.f32("alpha")?;
        let seed = r.u64("seed")?;
        let n_exc = r.u64("exception count")?;
        r.finish()?;
        ensure_format!((2..=8).contains(&bits), "luq: bits {bits} not in 2..=8");
        ensure_format!(reserved == [0, 0, 0], "luq: reserved bytes are not zero");
        ensure_format!(
            alpha.is_finite() && alpha >= 0.0,
            "luq: alpha {alpha} is invalid"
        );
        ensure_format!(
            n_exc <= frame.numel,
            "luq: {n_exc} exceptions among {} values",
            frame.numel
        );
        let code_bytes = frame.numel.saturating_mul(bits as u64).div_ceil(8);
        let expected = code_bytes.checked_add(exception_bytes(n_exc, frame.dtype.size(), "luq")?);
        ensure_format!(
            expected == Some(frame.payload_len),
            "luq: payload is {} bytes, the header implies {expected:?}",
            frame.payload_len
        );
        Ok(LuqDecoder {
            bits,
            alpha,
            seed,
            n_exc,
            numel: frame.numel,
            code_bytes: code_bytes as usize,
        })
    }

    fn decode_typed<T: ToF32>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let (codes, exc) = payload.split_at(self.code_bytes);
        let width = self.bits as u32;
        let levels = LuqConfig::levels(self.bits);
        let table: Vec<f32> = (0..1u32 << width)
            .map(|c| {
                let j = c & ((1 << (width - 1)) - 1);
                let v = if j == 0 || j > levels {
                    0.0
                } else {
                    self.alpha * 2f32.powi(j as i32 - levels as i32)
                };
                if c >> (width - 1) == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        crate::pool::install(|| {
            out.par_chunks_mut(CHUNK)
                .zip(codes.par_chunks(CHUNK * width as usize / 8))
                .for_each(|(dst, src)| {
                    let mut q = vec![0u32; dst.len()];
                    unpack(src, width, &mut q);
                    let f: Vec<f32> = q.iter().map(|&c| table[c as usize]).collect();
                    T::from_f32_slice(&f, dst);
                })
        });
        apply_exceptions(exc, out, "luq")
    }
}

impl Decoder for LuqDecoder {
    fn params(&self) -> Params {
        LuqConfig {
            bits: self.bits,
            seed: Some(self.seed),
        }
        .to_params()
    }
    fn stats(&self) -> Params {
        crate::codec::params::from_pairs([
            ("alpha", Param::Float(self.alpha as f64)),
            ("n_exceptions", Param::Int(self.n_exc as i64)),
        ])
    }
    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        crate::codec::check_out_len(out.len(), self.numel)?;
        crate::dispatch!(DataMut, out, |o| self.decode_typed(payload, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(p: &Params, x: &[f32]) -> (Vec<f32>, usize) {
        let (out, _, bytes) = crate::codec::testing::round_trip_f32(&INFO_LUQ, p, x);
        (out, bytes)
    }

    #[test]
    fn luq_is_unbiased_and_on_levels() {
        let mut x: Vec<f32> = vec![0.013; 1 << 16];
        x[0] = 1.0;
        let p =
            crate::codec::params::from_pairs([("bits", Param::Int(4)), ("seed", Param::Int(2))]);
        let (y, len) = rt(&p, &x);
        assert_eq!(len, x.len() / 2);
        let levels: Vec<f32> = (0..8)
            .map(|j| if j == 0 { 0.0 } else { 2f32.powi(j - 7) })
            .collect();
        assert!(y.iter().all(|v| levels.contains(v)));
        let mean = y[1..].iter().map(|&v| v as f64).sum::<f64>() / (y.len() - 1) as f64;
        assert!((mean - 0.013).abs() < 3e-4, "mean {mean}");
    }
}

//! Sign: one bit per value and one float32 scale per block, the scale being the block's mean
//! absolute value (1-bit compression of gradients and momentum, as in signSGD with a scale and
//! 1-bit Adam; docs/CODECS.md, "sign").
//!
//! A value x in block b decodes to `sign(x) * m_b`, `m_b` the mean of |x| over the block's finite
//! values: the block keeps its L1 norm and every value its sign (-0.0 decodes negative). Zeros are
//! not kept (they become `+-m_b`); NaN and +-Inf are kept exactly in the exception list.
//!
//! Metadata: `block_size` u32, exception count u64. Payload: the scales (f32, one per block), the
//! sign bits (LSB first, bit i of byte j is value 8j + i), the exception list.
//!
//! This file is also the worked example of docs/DESIGN.md, "Adding a codec".

use super::exceptions::{apply_exceptions, collect_exceptions, exception_bytes};
use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::dtype::{Data, DataMut, Element};
use crate::error::{ensure_format, Result};
use crate::le::{LeReader, LeWriter};
use rayon::prelude::*;

pub const ID: u16 = 11;

pub static INFO: CodecInfo = CodecInfo {
    id: ID,
    name: "sign",
    doc: "1-bit sign per value with one float32 scale per block (the block's mean |x|): \
          signSGD / 1-bit Adam style compression of gradients and momentum; NaN/Inf exact, \
          zeros not kept.",
    defaults: || SignConfig::default().to_params(),
    encoder: |p| Ok(Box::new(SignConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(SignDecoder::parse(meta, frame)?)),
    keeps_zeros: |_| Ok(false),
};

/// Blocks per parallel task: about 64K values (whole blocks, so every task's signs start on a
/// byte).
fn task_blocks(block_size: usize) -> usize {
    ((1 << 16) / block_size).max(1)
}

/// The mean |x| of the finite values of a block (0 when it has none), in eight running sums
/// added in a fixed order.
fn mean_abs<T: Element>(x: &[T]) -> f32 {
    let (mut sum, mut count) = ([0f64; 8], [0u32; 8]);
    // Whole groups of eight and the rest: the same lanes (value j of a group in lane j).
    for eight in x.chunks(8) {
        for (j, v) in eight.iter().enumerate() {
            let a = v.to_f64().abs();
            let ok = a.is_finite();
            sum[j] += if ok { a } else { 0.0 };
            count[j] += ok as u32;
        }
    }
    let n: u32 = count.iter().sum();
    if n == 0 {
        0.0
    } else {
        (sum.iter().sum::<f64>() / n as f64) as f32
    }
}

/// The sign bits of up to eight values, value i in bit i.
fn sign_byte<T: Element>(eight: &[T]) -> u8 {
    let top = 8 * T::DTYPE.size() as u32 - 1;
    eight.iter().enumerate().fold(0u8, |b, (i, v)| {
        b | (((v.to_bits_u64() >> top) as u8 & 1) << i)
    })
}

/// Values per scale: the smallest and largest accepted.
const BLOCK_RANGE: (i64, i64) = (8, 1 << 20);

#[derive(Debug, Clone, PartialEq)]
pub struct SignConfig {
    /// Values sharing one scale (a multiple of 8, so each block's signs fill whole bytes).
    pub block_size: u32,
}

impl Default for SignConfig {
    fn default() -> Self {
        SignConfig { block_size: 256 }
    }
}

impl SignConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let mut r = ParamReader::new("sign", p);
        let d = SignConfig::default();
        let block_size = r.int(
            "block_size",
            d.block_size as i64,
            BLOCK_RANGE.0,
            BLOCK_RANGE.1,
        )?;
        r.finish()?;
        if block_size % 8 != 0 {
            return Err(crate::error::Error::Codec(format!(
                "sign: block_size must be a multiple of 8, got {block_size}"
            )));
        }
        Ok(SignConfig {
            block_size: block_size as u32,
        })
    }

    pub fn to_params(&self) -> Params {
        super::params::from_pairs([("block_size", Param::Int(self.block_size as i64))])
    }

    fn encode_typed<T: Element>(&self, x: &[T]) -> Encoded {
        let bs = self.block_size as usize;
        let n_blocks = x.len().div_ceil(bs);
        let mut payload = vec![0u8; n_blocks * 4 + x.len().div_ceil(8)];
        let (scales, signs) = payload.split_at_mut(n_blocks * 4);
        let per = task_blocks(bs);
        crate::pool::install(|| {
            x.par_chunks(per * bs)
                .zip(scales.par_chunks_mut(per * 4))
                .zip(signs.par_chunks_mut(per * bs / 8))
                .for_each(|((xs, scales), signs)| {
                    let blocks = xs.chunks(bs).zip(scales.chunks_mut(4));
                    for ((block, scale), signs) in blocks.zip(signs.chunks_mut(bs / 8)) {
                        scale.copy_from_slice(&mean_abs(block).to_le_bytes());
                        for (byte, eight) in signs.iter_mut().zip(block.chunks(8)) {
                            *byte = sign_byte(eight);
                        }
                    }
                })
        });
        let n_exc = collect_exceptions(x, 0, &mut payload);
        let mut meta = LeWriter(Vec::new());
        meta.u32(self.block_size).u64(n_exc);
        Encoded {
            meta: meta.0,
            payload,
        }
    }
}

impl Encoder for SignConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        Ok(crate::dispatch!(Data, x, |v| self.encode_typed(v)))
    }
}

/// A parsed, validated sign metadata block for one tensor.
#[derive(Debug)]
struct SignDecoder {
    block_size: u32,
    n_exceptions: u64,
    numel: u64,
}

impl SignDecoder {
    fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "sign metadata");
        let block_size = r.u32("block_size")?;
        let n_exceptions = r.u64("exception count")?;
        r.finish()?;
        ensure_format!(
            (BLOCK_RANGE.0..=BLOCK_RANGE.1).contains(&(block_size as i64)) && block_size % 8 == 0,
            "sign: block_size {block_size} is not a multiple of 8 in [8, 2^20]"
        );
        ensure_format!(
            n_exceptions <= frame.numel,
            "sign: {n_exceptions} exceptions for {} values",
            frame.numel
        );
        let expected = frame.numel.div_ceil(block_size as u64) * 4
            + frame.numel.div_ceil(8)
            + exception_bytes(n_exceptions, frame.dtype.size(), "sign")?;
        ensure_format!(
            frame.payload_len == expected,
            "sign: payload is {} bytes, {} values need {expected}",
            frame.payload_len,
            frame.numel
        );
        Ok(SignDecoder {
            block_size,
            n_exceptions,
            numel: frame.numel,
        })
    }

    fn decode_typed<T: Element>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let bs = self.block_size as usize;
        let n_blocks = out.len().div_ceil(bs);
        let (scales, rest) = payload.split_at(n_blocks * 4);
        let (signs, exceptions) = rest.split_at(out.len().div_ceil(8));
        let per = task_blocks(bs);
        crate::pool::install(|| {
            out.par_chunks_mut(per * bs)
                .zip(scales.par_chunks(per * 4))
                .zip(signs.par_chunks(per * bs / 8))
                .try_for_each(|((out, scales), signs)| {
                    let blocks = out.chunks_mut(bs).zip(scales.chunks(4));
                    for ((block, scale), signs) in blocks.zip(signs.chunks(bs / 8)) {
                        let m = f32::from_le_bytes(scale.try_into().unwrap());
                        ensure_format!(
                            m.is_finite() && m >= 0.0,
                            "sign: a block scale is {m}, not a finite value >= 0"
                        );
                        let pm = [T::from_f64(m as f64), T::from_f64(-(m as f64))];
                        for (&byte, eight) in signs.iter().zip(block.chunks_mut(8)) {
                            for (j, v) in eight.iter_mut().enumerate() {
                                *v = pm[(byte >> j & 1) as usize];
                            }
                        }
                    }
                    Ok(())
                })
        })?;
        apply_exceptions(exceptions, out, "sign")
    }
}

impl Decoder for SignDecoder {
    fn params(&self) -> Params {
        SignConfig {
            block_size: self.block_size,
        }
        .to_params()
    }

    fn stats(&self) -> Params {
        super::params::from_pairs([
            (
                "n_blocks",
                Param::Int(self.numel.div_ceil(self.block_size as u64) as i64),
            ),
            ("n_exceptions", Param::Int(self.n_exceptions as i64)),
        ])
    }

    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        super::check_out_len(out.len(), self.numel)?;
        crate::dispatch!(DataMut, out, |o| self.decode_typed(payload, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(x: &[f32], block_size: u32) -> Vec<f32> {
        let p = SignConfig { block_size }.to_params();
        crate::codec::testing::round_trip_f32(&INFO, &p, x).0
    }

    #[test]
    fn every_value_keeps_its_sign_and_its_block_mean_magnitude() {
        let x: Vec<f32> = crate::rng::normal_f32(1000, 3);
        let y = round_trip(&x, 64);
        for (xb, yb) in x.chunks(64).zip(y.chunks(64)) {
            let m = (xb.iter().map(|v| v.abs() as f64).sum::<f64>() / xb.len() as f64) as f32;
            for (a, b) in xb.iter().zip(yb) {
                assert_eq!(a.is_sign_negative(), b.is_sign_negative());
                assert_eq!(b.abs(), m);
            }
        }
    }

    #[test]
    fn specials_are_exact_and_zeros_keep_their_sign_bit() {
        let mut x = vec![1.0f32; 24];
        x[1] = f32::NAN;
        x[2] = f32::NEG_INFINITY;
        x[3] = -0.0;
        x[4] = 0.0;
        let y = round_trip(&x, 8);
        assert!(y[1].is_nan());
        assert_eq!(y[2], f32::NEG_INFINITY);
        assert!(y[3] < 0.0 && y[4] > 0.0);
    }

    #[test]
    fn bad_block_sizes_and_payload_lengths_are_typed_errors() {
        let p = |v: i64| super::super::params::from_pairs([("block_size", Param::Int(v))]);
        for bad in [0, 4, 12, 1 << 21] {
            assert!(SignConfig::from_params(&p(bad)).is_err(), "{bad}");
        }
        let enc = SignConfig::default()
            .encode(Data::F32(&[1.0; 300]))
            .unwrap();
        let mut frame = crate::codec::testing::frame_f32(&enc, 300);
        frame.payload_len -= 1;
        assert!(matches!(
            SignDecoder::parse(&enc.meta, frame),
            Err(crate::error::Error::Format(_))
        ));
    }
}

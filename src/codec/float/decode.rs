//! The float decode path (docs/CODECS.md, "Floating point"): the metadata read and checked
//! against the frame ([`FloatDecoder::parse`]), then each chunk of `CHUNK` codes turned back
//! into float32 in parallel (a table for narrow codes, `half` for fp16, bit shifts for the
//! formats with float32's exponent; S2FP8's table holds the unsqueezed values), and written as
//! the tensor's dtype.

use super::header::Header;
use super::minifloat::MiniFloat;
use super::{Kind, CHUNK};
use crate::bits::peek64;
use crate::codec::kernel_io::ToF32;
use crate::codec::Frame;
use crate::error::{ensure_format, Error, Result};
use half::f16;

/// A float decoder opened on validated metadata.
pub struct FloatDecoder {
    pub(super) header: Header,
    pub(super) numel: u64,
}

impl FloatDecoder {
    /// Opens the metadata of codec `kind` for a payload framed as `frame` (its length must be
    /// exactly what `frame.numel` codes need).
    pub(super) fn parse(kind: Kind, meta: &[u8], frame: Frame) -> Result<Self> {
        let header = Header::read(kind, meta)?;
        let name = kind.name();
        let width = header.cfg.kind.format().map_or(32, |f| f.width()) as u64;
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
        Ok(FloatDecoder {
            header,
            numel: frame.numel,
        })
    }

    pub(super) fn decode_typed<T: ToF32>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let fmt = self.header.cfg.kind.format();
        let width = fmt.map_or(32, |f| f.width()) as usize;
        // Lookup table for codes up to 16 bits (fp16 decodes through F16C-capable `half`);
        // S2FP8's holds the unsqueezed values.
        let lut: Vec<f32> = match (fmt, self.header.squeeze) {
            (Some(f), Some(s)) => s.decode_table(f),
            (Some(f), None) if width <= 16 && f.ebits != 8 && width != 16 => {
                (0..1u32 << width).map(|c| f.value(c)).collect()
            }
            _ => Vec::new(),
        };
        let kind = self.header.cfg.kind;
        let src_len = CHUNK * width / 8;
        crate::pool::for_each_chunk_mut(out, CHUNK, |ci, dst| {
            let src = &payload[ci * src_len..payload.len().min((ci + 1) * src_len)];
            let mut tmp = vec![0f32; dst.len()];
            decode_chunk(kind, fmt, &lut, src, &mut tmp);
            T::from_f32_slice(&tmp, dst);
        });
        Ok(())
    }
}

/// The float32 values of one chunk's codes (`lut`: every code's value, for the narrow formats).
fn decode_chunk(kind: Kind, fmt: Option<MiniFloat>, lut: &[f32], src: &[u8], dst: &mut [f32]) {
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
            // F16C where the CPU has it (the `half` crate converts one value at a time here).
            crate::simd::Widen::widen(&h, dst);
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

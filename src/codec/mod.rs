//! The codecs and their registry. A codec turns a typed buffer into (metadata, payload) bytes and
//! back; the packed format (src/format) frames them. Codecs know nothing of files or Python.
//!
//! Adding a codec: one file here, one line in [`REGISTRY`], one fixture, its error bound; docs/DESIGN.md
//! walks through it with `sign.rs`.

pub mod bdi;
pub mod exceptions;
pub mod float;
pub mod int;
mod kernel_io;
pub mod lossless;
pub mod params;
pub mod sign;
pub mod smaq;

use crate::dtype::{DType, Data, DataMut};
use crate::error::{Error, Result};
pub use params::{Param, ParamReader, Params};

/// What an encoder produces: codec metadata (parameters, statistics, chunk index) and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub meta: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Encoded {
    /// Splits what [`Encoder::encode_framed`] produced with no lead or tail back into parts.
    pub fn from_framed((mut bytes, meta_len): (Vec<u8>, usize)) -> Self {
        let payload = bytes.split_off(meta_len);
        Encoded {
            meta: bytes,
            payload,
        }
    }

    /// One buffer: `lead` zero bytes, the metadata, the payload, with capacity for `tail` more
    /// bytes; and the metadata's length. The payload is reallocated in place where the allocator
    /// can (mremap) and moved once.
    pub fn into_framed(self, lead: usize, tail: usize) -> (Vec<u8>, usize) {
        let m = self.meta.len();
        let mut bytes = self.payload;
        let n = bytes.len();
        bytes.reserve_exact(lead + m + tail);
        bytes.resize(n + lead + m, 0);
        bytes.copy_within(0..n, lead + m);
        bytes[..lead].fill(0);
        bytes[lead..lead + m].copy_from_slice(&self.meta);
        (bytes, m)
    }
}

/// A configured encoder.
pub trait Encoder: Send + Sync {
    fn encode(&self, x: Data<'_>) -> Result<Encoded>;

    /// Encodes into one buffer laid out as `lead` bytes left to the caller, the metadata, then
    /// the payload, with capacity for `tail` more bytes; returns it and the metadata's length.
    /// The packed format writes its header into the lead, so an encoder that overrides this
    /// writes a large payload once, where it stays. The default moves `encode`'s payload once.
    fn encode_framed(&self, x: Data<'_>, lead: usize, tail: usize) -> Result<(Vec<u8>, usize)> {
        Ok(self.encode(x)?.into_framed(lead, tail))
    }

    /// The packed format version the encoding needs: the lowest that describes its layout, so
    /// that builds reading only older versions still read what did not change.
    fn format_version(&self) -> u8 {
        1
    }
}

/// A decoder opened on validated metadata, for one tensor.
pub trait Decoder: Send + Sync {
    /// The parameters the tensor was encoded with.
    fn params(&self) -> Params;
    /// Statistics recorded at encode time (mean, std, counts of outliers, clamped values...).
    fn stats(&self) -> Params;
    /// Decodes `payload` into `out` (whose length is the tensor's element count).
    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()>;
    /// Decodes like [`Decoder::decode`], every value clamped into `range` as
    /// [`crate::zmap::clamp`] does (NaN stays NaN). A codec whose values come from a table
    /// clamps the table and its few other values instead of making a second pass over `out`.
    fn decode_clamped(&self, payload: &[u8], range: [f64; 2], out: DataMut<'_>) -> Result<()> {
        crate::dispatch!(DataMut, out, |o| {
            self.decode(payload, crate::dtype::Element::wrap_mut(&mut *o))?;
            crate::zmap::clamp_all(o, range);
            Ok(())
        })
    }
    /// Length of the pieces the tensor can be decoded in independently (the last may be
    /// shorter), or None when it decodes only whole. A caller that works piece by piece (the
    /// fused optimizer step) then uses each piece while it is still in cache.
    fn piece_len(&self) -> Option<usize> {
        None
    }
    /// Decodes piece `i` (see [`Decoder::piece_len`]) into `out`, which has its length.
    fn decode_piece(&self, payload: &[u8], i: usize, out: DataMut<'_>) -> Result<()> {
        let _ = (payload, i, out);
        Err(Error::Layout(
            "this codec decodes only whole tensors".into(),
        ))
    }
}

/// Where the packed tensor's metadata is opened: everything a decoder may check against.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// The packed format version of the tensor.
    pub version: u8,
    pub dtype: DType,
    pub numel: u64,
    pub payload_len: u64,
}

/// Builds a configured encoder from parameters.
pub type EncoderFn = fn(&Params) -> Result<Box<dyn Encoder>>;
/// Opens a decoder on one tensor's metadata.
pub type DecoderFn = fn(meta: &[u8], frame: Frame) -> Result<Box<dyn Decoder>>;

/// One registered codec.
pub struct CodecInfo {
    /// Stable on-disk id (docs/FORMAT.md). Never reuse an id.
    pub id: u16,
    pub name: &'static str,
    pub doc: &'static str,
    pub defaults: fn() -> Params,
    pub encoder: EncoderFn,
    pub decoder: DecoderFn,
    /// Whether a round trip under these (valid) parameters gives back every exact zero as a
    /// zero. Callers that need exact zeros keep a zero map beside a codec that does not.
    pub keeps_zeros: fn(&Params) -> Result<bool>,
}

/// Every codec smaq_rs knows.
pub static REGISTRY: &[&CodecInfo] = &[
    &smaq::INFO,
    &float::INFO_FP32,
    &float::INFO_FP16,
    &float::INFO_BF16,
    &float::INFO_FP8,
    &float::INFO_S2FP8,
    &float::INFO_MANTISSA,
    &int::INFO_INT,
    &int::INFO_LUQ,
    &bdi::INFO,
    &lossless::INFO,
    &sign::INFO,
];

/// The guard every decoder runs first: the output buffer holds exactly the tensor's elements.
pub fn check_out_len(out_len: usize, numel: u64) -> Result<()> {
    if out_len as u64 != numel {
        return Err(Error::Layout(format!(
            "output buffer has {out_len} elements, the tensor has {numel}"
        )));
    }
    Ok(())
}

pub fn by_name(name: &str) -> Result<&'static CodecInfo> {
    REGISTRY
        .iter()
        .copied()
        .find(|c| c.name == name)
        .ok_or_else(|| {
            let names: Vec<_> = REGISTRY.iter().map(|c| c.name).collect();
            Error::Codec(format!(
                "unknown codec {name:?}; available: {}",
                names.join(", ")
            ))
        })
}

/// Whether `info`'s codec with `params` gives back every exact zero. The parameters are checked
/// as the encoder checks them (a `CodecError` when invalid); a `seed` never decides it and is
/// ignored, also by codecs that take none.
pub fn keeps_zeros(info: &CodecInfo, params: &Params) -> Result<bool> {
    let mut p = params.clone();
    p.remove("seed");
    (info.encoder)(&p)?;
    (info.keeps_zeros)(&p)
}

pub fn by_id(id: u16) -> Result<&'static CodecInfo> {
    REGISTRY
        .iter()
        .copied()
        .find(|c| c.id == id)
        .ok_or_else(|| Error::Format(format!("unknown codec id {id} in packed tensor")))
}

/// Round trips for the codecs' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The frame a decoder opens the encoding `enc` of `numel` float32 values with.
    pub fn frame_f32(enc: &Encoded, numel: usize) -> Frame {
        Frame {
            version: crate::format::VERSION,
            dtype: DType::F32,
            numel: numel as u64,
            payload_len: enc.payload.len() as u64,
        }
    }

    /// `x` encoded by `info`'s codec under `p` and decoded as float32: the values, the decoder
    /// and the payload's length in bytes.
    pub fn round_trip_f32(
        info: &CodecInfo,
        p: &Params,
        x: &[f32],
    ) -> (Vec<f32>, Box<dyn Decoder>, usize) {
        let enc = (info.encoder)(p).unwrap().encode(Data::F32(x)).unwrap();
        let d = (info.decoder)(&enc.meta, frame_f32(&enc, x.len())).unwrap();
        let mut out = vec![f32::NAN; x.len()];
        d.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
        (out, d, enc.payload.len())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::round_trip_f32;
    use super::*;

    /// The registry's `keeps_zeros` is checked against round trips: every codec that says it
    /// keeps zeros gives back each of the many zeros of a tensor as zero, under its defaults
    /// and under the parameters that decide it.
    #[test]
    fn keeps_zeros_agrees_with_round_trips() {
        let mut x = crate::rng::normal_f32(70_000, 5);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 5 {
                0 => *v = 0.0,
                1 if i % 3 == 0 => *v = -0.0,
                _ => {}
            }
        }
        let s = |v: &str| Param::Str(v.into());
        let mut cases: Vec<(&str, Params)> =
            REGISTRY.iter().map(|c| (c.name, Params::new())).collect();
        for scheme in ["affine", "absmax"] {
            for rounding in ["nearest", "stochastic", "dithered"] {
                cases.push((
                    "int",
                    params::from_pairs([("scheme", s(scheme)), ("rounding", s(rounding))]),
                ));
            }
        }
        cases.push((
            "nnw_bdi",
            params::from_pairs([("scale_delta", Param::Int(2))]),
        ));
        cases.push(("smaq", params::from_pairs([("log", Param::Bool(true))])));
        let mut said = [0, 0];
        for (name, p) in cases {
            let info = by_name(name).unwrap();
            let keeps = keeps_zeros(info, &p).unwrap();
            said[keeps as usize] += 1;
            let y = round_trip_f32(info, &p, &x).0;
            let lost = x
                .iter()
                .zip(&y)
                .filter(|(a, b)| **a == 0.0 && **b != 0.0)
                .count();
            if keeps {
                assert_eq!(lost, 0, "{name} {p:?} says it keeps zeros but lost {lost}");
            }
        }
        assert!(said[0] > 0 && said[1] > 0);
        // A seed never decides it, also for codecs that take none.
        let seeded = params::from_pairs([("seed", Param::Int(1))]);
        assert!(keeps_zeros(by_name("fp32").unwrap(), &seeded).unwrap());
        assert!(matches!(
            keeps_zeros(
                by_name("int").unwrap(),
                &params::from_pairs([("bits", Param::Int(99))])
            ),
            Err(Error::Codec(_))
        ));
    }
}

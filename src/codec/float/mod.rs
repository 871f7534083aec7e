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
//!
//! The files: `minifloat` (the formats, their codes' values and the rounding of one float32 to
//! one code), `shift_squeeze` (S2FP8's per-tensor transform and its fit), `squeeze_codes`
//! (S2FP8's codes from per-tensor magnitude thresholds), `header` (the metadata bytes),
//! `encode` and `decode` (the chunked, parallel paths) and `x86` (the AVX2 and AVX-512 kernels of
//! the encoder). This file holds the configuration, the registry entries and the codec traits.

mod decode;
mod encode;
mod header;
mod minifloat;
mod shift_squeeze;
mod squeeze_codes;
#[cfg(test)]
mod test_values;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use decode::FloatDecoder;
pub use minifloat::MiniFloat;

use super::{CodecInfo, Decoder, Encoded, Encoder, Param, ParamReader, Params};
use crate::dtype::{Data, DataMut};
use crate::error::Result;
use minifloat::{NEAREST, TRUNCATE};

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
    const fn name(self) -> &'static str {
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
    fn format(self) -> Option<MiniFloat> {
        Some(match self {
            Kind::Fp32 => return None,
            Kind::Fp16 => MiniFloat::ieee(5, 10),
            Kind::Bf16 => MiniFloat::ieee(8, 7),
            Kind::Fp8 { e5m2: true } | Kind::S2fp8 => MiniFloat::ieee(5, 2),
            Kind::Fp8 { e5m2: false } => MiniFloat::E4M3FN,
            Kind::Mantissa { bits } => MiniFloat::ieee(8, bits as u32),
        })
    }
}

/// The configuration of one float codec.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatConfig {
    pub kind: Kind,
    /// `nearest` (0), `stochastic` (1) or `truncate` (2), numbered as the metadata stores them.
    pub rounding: u8,
    /// `overflow="saturate"`: finite overflows become +-max instead of Inf (NaN in e4m3fn).
    pub saturate: bool,
    /// The stochastic rounding's seed (`None`: a fresh one per encoding).
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
            name: $kind.name(),
            doc: $doc,
            defaults: || FloatConfig::defaults($kind).to_params(),
            encoder: |p| Ok(Box::new(FloatConfig::from_params($kind, p)?)),
            decoder: |meta, frame| Ok(Box::new(FloatDecoder::parse($kind, meta, frame)?)),
            // Every float format has signed zeros (s2fp8 maps 0 to its zero code).
            keeps_zeros: |_| Ok(true),
        };
    };
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

impl Decoder for FloatDecoder {
    fn params(&self) -> Params {
        self.header.cfg.to_params()
    }

    fn stats(&self) -> Params {
        let mut p = Params::new();
        let width = self.header.cfg.kind.format().map_or(32, |f| f.width());
        p.insert("bits_per_code".into(), Param::Int(width as i64));
        if let Some(s) = self.header.squeeze {
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
    use super::test_values::{round_trip, samples};
    use super::*;
    use half::{bf16, f16};

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

    #[test]
    fn bf16_matches_half_crate() {
        let x = samples();
        let (y, _) = round_trip(Kind::Bf16, &Params::new(), &x);
        for (a, b) in x.iter().zip(&y) {
            let want = bf16::from_f32(*a).to_f32();
            assert!(want.to_bits() == b.to_bits(), "{a}: {b} != {want}");
        }
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
}

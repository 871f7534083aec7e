//! The float codecs' metadata bytes (docs/CODECS.md, "Floating point"): rounding,
//! overflow mode, format byte (fp8's e4m3/e5m2, mantissa's bit count), a reserved zero byte, the
//! seed (u64), then S2FP8's alpha and beta (f32 each). Written by the encoder, read and validated
//! by the decoder.

use super::minifloat::STOCHASTIC;
use super::shift_squeeze::LogShiftSqueeze;
use super::{FloatConfig, Kind};
use crate::error::{ensure_format, Result};
use crate::le::{LeReader, LeWriter};

/// Metadata: rounding, overflow, seed, and S2FP8's alpha and beta.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) cfg: FloatConfig,
    pub(super) squeeze: Option<LogShiftSqueeze>,
}

impl Header {
    pub(super) fn new(cfg: FloatConfig, squeeze: Option<LogShiftSqueeze>) -> Self {
        Header { cfg, squeeze }
    }

    pub(super) fn write(&self) -> Vec<u8> {
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

    /// Reads and validates the metadata of codec `kind` (the registry entry: its format byte
    /// says which fp8 or mantissa variant), all of it.
    pub(super) fn read(kind: Kind, meta: &[u8]) -> Result<Self> {
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
            Some(LogShiftSqueeze { alpha, beta })
        } else {
            None
        };
        r.finish()?;
        let cfg = FloatConfig {
            kind,
            rounding,
            saturate: saturate == 1,
            seed: (rounding == STOCHASTIC).then_some(seed),
        };
        Ok(Header::new(cfg, squeeze))
    }
}

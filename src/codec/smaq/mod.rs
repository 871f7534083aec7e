//! SmaQ: z-score mixed-width quantization (docs/CODECS.md, "SmaQ"; layout in docs/FORMAT.md).
//!
//! Each element becomes one self-delimiting code, written LSB first:
//!
//! ```text
//!   main    (|z| <= t_main):  bit 0 = 0, bit 1 = sign, bits 2.. = round(|z| * r_main)       bits_main wide
//!   outlier (|z| >  t_main):  bit 0 = 1, bit 1 = sign, bits 2.. = round((|z|-t_main) * r_out) bits_outlier wide
//! ```
//!
//! so a chunk of n values with o outliers takes exactly (n-o)*bits_main + o*bits_outlier bits,
//! rounded up to a byte. Chunks are independent (their outlier counts are in the chunk index), so
//! encode and decode run one chunk per Rayon task. Decoding is one table lookup per element: the
//! low max(bits_main, bits_outlier) bits of the stream index a table of (decoded value, width).
//!
//! Values beyond `t_outlier` (|z| > t_outlier) do not fit an outlier code. By default
//! (`outliers="escape"`) they keep the code the research algorithm gives them, on the same grid as
//! every outlier: the outlier code saturates at its largest magnitude, and a per-chunk escape
//! stream holds, for each value whose magnitude goes further, its position (gap from the previous
//! escape) and how far beyond the saturated magnitude it lies, both as exponential-Golomb codes
//! whose orders are chosen per chunk. So no value is clamped, the error is the research
//! algorithm's, and the tail costs a few bits per escaped value (measured in docs/CODECS.md).
//! `outliers="clamp"` clamps them at t_outlier (counted in `n_clamped`); `outliers="exact"` keeps
//! them bit-exact in the exception list.
//!
//! Non-finite values (and, with `outliers="exact"`, values beyond `t_outlier`) are kept bit-exact
//! in a per-chunk exception list (u32 index in the chunk + the raw element), patched after
//! decoding.
//!
//! The files: this one holds the configuration, its parameters and the registry entry; `encode`
//! (the whole-tensor encoder, chunk by chunk), `piece` (the piece encoder of the fused optimizer
//! step), `log` (the log domain), `escape` (the escape stream, written and patched back), `meta`
//! (the header and the chunk index, written and parsed), `decode` (the decoder) and `kernel`
//! (the hot loops: values to codes, codes to bytes, bytes to values).

mod decode;
mod encode;
mod escape;
mod kernel;
mod log;
mod meta;
mod piece;

pub use piece::{EncodedPiece, PieceEncoder, PieceOutput, PieceScratch, Primary};

use super::{CodecInfo, Param, ParamReader, Params};
use crate::error::{Error, Result};
use crate::stats::{Sampling, Spread, Stats};
use decode::SmaqDecoder;
use kernel::{Prep, Quant};

pub const ID: u16 = 1;

pub static INFO: CodecInfo = CodecInfo {
    id: ID,
    name: "smaq",
    doc: "SmaQ z-score mixed-width quantization: main values (|z| <= t_main) in bits_main bits, \
          outliers in bits_outlier bits; NaN/Inf kept exactly.",
    defaults: || SmaqConfig::default().to_params(),
    encoder: |p| Ok(Box::new(SmaqConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(SmaqDecoder::parse(meta, frame)?)),
    keeps_zeros: |_| Ok(true),
};

const ROUNDINGS: [&str; 3] = ["stochastic", "nearest", "truncate"];
const STATS: [&str; 2] = ["exact", "sampled"];
const STDS: [&str; 2] = ["std", "range"];
const OUTLIERS: [&str; 3] = ["escape", "clamp", "exact"];

/// Default [`SmaqConfig::escape_bits`]: the tail 8x finer than the outlier grid. Measured: the
/// embedding gradient through a tied softmax head (whose self-logits sit ~14 std out) has 6.7%
/// relative error on the outlier grid, under 2% at 3 bits; the escape stream grows by 3 bits
/// per escaped value (about 1-5% of values on real tensors).
const ESCAPE_BITS: u8 = 3;

/// What happens to values beyond `t_outlier`, which an outlier code cannot span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outliers {
    /// Coded on the outlier grid past its end, in the chunk's escape stream (the default).
    Escape = 0,
    /// Clamped to t_outlier: smallest, and loses the tail (counted in `n_clamped`).
    Clamp = 1,
    /// Kept bit-exact in the exception list (index + raw element each).
    Exact = 2,
}

/// How a scaled magnitude becomes an integer code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rounding {
    /// floor(v + u), u uniform in [0, 1): unbiased.
    Stochastic = 0,
    /// Round half away from zero.
    Nearest = 1,
    /// Toward zero.
    Truncate = 2,
}

/// The full configuration of the SmaQ codec.
#[derive(Debug, Clone, PartialEq)]
pub struct SmaqConfig {
    pub bits_main: u8,
    pub bits_outlier: u8,
    pub t_main: f32,
    pub t_outlier: f32,
    pub sampling: Sampling,
    pub spread: Spread,
    pub rounding: Rounding,
    /// Seed of stochastic rounding (and of sampling); `None` draws a fresh one per call. The seed
    /// used is recorded in the packed tensor.
    pub seed: Option<u64>,
    pub all_positive: bool,
    /// Code ln(x) instead of x (format version 2): relative precision at every magnitude, for
    /// non-negative tensors spanning orders of magnitude (Adam's exp_avg_sq). Zeros stay exact;
    /// negative and non-finite values are kept exactly in the exception list.
    pub log: bool,
    /// What happens to values beyond t_outlier.
    pub outliers: Outliers,
    /// Escaped values are coded on a grid 2^escape_bits times finer than the outliers' (they are
    /// few, and the far tail is where consumers such as softmax need absolute precision).
    pub escape_bits: u8,
    /// Tensors with fewer elements are stored uncompressed.
    pub min_size: u32,
    /// Elements per independently coded chunk.
    pub chunk_size: u32,
}

impl Default for SmaqConfig {
    fn default() -> Self {
        Self {
            bits_main: 6,
            bits_outlier: 8,
            t_main: 1.0,
            t_outlier: 2.5,
            // Exact statistics by default: they make the error deterministic, where k = 4096
            // samples moved the RMSE by +-8% from seed to seed. Their cost is one pass bound by
            // memory bandwidth (8 of the 37 ms of a 64M-value encode, measured). `stats="sampled"`
            // (k, seed) is there.
            sampling: Sampling::Exact,
            spread: Spread::Std,
            rounding: Rounding::Stochastic,
            seed: None,
            all_positive: false,
            log: false,
            outliers: Outliers::Escape,
            escape_bits: ESCAPE_BITS,
            min_size: 8,
            chunk_size: 1 << 16,
        }
    }
}

impl SmaqConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let d = Self::default();
        let mut r = ParamReader::new("smaq", p);
        let bits_main = r.int("bits_main", d.bits_main as i64, 3, 16)? as u8;
        let bits_outlier = r.int("bits_outlier", d.bits_outlier as i64, 3, 16)? as u8;
        let t_main = r.float("t_main", d.t_main as f64, 1e-3, 1e3)? as f32;
        let t_outlier = r.float("t_outlier", d.t_outlier as f64, 1e-3, 1e6)? as f32;
        let stats = r.choice("stats", 0, &STATS)?;
        let k = r.int("k", 4096, 1, u32::MAX as i64)? as u32;
        let seed = r.opt_u64("seed")?;
        let spread = [Spread::Std, Spread::Range][r.choice("std", 0, &STDS)?];
        let rounding = [Rounding::Stochastic, Rounding::Nearest, Rounding::Truncate]
            [r.choice("rounding", 0, &ROUNDINGS)?];
        let all_positive = r.bool("all_positive", d.all_positive)?;
        let log = r.bool("log", d.log)?;
        let outliers = [Outliers::Escape, Outliers::Clamp, Outliers::Exact]
            [r.choice("outliers", 0, &OUTLIERS)?];
        let escape_bits = r.int("escape_bits", d.escape_bits as i64, 0, 16)? as u8;
        let min_size = r.int("min_size", d.min_size as i64, 0, u32::MAX as i64)? as u32;
        let chunk_size = r.int("chunk_size", d.chunk_size as i64, 64, 1 << 30)? as u32;
        r.finish()?;
        if bits_outlier < bits_main {
            return Err(Error::Codec(format!(
                "codec \"smaq\": bits_outlier ({bits_outlier}) must be at least bits_main ({bits_main})"
            )));
        }
        if t_outlier <= t_main {
            return Err(Error::Codec(format!(
                "codec \"smaq\": t_outlier ({t_outlier}) must be greater than t_main ({t_main})"
            )));
        }
        let sampling = if stats == 0 {
            Sampling::Exact
        } else {
            Sampling::Sampled { k, seed: 0 }
        };
        Ok(Self {
            bits_main,
            bits_outlier,
            t_main,
            t_outlier,
            sampling,
            spread,
            rounding,
            seed,
            all_positive,
            log,
            outliers,
            escape_bits,
            min_size,
            chunk_size,
        })
    }

    pub fn to_params(&self) -> Params {
        let (stats, k) = match self.sampling {
            Sampling::Exact => ("exact", 4096),
            Sampling::Sampled { k, .. } => ("sampled", k),
        };
        let s = |v: &str| Param::Str(v.to_string());
        crate::codec::params::from_pairs([
            ("bits_main", Param::Int(self.bits_main as i64)),
            ("bits_outlier", Param::Int(self.bits_outlier as i64)),
            ("t_main", Param::Float(self.t_main as f64)),
            ("t_outlier", Param::Float(self.t_outlier as f64)),
            ("stats", s(stats)),
            ("k", Param::Int(k as i64)),
            (
                "seed",
                self.seed.map_or(Param::None, |v| Param::Int(v as i64)),
            ),
            ("std", s(STDS[(self.spread == Spread::Range) as usize])),
            ("rounding", s(ROUNDINGS[self.rounding as usize])),
            ("all_positive", Param::Bool(self.all_positive)),
            ("log", Param::Bool(self.log)),
            ("outliers", s(OUTLIERS[self.outliers as usize])),
            ("escape_bits", Param::Int(self.escape_bits as i64)),
            ("min_size", Param::Int(self.min_size as i64)),
            ("chunk_size", Param::Int(self.chunk_size as i64)),
        ])
    }

    fn quant(&self) -> Quant {
        Quant::new(
            self.bits_main,
            self.bits_outlier,
            self.t_main,
            self.t_outlier,
        )
    }

    /// How values are turned into codes under these statistics.
    fn prep(&self, stats: Stats) -> Prep {
        Prep {
            q: self.quant(),
            mean: stats.mean,
            inv_std: 1.0 / stats.std,
            key: None,
            dither: if self.rounding == Rounding::Nearest {
                0.5
            } else {
                0.0
            },
            f32_ok: Prep::f32_safe(stats.mean, stats.std),
        }
    }
}

/// Encodes `x` and decodes it back, for the tests of every part: the decoded values, the
/// decoder (its header and chunk spans) and the payload's length.
#[cfg(test)]
fn round_trip(cfg: &SmaqConfig, x: &[f32]) -> (Vec<f32>, SmaqDecoder, usize) {
    use crate::codec::{Decoder, Encoder};
    use crate::dtype::{Data, DataMut};

    let enc = cfg.encode(Data::F32(x)).unwrap();
    let frame = crate::codec::testing::frame_f32(&enc, x.len());
    let h = SmaqDecoder::parse(&enc.meta, frame).unwrap();
    let mut out = vec![0f32; x.len()];
    h.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
    (out, h, enc.payload.len())
}

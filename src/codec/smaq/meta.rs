//! A SmaQ tensor's metadata (layout in docs/FORMAT.md): the [`Header`] with its flags and the
//! [`ChunkIndex`] entries, how they are written, and how they are parsed and checked into a
//! [`SmaqDecoder`] that knows where every chunk's streams lie in the payload ([`Span`]).

use super::decode::SmaqDecoder;
use super::{Outliers, Rounding, SmaqConfig};
use crate::codec::Frame;
use crate::error::{ensure_format, Result};
use crate::le::{LeReader, LeWriter};
use crate::stats::{Sampling, Spread};

/// One chunk's entry in the chunk index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ChunkIndex {
    /// Values coded as outliers (escaped ones included).
    pub(super) outliers: u32,
    /// Entries of the exception list.
    pub(super) exceptions: u32,
    /// Entries of the escape stream (format version 2).
    pub(super) escapes: u32,
    /// Bytes of the escape stream.
    pub(super) escape_bytes: u32,
}

/// Everything in a SmaQ tensor's metadata. Layout in docs/FORMAT.md.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) cfg: SmaqConfig,
    pub(super) mean: f64,
    pub(super) std: f64,
    pub(super) clamped: u64,
    pub(super) nonfinite: u64,
    /// Stored uncompressed (fewer than min_size elements).
    pub(super) raw: bool,
    /// The chunk index.
    pub(super) chunks: Vec<ChunkIndex>,
}

/// Where one chunk's streams lie in the payload (byte ranges).
#[derive(Debug, Clone)]
pub(super) struct Span {
    pub(super) primary: std::ops::Range<usize>,
    pub(super) extra: std::ops::Range<usize>,
    pub(super) exceptions: std::ops::Range<usize>,
    pub(super) escapes: std::ops::Range<usize>,
    /// Bits the extra stream must hold: outliers * (bits_outlier - bits_main).
    pub(super) extra_bits: u64,
}

const FLAG_ALL_POSITIVE: u8 = 1;
const FLAG_EXACT_OUTLIERS: u8 = 2;
const FLAG_SAMPLED: u8 = 4;
const FLAG_RANGE_STD: u8 = 8;
const FLAG_RAW: u8 = 16;
/// Values beyond t_outlier escape (format version 2): the chunk index has four fields per chunk.
const FLAG_ESCAPE: u8 = 32;
/// Values are coded as ln(x) (format version 2).
const FLAG_LOG: u8 = 64;
const FLAGS_KNOWN: u8 = 127;

impl Header {
    /// Bytes of the metadata of a tensor coded in `n_chunks` chunks.
    pub(super) fn len_for(n_chunks: usize, escape: bool) -> usize {
        68 + 4 * escape as usize + Self::entry_len(escape) * n_chunks
    }

    /// Bytes of one chunk index entry.
    fn entry_len(escape: bool) -> usize {
        if escape {
            16
        } else {
            8
        }
    }

    pub(super) fn write(&self) -> Vec<u8> {
        let c = &self.cfg;
        let (k, sampled) = match c.sampling {
            Sampling::Exact => (0, 0),
            Sampling::Sampled { k, .. } => (k, FLAG_SAMPLED),
        };
        let flags = (c.all_positive as u8 * FLAG_ALL_POSITIVE)
            | ((c.outliers == Outliers::Exact) as u8 * FLAG_EXACT_OUTLIERS)
            | ((c.outliers == Outliers::Escape) as u8 * FLAG_ESCAPE)
            | (c.log as u8 * FLAG_LOG)
            | sampled
            | ((c.spread == Spread::Range) as u8 * FLAG_RANGE_STD)
            | (self.raw as u8 * FLAG_RAW);
        let escape = c.outliers == Outliers::Escape;
        let mut w = LeWriter(Vec::with_capacity(Self::len_for(self.chunks.len(), escape)));
        w.u8(c.bits_main)
            .u8(c.bits_outlier)
            .u8(c.rounding as u8)
            .u8(flags);
        w.f32(c.t_main)
            .f32(c.t_outlier)
            .u32(c.chunk_size)
            .u32(k)
            .u64(c.seed.unwrap_or(0));
        w.f64(self.mean)
            .f64(self.std)
            .u64(self.clamped)
            .u64(self.nonfinite);
        w.u32(c.min_size).u32(self.chunks.len() as u32);
        if escape {
            w.u8(c.escape_bits).bytes(&[0; 3]);
        }
        for c in &self.chunks {
            w.u32(c.outliers).u32(c.exceptions);
            if escape {
                w.u32(c.escapes).u32(c.escape_bytes);
            }
        }
        w.0
    }
}

impl SmaqDecoder {
    /// Parses the metadata `meta` of the tensor `frame` describes and checks it: the header, the
    /// chunk index, and every chunk's byte ranges against the payload's length.
    pub(super) fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "smaq header");
        let bits_main = r.u8("bits_main")?;
        let bits_outlier = r.u8("bits_outlier")?;
        let rounding = r.u8("rounding")?;
        let flags = r.u8("flags")?;
        let t_main = r.f32("t_main")?;
        let t_outlier = r.f32("t_outlier")?;
        let chunk_size = r.u32("chunk_size")?;
        let k = r.u32("k")?;
        let seed = r.u64("seed")?;
        let mean = r.f64("mean")?;
        let std = r.f64("std")?;
        let clamped = r.u64("clamped count")?;
        let nonfinite = r.u64("non-finite count")?;
        let min_size = r.u32("min_size")?;
        let n_chunks = r.u32("chunk count")? as usize;
        ensure_format!(
            (3..=16).contains(&bits_main),
            "smaq: bits_main {bits_main} not in 3..=16"
        );
        ensure_format!(
            (bits_main..=16).contains(&bits_outlier),
            "smaq: bits_outlier {bits_outlier} not in bits_main..=16"
        );
        ensure_format!(rounding <= 2, "smaq: unknown rounding mode {rounding}");
        ensure_format!(
            flags & !FLAGS_KNOWN == 0,
            "smaq: unknown flag bits {flags:#04x}"
        );
        ensure_format!(
            t_main.is_finite() && t_main > 0.0 && t_outlier.is_finite() && t_outlier > t_main,
            "smaq: thresholds t_main={t_main}, t_outlier={t_outlier} are invalid"
        );
        ensure_format!(chunk_size >= 1, "smaq: chunk_size is 0");
        ensure_format!(
            mean.is_finite() && std.is_finite() && std > 0.0,
            "smaq: statistics mean={mean}, std={std} are invalid"
        );
        let escape = flags & FLAG_ESCAPE != 0;
        ensure_format!(
            flags & FLAG_LOG == 0 || frame.version >= 2,
            "smaq: the log domain needs format version 2, the tensor says {}",
            frame.version
        );
        ensure_format!(
            !escape || frame.version >= 2,
            "smaq: escaped outliers need format version 2, the tensor says {}",
            frame.version
        );
        ensure_format!(
            !(escape && flags & FLAG_EXACT_OUTLIERS != 0),
            "smaq: flags {flags:#04x} ask for both escaped and exact outliers"
        );
        let raw = flags & FLAG_RAW != 0;
        let expected_chunks = if raw {
            0
        } else {
            frame.numel.div_ceil(chunk_size as u64)
        };
        ensure_format!(
            n_chunks as u64 == expected_chunks,
            "smaq: header has {n_chunks} chunks, {} elements in chunks of {chunk_size} need {expected_chunks}",
            frame.numel
        );
        let mut escape_bits = 0;
        if escape {
            escape_bits = r.u8("escape_bits")?;
            let reserved = r.take(3, "reserved")?;
            ensure_format!(
                escape_bits <= 16 && reserved == [0, 0, 0],
                "smaq: escape_bits {escape_bits} > 16 or reserved bytes {reserved:?} not zero"
            );
        }
        let entry = Header::entry_len(escape);
        ensure_format!(
            r.remaining() == n_chunks * entry,
            "smaq: chunk index holds {} bytes, expected {} for {n_chunks} chunks",
            r.remaining(),
            n_chunks * entry
        );
        let mut chunks = Vec::with_capacity(n_chunks);
        for _ in 0..n_chunks {
            let mut c = ChunkIndex {
                outliers: r.u32("chunk outliers")?,
                exceptions: r.u32("chunk exceptions")?,
                ..ChunkIndex::default()
            };
            if escape {
                c.escapes = r.u32("chunk escapes")?;
                c.escape_bytes = r.u32("chunk escape bytes")?;
            }
            chunks.push(c);
        }
        r.finish()?;

        let cfg = SmaqConfig {
            bits_main,
            bits_outlier,
            t_main,
            t_outlier,
            sampling: if flags & FLAG_SAMPLED != 0 {
                Sampling::Sampled { k, seed }
            } else {
                Sampling::Exact
            },
            spread: if flags & FLAG_RANGE_STD != 0 {
                Spread::Range
            } else {
                Spread::Std
            },
            rounding: [Rounding::Stochastic, Rounding::Nearest, Rounding::Truncate]
                [rounding as usize],
            seed: Some(seed),
            all_positive: flags & FLAG_ALL_POSITIVE != 0,
            log: flags & FLAG_LOG != 0,
            outliers: if escape {
                Outliers::Escape
            } else if flags & FLAG_EXACT_OUTLIERS != 0 {
                Outliers::Exact
            } else {
                Outliers::Clamp
            },
            escape_bits,
            min_size,
            chunk_size,
        };
        let q = cfg.quant();
        // Chunk byte ranges: all primary streams, then all extra streams, then all exception
        // lists, then all escape streams. Sizes come from the index and are checked against the
        // payload length.
        let esize = 4 + frame.dtype.size() as u64;
        // Per chunk: bytes of (primary, extra, exceptions, escapes), extra bits.
        let mut sizes: Vec<([u64; 4], u64)> = Vec::with_capacity(n_chunks);
        for (ci, c) in chunks.iter().enumerate() {
            let len = (frame.numel - ci as u64 * chunk_size as u64).min(chunk_size as u64);
            let (o, e, x) = (c.outliers as u64, c.exceptions as u64, c.escapes as u64);
            ensure_format!(
                o <= len && e <= len && x <= o,
                "smaq: chunk {ci} claims {o} outliers, {e} exceptions and {x} escapes among {len} \
                 values"
            );
            // An escape stream holds its two order bytes and at least two bits per escape.
            let xb = c.escape_bytes as u64;
            ensure_format!(
                (x == 0 && xb == 0) || (x > 0 && xb >= 2 + x.div_ceil(4) && xb <= 2 + 16 * x),
                "smaq: chunk {ci} has {x} escapes in {xb} bytes"
            );
            let (primary, extra) = q.chunk_bytes(len, o);
            sizes.push(([primary, extra, e * esize, xb], o * q.extra_bits() as u64));
        }
        let mut totals = [0u64; 4];
        for (s, _) in &sizes {
            for (t, v) in totals.iter_mut().zip(s) {
                *t += v;
            }
        }
        let expected = if raw {
            frame.numel * frame.dtype.size() as u64
        } else {
            totals.iter().sum()
        };
        ensure_format!(
            frame.payload_len == expected,
            "smaq: payload is {} bytes, the header implies {expected}",
            frame.payload_len
        );
        // Where each kind of stream starts.
        let mut at = [0usize; 4];
        for k in 1..4 {
            at[k] = at[k - 1] + totals[k - 1] as usize;
        }
        let spans = sizes
            .iter()
            .map(|&(s, bits)| {
                let mut r = [0..0, 0..0, 0..0, 0..0];
                for k in 0..4 {
                    r[k] = at[k]..at[k] + s[k] as usize;
                    at[k] = r[k].end;
                }
                let [primary, extra, exceptions, escapes] = r;
                Span {
                    primary,
                    extra,
                    exceptions,
                    escapes,
                    extra_bits: bits,
                }
            })
            .collect();
        let h = Header {
            cfg,
            mean,
            std,
            clamped,
            nonfinite,
            raw,
            chunks,
        };
        Ok(SmaqDecoder {
            h,
            dtype: frame.dtype,
            numel: frame.numel,
            spans,
            lut_f32: std::sync::OnceLock::new(),
            escapes_log: std::sync::OnceLock::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::Encoder;
    use crate::dtype::Data;
    use crate::rng::normal_f32 as normal;

    #[test]
    fn escape_layout_needs_version_2_and_clamp_keeps_version_1() {
        let x = normal(5000, 12);
        let esc = SmaqConfig::default();
        assert_eq!(esc.format_version(), 2);
        let clamp = SmaqConfig {
            outliers: Outliers::Clamp,
            ..Default::default()
        };
        assert_eq!(clamp.format_version(), 1);
        let enc = esc.encode(Data::F32(&x)).unwrap();
        let frame = Frame {
            version: 1,
            ..crate::codec::testing::frame_f32(&enc, x.len())
        };
        let err = SmaqDecoder::parse(&enc.meta, frame).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }
}

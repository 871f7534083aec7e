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

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::dtype::{DType, Data, DataMut, Element};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use crate::rng::{fresh_seed, stream_key};
use crate::stats::{mean_std, PieceStats, Sampling, Spread, Stats};
mod kernel;

use crate::bits::{get_exp_golomb, put_exp_golomb, BitWriter};
use kernel::{Codes, Counts, Prep, Quant};
use rayon::prelude::*;

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
}

/// Per-chunk result of encoding (its primary stream is written in place).
struct ChunkOut {
    extra: Vec<u8>,
    exceptions: Vec<u8>,
    escapes: Vec<u8>,
    counts: Counts,
    index: ChunkIndex,
}

/// One chunk's entry in the chunk index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ChunkIndex {
    /// Values coded as outliers (escaped ones included).
    outliers: u32,
    /// Entries of the exception list.
    exceptions: u32,
    /// Entries of the escape stream (format version 2).
    escapes: u32,
    /// Bytes of the escape stream.
    escape_bytes: u32,
}

impl Encoder for SmaqConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        Ok(Encoded::from_framed(self.encode_framed(x, 0, 0)?))
    }

    fn format_version(&self) -> u8 {
        // The escape stream and its index fields, and the log domain, are new in version 2.
        if self.outliers == Outliers::Escape || self.log {
            2
        } else {
            1
        }
    }

    fn encode_framed(&self, x: Data<'_>, lead: usize, tail: usize) -> Result<(Vec<u8>, usize)> {
        let seed = self.seed.unwrap_or_else(fresh_seed);
        crate::dispatch!(Data, x, |v| encode_typed(self, seed, v, lead, tail))
    }
}

/// Encodes into one buffer: `lead` bytes for the caller, the metadata, the payload, room for
/// `tail` more. The metadata's size is known up front (it depends on the chunk count only), so
/// the primary streams are written where they stay; returns the buffer and the metadata length.
fn encode_typed<T: Codes>(
    cfg: &SmaqConfig,
    seed: u64,
    x: &[T],
    lead: usize,
    tail: usize,
) -> Result<(Vec<u8>, usize)> {
    let n = x.len() as u64;
    let mut head = Header {
        cfg: SmaqConfig {
            seed: Some(seed),
            ..cfg.clone()
        },
        mean: 0.0,
        std: 1.0,
        clamped: 0,
        nonfinite: 0,
        raw: true,
        chunks: Vec::new(),
    };
    if n < cfg.min_size as u64 {
        head.nonfinite = x.iter().filter(|v| !v.is_finite()).count() as u64;
        let payload = Data::from_typed(x).to_le_bytes();
        return Ok(Encoded {
            meta: head.write(),
            payload,
        }
        .into_framed(lead, tail));
    }
    let sampling = match cfg.sampling {
        Sampling::Sampled { k, .. } => Sampling::Sampled { k, seed },
        s => s,
    };
    let stats = if cfg.log {
        log_stats(x, cfg.spread)
    } else {
        mean_std(x, sampling, cfg.spread)
    };
    let q = cfg.quant();
    let prep = cfg.prep(stats);
    let stochastic = cfg.rounding == Rounding::Stochastic;
    let cs = cfg.chunk_size as usize;
    // The primary streams have known sizes: every chunk writes its own straight into the payload.
    let prim: Vec<usize> = x
        .chunks(cs)
        .map(|c| q.chunk_bytes(c.len() as u64, 0).0 as usize)
        .collect();
    let meta_len = Header::len_for(prim.len(), cfg.outliers == Outliers::Escape);
    let start = lead + meta_len;
    let ptotal: usize = prim.iter().sum();
    // Room for the extra streams (at most bits_outlier - bits_main bits per value, plus a byte of
    // rounding per chunk) and the tail: appending them does not reallocate.
    let extra_room = x.len() * q.extra_bits() as usize / 8 + prim.len();
    let mut chunks: Vec<ChunkOut> = Vec::new();
    // SAFETY: the closure initializes every byte: the head through `zero_init`, each chunk's
    // primary stream through `zero_init` just before it is encoded.
    let mut bytes = unsafe {
        crate::buf::init_with_tail(start + ptotal, extra_room + tail, |b| {
            let (head, mut rest) = b.split_at_mut(start);
            crate::buf::zero_init(head);
            let mut slices = Vec::with_capacity(prim.len());
            for &len in &prim {
                let (this, more) = rest.split_at_mut(len);
                slices.push(this);
                rest = more;
            }
            type Scratch = (Vec<u16>, Vec<f32>);
            let work = |(codes, logs): &mut Scratch,
                        (ci, (c, primary)): (usize, (&[T], &mut [std::mem::MaybeUninit<u8>]))| {
                let key = stochastic.then(|| stream_key(seed, ci as u64));
                let primary = crate::buf::zero_init(primary);
                let p = Prep { key, ..prep };
                if cfg.log {
                    log_values(c, logs);
                    encode_chunk_raw(&logs[..], c, &p, cfg, primary, codes)
                } else {
                    encode_chunk(c, &p, cfg, primary, codes)
                }
            };
            chunks = if crate::pool::parallel(slices.len()) {
                crate::pool::install(|| {
                    x.par_chunks(cs)
                        .zip(slices)
                        .enumerate()
                        .map_init(Scratch::default, work)
                        .collect()
                })
            } else {
                let mut scratch = Scratch::default();
                x.chunks(cs)
                    .zip(slices)
                    .enumerate()
                    .map(|a| work(&mut scratch, a))
                    .collect()
            };
        })
    };
    head.mean = stats.mean;
    head.std = stats.std;
    finish_encoding(head, chunks, &mut bytes, lead);
    Ok((bytes, meta_len))
}

/// The natural logarithm of a positive, finite, normal-or-subnormal f32, in f32 arithmetic that
/// the compiler vectorizes: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m-1)/(m+1))
/// to the s^9 term. Within 2e-7 plus one float32 ulp of ln x of the exact value (tested): far
/// below any SmaQ step. Plain f32 operations in a fixed order, so every machine gets the same bits.
#[inline(always)]
fn ln_f32(x: f32) -> f32 {
    // Subnormals: scale into the normal range first.
    let sub = x < f32::MIN_POSITIVE;
    let x = if sub { x * 16_777_216.0 } else { x };
    let bits = x.to_bits();
    // Exponent relative to the mantissa in [sqrt(1/2), sqrt(2)).
    let adj = bits.wrapping_sub(0x3f35_04f3); // bits of sqrt(1/2)
    let e = (adj as i32 >> 23) as f32 - if sub { 24.0 } else { 0.0 };
    let m = f32::from_bits((adj & 0x007f_ffff).wrapping_add(0x3f35_04f3));
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let poly = 1.0 + s2 * (1.0 / 3.0 + s2 * (0.2 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    e * std::f32::consts::LN_2 + 2.0 * s * poly
}

/// The log domain's coded value of an element `x` whose logarithm is `l` (when x is positive
/// and finite): `l` (the smallest normal f32 for x = 1, whose logarithm would read as the
/// exact-zero code), `zero` for a zero (0.0 to code it exactly, NaN to leave it out of the
/// statistics), NaN for anything else (kept exactly in the exception list).
#[inline(always)]
fn log_code(positive: bool, is_zero: bool, l: f32, zero: f32) -> f32 {
    if positive {
        if l == 0.0 {
            f32::MIN_POSITIVE
        } else {
            l
        }
    } else if is_zero {
        zero
    } else {
        f32::NAN
    }
}

/// [`log_code`] of an f32 (the vectorized logarithm).
#[inline(always)]
fn log_of_f32(x: f32, zero: f32) -> f32 {
    log_code(x > 0.0 && x < f32::INFINITY, x == 0.0, ln_f32(x), zero)
}

/// [`log_code`] of an element of any type: f64 values take the f64 logarithm (they may lie
/// outside float32's range).
#[inline]
fn log_of<T: Element>(v: T, zero: f32) -> f32 {
    if T::DTYPE == crate::dtype::DType::F64 {
        let f = v.to_f64();
        let positive = f > 0.0 && f.is_finite();
        log_code(
            positive,
            f == 0.0,
            if positive { f.ln() as f32 } else { 0.0 },
            zero,
        )
    } else {
        log_of_f32(v.to_f64() as f32, zero)
    }
}

/// The log domain's coded values of `x` into `out`.
fn log_values<T: Element>(x: &[T], out: &mut Vec<f32>) {
    log_codes(x, out, 0.0);
}

/// The values the log domain's statistics are taken over: the logarithms of the positive finite
/// elements (zeros, which are coded exactly, are left out as NaN).
fn log_stat_values<T: Element>(x: &[T], out: &mut Vec<f32>) {
    log_codes(x, out, f32::NAN);
}

/// [`log_of`] of every element of `x` into `out`, zeros becoming `zero`. The f32 loop is
/// compiled again for AVX-512 and AVX2 and chosen at run time: the same IEEE operations in the
/// same order (Rust never contracts a multiply and an add), so the same bits at every level.
fn log_codes<T: Element>(x: &[T], out: &mut Vec<f32>, zero: f32) {
    out.clear();
    let Some(x32) = as_f32(x) else {
        out.extend(x.iter().map(|&v| log_of(v, zero)));
        return;
    };
    out.resize(x32.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx512() {
            // SAFETY: the CPU has AVX-512 F/BW/DQ/VL (checked just above).
            return unsafe { log_f32_avx512(x32, out, zero) };
        }
        if crate::simd::avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { log_f32_avx2(x32, out, zero) };
        }
    }
    log_f32_loop(x32, out, zero);
}

#[inline(always)]
fn log_f32_loop(x: &[f32], out: &mut [f32], zero: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = log_of_f32(v, zero);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn log_f32_avx512(x: &[f32], out: &mut [f32], zero: f32) {
    log_f32_loop(x, out, zero)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn log_f32_avx2(x: &[f32], out: &mut [f32], zero: f32) {
    log_f32_loop(x, out, zero)
}

/// `x` as f32 values when T is f32 (the vectorized path).
fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32.
        unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) }
    })
}

/// [`as_f32`] for a mutable slice.
fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32.
        unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) }
    })
}

/// Exact statistics of the log domain, summed in blocks of [`PieceStats::BLOCK`] in parallel
/// (the same sums as adding the blocks one by one).
fn log_stats<T: Element>(x: &[T], spread: Spread) -> Stats {
    let mut ps = PieceStats::new();
    let block = PieceStats::BLOCK;
    let mut buf = Vec::new();
    // The shift: the first block holding a finite value fixes it.
    let mut start = 0;
    while start < x.len() && ps.shift().is_none() {
        let end = (start + block).min(x.len());
        log_stat_values(&x[start..end], &mut buf);
        ps.add(&buf);
        start = end;
    }
    if let Some(shift) = ps.shift() {
        let rest = crate::pool::map_chunks(&x[start..], block, |_, c| {
            let mut b = Vec::new();
            log_stat_values(c, &mut b);
            PieceStats::moments(&b, shift)
        });
        for m in rest {
            ps.merge(m);
        }
    }
    ps.finish(spread)
}

/// Completes an encoding whose primary streams are in `bytes` after `lead` bytes and room for
/// the metadata: appends every chunk's extra stream, exception list and escape stream, and
/// writes the metadata (from `head`, the chunk tallies filled in here) into its room.
fn finish_encoding(mut head: Header, chunks: Vec<ChunkOut>, bytes: &mut Vec<u8>, lead: usize) {
    let cfg = &head.cfg;
    head.raw = false;
    head.clamped = match cfg.outliers {
        Outliers::Clamp => chunks.iter().map(|c| c.counts.beyond as u64).sum(),
        Outliers::Escape | Outliers::Exact => 0,
    };
    head.nonfinite = chunks.iter().map(|c| c.counts.nonfinite as u64).sum();
    head.chunks = chunks.iter().map(|c| c.index).collect();
    for c in &chunks {
        bytes.extend_from_slice(&c.extra);
    }
    for c in &chunks {
        bytes.extend_from_slice(&c.exceptions);
    }
    for c in &chunks {
        bytes.extend_from_slice(&c.escapes);
    }
    for c in chunks {
        crate::buf::give_scratch(c.extra);
    }
    let meta = head.write();
    bytes[lead..lead + meta.len()].copy_from_slice(&meta);
}

/// Encodes a float32 tensor that is produced one chunk at a time and never held whole (the
/// fused optimizer step): the statistics come first (`stats::PieceStats`), then each chunk is
/// encoded on its own, in any order and on any thread, and [`PieceEncoder::finish`] assembles
/// them. The bytes are those [`Encoder::encode`] writes for the whole tensor when its
/// statistics are the same.
#[derive(Debug)]
pub struct PieceEncoder {
    head: Header,
    prep: Prep,
    numel: usize,
}

/// Scratch space a worker reuses across [`PieceEncoder::encode_piece`] calls.
#[derive(Debug, Default)]
pub struct PieceScratch {
    codes: Vec<u16>,
    logs: Vec<f32>,
}

/// One chunk encoded by a [`PieceEncoder`] (its primary stream is in the [`PieceOutput`]).
pub struct EncodedPiece(ChunkOut);

/// The buffer a [`PieceEncoder`] writes: room for the header and metadata, then every chunk's
/// primary stream, each chunk writing its own in place.
pub struct PieceOutput {
    bytes: Vec<u8>,
    head: usize,
    primary: Vec<usize>,
}

impl PieceOutput {
    /// Each chunk's primary stream, in chunk order, to hand to [`PieceEncoder::encode_piece`].
    pub fn primaries(&mut self) -> Vec<&mut [u8]> {
        let mut rest = &mut self.bytes[self.head..];
        let mut out = Vec::with_capacity(self.primary.len());
        for &len in &self.primary {
            let (this, more) = rest.split_at_mut(len);
            out.push(this);
            rest = more;
        }
        out
    }
}

impl SmaqConfig {
    /// A [`PieceEncoder`] for `numel` values with these statistics; None where the whole
    /// tensor is needed (fewer than `min_size` values: stored raw; sampled statistics).
    pub fn piece_encoder(&self, numel: usize, stats: Stats) -> Option<PieceEncoder> {
        if (numel as u64) < self.min_size as u64 || self.sampling != Sampling::Exact {
            return None;
        }
        let seed = self.seed.unwrap_or_else(fresh_seed);
        let head = Header {
            cfg: SmaqConfig {
                seed: Some(seed),
                ..self.clone()
            },
            mean: stats.mean,
            std: stats.std,
            clamped: 0,
            nonfinite: 0,
            raw: false,
            chunks: Vec::new(),
        };
        Some(PieceEncoder {
            prep: self.prep(stats),
            head,
            numel,
        })
    }

    /// The values this configuration's statistics are taken over, for one piece of a tensor
    /// (`stats::PieceStats`): `x` itself, or in the log domain the logarithms of its positive
    /// elements (in `buf`).
    pub fn stat_values<'a>(&self, x: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
        if self.log {
            log_stat_values(x, buf);
            buf
        } else {
            x
        }
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

impl PieceEncoder {
    /// Values per chunk (the last may be shorter).
    pub fn piece_len(&self) -> usize {
        self.head.cfg.chunk_size as usize
    }

    /// Number of chunks.
    pub fn pieces(&self) -> usize {
        self.numel.div_ceil(self.piece_len())
    }

    /// The packed format version of the result.
    pub fn format_version(&self) -> u8 {
        self.head.cfg.format_version()
    }

    /// The buffer to encode into: `lead` bytes left to the caller, room for the metadata, every
    /// chunk's primary stream (zeroed), capacity for `tail` bytes beyond the rest. It comes from
    /// the cache of recycled buffers where it can (`crate::buf`), as a whole-tensor encode's
    /// does.
    pub fn output(&self, lead: usize, tail: usize) -> PieceOutput {
        let q = &self.prep.q;
        let cs = self.piece_len() as u64;
        let primary: Vec<usize> = (0..self.pieces() as u64)
            .map(|ci| q.chunk_bytes((self.numel as u64 - ci * cs).min(cs), 0).0 as usize)
            .collect();
        let head = lead + Header::len_for(primary.len(), self.escapes());
        let len = head + primary.iter().sum::<usize>();
        // Room for the other streams as encode_typed reserves it: appending does not reallocate.
        let room = self.numel * q.extra_bits() as usize / 8 + 2 * primary.len() + tail;
        // SAFETY: the closure initializes all `len` bytes.
        let bytes = unsafe {
            crate::buf::init_with_tail(len, room, |b| {
                crate::buf::zero_init(b);
            })
        };
        PieceOutput {
            bytes,
            head,
            primary,
        }
    }

    fn escapes(&self) -> bool {
        self.head.cfg.outliers == Outliers::Escape
    }

    /// Encodes chunk `ci`, whose values are `x` (exactly its length), its primary stream into
    /// `primary` (chunk `ci` of [`PieceOutput::primaries`]). `codes` is scratch space a worker
    /// reuses across chunks.
    pub fn encode_piece(
        &self,
        ci: usize,
        x: &[f32],
        primary: &mut [u8],
        scratch: &mut PieceScratch,
    ) -> Result<EncodedPiece> {
        let cs = self.piece_len();
        let want = self.numel.saturating_sub(ci.saturating_mul(cs)).min(cs);
        let q = &self.prep.q;
        if ci >= self.pieces()
            || x.len() != want
            || primary.len() as u64 != q.chunk_bytes(want as u64, 0).0
        {
            return Err(Error::Layout(format!(
                "piece {ci} of a {}-value tensor in pieces of {cs} has {want} values, got {} \
                 (and {} bytes for its primary stream)",
                self.numel,
                x.len(),
                primary.len()
            )));
        }
        let cfg = &self.head.cfg;
        let key = (cfg.rounding == Rounding::Stochastic)
            .then(|| stream_key(cfg.seed.unwrap_or(0), ci as u64));
        let p = Prep { key, ..self.prep };
        let PieceScratch { codes, logs } = scratch;
        Ok(EncodedPiece(if cfg.log {
            log_values(x, logs);
            encode_chunk_raw(&logs[..], x, &p, cfg, primary, codes)
        } else {
            encode_chunk(x, &p, cfg, primary, codes)
        }))
    }

    /// Completes the encoding in `out` from every chunk's [`EncodedPiece`] in chunk order;
    /// returns the buffer (laid out as [`Encoder::encode_framed`]'s) and the metadata length.
    pub fn finish(
        self,
        out: PieceOutput,
        pieces: Vec<EncodedPiece>,
        lead: usize,
    ) -> Result<(Vec<u8>, usize)> {
        let meta_len = Header::len_for(pieces.len(), self.escapes());
        if pieces.len() != self.pieces() || out.head != lead + meta_len {
            return Err(Error::Layout(format!(
                "{} pieces given, the tensor has {}; or the output was made for another lead",
                pieces.len(),
                self.pieces()
            )));
        }
        let mut bytes = out.bytes;
        let chunks = pieces.into_iter().map(|p| p.0).collect();
        finish_encoding(self.head, chunks, &mut bytes, lead);
        Ok((bytes, meta_len))
    }
}

/// Encodes one chunk: primary stream into `primary`, the rest returned. `codes` is scratch space
/// reused across the chunks of one worker.
fn encode_chunk<T: Codes>(
    x: &[T],
    p: &Prep,
    cfg: &SmaqConfig,
    primary: &mut [u8],
    codes: &mut Vec<u16>,
) -> ChunkOut {
    encode_chunk_raw(x, x, p, cfg, primary, codes)
}

/// [`encode_chunk`] of coded values `x` whose exceptions are stored as the elements of `raw`
/// (the tensor itself; in the log domain `x` holds the logarithms).
fn encode_chunk_raw<T: Codes, R: Element>(
    x: &[T],
    raw: &[R],
    p: &Prep,
    cfg: &SmaqConfig,
    primary: &mut [u8],
    codes: &mut Vec<u16>,
) -> ChunkOut {
    // Room for every value being an outlier, plus the SIMD kernels' slack (one vector): the
    // stream never reallocates.
    let room = ((x.len() + 1024) * p.q.extra_bits() as usize).div_ceil(8) + 8;
    let mut extra = BitWriter::from_vec(crate::buf::scratch(room));
    let counts = match T::encode_fused(x, p, primary, &mut extra) {
        Some(c) => c,
        None => {
            codes.resize(x.len(), 0);
            let c = T::codes(x, p, codes);
            kernel::pack(codes, &p.q, primary, &mut extra);
            c
        }
    };
    let mut list = LeWriter(Vec::new());
    let mut index = ChunkIndex {
        outliers: counts.outliers,
        ..ChunkIndex::default()
    };
    let mut escapes = Vec::new();
    let tails = counts.beyond > 0 && cfg.outliers != Outliers::Clamp;
    // Exceptions: non-finite values always, values beyond t_outlier with `outliers="exact"` (and
    // escapes too far out for the escape stream). Escapes: values beyond t_outlier whose code
    // goes past the saturated outlier magnitude. Candidates come from a vector scan against
    // slightly widened bounds (non-finite values always among them), then are tested exactly.
    if counts.nonfinite > 0 || tails {
        let t_out = p.q.t_outlier as f64;
        let (lo, hi) = if tails {
            let w = t_out * (1.0 - 1e-9) / p.inv_std;
            (p.mean - w, p.mean + w)
        } else {
            (f64::NEG_INFINITY, f64::INFINITY)
        };
        // The kernel counted them: room for all (the scan's bounds are wider by 1e-9 relative).
        let expected = (counts.beyond + counts.nonfinite) as usize;
        let mut candidates = Vec::with_capacity(expected + expected / 64 + 8);
        kernel::outside(x, lo, hi, &mut candidates);
        let grid = EscapeGrid::new(&p.q, cfg.escape_bits);
        let mut tail = Vec::with_capacity(candidates.len());
        for i in candidates {
            let f = x[i as usize].to_f64();
            let exact = |list: &mut LeWriter| {
                list.u32(i);
                list.bytes(&raw[i as usize].to_bits_u64().to_le_bytes()[..R::DTYPE.size()]);
            };
            if !f.is_finite() {
                exact(&mut list);
                index.exceptions += 1;
                continue;
            }
            let a = ((f - p.mean) * p.inv_std).abs();
            if !tails || f == 0.0 || a <= t_out {
                continue;
            }
            match escape_residual(a, i, p, &grid) {
                Some(0) if cfg.outliers == Outliers::Escape => {}
                Some(r) if cfg.outliers == Outliers::Escape => tail.push((i, r - 1)),
                _ => {
                    exact(&mut list);
                    index.exceptions += 1;
                }
            }
        }
        if !tail.is_empty() {
            escapes = write_escapes(&tail);
            index.escapes = tail.len() as u32;
            index.escape_bytes = escapes.len() as u32;
        }
    }
    ChunkOut {
        extra: extra.finish(),
        exceptions: list.0,
        escapes,
        counts,
        index,
    }
}

/// Largest residual the escape stream holds; a value further out goes to the exception list.
const MAX_RESIDUAL: f64 = (1u64 << 31) as f64;

/// How many steps of the escape grid beyond the saturated outlier magnitude the code of
/// |z| = `a` (> t_outlier) lies: `round((a - t_main) * scale) - base` ([`EscapeGrid`]), rounded
/// as configured (stochastic rounding draws from the chunk's stream at element `i`). None when
/// it is too far out for the escape stream.
fn escape_residual(a: f64, i: u32, p: &Prep, g: &EscapeGrid) -> Option<u32> {
    let u = match p.key {
        Some(key) => crate::rng::uniform(key, i) as f64,
        None => p.dither as f64,
    };
    let code = ((a - g.t_main) * g.scale + u).floor();
    let r = (code - g.base).max(0.0);
    (r < MAX_RESIDUAL).then_some(r as u32)
}

/// The grid of escaped values: the outlier grid past its end, `2^escape_bits` times finer. An
/// escape with residual `r` stands for `|z| = t_main + (base + 1 + r) / scale`.
struct EscapeGrid {
    t_main: f64,
    scale: f64,
    base: f64,
}

impl EscapeGrid {
    fn new(q: &kernel::Quant, escape_bits: u8) -> Self {
        let fine = (1u32 << escape_bits) as f64;
        EscapeGrid {
            t_main: q.t_main as f64,
            scale: q.r_out as f64 * fine,
            base: q.max_out as f64 * fine,
        }
    }

    fn z(&self, r: u32) -> f64 {
        self.t_main + (self.base + 1.0 + r as f64) / self.scale
    }
}

/// The order of exponential-Golomb code that codes `values` in the fewest bits. The best order
/// lies near log2 of the mean value; the orders within two of it are costed exactly.
fn best_order(values: &[u32]) -> u32 {
    let mean = values.iter().map(|&v| v as u64).sum::<u64>() / values.len().max(1) as u64;
    let centre = 63 - (mean + 1).leading_zeros();
    (centre.saturating_sub(2)..=(centre + 2).min(31))
        .min_by_key(|&k| {
            values
                .iter()
                .map(|&v| crate::bits::exp_golomb_len(v, k) as u64)
                .sum::<u64>()
        })
        .unwrap_or(0)
}

/// One chunk's escape stream: two bytes (the exponential-Golomb orders of the gaps and of the
/// residuals), then per escape the gap from the previous escape's index (the first counts from
/// -1) and the residual beyond the saturated code minus one.
fn write_escapes(tail: &[(u32, u32)]) -> Vec<u8> {
    let mut prev = -1i64;
    let gaps: Vec<u32> = tail
        .iter()
        .map(|&(i, _)| {
            let g = (i as i64 - prev - 1) as u32;
            prev = i as i64;
            g
        })
        .collect();
    let residuals: Vec<u32> = tail.iter().map(|&(_, r)| r).collect();
    let (k_gap, k_res) = (best_order(&gaps), best_order(&residuals));
    let mut w = BitWriter::with_capacity_bits(16 + tail.len() * 24);
    w.put(k_gap, 8);
    w.put(k_res, 8);
    for (&g, &r) in gaps.iter().zip(&residuals) {
        put_exp_golomb(&mut w, g, k_gap);
        put_exp_golomb(&mut w, r, k_res);
    }
    w.finish()
}

/// Everything in a SmaQ tensor's metadata. Layout in docs/FORMAT.md.
#[derive(Debug, Clone)]
struct Header {
    cfg: SmaqConfig,
    mean: f64,
    std: f64,
    clamped: u64,
    nonfinite: u64,
    /// Stored uncompressed (fewer than min_size elements).
    raw: bool,
    /// The chunk index.
    chunks: Vec<ChunkIndex>,
}

/// Where one chunk's streams lie in the payload (byte ranges).
#[derive(Debug, Clone)]
struct Span {
    primary: std::ops::Range<usize>,
    extra: std::ops::Range<usize>,
    exceptions: std::ops::Range<usize>,
    escapes: std::ops::Range<usize>,
    /// Bits the extra stream must hold: outliers * (bits_outlier - bits_main).
    extra_bits: u64,
}

/// A parsed, validated SmaQ header plus the chunk byte ranges it implies.
#[derive(Debug)]
struct SmaqDecoder {
    h: Header,
    dtype: DType,
    numel: u64,
    spans: Vec<Span>,
    /// The float32 decode table, built on the first piece decoded into float32 (the optimizer
    /// decodes its state piece by piece; a log-domain table costs an exp per code).
    lut_f32: std::sync::OnceLock<Vec<f32>>,
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
    fn len_for(n_chunks: usize, escape: bool) -> usize {
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

    fn write(&self) -> Vec<u8> {
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
    fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
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
        })
    }

    fn decode_typed<T: Element>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        if self.h.raw {
            return crate::dtype::fill_from_le_bytes(&mut T::wrap_mut(out), payload);
        }
        let q = self.h.cfg.quant();
        let lut = self.table::<T>(&q);
        let cs = self.h.cfg.chunk_size as usize;
        crate::pool::try_for_each_chunk_mut(out, cs, |ci, dst| {
            self.decode_chunk(payload, &q, &lut, ci, dst)
        })
    }

    /// The decoded value of every code (the log domain's values already exponentiated).
    fn table<T: Element>(&self, q: &kernel::Quant) -> Vec<T> {
        let h = &self.h;
        if h.cfg.log {
            kernel::table_log::<T>(q, h.mean, h.std)
        } else {
            kernel::table::<T>(q, h.mean, h.std, h.cfg.all_positive)
        }
    }

    /// Decodes chunk `ci` into `dst` (its length) with the value table `lut`.
    fn decode_chunk<T: Element>(
        &self,
        payload: &[u8],
        q: &kernel::Quant,
        lut: &[T],
        ci: usize,
        dst: &mut [T],
    ) -> Result<()> {
        let s = &self.spans[ci];
        let esize = 4 + T::DTYPE.size();
        let (primary, extra) = (&payload[s.primary.clone()], &payload[s.extra.clone()]);
        let exc = &payload[s.exceptions.clone()];
        let used = kernel::unpack(primary, extra, q, lut, dst);
        ensure_format!(
            used == s.extra_bits,
            "smaq: chunk {ci} flags {} outliers, the index says {}",
            used / q.extra_bits().max(1) as u64,
            s.extra_bits / q.extra_bits().max(1) as u64
        );
        let n_escapes = self.h.chunks[ci].escapes;
        if n_escapes > 0 {
            self.patch_escapes(&payload[s.escapes.clone()], primary, q, ci, n_escapes, dst)?;
        }
        let mut prev: Option<usize> = None;
        for e in exc.chunks_exact(esize) {
            let i = u32::from_le_bytes(e[..4].try_into().unwrap()) as usize;
            ensure_format!(
                i < dst.len() && prev.is_none_or(|p| i > p),
                "smaq: chunk {ci} exception index {i} is out of order or out of range"
            );
            let mut raw = [0u8; 8];
            raw[..esize - 4].copy_from_slice(&e[4..]);
            dst[i] = T::from_bits_u64(u64::from_le_bytes(raw));
            prev = Some(i);
        }
        Ok(())
    }

    /// Writes the escaped values of chunk `ci` (see [`write_escapes`]) over their saturated
    /// outlier codes in `dst`; their signs are the codes' sign bits in `primary`.
    fn patch_escapes<T: Element>(
        &self,
        stream: &[u8],
        primary: &[u8],
        q: &kernel::Quant,
        ci: usize,
        n: u32,
        dst: &mut [T],
    ) -> Result<()> {
        let bad = || Error::Format(format!("smaq: chunk {ci}: escape stream is corrupt"));
        let (k_gap, k_res) = (stream[0] as u32, stream[1] as u32);
        ensure_format!(
            k_gap <= 31 && k_res <= 31,
            "smaq: chunk {ci}: escape code orders {k_gap}, {k_res} exceed 31"
        );
        let bits = &stream[2..];
        let (mean, std) = (self.h.mean, self.h.std);
        let floor = if self.h.cfg.all_positive {
            0.0
        } else {
            -T::MAX_F64
        };
        let grid = EscapeGrid::new(q, self.h.cfg.escape_bits);
        let bm = q.bits_main as usize;
        let mut pos = 0usize;
        let mut next = 0usize;
        for _ in 0..n {
            let gap = get_exp_golomb(bits, &mut pos, k_gap).ok_or_else(bad)? as usize;
            let r = get_exp_golomb(bits, &mut pos, k_res).ok_or_else(bad)?;
            let i = next + gap;
            ensure_format!(
                i < dst.len(),
                "smaq: chunk {ci}: escape at index {i} is out of range ({} values)",
                dst.len()
            );
            let negative = crate::bits::get(primary, i * bm + 1, 1) == 1;
            let z = grid.z(r);
            let mut v = mean + if negative { -z } else { z } * std;
            if self.h.cfg.log {
                v = v.exp();
            }
            dst[i] = T::from_f64(v.clamp(floor, T::MAX_F64));
            next = i + 1;
        }
        ensure_format!(
            pos.div_ceil(8) == bits.len(),
            "smaq: chunk {ci}: escape stream has {} bytes, its codes take {}",
            bits.len(),
            pos.div_ceil(8)
        );
        Ok(())
    }

    fn decode_piece_typed<T: Element>(
        &self,
        payload: &[u8],
        i: usize,
        out: &mut [T],
    ) -> Result<()> {
        let cs = self.h.cfg.chunk_size as usize;
        let n = self.numel as usize;
        let want = n.saturating_sub(i.saturating_mul(cs)).min(cs);
        if self.h.raw || i >= self.spans.len() || out.len() != want {
            return Err(Error::Layout(format!(
                "piece {i} of a {n}-value tensor in pieces of {cs} has {want} values, the \
                 buffer {}",
                out.len()
            )));
        }
        let q = self.h.cfg.quant();
        if let Some(out32) = as_f32_mut(out) {
            let lut = self.lut_f32.get_or_init(|| self.table::<f32>(&q));
            return self.decode_chunk(payload, &q, lut, i, out32);
        }
        let lut = self.table::<T>(&q);
        self.decode_chunk(payload, &q, &lut, i, out)
    }
}

impl Decoder for SmaqDecoder {
    fn params(&self) -> Params {
        self.h.cfg.to_params()
    }

    fn stats(&self) -> Params {
        let h = &self.h;
        let sum = |f: fn(&ChunkIndex) -> u32| h.chunks.iter().map(|c| f(c) as u64).sum::<u64>();
        let (outliers, exceptions, escapes) = (
            sum(|c| c.outliers),
            sum(|c| c.exceptions),
            sum(|c| c.escapes),
        );
        crate::codec::params::from_pairs([
            ("mean", Param::Float(h.mean)),
            ("std", Param::Float(h.std)),
            ("n_outliers", Param::Int(outliers as i64)),
            ("n_clamped", Param::Int(h.clamped as i64)),
            ("n_nonfinite", Param::Int(h.nonfinite as i64)),
            ("n_exceptions", Param::Int(exceptions as i64)),
            ("n_escapes", Param::Int(escapes as i64)),
            ("escape_bytes", Param::Int(sum(|c| c.escape_bytes) as i64)),
            ("n_chunks", Param::Int(h.chunks.len() as i64)),
            ("stored_raw", Param::Bool(h.raw)),
        ])
    }

    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        if out.dtype() != self.dtype || out.len() as u64 != self.numel {
            return Err(Error::Layout(format!(
                "output buffer is {} x {}, the tensor is {} x {}",
                out.len(),
                out.dtype().name(),
                self.numel,
                self.dtype.name()
            )));
        }
        crate::dispatch!(DataMut, out, |o| self.decode_typed(payload, o))
    }

    fn piece_len(&self) -> Option<usize> {
        (!self.h.raw).then_some(self.h.cfg.chunk_size as usize)
    }

    fn decode_piece(&self, payload: &[u8], i: usize, out: DataMut<'_>) -> Result<()> {
        if out.dtype() != self.dtype {
            return Err(Error::Layout(format!(
                "output buffer is {}, the tensor is {}",
                out.dtype().name(),
                self.dtype.name()
            )));
        }
        crate::dispatch!(DataMut, out, |o| self.decode_piece_typed(payload, i, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rng::normal_f32 as normal;

    fn round_trip(cfg: &SmaqConfig, x: &[f32]) -> (Vec<f32>, SmaqDecoder, usize) {
        let enc = cfg.encode(Data::F32(x)).unwrap();
        let frame = Frame {
            version: crate::format::VERSION,
            dtype: DType::F32,
            numel: x.len() as u64,
            payload_len: enc.payload.len() as u64,
        };
        let h = SmaqDecoder::parse(&enc.meta, frame).unwrap();
        let mut out = vec![0f32; x.len()];
        h.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
        (out, h, enc.payload.len())
    }

    #[test]
    fn nearest_error_within_half_step() {
        let x = normal(200_000, 1);
        let cfg = SmaqConfig {
            rounding: Rounding::Nearest,
            chunk_size: 4096,
            ..Default::default()
        };
        let (y, h, _) = round_trip(&cfg, &x);
        let q = cfg.quant();
        let std = h.h.std as f32;
        let mean = h.h.mean as f32;
        for (a, b) in x.iter().zip(&y) {
            let z = ((a - mean) / std).abs();
            let bound = if z <= q.t_main {
                std / (2.0 * q.r_main)
            } else {
                // Escaped values beyond t_outlier stay on the outlier grid: no clamping.
                std / (2.0 * q.r_out) * (1.0 + 1e-3 * z)
            };
            assert!(
                (a - b).abs() <= bound * 1.001 + 1e-6,
                "{a} -> {b}, bound {bound}"
            );
        }
    }

    #[test]
    fn payload_is_exactly_the_bit_count() {
        let x = normal(100_000, 2);
        let cfg = SmaqConfig {
            chunk_size: 1000,
            sampling: Sampling::Exact,
            ..Default::default()
        };
        let (_, h, payload) = round_trip(&cfg, &x);
        // 6 bits per value in the primary stream, 2 more per outlier; each rounded to bytes.
        let expected: u64 = h
            .h
            .chunks
            .iter()
            .enumerate()
            .map(|(ci, c)| {
                let len = (x.len() - ci * 1000).min(1000) as u64;
                (len * 6).div_ceil(8) + (c.outliers as u64 * 2).div_ceil(8) + c.escape_bytes as u64
            })
            .sum();
        assert_eq!(payload as u64, expected);
        let outliers: u64 = h.h.chunks.iter().map(|c| c.outliers as u64).sum();
        let frac = outliers as f64 / x.len() as f64;
        assert!((frac - 0.3173).abs() < 0.01, "outlier fraction {frac}");
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let x = normal(300_000, 3);
        let cfg = SmaqConfig {
            seed: Some(9),
            chunk_size: 1024,
            ..Default::default()
        };
        let a = cfg.encode(Data::F32(&x)).unwrap();
        let b = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| cfg.encode(Data::F32(&x)).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn special_values_survive() {
        let mut x = normal(10_000, 4);
        x[5] = f32::NAN;
        x[77] = f32::INFINITY;
        x[9999] = f32::NEG_INFINITY;
        x[100] = 50.0;
        let cfg = SmaqConfig {
            outliers: Outliers::Exact,
            chunk_size: 512,
            ..Default::default()
        };
        let (y, h, _) = round_trip(&cfg, &x);
        assert!(y[5].is_nan());
        assert_eq!(y[77], f32::INFINITY);
        assert_eq!(y[9999], f32::NEG_INFINITY);
        assert_eq!(y[100], 50.0);
        assert_eq!(h.h.nonfinite, 3);
        assert!(h.h.std < 2.0, "NaN/Inf must not poison the statistics");
    }

    #[test]
    fn clamping_is_counted() {
        let mut x = normal(10_000, 5);
        x[10] = 100.0;
        let cfg = SmaqConfig {
            outliers: Outliers::Clamp,
            ..Default::default()
        };
        let (y, h, _) = round_trip(&cfg, &x);
        assert!(h.h.clamped >= 1);
        let top = (h.h.mean + cfg.t_outlier as f64 * h.h.std) as f32;
        assert!((y[10] - top).abs() < 1e-3 * top.abs());
    }

    #[test]
    fn all_positive_never_decodes_negative() {
        let x: Vec<f32> = normal(50_000, 6).iter().map(|v| v * v * 1e-6).collect();
        let cfg = SmaqConfig {
            all_positive: true,
            ..Default::default()
        };
        let (y, _, _) = round_trip(&cfg, &x);
        assert!(y.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn small_tensors_are_raw() {
        let x = [1.5f32, -2.0, f32::NAN];
        let (y, h, payload) = round_trip(&SmaqConfig::default(), &x);
        assert!(h.h.raw);
        assert_eq!(payload, 12);
        assert_eq!(y[..2], x[..2]);
        assert!(y[2].is_nan());
    }

    #[test]
    fn every_bit_width_round_trips() {
        let x = normal(5000, 7);
        for bm in 3..=16u8 {
            for bo in [bm, bm.max(8), 16] {
                let cfg = SmaqConfig {
                    bits_main: bm,
                    bits_outlier: bo,
                    rounding: Rounding::Nearest,
                    ..Default::default()
                };
                let (y, h, _) = round_trip(&cfg, &x);
                let q = cfg.quant();
                let tol = h.h.std as f32 * (0.5 / q.r_main.min(q.r_out)) * 1.01 + 1e-6;
                for (a, b) in x.iter().zip(&y) {
                    let z = ((a - h.h.mean as f32) / h.h.std as f32).abs();
                    if z <= q.t_outlier {
                        assert!((a - b).abs() <= tol, "bm={bm} bo={bo}: {a} -> {b}");
                    }
                }
            }
        }
    }

    /// The research algorithm (never clamps), in f64, nearest rounding: the value each element
    /// must decode to.
    fn research_nearest(x: &[f32], q: &kernel::Quant, mean: f64, std: f64) -> Vec<f64> {
        x.iter()
            .map(|&v| {
                let z = (v as f64 - mean) / std;
                let a = z.abs();
                let (t, r) = if a <= q.t_main as f64 {
                    (0.0, q.r_main as f64)
                } else {
                    (q.t_main as f64, q.r_out as f64)
                };
                let m = ((a - t) * r + 0.5).floor() / r + t;
                mean + z.signum() * m * std
            })
            .collect()
    }

    #[test]
    fn escaped_tails_decode_on_the_research_grid() {
        // Heavy tails: a Student-t-like mix with values up to ~10^4 std.
        let mut x = normal(200_000, 11);
        for (i, v) in x.iter_mut().enumerate() {
            if i % 37 == 0 {
                *v *= 25.0;
            }
            if i % 1001 == 0 {
                *v *= 100.0;
            }
        }
        x[5] = 2.0e3;
        x[6] = -2.0e3;
        // escape_bits 0: exactly the research grid.
        let cfg = SmaqConfig {
            rounding: Rounding::Nearest,
            chunk_size: 4096,
            escape_bits: 0,
            ..Default::default()
        };
        let (y, h, _) = round_trip(&cfg, &x);
        assert_eq!(h.h.clamped, 0);
        let escapes: u64 = h.h.chunks.iter().map(|c| c.escapes as u64).sum();
        assert!(escapes > 1000, "{escapes} escapes");
        let q = cfg.quant();
        let want = research_nearest(&x, &q, h.h.mean, h.h.std);
        for (i, (&a, &b)) in want.iter().zip(&y).enumerate() {
            let tol = 1e-6 * a.abs().max(h.h.std);
            assert!(
                (a - b as f64).abs() <= tol,
                "element {i}: research {a}, decoded {b} (input {})",
                x[i]
            );
        }
        // The default finer escape grid: values beyond t_outlier within half a fine step.
        let fine = SmaqConfig {
            escape_bits: 3,
            ..cfg
        };
        let (y, h, _) = round_trip(&fine, &x);
        let half = h.h.std / (2.0 * q.r_out as f64 * 8.0);
        let mut seen = 0;
        for (&a, &b) in x.iter().zip(&y) {
            if ((a as f64 - h.h.mean) / h.h.std).abs() > q.t_outlier as f64 {
                let err = (a as f64 - b as f64).abs();
                assert!(err <= half * 1.001 + 1e-6 * (a as f64).abs(), "{a} -> {b}");
                seen += 1;
            }
        }
        assert!(seen > 1000);
    }

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
            dtype: DType::F32,
            numel: x.len() as u64,
            payload_len: enc.payload.len() as u64,
        };
        let err = SmaqDecoder::parse(&enc.meta, frame).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn corrupt_escape_streams_are_format_errors() {
        let mut x = normal(20_000, 13);
        x[100] = 1e4;
        x[200] = -1e4;
        let enc = SmaqConfig {
            chunk_size: 20_000,
            ..Default::default()
        }
        .encode(Data::F32(&x))
        .unwrap();
        let frame = Frame {
            version: 2,
            dtype: DType::F32,
            numel: x.len() as u64,
            payload_len: enc.payload.len() as u64,
        };
        let h = SmaqDecoder::parse(&enc.meta, frame).unwrap();
        let span = h.spans[0].escapes.clone();
        assert!(span.len() > 2);
        let mut out = vec![0f32; x.len()];
        // Every byte of the stream flipped in turn: an error or a decode, never a panic; the
        // order bytes and the last byte are always caught.
        for at in span.clone() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut p = enc.payload.clone();
                p[at] ^= flip;
                let r = h.decode(&p, DataMut::F32(&mut out));
                if at == span.start && flip == 0xff {
                    assert!(r.is_err());
                }
            }
        }
        // Truncated streams do not parse.
        let mut meta = enc.meta.clone();
        let n = meta.len();
        meta[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(SmaqDecoder::parse(&meta, frame).is_err());
    }

    #[test]
    fn piece_encoder_writes_the_whole_tensor_encoding() {
        let mut x = normal(150_000, 14);
        x[3] = f32::NAN;
        x[4] = 40.0;
        let positive: Vec<f32> = x.iter().map(|v| (v * 2.0).exp() * 1e-6).collect();
        for (cfg, x) in [
            (
                SmaqConfig {
                    seed: Some(4),
                    log: true,
                    ..Default::default()
                },
                &positive,
            ),
            (
                SmaqConfig {
                    seed: Some(5),
                    ..Default::default()
                },
                &x,
            ),
            (
                SmaqConfig {
                    seed: Some(6),
                    rounding: Rounding::Nearest,
                    outliers: Outliers::Exact,
                    chunk_size: 4096,
                    ..Default::default()
                },
                &x,
            ),
        ] {
            let whole = cfg.encode(Data::F32(x)).unwrap();
            let mut ps = PieceStats::new();
            let mut buf = Vec::new();
            for c in x.chunks(PieceStats::BLOCK) {
                ps.add(cfg.stat_values(c, &mut buf));
            }
            let stats = ps.finish(cfg.spread);
            let enc = cfg.piece_encoder(x.len(), stats).unwrap();
            let cs = enc.piece_len();
            let mut codes = PieceScratch::default();
            let mut out = enc.output(3, 8);
            let mut prim = out.primaries();
            // Out of order on purpose: pieces are independent.
            let mut pieces: Vec<(usize, EncodedPiece)> = x
                .chunks(cs)
                .enumerate()
                .rev()
                .map(|(ci, c)| (ci, enc.encode_piece(ci, c, prim[ci], &mut codes).unwrap()))
                .collect();
            pieces.sort_by_key(|p| p.0);
            assert!(enc.encode_piece(0, &x[..10], prim[0], &mut codes).is_err());
            drop(prim);
            let (bytes, meta_len) = enc
                .finish(out, pieces.into_iter().map(|p| p.1).collect(), 3)
                .unwrap();
            assert_eq!(&bytes[3..3 + meta_len], &whole.meta[..]);
            assert_eq!(&bytes[3 + meta_len..], &whole.payload[..]);
        }
        let small = SmaqConfig::default();
        assert!(small
            .piece_encoder(4, mean_std(&x[..4], Sampling::Exact, Spread::Std))
            .is_none());
    }

    #[test]
    fn log_domain_keeps_relative_precision_zeros_and_the_rest_exactly() {
        // Adam's exp_avg_sq spans orders of magnitude: 1e-14 .. 1e-2 here.
        let mut x: Vec<f32> = normal(100_000, 15)
            .iter()
            .map(|v| (v * 3.0).exp() * 1e-8)
            .collect();
        x[0] = 0.0;
        x[1] = 1.0;
        x[2] = -3.0;
        x[3] = f32::NAN;
        x[4] = f32::INFINITY;
        x[5] = 1e30;
        let cfg = SmaqConfig {
            log: true,
            rounding: Rounding::Nearest,
            chunk_size: 8192,
            ..Default::default()
        };
        assert_eq!(cfg.format_version(), 2);
        let (y, h, _) = round_trip(&cfg, &x);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[2], -3.0);
        assert!(y[3].is_nan());
        assert_eq!(y[4], f32::INFINITY);
        let q = cfg.quant();
        // In the log domain: half a main step, half an outlier step, half a fine escape step.
        let std = h.h.std;
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate().skip(5) {
            let z = ((a as f64).ln() - h.h.mean).abs() / std;
            let half = if z <= q.t_main as f64 {
                0.5 / q.r_main as f64
            } else {
                0.5 / q.r_out as f64
            } * std;
            let err = ((b as f64).ln() - (a as f64).ln()).abs();
            assert!(err <= half * 1.001 + 1e-6, "element {i}: {a} -> {b}");
        }
        // A relative error for all magnitudes, where the linear grid loses the small values.
        let lin = SmaqConfig {
            rounding: Rounding::Nearest,
            all_positive: true,
            chunk_size: 8192,
            ..Default::default()
        };
        let (yl, _, _) = round_trip(&lin, &x);
        let small = |y: &[f32]| {
            x.iter()
                .zip(y)
                .skip(6)
                .filter(|(a, _)| **a < 1e-9)
                .map(|(a, b)| ((b - a) / a).abs() as f64)
                .sum::<f64>()
        };
        assert!(
            small(&y) * 100.0 < small(&yl),
            "{} vs {}",
            small(&y),
            small(&yl)
        );
    }

    #[test]
    fn fast_logarithm_is_within_an_ulp_of_libm() {
        // Error in units of (2e-7 + one f32 ulp of the result): the result's own rounding.
        let err = |y: f32| {
            let want = (y as f64).ln();
            (ln_f32(y) as f64 - want).abs() / (2e-7 + want.abs() * f32::EPSILON as f64)
        };
        let mut worst = 0f64;
        let mut x = f32::from_bits(1); // the smallest subnormal
        while x < f32::MAX / 2.0 {
            for y in [x, x * 1.000_001, x * 1.37, x * 1.999] {
                worst = worst.max(err(y));
            }
            x *= 1.9;
        }
        // Every mantissa near 1, where the cancellation would show.
        for i in 0..100_000u32 {
            worst = worst.max(err(f32::from_bits(0x3f80_0000 - 50_000 + i)));
        }
        assert!(worst <= 1.0, "worst {worst}");
        assert_eq!(log_of_f32(1.0, 0.0), f32::MIN_POSITIVE);
        assert_eq!(log_of_f32(0.0, 0.0), 0.0);
        assert!(log_of_f32(0.0, f32::NAN).is_nan());
        assert!(log_of_f32(-1.0, 0.0).is_nan());
        assert!(log_of_f32(f32::INFINITY, 0.0).is_nan());
        assert!(log_of_f32(f32::NAN, 0.0).is_nan());
    }

    #[test]
    fn vector_logarithms_give_the_portable_bits() {
        let mut rng = crate::rng::SplitMix64::new(11);
        let mut x: Vec<f32> = (0..10_000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .collect();
        x.extend([
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
        ]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -1.0]);
        for zero in [0.0, f32::NAN] {
            let mut want = vec![0f32; x.len()];
            log_f32_loop(&x, &mut want, zero);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            #[cfg(target_arch = "x86_64")]
            {
                let mut got = vec![0f32; x.len()];
                if crate::simd::avx512() {
                    // SAFETY: AVX-512 is present.
                    unsafe { log_f32_avx512(&x, &mut got, zero) };
                    assert_eq!(bits(&got), bits(&want));
                }
                if crate::simd::avx2() {
                    // SAFETY: AVX2 is present.
                    unsafe { log_f32_avx2(&x, &mut got, zero) };
                    assert_eq!(bits(&got), bits(&want));
                }
            }
            let mut got = Vec::new();
            log_codes(&x, &mut got, zero);
            assert_eq!(bits(&got), bits(&want));
        }
    }
}

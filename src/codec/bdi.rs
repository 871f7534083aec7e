//! NNW-BDI: base-delta-immediate compression of quantized network weights (docs/CODECS.md, "NNW-BDI").
//!
//! 1. Quantize: x -> r = round(x / scale) with scale = (max - min) / (2^bits - 1) * 2^scale_init
//!    (the affine grid of `bits` bits, whose zero point is the integer 0, downscaled by
//!    `scale_init` bits). 0.0 is exactly representable.
//! 2. Blocks of 64 values, compressed independently (chunks of 1024 blocks run in parallel).
//! 3. Every configuration (mask, num_bases k, base_bits bb, delta_bits db) of the list is tried per
//!    block; the smallest valid one is kept, else the block is stored raw:
//!    - `mask`: a 64-bit zero mask, and zeros cost nothing more;
//!    - the other values are coded as a delta from the immediate base 0 or from one of k bases,
//!      each base a randomly chosen value among those not yet coded (seeded); a value's delta is
//!      (r - base) >> scale_delta with stochastic rounding, and must fit in db signed bits;
//!    - valid only if every value got coded with at most k bases, each fitting in bb signed bits.
//!
//! Block bit layout (LSB-first): config id (ceil(log2(n_configs + 1)) bits; n_configs = raw), then
//! either the raw values (r - r_min in `raw_bits` bits each) or [mask: 64 bits] [k bases of bb
//! bits] [per coded value: selector (ceil(log2(k + 1)) bits: 0 = immediate, j = base j) and db-bit
//! delta]. The selector and the config id are counted: the research code's size left them out.
//! The configuration list and each chunk's byte length are in the metadata.
//!
//! Decode: r = base + (delta << scale_delta); x = r * scale. Error: |x - x'| <= scale / 2 without
//! delta downscaling, else < scale * (1/2 + 2^scale_delta). NaN/Inf are kept exactly (exceptions).

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::bits::{peek64, BitWriter};
use crate::codec::exceptions::{apply_exceptions, collect_exceptions, exception_bytes};
use crate::codec::kernel_io::ToF32;
use crate::dtype::{Data, DataMut};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use crate::rng::fresh_seed;
use crate::rng::{hash32, stream_key, uniform};
use rayon::prelude::*;

pub const ID: u16 = 10;
const BLOCK: usize = 64;
const CHUNK_BLOCKS: usize = 1024;

pub static INFO: CodecInfo = CodecInfo {
    id: ID,
    name: "nnw_bdi",
    doc: "NNW-BDI (Bersatti et al. 2020): affine bits-bit quantization, then base-delta-immediate \
          per 64-value block with zero mask, randomized bases and stochastic delta downscaling; \
          the smallest valid configuration per block, raw fallback.",
    defaults: || BdiConfig::default().to_params(),
    encoder: |p| Ok(Box::new(BdiConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(BdiDecoder::parse(meta, frame)?)),
    // 0.0 is on the grid; a zero coded against a base comes back exactly only when deltas are
    // not downscaled.
    keeps_zeros: |p| Ok(BdiConfig::from_params(p)?.scale_delta == 0),
};

/// One block configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cfg {
    pub mask: bool,
    pub bases: u8,
    pub base_bits: u8,
    pub delta_bits: u8,
}

impl Cfg {
    fn sel_bits(self) -> u32 {
        bits_for(self.bases as u64 + 1)
    }
}

/// Bits to tell `n` things apart.
fn bits_for(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// The configuration of the codec.
#[derive(Debug, Clone, PartialEq)]
pub struct BdiConfig {
    pub bits: u8,
    pub scale_init: u8,
    pub scale_delta: u8,
    pub num_bases: u8,
    pub base_bits: String,
    pub max_delta_bits: u8,
    pub zero_mask: u8,
    /// Explicit list ("mask:k:bb:db,..."), or "auto" for the list generated from the above.
    pub configs: String,
    pub seed: Option<u64>,
}

impl Default for BdiConfig {
    fn default() -> Self {
        BdiConfig {
            bits: 8,
            scale_init: 0,
            scale_delta: 0,
            num_bases: 2,
            base_bits: "8,16".into(),
            max_delta_bits: 8,
            zero_mask: 2,
            configs: "auto".into(),
            seed: None,
        }
    }
}

const MASKS: [&str; 3] = ["off", "on", "both"];

impl BdiConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let d = Self::default();
        let mut r = ParamReader::new("nnw_bdi", p);
        let bits = r.int("bits", d.bits as i64, 2, 16)? as u8;
        let scale_init = r.int("scale_init", 0, 0, 15)? as u8;
        let scale_delta = r.int("scale_delta", 0, 0, 15)? as u8;
        let num_bases = r.int("num_bases", d.num_bases as i64, 0, 7)? as u8;
        let base_bits = match p.get("base_bits") {
            Some(Param::Str(s)) => s.clone(),
            Some(Param::Int(v)) => v.to_string(),
            _ => d.base_bits.clone(),
        };
        // Mark the name as known (its value, a string, was read above).
        let _ = r.bool("base_bits", false);
        let max_delta_bits = r.int("max_delta_bits", d.max_delta_bits as i64, 1, 16)? as u8;
        let zero_mask = r.choice("zero_mask", d.zero_mask as usize, &MASKS)? as u8;
        let configs = match p.get("configs") {
            Some(Param::Str(s)) => s.clone(),
            None => d.configs.clone(),
            Some(other) => {
                return Err(Error::Codec(format!(
                    "codec \"nnw_bdi\": parameter configs must be \"auto\" or a string like \
                     \"0:1:16:4,1:0:8:3\" (mask:num_bases:base_bits:delta_bits), got {other}"
                )))
            }
        };
        let _ = r.bool("configs", false);
        let seed = r.opt_u64("seed")?;
        r.finish()?;
        if scale_init >= bits - 1 {
            return Err(Error::Codec(format!(
                "codec \"nnw_bdi\": scale_init ({scale_init}) must be below bits - 1 ({})",
                bits - 1
            )));
        }
        let c = BdiConfig {
            bits,
            scale_init,
            scale_delta,
            num_bases,
            base_bits,
            max_delta_bits,
            zero_mask,
            configs,
            seed,
        };
        c.config_list()?;
        Ok(c)
    }

    pub fn to_params(&self) -> Params {
        let s = |v: &str| Param::Str(v.to_string());
        super::params::from_pairs([
            ("bits", Param::Int(self.bits as i64)),
            ("scale_init", Param::Int(self.scale_init as i64)),
            ("scale_delta", Param::Int(self.scale_delta as i64)),
            ("num_bases", Param::Int(self.num_bases as i64)),
            ("base_bits", s(&self.base_bits)),
            ("max_delta_bits", Param::Int(self.max_delta_bits as i64)),
            ("zero_mask", s(MASKS[self.zero_mask as usize])),
            ("configs", s(&self.configs)),
            (
                "seed",
                self.seed.map_or(Param::None, |v| Param::Int(v as i64)),
            ),
        ])
    }

    /// The configurations tried per block.
    pub fn config_list(&self) -> Result<Vec<Cfg>> {
        let bad = |m: String| Error::Codec(format!("codec \"nnw_bdi\": {m}"));
        let num = |s: &str, what: &str, lo: u8, hi: u8| -> Result<u8> {
            s.trim()
                .parse::<u8>()
                .ok()
                .filter(|v| (lo..=hi).contains(v))
                .ok_or_else(|| bad(format!("{what} {s:?} is not an integer in {lo}..={hi}")))
        };
        let mut out = Vec::new();
        if self.configs == "auto" {
            let bbs: Vec<u8> = self
                .base_bits
                .split(',')
                .map(|s| num(s, "base_bits entry", 1, 32))
                .collect::<Result<_>>()?;
            let masks: &[bool] = match self.zero_mask {
                0 => &[false],
                1 => &[true],
                _ => &[false, true],
            };
            for &mask in masks {
                for db in 1..=self.max_delta_bits {
                    out.push(Cfg {
                        mask,
                        bases: 0,
                        base_bits: 0,
                        delta_bits: db,
                    });
                    for k in 1..=self.num_bases {
                        for &bb in &bbs {
                            out.push(Cfg {
                                mask,
                                bases: k,
                                base_bits: bb,
                                delta_bits: db,
                            });
                        }
                    }
                }
            }
        } else {
            for e in self.configs.split(',') {
                let f: Vec<&str> = e.split(':').collect();
                if f.len() != 4 {
                    return Err(bad(format!(
                        "config {e:?} is not mask:num_bases:base_bits:delta_bits"
                    )));
                }
                out.push(Cfg {
                    mask: num(f[0], "mask", 0, 1)? == 1,
                    bases: num(f[1], "num_bases", 0, 7)?,
                    base_bits: num(f[2], "base_bits", 0, 32)?,
                    delta_bits: num(f[3], "delta_bits", 1, 16)?,
                });
            }
        }
        if out.is_empty() || out.len() > 4096 {
            return Err(bad(format!(
                "{} configurations; 1..=4096 allowed",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// Sign-extends the low `w` bits.
#[inline]
fn sext(v: u64, w: u32) -> i64 {
    if w == 0 {
        0
    } else {
        ((v << (64 - w)) as i64) >> (64 - w)
    }
}

#[inline]
fn fits(v: i64, w: u32) -> bool {
    w >= 64 || (v >= -(1i64 << (w - 1)) && v < (1i64 << (w - 1)))
}

/// What the encoder needs per block.
struct Ctx<'a> {
    cfgs: &'a [Cfg],
    id_bits: u32,
    sd: u32,
    raw_bits: u32,
    rmin: i64,
    seed: u64,
}

/// A block coded under one configuration: bases and per-value (selector, delta).
struct Coded {
    bits: u64,
    bases: Vec<i64>,
    items: Vec<(u8, i64)>,
}

/// Stochastically rounded delta >> sd.
#[inline]
fn shifted(d: i64, sd: u32, u: f32) -> i64 {
    if sd == 0 {
        d
    } else {
        let s = (1i64 << sd) as f64;
        (d as f64 / s + u as f64).floor() as i64
    }
}

fn try_cfg(
    c: Cfg,
    r: &[i64],
    us: &[f32],
    ctx: &Ctx,
    ci: usize,
    bkey: u32,
    best: u64,
) -> Option<Coded> {
    let db = c.delta_bits as u32;
    let coded_vals: Vec<usize> = (0..r.len()).filter(|&i| !c.mask || r[i] != 0).collect();
    let fixed = ctx.id_bits as u64
        + if c.mask { r.len() as u64 } else { 0 }
        + c.bases as u64 * c.base_bits as u64;
    let bits = fixed + coded_vals.len() as u64 * (c.sel_bits() + db) as u64;
    if bits >= best {
        return None;
    }
    let mut items = vec![(0u8, 0i64); r.len()];
    let mut left = Vec::with_capacity(coded_vals.len());
    for &i in &coded_vals {
        let d = shifted(r[i], ctx.sd, us[i]);
        if fits(d, db) {
            items[i] = (0, d);
        } else {
            left.push(i);
        }
    }
    let mut bases = Vec::with_capacity(c.bases as usize);
    for j in 0..c.bases as usize {
        if left.is_empty() {
            break;
        }
        let pick = hash32(bkey ^ hash32(((ci as u32) << 3) | j as u32)) as usize % left.len();
        let base = r[left[pick]];
        if !fits(base, c.base_bits as u32) {
            return None;
        }
        bases.push(base);
        left.retain(|&i| {
            let d = shifted(r[i] - base, ctx.sd, us[i]);
            if fits(d, db) {
                items[i] = (j as u8 + 1, d);
                false
            } else {
                true
            }
        });
    }
    if !left.is_empty() {
        return None;
    }
    bases.resize(c.bases as usize, 0);
    Some(Coded { bits, bases, items })
}

/// Encodes one block into `w`; returns whether it was stored raw.
fn encode_block(r: &[i64], block: u64, ctx: &Ctx, w: &mut BitWriter) -> bool {
    let ukey = stream_key(ctx.seed, 2 * block);
    let bkey = stream_key(ctx.seed, 2 * block + 1);
    let us: Vec<f32> = (0..r.len() as u32).map(|i| uniform(ukey, i)).collect();
    let raw = ctx.id_bits as u64 + r.len() as u64 * ctx.raw_bits as u64;
    let mut best: Option<(usize, Coded)> = None;
    let mut best_bits = raw + 1; // a config must beat raw (ties go to raw: exact)
    for (ci, &c) in ctx.cfgs.iter().enumerate() {
        if let Some(coded) = try_cfg(c, r, &us, ctx, ci, bkey, best_bits) {
            best_bits = coded.bits;
            best = Some((ci, coded));
        }
    }
    let put = |w: &mut BitWriter, v: u64, width: u32| {
        let mut width = width;
        let mut v = v;
        while width > 0 {
            let take = width.min(32);
            w.put((v & ((1u64 << take) - 1)) as u32, take);
            v >>= take;
            width -= take;
        }
    };
    match best {
        None => {
            put(w, ctx.cfgs.len() as u64, ctx.id_bits);
            for &v in r {
                put(w, (v - ctx.rmin) as u64, ctx.raw_bits);
            }
            true
        }
        Some((ci, coded)) => {
            let c = ctx.cfgs[ci];
            put(w, ci as u64, ctx.id_bits);
            if c.mask {
                for &v in r {
                    put(w, (v != 0) as u64, 1);
                }
            }
            let bb = c.base_bits as u32;
            for &b in &coded.bases {
                put(w, (b as u64) & mask64(bb), bb);
            }
            let (sb, db) = (c.sel_bits(), c.delta_bits as u32);
            for (i, &(sel, d)) in coded.items.iter().enumerate() {
                if c.mask && r[i] == 0 {
                    continue;
                }
                put(w, sel as u64, sb);
                put(w, (d as u64) & mask64(db), db);
            }
            false
        }
    }
}

#[inline]
fn mask64(w: u32) -> u64 {
    if w >= 64 {
        u64::MAX
    } else {
        (1u64 << w) - 1
    }
}

impl Encoder for BdiConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        let seed = self.seed.unwrap_or_else(fresh_seed);
        crate::dispatch!(Data, x, |v| self.encode_typed(v, seed))
    }
}

impl BdiConfig {
    fn encode_typed<T: ToF32>(&self, x: &[T], seed: u64) -> Result<Encoded> {
        let cfgs = self.config_list()?;
        let (lo, hi) = crate::pool::install(|| {
            x.par_chunks(1 << 16)
                .map(|c| {
                    T::with_f32(c, |f| {
                        f.iter()
                            .filter(|v| v.is_finite())
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                                (a.min(v), b.max(v))
                            })
                    })
                })
                .reduce(
                    || (f32::INFINITY, f32::NEG_INFINITY),
                    |a, b| (a.0.min(b.0), a.1.max(b.1)),
                )
        });
        // The affine grid spans [min(lo, 0), max(hi, 0)] so that 0 is a grid point.
        let (lo, hi) = if lo <= hi {
            (lo.min(0.0) as f64, hi.max(0.0) as f64)
        } else {
            (0.0, 0.0)
        };
        let levels = ((1u64 << self.bits) - 1) as f64;
        let mut scale = (hi - lo) / levels * (1u64 << self.scale_init) as f64;
        if !(scale.is_finite() && scale > 0.0) {
            scale = 1.0;
        }
        // A range of a few subnormals gives a step below float32's smallest: the smallest
        // subnormal is the finest grid float32 holds (and every subnormal lies on it).
        let scale = (scale as f32).max(f32::from_bits(1));
        let inv = 1.0 / scale as f64;
        let rmin = (lo * inv).round() as i64;
        let rmax = (hi * inv).round() as i64;
        let raw_bits = bits_for((rmax - rmin + 1) as u64);
        let ctx = Ctx {
            cfgs: &cfgs,
            id_bits: bits_for(cfgs.len() as u64 + 1),
            sd: self.scale_delta as u32,
            raw_bits,
            rmin,
            seed,
        };
        let per = BLOCK * CHUNK_BLOCKS;
        let chunks: Vec<(Vec<u8>, u64, Vec<u8>, u64)> = crate::pool::install(|| {
            x.par_chunks(per)
                .enumerate()
                .map(|(ci, c)| {
                    let mut w = BitWriter::with_capacity_bits(c.len() * 8);
                    let mut raw = 0u64;
                    T::with_f32(c, |f| {
                        for (bi, b) in f.chunks(BLOCK).enumerate() {
                            let r: Vec<i64> = b
                                .iter()
                                .map(|&v| {
                                    if v.is_finite() {
                                        ((v as f64 * inv).round() as i64).clamp(rmin, rmax)
                                    } else {
                                        0
                                    }
                                })
                                .collect();
                            let block = (ci * CHUNK_BLOCKS + bi) as u64;
                            raw += encode_block(&r, block, &ctx, &mut w) as u64;
                        }
                    });
                    let mut exc = Vec::new();
                    let n = collect_exceptions(c, (ci * per) as u64, &mut exc);
                    (w.finish(), raw, exc, n)
                })
                .collect()
        });
        let n_exc: u64 = chunks.iter().map(|c| c.3).sum();
        let n_raw: u64 = chunks.iter().map(|c| c.1).sum();
        let mut meta = LeWriter::default();
        meta.u8(self.bits)
            .u8(self.scale_init)
            .u8(self.scale_delta)
            .u8(raw_bits as u8);
        meta.f32(scale)
            .u64(rmin as u64)
            .u64(seed)
            .u64(n_exc)
            .u64(n_raw)
            .u32(cfgs.len() as u32)
            .u32(chunks.len() as u32);
        for c in &cfgs {
            meta.u8(c.mask as u8)
                .u8(c.bases)
                .u8(c.base_bits)
                .u8(c.delta_bits);
        }
        for c in &chunks {
            meta.u32(c.0.len() as u32);
        }
        let mut payload = Vec::with_capacity(chunks.iter().map(|c| c.0.len() + c.2.len()).sum());
        for c in &chunks {
            payload.extend_from_slice(&c.0);
        }
        for c in &chunks {
            payload.extend_from_slice(&c.2);
        }
        let _ = &self.configs;
        Ok(Encoded {
            meta: meta.0,
            payload,
        })
    }
}

/// An NNW-BDI decoder opened on validated metadata.
pub struct BdiDecoder {
    bits: u8,
    scale_init: u8,
    scale_delta: u8,
    raw_bits: u32,
    scale: f32,
    rmin: i64,
    seed: u64,
    n_exc: u64,
    n_raw: u64,
    cfgs: Vec<Cfg>,
    chunk_lens: Vec<u32>,
    numel: u64,
}

impl BdiDecoder {
    fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "nnw_bdi header");
        let bits = r.u8("bits")?;
        let scale_init = r.u8("scale_init")?;
        let scale_delta = r.u8("scale_delta")?;
        let raw_bits = r.u8("raw_bits")? as u32;
        let scale = r.f32("scale")?;
        let rmin = r.u64("r_min")? as i64;
        let seed = r.u64("seed")?;
        let n_exc = r.u64("exception count")?;
        let n_raw = r.u64("raw block count")?;
        let n_cfg = r.u32("config count")? as usize;
        let n_chunks = r.u32("chunk count")? as usize;
        ensure_format!(
            (2..=16).contains(&bits),
            "nnw_bdi: bits {bits} not in 2..=16"
        );
        ensure_format!(
            scale_init < bits && scale_delta <= 15 && raw_bits <= 18,
            "nnw_bdi: scale_init={scale_init}, scale_delta={scale_delta}, raw_bits={raw_bits} are invalid"
        );
        ensure_format!(
            scale.is_finite() && scale > 0.0,
            "nnw_bdi: scale {scale} is invalid"
        );
        ensure_format!(
            rmin.unsigned_abs() <= 1 << 17,
            "nnw_bdi: r_min {rmin} is out of range"
        );
        ensure_format!(
            (1..=4096).contains(&n_cfg),
            "nnw_bdi: {n_cfg} configurations (1..=4096 allowed)"
        );
        let per = (BLOCK * CHUNK_BLOCKS) as u64;
        let expected_chunks = frame.numel.div_ceil(per);
        ensure_format!(
            n_chunks as u64 == expected_chunks,
            "nnw_bdi: header has {n_chunks} chunks, {} values need {expected_chunks}",
            frame.numel
        );
        ensure_format!(
            r.remaining() == n_cfg * 4 + n_chunks * 4,
            "nnw_bdi: config list and chunk index hold {} bytes, expected {}",
            r.remaining(),
            n_cfg * 4 + n_chunks * 4
        );
        let mut cfgs = Vec::with_capacity(n_cfg);
        for _ in 0..n_cfg {
            let c = Cfg {
                mask: r.u8("mask")? != 0,
                bases: r.u8("num_bases")?,
                base_bits: r.u8("base_bits")?,
                delta_bits: r.u8("delta_bits")?,
            };
            ensure_format!(
                c.bases <= 7 && c.base_bits <= 32 && (1..=16).contains(&c.delta_bits),
                "nnw_bdi: configuration {c:?} is invalid"
            );
            cfgs.push(c);
        }
        let mut chunk_lens = Vec::with_capacity(n_chunks);
        for _ in 0..n_chunks {
            chunk_lens.push(r.u32("chunk length")?);
        }
        r.finish()?;
        ensure_format!(
            n_exc <= frame.numel,
            "nnw_bdi: {n_exc} exceptions among {} values",
            frame.numel
        );
        let code: u64 = chunk_lens.iter().map(|&l| l as u64).sum();
        let expected = code.checked_add(exception_bytes(n_exc, frame.dtype.size(), "nnw_bdi")?);
        ensure_format!(
            expected == Some(frame.payload_len),
            "nnw_bdi: payload is {} bytes, the header implies {expected:?}",
            frame.payload_len
        );
        Ok(BdiDecoder {
            bits,
            scale_init,
            scale_delta,
            raw_bits,
            scale,
            rmin,
            seed,
            n_exc,
            n_raw,
            cfgs,
            chunk_lens,
            numel: frame.numel,
        })
    }

    /// Decodes one chunk's integers.
    fn decode_chunk(&self, src: &[u8], r: &mut [i64], ci: usize) -> Result<()> {
        let id_bits = bits_for(self.cfgs.len() as u64 + 1);
        let sd = self.scale_delta as u32;
        let mut pos = 0usize;
        let mut get = |w: u32| -> u64 {
            let mut v = 0u64;
            let mut done = 0;
            while done < w {
                let take = (w - done).min(32);
                v |= (peek64(src, pos) & mask64(take)) << done;
                pos += take as usize;
                done += take;
            }
            v
        };
        for (bi, blk) in r.chunks_mut(BLOCK).enumerate() {
            let id = get(id_bits) as usize;
            if id == self.cfgs.len() {
                for v in blk.iter_mut() {
                    *v = get(self.raw_bits) as i64 + self.rmin;
                }
                continue;
            }
            ensure_format!(
                id < self.cfgs.len(),
                "nnw_bdi: chunk {ci} block {bi} has configuration id {id} of {}",
                self.cfgs.len()
            );
            let c = self.cfgs[id];
            let mut mask = [true; BLOCK];
            if c.mask {
                for m in mask.iter_mut().take(blk.len()) {
                    *m = get(1) == 1;
                }
            }
            let mut bases = [0i64; 8];
            for b in bases.iter_mut().skip(1).take(c.bases as usize) {
                *b = sext(get(c.base_bits as u32), c.base_bits as u32);
            }
            let (sb, db) = (c.sel_bits(), c.delta_bits as u32);
            for (i, v) in blk.iter_mut().enumerate() {
                if !mask[i] {
                    *v = 0;
                    continue;
                }
                let sel = get(sb) as usize;
                ensure_format!(
                    sel <= c.bases as usize,
                    "nnw_bdi: chunk {ci} block {bi} selects base {sel} of {}",
                    c.bases
                );
                let d = sext(get(db), db);
                *v = bases[sel] + (d << sd);
            }
        }
        ensure_format!(
            pos.div_ceil(8) == src.len(),
            "nnw_bdi: chunk {ci} codes span {pos} bits, the index says {} bytes",
            src.len()
        );
        Ok(())
    }

    fn decode_typed<T: ToF32>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let mut offs = Vec::with_capacity(self.chunk_lens.len());
        let mut off = 0usize;
        for &l in &self.chunk_lens {
            offs.push((off, l as usize));
            off += l as usize;
        }
        let (codes, exc) = payload.split_at(off);
        let scale = self.scale;
        crate::pool::install(|| {
            out.par_chunks_mut(BLOCK * CHUNK_BLOCKS)
                .zip(offs.par_iter())
                .enumerate()
                .try_for_each(|(ci, (dst, &(o, l)))| {
                    let mut r = vec![0i64; dst.len()];
                    self.decode_chunk(&codes[o..o + l], &mut r, ci)?;
                    let f: Vec<f32> = r.iter().map(|&v| v as f32 * scale).collect();
                    T::from_f32_slice(&f, dst);
                    Ok(())
                })
        })?;
        apply_exceptions(exc, out, "nnw_bdi")
    }
}

impl Decoder for BdiDecoder {
    fn params(&self) -> Params {
        let list: Vec<String> = self
            .cfgs
            .iter()
            .map(|c| {
                format!(
                    "{}:{}:{}:{}",
                    c.mask as u8, c.bases, c.base_bits, c.delta_bits
                )
            })
            .collect();
        BdiConfig {
            bits: self.bits,
            scale_init: self.scale_init,
            scale_delta: self.scale_delta,
            configs: list.join(","),
            seed: Some(self.seed),
            ..Default::default()
        }
        .to_params()
    }
    fn stats(&self) -> Params {
        super::params::from_pairs([
            ("scale", Param::Float(self.scale as f64)),
            ("n_raw_blocks", Param::Int(self.n_raw as i64)),
            (
                "n_blocks",
                Param::Int(self.numel.div_ceil(BLOCK as u64) as i64),
            ),
            ("n_configs", Param::Int(self.cfgs.len() as i64)),
            ("n_exceptions", Param::Int(self.n_exc as i64)),
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

    /// A tensor of subnormals only: the grid step would underflow float32 (it was a format
    /// error at encode); it is at least the smallest subnormal, and the values come back within
    /// a few steps of it (the Python property test checks the exact bound on such a tensor).
    #[test]
    fn subnormal_only_tensors_encode() {
        let x = [
            f32::from_bits(1),
            0.0,
            f32::from_bits(3),
            -f32::from_bits(2),
        ];
        for bits in [4u8, 8, 12] {
            for scale_delta in [0u8, 2] {
                let cfg = BdiConfig {
                    bits,
                    scale_delta,
                    seed: Some(1),
                    ..Default::default()
                };
                let enc = cfg.encode(Data::F32(&x)).unwrap();
                let frame = crate::codec::testing::frame_f32(&enc, x.len());
                let d = (INFO.decoder)(&enc.meta, frame).unwrap();
                let mut y = [0f32; 4];
                d.decode(&enc.payload, crate::dtype::DataMut::F32(&mut y))
                    .unwrap();
                for (a, b) in x.iter().zip(y) {
                    assert!(
                        (a - b).abs() <= 16.0 * f32::from_bits(1),
                        "bits {bits}: {a} {b}"
                    );
                }
            }
        }
    }

    fn rt(p: &Params, x: &[f32]) -> (Vec<f32>, BdiDecoder, usize) {
        let enc = BdiConfig::from_params(p)
            .unwrap()
            .encode(Data::F32(x))
            .unwrap();
        let frame = crate::codec::testing::frame_f32(&enc, x.len());
        let d = BdiDecoder::parse(&enc.meta, frame).unwrap();
        let mut out = vec![0f32; x.len()];
        d.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
        (out, d, enc.payload.len() + enc.meta.len())
    }

    fn weights(n: usize) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(1);
        (0..n)
            .map(|i| {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                if i % 7 == 0 {
                    0.0
                } else {
                    (u - 0.5) * 0.2
                }
            })
            .collect()
    }

    #[test]
    fn error_within_half_step_and_compresses() {
        let x = weights(100_000);
        for sd in [0u8, 1, 2] {
            let mut p = Params::new();
            p.insert("scale_delta".into(), Param::Int(sd as i64));
            p.insert("seed".into(), Param::Int(1));
            let (y, d, size) = rt(&p, &x);
            let tol = d.scale * (0.5 + if sd > 0 { (1 << sd) as f32 } else { 0.0 }) * 1.001;
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "sd={sd}: {a} -> {b} (tol {tol})");
            }
            assert!(size < x.len() * 4, "sd={sd}: {size}");
            assert!(x.iter().zip(&y).all(|(a, b)| *a != 0.0 || *b == 0.0));
        }
    }

    #[test]
    fn clustered_blocks_use_bases() {
        // Values near three far-apart centres: bases beat raw.
        let x: Vec<f32> = (0..64 * 100)
            .map(|i| [100.0f32, -80.0, 20.0][i % 3] + (i % 5) as f32 * 0.5)
            .collect();
        let mut p = Params::new();
        p.insert("bits".into(), Param::Int(12));
        p.insert("num_bases".into(), Param::Int(3));
        p.insert("seed".into(), Param::Int(3));
        let (y, d, size) = rt(&p, &x);
        assert_eq!(d.n_raw, 0);
        assert!(size * 8 < x.len() * 11, "{size} bytes"); // raw is 12 bits per value
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= d.scale * 0.501);
        }
    }

    #[test]
    fn specials_and_empty() {
        let mut x = weights(1000);
        x[5] = f32::NAN;
        x[6] = f32::INFINITY;
        let (y, d, _) = rt(&Params::new(), &x);
        assert!(y[5].is_nan());
        assert_eq!(y[6], f32::INFINITY);
        assert_eq!(d.n_exc, 2);
        let (y, _, _) = rt(&Params::new(), &[]);
        assert!(y.is_empty());
        let (y, _, _) = rt(&Params::new(), &[3.0; 100]);
        assert!(y.iter().all(|&v| (v - 3.0).abs() < 3.0 / 255.0));
    }
}

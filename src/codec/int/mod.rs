//! Integer encoders (docs/CODECS.md, "Integers"): `int` (int-N, N in
//! 2..=16, affine min-max or symmetric absmax, per tensor / row / tile / block, nearest,
//! stochastic or dithered rounding, optional SAWB clipping) and `luq` (logarithmic unbiased
//! quantization for gradients).
//!
//! Payload of `int`: the per-group parameters (affine: f32 lo and f32 step; absmax: f32 step),
//! then the N-bit codes in element order, LSB-first bit-packed (two 4-bit codes per byte, one
//! 8-bit code per byte...), then the exception list. A group is the set of values sharing one
//! scale: the tensor, a row of `row_size` values, a tile of `tile_rows` x `tile_cols` of the
//! tensor seen as rows of `row_size`, or a run of `block_size` values.
//!
//! Decoding: affine x = lo + q * step; absmax x = (q - qmax) * step with qmax = 2^(N-1) - 1, so 0
//! decodes to exactly 0. Rounding: `nearest` (half up in code space), `stochastic` (floor(v + u):
//! unbiased), `dithered` (subtractive dither: the code is floor(v + u) as in stochastic rounding,
//! and the decoder, which regenerates u from the stored seed, subtracts u - 1/2; the error is then
//! uniform in +-step/2 and independent of the signal). Error bound per value, for values inside
//! the group's range: step/2 (nearest, dithered) or step (stochastic).
//!
//! NaN and +-Inf are excluded from the statistics and kept bit-exact in the exception list
//! (u64 index + the raw element): `n_exceptions` in `.stats`.
//!
//! The encoder sees a flat buffer: `row` and `tile` need `row_size` (the product of the trailing
//! dimensions) given as a parameter.
//!
//! Files: this one holds the `int` configuration, the group layout, the registry entries and the
//! encoder and decoder; `quant.rs` its quantization kernels; `luq.rs` the `luq` codec. The group
//! statistics come from the shared accumulator (`crate::stats::summarize`), the bit packing
//! from `crate::bits`, the exception list from `crate::codec::exceptions`.

mod luq;
mod quant;

pub use luq::{LuqConfig, LuqDecoder, ID_LUQ, INFO_LUQ};

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::bits::{pack_into, unpack};
use crate::codec::exceptions::{apply_exceptions, collect_exceptions, exception_bytes};
use crate::codec::kernel_io::ToF32;
use crate::dtype::{Data, DataMut};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use crate::rng::fresh_seed;
use crate::rng::{hash32, stream_key};
use crate::stats::{summarize, Filter, Gather, Summary, Sums};
#[cfg(target_arch = "x86_64")]
use quant::chunk8_avx512;
use quant::{quant, NEAREST};
use rayon::prelude::*;

pub const ID_INT: u16 = 8;

/// Target values per parallel chunk.
const CHUNK: usize = 1 << 16;

const SCHEMES: [&str; 2] = ["affine", "absmax"];
const GRANULARITIES: [&str; 4] = ["tensor", "row", "tile", "block"];
const ROUNDINGS: [&str; 3] = ["nearest", "stochastic", "dithered"];
/// `IntConfig::rounding` of the dithered rounding (its index in [`ROUNDINGS`]).
const DITHERED: u8 = 2;
const CLIPS: [&str; 2] = ["none", "sawb"];

pub static INFO_INT: CodecInfo = CodecInfo {
    id: ID_INT,
    name: "int",
    doc: "int-N (N in 2..=16) affine min-max or symmetric absmax, per tensor/row/tile/block, \
          nearest/stochastic/dithered rounding, optional SAWB clipping; codes bit-packed.",
    defaults: || IntConfig::default().to_params(),
    encoder: |p| Ok(Box::new(IntConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(IntDecoder::parse(meta, frame)?)),
    // The absmax grid holds 0 at code 0, which nearest and stochastic rounding keep; the affine
    // grid's zero point and the dither move it.
    keeps_zeros: |p| {
        let c = IntConfig::from_params(p)?;
        Ok(c.absmax && c.rounding != DITHERED)
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Granularity {
    Tensor = 0,
    Row = 1,
    Tile = 2,
    Block = 3,
}

/// The configuration of the `int` codec.
#[derive(Debug, Clone, PartialEq)]
pub struct IntConfig {
    pub bits: u8,
    pub absmax: bool,
    pub granularity: Granularity,
    pub block_size: u32,
    pub row_size: u64,
    pub tile_rows: u32,
    pub tile_cols: u32,
    /// 0 nearest, 1 stochastic, 2 dithered.
    pub rounding: u8,
    pub sawb: bool,
    pub seed: Option<u64>,
}

impl Default for IntConfig {
    fn default() -> Self {
        IntConfig {
            bits: 8,
            absmax: false,
            granularity: Granularity::Block,
            block_size: 256,
            row_size: 0,
            tile_rows: 0,
            tile_cols: 0,
            rounding: 0,
            sawb: false,
            seed: None,
        }
    }
}

/// SAWB clip coefficients (c1, c2): alpha = c1 * sqrt(E[x^2]) - c2 * E|x| (Choi et al. 2018).
fn sawb_coeffs(bits: u8) -> Option<(f64, f64)> {
    match bits {
        2 => Some((3.12, 2.064)),
        3 => Some((7.509, 6.892)),
        4 => Some((12.68, 12.80)),
        5 => Some((17.74, 18.64)),
        8 => Some((31.76, 35.04)),
        _ => None,
    }
}

impl IntConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let d = Self::default();
        let mut r = ParamReader::new("int", p);
        let bits = r.int("bits", d.bits as i64, 2, 16)? as u8;
        let absmax = r.choice("scheme", 0, &SCHEMES)? == 1;
        let granularity = [
            Granularity::Tensor,
            Granularity::Row,
            Granularity::Tile,
            Granularity::Block,
        ][r.choice("granularity", 3, &GRANULARITIES)?];
        let block_size = r.int("block_size", d.block_size as i64, 8, 1 << 20)? as u32;
        let row_size = r.int("row_size", 0, 0, i64::MAX)? as u64;
        let tile_rows = r.int("tile_rows", 0, 0, u32::MAX as i64)? as u32;
        let tile_cols = r.int("tile_cols", 0, 0, u32::MAX as i64)? as u32;
        let rounding = r.choice("rounding", 0, &ROUNDINGS)? as u8;
        let sawb = r.choice("clip", 0, &CLIPS)? == 1;
        let seed = r.opt_u64("seed")?;
        r.finish()?;
        let bad = |m: String| Err(Error::Codec(format!("codec \"int\": {m}")));
        if matches!(granularity, Granularity::Row | Granularity::Tile) && row_size == 0 {
            return bad(format!(
                "granularity {:?} needs row_size (the product of the trailing dimensions), a \
                 positive integer",
                GRANULARITIES[granularity as usize]
            ));
        }
        if granularity == Granularity::Tile && (tile_rows == 0 || tile_cols == 0) {
            return bad("granularity \"tile\" needs tile_rows and tile_cols >= 1".into());
        }
        if sawb && sawb_coeffs(bits).is_none() {
            return bad(format!(
                "clip=\"sawb\" has coefficients for bits in 2, 3, 4, 5, 8; got bits={bits}"
            ));
        }
        Ok(IntConfig {
            bits,
            absmax,
            granularity,
            block_size,
            row_size,
            tile_rows,
            tile_cols,
            rounding,
            sawb,
            seed,
        })
    }

    pub fn to_params(&self) -> Params {
        let s = |v: &str| Param::Str(v.to_string());
        super::params::from_pairs([
            ("bits", Param::Int(self.bits as i64)),
            ("scheme", s(SCHEMES[self.absmax as usize])),
            ("granularity", s(GRANULARITIES[self.granularity as usize])),
            ("block_size", Param::Int(self.block_size as i64)),
            ("row_size", Param::Int(self.row_size as i64)),
            ("tile_rows", Param::Int(self.tile_rows as i64)),
            ("tile_cols", Param::Int(self.tile_cols as i64)),
            ("rounding", s(ROUNDINGS[self.rounding as usize])),
            ("clip", s(CLIPS[self.sawb as usize])),
            (
                "seed",
                self.seed.map_or(Param::None, |v| Param::Int(v as i64)),
            ),
        ])
    }

    /// Largest code.
    fn cmax(&self) -> u32 {
        if self.absmax {
            2 * ((1u32 << (self.bits - 1)) - 1)
        } else {
            (1u32 << self.bits) - 1
        }
    }

    fn zp(&self) -> f32 {
        if self.absmax {
            ((1u32 << (self.bits - 1)) - 1) as f32
        } else {
            0.0
        }
    }
}

/// How elements map to groups (shared by encoder and decoder).
#[derive(Debug, Clone, Copy)]
struct Layout {
    n: u64,
    /// Contiguous groups of this length (tensor, row, block), or 0 for tiles.
    run: u64,
    row: u64,
    tr: u64,
    tc: u64,
    /// Values per parallel chunk (a multiple of 8, and of `run` where `run` is small).
    chunk: u64,
}

impl Layout {
    fn new(c: &IntConfig, n: u64) -> Self {
        let run = match c.granularity {
            Granularity::Tensor => n.max(1),
            Granularity::Row => c.row_size,
            Granularity::Block => c.block_size as u64,
            Granularity::Tile => 0,
        };
        let chunk = if run > 0 && run <= CHUNK as u64 {
            // A whole number of groups, and of 8 values.
            let per = (CHUNK as u64).div_ceil(run);
            let mut ch = per * run;
            while ch % 8 != 0 {
                ch += run;
            }
            ch
        } else {
            CHUNK as u64
        };
        Layout {
            n,
            run,
            row: c.row_size.max(1),
            tr: c.tile_rows.max(1) as u64,
            tc: c.tile_cols.max(1) as u64,
            chunk,
        }
    }

    fn n_groups(&self) -> u64 {
        if self.n == 0 {
            0
        } else if self.run > 0 {
            self.n.div_ceil(self.run)
        } else {
            let rows = self.n.div_ceil(self.row);
            rows.div_ceil(self.tr) * self.row.div_ceil(self.tc)
        }
    }

    /// Groups align with chunks: each chunk can compute its own groups' statistics.
    fn fused(&self) -> bool {
        self.run > 0 && self.chunk.is_multiple_of(self.run)
    }

    /// The group of element `i` and where its run of same-group elements ends.
    #[inline]
    fn seg(&self, i: u64) -> (usize, u64) {
        if let Some(g) = i.checked_div(self.run) {
            (g as usize, ((g + 1) * self.run).min(self.n))
        } else {
            let (r, c) = (i / self.row, i % self.row);
            let g = (r / self.tr) * self.row.div_ceil(self.tc) + c / self.tc;
            let end_c = ((c / self.tc + 1) * self.tc).min(self.row);
            (g as usize, (i - c + end_c).min(self.n))
        }
    }

    /// Calls `f(group, local_start, local_end)` for the runs of one chunk starting at `i0`.
    #[inline]
    fn for_runs(&self, i0: u64, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        let mut i = i0;
        let end = i0 + len as u64;
        while i < end {
            let (g, e) = self.seg(i);
            let e = e.min(end);
            f(g, (i - i0) as usize, (e - i0) as usize);
            i = e;
        }
    }
}

/// What a group's statistics gather: the range of the finite values and the count of the others,
/// and for SAWB the moments (sums of squares and of magnitudes, in element order).
fn gather(moments: bool) -> Gather {
    Gather {
        filter: Filter::Finite,
        sums: if moments { Sums::Serial } else { Sums::None },
    }
}

/// The statistics of one group (or run of a group).
fn stats(x: &[f32], moments: bool) -> Summary {
    summarize(x, gather(moments))
}

/// Per-group (lo, step) from statistics.
fn group_params(c: &IntConfig, s: Summary) -> (f32, f32) {
    if s.min > s.max {
        return (0.0, 0.0); // no finite value
    }
    // The extremes are float32 values (exactly).
    let (lo, hi) = (s.min as f32, s.max as f32);
    let clip = if c.sawb && s.count > 0 {
        let (c1, c2) = sawb_coeffs(c.bits).unwrap();
        let n = s.count as f64;
        let a = c1 * (s.sumsq / n).sqrt() - c2 * (s.sum_abs / n);
        (a > 0.0 && a.is_finite()).then_some(a as f32)
    } else {
        None
    };
    let cmax = c.cmax() as f32;
    let step_of = |range: f32| {
        let st = range / cmax;
        if st.is_finite() && st > 0.0 {
            st
        } else {
            0.0
        }
    };
    if c.absmax {
        let mut m = lo.abs().max(hi.abs());
        if let Some(a) = clip {
            m = m.min(a);
        }
        (0.0, step_of(2.0 * m))
    } else {
        let (mut lo, mut hi) = (lo, hi);
        if let Some(a) = clip {
            lo = lo.max(-a);
            hi = hi.min(a).max(lo);
        }
        (lo, step_of(hi - lo))
    }
}

impl Encoder for IntConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        Ok(Encoded::from_framed(self.encode_framed(x, 0, 0)?))
    }

    fn encode_framed(&self, x: Data<'_>, lead: usize, tail: usize) -> Result<(Vec<u8>, usize)> {
        let seed = match (self.rounding, self.seed) {
            (NEAREST, s) => s.unwrap_or(0),
            (_, Some(s)) => s,
            (_, None) => fresh_seed(),
        };
        crate::dispatch!(Data, x, |v| self.encode_typed(v, seed, lead, tail))
    }
}

impl IntConfig {
    /// `lead` bytes for the caller, the metadata, then the payload (`Encoder::encode_framed`).
    fn encode_typed<T: ToF32>(
        &self,
        x: &[T],
        seed: u64,
        lead: usize,
        tail: usize,
    ) -> Result<(Vec<u8>, usize)> {
        let n = x.len() as u64;
        if matches!(self.granularity, Granularity::Row | Granularity::Tile)
            && !n.is_multiple_of(self.row_size)
        {
            return Err(Error::Layout(format!(
                "int: {n} elements are not a whole number of rows of row_size={}",
                self.row_size
            )));
        }
        let lay = Layout::new(self, n);
        let width = self.bits as u32;
        let ch = lay.chunk as usize;
        let code_bytes = (x.len() * width as usize).div_ceil(8);
        let pbytes = if self.absmax { 4 } else { 8 };
        let n_groups = lay.n_groups() as usize;
        let mut head = IntMeta {
            cfg: IntConfig {
                seed: (self.rounding != NEAREST).then_some(seed),
                ..self.clone()
            },
            chunk: lay.chunk,
            n_groups: n_groups as u64,
            n_exc: 0,
        };
        // Fixed length: written now, rewritten with the exception count at the end.
        let m = head.write().len();
        let start = lead + m;
        // One allocation for everything: group parameters, then codes, written in place by the
        // chunks (no per-chunk buffers to concatenate); exceptions are appended at the end.
        let len = start + n_groups * pbytes + code_bytes;
        let mut outs: Vec<(Vec<u8>, u64)> = Vec::new();
        // Each chunk's codes (and, fused, its parameters) are zeroed just before they are written
        // (in cache, in parallel) rather than the whole buffer up front.
        let init = |b: &mut [std::mem::MaybeUninit<u8>]| {
            let (head_raw, rest) = b.split_at_mut(start);
            crate::buf::zero_init(head_raw);
            let (pp_raw, codes) = rest.split_at_mut(n_groups * pbytes);
            let (cmax, zp) = (self.cmax() as f32, self.zp());
            let stochastic = self.rounding != NEAREST;
            let moments = self.sawb;
            let absmax = self.absmax;
            let put_params = move |dst: &mut [u8], (lo, step): (f32, f32)| {
                if absmax {
                    dst.copy_from_slice(&step.to_le_bytes());
                } else {
                    dst[..4].copy_from_slice(&lo.to_le_bytes());
                    dst[4..].copy_from_slice(&step.to_le_bytes());
                }
            };
            // Group parameters: computed inside each chunk when groups align with chunks, else in a
            // first pass over the whole tensor.
            let global: Option<Vec<(f32, f32)>> = (!lay.fused()).then(|| {
                let parts: Vec<Vec<(usize, Summary)>> = crate::pool::map_chunks(x, ch, |ci, c| {
                    T::with_f32(c, |f| {
                        let mut v = Vec::new();
                        lay.for_runs((ci * ch) as u64, f.len(), |g, s, e| {
                            v.push((g, stats(&f[s..e], moments)))
                        });
                        v
                    })
                });
                let mut st = vec![Summary::EMPTY; n_groups];
                for (g, s) in parts.into_iter().flatten() {
                    st[g] = st[g].then(s);
                }
                st.into_iter().map(|s| group_params(self, s)).collect()
            });
            let mut pp_raw = Some(pp_raw);
            if let Some(p) = &global {
                let pp = crate::buf::zero_init(pp_raw.take().unwrap());
                for (d, &gp) in pp.chunks_exact_mut(pbytes).zip(p) {
                    put_params(d, gp);
                }
            }
            // Fused: chunk ci holds groups ci * per.. (per = chunk / run) and writes their parameters.
            let per = if lay.fused() {
                (lay.chunk / lay.run) as usize
            } else {
                0
            };
            // 8-bit nearest codes of whole 16-value-multiple groups: one AVX-512 kernel per chunk.
            #[cfg(target_arch = "x86_64")]
            let fast8 = width == 8
                && !stochastic
                && !moments
                && lay.fused()
                && lay.run.is_multiple_of(16)
                && crate::simd::avx512();
            let pp_chunk = (per * pbytes).max(1);
            let pp_parts: Vec<Option<&mut [std::mem::MaybeUninit<u8>]>> = if lay.fused() {
                let pp = pp_raw.take().unwrap_or_default();
                pp.chunks_mut(pp_chunk).map(Some).collect()
            } else {
                (0..x.len().div_ceil(ch)).map(|_| None).collect()
            };
            // Every chunk of codes is zipped with a part: all of them get initialized.
            assert_eq!(pp_parts.len(), x.len().div_ceil(ch));
            // (chunk index, ((its codes, its values), its group parameters when fused))
            type Out<'a> = &'a mut [std::mem::MaybeUninit<u8>];
            type Item<'a, E> = (usize, ((Out<'a>, &'a [E]), Option<Out<'a>>));
            let work = |(ci, ((o, c), pdst)): Item<'_, T>| {
                let o = crate::buf::zero_init(o);
                let mut pdst = pdst.map(crate::buf::zero_init);
                let key = stream_key(seed, ci as u64);
                let i0 = (ci * ch) as u64;
                // Fused chunks know whether they hold NaN/Inf; others scan for them.
                let mut any_bad = global.is_some();
                T::with_f32(c, |f| {
                    #[cfg(target_arch = "x86_64")]
                    if fast8 {
                        if let Some(d) = pdst.as_deref_mut() {
                            // SAFETY: `fast8` implies AVX-512 F and BW (checked at run time).
                            any_bad = unsafe {
                                chunk8_avx512(self, f, lay.run as usize, o, d, put_params)
                            };
                            return;
                        }
                    }
                    let mut tmp16 = if width == 8 {
                        Vec::new()
                    } else {
                        vec![0u16; f.len()]
                    };
                    let mut gi = 0;
                    lay.for_runs(i0, f.len(), |g, s, e| {
                        let (lo, step) = match &global {
                            Some(p) => p[g],
                            None => {
                                let st = stats(&f[s..e], moments);
                                any_bad |= st.nonfinite > 0;
                                let p = group_params(self, st);
                                if let Some(d) = pdst.as_deref_mut() {
                                    put_params(&mut d[gi * pbytes..(gi + 1) * pbytes], p);
                                }
                                gi += 1;
                                p
                            }
                        };
                        let a = if step > 0.0 { 1.0 / step } else { 0.0 };
                        let b = zp - lo * a;
                        if width == 8 {
                            quant(
                                &f[s..e],
                                &mut o[s..e],
                                a,
                                b,
                                cmax,
                                stochastic,
                                key,
                                s as u32,
                            );
                        } else {
                            quant(
                                &f[s..e],
                                &mut tmp16[s..e],
                                a,
                                b,
                                cmax,
                                stochastic,
                                key,
                                s as u32,
                            );
                        }
                    });
                    if width != 8 {
                        pack_into(&tmp16, width, o);
                    }
                });
                let mut exceptions = Vec::new();
                let n_exc = if any_bad {
                    collect_exceptions(c, i0, &mut exceptions)
                } else {
                    0
                };
                (exceptions, n_exc)
            };
            let code_chunk = ch * width as usize / 8;
            outs = if crate::pool::parallel(pp_parts.len()) {
                crate::pool::install(|| {
                    codes
                        .par_chunks_mut(code_chunk)
                        .zip(x.par_chunks(ch))
                        .zip(pp_parts)
                        .enumerate()
                        .map(work)
                        .collect()
                })
            } else {
                codes
                    .chunks_mut(code_chunk)
                    .zip(x.chunks(ch))
                    .zip(pp_parts)
                    .enumerate()
                    .map(work)
                    .collect()
            };
        };
        // SAFETY: `init` initializes every byte through `zero_init`: the head, the group
        // parameters (all at once, or per chunk when fused) and each chunk of codes.
        let mut payload = unsafe { crate::buf::init_with_tail(len, tail, init) };
        let n_exc: u64 = outs.iter().map(|o| o.1).sum();
        let exc_len: usize = outs.iter().map(|o| o.0.len()).sum();
        if exc_len > 0 {
            payload.reserve_exact(exc_len + tail);
            for (e, _) in &outs {
                payload.extend_from_slice(e);
            }
        }
        head.n_exc = n_exc;
        payload[lead..start].copy_from_slice(&head.write());
        Ok((payload, m))
    }
}

/// `int` metadata.
#[derive(Debug, Clone)]
struct IntMeta {
    cfg: IntConfig,
    chunk: u64,
    n_groups: u64,
    n_exc: u64,
}

impl IntMeta {
    fn write(&self) -> Vec<u8> {
        let c = &self.cfg;
        let mut w = LeWriter::default();
        w.u8(c.bits)
            .u8(c.absmax as u8)
            .u8(c.granularity as u8)
            .u8(c.rounding)
            .u8(c.sawb as u8)
            .bytes(&[0; 3]);
        w.u32(c.block_size)
            .u32(c.tile_rows)
            .u32(c.tile_cols)
            .u32(0)
            .u64(c.row_size)
            .u64(self.chunk)
            .u64(c.seed.unwrap_or(0))
            .u64(self.n_groups)
            .u64(self.n_exc);
        w.0
    }
}

/// An `int` decoder opened on validated metadata.
pub struct IntDecoder {
    h: IntMeta,
    lay: Layout,
    numel: u64,
    code_bytes: usize,
}

impl IntDecoder {
    fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "int header");
        let bits = r.u8("bits")?;
        let scheme = r.u8("scheme")?;
        let gran = r.u8("granularity")?;
        let rounding = r.u8("rounding")?;
        let clip = r.u8("clip")?;
        let reserved = r.take(3, "reserved")?;
        let block_size = r.u32("block_size")?;
        let tile_rows = r.u32("tile_rows")?;
        let tile_cols = r.u32("tile_cols")?;
        let reserved2 = r.u32("reserved")?;
        let row_size = r.u64("row_size")?;
        let chunk = r.u64("chunk")?;
        let seed = r.u64("seed")?;
        let n_groups = r.u64("group count")?;
        let n_exc = r.u64("exception count")?;
        r.finish()?;
        ensure_format!((2..=16).contains(&bits), "int: bits {bits} not in 2..=16");
        ensure_format!(scheme <= 1, "int: unknown scheme {scheme}");
        ensure_format!(gran <= 3, "int: unknown granularity {gran}");
        ensure_format!(rounding <= 2, "int: unknown rounding {rounding}");
        ensure_format!(clip <= 1, "int: unknown clip {clip}");
        ensure_format!(
            reserved == [0, 0, 0] && reserved2 == 0,
            "int: reserved bytes are not zero"
        );
        let granularity = [
            Granularity::Tensor,
            Granularity::Row,
            Granularity::Tile,
            Granularity::Block,
        ][gran as usize];
        ensure_format!(
            block_size >= 1 || granularity != Granularity::Block,
            "int: block_size is 0"
        );
        ensure_format!(
            !matches!(granularity, Granularity::Row | Granularity::Tile)
                || (row_size >= 1 && frame.numel.is_multiple_of(row_size)),
            "int: row_size {row_size} does not divide {} elements",
            frame.numel
        );
        ensure_format!(
            granularity != Granularity::Tile || (tile_rows >= 1 && tile_cols >= 1),
            "int: tile dims {tile_rows} x {tile_cols} are invalid"
        );
        let cfg = IntConfig {
            bits,
            absmax: scheme == 1,
            granularity,
            block_size,
            row_size,
            tile_rows,
            tile_cols,
            rounding,
            sawb: clip == 1,
            seed: (rounding != NEAREST).then_some(seed),
        };
        let lay = Layout::new(&cfg, frame.numel);
        ensure_format!(
            chunk == lay.chunk,
            "int: chunk length {chunk}, this layout uses {}",
            lay.chunk
        );
        ensure_format!(
            n_groups == lay.n_groups(),
            "int: header has {n_groups} groups, the layout has {}",
            lay.n_groups()
        );
        ensure_format!(
            n_exc <= frame.numel,
            "int: {n_exc} exceptions among {} values",
            frame.numel
        );
        let pbytes = if cfg.absmax { 4 } else { 8 };
        let code_bytes = frame.numel.saturating_mul(bits as u64).div_ceil(8);
        let expected = n_groups
            .checked_mul(pbytes)
            .and_then(|v| v.checked_add(code_bytes))
            .and_then(|v| v.checked_add(exception_bytes(n_exc, frame.dtype.size(), "int").ok()?));
        ensure_format!(
            expected == Some(frame.payload_len),
            "int: payload is {} bytes, the header implies {expected:?}",
            frame.payload_len
        );
        Ok(IntDecoder {
            h: IntMeta {
                cfg,
                chunk,
                n_groups,
                n_exc,
            },
            lay,
            numel: frame.numel,
            code_bytes: code_bytes as usize,
        })
    }

    fn decode_typed<T: ToF32>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let c = &self.h.cfg;
        let pbytes = if c.absmax { 4 } else { 8 };
        let ng = self.h.n_groups as usize;
        let (pp, rest) = payload.split_at(ng * pbytes);
        let (codes, exc) = rest.split_at(self.code_bytes);
        let mut r = LeReader::new(pp, "int group parameters");
        let mut params = Vec::with_capacity(ng);
        for _ in 0..ng {
            let lo = if c.absmax { 0.0 } else { r.f32("lo")? };
            let step = r.f32("step")?;
            ensure_format!(
                lo.is_finite() && step.is_finite() && step >= 0.0,
                "int: group parameters lo={lo}, step={step} are invalid"
            );
            params.push((lo, step));
        }
        let width = c.bits as u32;
        let ch = self.lay.chunk as usize;
        let zp = c.zp();
        let dithered = c.rounding == 2;
        let seed = c.seed.unwrap_or(0);
        let cb = ch * width as usize / 8;
        crate::pool::for_each_chunk_mut(out, ch, |ci, dst| {
            let src = &codes[ci * cb..codes.len().min((ci + 1) * cb)];
            let key = stream_key(seed, ci as u64);
            let mut q = vec![0u32; dst.len()];
            unpack(src, width, &mut q);
            let mut f = vec![0f32; dst.len()];
            self.lay.for_runs((ci * ch) as u64, dst.len(), |g, s, e| {
                let (lo, step) = params[g];
                let dither = dithered.then_some((key, s as u32));
                dequantize(&q[s..e], zp, lo, step, dither, &mut f[s..e]);
            });
            T::from_f32_slice(&f, dst);
        });
        apply_exceptions(exc, out, "int")
    }
}

crate::simd::multiversion!(
    /// One run of a group's codes back to values, `(q - zp) * step + lo`, less the dither of
    /// stream `key` from element `first` when there is one.
    fn dequantize(
        q: &[u32],
        zp: f32,
        lo: f32,
        step: f32,
        dither: Option<(u32, u32)>,
        out: &mut [f32],
    ) = dequantize_body {
        match dither {
            Some((key, first)) => {
                for (j, (o, &c)) in out.iter_mut().zip(q).enumerate() {
                    let i = first.wrapping_add(j as u32);
                    let u = (hash32(key ^ hash32(i)) >> 8) as f32 * (1.0 / 16_777_216.0);
                    *o = (c as f32 - zp - (u - 0.5)) * step + lo;
                }
            }
            None => {
                for (o, &c) in out.iter_mut().zip(q) {
                    *o = (c as f32 - zp) * step + lo;
                }
            }
        }
    }
);

impl Decoder for IntDecoder {
    fn params(&self) -> Params {
        self.h.cfg.to_params()
    }
    fn stats(&self) -> Params {
        super::params::from_pairs([
            ("n_groups", Param::Int(self.h.n_groups as i64)),
            ("n_exceptions", Param::Int(self.h.n_exc as i64)),
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

    use crate::rng::normal_f32 as normal;

    fn params(kv: &[(&str, Param)]) -> Params {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    use crate::codec::testing::round_trip_f32 as rt;

    #[test]
    fn int8_block_nearest_within_half_step() {
        let x = normal(100_003, 1);
        for (absmax, bs) in [(false, 64), (true, 256), (false, 4096), (true, 1000)] {
            let p = params(&[
                ("block_size", Param::Int(bs)),
                ("scheme", Param::Str(SCHEMES[absmax as usize].into())),
            ]);
            let (y, _, len) = rt(&INFO_INT, &p, &x);
            let groups = x.len().div_ceil(bs as usize);
            assert_eq!(len, groups * if absmax { 4 } else { 8 } + x.len());
            for (g, (a, b)) in x.chunks(bs as usize).zip(y.chunks(bs as usize)).enumerate() {
                let lo = a.iter().cloned().fold(f32::INFINITY, f32::min);
                let hi = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let step = if absmax {
                    2.0 * lo.abs().max(hi.abs()) / 254.0
                } else {
                    (hi - lo) / 255.0
                };
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= step * 0.5001 + 1e-7,
                        "group {g}: {u} -> {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_width_and_granularity() {
        let x = normal(12 * 50, 2);
        for bits in 2..=16i64 {
            for (g, extra) in [
                ("tensor", vec![]),
                ("row", vec![("row_size", Param::Int(50))]),
                (
                    "tile",
                    vec![
                        ("row_size", Param::Int(50)),
                        ("tile_rows", Param::Int(5)),
                        ("tile_cols", Param::Int(16)),
                    ],
                ),
                ("block", vec![("block_size", Param::Int(64))]),
            ] {
                for rounding in ROUNDINGS {
                    let mut kv = vec![
                        ("bits", Param::Int(bits)),
                        ("granularity", Param::Str(g.into())),
                        ("rounding", Param::Str(rounding.into())),
                        ("seed", Param::Int(1)),
                    ];
                    kv.extend(extra.clone());
                    let (y, d, _) = rt(&INFO_INT, &params(&kv), &x);
                    let ng = match d.stats()["n_groups"] {
                        Param::Int(v) => v,
                        _ => unreachable!(),
                    };
                    let range = 8.0f32; // covers all of x
                    let step = range / ((1u32 << bits) - 1) as f32;
                    let tol = if rounding == "stochastic" { 1.0 } else { 0.5 } * step * 1.001;
                    assert!(ng >= 1);
                    for (a, b) in x.iter().zip(&y) {
                        assert!(
                            (a - b).abs() <= tol + 4e-6,
                            "{bits} {g} {rounding}: {a} -> {b}"
                        );
                    }
                }
            }
        }
    }

    /// Stochastic rounding never moves a value that lies on the grid, the zero of the absmax
    /// grid above all: the uniform is compared with the fraction, never added to it in f32.
    #[test]
    fn stochastic_rounding_keeps_grid_points() {
        let mut x = vec![0f32; 1 << 20];
        x[7] = 1.0;
        x[9] = -1.0;
        for seed in 0..8 {
            let p = super::super::params::from_pairs([
                ("scheme", Param::Str("absmax".into())),
                ("rounding", Param::Str("stochastic".into())),
                ("granularity", Param::Str("tensor".into())),
                ("seed", Param::Int(seed)),
            ]);
            let (y, _, _) = rt(&INFO_INT, &p, &x);
            let moved = x.iter().zip(&y).filter(|(a, b)| a != b).count();
            assert_eq!(moved, 0, "seed {seed}");
        }
    }

    #[test]
    fn stochastic_is_unbiased_and_dither_is_uniform() {
        let x = vec![0.3f32; 1 << 16];
        let mut x2 = x.clone();
        x2[0] = 0.0;
        x2[1] = 1.0;
        for rounding in ["stochastic", "dithered"] {
            let p = params(&[
                ("bits", Param::Int(2)),
                ("granularity", Param::Str("tensor".into())),
                ("rounding", Param::Str(rounding.into())),
                ("seed", Param::Int(5)),
            ]);
            let (y, _, _) = rt(&INFO_INT, &p, &x2);
            let mean = y[2..].iter().map(|&v| v as f64).sum::<f64>() / (y.len() - 2) as f64;
            assert!((mean - 0.3).abs() < 3e-3, "{rounding}: mean {mean}");
        }
    }

    #[test]
    fn nonfinite_and_constant() {
        let mut x = vec![2.5f32; 1000];
        x[3] = f32::NAN;
        x[500] = f32::NEG_INFINITY;
        let (y, d, _) = rt(&INFO_INT, &Params::new(), &x);
        assert!(y[3].is_nan());
        assert_eq!(y[500], f32::NEG_INFINITY);
        assert!(y
            .iter()
            .enumerate()
            .all(|(i, &v)| i == 3 || i == 500 || v == 2.5));
        assert_eq!(d.stats()["n_exceptions"], Param::Int(2));
        let (y, _, _) = rt(&INFO_INT, &Params::new(), &[]);
        assert!(y.is_empty());
    }

    #[test]
    fn absmax_keeps_zero() {
        let mut x = normal(4096, 3);
        x[7] = 0.0;
        let p = params(&[
            ("scheme", Param::Str("absmax".into())),
            ("bits", Param::Int(4)),
        ]);
        let (y, _, len) = rt(&INFO_INT, &p, &x);
        assert_eq!(y[7], 0.0);
        assert_eq!(len, 16 * 4 + 4096 / 2);
    }

    #[test]
    fn sawb_clips() {
        let mut x = normal(10_000, 4);
        x[0] = 100.0;
        let p = params(&[
            ("scheme", Param::Str("absmax".into())),
            ("bits", Param::Int(4)),
            ("granularity", Param::Str("tensor".into())),
            ("clip", Param::Str("sawb".into())),
        ]);
        let (y, _, _) = rt(&INFO_INT, &p, &x);
        assert!(y[0] < 10.0, "clipped to alpha: {}", y[0]);
    }
}

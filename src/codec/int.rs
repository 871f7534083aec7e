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

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::bits::{peek64, BitWriter};
use crate::codec::kernel_io::ToF32;
use crate::dtype::{Data, DataMut, Element};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use crate::rng::fresh_seed;
use crate::rng::{hash32, stream_key};
use rayon::prelude::*;

pub const ID_INT: u16 = 8;
pub const ID_LUQ: u16 = 9;

/// Target values per parallel chunk.
const CHUNK: usize = 1 << 16;

const SCHEMES: [&str; 2] = ["affine", "absmax"];
const GRANULARITIES: [&str; 4] = ["tensor", "row", "tile", "block"];
const ROUNDINGS: [&str; 3] = ["nearest", "stochastic", "dithered"];
const CLIPS: [&str; 2] = ["none", "sawb"];

pub static INFO_INT: CodecInfo = CodecInfo {
    id: ID_INT,
    name: "int",
    doc: "int-N (N in 2..=16) affine min-max or symmetric absmax, per tensor/row/tile/block, \
          nearest/stochastic/dithered rounding, optional SAWB clipping; codes bit-packed.",
    defaults: || IntConfig::default().to_params(),
    encoder: |p| Ok(Box::new(IntConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(IntHeader::parse(meta, frame)?)),
};

pub static INFO_LUQ: CodecInfo = CodecInfo {
    id: ID_LUQ,
    name: "luq",
    doc: "LUQ logarithmic unbiased quantization (gradients): sign + (bits-1)-bit power-of-two \
          level below max|x|, stochastic rounding and pruning; unbiased.",
    defaults: || LuqConfig::default().to_params(),
    encoder: |p| Ok(Box::new(LuqConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(LuqHeader::parse(meta, frame)?)),
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

/// Statistics of one group over its finite values.
#[derive(Debug, Clone, Copy)]
struct Stats {
    lo: f32,
    hi: f32,
    sum_sq: f64,
    sum_abs: f64,
    count: u64,
    nonfinite: u64,
}

impl Stats {
    const EMPTY: Stats = Stats {
        lo: f32::INFINITY,
        hi: f32::NEG_INFINITY,
        sum_sq: 0.0,
        sum_abs: 0.0,
        count: 0,
        nonfinite: 0,
    };
    fn merge(self, o: Stats) -> Stats {
        Stats {
            lo: self.lo.min(o.lo),
            hi: self.hi.max(o.hi),
            sum_sq: self.sum_sq + o.sum_sq,
            sum_abs: self.sum_abs + o.sum_abs,
            count: self.count + o.count,
            nonfinite: self.nonfinite + o.nonfinite,
        }
    }
}

/// Lanes of the min/max accumulators. The SIMD path uses the same lanes (two AVX2 registers)
/// and the same final reduction, so both give identical results, signed zeros included.
const LANES: usize = 16;

/// Per-lane min/max of the finite values and count of non-finite ones.
struct Lanes {
    lo: [f32; LANES],
    hi: [f32; LANES],
    bad: [u32; LANES],
}

impl Lanes {
    const START: Lanes = Lanes {
        lo: [f32::INFINITY; LANES],
        hi: [f32::NEG_INFINITY; LANES],
        bad: [0; LANES],
    };

    /// Adds `v` to lane `j`: `vminps`/`vmaxps` semantics (the new value wins only if strictly
    /// smaller / larger).
    #[inline(always)]
    fn add(&mut self, j: usize, v: f32) {
        let ok = v.to_bits() & 0x7fff_ffff < 0x7f80_0000;
        let vl = if ok { v } else { f32::INFINITY };
        let vh = if ok { v } else { f32::NEG_INFINITY };
        self.lo[j] = if vl < self.lo[j] { vl } else { self.lo[j] };
        self.hi[j] = if vh > self.hi[j] { vh } else { self.hi[j] };
        self.bad[j] += !ok as u32;
    }

    /// The remainder (`tail`, fewer than LANES values), the reduction, and the moments.
    fn finish(mut self, x: &[f32], tail: &[f32], moments: bool) -> Stats {
        for (j, &v) in tail.iter().enumerate() {
            self.add(j, v);
        }
        let mut s = Stats::EMPTY;
        s.nonfinite = self.bad.iter().map(|&b| b as u64).sum();
        for j in 0..LANES {
            s.lo = if self.lo[j] < s.lo { self.lo[j] } else { s.lo };
            s.hi = if self.hi[j] > s.hi { self.hi[j] } else { s.hi };
        }
        if moments {
            for &v in x {
                if v.abs() < f32::INFINITY {
                    s.sum_sq += (v as f64) * (v as f64);
                    s.sum_abs += v.abs() as f64;
                    s.count += 1;
                }
            }
        }
        s
    }
}

/// Min and max of the finite values, the count of the others, and the moments SAWB needs.
fn stats_portable(x: &[f32], moments: bool) -> Stats {
    let mut l = Lanes::START;
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for (j, &v) in c.iter().enumerate() {
            l.add(j, v);
        }
    }
    l.finish(x, it.remainder(), moments)
}

/// [`stats_portable`] with AVX2 intrinsics (16 lanes in two registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stats_avx2(x: &[f32], moments: bool) -> Stats {
    use std::arch::x86_64::*;
    let mut l = Lanes::START;
    let mut it = x.chunks_exact(LANES);
    // SAFETY: loads read whole chunks of LANES floats; stores write the LANES-long lane arrays.
    unsafe {
        let absm = _mm256_set1_epi32(0x7fff_ffff);
        let maxf = _mm256_set1_epi32(0x7f7f_ffff);
        let pinf = _mm256_set1_ps(f32::INFINITY);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let (mut lo0, mut lo1) = (pinf, pinf);
        let (mut hi0, mut hi1) = (ninf, ninf);
        let (mut b0, mut b1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for c in &mut it {
            let v0 = _mm256_loadu_ps(c.as_ptr());
            let v1 = _mm256_loadu_ps(c.as_ptr().add(8));
            let n0 = _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(v0), absm), maxf);
            let n1 = _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(v1), absm), maxf);
            let (n0f, n1f) = (_mm256_castsi256_ps(n0), _mm256_castsi256_ps(n1));
            // min_ps(a, b) = a < b ? a : b, as in Lanes::add.
            lo0 = _mm256_min_ps(_mm256_blendv_ps(v0, pinf, n0f), lo0);
            lo1 = _mm256_min_ps(_mm256_blendv_ps(v1, pinf, n1f), lo1);
            hi0 = _mm256_max_ps(_mm256_blendv_ps(v0, ninf, n0f), hi0);
            hi1 = _mm256_max_ps(_mm256_blendv_ps(v1, ninf, n1f), hi1);
            b0 = _mm256_sub_epi32(b0, n0);
            b1 = _mm256_sub_epi32(b1, n1);
        }
        _mm256_storeu_ps(l.lo.as_mut_ptr(), lo0);
        _mm256_storeu_ps(l.lo.as_mut_ptr().add(8), lo1);
        _mm256_storeu_ps(l.hi.as_mut_ptr(), hi0);
        _mm256_storeu_ps(l.hi.as_mut_ptr().add(8), hi1);
        _mm256_storeu_si256(l.bad.as_mut_ptr().cast(), b0);
        _mm256_storeu_si256(l.bad.as_mut_ptr().add(8).cast(), b1);
    }
    l.finish(x, it.remainder(), moments)
}

/// [`stats_portable`] with AVX-512 intrinsics: the 16 lanes are one register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn stats_avx512(x: &[f32], moments: bool) -> Stats {
    use std::arch::x86_64::*;
    let mut l = Lanes::START;
    let mut it = x.chunks_exact(LANES);
    let mut bad = _mm512_setzero_si512();
    let (mut lo, mut hi) = (
        _mm512_set1_ps(f32::INFINITY),
        _mm512_set1_ps(f32::NEG_INFINITY),
    );
    // SAFETY: loads read whole chunks of LANES floats; stores write the LANES-long lane arrays.
    unsafe {
        for c in &mut it {
            let v = _mm512_loadu_ps(c.as_ptr());
            let n = nonfinite16(v);
            lo = _mm512_min_ps(_mm512_mask_mov_ps(v, n, lo_fill()), lo);
            hi = _mm512_max_ps(_mm512_mask_mov_ps(v, n, hi_fill()), hi);
            bad = _mm512_mask_sub_epi32(bad, n, bad, _mm512_set1_epi32(-1));
        }
        _mm512_storeu_ps(l.lo.as_mut_ptr(), lo);
        _mm512_storeu_ps(l.hi.as_mut_ptr(), hi);
        _mm512_storeu_si512(l.bad.as_mut_ptr().cast(), bad);
    }
    l.finish(x, it.remainder(), moments)
}

/// Lanes holding NaN or +-Inf.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn nonfinite16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__mmask16 {
    use std::arch::x86_64::*;
    let a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff));
    _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7f7f_ffff))
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn lo_fill() -> std::arch::x86_64::__m512 {
    std::arch::x86_64::_mm512_set1_ps(f32::INFINITY)
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn hi_fill() -> std::arch::x86_64::__m512 {
    std::arch::x86_64::_mm512_set1_ps(f32::NEG_INFINITY)
}

/// `Lanes::finish`'s reduction of the 16 lo lanes in one register: the smallest value, the
/// lowest lane among equal ones (which only matters for signed zeros). Pairs of adjacent lane
/// ranges are merged with `min(upper, lower)`, which keeps the lower range's value on ties, so
/// the lowest lane wins exactly as in the sequential scan.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn first_min16(v: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm512_min_ps(_mm512_permute_ps::<0xb1>(v), v);
    let v = _mm512_min_ps(_mm512_permute_ps::<0x4e>(v), v);
    let v = _mm512_min_ps(_mm512_shuffle_f32x4::<0xb1>(v, v), v);
    let v = _mm512_min_ps(_mm512_shuffle_f32x4::<0x4e>(v, v), v);
    _mm512_cvtss_f32(v)
}

/// [`first_min16`] for the hi lanes: the largest value, the lowest lane among equal ones.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn first_max16(v: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm512_max_ps(_mm512_permute_ps::<0xb1>(v), v);
    let v = _mm512_max_ps(_mm512_permute_ps::<0x4e>(v), v);
    let v = _mm512_max_ps(_mm512_shuffle_f32x4::<0xb1>(v, v), v);
    let v = _mm512_max_ps(_mm512_shuffle_f32x4::<0x4e>(v, v), v);
    _mm512_cvtss_f32(v)
}

/// Min and max of the finite values of `x` (a multiple of 16 values) and whether any value is
/// NaN or +-Inf: [`stats_portable`]'s lo, hi and nonfinite > 0, with the lanes in one register
/// and the reduction in registers.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn lohi16_avx512(x: &[f32]) -> (f32, f32, bool) {
    use std::arch::x86_64::*;
    debug_assert!(x.len().is_multiple_of(16));
    let (mut lo, mut hi) = (lo_fill(), hi_fill());
    let mut bad: __mmask16 = 0;
    for v16 in x.chunks_exact(16) {
        // SAFETY: `v16` holds 16 floats.
        let v = unsafe { _mm512_loadu_ps(v16.as_ptr()) };
        let n = nonfinite16(v);
        lo = _mm512_min_ps(_mm512_mask_mov_ps(v, n, lo_fill()), lo);
        hi = _mm512_max_ps(_mm512_mask_mov_ps(v, n, hi_fill()), hi);
        bad |= n;
    }
    (first_min16(lo), first_max16(hi), bad != 0)
}

/// 8-bit nearest codes of one whole chunk of a fused layout whose groups are runs of `run`
/// values, `run` a multiple of 16, without SAWB: per group, the statistics in registers (the
/// same 16 lanes and reduction as [`stats_portable`]), [`group_params`], the parameters written
/// to `params` (`pbytes` per group) and the codes (as [`quant_body`]). The last group may be
/// shorter (the tensor's end): it goes through [`stats`] and [`quant`]. Returns whether any
/// value was NaN or +-Inf.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn chunk8_avx512(
    c: &IntConfig,
    f: &[f32],
    run: usize,
    out: &mut [u8],
    params: &mut [u8],
    put: impl Fn(&mut [u8], (f32, f32)),
) -> bool {
    debug_assert!(run.is_multiple_of(16) && run > 0);
    let pbytes = if c.absmax { 4 } else { 8 };
    let (cmax, zp) = (c.cmax() as f32, c.zp());
    let mut any_bad = 0u32;
    for ((xb, ob), pd) in f
        .chunks(run)
        .zip(out.chunks_mut(run))
        .zip(params.chunks_exact_mut(pbytes))
    {
        let (lo, step) = if xb.len() == run {
            let (lo, hi, bad) = lohi16_avx512(xb);
            any_bad |= bad as u32;
            let s = Stats {
                lo,
                hi,
                ..Stats::EMPTY
            };
            group_params(c, s)
        } else {
            let s = stats(xb, false);
            any_bad |= (s.nonfinite > 0) as u32;
            group_params(c, s)
        };
        put(pd, (lo, step));
        let a = if step > 0.0 { 1.0 / step } else { 0.0 };
        let b = zp - lo * a;
        // SAFETY: AVX-512 F and BW are enabled in this function.
        unsafe { quant_nearest_avx512(xb, ob, a, b, cmax) };
    }
    any_bad != 0
}

/// [`quant_body`] with nearest rounding, 16 values per iteration, for 8- or 16-bit codes (cmax
/// must fit the code type: at most 255 for `u8`): the same operations (fused multiply-add, max
/// with 0 which maps NaN to 0, min with cmax, + 1/2, truncation).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quant_nearest_avx512<O: crate::codec::float::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
) {
    use std::arch::x86_64::*;
    let n = x.len().min(out.len());
    let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
    let (vmax, half, zero) = (
        _mm512_set1_ps(cmax),
        _mm512_set1_ps(0.5),
        _mm512_setzero_ps(),
    );
    let src = x.as_ptr();
    // SAFETY: `store_codes_avx512` asks for the codes of x[i..i + 16] with i + 16 <= n, or
    // masks the lanes past n; it writes out[..n].
    unsafe {
        crate::codec::float::store_codes_avx512(out.as_mut_ptr(), n, false, |i, k| {
            let v = _mm512_maskz_loadu_ps(k, src.add(i));
            // max_ps(q, 0) returns its second operand when q is NaN, like f32::max.
            let q = _mm512_max_ps(_mm512_fmadd_ps(v, va, vb), zero);
            _mm512_cvttps_epi32(_mm512_add_ps(_mm512_min_ps(q, vmax), half))
        })
    }
}

fn stats(x: &[f32], moments: bool) -> Stats {
    #[cfg(target_arch = "x86_64")]
    if crate::codec::float::has_avx512() {
        // SAFETY: AVX-512 F and BW are present (checked at run time).
        return unsafe { stats_avx512(x, moments) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::codec::float::has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { stats_avx2(x, moments) };
    }
    stats_portable(x, moments)
}

/// Per-group (lo, step) from statistics.
fn group_params(c: &IntConfig, s: Stats) -> (f32, f32) {
    if s.lo > s.hi {
        return (0.0, 0.0); // no finite value
    }
    let clip = if c.sawb && s.count > 0 {
        let (c1, c2) = sawb_coeffs(c.bits).unwrap();
        let n = s.count as f64;
        let a = c1 * (s.sum_sq / n).sqrt() - c2 * (s.sum_abs / n);
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
        let mut m = s.lo.abs().max(s.hi.abs());
        if let Some(a) = clip {
            m = m.min(a);
        }
        (0.0, step_of(2.0 * m))
    } else {
        let (mut lo, mut hi) = (s.lo, s.hi);
        if let Some(a) = clip {
            lo = lo.max(-a);
            hi = hi.min(a).max(lo);
        }
        (lo, step_of(hi - lo))
    }
}

const NEAREST: u8 = 0;

/// floor(q) for q in [0, 2^16] (callers clamp to [0, cmax] first, which also maps NaN to 0, then
/// add at most 1). Unlike `q as i32` (saturating, which LLVM does not vectorize) this is one
/// `vcvttps2dq` per 8 lanes.
#[inline(always)]
fn code_of(q: f32) -> u32 {
    // SAFETY: q is finite and in [0, 65536], which fits an i32.
    unsafe { q.to_int_unchecked::<i32>() as u32 }
}

/// Codes of one run: v = (x - lo) / step + zp, clamped to [0, cmax], plus 1/2 or u, floored.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quant_body<O: crate::codec::float::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
    stochastic: bool,
    key: u32,
    i0: u32,
) {
    if stochastic {
        for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let u = (hash32(key ^ hash32(i0 + i as u32)) >> 8) as f32 * (1.0 / 16_777_216.0);
            let q = (v.mul_add(a, b)).max(0.0).min(cmax) + u;
            *o = O::from_u32(code_of(q));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            let q = (v.mul_add(a, b)).max(0.0).min(cmax) + 0.5;
            *o = O::from_u32(code_of(q));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn quant_avx2<O: crate::codec::float::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
    stochastic: bool,
    key: u32,
    i0: u32,
) {
    quant_body(x, out, a, b, cmax, stochastic, key, i0)
}

#[allow(clippy::too_many_arguments)]
fn quant<O: crate::codec::float::Code>(
    x: &[f32],
    out: &mut [O],
    a: f32,
    b: f32,
    cmax: f32,
    stochastic: bool,
    key: u32,
    i0: u32,
) {
    #[cfg(target_arch = "x86_64")]
    if !stochastic && crate::codec::float::has_avx512() {
        // SAFETY: AVX-512 F and BW are present (checked at run time).
        return unsafe { quant_nearest_avx512(x, out, a, b, cmax) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::codec::float::has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { quant_avx2(x, out, a, b, cmax, stochastic, key, i0) };
    }
    // Without FMA, mul_add is a slow libm call: use separate multiply and add.
    let _ = (a, b);
    quant_body(x, out, a, b, cmax, stochastic, key, i0)
}

/// Packs `codes` of `width` bits into `out` (exactly ceil(len * width / 8) bytes).
pub(crate) fn pack_into(codes: &[u16], width: u32, out: &mut [u8]) {
    match width {
        16 => {
            for (d, c) in out.chunks_exact_mut(2).zip(codes) {
                d.copy_from_slice(&c.to_le_bytes());
            }
        }
        4 => {
            for (d, c) in out.iter_mut().zip(codes.chunks(2)) {
                *d = (c[0] as u8) | ((*c.get(1).unwrap_or(&0) as u8) << 4);
            }
        }
        2 => {
            for (d, c) in out.iter_mut().zip(codes.chunks(4)) {
                let mut b = 0u8;
                for (k, &v) in c.iter().enumerate() {
                    b |= (v as u8) << (2 * k);
                }
                *d = b;
            }
        }
        _ => {
            let mut w = BitWriter::with_capacity_bits(codes.len() * width as usize);
            for &c in codes {
                w.put(c as u32, width);
            }
            out.copy_from_slice(&w.finish());
        }
    }
}

/// Unpacks `out.len()` codes of `width` bits.
pub(crate) fn unpack(src: &[u8], width: u32, out: &mut [u32]) {
    match width {
        8 => {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = b as u32;
            }
        }
        16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]) as u32;
            }
        }
        4 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((src[i / 2] >> (4 * (i % 2))) & 15) as u32;
            }
        }
        _ => {
            let mask = (1u64 << width) - 1;
            for (i, o) in out.iter_mut().enumerate() {
                *o = (peek64(src, i * width as usize) & mask) as u32;
            }
        }
    }
}

/// NaN/Inf kept exactly: u64 index + the raw element, appended to `out`. Returns the count.
pub(crate) fn collect_exceptions<T: Element>(x: &[T], base: u64, out: &mut Vec<u8>) -> u64 {
    let mut n = 0;
    for (i, v) in x.iter().enumerate() {
        if !v.is_finite() {
            out.extend_from_slice(&(base + i as u64).to_le_bytes());
            out.extend_from_slice(&v.to_bits_u64().to_le_bytes()[..T::DTYPE.size()]);
            n += 1;
        }
    }
    n
}

/// Bytes of `count` exceptions of `dsize`-byte elements, or a format error on overflow.
pub(crate) fn exception_bytes(count: u64, dsize: usize, what: &str) -> Result<u64> {
    count
        .checked_mul(8 + dsize as u64)
        .ok_or_else(|| Error::Format(format!("{what}: exception count {count} overflows")))
}

/// Writes the exceptions in `list` into `out`, checking indices are in range and increasing.
pub(crate) fn apply_exceptions<T: Element>(list: &[u8], out: &mut [T], what: &str) -> Result<()> {
    let esize = 8 + T::DTYPE.size();
    let mut prev: Option<u64> = None;
    for e in list.chunks_exact(esize) {
        let i = u64::from_le_bytes(e[..8].try_into().unwrap());
        ensure_format!(
            i < out.len() as u64 && prev.is_none_or(|p| i > p),
            "{what}: exception index {i} is out of order or out of range"
        );
        let mut raw = [0u8; 8];
        raw[..esize - 8].copy_from_slice(&e[8..]);
        out[i as usize] = T::from_bits_u64(u64::from_le_bytes(raw));
        prev = Some(i);
    }
    Ok(())
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
            return Err(Error::Shape(format!(
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
        let mut head = IntHead {
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
                let parts: Vec<Vec<(usize, Stats)>> = crate::pool::map_chunks(x, ch, |ci, c| {
                    T::with_f32(c, |f| {
                        let mut v = Vec::new();
                        lay.for_runs((ci * ch) as u64, f.len(), |g, s, e| {
                            v.push((g, stats(&f[s..e], moments)))
                        });
                        v
                    })
                });
                let mut st = vec![Stats::EMPTY; n_groups];
                for (g, s) in parts.into_iter().flatten() {
                    st[g] = st[g].merge(s);
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
                && crate::codec::float::has_avx512();
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
struct IntHead {
    cfg: IntConfig,
    chunk: u64,
    n_groups: u64,
    n_exc: u64,
}

impl IntHead {
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
pub struct IntHeader {
    h: IntHead,
    lay: Layout,
    numel: u64,
    code_bytes: usize,
}

impl IntHeader {
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
        Ok(IntHeader {
            h: IntHead {
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
                for i in s..e {
                    let mut v = q[i] as f32 - zp;
                    if dithered {
                        let u = (hash32(key ^ hash32(i as u32)) >> 8) as f32 * (1.0 / 16_777_216.0);
                        v -= u - 0.5;
                    }
                    f[i] = v * step + lo;
                }
            });
            T::from_f32_slice(&f, dst);
        });
        apply_exceptions(exc, out, "int")
    }
}

impl Decoder for IntHeader {
    fn params(&self) -> Params {
        self.h.cfg.to_params()
    }
    fn info(&self) -> Params {
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

// ---------------------------------------------------------------------------------------------
// LUQ

/// The configuration of the `luq` codec.
#[derive(Debug, Clone, PartialEq)]
pub struct LuqConfig {
    pub bits: u8,
    pub seed: Option<u64>,
}

impl Default for LuqConfig {
    fn default() -> Self {
        LuqConfig {
            bits: 4,
            seed: None,
        }
    }
}

impl LuqConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let mut r = ParamReader::new("luq", p);
        let bits = r.int("bits", 4, 2, 8)? as u8;
        let seed = r.opt_u64("seed")?;
        r.finish()?;
        Ok(LuqConfig { bits, seed })
    }
    pub fn to_params(&self) -> Params {
        super::params::from_pairs([
            ("bits", Param::Int(self.bits as i64)),
            (
                "seed",
                self.seed.map_or(Param::None, |v| Param::Int(v as i64)),
            ),
        ])
    }
    /// Number of non-zero levels.
    fn levels(bits: u8) -> u32 {
        (1 << (bits - 1)) - 1
    }
}

impl Encoder for LuqConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        let seed = self.seed.unwrap_or_else(fresh_seed);
        crate::dispatch!(Data, x, |v| self.encode_typed(v, seed))
    }
}

impl LuqConfig {
    fn encode_typed<T: ToF32>(&self, x: &[T], seed: u64) -> Result<Encoded> {
        let alpha = crate::pool::install(|| {
            x.par_chunks(CHUNK)
                .map(|c| T::with_f32(c, |f| stats(f, false)))
                .reduce(|| Stats::EMPTY, Stats::merge)
        });
        let alpha = if alpha.lo <= alpha.hi {
            alpha.lo.abs().max(alpha.hi.abs())
        } else {
            0.0
        };
        let levels = Self::levels(self.bits);
        // Smallest level: alpha * 2^(1 - levels).
        let eps = alpha * 2f32.powi(1 - levels as i32);
        let inv_eps = if eps > 0.0 && eps.is_finite() {
            1.0 / eps
        } else {
            0.0
        };
        let width = self.bits as usize;
        let mut codes = vec![0u8; (x.len() * width).div_ceil(8)];
        let outs: Vec<(Vec<u8>, u64)> = crate::pool::install(|| {
            codes
                .par_chunks_mut(CHUNK * width / 8)
                .zip(x.par_chunks(CHUNK))
                .enumerate()
                .map(|(ci, (o, c))| {
                    let key = stream_key(seed, ci as u64);
                    T::with_f32(c, |f| {
                        let mut q = vec![0u16; f.len()];
                        for (i, (d, &v)) in q.iter_mut().zip(f).enumerate() {
                            let u =
                                (hash32(key ^ hash32(i as u32)) >> 8) as f32 * (1.0 / 16_777_216.0);
                            let r = v.abs() * inv_eps; // in units of the smallest level
                            let j = if !r.is_finite() {
                                0
                            } else if r < 1.0 {
                                (u < r) as u32 // prune to 0 or keep the smallest level
                            } else {
                                let e = (r.to_bits() >> 23) as i32 - 127; // floor(log2 r)
                                let frac =
                                    f32::from_bits((r.to_bits() & 0x007f_ffff) | 0x3f80_0000) - 1.0;
                                (e as u32 + 1 + (u < frac) as u32).min(levels)
                            };
                            let sign = (v.is_sign_negative() && j > 0) as u32;
                            *d = ((sign << (width - 1)) | j) as u16;
                        }
                        pack_into(&q, width as u32, o);
                    });
                    let mut exc = Vec::new();
                    let n = collect_exceptions(c, (ci * CHUNK) as u64, &mut exc);
                    (exc, n)
                })
                .collect()
        });
        let n_exc: u64 = outs.iter().map(|o| o.1).sum();
        let mut meta = LeWriter::default();
        meta.u8(self.bits)
            .bytes(&[0; 3])
            .f32(alpha)
            .u64(seed)
            .u64(n_exc);
        let mut payload = codes;
        for (e, _) in &outs {
            payload.extend_from_slice(e);
        }
        Ok(Encoded {
            meta: meta.0,
            payload,
        })
    }
}

/// A `luq` decoder.
pub struct LuqHeader {
    bits: u8,
    alpha: f32,
    seed: u64,
    n_exc: u64,
    numel: u64,
    code_bytes: usize,
}

impl LuqHeader {
    fn parse(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "luq header");
        let bits = r.u8("bits")?;
        let reserved = r.take(3, "reserved")?;
        let alpha = r.f32("alpha")?;
        let seed = r.u64("seed")?;
        let n_exc = r.u64("exception count")?;
        r.finish()?;
        ensure_format!((2..=8).contains(&bits), "luq: bits {bits} not in 2..=8");
        ensure_format!(reserved == [0, 0, 0], "luq: reserved bytes are not zero");
        ensure_format!(
            alpha.is_finite() && alpha >= 0.0,
            "luq: alpha {alpha} is invalid"
        );
        ensure_format!(
            n_exc <= frame.numel,
            "luq: {n_exc} exceptions among {} values",
            frame.numel
        );
        let code_bytes = frame.numel.saturating_mul(bits as u64).div_ceil(8);
        let expected = code_bytes.checked_add(exception_bytes(n_exc, frame.dtype.size(), "luq")?);
        ensure_format!(
            expected == Some(frame.payload_len),
            "luq: payload is {} bytes, the header implies {expected:?}",
            frame.payload_len
        );
        Ok(LuqHeader {
            bits,
            alpha,
            seed,
            n_exc,
            numel: frame.numel,
            code_bytes: code_bytes as usize,
        })
    }

    fn decode_typed<T: ToF32>(&self, payload: &[u8], out: &mut [T]) -> Result<()> {
        let (codes, exc) = payload.split_at(self.code_bytes);
        let width = self.bits as u32;
        let levels = LuqConfig::levels(self.bits);
        let table: Vec<f32> = (0..1u32 << width)
            .map(|c| {
                let j = c & ((1 << (width - 1)) - 1);
                let v = if j == 0 || j > levels {
                    0.0
                } else {
                    self.alpha * 2f32.powi(j as i32 - levels as i32)
                };
                if c >> (width - 1) == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        crate::pool::install(|| {
            out.par_chunks_mut(CHUNK)
                .zip(codes.par_chunks(CHUNK * width as usize / 8))
                .for_each(|(dst, src)| {
                    let mut q = vec![0u32; dst.len()];
                    unpack(src, width, &mut q);
                    let f: Vec<f32> = q.iter().map(|&c| table[c as usize]).collect();
                    T::from_f32_slice(&f, dst);
                })
        });
        apply_exceptions(exc, out, "luq")
    }
}

impl Decoder for LuqHeader {
    fn params(&self) -> Params {
        LuqConfig {
            bits: self.bits,
            seed: Some(self.seed),
        }
        .to_params()
    }
    fn info(&self) -> Params {
        super::params::from_pairs([
            ("alpha", Param::Float(self.alpha as f64)),
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
    use crate::dtype::DType;

    use crate::rng::normal_f32 as normal;

    fn params(kv: &[(&str, Param)]) -> Params {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn rt(info: &CodecInfo, p: &Params, x: &[f32]) -> (Vec<f32>, Box<dyn Decoder>, usize) {
        let enc = (info.encoder)(p).unwrap().encode(Data::F32(x)).unwrap();
        let frame = Frame {
            version: crate::format::VERSION,
            dtype: DType::F32,
            numel: x.len() as u64,
            payload_len: enc.payload.len() as u64,
        };
        let d = (info.decoder)(&enc.meta, frame).unwrap();
        let mut out = vec![0f32; x.len()];
        d.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
        (out, d, enc.payload.len())
    }

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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_stats_and_codes_match_portable() {
        if !crate::codec::float::has_avx2() {
            eprintln!("no AVX2 here: only the portable path exists");
            return;
        }
        let mut x = normal(10_000, 9);
        for (i, v) in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            1e-42,
        ]
        .into_iter()
        .enumerate()
        {
            x[37 * i + 3] = v;
        }
        // Signed zeros as the minimum: the lane order decides which one is kept.
        let mut zeros: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        for i in (0..100).step_by(3) {
            zeros[i] = if i % 2 == 0 { -0.0 } else { 0.0 };
        }
        for data in [&x[..], &zeros[..], &x[..5], &[][..]] {
            for len in [data.len(), data.len().saturating_sub(7), data.len() / 2] {
                let d = &data[..len];
                for moments in [false, true] {
                    // SAFETY: AVX2 and FMA checked above.
                    let a = unsafe { stats_avx2(d, moments) };
                    let b = stats_portable(d, moments);
                    assert_eq!(
                        (a.lo.to_bits(), a.hi.to_bits(), a.nonfinite, a.count),
                        (b.lo.to_bits(), b.hi.to_bits(), b.nonfinite, b.count),
                        "len {len}"
                    );
                    assert_eq!(a.sum_sq.to_bits(), b.sum_sq.to_bits());
                }
            }
        }
        for (a, b, cmax) in [
            (12.7f32, 127.0f32, 254.0f32),
            (3.1, 7.5, 15.0),
            (0.0, 0.0, 255.0),
        ] {
            for stochastic in [false, true] {
                let mut p = vec![0u8; x.len()];
                let mut q = vec![0u8; x.len()];
                // SAFETY: as above.
                unsafe { quant_avx2(&x, &mut p, a, b, cmax, stochastic, 5, 0) };
                quant_body(&x, &mut q, a, b, cmax, stochastic, 5, 0);
                assert_eq!(p, q);
            }
        }
    }

    /// Blocks where ties among signed zeros decide the stored minimum and maximum, plus
    /// non-finite values, huge values and subnormals.
    fn tricky_blocks(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        let pool = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.5,
            -3.0,
            1e-42,
            -1e-42,
            f32::MAX,
            -f32::MAX,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        (0..n)
            .map(|i| {
                let u = r.next_u64();
                // Mostly zeros of either sign, so whole blocks are zero or non-negative.
                let mode = (i / 64) % 4;
                match (mode, u % 16) {
                    (0, _) => [0.0f32, -0.0][(u >> 8) as usize % 2],
                    (1, k) if k < 12 => [0.0f32, -0.0][(u >> 8) as usize % 2],
                    (2, k) if k < 8 => [0.0f32, -0.0, 1.0, -2.0][(u >> 8) as usize % 4],
                    _ => pool[(u >> 8) as usize % pool.len()],
                }
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_stats_and_codes_match_portable() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("no AVX-512 here: the AVX2 and portable paths run");
            return;
        }
        let mut x = normal(10_000, 9);
        x.extend(tricky_blocks(64 * 400, 4));
        x.extend((0..2000).map(|i| (i as f32 - 1000.0) * 0.25));
        for data in [&x[..], &x[..5], &x[..17], &[][..]] {
            for len in [data.len(), data.len().saturating_sub(7), data.len() / 2] {
                let d = &data[..len];
                for moments in [false, true] {
                    // SAFETY: AVX-512 F and BW checked above.
                    let a = unsafe { stats_avx512(d, moments) };
                    let b = stats_portable(d, moments);
                    assert_eq!(
                        (a.lo.to_bits(), a.hi.to_bits(), a.nonfinite, a.count),
                        (b.lo.to_bits(), b.hi.to_bits(), b.nonfinite, b.count),
                        "len {len}"
                    );
                    assert_eq!(a.sum_sq.to_bits(), b.sum_sq.to_bits());
                }
            }
        }
        // The register reduction, block by block (16..4096 values).
        for run in [16usize, 32, 64, 256, 4096] {
            for b in x.chunks_exact(run) {
                // SAFETY: as above.
                let (lo, hi, bad) = unsafe { lohi16_avx512(b) };
                let s = stats_portable(b, false);
                assert_eq!(
                    (lo.to_bits(), hi.to_bits(), bad),
                    (s.lo.to_bits(), s.hi.to_bits(), s.nonfinite > 0),
                    "run {run}: {b:?}"
                );
            }
        }
        // Codes: every tail length, 8- and 16-bit outputs.
        for (a, b, cmax) in [
            (12.7f32, 127.0f32, 254.0f32),
            (3.1, 7.5, 15.0),
            (0.0, 0.0, 255.0),
            (1e30, -3.0, 65535.0),
        ] {
            for len in (0..40).chain([x.len() - 3, x.len()]) {
                // 8-bit codes where they fit (cmax <= 255, as for every 8-bit encode).
                if cmax <= 255.0 {
                    let mut p = vec![0u8; len];
                    let mut q = vec![0u8; len];
                    // SAFETY: as above.
                    unsafe { quant_nearest_avx512(&x[..len], &mut p, a, b, cmax) };
                    quant_body(&x[..len], &mut q, a, b, cmax, false, 0, 0);
                    assert_eq!(p, q, "len {len}");
                }
                let mut p = vec![0u16; len];
                let mut q = vec![0u16; len];
                // SAFETY: as above.
                unsafe { quant_nearest_avx512(&x[..len], &mut p, a, b, cmax) };
                quant_body(&x[..len], &mut q, a, b, cmax, false, 0, 0);
                assert_eq!(p, q, "len {len}");
            }
        }
        // The fused chunk kernel against statistics, parameters and codes of the portable path.
        for absmax in [false, true] {
            for run in [16usize, 64, 4096] {
                let c = IntConfig {
                    absmax,
                    block_size: run as u32,
                    ..IntConfig::default()
                };
                let pbytes = if absmax { 4 } else { 8 };
                let put = |d: &mut [u8], (lo, step): (f32, f32)| {
                    if absmax {
                        d.copy_from_slice(&step.to_le_bytes());
                    } else {
                        d[..4].copy_from_slice(&lo.to_le_bytes());
                        d[4..].copy_from_slice(&step.to_le_bytes());
                    }
                };
                for len in [x.len(), x.len() - 5, run * 3, run + 1, 3] {
                    let f = &x[x.len() - len..];
                    let groups = len.div_ceil(run);
                    let (mut o1, mut p1) = (vec![0u8; len], vec![0u8; groups * pbytes]);
                    let (mut o2, mut p2) = (vec![0u8; len], vec![0u8; groups * pbytes]);
                    // SAFETY: as above.
                    let bad1 = unsafe { chunk8_avx512(&c, f, run, &mut o1, &mut p1, put) };
                    let mut bad2 = false;
                    for ((xb, ob), pd) in f
                        .chunks(run)
                        .zip(o2.chunks_mut(run))
                        .zip(p2.chunks_exact_mut(pbytes))
                    {
                        let s = stats_portable(xb, false);
                        bad2 |= s.nonfinite > 0;
                        let (lo, step) = group_params(&c, s);
                        put(pd, (lo, step));
                        let a = if step > 0.0 { 1.0 / step } else { 0.0 };
                        quant_body(xb, ob, a, c.zp() - lo * a, c.cmax() as f32, false, 0, 0);
                    }
                    assert_eq!(bad1, bad2, "absmax={absmax} run={run} len={len}");
                    assert_eq!(p1, p2, "absmax={absmax} run={run} len={len}");
                    assert_eq!(o1, o2, "absmax={absmax} run={run} len={len}");
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
                    let ng = match d.info()["n_groups"] {
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
        assert_eq!(d.info()["n_exceptions"], Param::Int(2));
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

    #[test]
    fn luq_is_unbiased_and_on_levels() {
        let mut x: Vec<f32> = vec![0.013; 1 << 16];
        x[0] = 1.0;
        let p = params(&[("bits", Param::Int(4)), ("seed", Param::Int(2))]);
        let (y, _, len) = rt(&INFO_LUQ, &p, &x);
        assert_eq!(len, x.len() / 2);
        let levels: Vec<f32> = (0..8)
            .map(|j| if j == 0 { 0.0 } else { 2f32.powi(j - 7) })
            .collect();
        assert!(y.iter().all(|v| levels.contains(v)));
        let mean = y[1..].iter().map(|&v| v as f64).sum::<f64>() / (y.len() - 1) as f64;
        assert!((mean - 0.013).abs() < 3e-4, "mean {mean}");
    }
}

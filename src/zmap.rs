//! Zero maps: how a tensor with exact zeros is held so that they come back exact and cost
//! little (the activation store and the optimizer state of `python/smaq_rs/torch/_store.py`).
//!
//! [`store`] counts the zeros and measures the value range in one parallel pass, then keeps the
//! tensor in one of three shapes:
//! - plain: the codec's record of every value (no zeros, or a codec that keeps them);
//! - plain with a list of the zeros' positions (few zeros and a codec that loses them);
//! - a 1-bit map of the non-zero elements (`np.packbits(x != 0, bitorder="little")`: bit `i % 8`
//!   of byte `i / 8` is element `i`) and the codec's record of the non-zero values only, written
//!   in a second parallel pass.
//!
//! The [min, max] of the packed values travels with them: [`restore`] clamps decoded values into
//! it, so a small positive value of a non-negative tensor never decodes to 0 or below.

use crate::codec::Params;
use crate::dtype::{Data, DataMut, Element};
use crate::error::{Error, Result};
use crate::format::Packed;
use crate::stats::{summarize, Filter, Gather, Sums};

/// Elements per parallel task; a multiple of 8 so each task owns whole bytes of the map.
const BLOCK: usize = 1 << 16;

/// Zero count and value range of a run of values, compared in f64 (exact for every element
/// type). The leftmost of equal extremes wins (it matters only for -0.0 and +0.0).
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub zeros: u64,
    pub min: f64,
    pub max: f64,
    pub nan: bool,
}

impl Tally {
    pub const EMPTY: Tally = Tally {
        zeros: 0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        nan: false,
    };

    #[inline(always)]
    pub fn add(&mut self, x: f64) {
        self.zeros += (x == 0.0) as u64;
        self.nan |= x.is_nan();
        if x < self.min {
            self.min = x;
        }
        if x > self.max {
            self.max = x;
        }
    }

    /// Combines with the tally of the values after these.
    pub fn then(self, o: Tally) -> Tally {
        Tally {
            zeros: self.zeros + o.zeros,
            min: if o.min < self.min { o.min } else { self.min },
            max: if o.max > self.max { o.max } else { self.max },
            nan: self.nan || o.nan,
        }
    }

    /// `[min, max]` when there are values and none is NaN.
    pub fn range(&self, n: u64) -> Option<[f64; 2]> {
        (n > 0 && !self.nan).then_some([self.min, self.max])
    }
}

/// One pass over a tensor: the tally of all values and of the non-zero ones, and the count of
/// non-zero values per [`BLOCK`].
#[derive(Debug, Clone)]
pub struct Census {
    pub all: Tally,
    pub nonzero: Tally,
    pub per_block: Vec<usize>,
}

/// The tallies of one block, all values and the non-zero ones: the shared accumulator
/// ([`summarize`]) takes the non-zero, non-NaN values and counts the others; the first zero stands
/// for the zeros among the extremes, which gives the leftmost-wins rule of [`Tally::add`] (equal
/// non-zero values have equal bits).
fn census_block<T: Element>(x: &[T]) -> (Tally, Tally) {
    let s = summarize(
        x,
        Gather {
            filter: Filter::NonZero,
            sums: Sums::None,
        },
    );
    let nz = Tally {
        zeros: 0,
        min: s.min,
        max: s.max,
        nan: s.nan > 0,
    };
    let (min, max) = s.range_with_zeros();
    let all = Tally {
        zeros: s.zeros,
        min,
        max,
        ..nz
    };
    (all, nz)
}

pub fn census<T: Element>(x: &[T]) -> Census {
    let parts: Vec<(Tally, Tally)> = crate::pool::map_chunks(x, BLOCK, |_, b| census_block(b));
    let mut c = Census {
        all: Tally::EMPTY,
        nonzero: Tally::EMPTY,
        per_block: Vec::with_capacity(parts.len()),
    };
    for ((a, z), b) in parts.into_iter().zip(x.chunks(BLOCK)) {
        c.per_block.push(b.len() - a.zeros as usize);
        c.all = c.all.then(a);
        c.nonzero = c.nonzero.then(z);
    }
    c
}

/// Elements of `bytes` (float bit patterns of `itemsize` bytes each, little-endian) that are not
/// a zero of either sign: their bits with the sign bit cleared are not all zero. One parallel
/// pass, no temporary (a checkpoint writer asks this of every float tensor it saves).
///
/// With a `limit`, counting stops once more than `limit` are found: the result is then some
/// number above `limit` (no more than the full count); at or below `limit` it is exact. A
/// writer that only needs to know whether a tensor is sparse enough reads about half of a
/// dense one.
pub fn count_nonzero_bits(bytes: &[u8], itemsize: usize, limit: Option<u64>) -> Result<u64> {
    /// Elements of one aligned run, counted in lanes as wide as the elements over runs short
    /// enough not to overflow them (a loop the compiler vectorizes at any level).
    macro_rules! typed {
        ($name:ident, $u:ty, $acc:ty) => {
            fn $name(x: &[$u], mag: $u) -> u64 {
                x.chunks(1 << 15)
                    .map(|b| b.iter().fold(0 as $acc, |a, &v| a + (v & mag != 0) as $acc) as u64)
                    .sum()
            }
        };
    }
    typed!(count8, u8, u16);
    typed!(count16, u16, u16);
    typed!(count32, u32, u32);
    typed!(count64, u64, u64);
    fn count<const N: usize>(bytes: &[u8], limit: u64) -> u64 {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicU64, Ordering};
        let per: usize = BLOCK * N;
        // Blocks are skipped once the total is past `limit`; the total only grows, so a total
        // at or below it at the end counted every block.
        let total = AtomicU64::new(0);
        let block = |c: &[u8]| {
            if total.load(Ordering::Relaxed) > limit {
                return;
            }
            let aligned = match N {
                2 => bytemuck::try_cast_slice::<u8, u16>(c)
                    .ok()
                    .map(|x| count16(x, 0x7fff)),
                4 => bytemuck::try_cast_slice::<u8, u32>(c)
                    .ok()
                    .map(|x| count32(x, 0x7fff_ffff)),
                8 => bytemuck::try_cast_slice::<u8, u64>(c)
                    .ok()
                    .map(|x| count64(x, 0x7fff_ffff_ffff_ffff)),
                _ => Some(count8(c, 0x7f)),
            };
            // Little-endian hosts only read through the typed views (the format is LE).
            let k = match aligned.filter(|_| cfg!(target_endian = "little")) {
                Some(k) => k,
                None => c
                    .chunks_exact(N)
                    .filter(|e| {
                        let mut b = [0u8; 8];
                        b[..N].copy_from_slice(e);
                        u64::from_le_bytes(b) & !(1u64 << (8 * N - 1)) != 0
                    })
                    .count() as u64,
            };
            total.fetch_add(k, Ordering::Relaxed);
        };
        // One block, or one thread, runs here: a pool worker would cost two wake-ups. Else on
        // the Rayon pool, as the checkpoint writer's encodes that follow: a region of the host's
        // OpenMP team here would leave its workers spinning beside those encodes.
        if crate::pool::parallel(bytes.len().div_ceil(per)) && crate::pool::num_threads() > 1 {
            crate::pool::install(|| bytes.par_chunks(per).for_each(block));
        } else {
            bytes.chunks(per).for_each(block);
        }
        total.into_inner()
    }
    if itemsize == 0 || !bytes.len().is_multiple_of(itemsize) {
        return Err(Error::Layout(format!(
            "{} bytes are not a whole number of {itemsize}-byte elements",
            bytes.len()
        )));
    }
    let limit = limit.unwrap_or(u64::MAX);
    Ok(match itemsize {
        1 => count::<1>(bytes, limit),
        2 => count::<2>(bytes, limit),
        4 => count::<4>(bytes, limit),
        8 => count::<8>(bytes, limit),
        _ => {
            return Err(Error::Layout(format!(
                "elements of {itemsize} bytes are not floats"
            )))
        }
    })
}

/// `x` as float32 when that is its element type.
fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type, same layout).
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type, same layout); the borrow is moved into the result.
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}

/// Splits `x` into disjoint mutable slices of the given lengths.
fn carve<'a, T>(mut x: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(lens.len());
    for &n in lens {
        let (a, b) = std::mem::take(&mut x).split_at_mut(n);
        out.push(a);
        x = b;
    }
    out
}

/// The zero map of `x` and its non-zero values in order.
pub fn split<T: Element>(x: &[T], c: &Census) -> (Vec<u8>, Vec<T>) {
    let nnz: usize = c.per_block.iter().sum();
    let mut mask = vec![0u8; x.len().div_ceil(8)];
    let mut values = vec![T::from_f64(0.0); nnz];
    let vals = carve(&mut values, &c.per_block);
    let items: Vec<_> = x
        .chunks(BLOCK)
        .zip(mask.chunks_mut(BLOCK / 8))
        .zip(vals)
        .collect();
    crate::pool::map_items(
        items,
        || (),
        |_, ((x, m), v)| {
            #[cfg(target_arch = "x86_64")]
            if let (Some(xf), true) = (as_f32(x), crate::simd::avx512()) {
                let vf = as_f32_mut(v).expect("same type as x");
                // SAFETY: AVX-512F and POPCNT are present; `m` holds a bit per element of
                // `x` and `vf` a slot per non-zero element of `x` (census counted them).
                unsafe { avx512::split(xf, m, vf) };
                return;
            }
            split_block(x, m, v)
        },
    );
    (mask, values)
}

/// The map bits and non-zero values of one block (the portable form of `avx512::split`).
fn split_block<T: Element>(x: &[T], m: &mut [u8], v: &mut [T]) {
    let mut k = 0;
    for (bits, xs) in m.iter_mut().zip(x.chunks(8)) {
        let mut b = 0u8;
        for (j, &e) in xs.iter().enumerate() {
            if e.to_f64() != 0.0 {
                b |= 1 << j;
                v[k] = e;
                k += 1;
            }
        }
        *bits = b;
    }
}

/// One block of [`merge`]: `v` starts at the block's first value.
fn merge_block<T: Element>(m: &[u8], v: &[T], range: Option<[f64; 2]>, o: &mut [T]) {
    let mut k = 0;
    for (xs, &bits) in o.chunks_mut(8).zip(m) {
        for (j, e) in xs.iter_mut().enumerate() {
            *e = if bits >> j & 1 != 0 {
                k += 1;
                clamp(v[k - 1], range)
            } else {
                T::from_f64(0.0)
            };
        }
    }
}

/// `e` clamped into `range` in f64 (NaN stays NaN, as torch.clamp); `None` keeps it.
#[inline(always)]
pub(crate) fn clamp<T: Element>(e: T, range: Option<[f64; 2]>) -> T {
    match range {
        Some([lo, hi]) => {
            let v = e.to_f64();
            if v < lo {
                T::from_f64(lo)
            } else if v > hi {
                T::from_f64(hi)
            } else {
                e
            }
        }
        None => e,
    }
}

/// Writes `values` (clamped into `range`) where `mask` has a 1 bit and 0 elsewhere.
pub fn merge<T: Element>(
    mask: &[u8],
    values: &[T],
    range: Option<[f64; 2]>,
    out: &mut [T],
) -> Result<()> {
    let n = out.len();
    if mask.len() != n.div_ceil(8) {
        return Err(Error::Layout(format!(
            "zero map holds {} bytes, {n} elements need {}",
            mask.len(),
            n.div_ceil(8)
        )));
    }
    let ones = |m: &[u8], len: usize| -> usize {
        let full = len / 8;
        let mut k: usize = m[..full].iter().map(|b| b.count_ones() as usize).sum();
        if !len.is_multiple_of(8) {
            k += (m[full] & ((1u16 << (len % 8)) - 1) as u8).count_ones() as usize;
        }
        k
    };
    let per_block: Vec<usize> =
        crate::pool::map_chunks(mask, BLOCK / 8, |i, m| ones(m, BLOCK.min(n - i * BLOCK)));
    let total: usize = per_block.iter().sum();
    if total != values.len() {
        return Err(Error::Layout(format!(
            "zero map has {total} non-zero elements, {} values are packed",
            values.len()
        )));
    }
    let mut starts = Vec::with_capacity(per_block.len());
    let mut at = 0;
    for k in &per_block {
        starts.push(at);
        at += k;
    }
    crate::pool::for_each_chunk_mut(out, BLOCK, |i, o| {
        let (m, s) = (&mask[i * BLOCK / 8..][..o.len().div_ceil(8)], starts[i]);
        #[cfg(target_arch = "x86_64")]
        if let (Some(vf), true) = (as_f32(values), crate::simd::avx512()) {
            let of = as_f32_mut(o).expect("same type as values");
            let r = range.map(|[lo, hi]| [lo as f32, hi as f32]);
            // SAFETY: AVX-512F and POPCNT are present; `m` holds a bit per element of
            // `of` and `vf[s..]` at least as many values as those bits are set (the
            // per-block counts were checked against `values.len()` above).
            unsafe { avx512::merge(m, &vf[s..], r, of) };
            return;
        }
        merge_block(m, &values[s..], range, o)
    });
    Ok(())
}

/// Clamps every value into `range` (NaN stays NaN, as torch.clamp).
pub fn clamp_all<T: Element>(out: &mut [T], range: [f64; 2]) {
    crate::pool::for_each_chunk_mut(out, BLOCK, |_, o| {
        o.iter_mut().for_each(|e| *e = clamp(*e, Some(range)))
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The map bytes of `x` into `m` and its non-zero values into `v` (exactly as many slots).
    ///
    /// # Safety
    /// The CPU has AVX-512F and POPCNT; `m.len() == x.len().div_ceil(8)`; `v` has a slot per
    /// non-zero element of `x` (NaN counts as non-zero).
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn split(x: &[f32], m: &mut [u8], v: &mut [f32]) {
        let zero = _mm512_setzero_ps();
        let mut k = 0usize;
        let full = x.len() / 16;
        for i in 0..full {
            // SAFETY: 16 floats at 16*i < x.len().
            let a = unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * i)) };
            let nz: u16 = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(a, zero);
            let n = nz.count_ones() as usize;
            assert!(k + n <= v.len(), "more non-zero values than counted");
            // SAFETY: writes n = popcount(nz) floats at v[k..k + n] (checked above).
            unsafe {
                _mm512_mask_storeu_ps(
                    v.as_mut_ptr().add(k),
                    ((1u32 << n) - 1) as u16,
                    _mm512_maskz_compress_ps(nz, a),
                )
            };
            k += n;
            m[2 * i..2 * i + 2].copy_from_slice(&nz.to_le_bytes());
        }
        let done = 16 * full;
        super::split_block(&x[done..], &mut m[done / 8..], &mut v[k..]);
    }

    /// Expands `v` (clamped into `range`) into the set bits of `m`, zeros elsewhere, into `o`.
    ///
    /// # Safety
    /// The CPU has AVX-512F and POPCNT; `m.len() == o.len().div_ceil(8)`; `v` holds at least as
    /// many values as `m` has set bits for the elements of `o`.
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn merge(m: &[u8], v: &[f32], range: Option<[f32; 2]>, o: &mut [f32]) {
        let (lo, hi) = match range {
            Some([a, b]) => (_mm512_set1_ps(a), _mm512_set1_ps(b)),
            None => (
                _mm512_set1_ps(f32::NEG_INFINITY),
                _mm512_set1_ps(f32::INFINITY),
            ),
        };
        let mut k = 0usize;
        let full = o.len() / 16;
        for i in 0..full {
            let bits = u16::from_le_bytes([m[2 * i], m[2 * i + 1]]);
            let n = bits.count_ones() as usize;
            assert!(k + n <= v.len(), "fewer packed values than map bits");
            // SAFETY: reads n floats at v[k..k + n] (checked above); masked lanes are not
            // touched. Writes 16 floats at o[16*i..] (16*i + 16 <= o.len()).
            unsafe {
                let a = _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, v.as_ptr().add(k));
                // torch.clamp: max with the bound first, then min; NaN stays NaN.
                let a = _mm512_min_ps(hi, _mm512_max_ps(lo, a));
                _mm512_storeu_ps(o.as_mut_ptr().add(16 * i), _mm512_maskz_expand_ps(bits, a));
            }
            k += n;
        }
        let done = 16 * full;
        let r = range.map(|[a, b]| [a as f64, b as f64]);
        super::merge_block(&m[done / 8..], &v[k..], r, &mut o[done..]);
    }
}

/// How a tensor is to be held: the codec, and the rules that pick the shape (module doc).
#[derive(Debug, Clone, Copy)]
pub struct Rule<'a> {
    pub codec: &'a str,
    pub params: &'a Params,
    /// Whether the codec with these parameters decodes 0 to exactly 0.
    pub keeps_zeros: bool,
    /// With a codec that keeps zeros, a zero map is used from this fraction of zeros on.
    pub sparse_fraction: f64,
}

/// The exact zeros of a held tensor.
#[derive(Debug)]
pub enum Zeros {
    /// None, or the codec keeps them.
    Kept,
    /// Their positions.
    List(Vec<i64>),
    /// A map of the non-zero elements; the packed record holds only those.
    Map(Vec<u8>),
}

/// [`Zeros`], borrowed (from the Python side's arrays).
#[derive(Debug, Clone, Copy)]
pub enum ZerosRef<'a> {
    Kept,
    List(&'a [i64]),
    Map(&'a [u8]),
}

impl Zeros {
    pub fn as_ref(&self) -> ZerosRef<'_> {
        match self {
            Zeros::Kept => ZerosRef::Kept,
            Zeros::List(l) => ZerosRef::List(l),
            Zeros::Map(m) => ZerosRef::Map(m),
        }
    }
}

/// A tensor as held: packed values (none when every element is zero and a map says so), its
/// zeros, and the range decoded values are clamped into.
#[derive(Debug)]
pub struct Held {
    pub packed: Option<Packed>,
    pub zeros: Zeros,
    pub range: Option<[f64; 2]>,
}

/// The three shapes of the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Plain,
    List,
    Map,
}

/// Which shape a tensor of `n` values with `z` zeros takes under `rule`.
pub fn layout(n: u64, z: u64, rule: &Rule<'_>) -> Layout {
    let few = (z as f64) < rule.sparse_fraction * n as f64;
    if z > 0 && few && !rule.keeps_zeros && 4 * z < n / 8 {
        Layout::List
    } else if z > 0 && (!few || !rule.keeps_zeros) {
        Layout::Map
    } else {
        Layout::Plain
    }
}

/// Positions of the zeros of `x` (`count` of them).
pub fn zero_positions<T: Element>(x: &[T], count: u64) -> Vec<i64> {
    let mut zeros = Vec::with_capacity(count as usize);
    zeros.extend(
        x.iter()
            .enumerate()
            .filter(|(_, v)| v.to_f64() == 0.0)
            .map(|(i, _)| i as i64),
    );
    zeros
}

/// Holds `x` (of `shape`) by `rule`; `None` for `zeros_auto = false` relies on the codec alone.
pub fn store<T: Element>(x: &[T], shape: &[u64], rule: &Rule<'_>) -> Result<Held> {
    let n = x.len() as u64;
    let c = census(x);
    match layout(n, c.all.zeros, rule) {
        Layout::List => Ok(Held {
            packed: Some(Packed::encode(T::wrap(x), shape, rule.codec, rule.params)?),
            zeros: Zeros::List(zero_positions(x, c.all.zeros)),
            range: c.all.range(n),
        }),
        Layout::Map => {
            let (mask, values) = split(x, &c);
            let packed = if values.is_empty() {
                None
            } else {
                let m = [values.len() as u64];
                Some(Packed::encode(
                    T::wrap(&values),
                    &m,
                    rule.codec,
                    rule.params,
                )?)
            };
            Ok(Held {
                packed,
                zeros: Zeros::Map(mask),
                range: c.nonzero.range(n - c.all.zeros),
            })
        }
        Layout::Plain => Ok(Held {
            packed: Some(Packed::encode(T::wrap(x), shape, rule.codec, rule.params)?),
            zeros: Zeros::Kept,
            range: c.all.range(n),
        }),
    }
}

/// Decodes a held tensor into `out`: the packed values, clamped into `range`, with its zeros.
pub fn restore<T: Element>(
    packed: Option<&Packed>,
    zeros: ZerosRef<'_>,
    range: Option<[f64; 2]>,
    out: &mut [T],
) -> Result<()> {
    let n = out.len();
    match zeros {
        ZerosRef::Map(mask) => {
            let values: Vec<T> = match packed {
                Some(p) => {
                    let k = usize::try_from(p.numel())
                        .map_err(|_| Error::Layout("packed values do not fit in memory".into()))?;
                    if k > n {
                        return Err(Error::Layout(format!(
                            "{k} packed values for a tensor of {n} elements"
                        )));
                    }
                    let mut v = vec![T::from_f64(0.0); k];
                    p.decode_into(T::wrap_mut(&mut v))?;
                    v
                }
                None => Vec::new(),
            };
            merge(mask, &values, range, out)
        }
        ZerosRef::Kept | ZerosRef::List(_) => {
            let p = packed.ok_or_else(|| Error::Layout("no packed values to decode".into()))?;
            if p.numel() != n as u64 {
                return Err(Error::Layout(format!(
                    "packed record holds {} values, the tensor has {n}",
                    p.numel()
                )));
            }
            match range {
                Some(r) => p.decode_into_clamped(r, T::wrap_mut(out))?,
                None => p.decode_into(T::wrap_mut(out))?,
            }
            if let ZerosRef::List(list) = zeros {
                for &i in list {
                    match usize::try_from(i).ok().filter(|&i| i < n) {
                        Some(i) => out[i] = T::from_f64(0.0),
                        None => {
                            return Err(Error::Layout(format!(
                                "zero index {i} is outside the tensor ({n} values)"
                            )))
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

/// [`store`] for any element type.
pub fn store_data(x: Data<'_>, shape: &[u64], rule: &Rule<'_>) -> Result<Held> {
    crate::dispatch!(Data, x, |v| store(v, shape, rule))
}

/// [`restore`] for any element type.
pub fn restore_data(
    packed: Option<&Packed>,
    zeros: ZerosRef<'_>,
    range: Option<[f64; 2]>,
    out: DataMut<'_>,
) -> Result<()> {
    crate::dispatch!(DataMut, out, |v| restore(packed, zeros, range, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Param;
    use crate::rng::SplitMix64;
    use half::{bf16, f16};

    /// Values with runs of zeros of both signs, NaN, infinities and plain numbers.
    fn values(n: usize, seed: u64, zero_pct: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match r.next_u64() % 100 {
                    k if k < zero_pct => {
                        if i % 3 == 0 {
                            -0.0
                        } else {
                            0.0
                        }
                    }
                    97 if i % 5 == 0 => f32::NAN,
                    98 if i % 5 == 0 => f32::NEG_INFINITY,
                    _ => u,
                }
            })
            .collect()
    }

    fn key(t: Tally) -> (u64, u64, u64, bool) {
        (t.zeros, t.min.to_bits(), t.max.to_bits(), t.nan)
    }

    /// Zeros of either sign are not counted, anything else is (NaN, subnormals), for every
    /// element size; a ragged buffer is an error.
    #[test]
    fn nonzero_bits_count_magnitudes() {
        let x = values(100_003, 3, 40);
        let want = x.iter().filter(|v| **v != 0.0 || v.is_nan()).count() as u64;
        let b32: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_nonzero_bits(&b32, 4, None).unwrap(), want);
        let b64: Vec<u8> = x.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
        assert_eq!(count_nonzero_bits(&b64, 8, None).unwrap(), want);
        let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let want_h = h.iter().filter(|v| v.to_f32() != 0.0 || v.is_nan()).count() as u64;
        let b16: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_nonzero_bits(&b16, 2, None).unwrap(), want_h);
        let b8 = [0x00u8, 0x80, 0x01, 0x81, 0x7f];
        assert_eq!(count_nonzero_bits(&b8, 1, None).unwrap(), 3);
        // A buffer that does not start on an element boundary takes the byte-wise path.
        let mut off = vec![0u8];
        off.extend_from_slice(&b32);
        assert_eq!(count_nonzero_bits(&off[1..], 4, None).unwrap(), want);
        assert!(count_nonzero_bits(&b32[..7], 4, None).is_err());
        assert!(count_nonzero_bits(&b32, 3, None).is_err());
    }

    /// With a limit: exact at or below it, some count above it (never above the full count)
    /// past it, on a buffer of many blocks.
    #[test]
    fn nonzero_bits_stop_past_the_limit() {
        let x = values(1 << 21, 5, 30);
        let want = x.iter().filter(|v| **v != 0.0 || v.is_nan()).count() as u64;
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        for limit in [want, want + 1, u64::MAX] {
            assert_eq!(count_nonzero_bits(&b, 4, Some(limit)).unwrap(), want);
        }
        for limit in [0, want / 2, want - 1] {
            let k = count_nonzero_bits(&b, 4, Some(limit)).unwrap();
            assert!(k > limit && k <= want, "limit {limit}: {k} of {want}");
        }
        // One thread takes the blocks in order and stops soon after the limit.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let k = one
            .install(|| count_nonzero_bits(&b, 4, Some(want / 4)))
            .unwrap();
        assert!(k < want / 2, "{k} of {want}");
    }

    /// The AVX-512 split and merge give the portable results exactly.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_blocks_match_portable() {
        if !crate::simd::avx512() {
            return;
        }
        for n in [0usize, 1, 15, 16, 17, 100, 1000, 4099] {
            for zero_pct in [0, 3, 50, 100] {
                let x = values(n, n as u64 * 7 + zero_pct, zero_pct);
                let (a, _) = census_block(&x);
                let nnz = n - a.zeros as usize;
                let (mut m1, mut v1) = (vec![0u8; n.div_ceil(8)], vec![0f32; nnz]);
                let (mut m2, mut v2) = (m1.clone(), v1.clone());
                split_block(&x, &mut m1, &mut v1);
                // SAFETY: crate::simd::avx512() checked above; sizes as the function requires.
                unsafe { avx512::split(&x, &mut m2, &mut v2) };
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(m1, m2);
                assert_eq!(bits(&v1), bits(&v2));
                for range in [None, Some([-0.25f32, 0.3])] {
                    let (mut o1, mut o2) = (vec![7f32; n], vec![7f32; n]);
                    let r64 = range.map(|[a, b]| [a as f64, b as f64]);
                    merge_block(&m1, &v1, r64, &mut o1);
                    // SAFETY: as above.
                    unsafe { avx512::merge(&m1, &v1, range, &mut o2) };
                    assert_eq!(bits(&o1), bits(&o2), "merge, n={n} range={range:?}");
                }
            }
        }
    }

    /// The census of a block is a sequential scan with [`Tally::add`], bit for bit (signed
    /// zeros as extremes, NaN, infinities), for every element type.
    #[test]
    fn census_is_a_sequential_scan() {
        fn scan<T: Element>(x: &[T]) -> (Tally, Tally) {
            let (mut all, mut nz) = (Tally::EMPTY, Tally::EMPTY);
            for v in x.iter().map(|v| v.to_f64()) {
                all.add(v);
                if v != 0.0 {
                    nz.add(v);
                }
            }
            (all, nz)
        }
        fn check<T: Element>(x: &[T], what: &str) {
            let ((a, z), (sa, sz)) = (census_block(x), scan(x));
            assert_eq!(key(a), key(sa), "all, {what}");
            assert_eq!(key(z), key(sz), "non-zero, {what}");
        }
        let mut x = crate::stats::tests::specials(20_000, 9);
        x.extend(values(5000, 4, 50));
        x.extend(values(5000, 5, 97));
        for start in [0usize, 5, 97 * 3, 20_000] {
            for len in (0..70).chain([256, 4099, 9000]) {
                let d = &x[start..(start + len).min(x.len())];
                check(d, &format!("f32 {start} {len}"));
                let h: Vec<f16> = d.iter().map(|&v| f16::from_f32(v)).collect();
                let b: Vec<bf16> = d.iter().map(|&v| bf16::from_f32(v)).collect();
                let w: Vec<f64> = d.iter().map(|&v| v as f64).collect();
                check(&h, "f16");
                check(&b, "bf16");
                check(&w, "f64");
            }
        }
    }

    fn round_trip<T: Element>(x: &[T], rule: &Rule<'_>) -> (Held, Vec<T>) {
        let held = store(x, &[x.len() as u64], rule).unwrap();
        let mut out = vec![T::from_f64(9.0); x.len()];
        restore(
            held.packed.as_ref(),
            held.zeros.as_ref(),
            held.range,
            &mut out,
        )
        .unwrap();
        (held, out)
    }

    /// Zeros come back exact in every shape; other values within the codec's error and inside
    /// the recorded range; the shape follows the rule.
    #[test]
    fn store_restore_every_shape() {
        let smaq: Params = [("rounding".to_string(), Param::Str("nearest".into()))].into();
        for (zero_pct, keeps, want) in [
            (0u64, false, "kept"),
            (2, false, "list"),
            (2, true, "kept"),
            (50, true, "map"),
            (50, false, "map"),
            (100, false, "map"),
        ] {
            let rule = Rule {
                codec: "smaq",
                params: &smaq,
                keeps_zeros: keeps,
                sparse_fraction: 0.15,
            };
            let x: Vec<f32> = values(200_003, zero_pct, zero_pct)
                .into_iter()
                .map(|v| if v.is_finite() { v } else { 0.1 })
                .collect();
            let (held, y) = round_trip(&x, &rule);
            let shape = match held.zeros {
                Zeros::Kept => "kept",
                Zeros::List(_) => "list",
                Zeros::Map(_) => "map",
            };
            assert_eq!(shape, want, "{zero_pct}% zeros, keeps={keeps}");
            for (a, b) in x.iter().zip(&y) {
                if *a == 0.0 {
                    assert_eq!(*b, 0.0);
                } else {
                    assert!((a - b).abs() < 0.05, "{a} -> {b}");
                    if let Some([lo, hi]) = held.range {
                        assert!((lo..=hi).contains(&(*b as f64)));
                    }
                }
            }
        }
    }

    /// Lossless codec: every element type comes back value for value (a map restores -0.0
    /// as +0.0; NaN payloads aside).
    #[test]
    fn store_restore_half_types_exactly_with_fp32_codec() {
        let rule = Rule {
            codec: "fp32",
            params: &Params::new(),
            keeps_zeros: true,
            sparse_fraction: 0.15,
        };
        let x: Vec<f32> = values(5000, 3, 40);
        fn check<T: Element>(x: &[T], rule: &Rule<'_>) {
            let (held, y) = round_trip(x, rule);
            assert!(matches!(held.zeros, Zeros::Map(_)));
            let canon = |v: &T| {
                let f = v.to_f64();
                if f.is_nan() {
                    u64::MAX
                } else if f == 0.0 {
                    0
                } else {
                    f.to_bits()
                }
            };
            let same = x.iter().zip(&y).all(|(a, b)| canon(a) == canon(b));
            assert!(same, "{:?}", T::DTYPE);
        }
        check(
            &x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
            &rule,
        );
        check(
            &x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
            &rule,
        );
        check(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), &rule);
        check(&x, &rule);
    }

    /// Mismatched pieces are errors, never out-of-bounds accesses.
    #[test]
    fn bad_pieces_are_errors() {
        let x = values(1000, 1, 50);
        let rule = Rule {
            codec: "fp32",
            params: &Params::new(),
            keeps_zeros: true,
            sparse_fraction: 0.15,
        };
        let held = store(&x, &[1000], &rule).unwrap();
        let Zeros::Map(mask) = &held.zeros else {
            panic!("expected a map")
        };
        let mut out = vec![0f32; 1000];
        let mut short = mask.clone();
        short.pop();
        assert!(restore(held.packed.as_ref(), ZerosRef::Map(&short), None, &mut out).is_err());
        let mut more = mask.clone();
        more[3] = !more[3];
        assert!(restore(held.packed.as_ref(), ZerosRef::Map(&more), None, &mut out).is_err());
        assert!(restore(None, ZerosRef::Map(mask), None, &mut out).is_err());
        assert!(restore(None, ZerosRef::Kept, None, &mut out).is_err());
        let plain = store(
            &x,
            &[1000],
            &Rule {
                sparse_fraction: f64::INFINITY,
                ..rule
            },
        )
        .unwrap();
        let list = [5i64, 1000];
        assert!(restore(plain.packed.as_ref(), ZerosRef::List(&list), None, &mut out).is_err());
        assert!(restore(plain.packed.as_ref(), ZerosRef::Kept, None, &mut out[..999]).is_err());
    }
}

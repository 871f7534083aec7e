//! Lossless: exact round trip of float tensors by byte-plane splitting and entropy coding (in
//! the spirit of ZipNN; written from the idea, not the code).
//!
//! Each value's bit pattern is rotated left by one bit so the sign lands in the lowest bit and the
//! exponent fills the most significant byte (exactly for float32, bfloat16 and the top 8 of
//! float64's 11 exponent bits; float16's top byte holds its 5 exponent bits and 3 mantissa bits).
//! The tensor is cut into chunks of `chunk_size` elements; in each chunk the values are split into
//! byte planes (plane 0 = most significant byte of every value, ...). Each plane is stored raw
//! when a sampled entropy says it is near-random (mantissa bytes), as one byte when constant, or
//! Huffman-coded (`huffman.rs`: the exponent plane, about 2.6 bits per value on weights), with
//! zstd at `level` tried as well on planes that Huffman takes below 2 bits per byte (repeats).
//! Order-0 Huffman beats zstd's fast levels here: their short matches cost more than they save
//! on exponent bytes, and Huffman alone runs several times faster. Chunks are independent and
//! run in parallel; per-thread scratch buffers hold a chunk's planes.
//!
//! Metadata (little-endian): version u8 (= 3), level i8, chunk_size varint, then per chunk and
//! per plane: mode u8 (0 raw, 1 zstd, 2 Huffman, 3 constant) and, for zstd and Huffman, the
//! stored length as a varint (a raw plane holds the chunk's element count, a constant one 1
//! byte). The payload is the planes' stored bytes in that order. Version 2 (read, no longer
//! written) stored the chunk size and every length as u32 with the chunk count after the chunk
//! size, and four streams in every Huffman block (docs/FORMAT.md).

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::dispatch;
use crate::dtype::{Data, DataMut};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};

mod huffman;

pub const ID: u16 = 16;
const VERSION: u8 = 3;
/// The oldest metadata version this build reads.
const OLDEST: u8 = 2;
const DEFAULT_LEVEL: i64 = 1;
const DEFAULT_CHUNK: i64 = 1 << 18;
const MODE_RAW: u8 = 0;
const MODE_ZSTD: u8 = 1;
const MODE_HUFFMAN: u8 = 2;
const MODE_CONST: u8 = 3;

pub static INFO: CodecInfo = CodecInfo {
    id: ID,
    name: "lossless",
    doc: "Exact: byte planes (exponent byte first) of each chunk Huffman-coded, raw where \
          near-random, zstd where it beats Huffman; chunked and parallel.",
    defaults,
    encoder: |p| Ok(Box::new(LosslessConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(LosslessDecoder::open(meta, frame)?)),
    keeps_zeros: |_| Ok(true),
};

fn defaults() -> Params {
    LosslessConfig {
        level: DEFAULT_LEVEL as i32,
        chunk_size: DEFAULT_CHUNK as u32,
    }
    .to_params()
}

/// The codec's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LosslessConfig {
    /// zstd level, -7..=19 (1 is fast and within a few percent of the best on weights).
    pub level: i32,
    /// Elements per independently coded chunk.
    pub chunk_size: u32,
}

impl LosslessConfig {
    pub fn from_params(p: &Params) -> Result<Self> {
        let mut r = ParamReader::new("lossless", p);
        let level = r.int("level", DEFAULT_LEVEL, -7, 19)? as i32;
        let chunk_size = r.int("chunk_size", DEFAULT_CHUNK, 1024, 1 << 26)? as u32;
        r.finish()?;
        Ok(Self { level, chunk_size })
    }

    pub fn to_params(&self) -> Params {
        [
            ("level".to_string(), Param::Int(self.level as i64)),
            ("chunk_size".to_string(), Param::Int(self.chunk_size as i64)),
        ]
        .into_iter()
        .collect()
    }
}

crate::simd::multiversion!(
    /// Byte plane `p` (0 = most significant byte after the sign rotation) of `x` into `out`.
    fn extract(x: Data<'_>, p: usize, out: &mut [u8]) = extract_body {
        #[inline(always)]
        fn go<W: Copy>(x: &[W], out: &mut [u8], byte: impl Fn(W) -> u8) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = byte(v);
            }
        }
        // Each plane's shift spelled out (the rotation folded in), so every loop vectorizes.
        fn bits16(v: &[impl bytemuck::Pod]) -> &[u16] {
            bytemuck::cast_slice(v)
        }
        match (x, p) {
            (Data::F32(v), _) => {
                let w = bytemuck::cast_slice::<_, u32>(v);
                match p {
                    0 => go(w, out, |w| (w >> 23) as u8),
                    1 => go(w, out, |w| (w >> 15) as u8),
                    2 => go(w, out, |w| (w >> 7) as u8),
                    _ => go(w, out, |w| w.rotate_left(1) as u8),
                }
            }
            (Data::F16(v), 0) => go(bits16(v), out, |w| (w >> 7) as u8),
            (Data::F16(v), _) => go(bits16(v), out, |w| w.rotate_left(1) as u8),
            (Data::BF16(v), 0) => go(bits16(v), out, |w| (w >> 7) as u8),
            (Data::BF16(v), _) => go(bits16(v), out, |w| w.rotate_left(1) as u8),
            (Data::F64(v), _) => {
                let s = 56 - 8 * p as u32;
                go(bytemuck::cast_slice::<_, u64>(v), out, |w| {
                    (w.rotate_left(1) >> s) as u8
                })
            }
        }
    }
);

crate::simd::multiversion!(
    /// Joins byte planes (most significant first) back into values, undoing the sign rotation.
    fn join(planes: &[&[u8]], out: DataMut<'_>) = join_body {
        match out {
            DataMut::F32(o) => {
                let o = bytemuck::cast_slice_mut::<_, u32>(o);
                let [p0, p1, p2, p3] = planes else {
                    unreachable!()
                };
                let (p0, p1, p2, p3) = (
                    &p0[..o.len()],
                    &p1[..o.len()],
                    &p2[..o.len()],
                    &p3[..o.len()],
                );
                for (i, w) in o.iter_mut().enumerate() {
                    *w = u32::from_be_bytes([p0[i], p1[i], p2[i], p3[i]]).rotate_right(1);
                }
            }
            DataMut::F16(o) => join16(planes, bytemuck::cast_slice_mut(o)),
            DataMut::BF16(o) => join16(planes, bytemuck::cast_slice_mut(o)),
            DataMut::F64(o) => {
                let o = bytemuck::cast_slice_mut::<_, u64>(o);
                for (i, w) in o.iter_mut().enumerate() {
                    let mut b = [0u8; 8];
                    for (d, p) in b.iter_mut().zip(planes) {
                        *d = p[i];
                    }
                    *w = u64::from_be_bytes(b).rotate_right(1);
                }
            }
        }
    }
);

#[inline(always)]
fn join16(planes: &[&[u8]], o: &mut [u16]) {
    let [hi, lo] = planes else { unreachable!() };
    for ((w, &h), &l) in o.iter_mut().zip(*hi).zip(*lo) {
        *w = u16::from_be_bytes([h, l]).rotate_right(1);
    }
}

/// Order-0 entropy (bits per byte) of byte plane `p` of `x`, from a sample of about 8192 values.
fn sampled_entropy(x: Data<'_>, p: usize) -> f64 {
    fn go<W: Copy>(x: &[W], byte: impl Fn(W) -> u8) -> [u32; 256] {
        let mut hist = [0u32; 256];
        for &v in x.iter().step_by((x.len() / 8192).max(1)) {
            hist[byte(v) as usize] += 1;
        }
        hist
    }
    let hist = match x {
        Data::F32(v) => go(bytemuck::cast_slice::<_, u32>(v), |w| {
            (w.rotate_left(1) >> (24 - 8 * p)) as u8
        }),
        Data::F16(v) => go(bytemuck::cast_slice::<_, u16>(v), |w| {
            (w.rotate_left(1) >> (8 - 8 * p)) as u8
        }),
        Data::BF16(v) => go(bytemuck::cast_slice::<_, u16>(v), |w| {
            (w.rotate_left(1) >> (8 - 8 * p)) as u8
        }),
        Data::F64(v) => go(bytemuck::cast_slice::<_, u64>(v), |w| {
            (w.rotate_left(1) >> (56 - 8 * p)) as u8
        }),
    };
    let n: u32 = hist.iter().sum();
    let inv = 1.0 / n.max(1) as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 * inv;
            -p * p.log2()
        })
        .sum()
}

/// A plane whose sampled entropy is above this many bits per byte is stored raw without trying
/// anything (mantissa bytes: Huffman would save under 1% of them at the cost of a full pass).
const RAW_ENTROPY: f64 = 7.9;

thread_local! {
    /// Per-thread scratch: the byte planes of a chunk (encode) or its decoded planes (decode).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Codes one plane onto `out` and returns its mode; a raw plane adds nothing to `out` (the
/// payload is filled from the tensor later).
fn code_plane(plane: &[u8], level: i32, out: &mut Vec<u8>) -> Result<u8> {
    let streams = block_streams(VERSION, plane.len());
    let start = out.len();
    if plane.is_empty() {
        return Ok(MODE_RAW);
    }
    let hist = huffman::histogram(plane);
    if let Some(s) = hist.iter().position(|&c| c as usize == plane.len()) {
        out.push(s as u8);
        return Ok(MODE_CONST);
    }
    let lens = huffman::code_lengths(&hist);
    let huff = huffman::block_size(&hist, &lens, streams);
    let mut best = (MODE_RAW, plane.len());
    if huff < plane.len() {
        best = (MODE_HUFFMAN, huff);
    }
    // Very compressible planes (<= 2 bits per byte after Huffman) may hold repeats that zstd's
    // matches capture: zstd is tried on the plane's first 32 KiB, and on the whole plane (the
    // smaller kept) only when it beats Huffman's rate there by a tenth.
    if huff * 4 <= plane.len() && zstd_promising(plane, huff, level)? {
        let z = zstd_compress(plane, level)?;
        if z.len() < best.1 {
            out.extend_from_slice(&z);
            return Ok(MODE_ZSTD);
        }
    }
    if best.0 == MODE_HUFFMAN {
        huffman::encode(plane, &hist, &lens, streams, out);
    }
    debug_assert!(out.len() - start <= best.1);
    Ok(best.0)
}

/// Bytes of the sample [`code_plane`] tries zstd on first.
const ZSTD_SAMPLE: usize = 32 << 10;

/// zstd at `level` on `plane`, with the thread's compressor.
fn zstd_compress(plane: &[u8], level: i32) -> Result<Vec<u8>> {
    ZSTD.with(|c| -> Result<Vec<u8>> {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(level).map_err(zstd_err)?);
        }
        let c = c.as_mut().unwrap();
        c.set_compression_level(level).map_err(zstd_err)?;
        c.compress(plane).map_err(zstd_err)
    })
}

/// Whether zstd may beat Huffman's `huff` bytes on `plane`: on the plane's first
/// [`ZSTD_SAMPLE`] bytes it must take less than nine tenths of Huffman's rate (the whole plane
/// when it is that short).
fn zstd_promising(plane: &[u8], huff: usize, level: i32) -> Result<bool> {
    if plane.len() <= ZSTD_SAMPLE {
        return Ok(true);
    }
    let z = zstd_compress(&plane[..ZSTD_SAMPLE], level)?.len();
    Ok((z * plane.len()) as f64 <= 0.9 * (huff * ZSTD_SAMPLE) as f64)
}

fn zstd_err(e: std::io::Error) -> Error {
    Error::Codec(format!("codec \"lossless\": zstd failed: {e}"))
}

/// One coded chunk: per plane (mode, stored length), and the stored bytes of its non-raw planes
/// back to back.
type Chunk = (Vec<(u8, u32)>, Vec<u8>);

/// First pass over a chunk: choose each plane's mode and code the non-raw ones. Near-random
/// planes are recognised from a sample of the tensor and never copied here.
fn code_chunk(x: Data<'_>, level: i32) -> Result<Chunk> {
    let (n, size) = (x.len(), x.dtype().size());
    let mut index = Vec::with_capacity(size);
    let mut bytes = Vec::new();
    for p in 0..size {
        if n >= 1024 && sampled_entropy(x, p) > RAW_ENTROPY {
            index.push((MODE_RAW, n as u32));
            continue;
        }
        let before = bytes.len();
        let mode = SCRATCH.with(|s| {
            let mut plane = s.borrow_mut();
            if plane.len() < n {
                plane.resize(n, 0);
            }
            extract(x, p, &mut plane[..n]);
            code_plane(&plane[..n], level, &mut bytes)
        })?;
        let len = if mode == MODE_RAW {
            n
        } else {
            bytes.len() - before
        };
        index.push((mode, len as u32));
    }
    Ok((index, bytes))
}

/// Second pass: a chunk's stored planes into its slice of the payload, raw planes straight from
/// the tensor.
fn write_chunk(x: Data<'_>, (index, bytes): &Chunk, dst: &mut [u8]) {
    let (mut at, mut from) = (0usize, 0usize);
    for (p, &(mode, len)) in index.iter().enumerate() {
        let len = len as usize;
        if mode == MODE_RAW {
            extract(x, p, &mut dst[at..at + len]);
        } else {
            dst[at..at + len].copy_from_slice(&bytes[from..from + len]);
            from += len;
        }
        at += len;
    }
}

impl Encoder for LosslessConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        Ok(Encoded::from_framed(self.encode_framed(x, 0, 0)?))
    }

    fn encode_framed(&self, x: Data<'_>, lead: usize, tail: usize) -> Result<(Vec<u8>, usize)> {
        let chunk = self.chunk_size as usize;
        let level = self.level;
        let coded: Vec<Chunk> =
            dispatch!(Data, x, |v| crate::pool::map_chunks(v, chunk, |_, c| {
                code_chunk(Data::from_typed(c), level)
            }))
            .into_iter()
            .collect::<Result<_>>()?;
        let mut meta = LeWriter::default();
        meta.u8(VERSION)
            .u8(level as i8 as u8)
            .varint(self.chunk_size as u64);
        let sizes: Vec<usize> = coded
            .iter()
            .map(|(index, _)| index.iter().map(|&(_, l)| l as usize).sum())
            .collect();
        for (index, _) in &coded {
            for &(mode, len) in index {
                meta.u8(mode);
                if mode == MODE_ZSTD || mode == MODE_HUFFMAN {
                    meta.varint(len as u64);
                }
            }
        }
        let meta = meta.0;
        let start = lead + meta.len();
        // Written once, in place: each chunk's slice is zeroed just before it is filled (in
        // cache, on the thread that fills it), and a recycled buffer is taken when one fits.
        // SAFETY: the closure initializes every byte: the head through `zero_init`, each
        // chunk's slice (together they cover the payload) through `zero_init` as well.
        let buf = unsafe {
            crate::buf::init_with_tail(start + sizes.iter().sum::<usize>(), tail, |b| {
                let (head, mut rest) = b.split_at_mut(start);
                crate::buf::zero_init(head)[lead..].copy_from_slice(&meta);
                let mut slices = Vec::with_capacity(coded.len());
                for &s in &sizes {
                    let (this, tail) = rest.split_at_mut(s);
                    slices.push(this);
                    rest = tail;
                }
                dispatch!(Data, x, |v| {
                    let items: Vec<_> = v.chunks(chunk).zip(&coded).zip(slices).collect();
                    crate::pool::map_items(
                        items,
                        || (),
                        |_, ((c, k), dst)| {
                            write_chunk(Data::from_typed(c), k, crate::buf::zero_init(dst))
                        },
                    );
                })
            })
        };
        Ok((buf, meta.len()))
    }
}

/// One stored plane: where it lies in the payload and how it is coded (`streams`: a Huffman
/// block's stream count).
#[derive(Debug, Clone, Copy)]
struct Plane {
    mode: u8,
    start: usize,
    len: usize,
    streams: usize,
}

/// Planes of fewer symbols than this are coded in one Huffman stream instead of four (version
/// 3): there, the three stream sizes and the other streams' padding cost more than the
/// interleaved decode of four streams saves.
const ONE_STREAM_BELOW: usize = 4096;

/// Streams of a Huffman block of `n` symbols in metadata `version`.
fn block_streams(version: u8, n: usize) -> usize {
    if version >= 3 && n < ONE_STREAM_BELOW {
        1
    } else {
        4
    }
}

struct LosslessDecoder {
    cfg: LosslessConfig,
    numel: usize,
    size: usize,
    planes: Vec<Plane>,
}

impl LosslessDecoder {
    fn open(meta: &[u8], frame: Frame) -> Result<Self> {
        let mut r = LeReader::new(meta, "lossless metadata");
        let version = r.u8("version")?;
        ensure_format!(
            (OLDEST..=VERSION).contains(&version),
            "lossless metadata version {version} is not supported (this build reads \
             {OLDEST} to {VERSION})"
        );
        let level = r.u8("level")? as i8 as i32;
        let chunk_size = if version == 2 {
            r.u32("chunk size")?
        } else {
            u32::try_from(r.varint("chunk size")?)
                .map_err(|_| Error::Format("lossless chunk size exceeds 2^32 - 1".into()))?
        };
        ensure_format!(chunk_size >= 1, "lossless chunk size is 0");
        let n_chunks = frame.numel.div_ceil(chunk_size as u64);
        if version == 2 {
            let stored = r.u32("chunk count")? as u64;
            ensure_format!(
                stored == n_chunks,
                "lossless metadata has {stored} chunks, {} elements in chunks of {chunk_size} \
                 need {n_chunks}",
                frame.numel
            );
        }
        let numel = usize::try_from(frame.numel)
            .map_err(|_| Error::Format("tensor too large for this platform".into()))?;
        let size = frame.dtype.size();
        // The fewest index bytes a plane takes: a mode and a u32 length (version 2), a mode.
        let least = if version == 2 { 5 } else { 1 };
        let n_planes = usize::try_from(n_chunks)
            .ok()
            .and_then(|n| n.checked_mul(size))
            .filter(|&n| n.checked_mul(least).is_some_and(|b| b <= r.remaining()))
            .ok_or_else(|| {
                Error::Format(format!(
                    "lossless metadata: {n_chunks} chunks of {size} planes need at least {} \
                     bytes of index, {} present",
                    n_chunks.saturating_mul((size * least) as u64),
                    r.remaining()
                ))
            })?;
        let mut planes = Vec::with_capacity(n_planes);
        let mut start = 0usize;
        for i in 0..n_planes {
            let chunk = i / size;
            let chunk_len = (chunk_size as usize).min(numel - chunk * chunk_size as usize);
            let mode = r.u8("plane mode")?;
            let len = match (version, mode) {
                (2, _) => r.u32("plane length")? as usize,
                (_, MODE_RAW) => chunk_len,
                (_, MODE_CONST) => 1,
                _ => usize::try_from(r.varint("plane length")?)
                    .map_err(|_| Error::Format("lossless plane length overflows".into()))?,
            };
            match mode {
                MODE_RAW => ensure_format!(
                    len == chunk_len,
                    "lossless chunk {chunk}: raw plane holds {len} bytes, expected {chunk_len}"
                ),
                MODE_CONST => ensure_format!(
                    len == 1,
                    "lossless chunk {chunk}: constant plane holds {len} bytes, expected 1"
                ),
                MODE_ZSTD | MODE_HUFFMAN => {}
                m => return Err(Error::Format(format!("lossless plane mode {m} is unknown"))),
            }
            let streams = block_streams(version, chunk_len);
            planes.push(Plane {
                mode,
                start,
                len,
                streams,
            });
            start = start
                .checked_add(len)
                .ok_or_else(|| Error::Format("lossless plane lengths overflow".into()))?;
        }
        r.finish()?;
        ensure_format!(
            start as u64 == frame.payload_len,
            "lossless planes hold {start} bytes, the payload has {}",
            frame.payload_len
        );
        Ok(Self {
            cfg: LosslessConfig { level, chunk_size },
            numel,
            size,
            planes,
        })
    }
}

/// Decodes a non-raw plane into `out` (its length is the chunk's element count); a Huffman
/// plane's decode fetches the `ahead` memory into cache as it goes.
fn decode_plane(
    p: &Plane,
    src: &[u8],
    out: &mut [u8],
    chunk: usize,
    ahead: &[(*const u8, usize)],
) -> Result<()> {
    let n = out.len();
    match p.mode {
        MODE_CONST => out.fill(src[0]),
        MODE_HUFFMAN => huffman::decode(src, out, ahead, p.streams)
            .map_err(|e| Error::Format(format!("lossless chunk {chunk}: {e}")))?,
        _ => {
            let got = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(src, out))
                .map_err(|e| {
                    Error::Format(format!(
                        "lossless chunk {chunk}: zstd stream is corrupt: {e}"
                    ))
                })?;
            ensure_format!(
                got == n,
                "lossless chunk {chunk}: plane decompressed to {got} bytes, expected {n}"
            );
        }
    }
    Ok(())
}

fn decode_chunk(planes: &[Plane], payload: &[u8], out: DataMut<'_>, chunk: usize) -> Result<()> {
    let n = out.len();
    SCRATCH.with(|s| {
        let mut scratch = s.borrow_mut();
        if scratch.len() < n * planes.len() {
            scratch.resize(n * planes.len(), 0);
        }
        let mut slots = scratch[..n * planes.len()].chunks_mut(n.max(1));
        // The join reads the raw planes and writes the output: the first Huffman decode
        // fetches both while it works.
        let mut ahead: Vec<(*const u8, usize)> = planes
            .iter()
            .filter(|p| p.mode == MODE_RAW)
            .map(|p| (payload[p.start..].as_ptr(), p.len))
            .collect();
        ahead.push(dispatch!(DataMut, &out, |o| (
            o.as_ptr().cast::<u8>(),
            std::mem::size_of_val(&**o)
        )));
        let mut views: Vec<&[u8]> = Vec::with_capacity(planes.len());
        for p in planes {
            let src = &payload[p.start..p.start + p.len];
            let slot = slots.next().unwrap_or_default();
            if p.mode == MODE_RAW {
                views.push(src);
            } else {
                decode_plane(p, src, slot, chunk, &ahead)?;
                ahead.clear();
                views.push(slot);
            }
        }
        join(&views, out);
        Ok(())
    })
}

impl Decoder for LosslessDecoder {
    fn params(&self) -> Params {
        self.cfg.to_params()
    }
    fn stats(&self) -> Params {
        let count = |m| self.planes.iter().filter(|p| p.mode == m).count() as i64;
        [
            ("planes".to_string(), Param::Int(self.planes.len() as i64)),
            ("planes_zstd".to_string(), Param::Int(count(MODE_ZSTD))),
            (
                "planes_huffman".to_string(),
                Param::Int(count(MODE_HUFFMAN)),
            ),
            ("planes_const".to_string(), Param::Int(count(MODE_CONST))),
        ]
        .into_iter()
        .collect()
    }
    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        if out.len() != self.numel {
            return Err(Error::Layout(format!(
                "output holds {} elements, the tensor has {}",
                out.len(),
                self.numel
            )));
        }
        let size = self.size;
        let chunk = self.cfg.chunk_size as usize;
        let planes = &self.planes;
        dispatch!(DataMut, out, |o| crate::pool::try_for_each_chunk_mut(
            o,
            chunk,
            |c, dst| decode_chunk(
                &planes[c * size..(c + 1) * size],
                payload,
                crate::dtype::Element::wrap_mut(dst),
                c
            )
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Owned;
    use crate::format::Packed;
    use half::{bf16, f16};

    fn weights(n: usize) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(7);
        let mut u = move || -> f64 { (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 };
        (0..n)
            .map(|_| {
                let r = (-2.0 * (1.0 - u()).ln()).sqrt();
                (r * (std::f64::consts::TAU * u()).cos() * 0.02) as f32
            })
            .collect()
    }

    #[test]
    fn round_trips_every_dtype_bit_exactly() {
        let w = weights(300_001);
        let mut special = w.clone();
        special[..6].copy_from_slice(&[0.0, -0.0, f32::NAN, f32::INFINITY, f32::MIN, 1e-45]);
        let p = Params::from([("chunk_size".to_string(), Param::Int(4096))]);
        let f32_ = Packed::encode(Data::F32(&special), &[300_001], "lossless", &p).unwrap();
        let back = Packed::from_bytes(f32_.to_vec()).unwrap().decode().unwrap();
        let Owned::F32(b) = back else { panic!() };
        assert!(b
            .iter()
            .zip(&special)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(
            f32_.nbytes() < special.len() * 4 * 10 / 11,
            "{}",
            f32_.nbytes()
        );

        let h: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let pk = Packed::encode(Data::BF16(&h), &[300_001], "lossless", &p).unwrap();
        assert_eq!(pk.decode().unwrap(), Owned::BF16(h.clone()));
        assert!(pk.nbytes() < h.len() * 2 * 10 / 14, "{}", pk.nbytes());

        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let pk = Packed::encode(Data::F16(&h), &[300_001], "lossless", &p).unwrap();
        assert_eq!(pk.decode().unwrap(), Owned::F16(h));

        let d: Vec<f64> = w.iter().map(|&v| v as f64 * 1.1).collect();
        let pk = Packed::encode(Data::F64(&d), &[300_001], "lossless", &p).unwrap();
        assert_eq!(pk.decode().unwrap(), Owned::F64(d));

        let e = Packed::encode(Data::F32(&[]), &[0, 3], "lossless", &p).unwrap();
        assert_eq!(e.decode().unwrap(), Owned::F32(vec![]));
    }

    #[test]
    fn corrupt_metadata_and_payload_are_format_errors() {
        let w = weights(10_000);
        let pk = Packed::encode(Data::F32(&w), &[10_000], "lossless", &Params::new()).unwrap();
        let meta_start = crate::format::FIXED_HEADER + 8;
        let frame = Frame {
            version: crate::format::VERSION,
            dtype: crate::dtype::DType::F32,
            numel: 10_000,
            payload_len: pk.payload_len() as u64,
        };
        let meta = &pk.body()[meta_start..meta_start + pk.meta_len()];
        for i in 0..meta.len() {
            for flip in [1u8, 0x80, 0xff] {
                let mut m = meta.to_vec();
                m[i] ^= flip;
                // Either rejected cleanly or (level byte) harmlessly accepted: never a panic.
                let _ = LosslessDecoder::open(&m, frame);
            }
        }
        let dec = LosslessDecoder::open(meta, frame).unwrap();
        let payload = &pk.body()[meta_start + pk.meta_len()..];
        let mut out = vec![0f32; 10_000];
        for i in (0..payload.len()).step_by(97) {
            let mut p = payload.to_vec();
            p[i] ^= 0x5a;
            let _ = dec.decode(&p, DataMut::F32(&mut out));
        }
    }

    #[test]
    fn special_bit_patterns_and_every_plane_mode_round_trip() {
        let p = Params::from([("chunk_size".to_string(), Param::Int(1024))]);
        let decode = |pk: &Packed| Packed::from_bytes(pk.to_vec()).unwrap().decode().unwrap();
        // NaN payloads (quiet and signalling, both signs), -0.0, subnormals, infinities.
        let mut bits: Vec<u32> = vec![
            0x7fc0_0000,
            0xffc0_0001,
            0x7f80_0001,
            0xff80_1234,
            0x8000_0000,
            0x0000_0001,
            0x807f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7f7f_ffff,
        ];
        bits.extend(weights(5000).iter().map(|v| v.to_bits()));
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let pk = Packed::encode(Data::F32(&x), &[x.len() as u64], "lossless", &p).unwrap();
        let Owned::F32(b) = decode(&pk) else { panic!() };
        assert_eq!(b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bits);
        let h: Vec<bf16> = bits
            .iter()
            .map(|&b| bf16::from_bits((b >> 16) as u16))
            .collect();
        let pk = Packed::encode(Data::BF16(&h), &[h.len() as u64], "lossless", &p).unwrap();
        let Owned::BF16(b) = decode(&pk) else {
            panic!()
        };
        assert!(b.iter().zip(&h).all(|(a, b)| a.to_bits() == b.to_bits()));
        let h: Vec<f16> = bits
            .iter()
            .map(|&b| f16::from_bits(b as u16 ^ (b >> 16) as u16))
            .collect();
        let pk = Packed::encode(Data::F16(&h), &[h.len() as u64], "lossless", &p).unwrap();
        let Owned::F16(b) = decode(&pk) else { panic!() };
        assert!(b.iter().zip(&h).all(|(a, b)| a.to_bits() == b.to_bits()));
        let d: Vec<f64> = bits
            .iter()
            .map(|&b| f64::from_bits((b as u64) << 29 | b as u64))
            .collect();
        let pk = Packed::encode(Data::F64(&d), &[d.len() as u64], "lossless", &p).unwrap();
        let Owned::F64(b) = decode(&pk) else { panic!() };
        assert!(b.iter().zip(&d).all(|(a, b)| a.to_bits() == b.to_bits()));

        // Weights upcast from bfloat16: the two low planes are constant (zero). A repeating
        // pattern: zstd. Gaussian weights: Huffman exponents, raw mantissas.
        let up: Vec<f32> = weights(8192)
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        let rep: Vec<f32> = (0..8192).map(|i| (i % 2) as f32).collect();
        for (x, mode) in [
            (up, "planes_const"),
            (rep, "planes_zstd"),
            (weights(8192), "planes_huffman"),
        ] {
            let pk = Packed::encode(Data::F32(&x), &[8192], "lossless", &p).unwrap();
            let Owned::F32(b) = decode(&pk) else { panic!() };
            assert!(b.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()));
            let info = Packed::from_bytes(pk.to_vec()).unwrap().stats();
            assert!(
                matches!(info.get(mode), Some(Param::Int(k)) if *k > 0),
                "{mode}: {info:?}"
            );
        }
    }

    /// The vectorized builds of the plane split and join give what the portable ones give, for
    /// every width and plane, on arbitrary bit patterns (all signs, NaN payloads).
    #[test]
    fn plane_split_and_join_agree_at_every_simd_level() {
        let mut rng = crate::rng::SplitMix64::new(5);
        let bits: Vec<u64> = (0..1027).map(|_| rng.next_u64()).collect();
        let f32s: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b as u32)).collect();
        let bf16s: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b as u16)).collect();
        let f16s: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b as u16)).collect();
        let f64s: Vec<f64> = bits.iter().map(|&b| f64::from_bits(b)).collect();
        let n = bits.len();
        for x in [
            Data::F32(&f32s),
            Data::BF16(&bf16s),
            Data::F16(&f16s),
            Data::F64(&f64s),
        ] {
            let size = x.dtype().size();
            let planes: Vec<Vec<u8>> = (0..size)
                .map(|p| {
                    let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                    extract(x, p, &mut a);
                    extract_body(x, p, &mut b);
                    assert_eq!(a, b, "{:?} plane {p}", x.dtype());
                    a
                })
                .collect();
            let views: Vec<&[u8]> = planes.iter().map(|p| &p[..]).collect();
            let mut a = Owned::zeros(x.dtype(), n).unwrap();
            let mut b = Owned::zeros(x.dtype(), n).unwrap();
            join(&views, a.as_mut());
            join_body(&views, b.as_mut());
            assert_eq!(a.as_data().to_le_bytes(), x.to_le_bytes());
            assert_eq!(b.as_data().to_le_bytes(), x.to_le_bytes());
        }
    }

    #[test]
    fn rejects_unknown_params() {
        assert!(
            LosslessConfig::from_params(&Params::from([("bits".to_string(), Param::Int(3))]))
                .is_err()
        );
    }
}

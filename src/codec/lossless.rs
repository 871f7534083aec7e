//! Lossless: exact round trip of float tensors by byte-plane splitting and zstd (in the spirit of
//! ZipNN; written from the idea, not the code).
//!
//! Each value's bit pattern is rotated left by one bit so the sign lands in the lowest bit and the
//! exponent fills the most significant byte (exactly for float32, bfloat16 and the top 8 of
//! float64's 11 exponent bits; float16's top byte holds its 5 exponent bits and 3 mantissa bits).
//! The tensor is cut into chunks of `chunk_size` elements; in each chunk the values are split into
//! byte planes (plane 0 = most significant byte of every value, ...) and each plane is compressed
//! with zstd at `level`, or stored raw when zstd does not make it smaller (mantissa bytes are
//! close to uniform and usually go raw). Chunks are independent and run in parallel.
//!
//! Metadata (little-endian): version u8 (= 1), level i8, chunk_size u32, n_chunks u32, then per
//! chunk and per plane: mode u8 (0 raw, 1 zstd), stored length u32. The payload is the planes'
//! stored bytes in that order.

use super::{CodecInfo, Decoder, Encoded, Encoder, Frame, Param, ParamReader, Params};
use crate::dispatch;
use crate::dtype::{Data, DataMut, Element};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use rayon::prelude::*;

pub const ID: u16 = 16;
const VERSION: u8 = 1;
const DEFAULT_LEVEL: i64 = 1;
const DEFAULT_CHUNK: i64 = 1 << 18;
const MODE_RAW: u8 = 0;
const MODE_ZSTD: u8 = 1;

pub static INFO: CodecInfo = CodecInfo {
    id: ID,
    name: "lossless",
    doc: "Exact: byte planes (exponent byte first) of each chunk entropy-coded with zstd, raw \
          where zstd does not help; chunked and parallel.",
    defaults,
    encoder: |p| Ok(Box::new(LosslessConfig::from_params(p)?)),
    decoder: |meta, frame| Ok(Box::new(LosslessDecoder::open(meta, frame)?)),
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

#[inline(always)]
fn rotl(bits: u64, width: u32) -> u64 {
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    ((bits << 1) | (bits >> (width - 1))) & mask
}

#[inline(always)]
fn rotr(bits: u64, width: u32) -> u64 {
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    ((bits >> 1) | (bits << (width - 1))) & mask
}

/// Splits `x` into `size` byte planes (most significant first) after the sign rotation.
fn split<T: Element>(x: &[T], size: usize) -> Vec<Vec<u8>> {
    let width = 8 * size as u32;
    let mut planes: Vec<Vec<u8>> = (0..size).map(|_| Vec::with_capacity(x.len())).collect();
    match size {
        2 => {
            let (hi, lo) = planes.split_at_mut(1);
            for v in x {
                let b = rotl(v.to_bits_u64(), 16);
                hi[0].push((b >> 8) as u8);
                lo[0].push(b as u8);
            }
        }
        4 => {
            let [p0, p1, p2, p3] = &mut planes[..] else {
                unreachable!()
            };
            for v in x {
                let b = rotl(v.to_bits_u64(), 32);
                p0.push((b >> 24) as u8);
                p1.push((b >> 16) as u8);
                p2.push((b >> 8) as u8);
                p3.push(b as u8);
            }
        }
        _ => {
            for v in x {
                let b = rotl(v.to_bits_u64(), width);
                for (p, plane) in planes.iter_mut().enumerate() {
                    plane.push((b >> (8 * (size - 1 - p))) as u8);
                }
            }
        }
    }
    planes
}

fn join<T: Element>(planes: &[Vec<u8>], out: &mut [T], size: usize) {
    let width = 8 * size as u32;
    match size {
        2 => {
            for ((o, &h), &l) in out.iter_mut().zip(&planes[0]).zip(&planes[1]) {
                *o = T::from_bits_u64(rotr(((h as u64) << 8) | l as u64, 16));
            }
        }
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                let mut b = 0u64;
                for plane in planes {
                    b = (b << 8) | plane[i] as u64;
                }
                *o = T::from_bits_u64(rotr(b, width));
            }
        }
    }
}

/// True when an order-0 entropy estimate over a sample says zstd cannot save even 2% (mantissa
/// bytes): skips a zstd call whose output would be thrown away.
fn looks_random(plane: &[u8]) -> bool {
    let step = (plane.len() / 8192).max(1);
    let mut hist = [0u32; 256];
    let mut n = 0u32;
    for &b in plane.iter().step_by(step) {
        hist[b as usize] += 1;
        n += 1;
    }
    if n < 1024 {
        return false;
    }
    let inv = 1.0 / n as f64;
    let h: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 * inv;
            -p * p.log2()
        })
        .sum();
    h > 7.85
}

/// One coded plane: (mode, stored bytes).
fn code_plane(plane: Vec<u8>, level: i32) -> Result<(u8, Vec<u8>)> {
    if plane.is_empty() || looks_random(&plane) {
        return Ok((MODE_RAW, plane));
    }
    let z = zstd::bulk::compress(&plane, level)
        .map_err(|e| Error::Codec(format!("codec \"lossless\": zstd failed: {e}")))?;
    if z.len() < plane.len() {
        Ok((MODE_ZSTD, z))
    } else {
        Ok((MODE_RAW, plane))
    }
}

impl Encoder for LosslessConfig {
    fn encode(&self, x: Data<'_>) -> Result<Encoded> {
        let size = x.dtype().size();
        let chunk = self.chunk_size as usize;
        let level = self.level;
        let coded: Vec<Vec<(u8, Vec<u8>)>> = crate::pool::install(|| {
            dispatch!(Data, x, |v| v
                .par_chunks(chunk)
                .map(|c| split(c, size)
                    .into_iter()
                    .map(|p| code_plane(p, level))
                    .collect::<Result<Vec<_>>>())
                .collect::<Result<Vec<_>>>())
        })?;
        let mut meta = LeWriter::default();
        meta.u8(VERSION)
            .u8(level as i8 as u8)
            .u32(self.chunk_size)
            .u32(coded.len() as u32);
        let total: usize = coded.iter().flatten().map(|(_, b)| b.len()).sum();
        let mut payload = Vec::with_capacity(total);
        for (mode, bytes) in coded.iter().flatten() {
            meta.u8(*mode).u32(bytes.len() as u32);
            payload.extend_from_slice(bytes);
        }
        Ok(Encoded {
            meta: meta.0,
            payload,
        })
    }
}

/// One stored plane: where it lies in the payload and how it is coded.
#[derive(Debug, Clone, Copy)]
struct Plane {
    mode: u8,
    start: usize,
    len: usize,
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
            version == VERSION,
            "lossless metadata version {version} is not supported (this build reads {VERSION})"
        );
        let level = r.u8("level")? as i8 as i32;
        let chunk_size = r.u32("chunk size")?;
        ensure_format!(chunk_size >= 1, "lossless chunk size is 0");
        let n_chunks = r.u32("chunk count")? as u64;
        let expected = frame.numel.div_ceil(chunk_size as u64);
        ensure_format!(
            n_chunks == expected,
            "lossless metadata has {n_chunks} chunks, {} elements in chunks of {chunk_size} need \
             {expected}",
            frame.numel
        );
        let numel = usize::try_from(frame.numel)
            .map_err(|_| Error::Format("tensor too large for this platform".into()))?;
        let size = frame.dtype.size();
        let n_planes = (n_chunks as usize)
            .checked_mul(size)
            .filter(|&n| n.checked_mul(5).is_some_and(|b| b <= r.remaining()))
            .ok_or_else(|| {
                Error::Format(format!(
                    "lossless metadata: {n_chunks} chunks of {size} planes need {} bytes of \
                     index, {} present",
                    n_chunks.saturating_mul(size as u64 * 5),
                    r.remaining()
                ))
            })?;
        let mut planes = Vec::with_capacity(n_planes);
        let mut start = 0usize;
        for i in 0..n_planes {
            let chunk = i / size;
            let chunk_len = (chunk_size as usize).min(numel - chunk * chunk_size as usize);
            let mode = r.u8("plane mode")?;
            let len = r.u32("plane length")? as usize;
            match mode {
                MODE_RAW => ensure_format!(
                    len == chunk_len,
                    "lossless chunk {chunk}: raw plane holds {len} bytes, expected {chunk_len}"
                ),
                MODE_ZSTD => {}
                m => return Err(Error::Format(format!("lossless plane mode {m} is unknown"))),
            }
            planes.push(Plane { mode, start, len });
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

fn decode_plane(p: &Plane, payload: &[u8], n: usize, chunk: usize) -> Result<Vec<u8>> {
    let src = &payload[p.start..p.start + p.len];
    if p.mode == MODE_RAW {
        return Ok(src.to_vec());
    }
    let mut out = vec![0u8; n];
    let got = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(src, &mut out[..]))
        .map_err(|e| {
            Error::Format(format!(
                "lossless chunk {chunk}: zstd stream is corrupt: {e}"
            ))
        })?;
    ensure_format!(
        got == n,
        "lossless chunk {chunk}: plane decompressed to {got} bytes, expected {n}"
    );
    Ok(out)
}

impl Decoder for LosslessDecoder {
    fn params(&self) -> Params {
        self.cfg.to_params()
    }
    fn info(&self) -> Params {
        let zstd = self.planes.iter().filter(|p| p.mode == MODE_ZSTD).count();
        [
            ("planes".to_string(), Param::Int(self.planes.len() as i64)),
            ("planes_zstd".to_string(), Param::Int(zstd as i64)),
        ]
        .into_iter()
        .collect()
    }
    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        if out.len() != self.numel {
            return Err(Error::Shape(format!(
                "output holds {} elements, the tensor has {}",
                out.len(),
                self.numel
            )));
        }
        let size = self.size;
        let chunk = self.cfg.chunk_size as usize;
        let planes = &self.planes;
        crate::pool::install(|| {
            dispatch!(DataMut, out, |o| o
                .par_chunks_mut(chunk)
                .enumerate()
                .try_for_each(|(c, dst)| {
                    let ps = planes[c * size..(c + 1) * size]
                        .iter()
                        .map(|p| decode_plane(p, payload, dst.len(), c))
                        .collect::<Result<Vec<_>>>()?;
                    join(&ps, dst, size);
                    Ok(())
                }))
        })
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
        let back = Packed::from_bytes(f32_.bytes().to_vec())
            .unwrap()
            .decode()
            .unwrap();
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
            dtype: crate::dtype::DType::F32,
            numel: 10_000,
            payload_len: pk.payload_len() as u64,
        };
        let meta = &pk.bytes()[meta_start..meta_start + pk.meta_len()];
        for i in 0..meta.len() {
            for flip in [1u8, 0x80, 0xff] {
                let mut m = meta.to_vec();
                m[i] ^= flip;
                // Either rejected cleanly or (level byte) harmlessly accepted: never a panic.
                let _ = LosslessDecoder::open(&m, frame);
            }
        }
        let dec = LosslessDecoder::open(meta, frame).unwrap();
        let payload = &pk.bytes()[meta_start + pk.meta_len()..pk.nbytes() - 8];
        let mut out = vec![0f32; 10_000];
        for i in (0..payload.len()).step_by(97) {
            let mut p = payload.to_vec();
            p[i] ^= 0x5a;
            let _ = dec.decode(&p, DataMut::F32(&mut out));
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

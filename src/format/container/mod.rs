//! The checkpoint container, version 1 (docs/FORMAT.md, "Checkpoint container"): many named tensors
//! and a JSON document in one file, safe to open like safetensors (no pickle, every length
//! checked, header size capped) and written atomically (temporary file, fsync, rename).
//!
//! Layout (little-endian):
//!
//! ```text
//! preamble   magic "SMAQCKPT" | version u32 (= 1) | flags u32 (= 0) | header_len u64
//! header     n_entries u32 | json_len u32 | json (UTF-8)
//!            per entry: name_len u16 | name (UTF-8) | dtype u8 | ndim u8 | shape u64 * ndim
//!                       | encoding u8 | codec_id u16 | offset u64 | length u64 | xxh3 u64
//!            header xxh3 u64 (of the header bytes before it)
//! padding    zeros up to a multiple of 8
//! payloads   entry i at data_start + offset_i; offset_0 = 0, offset_{i+1} = align8(offset_i +
//!            length_i); zero padding after each; file length = data_start + align8(end of last)
//! ```
//!
//! An entry is stored raw (encoding 0), as zstd of the raw bytes (1), or as a packed tensor
//! (src/format/mod.rs) of any registered codec (2; `codec_id` names it).
//! Codecs know nothing of this file; this file knows nothing of Python.
//!
//! This module holds the layout: constants, the entry and header types, and the header's writing
//! and parsing. `writer.rs` writes a container (temporary file, stale temporaries swept, atomic
//! rename); `reader.rs` reads one from a file or a buffer.

use crate::codec::{self, Param, Params};
use crate::dtype::DType;
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};

mod reader;
mod writer;

pub use reader::{aligned_buffer, decode_entry, FileSource, Reader, Source};
pub use writer::{encode_entry, Writer};

pub const MAGIC: [u8; 8] = *b"SMAQCKPT";
pub const VERSION: u32 = 1;
pub const PREAMBLE: usize = 24;
/// Largest header accepted (names, shapes, JSON): 100 MiB, as safetensors.
pub const MAX_HEADER: u64 = 100 << 20;
/// Largest dense size of one entry: 1 TiB.
pub const MAX_DENSE: u64 = 1 << 40;

pub const ENC_RAW: u8 = 0;
pub const ENC_ZSTD: u8 = 1;
pub const ENC_PACKED: u8 = 2;

/// How the writer is asked to store an entry.
#[derive(Debug, Clone)]
pub enum Encoding {
    /// The raw little-endian bytes.
    Raw,
    /// zstd of the raw bytes at this level (stored raw when that is not smaller).
    Zstd(i32),
    /// A packed tensor of this codec (float dtypes only).
    Packed(String, Params),
}

/// The zstd level of an [`Encoding::Zstd`] entry when none is given.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;
/// The zstd levels an entry may ask for.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i64> = -7..=19;

impl Encoding {
    /// zstd with `params`, whose only parameter is `level` (an integer in [`ZSTD_LEVELS`],
    /// [`ZSTD_DEFAULT_LEVEL`] when absent).
    pub fn zstd(mut params: Params) -> Result<Encoding> {
        let level = match params.remove("level") {
            None => ZSTD_DEFAULT_LEVEL,
            Some(Param::Int(l)) if ZSTD_LEVELS.contains(&l) => l as i32,
            Some(p) => {
                return Err(Error::Codec(format!(
                    "zstd level must be an integer in -7..=19, got {p}"
                )))
            }
        };
        if let Some(k) = params.keys().next() {
            return Err(Error::Codec(format!(
                "codec \"zstd\" has no parameter {k:?}; its parameters are: level"
            )));
        }
        Ok(Encoding::Zstd(level))
    }
}

/// What the writer is told about an entry before its data arrives.
#[derive(Debug, Clone)]
pub struct EntrySpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub encoding: Encoding,
}

/// One entry as recorded in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub encoding: u8,
    pub codec_id: u16,
    /// Relative to the start of the payload area.
    pub offset: u64,
    pub length: u64,
    pub checksum: u64,
}

impl Entry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    /// Bytes the tensor takes uncompressed.
    pub fn dense_len(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
    /// "raw", "zstd" or the packed codec's name.
    pub fn codec_name(&self) -> &'static str {
        match self.encoding {
            ENC_RAW => "raw",
            ENC_ZSTD => "zstd",
            _ => codec::by_id(self.codec_id).map_or("?", |c| c.name),
        }
    }
}

/// The parsed header of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub json: String,
    pub entries: Vec<Entry>,
    /// File offset of the payload area.
    pub data_start: u64,
    /// The exact length the file must have.
    pub file_len: u64,
}

fn align8(v: u64) -> Option<u64> {
    v.checked_add(7).map(|v| v & !7)
}

fn dense_of(dtype: DType, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
}

fn entry_size(name: &str, ndim: usize) -> usize {
    2 + name.len() + 2 + 8 * ndim + 1 + 2 + 24
}

fn write_header(json: &str, entries: &[Entry]) -> Vec<u8> {
    let mut w = LeWriter::default();
    w.u32(entries.len() as u32)
        .u32(json.len() as u32)
        .bytes(json.as_bytes());
    for e in entries {
        w.u16(e.name.len() as u16).bytes(e.name.as_bytes());
        w.u8(e.dtype as u8).u8(e.shape.len() as u8);
        for &d in &e.shape {
            w.u64(d);
        }
        w.u8(e.encoding)
            .u16(e.codec_id)
            .u64(e.offset)
            .u64(e.length)
            .u64(e.checksum);
    }
    let sum = crate::format::checksum(&w.0);
    w.u64(sum);
    let mut out = LeWriter::default();
    out.bytes(&MAGIC)
        .u32(VERSION)
        .u32(0)
        .u64(w.0.len() as u64)
        .bytes(&w.0);
    out.0
}

/// Parses the preamble and header at the start of `bytes` (which may hold the whole file or just
/// its first `PREAMBLE + header_len` bytes) for a file of `file_len` bytes. Never panics.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header> {
    let header_len = header_len(bytes, file_len)?;
    let end = PREAMBLE + header_len as usize;
    ensure_format!(
        bytes.len() >= end,
        "checkpoint header: need {end} bytes, have {}",
        bytes.len()
    );
    let body = &bytes[PREAMBLE..end];
    ensure_format!(
        body.len() >= 16,
        "checkpoint header is {} bytes, at least 16 expected",
        body.len()
    );
    let (head, sum) = body.split_at(body.len() - 8);
    let stored = u64::from_le_bytes(sum.try_into().unwrap());
    let computed = crate::format::checksum(head);
    ensure_format!(
        stored == computed,
        "checkpoint header checksum mismatch: stored {stored:#018x}, computed {computed:#018x}"
    );
    let mut r = LeReader::new(head, "checkpoint header");
    let n = r.u32("entry count")? as usize;
    let json_len = r.u32("JSON length")? as usize;
    let json = std::str::from_utf8(r.take(json_len, "JSON")?)
        .map_err(|e| Error::Format(format!("checkpoint JSON is not UTF-8: {e}")))?
        .to_string();
    ensure_format!(
        n <= r.remaining() / entry_size("", 0),
        "checkpoint header claims {n} entries, its {} remaining bytes hold at most {}",
        r.remaining(),
        r.remaining() / entry_size("", 0)
    );
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    let mut names = std::collections::HashSet::with_capacity(n);
    let mut next = 0u64;
    for i in 0..n {
        let name_len = r.u16("name length")? as usize;
        let name = std::str::from_utf8(r.take(name_len, "name")?)
            .map_err(|e| Error::Format(format!("entry {i}: name is not UTF-8: {e}")))?
            .to_string();
        ensure_format!(!name.is_empty(), "entry {i} has an empty name");
        ensure_format!(
            names.insert(name.clone()),
            "entry name {name:?} appears twice"
        );
        let dtype = DType::stored_from_code(r.u8("dtype")?)?;
        let ndim = r.u8("ndim")? as usize;
        ensure_format!(
            ndim <= crate::format::MAX_NDIM,
            "entry {name:?}: ndim {ndim} exceeds {}",
            crate::format::MAX_NDIM
        );
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.u64("shape")?);
        }
        let dense = dense_of(dtype, &shape).filter(|&d| d <= MAX_DENSE);
        ensure_format!(
            dense.is_some(),
            "entry {name:?}: shape {shape:?} of {} is larger than {MAX_DENSE} bytes",
            dtype.name()
        );
        let encoding = r.u8("encoding")?;
        let codec_id = r.u16("codec id")?;
        match encoding {
            ENC_RAW | ENC_ZSTD => ensure_format!(
                codec_id == 0,
                "entry {name:?}: encoding {encoding} with codec id {codec_id} (expected 0)"
            ),
            ENC_PACKED => {
                codec::by_id(codec_id)?;
                ensure_format!(
                    dtype.is_packable(),
                    "entry {name:?}: packed entries must be float tensors, not {}",
                    dtype.name()
                );
            }
            e => {
                return Err(Error::Format(format!(
                    "entry {name:?}: unknown encoding {e}"
                )))
            }
        }
        let offset = r.u64("offset")?;
        let length = r.u64("length")?;
        let checksum = r.u64("checksum")?;
        ensure_format!(
            offset == next,
            "entry {name:?}: offset {offset}, expected {next} (payloads are contiguous)"
        );
        if encoding == ENC_RAW {
            ensure_format!(
                Some(length) == dense,
                "entry {name:?}: raw payload of {length} bytes, its shape needs {}",
                dense.unwrap_or(0)
            );
        }
        next = offset
            .checked_add(length)
            .and_then(align8)
            .ok_or_else(|| Error::Format(format!("entry {name:?}: length overflows")))?;
        entries.push(Entry {
            name,
            dtype,
            shape,
            encoding,
            codec_id,
            offset,
            length,
            checksum,
        });
    }
    r.finish()?;
    let data_start = align8(end as u64).unwrap();
    let expected = data_start.checked_add(next);
    ensure_format!(
        expected == Some(file_len),
        "checkpoint header says the file has {} bytes, it has {file_len}",
        expected.map_or("more than 2^64".into(), |v| v.to_string())
    );
    Ok(Header {
        json,
        entries,
        data_start,
        file_len,
    })
}

/// Checks the preamble and returns the header length.
fn header_len(bytes: &[u8], file_len: u64) -> Result<u64> {
    let mut r = LeReader::new(bytes, "checkpoint preamble");
    let magic = r.take(8, "magic")?;
    ensure_format!(
        magic == MAGIC,
        "not a smaq_rs checkpoint: magic is {magic:02x?}, expected \"SMAQCKPT\""
    );
    let version = r.u32("version")?;
    ensure_format!(
        version == VERSION,
        "checkpoint version {version} is not supported (this build reads {VERSION})"
    );
    let flags = r.u32("flags")?;
    ensure_format!(flags == 0, "checkpoint flags are {flags:#x}, expected 0");
    let len = r.u64("header length")?;
    ensure_format!(
        len <= MAX_HEADER,
        "checkpoint header length {len} exceeds the cap of {MAX_HEADER} bytes"
    );
    ensure_format!(
        (PREAMBLE as u64) + len <= file_len,
        "checkpoint header of {len} bytes does not fit in a file of {file_len} bytes"
    );
    Ok(len)
}

#[cfg(test)]
#[cfg(test)]
pub(super) mod tests {
    //! Shared by the writer's and the reader's tests: a sample of entries of every encoding.
    use super::*;
    use crate::codec::Param;
    use std::path::{Path, PathBuf};

    pub(super) fn sample() -> (Vec<EntrySpec>, Vec<Vec<u8>>) {
        let w: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let wb: Vec<u8> = bytemuck::cast_slice(&w).to_vec();
        let ints: Vec<u8> = (0..800i64).flat_map(|i| (i % 13).to_le_bytes()).collect();
        let flags: Vec<u8> = (0..37).map(|i| (i % 3 == 0) as u8).collect();
        let spec = |name: &str, dtype, shape: Vec<u64>, encoding| EntrySpec {
            name: name.into(),
            dtype,
            shape,
            encoding,
        };
        let lossless = Encoding::Packed("lossless".into(), Params::new());
        let smaq = Encoding::Packed(
            "smaq".into(),
            Params::from([("seed".to_string(), Param::Int(1))]),
        );
        (
            vec![
                spec("w.lossless", DType::F32, vec![50, 100], lossless),
                spec("w.smaq", DType::F32, vec![5000], smaq),
                spec("ints", DType::I64, vec![800], Encoding::Zstd(3)),
                spec("flags", DType::Bool, vec![37], Encoding::Raw),
                spec("empty", DType::F16, vec![0, 4], Encoding::Raw),
            ],
            vec![wb.clone(), wb, ints, flags, vec![]],
        )
    }

    pub(super) fn write(path: &Path) -> Vec<Vec<u8>> {
        let (specs, raws) = sample();
        let mut w = Writer::create(path, specs, "{\"step\": 3}".into()).unwrap();
        let refs: Vec<&[u8]> = raws.iter().map(|r| r.as_slice()).collect();
        w.write_batch(&refs[..2]).unwrap();
        w.write_batch(&refs[2..]).unwrap();
        w.finish(true).unwrap();
        raws
    }

    #[test]
    fn zstd_level_policy() {
        let level = |p: Param| Encoding::zstd(Params::from([("level".to_string(), p)]));
        assert!(matches!(
            Encoding::zstd(Params::new()),
            Ok(Encoding::Zstd(3))
        ));
        assert!(matches!(level(Param::Int(-7)), Ok(Encoding::Zstd(-7))));
        assert!(matches!(level(Param::Int(19)), Ok(Encoding::Zstd(19))));
        for bad in [
            Param::Int(20),
            Param::Int(-8),
            Param::Int(i64::MAX),
            Param::Float(3.0),
        ] {
            let msg = format!("zstd level must be an integer in -7..=19, got {bad}");
            assert_eq!(level(bad).unwrap_err(), Error::Codec(msg));
        }
        let extra = Params::from([("lvl".to_string(), Param::Int(3))]);
        assert_eq!(
            Encoding::zstd(extra).unwrap_err(),
            Error::Codec(
                "codec \"zstd\" has no parameter \"lvl\"; its parameters are: level".into()
            )
        );
    }

    pub(super) fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smaq-ckpt-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

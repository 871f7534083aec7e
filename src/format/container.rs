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

use super::Packed;
use crate::codec::{self, Params};
use crate::dtype::{DType, Data, DataMut};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};
use rayon::prelude::*;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// Element types a container entry may have (a superset of the codecs' [`DType`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CDType {
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    F64 = 4,
    Bool = 10,
    U8 = 11,
    I8 = 12,
    I16 = 13,
    I32 = 14,
    I64 = 15,
    U16 = 16,
    U32 = 17,
    U64 = 18,
    C64 = 20,
    C128 = 21,
    F8E4M3 = 22,
    F8E5M2 = 23,
}

impl CDType {
    pub const ALL: [CDType; 17] = [
        CDType::F32,
        CDType::F16,
        CDType::BF16,
        CDType::F64,
        CDType::Bool,
        CDType::U8,
        CDType::I8,
        CDType::I16,
        CDType::I32,
        CDType::I64,
        CDType::U16,
        CDType::U32,
        CDType::U64,
        CDType::C64,
        CDType::C128,
        CDType::F8E4M3,
        CDType::F8E5M2,
    ];
    pub fn name(self) -> &'static str {
        use CDType::*;
        match self {
            F32 => "float32",
            F16 => "float16",
            BF16 => "bfloat16",
            F64 => "float64",
            Bool => "bool",
            U8 => "uint8",
            I8 => "int8",
            I16 => "int16",
            I32 => "int32",
            I64 => "int64",
            U16 => "uint16",
            U32 => "uint32",
            U64 => "uint64",
            C64 => "complex64",
            C128 => "complex128",
            F8E4M3 => "float8_e4m3fn",
            F8E5M2 => "float8_e5m2",
        }
    }
    pub fn size(self) -> usize {
        use CDType::*;
        match self {
            Bool | U8 | I8 | F8E4M3 | F8E5M2 => 1,
            F16 | BF16 | I16 | U16 => 2,
            F32 | I32 | U32 => 4,
            F64 | I64 | U64 | C64 => 8,
            C128 => 16,
        }
    }
    /// The codec element type, for the float types codecs accept.
    pub fn float(self) -> Option<DType> {
        match self {
            CDType::F32 => Some(DType::F32),
            CDType::F16 => Some(DType::F16),
            CDType::BF16 => Some(DType::BF16),
            CDType::F64 => Some(DType::F64),
            _ => None,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| *d as u8 == c)
            .ok_or_else(|| Error::Format(format!("unknown container dtype code {c}")))
    }
    pub fn from_name(n: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == n)
            .ok_or_else(|| {
                let all: Vec<_> = Self::ALL.iter().map(|d| d.name()).collect();
                Error::Dtype(format!(
                    "dtype {n:?} cannot be stored; supported: {}",
                    all.join(", ")
                ))
            })
    }
}

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

/// What the writer is told about an entry before its data arrives.
#[derive(Debug, Clone)]
pub struct EntrySpec {
    pub name: String,
    pub dtype: CDType,
    pub shape: Vec<u64>,
    pub encoding: Encoding,
}

/// One entry as recorded in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: CDType,
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

fn dense_of(dtype: CDType, shape: &[u64]) -> Option<u64> {
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
    let sum = super::checksum(&w.0);
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
    let computed = super::checksum(head);
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
        let dtype = CDType::from_code(r.u8("dtype")?)?;
        let ndim = r.u8("ndim")? as usize;
        ensure_format!(
            ndim <= super::MAX_NDIM,
            "entry {name:?}: ndim {ndim} exceeds {}",
            super::MAX_NDIM
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
                    dtype.float().is_some(),
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

/// Encodes one entry's raw little-endian bytes. Returns (encoding, codec id, stored bytes).
pub fn encode_entry(spec: &EntrySpec, raw: &[u8]) -> Result<(u8, u16, Vec<u8>)> {
    let dense = dense_of(spec.dtype, &spec.shape)
        .ok_or_else(|| Error::Shape(format!("entry {:?}: shape overflows", spec.name)))?;
    if raw.len() as u64 != dense {
        return Err(Error::Shape(format!(
            "entry {:?}: {} bytes given, shape {:?} of {} needs {dense}",
            spec.name,
            raw.len(),
            spec.shape,
            spec.dtype.name()
        )));
    }
    match &spec.encoding {
        Encoding::Raw => Ok((ENC_RAW, 0, raw.to_vec())),
        Encoding::Zstd(level) => {
            let z = zstd::bulk::compress(raw, *level)
                .map_err(|e| Error::Codec(format!("zstd failed: {e}")))?;
            if z.len() < raw.len() {
                Ok((ENC_ZSTD, 0, z))
            } else {
                Ok((ENC_RAW, 0, raw.to_vec()))
            }
        }
        Encoding::Packed(name, params) => {
            let dt = spec.dtype.float().ok_or_else(|| {
                Error::Dtype(format!(
                    "entry {:?}: codec {name:?} needs a float tensor, not {}",
                    spec.name,
                    spec.dtype.name()
                ))
            })?;
            let mut copy: Vec<u64> = Vec::new();
            let words: &[u8] = if (raw.as_ptr() as usize).is_multiple_of(dt.size()) {
                raw
            } else {
                // A view at an odd offset (rare): copy into an 8-byte-aligned buffer.
                copy.resize(raw.len().div_ceil(8), 0);
                let b: &mut [u8] = bytemuck::cast_slice_mut(&mut copy);
                b[..raw.len()].copy_from_slice(raw);
                &bytemuck::cast_slice::<u64, u8>(&copy)[..raw.len()]
            };
            let data = match dt {
                _ if raw.is_empty() => Data::empty(dt),
                DType::F32 => Data::F32(bytemuck::cast_slice(words)),
                DType::F16 => Data::F16(bytemuck::cast_slice(words)),
                DType::BF16 => Data::BF16(bytemuck::cast_slice(words)),
                DType::F64 => Data::F64(bytemuck::cast_slice(words)),
            };
            let p = Packed::encode(data, &spec.shape, name, params)?;
            let id = codec::by_name(p.codec_name())?.id;
            Ok((ENC_PACKED, id, p.into_bytes()))
        }
    }
}

trait EmptyData {
    fn empty(dt: DType) -> Self;
}

impl EmptyData for Data<'static> {
    fn empty(dt: DType) -> Self {
        match dt {
            DType::F32 => Data::F32(&[]),
            DType::F16 => Data::F16(&[]),
            DType::BF16 => Data::BF16(&[]),
            DType::F64 => Data::F64(&[]),
        }
    }
}

/// A zeroed, 8-byte-aligned buffer of `len` bytes (allocation failure is an error, not an abort).
pub fn aligned_buffer(len: u64) -> Result<Vec<u64>> {
    let words = usize::try_from(len.div_ceil(8))
        .map_err(|_| Error::Shape(format!("{len} bytes do not fit in memory")))?;
    let mut v: Vec<u64> = Vec::new();
    v.try_reserve_exact(words)
        .map_err(|_| Error::Shape(format!("cannot allocate {len} bytes")))?;
    v.resize(words, 0);
    Ok(v)
}

/// Verifies an entry's stored bytes and decodes them into `out` (its dense little-endian bytes,
/// 8-byte aligned, exactly `entry.dense_len()` long).
pub fn decode_entry(entry: &Entry, stored: Vec<u8>, out: &mut [u8]) -> Result<()> {
    ensure_format!(
        stored.len() as u64 == entry.length,
        "entry {:?}: read {} bytes, header says {}",
        entry.name,
        stored.len(),
        entry.length
    );
    let computed = super::checksum(&stored);
    if computed != entry.checksum {
        return Err(Error::Checksum {
            stored: entry.checksum,
            computed,
        });
    }
    if out.len() as u64 != entry.dense_len() {
        return Err(Error::Shape(format!(
            "entry {:?}: output holds {} bytes, expected {}",
            entry.name,
            out.len(),
            entry.dense_len()
        )));
    }
    match entry.encoding {
        ENC_RAW => out.copy_from_slice(&stored),
        ENC_ZSTD => {
            let got = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&stored, &mut *out))
                .map_err(|e| {
                    Error::Format(format!("entry {:?}: corrupt zstd data: {e}", entry.name))
                })?;
            ensure_format!(
                got == out.len(),
                "entry {:?}: zstd data holds {got} bytes, expected {}",
                entry.name,
                out.len()
            );
        }
        _ => {
            let p = Packed::from_bytes(stored)?;
            ensure_format!(
                codec::by_name(p.codec_name())?.id == entry.codec_id
                    && Some(p.dtype()) == entry.dtype.float()
                    && p.shape() == entry.shape.as_slice(),
                "entry {:?}: packed tensor is {} {} {:?}, the header says {} {} {:?}",
                entry.name,
                p.codec_name(),
                p.dtype().name(),
                p.shape(),
                entry.codec_name(),
                entry.dtype.name(),
                entry.shape
            );
            ensure_format!(
                (out.as_ptr() as usize).is_multiple_of(8),
                "decode buffer is not 8-byte aligned"
            );
            let dst = match p.dtype() {
                DType::F32 => DataMut::F32(bytemuck::cast_slice_mut(out)),
                DType::F16 => DataMut::F16(bytemuck::cast_slice_mut(out)),
                DType::BF16 => DataMut::BF16(bytemuck::cast_slice_mut(out)),
                DType::F64 => DataMut::F64(bytemuck::cast_slice_mut(out)),
            };
            p.decode_into(dst)?;
        }
    }
    Ok(())
}

/// Errors of file operations: a core error or an I/O failure (Python: OSError).
#[derive(Debug)]
pub enum FileError {
    Core(Error),
    Io(std::io::Error, String),
}

impl From<Error> for FileError {
    fn from(e: Error) -> Self {
        FileError::Core(e)
    }
}

fn io(ctx: impl Into<String>) -> impl FnOnce(std::io::Error) -> FileError {
    let ctx = ctx.into();
    move |e| FileError::Io(e, ctx)
}

macro_rules! ensure_file {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(FileError::Core(Error::Format(format!($($arg)+))));
        }
    };
}

pub type FileResult<T> = std::result::Result<T, FileError>;

/// Writes a container: a temporary file beside the target, entries appended in batches (each
/// batch encoded in parallel), then the header, fsync, and an atomic rename over `path`. Dropping
/// an unfinished writer removes the temporary file; a killed process leaves only it behind.
pub struct Writer {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    json: String,
    specs: Vec<EntrySpec>,
    entries: Vec<Entry>,
    header_len: usize,
    pos: u64,
    next: usize,
}

impl Writer {
    pub fn create(path: &Path, specs: Vec<EntrySpec>, json: String) -> FileResult<Writer> {
        if json.len() > u32::MAX as usize {
            return Err(Error::Shape(format!(
                "checkpoint JSON is {} bytes, at most 4 GiB",
                json.len()
            ))
            .into());
        }
        let mut names = std::collections::HashSet::new();
        let mut entries = Vec::with_capacity(specs.len());
        for s in &specs {
            if s.name.is_empty() || s.name.len() > u16::MAX as usize || !names.insert(&s.name) {
                return Err(Error::Shape(format!(
                    "entry name {:?} is empty, longer than 65535 bytes, or repeated",
                    s.name
                ))
                .into());
            }
            if s.shape.len() > super::MAX_NDIM
                || dense_of(s.dtype, &s.shape).is_none_or(|d| d > MAX_DENSE)
            {
                return Err(Error::Shape(format!(
                    "entry {:?}: shape {:?} is too large",
                    s.name, s.shape
                ))
                .into());
            }
            entries.push(Entry {
                name: s.name.clone(),
                dtype: s.dtype,
                shape: s.shape.clone(),
                encoding: 0,
                codec_id: 0,
                offset: 0,
                length: 0,
                checksum: 0,
            });
        }
        let header_len = write_header(&json, &entries).len();
        if (header_len - PREAMBLE) as u64 > MAX_HEADER {
            return Err(Error::Shape(format!(
                "checkpoint header would be {header_len} bytes, the cap is {MAX_HEADER}"
            ))
            .into());
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let fname = path
            .file_name()
            .ok_or_else(|| Error::Shape(format!("{} is not a file path", path.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = dir.join(format!(
            ".{}.smaq-tmp.{}.{nanos}",
            fname.to_string_lossy(),
            std::process::id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(format!("cannot create {}", tmp.display())))?;
        let mut w = Writer {
            file: None,
            tmp,
            path: path.to_path_buf(),
            json,
            specs,
            entries,
            header_len,
            pos: 0,
            next: 0,
        };
        // From here on, dropping `w` removes the temporary file.
        let start = align8(header_len as u64).unwrap();
        file.write_all(&vec![0u8; start as usize])
            .map_err(io("cannot write the checkpoint"))?;
        w.file = Some(file);
        Ok(w)
    }

    /// Entries written so far.
    pub fn written(&self) -> usize {
        self.next
    }

    /// Encodes the next `raws.len()` entries (in parallel) and appends them. Returns the stored
    /// byte length of each.
    pub fn write_batch(&mut self, raws: &[&[u8]]) -> FileResult<Vec<u64>> {
        let end = self.next + raws.len();
        if end > self.specs.len() {
            return Err(Error::Shape(format!(
                "{} entries given, the checkpoint was declared with {} and has {} written",
                raws.len(),
                self.specs.len(),
                self.next
            ))
            .into());
        }
        let specs = &self.specs[self.next..end];
        let coded: Vec<(u8, u16, Vec<u8>)> = crate::pool::install(|| {
            specs
                .par_iter()
                .zip(raws.par_iter())
                .map(|(s, r)| encode_entry(s, r))
                .collect::<Result<Vec<_>>>()
        })?;
        let file = self.file.as_mut().expect("writer already finished");
        let mut sizes = Vec::with_capacity(coded.len());
        for (i, (enc, id, bytes)) in coded.into_iter().enumerate() {
            let e = &mut self.entries[self.next + i];
            e.encoding = enc;
            e.codec_id = id;
            e.offset = self.pos;
            e.length = bytes.len() as u64;
            e.checksum = super::checksum(&bytes);
            let pad = align8(e.length).unwrap() - e.length;
            file.write_all(&bytes)
                .and_then(|_| file.write_all(&[0u8; 8][..pad as usize]))
                .map_err(io("cannot write the checkpoint"))?;
            self.pos += e.length + pad;
            sizes.push(e.length);
        }
        self.next = end;
        Ok(sizes)
    }

    /// Writes the header, fsyncs, and renames the temporary file over the target.
    pub fn finish(mut self) -> FileResult<()> {
        if self.next != self.specs.len() {
            return Err(Error::Shape(format!(
                "checkpoint declared {} entries, {} were written",
                self.specs.len(),
                self.next
            ))
            .into());
        }
        let header = write_header(&self.json, &self.entries);
        debug_assert_eq!(header.len(), self.header_len);
        let mut file = self.file.take().expect("writer already finished");
        let fail = io("cannot write the checkpoint");
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.sync_all())
            .map_err(fail)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io(format!(
            "cannot rename {} to {}",
            self.tmp.display(),
            self.path.display()
        )))?;
        // Make the rename itself durable.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Where a container's bytes come from: a file (pread) or a buffer.
pub trait Source: Sync {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&self, offset: u64, len: usize) -> FileResult<Vec<u8>>;
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> FileResult<Vec<u8>> {
        let start = usize::try_from(offset).ok();
        start
            .and_then(|s| s.checked_add(len).map(|e| (s, e)))
            .filter(|&(_, e)| e <= <[u8]>::len(self))
            .map(|(s, e)| self[s..e].to_vec())
            .ok_or_else(|| {
                Error::Format(format!("read of {len} bytes at {offset} is out of bounds")).into()
            })
    }
}

/// A file opened for reading, with its length taken once at open.
pub struct FileSource {
    file: File,
    len: u64,
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, len: usize) -> FileResult<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| Error::Shape(format!("cannot allocate {len} bytes")))?;
        buf.resize(len, 0);
        self.file.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FileError::Core(Error::Format(format!(
                    "file ended before {len} bytes at offset {offset} could be read (was it \
                     truncated while open?)"
                )))
            } else {
                FileError::Io(e, "cannot read the checkpoint".into())
            }
        })?;
        Ok(buf)
    }
}

/// A container opened for reading: only the header is read at open; entries are read (pread)
/// and verified when asked for.
pub struct Reader<S: Source + ?Sized> {
    pub header: Header,
    index: std::collections::HashMap<String, usize>,
    src: Box<S>,
}

impl Reader<FileSource> {
    pub fn open(path: &Path) -> FileResult<Self> {
        let file = File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("cannot stat {}", path.display())))?
            .len();
        Reader::new(Box::new(FileSource { file, len }))
    }
}

impl Reader<[u8]> {
    pub fn from_bytes(bytes: Box<[u8]>) -> FileResult<Self> {
        Reader::new(bytes)
    }
}

impl<S: Source + ?Sized> Reader<S> {
    pub fn new(src: Box<S>) -> FileResult<Self> {
        let file_len = src.len();
        let pre = src
            .read_at(0, PREAMBLE.min(file_len as usize))
            .map_err(|_| {
                Error::Format(format!(
                    "file of {file_len} bytes is too short for a checkpoint preamble"
                ))
            })?;
        let hlen = header_len(&pre, file_len)?;
        let start = align8(PREAMBLE as u64 + hlen).unwrap();
        let head = src.read_at(0, start as usize)?;
        let header = parse_header(&head, file_len)?;
        ensure_file!(
            head[PREAMBLE + hlen as usize..].iter().all(|&b| b == 0),
            "padding after the checkpoint header is not zero"
        );
        let index = header
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Reader { header, index, src })
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The stored (encoded) bytes of entry `i`, checksum verified.
    pub fn stored(&self, i: usize) -> FileResult<Vec<u8>> {
        let e = &self.header.entries[i];
        let len = usize::try_from(e.length)
            .map_err(|_| Error::Format(format!("entry {:?} is too large", e.name)))?;
        let padded = align8(e.length).unwrap() as usize;
        let mut b = self
            .src
            .read_at(self.header.data_start + e.offset, padded)?;
        ensure_file!(
            b[len..].iter().all(|&x| x == 0),
            "entry {:?}: padding after its payload is not zero",
            e.name
        );
        b.truncate(len);
        let computed = super::checksum(&b);
        if computed != e.checksum {
            return Err(Error::Checksum {
                stored: e.checksum,
                computed,
            }
            .into());
        }
        Ok(b)
    }

    /// Decodes entry `i` into a new 8-byte-aligned buffer (its first `dense_len()` bytes).
    pub fn read(&self, i: usize) -> FileResult<Vec<u64>> {
        let e = &self.header.entries[i];
        let stored = self.stored(i)?;
        let mut buf = aligned_buffer(e.dense_len())?;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
        decode_entry(e, stored, &mut bytes[..e.dense_len() as usize])?;
        Ok(buf)
    }

    /// Decodes several entries in parallel; each result stands alone.
    pub fn read_many(&self, idx: &[usize]) -> Vec<FileResult<Vec<u64>>> {
        crate::pool::install(|| idx.par_iter().map(|&i| self.read(i)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Param;

    fn sample() -> (Vec<EntrySpec>, Vec<Vec<u8>>) {
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
                spec("w.lossless", CDType::F32, vec![50, 100], lossless),
                spec("w.smaq", CDType::F32, vec![5000], smaq),
                spec("ints", CDType::I64, vec![800], Encoding::Zstd(3)),
                spec("flags", CDType::Bool, vec![37], Encoding::Raw),
                spec("empty", CDType::F16, vec![0, 4], Encoding::Raw),
            ],
            vec![wb.clone(), wb, ints, flags, vec![]],
        )
    }

    fn write(path: &Path) -> Vec<Vec<u8>> {
        let (specs, raws) = sample();
        let mut w = Writer::create(path, specs, "{\"step\": 3}".into()).unwrap();
        let refs: Vec<&[u8]> = raws.iter().map(|r| r.as_slice()).collect();
        w.write_batch(&refs[..2]).unwrap();
        w.write_batch(&refs[2..]).unwrap();
        w.finish().unwrap();
        raws
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smaq-ckpt-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_exact_layout() {
        let dir = tmpdir("rt");
        let path = dir.join("a.smaq");
        let raws = write(&path);
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.header.json, "{\"step\": 3}");
        assert_eq!(r.header.entries.len(), 5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), r.header.file_len);
        for (i, raw) in raws.iter().enumerate() {
            let e = &r.header.entries[i];
            assert_eq!(e.offset % 8, 0);
            let got = r.read(i).unwrap();
            let bytes: &[u8] = bytemuck::cast_slice(&got);
            if e.name != "w.smaq" {
                assert_eq!(&bytes[..raw.len()], raw.as_slice(), "{}", e.name);
            }
        }
        assert_eq!(r.header.entries[2].encoding, ENC_ZSTD);
        assert_eq!(r.header.entries[1].codec_name(), "smaq");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_single_byte_corruption_is_an_error() {
        let dir = tmpdir("mut");
        let path = dir.join("a.smaq");
        write(&path);
        let good = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        let check = |bytes: Vec<u8>| -> bool {
            match Reader::from_bytes(bytes.into_boxed_slice()) {
                Err(_) => true,
                Ok(r) => (0..r.header.entries.len()).any(|i| r.read(i).is_err()),
            }
        };
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x41;
            assert!(check(b), "flipping byte {i} went unnoticed");
        }
        for n in 0..good.len() {
            assert!(
                check(good[..n].to_vec()),
                "truncation to {n} went unnoticed"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(check(longer));
    }

    #[test]
    fn dropped_writer_leaves_target_untouched() {
        let dir = tmpdir("drop");
        let path = dir.join("a.smaq");
        write(&path);
        let before = std::fs::read(&path).unwrap();
        let (specs, raws) = sample();
        let mut w = Writer::create(&path, specs, "{}".into()).unwrap();
        w.write_batch(&[&raws[0]]).unwrap();
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

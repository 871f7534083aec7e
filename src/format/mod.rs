//! The packed tensor format, version 1 (docs/FORMAT.md): a fixed little-endian header, codec
//! metadata, the codec's payload, and an XXH3-64 checksum of everything before it.

pub mod container;

use crate::codec::{self, Decoder, Frame, Params};
use crate::dtype::{DType, Data, DataMut, Owned};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};

pub const MAGIC: [u8; 4] = *b"SMAQ";
pub const VERSION: u8 = 1;
/// Most dimensions a shape may have.
pub const MAX_NDIM: usize = 32;
/// Bytes before the shape: magic, version, dtype, codec id, ndim, 3 reserved, meta and payload
/// lengths, element count.
pub const FIXED_HEADER: usize = 32;
pub const CHECKSUM_LEN: usize = 8;

pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// A tensor in packed form: the exact bytes of the format plus its parsed header.
pub struct Packed {
    bytes: Vec<u8>,
    dtype: DType,
    shape: Vec<u64>,
    codec: &'static codec::CodecInfo,
    meta: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
    decoder: Box<dyn Decoder>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("codec", &self.codec.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("nbytes", &self.bytes.len())
            .finish()
    }
}

fn numel_of(shape: &[u64]) -> Result<u64> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Format(format!("shape {shape:?} has more than 2^64 elements")))
}

impl Packed {
    /// Encodes `x` (with the given logical `shape`) with codec `name` and `params`.
    pub fn encode(x: Data<'_>, shape: &[u64], name: &str, params: &Params) -> Result<Packed> {
        let info = codec::by_name(name)?;
        if shape.len() > MAX_NDIM {
            return Err(Error::Shape(format!(
                "tensor has {} dimensions, at most {MAX_NDIM} are supported",
                shape.len()
            )));
        }
        let numel = numel_of(shape).map_err(|e| Error::Shape(e.to_string()))?;
        if numel != x.len() as u64 {
            return Err(Error::Shape(format!(
                "shape {shape:?} has {numel} elements, the buffer has {}",
                x.len()
            )));
        }
        // The encoder leaves room for the header in front of its metadata and payload, and for
        // the checksum behind: a large payload is written once and never moved or copied.
        let head_len = FIXED_HEADER + 8 * shape.len();
        let (mut bytes, meta_len) =
            (info.encoder)(params)?.encode_framed(x, head_len, CHECKSUM_LEN)?;
        let payload_len = bytes.len() - head_len - meta_len;
        let mut w = LeWriter(Vec::with_capacity(head_len));
        w.bytes(&MAGIC).u8(VERSION).u8(x.dtype() as u8).u16(info.id);
        w.u8(shape.len() as u8).bytes(&[0; 3]);
        w.u32(meta_len as u32).u64(payload_len as u64).u64(numel);
        for &d in shape {
            w.u64(d);
        }
        bytes[..head_len].copy_from_slice(&w.0);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        // Parse what we wrote: one code path for fresh and loaded tensors, and a self-check.
        Packed::parse(bytes, false)
    }

    /// Parses and validates bytes (checksum verified): never panics on any input.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Packed> {
        Packed::parse(bytes, true)
    }

    fn parse(bytes: Vec<u8>, verify: bool) -> Result<Packed> {
        let mut r = LeReader::new(&bytes, "packed tensor header");
        let magic = r.take(4, "magic")?;
        ensure_format!(
            magic == MAGIC,
            "not a smaq_rs packed tensor: magic is {magic:02x?}, expected {MAGIC:02x?} (\"SMAQ\")"
        );
        let version = r.u8("format version")?;
        ensure_format!(
            version == VERSION,
            "packed tensor format version {version} is not supported (this build reads {VERSION})"
        );
        let dtype = DType::from_code(r.u8("dtype")?)?;
        let codec_id = r.u16("codec id")?;
        let ndim = r.u8("ndim")? as usize;
        ensure_format!(ndim <= MAX_NDIM, "ndim {ndim} exceeds {MAX_NDIM}");
        let reserved = r.take(3, "reserved")?;
        ensure_format!(
            reserved == [0, 0, 0],
            "reserved header bytes are {reserved:?}, not zero"
        );
        let meta_len = r.u32("meta length")? as u64;
        let payload_len = r.u64("payload length")?;
        let numel = r.u64("element count")?;
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.u64("shape")?);
        }
        ensure_format!(
            numel_of(&shape)? == numel,
            "shape {shape:?} does not match element count {numel}"
        );
        let head = FIXED_HEADER + 8 * ndim;
        let expected = (head as u64)
            .checked_add(meta_len)
            .and_then(|v| v.checked_add(payload_len))
            .and_then(|v| v.checked_add(CHECKSUM_LEN as u64));
        ensure_format!(
            expected == Some(bytes.len() as u64),
            "header says {} bytes in all ({head} header + {meta_len} meta + {payload_len} payload + 8 \
             checksum), buffer has {}",
            expected.map_or("more than 2^64".to_string(), |v| v.to_string()),
            bytes.len()
        );
        let body = bytes.len() - CHECKSUM_LEN;
        if verify {
            let stored = u64::from_le_bytes(bytes[body..].try_into().unwrap());
            let computed = checksum(&bytes[..body]);
            if stored != computed {
                return Err(Error::Checksum { stored, computed });
            }
        }
        let codec = codec::by_id(codec_id)?;
        let meta = head..head + meta_len as usize;
        let payload = meta.end..body;
        let frame = Frame {
            dtype,
            numel,
            payload_len,
        };
        let decoder = (codec.decoder)(&bytes[meta.clone()], frame)?;
        Ok(Packed {
            bytes,
            dtype,
            shape,
            codec,
            meta,
            payload,
            decoder,
        })
    }

    /// The packed bytes: what `nbytes` counts and what `from_bytes` reads.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
    pub fn nbytes(&self) -> usize {
        self.bytes.len()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn codec_name(&self) -> &'static str {
        self.codec.name
    }
    pub fn params(&self) -> Params {
        self.decoder.params()
    }
    pub fn info(&self) -> Params {
        self.decoder.info()
    }
    /// Bytes of codec metadata (statistics, chunk index).
    pub fn meta_len(&self) -> usize {
        self.meta.len()
    }
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }
    /// Bytes the tensor takes uncompressed.
    pub fn dense_nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Decodes into `out`, which must have this tensor's dtype and element count.
    pub fn decode_into(&self, out: DataMut<'_>) -> Result<()> {
        self.decoder.decode(&self.bytes[self.payload.clone()], out)
    }

    /// Decodes into a new buffer.
    pub fn decode(&self) -> Result<Owned> {
        let n = usize::try_from(self.numel())
            .map_err(|_| Error::Shape("tensor too large for this platform".into()))?;
        let mut out = Owned::zeros(self.dtype, n);
        self.decode_into(out.as_mut())?;
        Ok(out)
    }
}

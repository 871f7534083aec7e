//! The packed tensor format, version 1 (docs/FORMAT.md): a fixed little-endian header, codec
//! metadata, the codec's payload, and an XXH3-64 checksum of everything before it.
//!
//! A freshly encoded [`Packed`] computes its checksum only when its bytes first leave it
//! ([`Packed::to_vec`], [`Packed::into_bytes`], [`Packed::checksum`]): a tensor that is
//! compressed and decoded in memory (saved activations, optimizer state) never pays for a hash
//! that only stored bytes need. The bytes read out are the same either way.

pub mod container;

use crate::codec::{self, Decoder, Frame, Params};
use crate::dtype::{DType, Data, DataMut, Owned};
use crate::error::{ensure_format, Error, Result};
use crate::le::{LeReader, LeWriter};

pub const MAGIC: [u8; 4] = *b"SMAQ";
/// The newest packed format version this build reads and writes; it reads every version from 1.
/// Each tensor is written with the lowest version that describes it ([`codec::Encoder::format_version`]).
pub const VERSION: u8 = 2;
/// Most dimensions a shape may have.
pub const MAX_NDIM: usize = 32;
/// Bytes before the shape: magic, version, dtype, codec id, ndim, 3 reserved, meta and payload
/// lengths, element count.
pub const FIXED_HEADER: usize = 32;
pub const CHECKSUM_LEN: usize = 8;

/// XXH3-64 (seed 0) of `bytes`. The `xxh3` crate picks AVX2 or NEON at run time (about 40 GB/s
/// on one core here, against 25 GB/s for the baseline-x86-64 build of `xxhash-rust`); a test
/// pins its values to the reference implementation's.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxh3::hash64_with_seed(bytes, 0)
}

/// The fixed header and shape of a packed tensor (the bytes the checksum starts with).
fn header_bytes(
    version: u8,
    dtype: DType,
    codec_id: u16,
    shape: &[u64],
    numel: u64,
    meta_len: usize,
    payload_len: usize,
) -> Vec<u8> {
    let mut w = LeWriter(Vec::with_capacity(FIXED_HEADER + 8 * shape.len()));
    w.bytes(&MAGIC).u8(version).u8(dtype as u8).u16(codec_id);
    w.u8(shape.len() as u8).bytes(&[0; 3]);
    w.u32(meta_len as u32).u64(payload_len as u64).u64(numel);
    for &d in shape {
        w.u64(d);
    }
    w.0
}

/// A tensor in packed form: the exact bytes of the format plus its parsed header.
pub struct Packed {
    /// Everything before the checksum: header, metadata, payload (capacity for the checksum
    /// too, so that `into_bytes` does not move them).
    bytes: Vec<u8>,
    /// The checksum of `bytes`: verified on load, computed on first use after an encode.
    sum: std::sync::OnceLock<u64>,
    dtype: DType,
    shape: Vec<u64>,
    codec: &'static codec::CodecInfo,
    meta: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
    decoder: Box<dyn Decoder>,
}

/// A large buffer goes back to the cache of recycled buffers (`crate::buf::recycle`).
impl Drop for Packed {
    fn drop(&mut self) {
        crate::buf::recycle(std::mem::take(&mut self.bytes));
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("codec", &self.codec.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("nbytes", &self.nbytes())
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
            return Err(Error::Layout(format!(
                "tensor has {} dimensions, at most {MAX_NDIM} are supported",
                shape.len()
            )));
        }
        let numel = numel_of(shape).map_err(|e| Error::Layout(e.to_string()))?;
        if numel != x.len() as u64 {
            return Err(Error::Layout(format!(
                "shape {shape:?} has {numel} elements, the buffer has {}",
                x.len()
            )));
        }
        let enc = (info.encoder)(params)?;
        // The encoder leaves room for the header in front of its metadata and payload, and
        // capacity for the checksum behind: a large payload is written once, never moved.
        let (bytes, meta_len) = enc.encode_framed(x, Self::head_len(shape), CHECKSUM_LEN)?;
        Packed::from_encoding(
            bytes,
            meta_len,
            enc.format_version(),
            x.dtype(),
            info,
            shape,
        )
    }

    /// Bytes an encoder leaves in front of its metadata for the header of a tensor of `shape`.
    pub fn head_len(shape: &[u64]) -> usize {
        FIXED_HEADER + 8 * shape.len()
    }

    /// A fresh encoding laid out by an encoder ([`Packed::head_len`] bytes left for the header,
    /// then `meta_len` bytes of metadata, then the payload) made into a packed tensor of format
    /// `version`: the header is written and everything parsed back as a self-check.
    pub fn from_encoding(
        mut bytes: Vec<u8>,
        meta_len: usize,
        version: u8,
        dtype: DType,
        info: &'static codec::CodecInfo,
        shape: &[u64],
    ) -> Result<Packed> {
        let head_len = Self::head_len(shape);
        let numel = numel_of(shape).map_err(|e| Error::Layout(e.to_string()))?;
        let payload_len = bytes.len() - head_len - meta_len;
        let head = header_bytes(version, dtype, info.id, shape, numel, meta_len, payload_len);
        bytes[..head_len].copy_from_slice(&head);
        crate::buf::release_spare(&mut bytes);
        // Parse what we wrote: one code path for fresh and loaded tensors, and a self-check.
        Packed::parse(bytes, false)
    }

    /// Parses and validates bytes (checksum verified): never panics on any input.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Packed> {
        Packed::parse_sealed(bytes, true)
    }

    /// [`Packed::from_bytes`] of bytes whose integrity was just established by a checksum over
    /// all of them (a checkpoint entry's): the structure is validated all the same, the packed
    /// tensor's own checksum is taken as stored instead of being computed again.
    pub fn from_verified_bytes(bytes: Vec<u8>) -> Result<Packed> {
        Packed::parse_sealed(bytes, false)
    }

    fn parse_sealed(bytes: Vec<u8>, verify: bool) -> Result<Packed> {
        Packed::parse_with(bytes, true, verify)
    }

    /// `sealed`: `bytes` end with the checksum, which is verified (loaded bytes). Otherwise they
    /// stop before it (a fresh encoding) and it is computed when first asked for.
    fn parse(bytes: Vec<u8>, sealed: bool) -> Result<Packed> {
        Packed::parse_with(bytes, sealed, true)
    }

    /// [`Packed::parse`]; `verify: false` trusts a sealed buffer's stored checksum.
    fn parse_with(mut bytes: Vec<u8>, sealed: bool, verify: bool) -> Result<Packed> {
        let total = bytes.len() + if sealed { 0 } else { CHECKSUM_LEN };
        let mut r = LeReader::new(&bytes, "packed tensor header");
        let magic = r.take(4, "magic")?;
        ensure_format!(
            magic == MAGIC,
            "not a smaq_rs packed tensor: magic is {magic:02x?}, expected {MAGIC:02x?} (\"SMAQ\")"
        );
        let version = r.u8("format version")?;
        ensure_format!(
            (1..=VERSION).contains(&version),
            "packed tensor format version {version} is not supported (this build reads 1 to {VERSION})"
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
            expected == Some(total as u64),
            "header says {} bytes in all ({head} header + {meta_len} meta + {payload_len} payload + 8 \
             checksum), buffer has {total}",
            expected.map_or("more than 2^64".to_string(), |v| v.to_string()),
        );
        let body = total - CHECKSUM_LEN;
        let sum = std::sync::OnceLock::new();
        if sealed {
            let stored = u64::from_le_bytes(bytes[body..].try_into().unwrap());
            if verify {
                let computed = checksum(&bytes[..body]);
                if stored != computed {
                    return Err(Error::Checksum { stored, computed });
                }
            }
            bytes.truncate(body);
            let _ = sum.set(stored);
        }
        let codec = codec::by_id(codec_id)?;
        let meta = head..head + meta_len as usize;
        let payload = meta.end..body;
        let frame = Frame {
            version,
            dtype,
            numel,
            payload_len,
        };
        let decoder = (codec.decoder)(&bytes[meta.clone()], frame)?;
        Ok(Packed {
            bytes,
            sum,
            dtype,
            shape,
            codec,
            meta,
            payload,
            decoder,
        })
    }

    /// The packed bytes before the checksum: header, metadata and payload.
    pub fn body(&self) -> &[u8] {
        &self.bytes
    }
    /// The checksum that ends the packed bytes (XXH3-64 of [`Packed::body`]), computed on first
    /// use for a fresh encoding.
    pub fn checksum(&self) -> u64 {
        *self.sum.get_or_init(|| checksum(&self.bytes))
    }
    /// The packed bytes, checksum included: what `nbytes` counts and what `from_bytes` reads.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.nbytes());
        v.extend_from_slice(&self.bytes);
        v.extend_from_slice(&self.checksum().to_le_bytes());
        v
    }
    /// [`Packed::to_vec`] without a copy.
    pub fn into_bytes(mut self) -> Vec<u8> {
        let sum = self.checksum();
        let mut v = std::mem::take(&mut self.bytes);
        v.extend_from_slice(&sum.to_le_bytes());
        v
    }
    /// Length of the packed bytes, checksum included.
    pub fn nbytes(&self) -> usize {
        self.bytes.len() + CHECKSUM_LEN
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
    pub fn stats(&self) -> Params {
        self.decoder.stats()
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

    /// Decodes into `out`, every value clamped into `range` ([`Decoder::decode_clamped`]).
    pub fn decode_into_clamped(&self, range: [f64; 2], out: DataMut<'_>) -> Result<()> {
        self.decoder
            .decode_clamped(&self.bytes[self.payload.clone()], range, out)
    }

    /// Length of the pieces this tensor decodes in independently ([`Decoder::piece_len`]).
    pub fn piece_len(&self) -> Option<usize> {
        self.decoder.piece_len()
    }

    /// Decodes piece `i` into `out` ([`Decoder::decode_piece`]).
    pub fn decode_piece(&self, i: usize, out: DataMut<'_>) -> Result<()> {
        self.decoder
            .decode_piece(&self.bytes[self.payload.clone()], i, out)
    }

    /// Decodes into a new buffer.
    pub fn decode(&self) -> Result<Owned> {
        let n = usize::try_from(self.numel())
            .map_err(|_| Error::Layout("tensor too large for this platform".into()))?;
        let mut out = Owned::zeros(self.dtype, n)?;
        self.decode_into(out.as_mut())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh encoding computes its checksum when its bytes are first read out: they are
    /// those of the plain path (encode, header, one checksum pass), by every way out.
    #[test]
    fn fresh_encodings_are_sealed_on_the_way_out() {
        let x = sample(3 * 65_536 + 123, 5);
        let shape = [x.len() as u64];
        for (name, p) in [
            ("fp32", params(&[])),
            ("fp16", params(&[])),
            ("fp8", params(&[("format", Param::Str("e5m2".into()))])),
            ("mantissa", params(&[("mantissa_bits", Param::Int(3))])),
            ("smaq", params(&[("seed", Param::Int(3))])),
        ] {
            let info = codec::by_name(name).unwrap();
            let head_len = FIXED_HEADER + 8;
            let enc = (info.encoder)(&p).unwrap();
            let (mut b, meta_len) = enc
                .encode_framed(Data::F32(&x), head_len, CHECKSUM_LEN)
                .unwrap();
            let payload_len = b.len() - head_len - meta_len;
            let head = header_bytes(
                enc.format_version(),
                DType::F32,
                info.id,
                &shape,
                x.len() as u64,
                meta_len,
                payload_len,
            );
            b[..head_len].copy_from_slice(&head);
            let sum = checksum(&b);
            b.extend_from_slice(&sum.to_le_bytes());

            let fresh = Packed::encode(Data::F32(&x), &shape, name, &p).unwrap();
            assert_eq!(fresh.nbytes(), b.len(), "{name}");
            assert!(fresh.body() == &b[..b.len() - CHECKSUM_LEN], "{name}: body");
            assert!(fresh.to_vec() == b, "{name}: to_vec");
            assert_eq!(fresh.checksum(), sum, "{name}");
            let fresh = Packed::encode(Data::F32(&x), &shape, name, &p).unwrap();
            let out = fresh.into_bytes();
            assert!(out == b, "{name}: into_bytes");
            let loaded = Packed::from_bytes(out).unwrap();
            assert_eq!((loaded.nbytes(), loaded.checksum()), (b.len(), sum));
            assert!(loaded.to_vec() == b, "{name}: loaded to_vec");
        }
    }

    #[test]
    fn checksum_is_the_reference_xxh3() {
        let v: Vec<u8> = (0..3_000_017u32).map(|i| (i ^ (i >> 7)) as u8).collect();
        let lens = (0..=260).chain([511, 512, 1023, 1024, 1025, 4096, 65_537, 3_000_017]);
        for n in lens {
            assert_eq!(
                checksum(&v[..n]),
                xxhash_rust::xxh3::xxh3_64(&v[..n]),
                "{n} bytes"
            );
        }
    }
    use crate::codec::Param;
    use proptest::prelude::*;

    fn params(items: &[(&str, Param)]) -> Params {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// Re-seals bytes after a mutation so the parsers behind the checksum are exercised.
    fn reseal(bytes: &mut [u8]) {
        let body = bytes.len() - CHECKSUM_LEN;
        let sum = checksum(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.to_le_bytes());
    }

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 6.0 - 3.0)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip_any_shape_and_params(
            n in 0usize..5000,
            bm in 3u8..=8,
            extra in 0u8..=8,
            chunk in prop::sample::select(vec![64i64, 200, 4096]),
            rounding in prop::sample::select(vec!["stochastic", "nearest", "truncate"]),
            seed in any::<u32>(),
        ) {
            let x = sample(n, seed as u64);
            let p = params(&[
                ("bits_main", Param::Int(bm as i64)),
                ("bits_outlier", Param::Int((bm + extra).min(16) as i64)),
                ("chunk_size", Param::Int(chunk)),
                ("rounding", Param::Str(rounding.into())),
                ("seed", Param::Int(seed as i64)),
            ]);
            let packed = Packed::encode(Data::F32(&x), &[n as u64], "smaq", &p).unwrap();
            let again = Packed::from_bytes(packed.to_vec()).unwrap();
            let y = match again.decode().unwrap() { Owned::F32(v) => v, _ => unreachable!() };
            prop_assert_eq!(y.len(), n);
            let info = again.stats();
            let (Some(Param::Float(mean)), Some(Param::Float(std))) = (info.get("mean"), info.get("std"))
            else { panic!("no statistics") };
            let bo = (bm + extra).min(16);
            let r_main = ((1u32 << (bm - 2)) - 1) as f64;
            let r_out = ((1u32 << (bo - 2)) - 1) as f64 / 1.5;
            for (a, b) in x.iter().zip(&y) {
                // One grid step at most (truncation), plus the distance clamped beyond 2.5 std.
                let z = ((*a as f64 - mean) / std).abs();
                let bound = std * (1.0 / r_main.min(r_out) + (z - 2.5).max(0.0)) + 1e-4;
                prop_assert!(((a - b).abs() as f64) <= bound, "{} -> {} (bound {})", a, b, bound);
            }
        }

        #[test]
        fn resealed_mutations_never_panic(pos in any::<prop::sample::Index>(), byte in any::<u8>(),
                                          pos2 in any::<prop::sample::Index>(), byte2 in any::<u8>()) {
            let mut x = sample(700, 1);
            x[3] = f32::NAN;
            let p = params(&[("chunk_size", Param::Int(128)), ("outliers", Param::Str("exact".into()))]);
            let mut bytes = Packed::encode(Data::F32(&x), &[7, 100], "smaq", &p).unwrap().into_bytes();
            let body = bytes.len() - CHECKSUM_LEN;
            bytes[pos.index(body)] = byte;
            bytes[pos2.index(body)] = byte2;
            reseal(&mut bytes);
            if let Ok(packed) = Packed::from_bytes(bytes) {
                let _ = packed.decode();
            }
        }
    }

    #[test]
    fn every_resealed_single_byte_change_is_handled() {
        let x = sample(300, 2);
        let p = params(&[("chunk_size", Param::Int(64))]);
        let good = Packed::encode(Data::F32(&x), &[300], "smaq", &p)
            .unwrap()
            .into_bytes();
        let body = good.len() - CHECKSUM_LEN;
        for i in 0..body {
            for v in [0u8, 1, 0x7f, 0x80, 0xff, good[i] ^ 1] {
                let mut bad = good.clone();
                bad[i] = v;
                reseal(&mut bad);
                if let Ok(packed) = Packed::from_bytes(bad) {
                    // Whatever parses must decode or fail cleanly.
                    let _ = packed.decode();
                }
            }
        }
    }

    #[test]
    fn header_errors_say_what_was_expected() {
        let x = sample(100, 3);
        let good = Packed::encode(Data::F32(&x), &[100], "smaq", &Params::new())
            .unwrap()
            .into_bytes();
        let err = Packed::from_bytes(good[..good.len() - 1].to_vec()).unwrap_err();
        assert!(err.to_string().contains("buffer has"), "{err}");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(Packed::from_bytes(bad)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut bad = good.clone();
        bad[20] ^= 1;
        assert!(matches!(
            Packed::from_bytes(bad),
            Err(Error::Checksum { .. }) | Err(Error::Format(_))
        ));
    }
}

//! Reading a checkpoint container: the header is read and checked at open, entries are read
//! (pread, or from a buffer) and verified when asked for, several at once in parallel.

use super::{align8, header_len, parse_header, Entry, Header, ENC_RAW, ENC_ZSTD, PREAMBLE};
use crate::codec;
use crate::dtype::DataMut;
use crate::error::{ensure_format, Error, Result};
use crate::format::Packed;
use rayon::prelude::*;
use std::fs::File;
use std::mem::MaybeUninit;
#[cfg(not(target_os = "linux"))]
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A zeroed, 8-byte-aligned buffer of `len` bytes (allocation failure is an error, not an abort).
/// Zeroed by the allocator (calloc): a large buffer's fresh pages are not written here, only
/// faulted in by whoever writes them first.
pub fn aligned_buffer(len: u64) -> Result<Vec<u64>> {
    let words = usize::try_from(len.div_ceil(8))
        .map_err(|_| Error::Layout(format!("{len} bytes do not fit in memory")))?;
    if words == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u64>(words)
        .map_err(|_| Error::Layout(format!("{len} bytes do not fit in memory")))?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut u64;
    if ptr.is_null() {
        return Err(Error::Layout(format!("cannot allocate {len} bytes")));
    }
    crate::buf::advise_huge_pages(ptr as *const u8, 8 * words);
    // SAFETY: allocated by the global allocator with the layout of `words` u64 values, all
    // initialized (zero).
    Ok(unsafe { Vec::from_raw_parts(ptr, words, words) })
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
    verify(entry, &stored)?;
    decode_verified(entry, stored, out)
}

/// The bytes after an entry's payload, up to the next 8-byte boundary, must be zero.
fn check_padding(e: &Entry, pad: &[u8]) -> Result<()> {
    ensure_format!(
        pad.iter().all(|&x| x == 0),
        "entry {:?}: padding after its payload is not zero",
        e.name
    );
    Ok(())
}

/// The entry's checksum against that of its stored bytes.
fn verify(entry: &Entry, stored: &[u8]) -> Result<()> {
    let computed = crate::format::checksum(stored);
    if computed != entry.checksum {
        return Err(Error::Checksum {
            stored: entry.checksum,
            computed,
        });
    }
    Ok(())
}

/// [`decode_entry`] of stored bytes already verified against the entry's checksum (so a packed
/// tensor's own checksum, covered by it, is not computed again).
fn decode_verified(entry: &Entry, stored: Vec<u8>, out: &mut [u8]) -> Result<()> {
    if out.len() as u64 != entry.dense_len() {
        return Err(Error::Layout(format!(
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
            let p = Packed::from_verified_bytes(stored)?;
            ensure_format!(
                codec::by_name(p.codec_name())?.id == entry.codec_id
                    && p.dtype() == entry.dtype
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
            let dst = DataMut::from_bytes(p.dtype(), out)?;
            p.decode_into(dst)?;
        }
    }
    Ok(())
}

/// Where a container's bytes come from: a file (pread) or a buffer.
pub trait Source: Sync {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Fills `dst` with the bytes at `offset` (initializing every byte, also on error).
    fn read_into(&self, offset: u64, dst: &mut [MaybeUninit<u8>]) -> Result<()>;
}

fn out_of_bounds(len: usize, offset: u64) -> Error {
    Error::Format(format!("read of {len} bytes at {offset} is out of bounds"))
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let start = usize::try_from(offset).ok();
        start
            .and_then(|s| s.checked_add(len).map(|e| (s, e)))
            .filter(|&(_, e)| e <= <[u8]>::len(self))
            .map(|(s, e)| self[s..e].to_vec())
            .ok_or_else(|| out_of_bounds(len, offset))
    }
    fn read_into(&self, offset: u64, dst: &mut [MaybeUninit<u8>]) -> Result<()> {
        let dst = crate::buf::zero_init(dst);
        let src = self.read_at(offset, dst.len())?;
        dst.copy_from_slice(&src);
        Ok(())
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
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| Error::Layout(format!("cannot allocate {len} bytes")))?;
        self.read_into(offset, &mut buf.spare_capacity_mut()[..len])?;
        // SAFETY: read_into initialized the first `len` bytes.
        unsafe { buf.set_len(len) };
        Ok(buf)
    }

    fn read_into(&self, offset: u64, dst: &mut [MaybeUninit<u8>]) -> Result<()> {
        let len = dst.len();
        let short = || {
            Error::Format(format!(
                "file ended before {len} bytes at offset {offset} could be read (was it \
                 truncated while open?)"
            ))
        };
        #[cfg(target_os = "linux")]
        {
            // pread straight into the uninitialized buffer: no zeroing pass before the copy.
            let mut done = 0usize;
            while done < len {
                let at =
                    i64::try_from(offset + done as u64).map_err(|_| out_of_bounds(len, offset));
                let at = match at {
                    Ok(a) => a,
                    Err(e) => {
                        crate::buf::zero_init(&mut dst[done..]);
                        return Err(e);
                    }
                };
                // SAFETY: the kernel writes at most len - done bytes into dst[done..], which is
                // valid for writes; bytes it writes are initialized.
                let n = unsafe {
                    libc::pread(
                        std::os::fd::AsRawFd::as_raw_fd(&self.file),
                        dst[done..].as_mut_ptr().cast(),
                        len - done,
                        at,
                    )
                };
                if n > 0 {
                    done += n as usize;
                    continue;
                }
                let err = std::io::Error::last_os_error();
                if n < 0 && err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                crate::buf::zero_init(&mut dst[done..]);
                return Err(if n == 0 {
                    short()
                } else {
                    Error::io("cannot read the checkpoint")(err)
                });
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let dst = crate::buf::zero_init(dst);
            self.file.read_exact_at(dst, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    short()
                } else {
                    Error::io("cannot read the checkpoint")(e)
                }
            })
        }
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
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(Error::io(format!("cannot open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(Error::io(format!("cannot stat {}", path.display())))?
            .len();
        Reader::new(Box::new(FileSource { file, len }))
    }
}

impl Reader<[u8]> {
    pub fn from_bytes(bytes: Box<[u8]>) -> Result<Self> {
        Reader::new(bytes)
    }
}

impl<S: Source + ?Sized> Reader<S> {
    pub fn new(src: Box<S>) -> Result<Self> {
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
        ensure_format!(
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
    pub fn stored(&self, i: usize) -> Result<Vec<u8>> {
        let b = self.stored_unverified(i)?;
        verify(&self.header.entries[i], &b)?;
        Ok(b)
    }

    /// The stored bytes of entry `i` and the zero padding after them checked, read into a
    /// recycled buffer when one fits (no page faults, no zeroing pass).
    fn stored_unverified(&self, i: usize) -> Result<Vec<u8>> {
        let e = &self.header.entries[i];
        let len = usize::try_from(e.length)
            .map_err(|_| Error::Format(format!("entry {:?} is too large", e.name)))?;
        let padded = align8(e.length).unwrap() as usize;
        let mut res = Ok(());
        // SAFETY: read_into initializes every byte of the slice, also when it fails.
        let mut b = unsafe {
            crate::buf::init_with_tail(padded, 0, |dst| {
                res = self.src.read_into(self.header.data_start + e.offset, dst)
            })
        };
        res?;
        check_padding(e, &b[len..])?;
        b.truncate(len);
        Ok(b)
    }

    /// Decodes entry `i` into a new 8-byte-aligned buffer (its first `dense_len()` bytes). Each
    /// byte is checksummed once; a raw entry is read straight into the buffer.
    pub fn read(&self, i: usize) -> Result<Vec<u64>> {
        let e = &self.header.entries[i];
        let mut buf = aligned_buffer(e.dense_len())?;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
        let out = &mut bytes[..e.dense_len() as usize];
        if e.encoding == ENC_RAW && e.length == e.dense_len() {
            let at = self.header.data_start + e.offset;
            // SAFETY: u8 and MaybeUninit<u8> share their layout; read_into only writes.
            let dst = unsafe { &mut *(out as *mut [u8] as *mut [MaybeUninit<u8>]) };
            self.src.read_into(at, dst)?;
            let pad = (align8(e.length).unwrap() - e.length) as usize;
            let mut tail = [0u8; 8];
            let t = &mut tail[..pad];
            // SAFETY: as above.
            self.src.read_into(at + e.length, unsafe {
                &mut *(t as *mut [u8] as *mut [MaybeUninit<u8>])
            })?;
            check_padding(e, &tail[..pad])?;
            verify(e, out)?;
            return Ok(buf);
        }
        decode_entry(e, self.stored_unverified(i)?, out)?;
        Ok(buf)
    }

    /// Decodes several entries in parallel; each result stands alone.
    pub fn read_many(&self, idx: &[usize]) -> Vec<Result<Vec<u64>>> {
        crate::pool::install(|| idx.par_iter().map(|&i| self.read(i)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::tmpdir;
    use super::super::tests::write;
    use super::*;

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
}

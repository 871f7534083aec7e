//! Writing a checkpoint container: entries encoded in parallel batches into a temporary file
//! beside the target, the header written last, fsync, and an atomic rename. Temporary files that
//! killed writers left behind are swept when their process no longer exists.

use super::{
    align8, dense_of, write_header, Encoding, Entry, EntrySpec, ENC_PACKED, ENC_RAW, ENC_ZSTD,
    MAX_DENSE, MAX_HEADER, PREAMBLE,
};
use crate::codec;
use crate::dtype::Data;
use crate::error::{Error, Result};
use crate::format::Packed;
use rayon::prelude::*;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One coded entry: (encoding, codec id, stored bytes).
type Coded = (u8, u16, Vec<u8>);

/// Encodes one entry's raw little-endian bytes. Returns (encoding, codec id, stored bytes).
pub fn encode_entry(spec: &EntrySpec, raw: &[u8]) -> Result<Coded> {
    let dense = dense_of(spec.dtype, &spec.shape)
        .ok_or_else(|| Error::Layout(format!("entry {:?}: shape overflows", spec.name)))?;
    if raw.len() as u64 != dense {
        return Err(Error::Layout(format!(
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
            if !spec.dtype.is_packable() {
                return Err(Error::Dtype(format!(
                    "entry {:?}: codec {name:?} needs a float tensor, not {}",
                    spec.name,
                    spec.dtype.name()
                )));
            }
            let mut copy: Vec<u64> = Vec::new();
            let words: &[u8] = if (raw.as_ptr() as usize).is_multiple_of(spec.dtype.size()) {
                raw
            } else {
                // A view at an odd offset (rare): copy into an 8-byte-aligned buffer.
                copy.resize(raw.len().div_ceil(8), 0);
                let b: &mut [u8] = bytemuck::cast_slice_mut(&mut copy);
                b[..raw.len()].copy_from_slice(raw);
                &bytemuck::cast_slice::<u64, u8>(&copy)[..raw.len()]
            };
            let data = Data::from_bytes(spec.dtype, words)?;
            let p = Packed::encode(data, &spec.shape, name, params)?;
            let id = codec::by_name(p.codec_name())?.id;
            let bytes = p.into_bytes();
            // A packed tensor no smaller than its raw bytes (a scalar, a few values: the header
            // and metadata outweigh them) is stored raw: smaller, and exact.
            if bytes.len() >= raw.len() {
                return Ok((ENC_RAW, 0, raw.to_vec()));
            }
            Ok((ENC_PACKED, id, bytes))
        }
    }
}

/// Removes the temporary files that killed writers of `dir/fname` left behind: those named
/// `.FNAME.smaq-tmp.PID.*` whose process no longer exists on this machine. A live writer's file
/// (this process's included) is never touched; failures to remove are ignored.
fn sweep_stale(dir: &Path, fname: &std::ffi::OsStr) {
    let prefix = format!(".{}.smaq-tmp.", fname.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether a process with this id exists (on other systems than Linux: assumed so).
fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        // EPERM: it exists but belongs to someone else.
        std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

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
    /// Set when a failed batch could not be taken back out of the file: nothing more is
    /// written.
    broken: bool,
}

impl Writer {
    pub fn create(path: &Path, specs: Vec<EntrySpec>, json: String) -> Result<Writer> {
        if json.len() > u32::MAX as usize {
            return Err(Error::Layout(format!(
                "checkpoint JSON is {} bytes, at most 4 GiB",
                json.len()
            )));
        }
        let mut names = std::collections::HashSet::new();
        let mut entries = Vec::with_capacity(specs.len());
        for s in &specs {
            if s.name.is_empty() || s.name.len() > u16::MAX as usize || !names.insert(&s.name) {
                return Err(Error::Layout(format!(
                    "entry name {:?} is empty, longer than 65535 bytes, or repeated",
                    s.name
                )));
            }
            if s.shape.len() > crate::format::MAX_NDIM
                || dense_of(s.dtype, &s.shape).is_none_or(|d| d > MAX_DENSE)
            {
                return Err(Error::Layout(format!(
                    "entry {:?}: shape {:?} is too large",
                    s.name, s.shape
                )));
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
            return Err(Error::Layout(format!(
                "checkpoint header would be {header_len} bytes, the cap is {MAX_HEADER}"
            )));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let fname = path
            .file_name()
            .ok_or_else(|| Error::Layout(format!("{} is not a file path", path.display())))?;
        sweep_stale(&dir, fname);
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
            .map_err(Error::io(format!("cannot create {}", tmp.display())))?;
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
            broken: false,
        };
        // From here on, dropping `w` removes the temporary file.
        let start = align8(header_len as u64).unwrap();
        preallocate(&file, 0, start);
        file.write_all(&vec![0u8; start as usize])
            .map_err(Error::io("cannot write the checkpoint"))?;
        w.file = Some(file);
        Ok(w)
    }

    /// Entries written so far.
    pub fn written(&self) -> usize {
        self.next
    }

    /// Encodes the next `raws.len()` entries (in parallel) and appends them, each written as
    /// soon as it and those before it are encoded, while the later ones are still being
    /// encoded. Returns the stored byte length of each. A batch that fails is taken back out
    /// of the file (as if it had not been written): it may be written again, or the writer
    /// dropped.
    pub fn write_batch(&mut self, raws: &[&[u8]]) -> Result<Vec<u64>> {
        let end = self.next + raws.len();
        if end > self.specs.len() {
            return Err(Error::Layout(format!(
                "{} entries given, the checkpoint was declared with {} and has {} written",
                raws.len(),
                self.specs.len(),
                self.next
            )));
        }
        if self.broken {
            return Err(Error::Layout(
                "the checkpoint writer could not take a failed batch back out of its file".into(),
            ));
        }
        let pos0 = self.pos;
        match self.append_batch(raws) {
            Ok(sizes) => {
                self.next = end;
                Ok(sizes)
            }
            Err(e) => {
                // Back to where the batch started: payloads must be contiguous.
                let at = align8(self.header_len as u64).unwrap() + pos0;
                self.pos = pos0;
                let file = self.file.as_mut().expect("writer already finished");
                if file
                    .set_len(at)
                    .and_then(|_| file.seek(SeekFrom::Start(at)))
                    .is_err()
                {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }

    /// The work of [`Writer::write_batch`] once the batch is known to fit.
    fn append_batch(&mut self, raws: &[&[u8]]) -> Result<Vec<u64>> {
        let start = self.next;
        let specs = &self.specs[start..start + raws.len()];
        // Each entry's checksum is taken on the thread that encoded it, while its bytes are hot.
        let code = |s: &EntrySpec, r: &[u8]| {
            encode_entry(s, r).map(|c| {
                let sum = crate::format::checksum(&c.2);
                (c, sum)
            })
        };
        let data_start = align8(self.header_len as u64).unwrap();
        let file = self.file.as_mut().expect("writer already finished");
        let (entries, pos) = (&mut self.entries[start..], &mut self.pos);
        if raws.len() == 1 {
            // One entry: coded on this thread (its chunks still go to the pool), no hand-off.
            let coded = code(&specs[0], raws[0])?;
            return Ok(vec![append(file, &mut entries[0], pos, data_start, coded)?]);
        }
        let failed = std::sync::atomic::AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel();
        let (_, written) = crate::pool::alongside(
            || {
                specs
                    .par_iter()
                    .zip(raws.par_iter())
                    .enumerate()
                    .for_each_with(tx, |tx, (i, (s, r))| {
                        // After a failure the remaining entries are not coded (nothing more
                        // will be written).
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let c = code(s, r);
                        if c.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        let _ = tx.send((i, c));
                    })
            },
            || -> Result<Vec<u64>> {
                // Results arrive in any order and are written in entry order.
                let mut ready: Vec<Option<Result<(Coded, u64)>>> =
                    (0..raws.len()).map(|_| None).collect();
                let (mut next, mut sizes, mut error) = (0, Vec::new(), None);
                for (i, c) in rx {
                    ready[i] = Some(c);
                    while let Some(c) = ready.get_mut(next).and_then(Option::take) {
                        if error.is_none() {
                            match c
                                .and_then(|c| append(file, &mut entries[next], pos, data_start, c))
                            {
                                Ok(len) => sizes.push(len),
                                Err(e) => {
                                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                                    error = Some(e);
                                }
                            }
                        }
                        next += 1;
                    }
                }
                if let Some(e) = error {
                    return Err(e);
                }
                if next < raws.len() {
                    // Entries were skipped after one failed to encode: that one's error waits
                    // among the results not yet written.
                    return Err(ready
                        .into_iter()
                        .flatten()
                        .find_map(Result::err)
                        .unwrap_or_else(|| {
                            Error::Codec("an entry was neither encoded nor failed".into())
                        }));
                }
                Ok(sizes)
            },
        );
        written
    }

    /// Writes the header, fsyncs, and renames the temporary file over the target; then fsyncs
    /// the directory, so that the rename itself is on disk. With `durable` false both fsyncs
    /// are skipped (the rename is still atomic: a crash leaves the old file or the new one, but
    /// the new one may not have reached the disk). Returns the seconds the fsyncs took.
    pub fn finish(mut self, durable: bool) -> Result<f64> {
        if self.next != self.specs.len() {
            return Err(Error::Layout(format!(
                "checkpoint declared {} entries, {} were written",
                self.specs.len(),
                self.next
            )));
        }
        let header = write_header(&self.json, &self.entries);
        debug_assert_eq!(header.len(), self.header_len);
        let mut file = self.file.take().expect("writer already finished");
        let fail = Error::io("cannot write the checkpoint");
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header))
            .map_err(fail)?;
        let mut synced = std::time::Duration::ZERO;
        if durable {
            let t = std::time::Instant::now();
            file.sync_all()
                .map_err(Error::io("cannot write the checkpoint"))?;
            synced += t.elapsed();
        }
        drop(file);
        let replaced = hold_replaced(&self.path);
        std::fs::rename(&self.tmp, &self.path).map_err(Error::io(format!(
            "cannot rename {} to {}",
            self.tmp.display(),
            self.path.display()
        )))?;
        release_in_background(replaced);
        // Make the rename itself durable.
        let t = std::time::Instant::now();
        if let Some(dir) = self.path.parent().filter(|_| durable) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        if durable {
            synced += t.elapsed();
        }
        self.tmp = PathBuf::new();
        Ok(synced.as_secs_f64())
    }
}

/// Writes an entry's coded bytes at `pos` past the data start (the end of what is written; its
/// blocks allocated first), records them in `e` and advances `pos`; returns their length.
fn append(
    file: &mut File,
    e: &mut Entry,
    pos: &mut u64,
    data_start: u64,
    ((enc, id, bytes), checksum): (Coded, u64),
) -> Result<u64> {
    let length = bytes.len() as u64;
    let padded = align8(length).unwrap();
    preallocate(file, data_start + *pos, padded);
    file.write_all(&bytes)
        .and_then(|_| file.write_all(&[0u8; 8][..(padded - length) as usize]))
        .map_err(Error::io("cannot write the checkpoint"))?;
    e.encoding = enc;
    e.codec_id = id;
    e.offset = *pos;
    e.length = length;
    e.checksum = checksum;
    *pos += padded;
    Ok(length)
}

/// The file a rename is about to replace, opened so that the rename does not free its blocks:
/// ext4 frees a replaced file's blocks inside `rename` when nothing else holds it (5-6 ms for a
/// 19 MB checkpoint on the benchmark machine, the sixth of a save; a training loop that saves
/// over its last checkpoint pays it every time). [`release_in_background`] closes the handle
/// after the rename, which frees them then, off the caller's thread. None where there is no
/// such file (or it cannot be opened: the rename then frees it as before), and on other
/// systems, where an open file may not be replaceable.
fn hold_replaced(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    return File::open(path)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()));
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Closes a replaced file's handle on a short-lived thread (inline if none can be started).
fn release_in_background(file: Option<File>) {
    if let Some(f) = file {
        let _ = std::thread::Builder::new()
            .name("smaq-rs-release".into())
            .spawn(move || drop(f));
    }
}

/// Allocates the file's blocks for `len` bytes at `offset` before they are written. On ext4 (and
/// other delayed-allocation file systems) a file whose blocks are not yet allocated has them
/// allocated and written out synchronously when it is renamed over an existing file (the
/// `auto_da_alloc` safeguard for programs that do not fsync): 12-15 ms for a 19 MB checkpoint on
/// the benchmark machine, against 1 ms once allocated. A file system that cannot preallocate is
/// left to allocate as it writes (the error is ignored; a full disk fails the write itself).
fn preallocate(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    if let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        if n > 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on an open descriptor; it touches no memory of ours.
            let _ = unsafe { libc::fallocate(file.as_raw_fd(), 0, off, n) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{sample, tmpdir, write};
    use super::*;
    use crate::codec::Params;
    use crate::dtype::DType;

    /// Over an existing checkpoint, opens a writer of the sample entries, runs `f` on it and
    /// drops it unfinished: the target must be as it was, the temporary file gone.
    fn unfinished_writer(tag: &str, f: impl FnOnce(&mut Writer, &[Vec<u8>])) {
        let dir = tmpdir(tag);
        let path = dir.join("a.smaq");
        write(&path);
        let before = std::fs::read(&path).unwrap();
        let (specs, raws) = sample();
        let mut w = Writer::create(&path, specs, "{}".into()).unwrap();
        f(&mut w, &raws);
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dropped_writer_leaves_target_untouched() {
        unfinished_writer("drop", |w, raws| {
            w.write_batch(&[&raws[0]]).unwrap();
        });
    }

    /// Saving over an existing checkpoint replaces it; the handle held on the replaced file
    /// (so that the rename does not free its blocks) is closed soon after, off this thread.
    #[test]
    fn a_replaced_checkpoint_is_released() {
        let dir = tmpdir("replace");
        let path = dir.join("a.smaq");
        write(&path);
        let first = std::fs::read(&path).unwrap();
        let (specs, raws) = sample();
        let mut w = Writer::create(&path, specs, "{\"step\": 4}".into()).unwrap();
        let refs: Vec<&[u8]> = raws.iter().map(|r| r.as_slice()).collect();
        w.write_batch(&refs).unwrap();
        w.finish(false).unwrap();
        let second = std::fs::read(&path).unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        #[cfg(target_os = "linux")]
        {
            // No descriptor of this process still names the replaced (deleted) file.
            let held = || {
                std::fs::read_dir("/proc/self/fd")
                    .unwrap()
                    .flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .any(|l| l.to_string_lossy() == format!("{} (deleted)", path.display()))
            };
            let start = std::time::Instant::now();
            while held() {
                assert!(
                    start.elapsed().as_secs() < 10,
                    "the replaced file is still open"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An entry that fails to encode in the middle of a batch fails the batch with its own
    /// error, whatever the order the entries finish in; the target is left untouched, and the
    /// batch written again gives a checkpoint that reads back whole.
    #[test]
    fn a_failing_entry_fails_its_batch_with_its_error() {
        let bad = |w: &mut Writer, raws: &[Vec<u8>]| {
            let mut refs: Vec<&[u8]> = raws.iter().map(|r| r.as_slice()).collect();
            refs[1] = &refs[1][..8]; // "w.smaq" is declared with 5000 values
            let e = w.write_batch(&refs).unwrap_err();
            assert!(
                matches!(&e, Error::Layout(m) if m.contains("w.smaq")),
                "{e}"
            );
        };
        unfinished_writer("fail", bad);
        let dir = tmpdir("retry");
        let path = dir.join("a.smaq");
        let (specs, raws) = sample();
        let mut w = Writer::create(&path, specs, "{}".into()).unwrap();
        bad(&mut w, &raws);
        let refs: Vec<&[u8]> = raws.iter().map(|r| r.as_slice()).collect();
        w.write_batch(&refs).unwrap();
        w.finish(false).unwrap();
        let r = super::super::Reader::open(&path).unwrap();
        let lossless: Vec<u64> = r.read(0).unwrap();
        assert_eq!(
            bytemuck::cast_slice::<u64, u8>(&lossless)[..raws[0].len()],
            raws[0]
        );
        for i in 1..raws.len() {
            r.read(i).unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Packed entries that would not be smaller than their raw bytes are stored raw, under
    /// every codec; larger ones stay packed.
    #[test]
    fn packed_entries_no_smaller_than_raw_are_stored_raw() {
        let one = 1.5f32.to_le_bytes();
        let many: Vec<u8> = (0..4096)
            .flat_map(|i| ((i % 7) as f32 * 0.25).to_le_bytes())
            .collect();
        for codec in ["lossless", "smaq", "fp16"] {
            let spec = |shape: Vec<u64>| EntrySpec {
                name: "w".into(),
                dtype: DType::F32,
                shape,
                encoding: Encoding::Packed(codec.into(), Params::new()),
            };
            let (enc, id, bytes) = encode_entry(&spec(vec![]), &one).unwrap();
            assert_eq!(
                (enc, id, bytes.as_slice()),
                (ENC_RAW, 0, &one[..]),
                "{codec}"
            );
            let (enc, _, bytes) = encode_entry(&spec(vec![4096]), &many).unwrap();
            assert_eq!(enc, ENC_PACKED, "{codec}");
            assert!(bytes.len() < many.len(), "{codec}");
        }
    }
}

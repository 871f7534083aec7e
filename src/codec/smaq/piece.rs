//! The piece encoder of the fused optimizer step: a float32 tensor produced one chunk at a time
//! and never held whole is encoded from statistics gathered first (`stats::PieceStats`), each
//! chunk on its own, into the bytes a whole-tensor encode writes.

use super::encode::{encode_chunk, encode_chunk_raw, finish_encoding, ChunkOut};
use super::kernel::Prep;
use super::log::{log_stat_values, log_values};
use super::meta::Header;
use super::{Outliers, Rounding, SmaqConfig};
use crate::codec::Encoder;
use crate::error::{Error, Result};
use crate::rng::{fresh_seed, stream_key};
use crate::stats::{Sampling, Stats};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

/// Encodes a float32 tensor that is produced one chunk at a time and never held whole (the
/// fused optimizer step): the statistics come first (`stats::PieceStats`), then each chunk is
/// encoded on its own, in any order and on any thread, and [`PieceEncoder::finish`] assembles
/// them. The bytes are those [`Encoder::encode`] writes for the whole tensor when its
/// statistics are the same.
#[derive(Debug)]
pub struct PieceEncoder {
    head: Header,
    prep: Prep,
    numel: usize,
}

/// Scratch space a worker reuses across [`PieceEncoder::encode_piece`] calls.
#[derive(Debug, Default)]
pub struct PieceScratch {
    codes: Vec<u16>,
    logs: Vec<f32>,
}

impl PieceScratch {
    /// The log-domain values the last log-domain [`PieceEncoder::encode_piece`] coded (zeros
    /// as 0.0): where the piece has no zeros, the values [`SmaqConfig::stat_values`] gives,
    /// so the caller gathering statistics need not take the logarithms twice.
    pub fn logs(&self) -> &[f32] {
        &self.logs
    }
}

/// One chunk encoded by a [`PieceEncoder`] (its primary stream is in the [`PieceOutput`]).
pub struct EncodedPiece(ChunkOut);

/// The buffer a [`PieceEncoder`] writes: room for the header and metadata (zeroed), then every
/// chunk's primary stream, each chunk zeroing and writing its own in place (on the worker that
/// encodes it, while it is in cache: no serial memset of the whole buffer first).
pub struct PieceOutput {
    /// Its length is the zeroed head; the primary streams lie in the spare capacity after it
    /// until [`PieceEncoder::finish`] finds them all written.
    bytes: Vec<u8>,
    head: usize,
    primary: Vec<usize>,
    /// Per chunk: its primary stream has been initialized ([`Primary::bytes`]).
    written: Vec<AtomicBool>,
}

/// One chunk's primary stream in a [`PieceOutput`], not yet initialized.
pub struct Primary<'a> {
    bytes: &'a mut [MaybeUninit<u8>],
    written: &'a AtomicBool,
}

impl Primary<'_> {
    /// The stream's bytes, zeroed on the first call, to hand to [`PieceEncoder::encode_piece`].
    pub fn bytes(&mut self) -> &mut [u8] {
        if !self.written.load(Ordering::Relaxed) {
            crate::buf::zero_init(self.bytes);
            self.written.store(true, Ordering::Relaxed);
        }
        // SAFETY: initialized just above or by an earlier call (this Primary holds the only
        // reference to these bytes); MaybeUninit<u8> and u8 have the same layout.
        unsafe { &mut *(self.bytes as *mut [MaybeUninit<u8>] as *mut [u8]) }
    }
}

impl PieceOutput {
    /// Each chunk's primary stream, in chunk order, to hand to [`PieceEncoder::encode_piece`].
    pub fn primaries(&mut self) -> Vec<Primary<'_>> {
        let len = self.primary.iter().sum::<usize>();
        let mut rest = &mut self.bytes.spare_capacity_mut()[..len];
        let mut out = Vec::with_capacity(self.primary.len());
        for (&len, written) in self.primary.iter().zip(&self.written) {
            let (this, more) = rest.split_at_mut(len);
            out.push(Primary {
                bytes: this,
                written,
            });
            rest = more;
        }
        out
    }
}

impl SmaqConfig {
    /// A [`PieceEncoder`] for `numel` values with these statistics; None where the whole
    /// tensor is needed (fewer than `min_size` values: stored raw; sampled statistics).
    pub fn piece_encoder(&self, numel: usize, stats: Stats) -> Option<PieceEncoder> {
        if (numel as u64) < self.min_size as u64 || self.sampling != Sampling::Exact {
            return None;
        }
        let seed = self.seed.unwrap_or_else(fresh_seed);
        let head = Header {
            cfg: SmaqConfig {
                seed: Some(seed),
                ..self.clone()
            },
            mean: stats.mean,
            std: stats.std,
            clamped: 0,
            nonfinite: 0,
            raw: false,
            chunks: Vec::new(),
        };
        Some(PieceEncoder {
            prep: self.prep(stats),
            head,
            numel,
        })
    }

    /// The values this configuration's statistics are taken over, for one piece of a tensor
    /// (`stats::PieceStats`): `x` itself, or in the log domain the logarithms of its positive
    /// elements (in `buf`).
    pub fn stat_values<'a>(&self, x: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
        if self.log {
            log_stat_values(x, buf);
            buf
        } else {
            x
        }
    }
}

impl PieceEncoder {
    /// Values per chunk (the last may be shorter).
    pub fn piece_len(&self) -> usize {
        self.head.cfg.chunk_size as usize
    }

    /// Number of chunks.
    pub fn pieces(&self) -> usize {
        self.numel.div_ceil(self.piece_len())
    }

    /// The packed format version of the result.
    pub fn format_version(&self) -> u8 {
        self.head.cfg.format_version()
    }

    /// The buffer to encode into: `lead` bytes left to the caller, room for the metadata, every
    /// chunk's primary stream (zeroed by [`Primary::bytes`]), capacity for `tail` bytes beyond
    /// the rest. It comes from the cache of recycled buffers where it can (`crate::buf`), as a
    /// whole-tensor encode's does.
    pub fn output(&self, lead: usize, tail: usize) -> PieceOutput {
        let q = &self.prep.q;
        let cs = self.piece_len() as u64;
        let primary: Vec<usize> = (0..self.pieces() as u64)
            .map(|ci| q.chunk_bytes((self.numel as u64 - ci * cs).min(cs), 0).0 as usize)
            .collect();
        let head = lead + Header::len_for(primary.len(), self.escapes());
        let len = head + primary.iter().sum::<usize>();
        // Room for the other streams as encode_typed reserves it: appending does not reallocate.
        let room = self.numel * q.extra_bits() as usize / 8 + 2 * primary.len() + tail;
        // SAFETY: the closure initializes all `head` bytes. The primary streams stay in the
        // spare capacity (len - head more) until every chunk has written its own.
        let bytes = unsafe {
            crate::buf::init_with_tail(head, len - head + room, |b| {
                crate::buf::zero_init(b);
            })
        };
        PieceOutput {
            bytes,
            head,
            written: primary.iter().map(|_| AtomicBool::new(false)).collect(),
            primary,
        }
    }

    fn escapes(&self) -> bool {
        self.head.cfg.outliers == Outliers::Escape
    }

    /// Encodes chunk `ci`, whose values are `x` (exactly its length), its primary stream into
    /// `primary` (chunk `ci` of [`PieceOutput::primaries`]). `codes` is scratch space a worker
    /// reuses across chunks.
    pub fn encode_piece(
        &self,
        ci: usize,
        x: &[f32],
        primary: &mut [u8],
        scratch: &mut PieceScratch,
    ) -> Result<EncodedPiece> {
        let cs = self.piece_len();
        let want = self.numel.saturating_sub(ci.saturating_mul(cs)).min(cs);
        let q = &self.prep.q;
        if ci >= self.pieces()
            || x.len() != want
            || primary.len() as u64 != q.chunk_bytes(want as u64, 0).0
        {
            return Err(Error::Layout(format!(
                "piece {ci} of a {}-value tensor in pieces of {cs} has {want} values, got {} \
                 (and {} bytes for its primary stream)",
                self.numel,
                x.len(),
                primary.len()
            )));
        }
        let cfg = &self.head.cfg;
        let key = (cfg.rounding == Rounding::Stochastic)
            .then(|| stream_key(cfg.seed.unwrap_or(0), ci as u64));
        let p = Prep { key, ..self.prep };
        let PieceScratch { codes, logs } = scratch;
        Ok(EncodedPiece(if cfg.log {
            log_values(x, logs);
            encode_chunk_raw(&logs[..], x, &p, cfg, primary, codes, None)
        } else {
            encode_chunk(x, &p, cfg, primary, codes)
        }))
    }

    /// Completes the encoding in `out` from every chunk's [`EncodedPiece`] in chunk order;
    /// returns the buffer (laid out as [`Encoder::encode_framed`]'s) and the metadata length.
    pub fn finish(
        self,
        out: PieceOutput,
        pieces: Vec<EncodedPiece>,
        lead: usize,
    ) -> Result<(Vec<u8>, usize)> {
        let meta_len = Header::len_for(pieces.len(), self.escapes());
        if pieces.len() != self.pieces() || out.head != lead + meta_len {
            return Err(Error::Layout(format!(
                "{} pieces given, the tensor has {}; or the output was made for another lead",
                pieces.len(),
                self.pieces()
            )));
        }
        if !out.written.iter().all(|w| w.load(Ordering::Relaxed)) {
            return Err(Error::Layout(
                "a piece's primary stream was never written".into(),
            ));
        }
        let mut bytes = out.bytes;
        let len = out.head + out.primary.iter().sum::<usize>();
        // SAFETY: the head was zeroed in `output` and every primary stream, which together
        // fill [head, len) of the capacity, was initialized (checked just above).
        unsafe { bytes.set_len(len) };
        let chunks = pieces.into_iter().map(|p| p.0).collect();
        finish_encoding(self.head, chunks, &mut bytes, lead);
        Ok((bytes, meta_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dtype::Data;
    use crate::rng::normal_f32 as normal;
    use crate::stats::{mean_std, PieceStats, Spread};

    #[test]
    fn piece_encoder_writes_the_whole_tensor_encoding() {
        let mut x = normal(150_000, 14);
        x[3] = f32::NAN;
        x[4] = 40.0;
        let positive: Vec<f32> = x.iter().map(|v| (v * 2.0).exp() * 1e-6).collect();
        for (cfg, x) in [
            (
                SmaqConfig {
                    seed: Some(4),
                    log: true,
                    ..Default::default()
                },
                &positive,
            ),
            (
                SmaqConfig {
                    seed: Some(5),
                    ..Default::default()
                },
                &x,
            ),
            (
                SmaqConfig {
                    seed: Some(6),
                    rounding: Rounding::Nearest,
                    outliers: Outliers::Exact,
                    chunk_size: 4096,
                    ..Default::default()
                },
                &x,
            ),
        ] {
            let whole = cfg.encode(Data::F32(x)).unwrap();
            let mut ps = PieceStats::new();
            let mut buf = Vec::new();
            for c in x.chunks(PieceStats::BLOCK) {
                ps.add(cfg.stat_values(c, &mut buf));
            }
            let stats = ps.finish(cfg.spread);
            let enc = cfg.piece_encoder(x.len(), stats).unwrap();
            let cs = enc.piece_len();
            let mut codes = PieceScratch::default();
            let mut out = enc.output(3, 8);
            let mut prim = out.primaries();
            // Out of order on purpose: pieces are independent.
            let mut pieces: Vec<(usize, EncodedPiece)> = x
                .chunks(cs)
                .enumerate()
                .rev()
                .map(|(ci, c)| {
                    let p = enc.encode_piece(ci, c, prim[ci].bytes(), &mut codes);
                    (ci, p.unwrap())
                })
                .collect();
            pieces.sort_by_key(|p| p.0);
            assert!(enc
                .encode_piece(0, &x[..10], prim[0].bytes(), &mut codes)
                .is_err());
            drop(prim);
            let (bytes, meta_len) = enc
                .finish(out, pieces.into_iter().map(|p| p.1).collect(), 3)
                .unwrap();
            assert_eq!(&bytes[3..3 + meta_len], &whole.meta[..]);
            assert_eq!(&bytes[3 + meta_len..], &whole.payload[..]);
            // Pieces coded elsewhere leave the output's primary streams unwritten: refused.
            let enc = cfg.piece_encoder(x.len(), stats).unwrap();
            let mut out = enc.output(3, 8);
            let lens: Vec<usize> = out.primaries().iter_mut().map(|p| p.bytes.len()).collect();
            let elsewhere: Vec<EncodedPiece> = x
                .chunks(cs)
                .enumerate()
                .map(|(ci, c)| {
                    let mut buf = vec![0u8; lens[ci]];
                    enc.encode_piece(ci, c, &mut buf, &mut codes).unwrap()
                })
                .collect();
            assert!(enc.finish(out, elsewhere, 3).is_err());
        }
        let small = SmaqConfig::default();
        assert!(small
            .piece_encoder(4, mean_std(&x[..4], Sampling::Exact, Spread::Std))
            .is_none());
    }
}

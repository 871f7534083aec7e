//! The decoder: a parsed header (`meta`) and its chunk spans. Decoding is one table lookup per
//! element (`kernel::unpack`), one chunk per Rayon task, then the chunk's escapes (`escape`)
//! and exceptions are patched in; the fused optimizer decodes one chunk (piece) at a time.

use super::kernel;
use super::log::as_f32_mut;
use super::meta::{ChunkIndex, Header, Span};
use crate::codec::{Decoder, Param, Params};
use crate::dtype::{DType, DataMut, Element};
use crate::error::{ensure_format, Error, Result};
use crate::zmap::clamp;

/// A parsed, validated SmaQ header plus the chunk byte ranges it implies.
#[derive(Debug)]
pub(super) struct SmaqDecoder {
    pub(super) h: Header,
    pub(super) dtype: DType,
    pub(super) numel: u64,
    pub(super) spans: Vec<Span>,
    /// The float32 decode table, built on the first piece decoded into float32 (the optimizer
    /// decodes its state piece by piece; a log-domain table costs an exp per code).
    pub(super) lut_f32: std::sync::OnceLock<Vec<f32>>,
    /// The log domain's escaped values for the first residuals, before clamping: an escape
    /// costs an exp otherwise, and a piece-by-piece optimizer step decodes every escape twice.
    pub(super) escapes_log: std::sync::OnceLock<Vec<f64>>,
}

impl SmaqDecoder {
    /// Decodes the whole tensor; with `range`, every value clamped into it: the table's
    /// entries, the escapes and the exceptions are clamped, so no second pass is needed.
    fn decode_typed<T: Element>(
        &self,
        payload: &[u8],
        out: &mut [T],
        range: Option<[f64; 2]>,
    ) -> Result<()> {
        if self.h.raw {
            crate::dtype::fill_from_le_bytes(&mut T::wrap_mut(&mut *out), payload)?;
            if let Some(r) = range {
                crate::zmap::clamp_all(out, r);
            }
            return Ok(());
        }
        let q = self.h.cfg.quant();
        let mut lut = self.table::<T>(&q);
        if range.is_some() {
            lut.iter_mut().for_each(|v| *v = clamp(*v, range));
        }
        let cs = self.h.cfg.chunk_size as usize;
        let stream = crate::simd::stream_output(std::mem::size_of_val(out));
        crate::pool::try_for_each_chunk_mut(out, cs, |ci, dst| {
            self.decode_chunk(payload, &q, &lut, ci, dst, stream, range)
        })
    }

    fn check_output(&self, out: &DataMut<'_>) -> Result<()> {
        if out.dtype() != self.dtype || out.len() as u64 != self.numel {
            return Err(Error::Layout(format!(
                "output buffer is {} x {}, the tensor is {} x {}",
                out.len(),
                out.dtype().name(),
                self.numel,
                self.dtype.name()
            )));
        }
        Ok(())
    }

    /// The decoded value of every code (the log domain's values already exponentiated).
    fn table<T: Element>(&self, q: &kernel::Quant) -> Vec<T> {
        let h = &self.h;
        if h.cfg.log {
            kernel::table_log::<T>(q, h.mean, h.std)
        } else {
            kernel::table::<T>(q, h.mean, h.std, h.cfg.all_positive)
        }
    }

    /// Decodes chunk `ci` into `dst` (its length) with the value table `lut`; escapes and
    /// exceptions are clamped into `range` (the table already is).
    #[allow(clippy::too_many_arguments)]
    fn decode_chunk<T: Element>(
        &self,
        payload: &[u8],
        q: &kernel::Quant,
        lut: &[T],
        ci: usize,
        dst: &mut [T],
        stream: bool,
        range: Option<[f64; 2]>,
    ) -> Result<()> {
        let s = &self.spans[ci];
        let esize = 4 + T::DTYPE.size();
        let (primary, extra) = (&payload[s.primary.clone()], &payload[s.extra.clone()]);
        let exc = &payload[s.exceptions.clone()];
        let used = kernel::unpack(primary, extra, q, lut, dst, stream);
        ensure_format!(
            used == s.extra_bits,
            "smaq: chunk {ci} flags {} outliers, the index says {}",
            used / q.extra_bits().max(1) as u64,
            s.extra_bits / q.extra_bits().max(1) as u64
        );
        let n_escapes = self.h.chunks[ci].escapes;
        if n_escapes > 0 {
            let escapes = &payload[s.escapes.clone()];
            self.patch_escapes(escapes, primary, q, ci, n_escapes, dst, range)?;
        }
        let mut prev: Option<usize> = None;
        for e in exc.chunks_exact(esize) {
            let i = u32::from_le_bytes(e[..4].try_into().unwrap()) as usize;
            ensure_format!(
                i < dst.len() && prev.is_none_or(|p| i > p),
                "smaq: chunk {ci} exception index {i} is out of order or out of range"
            );
            let mut raw = [0u8; 8];
            raw[..esize - 4].copy_from_slice(&e[4..]);
            dst[i] = clamp(T::from_bits_u64(u64::from_le_bytes(raw)), range);
            prev = Some(i);
        }
        Ok(())
    }

    fn decode_piece_typed<T: Element>(
        &self,
        payload: &[u8],
        i: usize,
        out: &mut [T],
    ) -> Result<()> {
        let cs = self.h.cfg.chunk_size as usize;
        let n = self.numel as usize;
        let want = n.saturating_sub(i.saturating_mul(cs)).min(cs);
        if self.h.raw || i >= self.spans.len() || out.len() != want {
            return Err(Error::Layout(format!(
                "piece {i} of a {n}-value tensor in pieces of {cs} has {want} values, the \
                 buffer {}",
                out.len()
            )));
        }
        let q = self.h.cfg.quant();
        if let Some(out32) = as_f32_mut(out) {
            let lut = self.lut_f32.get_or_init(|| self.table::<f32>(&q));
            return self.decode_chunk(payload, &q, lut, i, out32, false, None);
        }
        let lut = self.table::<T>(&q);
        self.decode_chunk(payload, &q, &lut, i, out, false, None)
    }
}

impl Decoder for SmaqDecoder {
    fn params(&self) -> Params {
        self.h.cfg.to_params()
    }

    fn stats(&self) -> Params {
        let h = &self.h;
        let sum = |f: fn(&ChunkIndex) -> u32| h.chunks.iter().map(|c| f(c) as u64).sum::<u64>();
        let (outliers, exceptions, escapes) = (
            sum(|c| c.outliers),
            sum(|c| c.exceptions),
            sum(|c| c.escapes),
        );
        crate::codec::params::from_pairs([
            ("mean", Param::Float(h.mean)),
            ("std", Param::Float(h.std)),
            ("n_outliers", Param::Int(outliers as i64)),
            ("n_clamped", Param::Int(h.clamped as i64)),
            ("n_nonfinite", Param::Int(h.nonfinite as i64)),
            ("n_exceptions", Param::Int(exceptions as i64)),
            ("n_escapes", Param::Int(escapes as i64)),
            ("escape_bytes", Param::Int(sum(|c| c.escape_bytes) as i64)),
            ("n_chunks", Param::Int(h.chunks.len() as i64)),
            ("stored_raw", Param::Bool(h.raw)),
        ])
    }

    fn decode(&self, payload: &[u8], out: DataMut<'_>) -> Result<()> {
        self.check_output(&out)?;
        crate::dispatch!(DataMut, out, |o| self.decode_typed(payload, o, None))
    }

    fn decode_clamped(&self, payload: &[u8], range: [f64; 2], out: DataMut<'_>) -> Result<()> {
        self.check_output(&out)?;
        crate::dispatch!(DataMut, out, |o| self.decode_typed(payload, o, Some(range)))
    }

    fn piece_len(&self) -> Option<usize> {
        (!self.h.raw).then_some(self.h.cfg.chunk_size as usize)
    }

    fn decode_piece(&self, payload: &[u8], i: usize, out: DataMut<'_>) -> Result<()> {
        if out.dtype() != self.dtype {
            return Err(Error::Layout(format!(
                "output buffer is {}, the tensor is {}",
                out.dtype().name(),
                self.dtype.name()
            )));
        }
        crate::dispatch!(DataMut, out, |o| self.decode_piece_typed(payload, i, o))
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::smaq::{round_trip, SmaqConfig};
    use crate::rng::normal_f32 as normal;

    #[test]
    fn all_positive_never_decodes_negative() {
        let x: Vec<f32> = normal(50_000, 6).iter().map(|v| v * v * 1e-6).collect();
        let cfg = SmaqConfig {
            all_positive: true,
            ..Default::default()
        };
        let (y, _, _) = round_trip(&cfg, &x);
        assert!(y.iter().all(|&v| v >= 0.0));
    }

    /// The clamped decode (table, escapes and exceptions clamped) gives what a plain decode
    /// followed by a clamp of every value gives, bit for bit: heavy tails (escapes), NaN and
    /// infinities (exceptions), the log domain, half types and tiny (raw) tensors.
    #[test]
    fn clamped_decode_is_decode_then_clamp() {
        use crate::codec::{Decoder, Encoder, Frame};
        use crate::dtype::Element;
        use half::{bf16, f16};

        fn check<T: Element>(cfg: &SmaqConfig, x: &[T]) {
            let enc = cfg.encode(T::wrap(x)).unwrap();
            let payload = enc.payload;
            let frame = Frame {
                version: crate::format::VERSION,
                dtype: T::DTYPE,
                numel: x.len() as u64,
                payload_len: payload.len() as u64,
            };
            let dec = super::SmaqDecoder::parse(&enc.meta, frame).unwrap();
            let vals: Vec<f64> = x
                .iter()
                .map(|v| v.to_f64())
                .filter(|v| !v.is_nan())
                .collect();
            let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            for range in [[lo, hi], [lo * 0.5, hi * 0.25], [0.0, hi]] {
                let mut a = vec![T::from_f64(0.0); x.len()];
                dec.decode(&payload, T::wrap_mut(&mut a)).unwrap();
                crate::zmap::clamp_all(&mut a, range);
                let mut b = vec![T::from_f64(7.0); x.len()];
                dec.decode_clamped(&payload, range, T::wrap_mut(&mut b))
                    .unwrap();
                let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "range {range:?}, {} values", x.len());
            }
        }
        let mut x = normal(200_000, 11);
        for (i, v) in x.iter_mut().enumerate().step_by(997) {
            *v *= if i % 2 == 0 { 40.0 } else { -25.0 };
        }
        x[5] = f32::NAN;
        x[6] = f32::INFINITY;
        x[7] = f32::NEG_INFINITY;
        let plain = SmaqConfig::default();
        check(&plain, &x);
        check(&plain, &x[..3]);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        check(&plain, &xh);
        check(&plain, &xb);
        let pos: Vec<f32> = x.iter().map(|v| v * v + 1e-6).collect();
        let log = SmaqConfig {
            log: true,
            ..Default::default()
        };
        check(&log, &pos);
    }

    #[test]
    fn small_tensors_are_raw() {
        let x = [1.5f32, -2.0, f32::NAN];
        let (y, h, payload) = round_trip(&SmaqConfig::default(), &x);
        assert!(h.h.raw);
        assert_eq!(payload, 12);
        assert_eq!(y[..2], x[..2]);
        assert!(y[2].is_nan());
    }
}

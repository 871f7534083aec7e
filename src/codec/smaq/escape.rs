//! The escape stream (`outliers="escape"`, format version 2), both directions: a value beyond
//! `t_outlier` keeps the code its outlier grid gives it, so one whose magnitude goes past the
//! saturated outlier code is written to its chunk's escape stream ([`write_escapes`]: its gap
//! from the previous escape and its residual on the finer [`EscapeGrid`], both as
//! exponential-Golomb codes), and the decoder writes it back over the saturated code
//! (`SmaqDecoder::patch_escapes`).

use super::decode::SmaqDecoder;
use super::kernel::{self, Prep};
use crate::bits::get_exp_golomb;
use crate::dtype::Element;
use crate::error::{ensure_format, Error, Result};

/// Largest residual the escape stream holds; a value further out goes to the exception list.
const MAX_RESIDUAL: f64 = (1u64 << 31) as f64;

/// How many steps of the escape grid beyond the saturated outlier magnitude the code of
/// |z| = `a` (> t_outlier) lies: `round((a - t_main) * scale) - base` ([`EscapeGrid`]), rounded
/// as configured (stochastic rounding draws from the chunk's stream at element `i`). None when
/// it is too far out for the escape stream.
pub(super) fn escape_residual(a: f64, i: u32, p: &Prep, g: &EscapeGrid) -> Option<u32> {
    let u = match p.key {
        Some(key) => crate::rng::uniform(key, i) as f64,
        None => p.dither as f64,
    };
    // Non-negative (a > t_main, u >= 0): truncation is the floor, one instruction where
    // `floor` is a libm call on baseline x86-64; beyond 2^64 it saturates, still too far out.
    let code = ((a - g.t_main) * g.scale + u) as u64 as f64;
    let r = (code - g.base).max(0.0);
    (r < MAX_RESIDUAL).then_some(r as u32)
}

/// The scalar handling of one escape candidate: its index and the chunk's escape tail.
pub(super) type Slow<'a> = dyn FnMut(u32, &mut Vec<(u32, u32)>) + 'a;

/// Sorts the escape candidates `cands` (indices into `x`, ascending) of one chunk coded
/// with `outliers="escape"`: each finite, non-zero value beyond `t_out` whose residual
/// ([`escape_residual`]) is at least 1 goes to `tail` as `(i, residual - 1)`; one at residual 0
/// keeps its saturated code. Eight candidates at a time where the CPU has AVX-512 (float32
/// gathered, other types read one by one; the same f64 arithmetic as the scalar path, bit for
/// bit); a group holding a non-finite value or a
/// residual too far out for the stream goes lane by lane, in order, through `slow`, as does
/// everything on other CPUs.
pub(super) fn sort_candidates<T: Element>(
    x: &[T],
    cands: &[u32],
    p: &Prep,
    g: &EscapeGrid,
    t_out: f64,
    tail: &mut Vec<(u32, u32)>,
    slow: &mut Slow<'_>,
) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() && cands.iter().all(|&i| (i as usize) < x.len()) {
        // SAFETY: AVX-512 F, BW, DQ and VL are present; every index is inside `x`.
        done = unsafe { sort_candidates_avx512(x, cands, p, g, t_out, tail, slow) };
    }
    for &i in &cands[done..] {
        slow(i, tail);
    }
}

/// [`sort_candidates`] in groups of eight; returns how many candidates it took (the rest, fewer
/// than eight, are the caller's).
///
/// # Safety
/// The CPU has AVX-512 F, BW, DQ and VL; every index in `cands` is inside `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn sort_candidates_avx512<T: Element>(
    x: &[T],
    cands: &[u32],
    p: &Prep,
    g: &EscapeGrid,
    t_out: f64,
    tail: &mut Vec<(u32, u32)>,
    slow: &mut Slow<'_>,
) -> usize {
    use std::arch::x86_64::*;
    let full = cands.len() / 8 * 8;
    let (mean, inv_std) = (_mm512_set1_pd(p.mean), _mm512_set1_pd(p.inv_std));
    let (t_main, scale, base) = (
        _mm512_set1_pd(g.t_main),
        _mm512_set1_pd(g.scale),
        _mm512_set1_pd(g.base),
    );
    let (zero, t_out, max_r) = (
        _mm512_setzero_pd(),
        _mm512_set1_pd(t_out),
        _mm512_set1_pd(MAX_RESIDUAL),
    );
    let dither = _mm512_set1_pd(p.dither as f64);
    let key = _mm256_set1_epi32(p.key.unwrap_or(0) as i32);
    let xf = super::log::as_f32(x);
    let mut i = 0;
    while i < full {
        // SAFETY: eight indices at i, i + 8 <= cands.len().
        let idx = unsafe { _mm256_loadu_si256(cands.as_ptr().add(i) as *const __m256i) };
        let f = match xf {
            // SAFETY: every index is inside `x` (the caller's contract).
            Some(xf) => _mm512_cvtps_pd(unsafe { _mm256_i32gather_ps::<4>(xf.as_ptr(), idx) }),
            // Other element types one value at a time, exactly as the scalar path widens them.
            None => {
                let mut v = [0f64; 8];
                for (k, v) in v.iter_mut().enumerate() {
                    // SAFETY: as above.
                    *v = unsafe { x.get_unchecked(cands[i + k] as usize) }.to_f64();
                }
                // SAFETY: eight f64.
                unsafe { _mm512_loadu_pd(v.as_ptr()) }
            }
        };
        // QNaN, +Inf, -Inf, SNaN: such a group goes lane by lane.
        let special = _mm512_fpclass_pd_mask::<0x99>(f);
        // |z| = |(f - mean) * inv_std|, as `encode_chunk_raw` computes it.
        let a = _mm512_abs_pd(_mm512_mul_pd(_mm512_sub_pd(f, mean), inv_std));
        let beyond =
            _mm512_cmp_pd_mask::<_CMP_NEQ_OQ>(f, zero) & _mm512_cmp_pd_mask::<_CMP_GT_OQ>(a, t_out);
        let u = if p.key.is_some() {
            // SAFETY: AVX2 is present (AVX-512 F is).
            _mm512_cvtps_pd(unsafe { crate::rng::uniform8(key, idx) })
        } else {
            dither
        };
        // escape_residual: floor((a - t_main) * scale + u) as a truncation, minus base, >= 0.
        let code = _mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(a, t_main), scale), u);
        let code = _mm512_cvtepu64_pd(_mm512_cvttpd_epu64(code));
        let r = _mm512_max_pd(_mm512_sub_pd(code, base), zero);
        let far = beyond & _mm512_cmp_pd_mask::<_CMP_GE_OQ>(r, max_r);
        if special != 0 || far != 0 {
            for k in 0..8 {
                slow(cands[i + k], tail);
            }
        } else {
            let r32 = _mm512_cvttpd_epu32(r);
            let esc = beyond & _mm512_cmp_pd_mask::<_CMP_GT_OQ>(r, zero);
            let (mut is, mut rs) = ([0u32; 8], [0u32; 8]);
            // SAFETY: both arrays hold eight u32.
            unsafe {
                _mm256_storeu_si256(is.as_mut_ptr() as *mut __m256i, idx);
                _mm256_storeu_si256(rs.as_mut_ptr() as *mut __m256i, r32);
            }
            for k in 0..8 {
                if esc >> k & 1 == 1 {
                    tail.push((is[k], rs[k] - 1));
                }
            }
        }
        i += 8;
    }
    full
}

/// The grid of escaped values: the outlier grid past its end, `2^escape_bits` times finer. An
/// escape with residual `r` stands for `|z| = t_main + (base + 1 + r) / scale`.
pub(super) struct EscapeGrid {
    t_main: f64,
    scale: f64,
    base: f64,
}

impl EscapeGrid {
    pub(super) fn new(q: &kernel::Quant, escape_bits: u8) -> Self {
        let fine = (1u32 << escape_bits) as f64;
        EscapeGrid {
            t_main: q.t_main as f64,
            scale: q.r_out as f64 * fine,
            base: q.max_out as f64 * fine,
        }
    }

    fn z(&self, r: u32) -> f64 {
        self.t_main + (self.base + 1.0 + r as f64) / self.scale
    }
}

/// The order of exponential-Golomb code that codes `values` in the fewest bits, and those bits.
/// The best order lies near log2 of the mean value; the orders within two of it are costed
/// exactly (in one pass), and of equal costs the lowest order wins.
fn best_order(values: &[u32]) -> (u32, u64) {
    let mean = values.iter().map(|&v| v as u64).sum::<u64>() / values.len().max(1) as u64;
    let centre = 63 - (mean + 1).leading_zeros();
    let (lo, hi) = (centre.saturating_sub(2), (centre + 2).min(31));
    let costs = order_costs(values, lo, hi);
    (lo..=hi)
        .map(|k| (k, costs[(k - lo) as usize]))
        .min_by_key(|&(_, c)| c)
        .unwrap_or((0, 0))
}

/// Bits [`crate::bits::put_exp_golomb`] takes for all of `values` at each order of `lo..=hi` (at most five
/// orders; entry `k - lo`), in one pass over them.
fn order_costs(values: &[u32], lo: u32, hi: u32) -> [u64; 5] {
    assert!(lo <= hi && hi - lo < 5 && hi <= 31);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_cd() {
        // SAFETY: AVX-512 F and CD are present (checked just above).
        return unsafe { order_costs_avx512(values, lo, hi) };
    }
    let mut c = [0u64; 5];
    for &v in values {
        for (j, k) in (lo..=hi).enumerate() {
            c[j] += crate::bits::exp_golomb_len(v, k) as u64;
        }
    }
    c
}

/// [`order_costs`] eight values at a time: `len = 127 - k - 2 * lzcnt64(v + 2^k)`.
///
/// # Safety
/// The CPU has AVX-512 F and CD; `lo <= hi <= 31`, `hi - lo < 5`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512cd")]
unsafe fn order_costs_avx512(values: &[u32], lo: u32, hi: u32) -> [u64; 5] {
    use std::arch::x86_64::*;
    let orders = (hi - lo + 1) as usize;
    let mut acc = [_mm512_setzero_si512(); 5];
    let full = values.len() / 8 * 8;
    let mut i = 0;
    while i < full {
        // SAFETY: eight u32 at i, i + 8 <= values.len().
        let v = _mm512_cvtepu32_epi64(unsafe {
            _mm256_loadu_si256(values.as_ptr().add(i) as *const __m256i)
        });
        for (j, a) in acc.iter_mut().enumerate().take(orders) {
            let k = lo as i64 + j as i64;
            let lz = _mm512_lzcnt_epi64(_mm512_add_epi64(v, _mm512_set1_epi64(1 << k)));
            let len = _mm512_sub_epi64(_mm512_set1_epi64(127 - k), _mm512_slli_epi64::<1>(lz));
            *a = _mm512_add_epi64(*a, len);
        }
        i += 8;
    }
    let mut c = [0u64; 5];
    for j in 0..orders {
        c[j] = _mm512_reduce_add_epi64(acc[j]) as u64;
        for &v in &values[full..] {
            c[j] += crate::bits::exp_golomb_len(v, lo + j as u32) as u64;
        }
    }
    c
}

/// One chunk's escape stream: two bytes (the exponential-Golomb orders of the gaps and of the
/// residuals), then per escape the gap from the previous escape's index (the first counts from
/// -1) and the residual beyond the saturated code minus one.
pub(super) fn write_escapes(tail: &[(u32, u32)]) -> Vec<u8> {
    let (gaps, residuals) = gaps_and_residuals(tail);
    let ((k_gap, gap_bits), (k_res, res_bits)) = (best_order(&gaps), best_order(&residuals));
    // The bits as `BitWriter` and `put_exp_golomb` (crate::bits) lay them out (LSB first), with
    // the pending bits in a register: each code is stored whole (one unaligned 64-bit store of
    // the register, never read back), then the whole bytes are dropped from the register. A
    // store past the end writes at most 8 bytes beyond the last whole byte: slack for them.
    let mut out = vec![0u8; 2 + (gap_bits + res_bits).div_ceil(8) as usize + 8];
    out[0] = k_gap as u8;
    out[1] = k_res as u8;
    let end = put_escapes(&mut out, &gaps, &residuals, k_gap, k_res);
    out.truncate(end);
    out
}

crate::simd::multiversion!(
    /// The codes of [`write_escapes`] from byte 2 of `out` on; returns the end of the last
    /// whole or partial byte. Shift-bound: BMI2's shifts and LZCNT where the CPU has them.
    fn put_escapes(out: &mut [u8], gaps: &[u32], residuals: &[u32], k_gap: u32, k_res: u32)
        -> usize = put_escapes_portable
    {
        let mut w = Bits {
            out,
            at: 2,
            acc: 0,
            n: 0,
        };
        for (&g, &r) in gaps.iter().zip(residuals) {
            let (cg, lg) = crate::bits::exp_golomb_code(g, k_gap);
            let (cr, lr) = crate::bits::exp_golomb_code(r, k_res);
            if lg + lr <= 56 {
                // Both codes in one store (the usual case: both are short).
                w.put(cg | cr << lg, lg + lr);
            } else {
                w.exp_golomb(g, k_gap);
                w.exp_golomb(r, k_res);
            }
        }
        w.at + w.n.div_ceil(8) as usize
    }
);

/// The gaps between the escapes' indices (the first from -1) and their residuals.
fn gaps_and_residuals(tail: &[(u32, u32)]) -> (Vec<u32>, Vec<u32>) {
    let mut prev = -1i64;
    tail.iter()
        .map(|&(i, r)| {
            let g = (i as i64 - prev - 1) as u32;
            prev = i as i64;
            (g, r)
        })
        .unzip()
}

/// The escape stream's bit writer: bits from byte `at` on, `n` (< 8) of them pending in `acc`.
struct Bits<'a> {
    out: &'a mut [u8],
    at: usize,
    acc: u64,
    n: u32,
}

impl Bits<'_> {
    /// Appends the low `len` (<= 56) bits of `code` (the bits above are zero).
    #[inline(always)]
    fn put(&mut self, code: u64, len: u32) {
        self.acc |= code << self.n;
        self.n += len;
        let word: &mut [u8; 8] = (&mut self.out[self.at..self.at + 8])
            .try_into()
            .expect("8 bytes of slack");
        *word = self.acc.to_le_bytes();
        let whole = self.n / 8;
        self.at += whole as usize;
        // whole <= 7: n < 8 + 56.
        self.acc >>= 8 * whole;
        self.n -= 8 * whole;
    }

    /// Appends the [`crate::bits::put_exp_golomb`] code of `v` at order `k`.
    #[inline(always)]
    fn exp_golomb(&mut self, v: u32, k: u32) {
        let [(a, la), (b, lb)] = crate::bits::exp_golomb_runs(v, k, 56);
        self.put(a, la);
        if lb > 0 {
            self.put(b, lb);
        }
    }
}

/// Residuals whose log-domain escaped values a decoder keeps, per sign.
const LOG_CACHED: u32 = 64;

impl SmaqDecoder {
    /// Writes the escaped values of chunk `ci` (see [`write_escapes`]) over their saturated
    /// outlier codes in `dst`, clamped into `range` where given; their signs are the codes'
    /// sign bits in `primary`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn patch_escapes<T: Element>(
        &self,
        stream: &[u8],
        primary: &[u8],
        q: &kernel::Quant,
        ci: usize,
        n: u32,
        dst: &mut [T],
        range: Option<[f64; 2]>,
    ) -> Result<()> {
        let bad = || Error::Format(format!("smaq: chunk {ci}: escape stream is corrupt"));
        let (k_gap, k_res) = (stream[0] as u32, stream[1] as u32);
        ensure_format!(
            k_gap <= 31 && k_res <= 31,
            "smaq: chunk {ci}: escape code orders {k_gap}, {k_res} exceed 31"
        );
        let bits = &stream[2..];
        let (mean, std) = (self.h.mean, self.h.std);
        let floor = if self.h.cfg.all_positive {
            0.0
        } else {
            -T::MAX_F64
        };
        let grid = EscapeGrid::new(q, self.h.cfg.escape_bits);
        let log = self.h.cfg.log;
        // exp(mean + z * std) for the residuals below LOG_CACHED, positive then negative.
        let cached: &[f64] = if log {
            let grid = &grid;
            self.escapes_log.get_or_init(|| {
                [1.0, -1.0]
                    .into_iter()
                    .flat_map(|sign| {
                        (0..LOG_CACHED).map(move |r| (mean + sign * grid.z(r) * std).exp())
                    })
                    .collect()
            })
        } else {
            &[]
        };
        let bm = q.bits_main as usize;
        let mut pos = 0usize;
        let mut next = 0usize;
        for _ in 0..n {
            let gap = get_exp_golomb(bits, &mut pos, k_gap).ok_or_else(bad)? as usize;
            let r = get_exp_golomb(bits, &mut pos, k_res).ok_or_else(bad)?;
            let i = next + gap;
            ensure_format!(
                i < dst.len(),
                "smaq: chunk {ci}: escape at index {i} is out of range ({} values)",
                dst.len()
            );
            let negative = crate::bits::get(primary, i * bm + 1, 1) == 1;
            let hit = (r < LOG_CACHED)
                .then(|| cached.get((r + negative as u32 * LOG_CACHED) as usize))
                .flatten();
            let v = match hit {
                Some(&v) => v,
                None => {
                    let z = grid.z(r);
                    let v = mean + if negative { -z } else { z } * std;
                    if log {
                        v.exp()
                    } else {
                        v
                    }
                }
            };
            dst[i] = crate::zmap::clamp(T::from_f64(v.clamp(floor, T::MAX_F64)), range);
            next = i + 1;
        }
        ensure_format!(
            pos.div_ceil(8) == bits.len(),
            "smaq: chunk {ci}: escape stream has {} bytes, its codes take {}",
            bits.len(),
            pos.div_ceil(8)
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::smaq::{round_trip, Rounding, SmaqConfig};
    use crate::codec::{Decoder, Encoder, Frame};
    use crate::dtype::{Data, DataMut};
    use crate::rng::normal_f32 as normal;

    /// The vectorized candidate pass sorts every candidate as the scalar test does: escapes with
    /// their residuals, residual 0 kept, non-zero values inside `t_outlier` skipped, zeros, NaN,
    /// infinities and values too far out for the stream handed to the scalar path, in order;
    /// stochastic, nearest and truncating rounding; float32, bfloat16 and float16.
    #[test]
    fn candidate_pass_matches_the_scalar_test() {
        let mut x = normal(5003, 21);
        for (k, v) in x.iter_mut().enumerate() {
            match k % 97 {
                0 => *v = 0.0,
                1 => *v = -0.0,
                2 if k % 3 == 0 => *v = f32::NAN,
                3 if k % 5 == 0 => *v = f32::INFINITY,
                4 if k % 7 == 0 => *v = -3e30,
                5 => *v *= 40.0,
                _ => {}
            }
        }
        let cfg = SmaqConfig::default();
        let q = cfg.quant();
        let grid = EscapeGrid::new(&q, cfg.escape_bits);
        let t_out = q.t_outlier as f64;
        let (mean, inv_std) = (0.013, 1.0 / 0.97);
        // Values whose code lands a quarter step past the saturated one: residual 0 unless the
        // rounding carries them to the next step.
        let at_saturation = (grid.t_main + (grid.base + 0.25) / grid.scale) / inv_std + mean;
        assert!(at_saturation > t_out / inv_std + mean);
        for (k, v) in x.iter_mut().enumerate().filter(|(k, _)| k % 97 == 6) {
            *v = if k % 2 == 0 { 1.0 } else { -1.0 } * at_saturation as f32;
        }
        let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        candidates_against_scalar(&x, mean, inv_std);
        candidates_against_scalar(&b, mean, inv_std);
        candidates_against_scalar(&h, mean, inv_std);
    }

    /// One element type of the test above.
    fn candidates_against_scalar<T: Element>(x: &[T], mean: f64, inv_std: f64) {
        let cfg = SmaqConfig::default();
        let q = cfg.quant();
        let grid = EscapeGrid::new(&q, cfg.escape_bits);
        let t_out = q.t_outlier as f64;
        // Every value beyond 2 std, zeros and specials: some inside t_outlier on purpose.
        let cands: Vec<u32> = (0..x.len() as u32)
            .filter(|&i| {
                let v = x[i as usize].to_f64();
                !v.is_finite() || v == 0.0 || v.abs() > 2.0
            })
            .collect();
        for (key, dither) in [(Some(0x9e37_79b9u32), 0.0f32), (None, 0.5), (None, 0.0)] {
            let p = Prep {
                q,
                mean,
                inv_std,
                key,
                dither,
                f32_ok: true,
            };
            let scalar = |i: u32, tail: &mut Vec<(u32, u32)>, exc: &mut Vec<u32>| {
                let f = x[i as usize].to_f64();
                if !f.is_finite() {
                    return exc.push(i);
                }
                let a = ((f - p.mean) * p.inv_std).abs();
                if f == 0.0 || a <= t_out {
                    return;
                }
                match escape_residual(a, i, &p, &grid) {
                    Some(0) => {}
                    Some(r) => tail.push((i, r - 1)),
                    None => exc.push(i),
                }
            };
            let (mut want, mut want_exc) = (Vec::new(), Vec::new());
            for &i in &cands {
                scalar(i, &mut want, &mut want_exc);
            }
            let (mut got, mut got_exc) = (Vec::new(), Vec::new());
            sort_candidates(x, &cands, &p, &grid, t_out, &mut got, &mut |i, t| {
                scalar(i, t, &mut got_exc)
            });
            assert_eq!(got, want, "{:?} key {key:?} dither {dither}", T::DTYPE);
            assert_eq!(got_exc, want_exc);
            assert!(want.len() > 50 && !want_exc.is_empty() && want.iter().any(|e| e.1 > 0));
        }
    }

    /// The escape stream's bits are those of `BitWriter` and `put_exp_golomb`, for small and
    /// large gaps and residuals (codes longer than one 64-bit store included).
    #[test]
    fn escape_stream_bits_match_the_bit_writer() {
        use crate::bits::{put_exp_golomb, BitWriter};
        let mut r = crate::rng::SplitMix64::new(3);
        for n in [1usize, 2, 5, 64, 999] {
            for spread in [3u64, 1 << 12, 1 << 31] {
                let mut at = 0u32;
                let tail: Vec<(u32, u32)> = (0..n)
                    .map(|_| {
                        at += 1 + (r.next_u64() % spread.min(1 << 20)) as u32;
                        (at, (r.next_u64() % spread) as u32)
                    })
                    .collect();
                let got = write_escapes(&tail);
                let (gaps, res) = gaps_and_residuals(&tail);
                let (kg, kr) = (got[0] as u32, got[1] as u32);
                assert_eq!((kg, kr), (best_order(&gaps).0, best_order(&res).0));
                let mut w = BitWriter::with_capacity_bits(64);
                w.put(kg, 8);
                w.put(kr, 8);
                for (&g, &v) in gaps.iter().zip(&res) {
                    put_exp_golomb(&mut w, g, kg);
                    put_exp_golomb(&mut w, v, kr);
                }
                assert_eq!(got, w.finish(), "n {n} spread {spread}");
                // The baseline build of the coding loop writes the same bytes.
                let mut plain = vec![0u8; got.len() + 8];
                plain[..2].copy_from_slice(&got[..2]);
                let end = put_escapes_portable(&mut plain, &gaps, &res, kg, kr);
                assert_eq!(&plain[..end], &got[..], "n {n} spread {spread}");
            }
        }
        // Order 0 and residuals near 2^31: codes of 63 bits, written in two stores.
        let tail = [(0u32, (1u32 << 31) - 1), (1, 0), (2, (1 << 31) - 2)];
        let got = write_escapes(&tail);
        let (bits, mut p) = (&got[2..], 0usize);
        for &(_, v) in &tail {
            assert_eq!(get_exp_golomb(bits, &mut p, got[0] as u32), Some(0));
            assert_eq!(get_exp_golomb(bits, &mut p, got[1] as u32), Some(v));
        }
        assert_eq!(p.div_ceil(8), bits.len());
    }

    /// The one-pass costs (every kernel level) equal the code lengths summed order by order,
    /// and the order chosen is the cheapest, the lowest of equals.
    #[test]
    fn order_costs_are_exact_at_every_level() {
        let mut r = crate::rng::SplitMix64::new(17);
        for n in [0usize, 1, 7, 8, 9, 100, 1003] {
            for shape in 0..4 {
                let v: Vec<u32> = (0..n)
                    .map(|_| {
                        let x = r.next_u64();
                        match shape {
                            0 => (x % 7) as u32,
                            1 => (x % 5000) as u32,
                            2 => (x >> 33) as u32,
                            _ => u32::MAX - (x % 3) as u32,
                        }
                    })
                    .collect();
                for lo in [0u32, 3, 27] {
                    let hi = (lo + 4).min(31);
                    let want: Vec<u64> = (lo..=hi)
                        .map(|k| {
                            v.iter()
                                .map(|&x| crate::bits::exp_golomb_len(x, k) as u64)
                                .sum()
                        })
                        .collect();
                    assert_eq!(&order_costs(&v, lo, hi)[..want.len()], &want[..]);
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::avx512_cd() {
                        // SAFETY: checked just above.
                        let simd = unsafe { order_costs_avx512(&v, lo, hi) };
                        assert_eq!(
                            &simd[..want.len()],
                            &want[..],
                            "n {n} shape {shape} lo {lo}"
                        );
                    }
                }
                let (k, bits) = best_order(&v);
                let cost = |k| {
                    v.iter()
                        .map(|&x| crate::bits::exp_golomb_len(x, k) as u64)
                        .sum()
                };
                let c: u64 = cost(k);
                assert_eq!(bits, c);
                let mean = v.iter().map(|&x| x as u64).sum::<u64>() / n.max(1) as u64;
                let centre = 63 - (mean + 1).leading_zeros();
                for j in centre.saturating_sub(2)..=(centre + 2).min(31) {
                    assert!(
                        cost(j) > c || (cost(j) == c && j >= k),
                        "order {j} beats {k}"
                    );
                }
            }
        }
    }

    /// The research algorithm (never clamps), in f64, nearest rounding: the value each element
    /// must decode to.
    fn research_nearest(x: &[f32], q: &kernel::Quant, mean: f64, std: f64) -> Vec<f64> {
        x.iter()
            .map(|&v| {
                let z = (v as f64 - mean) / std;
                let a = z.abs();
                let (t, r) = if a <= q.t_main as f64 {
                    (0.0, q.r_main as f64)
                } else {
                    (q.t_main as f64, q.r_out as f64)
                };
                let m = ((a - t) * r + 0.5).floor() / r + t;
                mean + z.signum() * m * std
            })
            .collect()
    }

    #[test]
    fn escaped_tails_decode_on_the_research_grid() {
        // Heavy tails: a Student-t-like mix with values up to ~10^4 std.
        let mut x = normal(200_000, 11);
        for (i, v) in x.iter_mut().enumerate() {
            if i % 37 == 0 {
                *v *= 25.0;
            }
            if i % 1001 == 0 {
                *v *= 100.0;
            }
        }
        x[5] = 2.0e3;
        x[6] = -2.0e3;
        // escape_bits 0: exactly the research grid.
        let cfg = SmaqConfig {
            rounding: Rounding::Nearest,
            chunk_size: 4096,
            escape_bits: 0,
            ..Default::default()
        };
        let (y, h, _) = round_trip(&cfg, &x);
        assert_eq!(h.h.clamped, 0);
        let escapes: u64 = h.h.chunks.iter().map(|c| c.escapes as u64).sum();
        assert!(escapes > 1000, "{escapes} escapes");
        let q = cfg.quant();
        let want = research_nearest(&x, &q, h.h.mean, h.h.std);
        for (i, (&a, &b)) in want.iter().zip(&y).enumerate() {
            let tol = 1e-6 * a.abs().max(h.h.std);
            assert!(
                (a - b as f64).abs() <= tol,
                "element {i}: research {a}, decoded {b} (input {})",
                x[i]
            );
        }
        // The default finer escape grid: values beyond t_outlier within half a fine step.
        let fine = SmaqConfig {
            escape_bits: 3,
            ..cfg
        };
        let (y, h, _) = round_trip(&fine, &x);
        let half = h.h.std / (2.0 * q.r_out as f64 * 8.0);
        let mut seen = 0;
        for (&a, &b) in x.iter().zip(&y) {
            if ((a as f64 - h.h.mean) / h.h.std).abs() > q.t_outlier as f64 {
                let err = (a as f64 - b as f64).abs();
                assert!(err <= half * 1.001 + 1e-6 * (a as f64).abs(), "{a} -> {b}");
                seen += 1;
            }
        }
        assert!(seen > 1000);
    }

    /// The log domain's cached escaped values are the bits the exp gives: a tensor with
    /// residuals below and above the cached ones decodes the same with the cache and without.
    #[test]
    fn cached_log_escapes_equal_computed_ones() {
        let mut x: Vec<f32> = normal(100_000, 17)
            .iter()
            .map(|v| (v * 1.5).exp() * 1e-6)
            .collect();
        for (i, v) in x.iter_mut().enumerate() {
            if i % 53 == 0 {
                *v *= 1e3;
            }
            if i % 97 == 0 {
                *v *= 1e-4;
            }
        }
        x[3] = 1e10;
        x[4] = 1e-25;
        let cfg = SmaqConfig {
            log: true,
            chunk_size: 8192,
            ..Default::default()
        };
        let enc = cfg.encode(Data::F32(&x)).unwrap();
        let frame = crate::codec::testing::frame_f32(&enc, x.len());
        let cached = SmaqDecoder::parse(&enc.meta, frame).unwrap();
        let escapes: u64 = cached.h.chunks.iter().map(|c| c.escapes as u64).sum();
        assert!(escapes > 1000, "{escapes} escapes");
        let plain = SmaqDecoder::parse(&enc.meta, frame).unwrap();
        plain.escapes_log.set(Vec::new()).unwrap();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        cached.decode(&enc.payload, DataMut::F32(&mut a)).unwrap();
        plain.decode(&enc.payload, DataMut::F32(&mut b)).unwrap();
        assert_eq!(
            cached.escapes_log.get().map(Vec::len),
            Some(2 * LOG_CACHED as usize)
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn corrupt_escape_streams_are_format_errors() {
        let mut x = normal(20_000, 13);
        x[100] = 1e4;
        x[200] = -1e4;
        let enc = SmaqConfig {
            chunk_size: 20_000,
            ..Default::default()
        }
        .encode(Data::F32(&x))
        .unwrap();
        let frame = Frame {
            version: 2,
            ..crate::codec::testing::frame_f32(&enc, x.len())
        };
        let h = SmaqDecoder::parse(&enc.meta, frame).unwrap();
        let span = h.spans[0].escapes.clone();
        assert!(span.len() > 2);
        let mut out = vec![0f32; x.len()];
        // Every byte of the stream flipped in turn: an error or a decode, never a panic; the
        // order bytes and the last byte are always caught.
        for at in span.clone() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut p = enc.payload.clone();
                p[at] ^= flip;
                let r = h.decode(&p, DataMut::F32(&mut out));
                if at == span.start && flip == 0xff {
                    assert!(r.is_err());
                }
            }
        }
        // Truncated streams do not parse.
        let mut meta = enc.meta.clone();
        let n = meta.len();
        meta[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(SmaqDecoder::parse(&meta, frame).is_err());
    }
}

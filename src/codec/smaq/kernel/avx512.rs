//! AVX-512 kernels (F, BW, DQ, VL, VBMI, VBMI2), 64 values per step: the same IEEE operations as
//! the portable `codes_body` over `z_f32` in the same order, sixteen lanes at a time, so they
//! produce identical codes and bytes (tested against the portable path).
//!
//! Encode: sixteen values per vector, lane classes (outlier, exact zero, non-finite, beyond
//! t_outlier) in mask registers; four vectors of codes are narrowed to 64 bytes, their primary
//! bits packed in-register (three shift-or levels and one byte permutation) and stored at once;
//! the outliers' extra bits are compressed (`vpcompressb`), packed the same way and shifted into
//! the extra stream with one store.
//!
//! Decode: 64 primary codes come out of one load with a byte permutation and `vpmultishiftqb`;
//! the outliers' extra bits are read the same way and expanded to their lanes (`vpexpandb`); the
//! values come from the f32 table with in-register permutations (`vpermi2ps`), no gathers.

use super::{Candidates, Counts, Prep, ZERO_CODE};
use crate::bits::BitWriter;
use crate::stats::simd::{Lanes16, MomentsAcc};
use crate::stats::PieceMoments;
use std::arch::x86_64::*;

// The encoder builds the zero code as "main, sign set, magnitude 0".
const _: () = assert!(ZERO_CODE == 0b10);

/// Broadcast constants of one chunk.
struct Consts {
    hi: __m512,
    lo: __m512,
    inv: __m512,
    t_main: __m512,
    t_out: __m512,
    r_main: __m512,
    r_out: __m512,
    mx_main: __m512,
    mx_out: __m512,
    dither: __m512,
    /// 1 and 2 in every lane.
    one: __m512i,
    two: __m512i,
    /// key + first / 2 + lane: the hash counters ([`crate::rng::pair_counter`]) of the first 32
    /// values (`first` is a multiple of 32).
    base: __m512i,
}

impl Consts {
    #[target_feature(enable = "avx512f")]
    fn new(p: &Prep, first: u32) -> Consts {
        let q = &p.q;
        let hi = p.mean as f32;
        let lo = (p.mean - hi as f64) as f32;
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        Consts {
            hi: _mm512_set1_ps(hi),
            lo: _mm512_set1_ps(lo),
            inv: _mm512_set1_ps(p.inv_std as f32),
            t_main: _mm512_set1_ps(q.t_main),
            t_out: _mm512_set1_ps(q.t_outlier),
            r_main: _mm512_set1_ps(q.r_main),
            r_out: _mm512_set1_ps(q.r_out),
            mx_main: _mm512_set1_ps(q.max_main as f32),
            mx_out: _mm512_set1_ps(q.max_out as f32),
            dither: _mm512_set1_ps(p.dither),
            one: _mm512_set1_epi32(1),
            two: _mm512_set1_epi32(2),
            base: _mm512_add_epi32(
                _mm512_set1_epi32(p.key.unwrap_or(0).wrapping_add(first / 2) as i32),
                lanes,
            ),
        }
    }
}

/// Codes (32-bit lanes) of sixteen values and their outlier lanes.
struct Step {
    code: __m512i,
    is_out: __mmask16,
}

/// Per-lane tallies of a run: lanes beyond t_outlier (infinities included, see [`encode`]) and
/// non-finite lanes. Vector counters cost one masked add per step; the counts are summed once at
/// the end.
struct Tally {
    beyond: __m512i,
    nonfin: __m512i,
}

/// The sixteen hashes of counters `ctr` ([`crate::rng::uniform`]).
#[target_feature(enable = "avx512f")]
#[inline]
fn hash16(ctr: __m512i) -> __m512i {
    let mut h = ctr;
    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb_352d));
    h = _mm512_xor_si512(h, _mm512_srli_epi32::<15>(h));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x846c_a68b_u32 as i32));
    _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h))
}

/// The odd integers 2b + 1 (as f32) of the uniforms (2b + 1) / 2^17 that the hashes `h` give
/// 32 consecutive values: the low halves for the first sixteen, the high halves for the rest.
#[target_feature(enable = "avx512f")]
#[inline]
fn halves(h: __m512i, one: __m512i) -> (__m512, __m512) {
    let lo = _mm512_or_si512(_mm512_srli_epi32::<15>(_mm512_slli_epi32::<16>(h)), one);
    let hi = _mm512_or_si512(_mm512_srli_epi32::<15>(h), one);
    (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
}

/// Codes of the sixteen values `v`; `STOCH`: stochastic rounding with the uniforms `odd` / 2^17
/// ([`halves`]), else the constant dither (`odd` unused).
///
/// The portable code computes `s = min(d * r, mx)`, `mag = min(trunc(s + u), mx)`; here
/// `mag = trunc(min(d * r + u, mx))`, which is the same for every input: d * r >= 0 and u < 1,
/// so either d * r + u < mx and both truncate the same sum, or both give mx (NaN included:
/// vminps returns its second operand). The uniform odd * 2^-17 is an exact product, so adding
/// it with one FMA rounds exactly as the separate add does.
#[target_feature(enable = "avx512f,avx512dq,fma")]
#[inline]
fn step<const STOCH: bool>(c: &Consts, v: __m512, odd: __m512, t: &mut Tally) -> Step {
    let vb = _mm512_castps_si512(v);
    let z = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(v, c.hi), c.lo), c.inv);
    let a = _mm512_abs_ps(z);
    // bits << 1 != 0: not +-0.0. Lane masks feed the compares directly (mask logic through
    // general registers costs more than the compares).
    let nonzero = _mm512_test_epi32_mask(vb, _mm512_set1_epi32(0x7fff_ffff));
    // NaN (quiet 0x01, signalling 0x80) and +-Inf (0x08, 0x10): exponent all ones.
    let nonfin = _mm512_fpclass_ps_mask::<0x99>(v);
    let is_out = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(nonzero, a, c.t_main);
    let d = _mm512_mask_sub_ps(a, is_out, a, c.t_main);
    let r = _mm512_mask_blend_ps(is_out, c.r_main, c.r_out);
    let mx = _mm512_mask_blend_ps(is_out, c.mx_main, c.mx_out);
    let dr = _mm512_mul_ps(d, r);
    let sum = if STOCH {
        _mm512_fmadd_ps(odd, _mm512_set1_ps(1.0 / 131_072.0), dr)
    } else {
        _mm512_add_ps(dr, c.dither)
    };
    // Exact zeros get magnitude 0 here (and are never outliers).
    let mag = _mm512_maskz_cvttps_epi32(nonzero, _mm512_min_ps(sum, mx));
    // Outlier lanes: bit 0 set. (`c.one` is a field rather than a literal: with a literal 1 the
    // compiler turns the masked OR into three instructions.)
    let code = _mm512_slli_epi32::<2>(mag);
    let code = _mm512_mask_or_epi32(code, is_out, code, c.one);
    // The sign where z < 0 and the code is not 0 (magnitude > 0 or an outlier): a vector test
    // under the compare's mask rather than mask-register logic.
    let zneg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
    let neg = _mm512_mask_test_epi32_mask(zneg, code, code);
    let code = _mm512_mask_or_epi32(code, neg, code, c.two);
    // Exact zeros: ZERO_CODE.
    let code = _mm512_mask_blend_epi32(nonzero, c.two, code);
    // Beyond t_outlier (NaN fails the compare; infinities pass and are taken out in `encode`).
    let beyond = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(nonzero, a, c.t_out);
    t.beyond = _mm512_mask_add_epi32(t.beyond, beyond, t.beyond, c.one);
    t.nonfin = _mm512_mask_add_epi32(t.nonfin, nonfin, t.nonfin, c.one);
    Step { code, is_out }
}

/// Lanes of `v` outside `[cl, ch]` or NaN (as [`outside`]).
#[target_feature(enable = "avx512f")]
#[inline]
fn outside16(v: __m512, cl: __m512, ch: __m512) -> __mmask16 {
    !(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, cl) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, ch))
}

/// The four 16-lane masks of a 64-value step as one mask, in value order.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn mask64(m: [__mmask16; 4]) -> __mmask64 {
    let lo = _mm512_kunpackw(m[1] as __mmask32, m[0] as __mmask32);
    let hi = _mm512_kunpackw(m[3] as __mmask32, m[2] as __mmask32);
    _mm512_kunpackd(hi as __mmask64, lo as __mmask64)
}

/// `vpermb` indices that gather the low `w` bytes of every 64-bit lane to the front.
fn compact_index(w: u32) -> [u8; 64] {
    let mut t = [0u8; 64];
    for (o, v) in t.iter_mut().enumerate().take(8 * w as usize) {
        *v = ((o / w as usize) * 8 + o % w as usize) as u8;
    }
    t
}

/// `vpermb` indices that gather the low `w / 2` bytes of every 32-bit lane to the front, the
/// lanes taken in the order `lane(g)` for output group g.
fn compact_index32(w: u32, lane: impl Fn(usize) -> usize) -> [u8; 64] {
    let b = (w / 2) as usize;
    let mut t = [0u8; 64];
    for (o, v) in t.iter_mut().enumerate().take(16 * b) {
        *v = (lane(o / b) * 4 + o % b) as u8;
    }
    t
}

/// Packs the 64 bytes of `v`, each holding a `w`-bit field (1 <= w <= 8, higher bits zero),
/// LSB first: every 64-bit lane ends up holding its eight fields in its low `w` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn pack_lanes(v: __m512i, w: u32) -> __m512i {
    // (A & B) | C
    const AND_OR: i32 = 0xEA;
    let hi = _mm512_srl_epi16(
        _mm512_and_si512(v, _mm512_set1_epi16(0xff00u16 as i16)),
        _mm_cvtsi32_si128(8 - w as i32),
    );
    let v = _mm512_ternarylogic_epi32::<AND_OR>(v, _mm512_set1_epi16(0x00ff), hi);
    let hi = _mm512_srl_epi32(
        _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000u32 as i32)),
        _mm_cvtsi32_si128(16 - 2 * w as i32),
    );
    let v = _mm512_ternarylogic_epi32::<AND_OR>(v, _mm512_set1_epi32(0xffff), hi);
    let hi = _mm512_srl_epi64(
        _mm512_and_si512(v, _mm512_set1_epi64(0xffff_ffff_0000_0000u64 as i64)),
        _mm_cvtsi32_si128(32 - 4 * w as i32),
    );
    _mm512_ternarylogic_epi32::<AND_OR>(v, _mm512_set1_epi64(0xffff_ffff), hi)
}

/// As [`pack_lanes`] for an even width, within 32-bit lanes (two multiply-adds): every 32-bit
/// lane ends up holding its four fields in its low `w / 2` bytes. `mul8` is [1, 2^w] per byte
/// pair and `mul16` [1, 2^2w] per word pair (w = 8 needs no packing: both unused).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn pack_dwords(v: __m512i, w: u32, mul8: __m512i, mul16: __m512i) -> __m512i {
    if w == 8 {
        return v;
    }
    // Byte pairs: a0 + a1 * 2^w < 2^2w (unsigned by signed bytes, w <= 6: no saturation);
    // word pairs: b0 + b1 * 2^2w < 2^4w.
    _mm512_madd_epi16(_mm512_maddubs_epi16(v, mul8), mul16)
}

/// The multipliers of [`pack_dwords`] for width `w`.
#[target_feature(enable = "avx512f")]
fn pack_mul(w: u32) -> (__m512i, __m512i) {
    let w = w.min(6);
    (
        _mm512_set1_epi16((1 | (1 << (8 + w))) as i16),
        _mm512_set1_epi32(1 | (1 << (16 + 2 * w))),
    )
}

/// Codes and packing fused, for 3 <= bits_main <= 8 and extra bits <= 4: the first len/64*64
/// values go to `primary` (8 * bits_main bytes per 64 values) and `extra`. Returns the number of
/// values done and their counts: none with stochastic rounding from a `first` that is not a
/// multiple of 32 (see [`halves`]). `x`: float32, or float16 / bfloat16 widened (exactly) as they
/// are loaded, which codes them as their float32 values would be coded.
///
/// # Safety
/// The CPU must have the extensions of [`crate::simd::avx512_vbmi`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma")]
pub unsafe fn encode<T: Lanes16>(
    x: &[T],
    first: u32,
    p: &Prep,
    primary: &mut [u8],
    extra: &mut BitWriter,
    cands: &mut Candidates<'_>,
) -> (usize, Counts) {
    let (bm, ew) = (p.q.bits_main, p.q.extra_bits());
    if p.key.is_some() && !first.is_multiple_of(32) {
        // Its pairs of values sharing a hash start at multiples of 32 (the callers' chunks and
        // blocks all do): the caller's other levels code it.
        return (0, Counts::default());
    }
    let n64 = x.len() / 64 * 64;
    assert!((3..=8).contains(&bm) && ew <= 4 && primary.len() >= n64 / 8 * bm as usize);
    let step_bytes = 8 * bm as usize;
    // Blocks whose 64-byte store stays inside `primary`; the rest store through a mask.
    let wide = primary.len().saturating_sub(64) / step_bytes * 64;
    let pstore: __mmask64 = if bm == 8 {
        !0
    } else {
        (1u64 << step_bytes) - 1
    };
    // After the two narrowing packs, 32-bit lane p holds values 16 * (p % 4) + 4 * (p / 4)..;
    // group g (values 4g..4g+4) is therefore in lane (g % 4) * 4 + g / 4.
    let packed_lane = |g: usize| (g % 4) * 4 + g / 4;
    let pidx = if bm % 2 == 0 {
        compact_index32(bm, packed_lane)
    } else {
        compact_index(bm)
    };
    let eidx = if ew % 2 == 0 {
        compact_index32(ew.max(2), |g| g)
    } else {
        compact_index(ew)
    };
    let (pmul8, pmul16) = pack_mul(bm);
    let (emul8, emul16) = pack_mul(ew);
    let k = Blocks {
        c: Consts::new(p, first),
        bm,
        ew,
        wide,
        pstore,
        pidx: _mm512_loadu_si512(pidx.as_ptr() as *const _),
        eidx: _mm512_loadu_si512(eidx.as_ptr() as *const _),
        ekeep: (1u64 << (8 * ew)) - 1,
        pmul8,
        pmul16,
        emul8,
        emul16,
    };
    let mut t = Counts::default();
    let whole = x;
    let x = &x[..n64];
    let stoch = p.key.is_some();
    // The moments, when wanted: the loop gathers the whole blocks', the rest are added at the end.
    let wanted = cands.moments.as_ref().map(|m| m.shift);
    let mut mom = MomentsAcc::new(wanted.unwrap_or(0.0));
    // The default configuration (6/8 bits) gets a loop compiled for its widths; the others share
    // one that reads them at run time.
    let fixed = (bm, ew) == (6, 2);
    let mut run = |buf: &mut [u8], xbit: usize| {
        let (t, m) = (&mut t, &mut mom);
        // SAFETY (all calls): the same extensions are present (this function's contract); with
        // no extra bits the buffer is never touched.
        unsafe {
            macro_rules! go {
                ($s:literal, $bm:literal, $ew:literal) => {
                    if wanted.is_some() {
                        k.run::<T, $s, $bm, $ew, true>(x, first, primary, buf, xbit, t, cands, m)
                    } else {
                        k.run::<T, $s, $bm, $ew, false>(x, first, primary, buf, xbit, t, cands, m)
                    }
                };
            }
            match (stoch, fixed) {
                (true, true) => go!(true, 6, 2),
                (true, false) => go!(true, 0, 0),
                (false, true) => go!(false, 6, 2),
                (false, false) => go!(false, 0, 0),
            }
        }
    };
    if ew > 0 {
        extra.append_raw(n64 * ew as usize / 8 + 66, run);
    } else {
        run(&mut [], 0);
    }
    if let Some(m) = cands.moments.as_mut() {
        let blocks = whole.len() / MomentsAcc::BLOCK * MomentsAcc::BLOCK;
        let s = mom.finish(&whole[blocks..], whole.len());
        m.got = Some(PieceMoments::from_summary(s));
    }
    // The loop counts infinities as beyond t_outlier (their |z| is +Inf); take them out here,
    // where there are non-finite values at all (rare).
    if t.nonfinite > 0 {
        t.beyond -= x.iter().filter(|v| v.widen().is_infinite()).count() as u32;
    }
    (n64, t)
}

/// The encoder's loop and its constants.
struct Blocks {
    c: Consts,
    bm: u32,
    ew: u32,
    /// Blocks before this value index store 64 primary bytes; the rest store through `pstore`.
    wide: usize,
    pstore: __mmask64,
    pidx: __m512i,
    eidx: __m512i,
    ekeep: __mmask64,
    pmul8: __m512i,
    pmul16: __m512i,
    emul8: __m512i,
    emul16: __m512i,
}

impl Blocks {
    /// Encodes `x` (a multiple of 64 values) into `primary`, and the extra bits into `buf` from
    /// bit `xbit` on (the byte holding it holds the pending bits). Returns the end bit.
    #[target_feature(
        enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma"
    )]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run<T: Lanes16, const STOCH: bool, const BM: u32, const EW: u32, const MOM: bool>(
        &self,
        x: &[T],
        first: u32,
        primary: &mut [u8],
        buf: &mut [u8],
        mut xbit: usize,
        t: &mut Counts,
        cands: &mut Candidates<'_>,
        mom: &mut MomentsAcc,
    ) -> usize {
        // BM = 0: the widths are read at run time; else they are constants (and equal these).
        debug_assert!(BM == 0 || (BM, EW) == (self.bm, self.ew));
        let (bm, ew) = if BM == 0 {
            (self.bm, self.ew)
        } else {
            (BM, EW)
        };
        let c = &self.c;
        let mut tally = Tally {
            beyond: _mm512_setzero_si512(),
            nonfin: _mm512_setzero_si512(),
        };
        let pmask = _mm512_set1_epi16(((1u32 << bm) - 1) as i16);
        let pmask8 = _mm512_set1_epi8(((1u32 << bm) - 1) as i8);
        let emask8 = _mm512_set1_epi8(((1u32 << ew) - 1) as i8);
        let narrow = bm + ew <= 8;
        let bm_x = _mm_cvtsi32_si128(bm as i32);
        // Undoes the lane order of the narrowing packs (see `packed_lane`).
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        assert!(x.len().is_multiple_of(64) && primary.len() >= x.len() / 8 * bm as usize);
        let (xp, pp, bp) = (x.as_ptr(), primary.as_mut_ptr(), buf.as_mut_ptr());
        // With MOM, the moments of the whole blocks are gathered from the loaded values.
        let mom_end = x.len() / MomentsAcc::BLOCK * MomentsAcc::BLOCK;
        // The pending bits of the extra stream's current byte, in byte 0.
        let mut carry = _mm512_maskz_set1_epi8(1, buf.first().map_or(0, |&b| b as i8));
        // The hash counters of the next 32 values (`Consts::base`).
        let mut ctr = c.base;
        // The candidates' bounds ([`Candidates`]).
        let (cl, ch) = (_mm512_set1_ps(cands.lo), _mm512_set1_ps(cands.hi));
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut i = 0;
        while i < x.len() {
            // SAFETY: i + 64 <= x.len(): the four loads are in bounds.
            let (v0, v1, v2, v3) = unsafe {
                (
                    T::load16(xp.add(i)),
                    T::load16(xp.add(i + 16)),
                    T::load16(xp.add(i + 32)),
                    T::load16(xp.add(i + 48)),
                )
            };
            if MOM && i < mom_end {
                mom.add64([v0, v1, v2, v3]);
                if (i + 64) % MomentsAcc::BLOCK == 0 {
                    let b = i + 64 - MomentsAcc::BLOCK;
                    mom.end_block(&x[b..i + 64]);
                }
            }
            // One hash per two values: vectors 0 and 1 take the halves of the first sixteen
            // hashes, vectors 2 and 3 those of the next sixteen.
            let (u0, u1, u2, u3) = if STOCH {
                let sixteen = _mm512_set1_epi32(16);
                let (u0, u1) = halves(hash16(ctr), c.one);
                let (u2, u3) = halves(hash16(_mm512_add_epi32(ctr, sixteen)), c.one);
                ctr = _mm512_add_epi32(ctr, _mm512_set1_epi32(32));
                (u0, u1, u2, u3)
            } else {
                let z = _mm512_setzero_ps();
                (z, z, z, z)
            };
            let s0 = step::<STOCH>(c, v0, u0, &mut tally);
            let s1 = step::<STOCH>(c, v1, u1, &mut tally);
            let s2 = step::<STOCH>(c, v2, u2, &mut tally);
            let s3 = step::<STOCH>(c, v3, u3, &mut tally);
            let outl = mask64([s0.is_out, s1.is_out, s2.is_out, s3.is_out]);
            t.outliers += outl.count_ones();
            // The candidates' indices, compressed to the front of each vector and stored whole
            // (no branch per candidate: about one block in two holds one on normal data).
            let far = [v0, v1, v2, v3].map(|v| outside16(v, cl, ch));
            if cands.out.capacity() - cands.out.len() < 64 {
                cands.out.reserve(64);
            }
            let mut len = cands.out.len();
            let op = cands.out.as_mut_ptr();
            for (j, m) in far.into_iter().enumerate() {
                let at = _mm512_add_epi32(
                    _mm512_set1_epi32((first + (i + 16 * j) as u32) as i32),
                    lanes,
                );
                // SAFETY: len + 16 <= capacity: 64 free slots at the block's start, at most 16
                // taken per vector.
                unsafe {
                    _mm512_storeu_si512(op.add(len) as *mut _, _mm512_maskz_compress_epi32(m, at))
                };
                len += m.count_ones() as usize;
            }
            // SAFETY: the first `len` slots are written.
            unsafe { cands.out.set_len(len) };
            // Codes fit 16 bits (bits_outlier <= 12): narrow to words, then to bytes.
            let w01 = _mm512_packus_epi32(s0.code, s1.code);
            let w23 = _mm512_packus_epi32(s2.code, s3.code);
            // Full codes of at most 8 bits narrow to bytes as they are; wider ones are cut to
            // their primary bits first (the narrowing saturates).
            let full = _mm512_packus_epi16(w01, w23);
            let prim = if narrow {
                _mm512_and_si512(full, pmask8)
            } else {
                _mm512_packus_epi16(_mm512_and_si512(w01, pmask), _mm512_and_si512(w23, pmask))
            };
            let packed = if bm % 2 == 0 {
                // Packed within 32-bit lanes (four consecutive values each), reordered by the
                // compaction.
                pack_dwords(prim, bm, self.pmul8, self.pmul16)
            } else {
                pack_lanes(_mm512_permutexvar_epi32(order, prim), bm)
            };
            let packed = _mm512_permutexvar_epi8(self.pidx, packed);
            let at = i / 8 * bm as usize;
            if i < self.wide {
                // SAFETY: at + 64 <= primary.len() (i < wide).
                unsafe { _mm512_storeu_si512(pp.add(at) as *mut _, packed) };
            } else {
                // SAFETY: the mask covers 8 * bm bytes and at + 8 * bm <= primary.len().
                unsafe { _mm512_mask_storeu_epi8(pp.add(at) as *mut i8, self.pstore, packed) };
            }
            if ew > 0 && outl != 0 {
                let e = if narrow {
                    // The 16-bit shift brings bits of the next byte above the low ew bits of
                    // each byte (ew <= 8 - bm); the mask drops them.
                    _mm512_and_si512(_mm512_srl_epi16(full, bm_x), emask8)
                } else {
                    _mm512_packus_epi16(_mm512_srl_epi16(w01, bm_x), _mm512_srl_epi16(w23, bm_x))
                };
                let e = _mm512_maskz_compress_epi8(outl, _mm512_permutexvar_epi32(order, e));
                let e = if ew % 2 == 0 {
                    pack_dwords(e, ew, self.emul8, self.emul16)
                } else {
                    pack_lanes(e, ew)
                };
                let e = _mm512_maskz_permutexvar_epi8(self.ekeep, self.eidx, e);
                // Shift the bit string left by xbit % 8 across the 64-bit lanes and add the
                // pending bits of its first byte.
                let prev = _mm512_alignr_epi64::<7>(e, _mm512_setzero_si512());
                let e = _mm512_shldv_epi64(e, prev, _mm512_set1_epi64((xbit % 8) as i64));
                let at = xbit / 8;
                let e = _mm512_or_si512(e, carry);
                assert!(at + 64 <= buf.len());
                // SAFETY: at + 64 <= buf.len() (asserted).
                unsafe { _mm512_storeu_si512(bp.add(at) as *mut _, e) };
                xbit += (outl.count_ones() * ew) as usize;
                // The byte holding the new end, kept in a register (reading it back from the
                // store just made would wait for store forwarding on every step).
                let end = _mm512_set1_epi8((xbit / 8 - at) as i8);
                carry = _mm512_maskz_permutexvar_epi8(1, end, e);
            }
            i += 64;
        }
        t.beyond += _mm512_reduce_add_epi32(tally.beyond) as u32;
        t.nonfinite += _mm512_reduce_add_epi32(tally.nonfin) as u32;
        xbit
    }
}

/// Decodes the first len/64*64 values of a chunk whose full codes are at most 8 bits
/// (bits_main + extra bits <= 8) through `lut` (2^(bits_main + extra) entries of `size` = 2 or 4
/// bytes each, as little-endian bytes) into `out` (the same element size). Returns (values
/// decoded, extra stream bits consumed). `stream`: non-temporal stores ([`LineSink`]).
///
/// # Safety
/// The CPU must have the extensions of [`crate::simd::avx512_vbmi`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,popcnt")]
pub unsafe fn unpack(
    primary: &[u8],
    extra: &[u8],
    bm: u32,
    ew: u32,
    lut: &[u8],
    out: &mut [u8],
    size: usize,
    stream: bool,
) -> (usize, usize) {
    let bits = bm + ew;
    assert!((3..=8).contains(&bm) && bits <= 8 && (size == 2 || size == 4));
    assert!(lut.len() == size << bits && out.len().is_multiple_of(size));
    let n64 = out.len() / size / 64 * 64;
    assert!(primary.len() >= n64 / 8 * bm as usize);
    // Byte planes of the table: plane b holds byte b of every entry, 2 x 128 entries.
    let mut planes = [[0u8; 256]; 4];
    for (e, v) in lut.chunks_exact(size).enumerate() {
        for (b, &byte) in v.iter().enumerate() {
            planes[b][e] = byte;
        }
    }
    let tab: [[__m512i; 4]; 4] = std::array::from_fn(|b| {
        // SAFETY: each plane is 256 bytes: four 64-byte loads in bounds.
        std::array::from_fn(|h| unsafe {
            _mm512_loadu_si512(planes[b].as_ptr().add(64 * h) as *const _)
        })
    });
    // Position p of the looked-up planes ends up as value sigma(p) after the byte/word unpacks
    // (they work within 128-bit lanes); the indices are permuted to match beforehand.
    let sigma: [u8; 64] = std::array::from_fn(|p| {
        (if size == 4 {
            16 * ((p % 16) / 4) + 4 * (p / 16) + p % 4
        } else {
            32 * ((p % 16) / 8) + 8 * (p / 16) + p % 8
        }) as u8
    });
    // Primary: the 8 bytes holding codes 8j..8j+7 go to 64-bit lane j; vpmultishiftqb then
    // takes byte t of lane j from bit t * bm.
    let pgather: [u8; 64] = std::array::from_fn(|o| ((o / 8) * bm as usize + o % 8) as u8);
    let pshift: [u8; 64] = std::array::from_fn(|o| ((o % 8) * bm as usize) as u8);
    // Extra: fields 8j..8j+7 start within the 8 bytes from byte j * ew of the current position.
    let egather: [u8; 64] = std::array::from_fn(|o| ((o / 8) * ew as usize + o % 8) as u8);
    let eshift: [u8; 64] = std::array::from_fn(|o| ((o % 8) * ew as usize) as u8);
    let ld = |a: &[u8; 64]| _mm512_loadu_si512(a.as_ptr() as *const _);
    let k = Unpacker {
        bm,
        ew,
        size,
        tab,
        sigma: ld(&sigma),
        pgather: ld(&pgather),
        pshift: ld(&pshift),
        egather: ld(&egather),
        eshift: ld(&eshift),
    };
    let xpos = k.run(primary, extra, &mut out[..n64 * size], stream);
    (n64, xpos)
}

/// Writes a sequence of 64-byte vectors to consecutive memory from `base`, with non-temporal
/// stores when streaming: the stores then go around the cache, which saves reading each output
/// line before overwriting it. Non-temporal stores need 64-byte aligned lines, so when `base` is
/// not aligned (NumPy's large arrays start 16 bytes into a page) each aligned line is assembled
/// from the tails and heads of two consecutive vectors (one byte permutation), and the partial
/// lines at both ends are written with masked ordinary stores.
struct LineSink {
    base: *mut u8,
    stream: bool,
    /// Bytes from `base` to the first 64-byte boundary (0 when aligned).
    d: usize,
    /// Byte r of an assembled line is byte d + r of (previous vector, next vector).
    shift: __m512i,
    prev: __m512i,
    n: usize,
}

impl LineSink {
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    fn new(base: *mut u8, stream: bool) -> Self {
        let d = (64 - base as usize % 64) % 64;
        let idx: [u8; 64] = std::array::from_fn(|r| (d + r) as u8);
        LineSink {
            base,
            stream,
            d,
            // SAFETY: a 64-byte array.
            shift: unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) },
            prev: _mm512_setzero_si512(),
            n: 0,
        }
    }

    /// Writes the next 64 bytes (`base + 64 n ..`); the caller guarantees they are writable.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    #[inline]
    unsafe fn put(&mut self, v: __m512i) {
        let at = self.base.add(64 * self.n);
        if !self.stream {
            _mm512_storeu_si512(at as *mut _, v);
        } else if self.d == 0 {
            _mm512_stream_si512(at as *mut _, v);
        } else {
            if self.n == 0 {
                _mm512_mask_storeu_epi8(at as *mut i8, (1u64 << self.d) - 1, v);
            } else {
                let line = _mm512_permutex2var_epi8(self.prev, self.shift, v);
                _mm512_stream_si512(at.sub(64 - self.d) as *mut _, line);
            }
            self.prev = v;
        }
        self.n += 1;
    }

    /// Writes what is pending (the last vector's tail when unaligned) and orders the
    /// non-temporal stores before any later store.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn finish(&mut self) {
        if !self.stream {
            return;
        }
        if self.d != 0 && self.n > 0 {
            let at = self.base.add(64 * (self.n - 1));
            _mm512_mask_storeu_epi8(at as *mut i8, !((1u64 << self.d) - 1), self.prev);
        }
        _mm_sfence();
    }
}

/// The decoder's loop and its constants.
struct Unpacker {
    bm: u32,
    ew: u32,
    size: usize,
    /// [byte plane][quarter of the table].
    tab: [[__m512i; 4]; 4],
    sigma: __m512i,
    pgather: __m512i,
    pshift: __m512i,
    egather: __m512i,
    eshift: __m512i,
}

/// The `len` bytes of `buf` from `at` (at most 64) as a vector, zero past the end of `buf`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn load_upto64(buf: &[u8], at: usize) -> __m512i {
    let avail = buf.len().saturating_sub(at);
    if avail >= 64 {
        // SAFETY: at + 64 <= buf.len().
        unsafe { _mm512_loadu_si512(buf.as_ptr().add(at) as *const _) }
    } else {
        let m: __mmask64 = (1u64 << avail) - 1;
        // SAFETY: only the `avail` bytes from `at` are read (masked load: no fault past them);
        // with avail == 0 nothing is read and the address is only formed.
        unsafe { _mm512_maskz_loadu_epi8(m, buf.as_ptr().wrapping_add(at) as *const i8) }
    }
}

impl Unpacker {
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,popcnt")]
    unsafe fn run(&self, primary: &[u8], extra: &[u8], out: &mut [u8], stream: bool) -> usize {
        let (bm, ew, size) = (self.bm, self.ew, self.size);
        let n64 = out.len() / size;
        let pmask = _mm512_set1_epi8(((1u32 << bm) - 1) as i8);
        let emask = _mm512_set1_epi8(((1u32 << ew) - 1) as i8);
        let bm_x = _mm_cvtsi32_si128(bm as i32);
        let wide_tab = bm + ew == 8;
        let mut sink = LineSink::new(out.as_mut_ptr(), stream);
        let mut xpos = 0usize;
        let mut i = 0;
        while i < n64 {
            let raw = load_upto64(primary, i / 8 * bm as usize);
            let k = _mm512_permutexvar_epi8(self.pgather, raw);
            let k = _mm512_and_si512(_mm512_multishift_epi64_epi8(self.pshift, k), pmask);
            let m = _mm512_test_epi8_mask(k, _mm512_set1_epi8(1));
            let idx = if ew > 0 && m != 0 {
                let raw = load_upto64(extra, xpos / 8);
                let f = _mm512_permutexvar_epi8(self.egather, raw);
                let sh = _mm512_add_epi8(self.eshift, _mm512_set1_epi8((xpos % 8) as i8));
                let f = _mm512_and_si512(_mm512_multishift_epi64_epi8(sh, f), emask);
                let e = _mm512_maskz_expand_epi8(m, f);
                xpos += (m.count_ones() * ew) as usize;
                // e << bm stays within each byte (bm + ew <= 8).
                _mm512_or_si512(k, _mm512_sll_epi16(e, bm_x))
            } else {
                k
            };
            let idx = _mm512_permutexvar_epi8(self.sigma, idx);
            let top = _mm512_movepi8_mask(idx);
            let plane = |t: &[__m512i; 4]| {
                let lo = _mm512_permutex2var_epi8(t[0], idx, t[1]);
                if wide_tab {
                    let hi = _mm512_permutex2var_epi8(t[2], idx, t[3]);
                    _mm512_mask_blend_epi8(top, lo, hi)
                } else {
                    lo
                }
            };
            let p0 = plane(&self.tab[0]);
            let p1 = plane(&self.tab[1]);
            // SAFETY (both arms): the sink writes out[64 * size * i / 64..][..64 * size], in
            // order; out holds n64 * size bytes.
            if size == 4 {
                let p2 = plane(&self.tab[2]);
                let p3 = plane(&self.tab[3]);
                let a = _mm512_unpacklo_epi8(p0, p1);
                let b = _mm512_unpackhi_epi8(p0, p1);
                let c = _mm512_unpacklo_epi8(p2, p3);
                let d = _mm512_unpackhi_epi8(p2, p3);
                unsafe {
                    sink.put(_mm512_unpacklo_epi16(a, c));
                    sink.put(_mm512_unpackhi_epi16(a, c));
                    sink.put(_mm512_unpacklo_epi16(b, d));
                    sink.put(_mm512_unpackhi_epi16(b, d));
                }
            } else {
                unsafe {
                    sink.put(_mm512_unpacklo_epi8(p0, p1));
                    sink.put(_mm512_unpackhi_epi8(p0, p1));
                }
            }
            i += 64;
        }
        // SAFETY: every vector written so far lies in `out`.
        unsafe { sink.finish() };
        xpos
    }
}

/// Appends `base + i` for every `x[i]` outside `[lo, hi]` or NaN, sixteen values per step (one
/// masked compare pair); returns how many values it covered (a multiple of 16).
#[target_feature(enable = "avx512f")]
pub unsafe fn outside(x: &[f32], lo: f32, hi: f32, base: u32, out: &mut Vec<u32>) -> usize {
    let n16 = x.len() / 16 * 16;
    let (l, h) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let mut i = 0;
    while i < n16 {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let inside =
            _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, l) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, h);
        let mut m = !inside;
        while m != 0 {
            out.push(base + i as u32 + m.trailing_zeros());
            m &= m - 1;
        }
        i += 16;
    }
    n16
}

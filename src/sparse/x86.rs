//! AVX2 and AVX-512 forms of the sparse kernels: the portable code's operations in the same order
//! (one fused multiply-add per term, lanes of 16 summed by `tree16`), so the same bits.
//!
//! # Safety (every function)
//! The CPU has the enabled features; every index in `idx` is a row of the matrix at
//! `inp` / `x`, and `t0 + out.len()` (or `t0 + dy.len()`) is at most `ld`.

use super::Index;
use std::arch::x86_64::*;

/// How many non-zeros ahead the kernels prefetch their input rows: the column indices are
/// irregular, so the hardware prefetchers cannot guess them, and one row segment is several
/// cache lines coming from L2.
const PF: usize = 4;

/// Prefetches `lines` cache lines from `p` into L1 (a hint: no fault, no effect on results).
#[target_feature(enable = "sse")]
#[inline]
fn prefetch(p: *const f32, lines: usize) {
    for l in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(16 * l) as *const i8);
    }
}

/// `G` vectors of 16 outputs starting at ld column `col`; the last vector is masked by
/// `last` when `TAIL`.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn block512<I: Index, const G: usize, const TAIL: bool>(
    idx: &[I],
    vals: &[f32],
    inp: *const f32,
    ld: usize,
    col: usize,
    init: f32,
    out: *mut f32,
    last: __mmask16,
) {
    let mut acc = [_mm512_set1_ps(init); G];
    for (k, (c, &v)) in idx.iter().zip(vals).enumerate() {
        let p = inp.add(c.at() * ld + col);
        if let Some(next) = idx.get(k + PF) {
            prefetch(inp.wrapping_add(next.at() * ld + col), G);
        }
        let w = _mm512_set1_ps(v);
        for (g, a) in acc.iter_mut().enumerate() {
            let x = if TAIL && g + 1 == G {
                _mm512_maskz_loadu_ps(last, p.add(16 * g))
            } else {
                _mm512_loadu_ps(p.add(16 * g))
            };
            *a = _mm512_fmadd_ps(w, x, *a);
        }
    }
    for (g, a) in acc.iter().enumerate() {
        if TAIL && g + 1 == G {
            _mm512_mask_storeu_ps(out.add(16 * g), last, *a);
        } else {
            _mm512_storeu_ps(out.add(16 * g), *a);
        }
    }
}

/// One output row over ld columns `t0..t0 + out.len()` (see `row_portable`).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn row512<I: Index>(
    idx: &[I],
    vals: &[f32],
    inp: *const f32,
    ld: usize,
    t0: usize,
    init: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let o = out.as_mut_ptr();
    let mut j = 0;
    while j + 128 <= n {
        block512::<I, 8, false>(idx, vals, inp, ld, t0 + j, init, o.add(j), 0);
        j += 128;
    }
    let rem = n - j;
    if rem == 0 {
        return;
    }
    let g = rem.div_ceil(16);
    let last_n = rem - 16 * (g - 1);
    let last: __mmask16 = if last_n == 16 {
        0xFFFF
    } else {
        (1u16 << last_n) - 1
    };
    let (c, o) = (t0 + j, o.add(j));
    match g {
        1 => block512::<I, 1, true>(idx, vals, inp, ld, c, init, o, last),
        2 => block512::<I, 2, true>(idx, vals, inp, ld, c, init, o, last),
        3 => block512::<I, 3, true>(idx, vals, inp, ld, c, init, o, last),
        4 => block512::<I, 4, true>(idx, vals, inp, ld, c, init, o, last),
        5 => block512::<I, 5, true>(idx, vals, inp, ld, c, init, o, last),
        6 => block512::<I, 6, true>(idx, vals, inp, ld, c, init, o, last),
        7 => block512::<I, 7, true>(idx, vals, inp, ld, c, init, o, last),
        _ => block512::<I, 8, true>(idx, vals, inp, ld, c, init, o, last),
    }
}

/// Lane mask of the first `n` (0..=8) of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn mask8(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn block256<I: Index, const G: usize, const TAIL: bool>(
    idx: &[I],
    vals: &[f32],
    inp: *const f32,
    ld: usize,
    col: usize,
    init: f32,
    out: *mut f32,
    last: __m256i,
) {
    let mut acc = [_mm256_set1_ps(init); G];
    for (k, (c, &v)) in idx.iter().zip(vals).enumerate() {
        let p = inp.add(c.at() * ld + col);
        if let Some(next) = idx.get(k + PF) {
            prefetch(inp.wrapping_add(next.at() * ld + col), G.div_ceil(2));
        }
        let w = _mm256_set1_ps(v);
        for (g, a) in acc.iter_mut().enumerate() {
            let x = if TAIL && g + 1 == G {
                _mm256_maskload_ps(p.add(8 * g), last)
            } else {
                _mm256_loadu_ps(p.add(8 * g))
            };
            *a = _mm256_fmadd_ps(w, x, *a);
        }
    }
    for (g, a) in acc.iter().enumerate() {
        if TAIL && g + 1 == G {
            _mm256_maskstore_ps(out.add(8 * g), last, *a);
        } else {
            _mm256_storeu_ps(out.add(8 * g), *a);
        }
    }
}

/// [`row512`] with 8-float vectors.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn row256<I: Index>(
    idx: &[I],
    vals: &[f32],
    inp: *const f32,
    ld: usize,
    t0: usize,
    init: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let o = out.as_mut_ptr();
    let mut j = 0;
    while j + 64 <= n {
        let m = mask8(8);
        block256::<I, 8, false>(idx, vals, inp, ld, t0 + j, init, o.add(j), m);
        j += 64;
    }
    let rem = n - j;
    if rem == 0 {
        return;
    }
    let g = rem.div_ceil(8);
    let last = mask8(rem - 8 * (g - 1));
    let (c, o) = (t0 + j, o.add(j));
    match g {
        1 => block256::<I, 1, true>(idx, vals, inp, ld, c, init, o, last),
        2 => block256::<I, 2, true>(idx, vals, inp, ld, c, init, o, last),
        3 => block256::<I, 3, true>(idx, vals, inp, ld, c, init, o, last),
        4 => block256::<I, 4, true>(idx, vals, inp, ld, c, init, o, last),
        5 => block256::<I, 5, true>(idx, vals, inp, ld, c, init, o, last),
        6 => block256::<I, 6, true>(idx, vals, inp, ld, c, init, o, last),
        7 => block256::<I, 7, true>(idx, vals, inp, ld, c, init, o, last),
        _ => block256::<I, 8, true>(idx, vals, inp, ld, c, init, o, last),
    }
}

/// `tree16` of lanes 0..8 in `lo` and 8..16 in `hi`.
#[target_feature(enable = "avx2")]
#[inline]
fn tree256(lo: __m256, hi: __m256) -> f32 {
    let b = _mm256_add_ps(lo, hi);
    let c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps::<1>(b));
    let d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps::<1>(d, d)))
}

#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dots512_g<I: Index, const G: usize>(
    idx: &[I],
    dy: &[f32],
    x: *const f32,
    ld: usize,
    t0: usize,
    last: __mmask16,
    out: &mut [f32],
) {
    let mut d = [_mm512_setzero_ps(); G];
    for (g, v) in d.iter_mut().enumerate() {
        let m = if g + 1 == G { last } else { 0xFFFF };
        *v = _mm512_maskz_loadu_ps(m, dy.as_ptr().add(16 * g));
    }
    for (k, (c, o)) in idx.iter().zip(out.iter_mut()).enumerate() {
        let p = x.add(c.at() * ld + t0);
        if let Some(next) = idx.get(k + PF) {
            prefetch(x.wrapping_add(next.at() * ld + t0), G);
        }
        let mut s = _mm512_setzero_ps();
        for (g, v) in d.iter().enumerate() {
            let xv = if g + 1 == G {
                _mm512_maskz_loadu_ps(last, p.add(16 * g))
            } else {
                _mm512_loadu_ps(p.add(16 * g))
            };
            s = _mm512_fmadd_ps(*v, xv, s);
        }
        let lo = _mm512_castps512_ps256(s);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
        *o += tree256(lo, hi);
    }
}

/// `out[j] += dot(dy, x[idx[j]][t0..])` in 16 lanes (see `dots` in mod.rs); `dy.len() <= 128`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn dots512<I: Index>(
    idx: &[I],
    dy: &[f32],
    x: *const f32,
    ld: usize,
    t0: usize,
    out: &mut [f32],
) {
    let n = dy.len();
    if n == 0 {
        return;
    }
    let g = n.div_ceil(16);
    let last_n = n - 16 * (g - 1);
    let last: __mmask16 = if last_n == 16 {
        0xFFFF
    } else {
        (1u16 << last_n) - 1
    };
    match g {
        1 => dots512_g::<I, 1>(idx, dy, x, ld, t0, last, out),
        2 => dots512_g::<I, 2>(idx, dy, x, ld, t0, last, out),
        3 => dots512_g::<I, 3>(idx, dy, x, ld, t0, last, out),
        4 => dots512_g::<I, 4>(idx, dy, x, ld, t0, last, out),
        5 => dots512_g::<I, 5>(idx, dy, x, ld, t0, last, out),
        6 => dots512_g::<I, 6>(idx, dy, x, ld, t0, last, out),
        7 => dots512_g::<I, 7>(idx, dy, x, ld, t0, last, out),
        _ => dots512_g::<I, 8>(idx, dy, x, ld, t0, last, out),
    }
}

/// [`dots512`] with the 16 lanes in two 8-float vectors.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dots256<I: Index>(
    idx: &[I],
    dy: &[f32],
    x: *const f32,
    ld: usize,
    t0: usize,
    out: &mut [f32],
) {
    let n = dy.len();
    let full = n / 16;
    let r = n - 16 * full;
    let (m_lo, m_hi) = (mask8(r.min(8)), mask8(r.saturating_sub(8)));
    let dp = dy.as_ptr();
    let lines = n.div_ceil(16);
    for (k, (c, o)) in idx.iter().zip(out.iter_mut()).enumerate() {
        let p = x.add(c.at() * ld + t0);
        if let Some(next) = idx.get(k + PF) {
            prefetch(x.wrapping_add(next.at() * ld + t0), lines);
        }
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for g in 0..full {
            let (a, b) = (dp.add(16 * g), p.add(16 * g));
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(8)), _mm256_loadu_ps(b.add(8)), hi);
        }
        if r > 0 {
            let (a, b) = (dp.add(16 * full), p.add(16 * full));
            lo = _mm256_fmadd_ps(_mm256_maskload_ps(a, m_lo), _mm256_maskload_ps(b, m_lo), lo);
            let (a8, b8) = (a.wrapping_add(8), b.wrapping_add(8));
            hi = _mm256_fmadd_ps(
                _mm256_maskload_ps(a8, m_hi),
                _mm256_maskload_ps(b8, m_hi),
                hi,
            );
        }
        *o += tree256(lo, hi);
    }
}

//! Fused optimizer steps over packed state (SGD with momentum, Adam, AdamW).
//!
//! One call updates one parameter: the packed state slots are decoded into the caller's
//! reusable buffers, one Rayon-parallel pass over chunks applies the exact-zero list, the value
//! range clamp, the Adam lower-bound guard and the update (parameter in place, new state in the
//! buffers), tallying per slot the zeros and the value range; then each slot is packed again.
//!
//! The arithmetic repeats, operation for operation, what `python/smaq_rs/torch/optim.py` does
//! with torch's CPU kernels: float32 throughout, scalars rounded to float32, and a fused
//! multiply-add wherever torch's vectorized kernel uses one (`add(alpha=)`, `lerp`). So, on the
//! same state, the fused step gives the Python step's values (tests/torch/test_torch_optim.py checks
//! how closely).
//!
//! How a slot is stored afterwards follows `zmap::layout`, as `_store.encode` does: plain, plain
//! with a list of exact-zero positions, or (returned as [`SlotOut::NeedsMap`]) with a zero map,
//! which the caller builds from the buffer.

use crate::codec::smaq::{
    EncodedPiece, PieceEncoder, PieceOutput, PieceScratch, Primary, SmaqConfig,
};
use crate::dtype::{Data, DataMut};
use crate::error::{Error, Result};
use crate::format::Packed;
use crate::stats::{PieceMoments, PieceStats, Stats};
use crate::zmap::{self, Layout, Rule, Tally};

/// Elements per task of the fused pass.
const TASK: usize = 1 << 14;

/// Adam / AdamW hyper-parameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay the parameter (`p *= 1 - lr*wd`) instead of adding `wd*p` to the gradient.
    pub decoupled: bool,
    pub maximize: bool,
    /// Raise a decoded exp_avg_sq to the Cauchy-Schwarz bound implied by exp_avg (optim.py).
    pub guard: bool,
    /// Whether the state was decoded from packed bytes (the guard applies only then).
    pub decoded: bool,
    /// The step number, counted from 1.
    pub step: u64,
    /// The exp_avg state given (packed or dense) is stored scaled, by the step before (see
    /// [`scaled`]); the step multiplies it back before using it. Needs `step >= 2`.
    pub scaled_in: bool,
    /// Store the new exp_avg scaled ([`scaled`]) before it is packed or handed back (also a
    /// [`SlotOut::NeedsMap`] buffer or a [`SlotOut::Dense`] vector); its range and statistics
    /// are then those of the scaled values.
    pub scaled_out: bool,
}

/// SGD hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

/// How one state slot enters the step.
#[derive(Debug, Clone, Copy)]
pub enum SlotIn<'a> {
    /// No state yet (first step).
    Fresh,
    /// The slot's buffer already holds the values.
    Dense,
    /// Decode `packed` into the buffer, clamp into `range`, set the positions in `zeros` to 0.
    /// `stats`: provisional statistics for the new state's code (the exact statistics the
    /// previous step returned with this slot, [`SlotOut::Plain`]); with them the piece-wise Adam
    /// step may run in one pass ([`adam_step_pieces`]). Other steps ignore them.
    Packed {
        packed: &'a Packed,
        range: Option<[f64; 2]>,
        zeros: &'a [i64],
        stats: Option<Stats>,
    },
}

/// One slot after the step.
#[derive(Debug)]
pub enum SlotOut {
    /// Packed values, positions of exact zeros (when the codec loses zeros), the [min, max] of
    /// the values (None when there is a NaN), and the exact statistics of the values in the
    /// domain the codec takes them in (`SmaqConfig::stat_values`) where the step gathered them
    /// (the piece-wise Adam step): the next step's provisional statistics.
    Plain {
        packed: Packed,
        zeros: Vec<i64>,
        range: Option<[f64; 2]>,
        stats: Option<Stats>,
    },
    /// Store with a zero map: the new values are in the slot's buffer.
    NeedsMap,
    /// Store with a zero map: these are the new values (from [`adam_step_pieces`], which had
    /// no buffer of the caller's to leave them in).
    Dense(Vec<f32>),
}

fn check_len(what: &str, len: usize, n: usize) -> Result<()> {
    if len != n {
        return Err(Error::Layout(format!(
            "{what} has {len} elements, the parameter has {n}"
        )));
    }
    Ok(())
}

/// The step count starts at 1; a scaled exp_avg was stored by a step before this one.
fn check_step(h: &AdamStep, fresh: bool) -> Result<()> {
    if h.step == 0 {
        return Err(Error::Layout("the step count starts at 1".into()));
    }
    if h.scaled_in && !fresh && h.step < 2 {
        return Err(Error::Layout(
            "a scaled exp_avg comes from a step before: the step count must be at least 2".into(),
        ));
    }
    Ok(())
}

/// Checks a packed slot against the parameter: its element count, and that its zero positions
/// are inside and in increasing order (as `zmap::zero_positions` and the Python store write
/// them). Returns the value range the step clamps the decoded values into.
fn check_slot(slot: SlotIn<'_>, n: usize, what: &str) -> Result<Option<[f32; 2]>> {
    let SlotIn::Packed {
        packed,
        range,
        zeros,
        ..
    } = slot
    else {
        return Ok(None);
    };
    if packed.numel() != n as u64 {
        return Err(Error::Layout(format!(
            "packed {what} holds {} values, the parameter has {n}",
            packed.numel()
        )));
    }
    let mut prev = -1i64;
    for &i in zeros {
        if i <= prev || i >= n as i64 {
            return Err(Error::Layout(format!(
                "{what}: zero index {i} is outside the parameter ({n} values) or out of order"
            )));
        }
        prev = i;
    }
    Ok(range.map(|[lo, hi]| [lo as f32, hi as f32]))
}

/// Sets to 0 the zero positions of a slot that fall in `buf`, which starts at element `start`.
fn restore_zeros(slot: SlotIn<'_>, start: usize, buf: &mut [f32]) {
    if let SlotIn::Packed { zeros, .. } = slot {
        let (lo, hi) = ((start as i64), (start + buf.len()) as i64);
        let from = zeros.partition_point(|&i| i < lo);
        for &i in zeros[from..].iter().take_while(|&&i| i < hi) {
            buf[(i - lo) as usize] = 0.0;
        }
    }
}

/// Decodes a packed slot into `buf` and restores its exact zeros (the slot was checked).
/// Clamping into the range happens in the fused pass, which reads the values anyway; it gives
/// the same values after the zeros are restored as before, since the range was measured on
/// values that included those zeros, so it contains 0.
fn load(slot: SlotIn<'_>, buf: &mut [f32]) -> Result<()> {
    if let SlotIn::Packed { packed, .. } = slot {
        packed.decode_into(DataMut::F32(buf))?;
        restore_zeros(slot, 0, buf);
    }
    Ok(())
}

/// The piece length both packed slots decode in, when the step can decode them piece by piece
/// inside the fused pass (so each piece is updated while it is in cache).
fn shared_pieces(slots: &[SlotIn<'_>]) -> Option<usize> {
    let mut len = None;
    for s in slots {
        let SlotIn::Packed { packed, .. } = s else {
            return None;
        };
        let l = packed.piece_len().filter(|&l| l >= 1024)?;
        if len.is_some_and(|k| k != l) {
            return None;
        }
        len = Some(l);
    }
    len
}

/// torch.clamp with float32 bounds: NaN stays NaN.
#[inline(always)]
fn clamp(x: f32, lo: f32, hi: f32) -> f32 {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

/// torch.maximum: NaN wins.
#[inline(always)]
fn maximum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b > a || b.is_nan() {
        b
    } else {
        a
    }
}

/// Packs a slot's new values the way `_store.encode(zeros="auto")` would.
fn store(buf: &[f32], shape: &[u64], t: Tally, rule: &Rule<'_>) -> Result<SlotOut> {
    let n = buf.len() as u64;
    let zeros = match zmap::layout(n, t.zeros, rule) {
        Layout::Plain => Vec::new(),
        Layout::List => zmap::zero_positions(buf, t.zeros),
        Layout::Map => return Ok(SlotOut::NeedsMap),
    };
    let range = t.range(n);
    let packed = Packed::encode(Data::F32(buf), shape, rule.codec, rule.params)?;
    Ok(SlotOut::Plain {
        packed,
        zeros,
        range,
        stats: None,
    })
}

/// The float32 scalars of one Adam step (see [`AdamScalars`]).
fn adam_scalars(
    h: &AdamStep,
    fresh: bool,
    range_m: Option<[f32; 2]>,
    range_v: Option<[f32; 2]>,
) -> AdamScalars {
    let (b1, b2) = (h.beta1, h.beta2);
    let step = h.step;
    // Python's `b ** step` is libm pow.
    let bc1 = 1.0 - b1.powf(step as f64);
    let bc2 = 1.0 - b2.powf(step as f64);
    AdamScalars {
        maximize: h.maximize,
        decay: (h.weight_decay != 0.0 && h.decoupled)
            .then_some((1.0 - h.lr * h.weight_decay) as f32),
        l2: (h.weight_decay != 0.0 && !h.decoupled).then_some(h.weight_decay as f32),
        guard: (!fresh && h.decoded && h.guard && b1 * b1 < b2)
            .then_some(((1.0 - b2) * (1.0 - b1 * b1 / b2) / ((1.0 - b1) * (1.0 - b1))) as f32),
        // A scaled exp_avg is clamped (its stored values' range) before it is multiplied back.
        range_m,
        range_v,
        w: (1.0 - b1) as f32,
        b2: b2 as f32,
        c2: (1.0 - b2) as f32,
        sqrt_bc2: bc2.sqrt() as f32,
        eps: h.eps as f32,
        step_size: (-h.lr / bc1) as f32,
        fresh,
        unscale: (!fresh && h.scaled_in).then(|| (1.0 / scale_factor(b1, b2, step - 1)) as f32),
        scale: h.scaled_out.then_some(scale_factor(b1, b2, step) as f32),
    }
}

/// The factor of a scaled exp_avg stored at step `step`: `sqrt(1 - beta2^step) / (1 -
/// beta1^step)`, the bias corrections of Adam's update (see [`scaled`]).
pub fn scale_factor(beta1: f64, beta2: f64, step: u64) -> f64 {
    (1.0 - beta2.powf(step as f64)).sqrt() / (1.0 - beta1.powf(step as f64))
}

/// Float32 scalars of an Adam step, rounded as torch rounds Python floats.
#[derive(Clone, Copy)]
struct AdamScalars {
    maximize: bool,
    decay: Option<f32>,
    l2: Option<f32>,
    guard: Option<f32>,
    /// Ranges the decoded exp_avg / exp_avg_sq are clamped into.
    range_m: Option<[f32; 2]>,
    range_v: Option<[f32; 2]>,
    w: f32,
    b2: f32,
    c2: f32,
    sqrt_bc2: f32,
    eps: f32,
    step_size: f32,
    fresh: bool,
    /// The old exp_avg is stored scaled: multiply it back, after clamping both slots, with this
    /// inverse of the factor it was stored with ([`unscaled`]).
    unscale: Option<f32>,
    /// Store the new exp_avg scaled, with this step's factor ([`scale_factor`]).
    scale: Option<f32>,
}

/// The scalar step of one element: the reference the SIMD loops reproduce bit for bit. Returns
/// the new parameter value; with `UPDATE = false` only the moments are computed (the parameter
/// update, its square root and division, is skipped and the return value is not the new
/// parameter). A scaled exp_avg is multiplied back ([`unscaled`]) after the clamps, and the new
/// one is stored scaled ([`scaled`]) where `s.scale` says: the update and the scaling share
/// one square root of the new exp_avg_sq.
#[inline(always)]
fn adam_one<const UPDATE: bool>(s: &AdamScalars, p: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
    let mut g = if s.maximize { -g } else { g };
    let mut p = p;
    if let Some(d) = s.decay {
        p *= d;
    }
    if let Some(wd) = s.l2 {
        g = p.mul_add(wd, g);
    }
    let (mut mi, mut vi) = if s.fresh { (0.0, 0.0) } else { (*m, *v) };
    if let Some([lo, hi]) = s.range_m {
        mi = clamp(mi, lo, hi);
    }
    if let Some([lo, hi]) = s.range_v {
        vi = clamp(vi, lo, hi);
    }
    if let Some(kinv) = s.unscale {
        mi = unscaled(mi, vi, kinv);
    }
    if let Some(c) = s.guard {
        vi = maximum(vi, mi * mi * c);
    }
    // lerp with a small weight: fma(w, g - m, m); addcmul: v*b2 + (c2*g)*g.
    mi = s.w.mul_add(g - mi, mi);
    vi = (s.c2 * g).mul_add(g, vi * s.b2);
    *m = match s.scale {
        Some(k) => scaled(mi, vi, k),
        None => mi,
    };
    *v = vi;
    if UPDATE {
        let denom = vi.sqrt() / s.sqrt_bc2 + s.eps;
        p + s.step_size * mi / denom
    } else {
        p
    }
}

/// The portable loop: [`adam_one`] over a chunk, tallying the new moments.
///
/// # Safety
/// `p` points to `g.len()` floats, written only when `UPDATE`; `m` and `v` have `g.len()`
/// elements.
unsafe fn adam_body<const UPDATE: bool>(
    s: &AdamScalars,
    p: *mut f32,
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> [Tally; 2] {
    let (mut tm, mut tv) = (Tally::EMPTY, Tally::EMPTY);
    for (j, ((&g, m), v)) in g.iter().zip(m.iter_mut()).zip(v.iter_mut()).enumerate() {
        // SAFETY: j < g.len(), the length of the parameter's chunk (the caller's contract).
        let pj = unsafe { p.add(j) };
        // SAFETY: as above; written only when UPDATE, when the caller lends it mutably.
        let np = adam_one::<UPDATE>(s, unsafe { *pj }, g, m, v);
        if UPDATE {
            // SAFETY: as above.
            unsafe { *pj = np };
        }
        tm.add(*m as f64);
        tv.add(*v as f64);
    }
    [tm, tv]
}

/// A zero extreme takes the sign of the first zero in `x`, as the scalar tally's leftmost-wins
/// rule gives (vector min/max do not say which of -0.0 and +0.0 they keep).
fn fix_zero_signs(t: &mut Tally, x: &[f32]) {
    if t.min == 0.0 || t.max == 0.0 {
        if let Some(&z) = x.iter().find(|&&z| z == 0.0) {
            if t.min == 0.0 {
                t.min = z as f64;
            }
            if t.max == 0.0 {
                t.max = z as f64;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{adam_body, sgd_one, AdamScalars, SgdScalars, Tally};
    use std::arch::x86_64::*;

    /// Vector form of [`Tally`]: zero count, NaN flag, NaN-ignoring min and max.
    struct VTally {
        zeros: u64,
        nan: __m256,
        min: __m256,
        max: __m256,
    }

    impl VTally {
        #[target_feature(enable = "avx2")]
        fn new() -> Self {
            VTally {
                zeros: 0,
                nan: _mm256_setzero_ps(),
                min: _mm256_set1_ps(f32::INFINITY),
                max: _mm256_set1_ps(f32::NEG_INFINITY),
            }
        }
        #[target_feature(enable = "avx2,popcnt")]
        fn add(&mut self, x: __m256) {
            let z = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_setzero_ps()));
            self.zeros += z.count_ones() as u64;
            self.nan = _mm256_or_ps(self.nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            // min/max return the second operand when either is NaN: NaN never enters.
            self.min = _mm256_min_ps(x, self.min);
            self.max = _mm256_max_ps(x, self.max);
        }
        #[target_feature(enable = "avx2")]
        fn finish(self) -> Tally {
            let mut lo = [0f32; 8];
            let mut hi = [0f32; 8];
            // SAFETY: both arrays hold 8 floats; unaligned stores.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), self.min);
                _mm256_storeu_ps(hi.as_mut_ptr(), self.max);
            }
            Tally {
                zeros: self.zeros,
                min: lo.into_iter().fold(f32::INFINITY, f32::min) as f64,
                max: hi.into_iter().fold(f32::NEG_INFINITY, f32::max) as f64,
                nan: _mm256_movemask_ps(self.nan) != 0,
            }
        }
    }

    #[target_feature(enable = "avx2")]
    fn clamp(x: __m256, r: Option<[f32; 2]>) -> __m256 {
        match r {
            // torch.clamp keeps NaN: max/min with the bound first return x when x is NaN.
            Some([lo, hi]) => {
                _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x))
            }
            None => x,
        }
    }

    /// Eight lanes of [`adam_one`], the same operations in the same order (IEEE sqrt and
    /// division, fused multiply-adds where the scalar code has `mul_add`), so the same bits.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and POPCNT; `p` points to `g.len()` floats (written only when
    /// `UPDATE`), `m` and `v` have `g.len()` elements.
    #[target_feature(enable = "avx2,fma,popcnt")]
    pub unsafe fn adam<const UPDATE: bool>(
        s: &AdamScalars,
        p: *mut f32,
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> [Tally; 2] {
        let n = g.len();
        let (mut tm, mut tv) = (VTally::new(), VTally::new());
        let neg = _mm256_set1_ps(if s.maximize { -0.0 } else { 0.0 });
        let w = _mm256_set1_ps(s.w);
        let b2 = _mm256_set1_ps(s.b2);
        let c2 = _mm256_set1_ps(s.c2);
        let sqrt_bc2 = _mm256_set1_ps(s.sqrt_bc2);
        let eps = _mm256_set1_ps(s.eps);
        let step_size = _mm256_set1_ps(s.step_size);
        let sign = _mm256_set1_ps(-0.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for all four buffers (same length).
            let (pp, gp, mp, vp) = unsafe {
                (
                    p.add(i),
                    g.as_ptr().add(i),
                    m.as_mut_ptr().add(i),
                    v.as_mut_ptr().add(i),
                )
            };
            // SAFETY: 8 in-bounds floats each (above).
            let (mut pv, mut gv) = unsafe { (_mm256_loadu_ps(pp), _mm256_loadu_ps(gp)) };
            gv = _mm256_xor_ps(gv, neg);
            if let Some(d) = s.decay {
                pv = _mm256_mul_ps(pv, _mm256_set1_ps(d));
            }
            if let Some(wd) = s.l2 {
                gv = _mm256_fmadd_ps(pv, _mm256_set1_ps(wd), gv);
            }
            let (mut mi, mut vi) = if s.fresh {
                (_mm256_setzero_ps(), _mm256_setzero_ps())
            } else {
                // SAFETY: 8 in-bounds floats each (above).
                unsafe { (_mm256_loadu_ps(mp), _mm256_loadu_ps(vp)) }
            };
            mi = clamp(mi, s.range_m);
            vi = clamp(vi, s.range_v);
            if let Some(kinv) = s.unscale {
                // unscaled(): mi * sqrt(vi) * kinv where vi is finite (|vi| < inf), else mi.
                let fin = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_andnot_ps(sign, vi), inf);
                let back =
                    _mm256_mul_ps(_mm256_mul_ps(mi, _mm256_sqrt_ps(vi)), _mm256_set1_ps(kinv));
                mi = _mm256_blendv_ps(mi, back, fin);
            }
            if let Some(c) = s.guard {
                // maximum(vi, b): b wins when vi is NaN, b > vi or b is NaN, that is when
                // not (vi >= b) with unordered counted as true.
                let b = _mm256_mul_ps(_mm256_mul_ps(mi, mi), _mm256_set1_ps(c));
                vi = _mm256_blendv_ps(vi, b, _mm256_cmp_ps::<_CMP_NGE_UQ>(vi, b));
            }
            mi = _mm256_fmadd_ps(w, _mm256_sub_ps(gv, mi), mi);
            vi = _mm256_fmadd_ps(_mm256_mul_ps(c2, gv), gv, _mm256_mul_ps(vi, b2));
            // One square root for the update and the scaling.
            let sq = if UPDATE || s.scale.is_some() {
                _mm256_sqrt_ps(vi)
            } else {
                vi
            };
            if UPDATE {
                let denom = _mm256_add_ps(_mm256_div_ps(sq, sqrt_bc2), eps);
                let upd = _mm256_div_ps(_mm256_mul_ps(step_size, mi), denom);
                // SAFETY: 8 in-bounds floats, lent mutably when UPDATE (the contract).
                unsafe { _mm256_storeu_ps(pp, _mm256_add_ps(pv, upd)) };
            }
            if let Some(k) = s.scale {
                // scaled(): mi / sqrt(vi) * k where 0 < vi < inf, +0 where vi == 0, else mi.
                let zero = _mm256_setzero_ps();
                let pos = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(vi, zero),
                    _mm256_cmp_ps::<_CMP_LT_OQ>(vi, inf),
                );
                let ms = _mm256_mul_ps(_mm256_div_ps(mi, sq), _mm256_set1_ps(k));
                mi = _mm256_blendv_ps(mi, ms, pos);
                mi = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(vi, zero), mi);
            }
            // SAFETY: 8 in-bounds floats each (above).
            unsafe {
                _mm256_storeu_ps(mp, mi);
                _mm256_storeu_ps(vp, vi);
            }
            tm.add(mi);
            tv.add(vi);
            i += 8;
        }
        // SAFETY: the rest of the same buffers, under the same contract.
        let [c, d] = unsafe { adam_body::<UPDATE>(s, p.add(i), &g[i..], &mut m[i..], &mut v[i..]) };
        [tm.finish().then(c), tv.finish().then(d)]
    }

    /// Eight lanes of [`sgd_one`] (same operations, same order, same bits).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and POPCNT; the three slices have the same length.
    #[target_feature(enable = "avx2,fma,popcnt")]
    pub unsafe fn sgd(s: &SgdScalars, p: &mut [f32], g: &[f32], b: &mut [f32]) -> Tally {
        let n = p.len();
        let mut t = VTally::new();
        let neg = _mm256_set1_ps(if s.maximize { -0.0 } else { 0.0 });
        let mom = _mm256_set1_ps(s.mom);
        let keep = _mm256_set1_ps(s.keep);
        let neg_lr = _mm256_set1_ps(s.neg_lr);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for all three slices (same length).
            let (pp, gp, bp) = unsafe {
                (
                    p.as_mut_ptr().add(i),
                    g.as_ptr().add(i),
                    b.as_mut_ptr().add(i),
                )
            };
            // SAFETY: 8 in-bounds floats each (above).
            let (pv, mut gv) = unsafe { (_mm256_loadu_ps(pp), _mm256_loadu_ps(gp)) };
            gv = _mm256_xor_ps(gv, neg);
            if let Some(wd) = s.l2 {
                gv = _mm256_fmadd_ps(pv, _mm256_set1_ps(wd), gv);
            }
            let bi = if s.fresh {
                gv
            } else {
                // SAFETY: 8 in-bounds floats (above).
                let bo = clamp(unsafe { _mm256_loadu_ps(bp) }, s.range);
                _mm256_fmadd_ps(gv, keep, _mm256_mul_ps(bo, mom))
            };
            let d = if s.nesterov {
                _mm256_fmadd_ps(bi, mom, gv)
            } else {
                bi
            };
            // SAFETY: 8 in-bounds floats each (above).
            unsafe {
                _mm256_storeu_ps(bp, bi);
                _mm256_storeu_ps(pp, _mm256_fmadd_ps(d, neg_lr, pv));
            }
            t.add(bi);
            i += 8;
        }
        let mut out = t.finish();
        for j in i..n {
            sgd_one(s, &mut p[j], g[j], &mut b[j]);
            out.add(b[j] as f64);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{adam_body, AdamScalars, Tally};
    use std::arch::x86_64::*;

    /// Sixteen-lane [`Tally`]: zero count, NaN flag, NaN-ignoring min and max.
    struct VTally {
        zeros: u64,
        nan: __mmask16,
        min: __m512,
        max: __m512,
    }

    impl VTally {
        #[target_feature(enable = "avx512f")]
        fn new() -> Self {
            VTally {
                zeros: 0,
                nan: 0,
                min: _mm512_set1_ps(f32::INFINITY),
                max: _mm512_set1_ps(f32::NEG_INFINITY),
            }
        }
        #[target_feature(enable = "avx512f,popcnt")]
        fn add(&mut self, x: __m512) {
            let z = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, _mm512_setzero_ps());
            self.zeros += z.count_ones() as u64;
            self.nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            // min/max return the second operand when either is NaN: NaN never enters.
            self.min = _mm512_min_ps(x, self.min);
            self.max = _mm512_max_ps(x, self.max);
        }
        #[target_feature(enable = "avx512f")]
        fn finish(self) -> Tally {
            let mut lo = [0f32; 16];
            let mut hi = [0f32; 16];
            // SAFETY: both arrays hold 16 floats; unaligned stores.
            unsafe {
                _mm512_storeu_ps(lo.as_mut_ptr(), self.min);
                _mm512_storeu_ps(hi.as_mut_ptr(), self.max);
            }
            Tally {
                zeros: self.zeros,
                min: lo.into_iter().fold(f32::INFINITY, f32::min) as f64,
                max: hi.into_iter().fold(f32::NEG_INFINITY, f32::max) as f64,
                nan: self.nan != 0,
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    fn clamp(x: __m512, r: Option<[f32; 2]>) -> __m512 {
        match r {
            // torch.clamp keeps NaN: max/min with the bound first return x when x is NaN.
            Some([lo, hi]) => {
                _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), x))
            }
            None => x,
        }
    }

    /// Sixteen lanes of [`super::adam_one`]: the AVX2 loop's operations, in its order.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and DQ, FMA and POPCNT; `p` points to `g.len()` floats (written
    /// only when `UPDATE`), `m` and `v` have `g.len()` elements.
    #[target_feature(enable = "avx512f,avx512dq,fma,popcnt")]
    pub unsafe fn adam<const UPDATE: bool>(
        s: &AdamScalars,
        p: *mut f32,
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> [Tally; 2] {
        let n = g.len();
        let (mut tm, mut tv) = (VTally::new(), VTally::new());
        let neg = _mm512_set1_ps(if s.maximize { -0.0 } else { 0.0 });
        let w = _mm512_set1_ps(s.w);
        let b2 = _mm512_set1_ps(s.b2);
        let c2 = _mm512_set1_ps(s.c2);
        let sqrt_bc2 = _mm512_set1_ps(s.sqrt_bc2);
        let eps = _mm512_set1_ps(s.eps);
        let step_size = _mm512_set1_ps(s.step_size);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n for all four buffers (same length).
            let (pp, gp, mp, vp) = unsafe {
                (
                    p.add(i),
                    g.as_ptr().add(i),
                    m.as_mut_ptr().add(i),
                    v.as_mut_ptr().add(i),
                )
            };
            // SAFETY: 16 in-bounds floats each (above).
            let (mut pv, mut gv) = unsafe { (_mm512_loadu_ps(pp), _mm512_loadu_ps(gp)) };
            gv = _mm512_xor_ps(gv, neg);
            if let Some(d) = s.decay {
                pv = _mm512_mul_ps(pv, _mm512_set1_ps(d));
            }
            if let Some(wd) = s.l2 {
                gv = _mm512_fmadd_ps(pv, _mm512_set1_ps(wd), gv);
            }
            let (mut mi, mut vi) = if s.fresh {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            } else {
                // SAFETY: 16 in-bounds floats each (above).
                unsafe { (_mm512_loadu_ps(mp), _mm512_loadu_ps(vp)) }
            };
            mi = clamp(mi, s.range_m);
            vi = clamp(vi, s.range_v);
            if let Some(kinv) = s.unscale {
                // unscaled(): mi * sqrt(vi) * kinv where vi is finite, else mi (NaN and +-Inf
                // are fpclass 0x99).
                let fin = !_mm512_fpclass_ps_mask::<0x99>(vi);
                let back = _mm512_mul_ps(mi, _mm512_sqrt_ps(vi));
                mi = _mm512_mask_mul_ps(mi, fin, back, _mm512_set1_ps(kinv));
            }
            if let Some(c) = s.guard {
                // b wins when not (vi >= b), unordered counted as true (torch.maximum).
                let b = _mm512_mul_ps(_mm512_mul_ps(mi, mi), _mm512_set1_ps(c));
                vi = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_NGE_UQ>(vi, b), vi, b);
            }
            mi = _mm512_fmadd_ps(w, _mm512_sub_ps(gv, mi), mi);
            vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, gv), gv, _mm512_mul_ps(vi, b2));
            // One square root for the update and the scaling.
            let sq = if UPDATE || s.scale.is_some() {
                _mm512_sqrt_ps(vi)
            } else {
                vi
            };
            if UPDATE {
                let denom = _mm512_add_ps(_mm512_div_ps(sq, sqrt_bc2), eps);
                let upd = _mm512_div_ps(_mm512_mul_ps(step_size, mi), denom);
                // SAFETY: 16 in-bounds floats, lent mutably when UPDATE (the contract).
                unsafe { _mm512_storeu_ps(pp, _mm512_add_ps(pv, upd)) };
            }
            if let Some(k) = s.scale {
                // scaled(): mi / sqrt(vi) * k where 0 < vi < inf, +0 where vi == 0, else mi.
                let zero = _mm512_setzero_ps();
                let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(vi, zero)
                    & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(vi, _mm512_set1_ps(f32::INFINITY));
                let ms = _mm512_div_ps(mi, sq);
                mi = _mm512_mask_mul_ps(mi, pos, ms, _mm512_set1_ps(k));
                mi = _mm512_mask_mov_ps(mi, _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(vi, zero), zero);
            }
            // SAFETY: 16 in-bounds floats each (above).
            unsafe {
                _mm512_storeu_ps(mp, mi);
                _mm512_storeu_ps(vp, vi);
            }
            tm.add(mi);
            tv.add(vi);
            i += 16;
        }
        // SAFETY: the rest of the same buffers, under the same contract.
        let [c, d] = unsafe { adam_body::<UPDATE>(s, p.add(i), &g[i..], &mut m[i..], &mut v[i..]) };
        [tm.finish().then(c), tv.finish().then(d)]
    }
}

/// One chunk of the step: parameter updated in place, new moments in `m`, `v` (exp_avg scaled
/// where the step stores it so), their tallies.
fn adam_chunk(
    s: &AdamScalars,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> [Tally; 2] {
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len());
    // SAFETY: four slices of one length, the parameter lent mutably.
    unsafe { adam_kernel::<true>(s, p.as_mut_ptr(), g, m, v) }
}

/// [`adam_chunk`] without the parameter update: the new moments and their tallies only (the
/// first pass of [`adam_two_pass`], which needs the statistics of the new state before any of
/// it is encoded). The moments are the same bits as [`adam_chunk`]'s.
fn moments_chunk(
    s: &AdamScalars,
    p: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> [Tally; 2] {
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len());
    // SAFETY: four slices of one length; with UPDATE = false the kernels only read `p`.
    unsafe { adam_kernel::<false>(s, p.as_ptr().cast_mut(), g, m, v) }
}

/// exp_avg as stored scaled, from its value `m`, exp_avg_sq's `v` and the step's factor `k`
/// ([`scale_factor`]): `m / sqrt(v) * k`, Adam's update direction `(m / bc1) / sqrt(v / bc2)`,
/// so every element is coded with the same precision relative to its own update, however
/// small its gradients (coded as is, the elements with small gradients are rounded on a grid
/// set by the large ones, and their updates, which divide by their small `sqrt(v)`, take that
/// rounding noise magnified), and the values' spread stays put from step to step (the bias
/// corrections). 0 where `v` is 0 (there `m` is 0 too: `m^2 <= v (1-beta1)^2 /
/// ((1-beta2)(1-beta1^2/beta2))` for zero-started moments); `m` itself where `v` is not
/// finite. [`unscaled`] inverts it.
#[inline(always)]
pub fn scaled(m: f32, v: f32, k: f32) -> f32 {
    if v > 0.0 && v < f32::INFINITY {
        m / v.sqrt() * k
    } else if v == 0.0 {
        0.0
    } else {
        m
    }
}

/// exp_avg from its scaled value `ms`, exp_avg_sq's decoded value `v` and the inverse `kinv`
/// of the factor it was stored with: `ms * sqrt(v) * kinv`, or `ms` where `v` is not finite
/// (see [`scaled`]).
#[inline(always)]
pub fn unscaled(ms: f32, v: f32, kinv: f32) -> f32 {
    if v.is_finite() {
        ms * v.sqrt() * kinv
    } else {
        ms
    }
}

/// The widest kernel the CPU runs.
///
/// # Safety
/// `p` points to `g.len()` floats, written only when `UPDATE`; `m`, `v` have `g.len()` elements.
unsafe fn adam_kernel<const UPDATE: bool>(
    s: &AdamScalars,
    p: *mut f32,
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> [Tally; 2] {
    #[cfg(target_arch = "x86_64")]
    {
        let tallies = if crate::simd::avx512() {
            // SAFETY: the CPU has the features the function is compiled for; lengths as above.
            Some(unsafe { avx512::adam::<UPDATE>(s, p, g, m, v) })
        } else if crate::simd::avx2() {
            // SAFETY: as above.
            Some(unsafe { avx2::adam::<UPDATE>(s, p, g, m, v) })
        } else {
            None
        };
        if let Some([mut a, mut b]) = tallies {
            fix_zero_signs(&mut a, m);
            fix_zero_signs(&mut b, v);
            return [a, b];
        }
    }
    // SAFETY: the caller's contract.
    unsafe { adam_body::<UPDATE>(s, p, g, m, v) }
}

/// One Adam/AdamW step of one parameter: `param` updated in place from `grad`; `exp_avg` and
/// `exp_avg_sq` are the slots' buffers (same length as `param`; their contents on entry matter
/// only for [`SlotIn::Dense`]); returns how each slot is stored.
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    h: &AdamStep,
    param: &mut [f32],
    grad: &[f32],
    shape: &[u64],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    slots: [SlotIn<'_>; 2],
    rules: [Rule<'_>; 2],
) -> Result<[SlotOut; 2]> {
    let n = param.len();
    check_len("grad", grad.len(), n)?;
    check_len("exp_avg buffer", exp_avg.len(), n)?;
    check_len("exp_avg_sq buffer", exp_avg_sq.len(), n)?;
    let fresh = matches!(slots[0], SlotIn::Fresh);
    if fresh != matches!(slots[1], SlotIn::Fresh) {
        return Err(Error::Layout(
            "exp_avg and exp_avg_sq must both be present or both absent".into(),
        ));
    }
    check_step(h, fresh)?;
    let range_m = check_slot(slots[0], n, "exp_avg")?;
    let range_v = check_slot(slots[1], n, "exp_avg_sq")?;
    let pieces = shared_pieces(&slots);
    if pieces.is_none() {
        load(slots[0], exp_avg)?;
        load(slots[1], exp_avg_sq)?;
    }
    let s = adam_scalars(h, fresh, range_m, range_v);
    // With packed slots decodable in pieces, each task decodes its piece of both slots and
    // updates it while it is in cache; otherwise the slots were decoded whole above.
    let task = pieces.unwrap_or(TASK);
    let items: Vec<_> = param
        .chunks_mut(task)
        .zip(grad.chunks(task))
        .zip(exp_avg.chunks_mut(task))
        .zip(exp_avg_sq.chunks_mut(task))
        .enumerate()
        .collect();
    let tallies: Vec<[Tally; 2]> = crate::pool::map_items(
        items,
        || (),
        |_, (i, (((p, g), m), v))| {
            if pieces.is_some() {
                for (slot, buf) in slots.iter().zip([&mut *m, &mut *v]) {
                    if let SlotIn::Packed { packed, .. } = slot {
                        packed.decode_piece(i, DataMut::F32(buf))?;
                    }
                    restore_zeros(*slot, i * task, buf);
                }
            }
            Ok(adam_chunk(&s, p, g, m, v))
        },
    )
    .into_iter()
    .collect::<Result<_>>()?;
    let [tm, tv] = tallies
        .into_iter()
        .fold([Tally::EMPTY; 2], |[a, b], [c, d]| [a.then(c), b.then(d)]);
    Ok([
        store(exp_avg, shape, tm, &rules[0])?,
        store(exp_avg_sq, shape, tv, &rules[1])?,
    ])
}

/// Which way [`adam_step_pieces`] ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPath {
    /// On whole buffers ([`adam_step`]).
    Whole,
    /// Two passes over the pieces: the exact statistics first, then the update and the encode.
    TwoPass,
    /// One pass, encoded with the provisional statistics, which were accepted for both slots.
    OnePass,
    /// A first pass gathering exp_avg's exact statistics alone, then one pass with exp_avg_sq's
    /// provisional statistics, which were accepted.
    ExpAvgFirst,
    /// A first pass over every few pieces sampling the statistics the slots did not bring,
    /// then one pass with them, which were accepted.
    Sampled,
    /// One pass, then the slots marked true encoded again with the exact statistics (their
    /// provisional statistics were rejected, or they need a zero map).
    Redone([bool; 2]),
    /// [`StepPath::Sampled`]'s first pass, then as [`StepPath::Redone`].
    SampledRedone([bool; 2]),
}

impl StepPath {
    /// A short name (what the Python optimizer counts).
    pub fn name(self) -> &'static str {
        match self {
            StepPath::Whole => "whole",
            StepPath::TwoPass => "two-pass",
            StepPath::OnePass => "one-pass",
            StepPath::ExpAvgFirst => "exp_avg-first",
            StepPath::Sampled => "sampled",
            StepPath::Redone([true, true]) => "redone-both",
            StepPath::Redone([true, false]) => "redone-exp_avg",
            StepPath::Redone([false, _]) => "redone-exp_avg_sq",
            StepPath::SampledRedone([true, true]) => "sampled, redone-both",
            StepPath::SampledRedone([true, false]) => "sampled, redone-exp_avg",
            StepPath::SampledRedone([false, _]) => "sampled, redone-exp_avg_sq",
        }
    }
}

/// Parameters of at least this many pieces without settled statistics sample them from every
/// few pieces ([`StepPath::Sampled`]) rather than reading every piece twice: 16 pieces of the
/// default 65,536 values, 1M values.
const SAMPLED_MIN_PIECES: usize = 16;

/// The accepted ratio of the provisional to the exact spread: a grid at most 1% coarser than
/// the exact one (the quantization error grows with the step), at most 3% finer (more values
/// fall beyond the outlier threshold).
const SPREAD_RATIO: std::ops::RangeInclusive<f64> = 0.97..=1.01;
/// The accepted distance of the provisional mean from the exact one, in exact spreads.
const MEAN_SHIFT: f64 = 0.05;

/// Whether a grid set from the provisional statistics `used` codes values whose exact
/// statistics are `exact` about as well as their own grid would (both in the codec's domain).
/// The caller keeping the statistics asks the same of the statistics it kept and the ones a
/// step returns: only a slot whose statistics moved this little between two steps is worth a
/// one-pass try next step (a rejected try costs more than the two passes).
pub fn accepts(used: &Stats, exact: &Stats) -> bool {
    SPREAD_RATIO.contains(&(used.std / exact.std))
        && (used.mean - exact.mean).abs() <= MEAN_SHIFT * exact.std
}

/// [`adam_step`] without whole-parameter buffers: where the state is packed SmaQ decodable in
/// pieces (or fresh) and the new state is SmaQ with exact statistics in pieces of the same
/// length, the step runs over the pieces, each worker holding one piece of each slot. The new
/// state's code needs its statistics (mean and spread, for exp_avg_sq in the log domain of
/// ln v) before any piece is encoded; they come one of two ways.
///
/// **One pass** (the steady state): the slots carry provisional statistics (the exact
/// statistics of the previous step's new state, [`SlotOut::Plain`]'s `stats`), and the new
/// state does not depend on the old parameter (decoupled weight decay, or none: with L2 weight
/// decay the gradient, so the moments, read the parameter). Each piece is decoded, stepped
/// (parameter in place), encoded with the provisional statistics, and its exact moments,
/// zeros and range are gathered while it is in cache. After the pass each slot's provisional
/// statistics are compared with the exact ones ([`accepts`]): a spread ratio (provisional over
/// exact) within [0.97, 1.01], the means within 0.05 exact spreads. An accepted slot keeps its
/// bytes, which are ordinary SmaQ bytes whose header records the statistics its grid was set
/// from. A rejected slot, or one whose zeros now need a zero map, is done again: its old state
/// decoded once more and its new state recomputed (the moments only, the same bits: nothing in
/// them reads the parameter, which has moved), then encoded with the exact statistics, as the
/// two-pass step encodes it (or returned as [`SlotOut::Dense`]). A rejected step costs about
/// what the two passes cost, plus the wasted encode.
///
/// **A sampled first pass, then one pass** (no provisional statistics for a slot, on a
/// parameter of [`SAMPLED_MIN_PIECES`] pieces or more, without L2 weight decay): a moments-only
/// pass over every few pieces (every `clamp(pieces / 8, 1, 8)`-th: at least 8 pieces, at most
/// one in 8) gives statistics for the slots that brought none, and the one pass above codes
/// with them, its check catching a sample that missed how the rest of the state moved (that
/// slot is then done again with the exact statistics). At most half, on large parameters 1/8, of a moments pass instead of a whole
/// one.
///
/// **Two passes** (smaller parameters without provisional statistics, L2 weight decay):
///
/// 1. decode the piece, compute its new exp_avg / exp_avg_sq (the moments only: the parameter is
///    read, not updated), tally zeros, range and the statistics the new state's code needs;
///    nothing is kept;
/// 2. decode the piece again, update the parameter in place, and encode the new state's piece
///    with those statistics ([`crate::codec::smaq::PieceEncoder`]).
///
/// Every way computes the parameter and the float32 new state bit for bit as [`adam_step`]
/// does (the update reads the exact new state, not its quantized code); the statistics are
/// the exact ones (with pieces of 65,536 values, the SmaQ default, [`adam_step`]'s bits, so the
/// two-pass bytes are [`adam_step`]'s), and every way returns them with each slot. The process
/// grows by about the packed state, not by two dense copies of the largest parameter.
/// Elsewhere (dense or zero-mapped state, other codecs, sampled statistics, a new state that
/// needs a zero map in the two-pass step) it runs [`adam_step`] on buffers it allocates for the
/// call, and a slot needing a zero map comes back as [`SlotOut::Dense`].
pub fn adam_step_pieces(
    h: &AdamStep,
    param: &mut [f32],
    grad: &[f32],
    shape: &[u64],
    slots: [SlotIn<'_>; 2],
    rules: [Rule<'_>; 2],
) -> Result<([SlotOut; 2], StepPath)> {
    let n = param.len();
    check_len("grad", grad.len(), n)?;
    match pieces_plan(&slots, &rules, n) {
        Some(plan) => adam_pieces(h, param, grad, shape, slots, rules, plan),
        None => Ok((
            adam_whole(h, param, grad, shape, slots, rules)?,
            StepPath::Whole,
        )),
    }
}

/// [`adam_step`] on buffers allocated for the call; a slot that needs a zero map is returned
/// with its values.
fn adam_whole(
    h: &AdamStep,
    param: &mut [f32],
    grad: &[f32],
    shape: &[u64],
    slots: [SlotIn<'_>; 2],
    rules: [Rule<'_>; 2],
) -> Result<[SlotOut; 2]> {
    let n = param.len();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let [a, b] = adam_step(h, param, grad, shape, &mut m, &mut v, slots, rules)?;
    let dense = |o: SlotOut, buf: Vec<f32>| match o {
        SlotOut::NeedsMap => SlotOut::Dense(buf),
        o => o,
    };
    Ok([dense(a, m), dense(b, v)])
}

/// What the piece-wise step needs: the piece length and the new state's SmaQ configurations.
struct PiecePlan {
    len: usize,
    cfgs: [SmaqConfig; 2],
}

fn pieces_plan(slots: &[SlotIn<'_>; 2], rules: &[Rule<'_>; 2], n: usize) -> Option<PiecePlan> {
    let fresh = slots.iter().all(|s| matches!(s, SlotIn::Fresh));
    let decoded = if fresh {
        None
    } else {
        Some(shared_pieces(slots)?)
    };
    let cfg = |r: &Rule<'_>| {
        (r.codec == "smaq")
            .then(|| SmaqConfig::from_params(r.params).ok())
            .flatten()
            .filter(|c| c.sampling == crate::stats::Sampling::Exact && n >= c.min_size as usize)
    };
    let cfgs = [cfg(&rules[0])?, cfg(&rules[1])?];
    let len = cfgs[0].chunk_size as usize;
    (cfgs[1].chunk_size as usize == len && decoded.is_none_or(|d| d == len) && n > 0)
        .then_some(PiecePlan { len, cfgs })
}

/// Provisional statistics a slot carries, when they can set a grid (finite, positive spread).
fn provisional(slot: &SlotIn<'_>) -> Option<Stats> {
    match slot {
        SlotIn::Packed { stats: Some(s), .. }
            if s.mean.is_finite() && s.std.is_finite() && s.std > 0.0 =>
        {
            Some(*s)
        }
        _ => None,
    }
}

/// What every pass of one piece-wise step shares.
#[derive(Clone, Copy)]
struct Base<'a> {
    s: &'a AdamScalars,
    slots: &'a [SlotIn<'a>; 2],
    grad: &'a [f32],
    len: usize,
    cfgs: &'a [SmaqConfig; 2],
}

impl<'a> Base<'a> {
    /// A pass: `update` the parameter (else compute the moments only); per slot, encode with
    /// `encs`, collect zero positions (`zeros`), gather the exact statistics (`stats`).
    fn pass<'e>(
        self,
        update: bool,
        encs: [Option<&'e PieceEncoder>; 2],
        zeros: [bool; 2],
        stats: [bool; 2],
    ) -> Pass<'a, 'e> {
        Pass {
            base: self,
            update,
            encs,
            zeros,
            stats,
            decode: [true; 2],
            stride: 1,
        }
    }

    /// A moments-only pass over every `stride`-th piece gathering the statistics of the slots
    /// marked in `stats`: exp_avg_sq is decoded only where its statistics or a scaled exp_avg
    /// (multiplied back with the old exp_avg_sq, scaled with the new) need it.
    fn moments_pass<'e>(self, stats: [bool; 2], stride: usize) -> Pass<'a, 'e> {
        let scaled = self.s.unscale.is_some() || self.s.scale.is_some();
        let mut p = self.pass(false, [None, None], [false; 2], stats);
        p.decode = [true, stats[1] || scaled];
        p.stride = stride;
        p
    }
}

/// One pass of the piece-wise step over every piece: decode, step (the parameter updated or
/// only read), and per slot what is asked: encode, collect zero positions, copy the values out,
/// gather the exact statistics.
struct Pass<'a, 'e> {
    base: Base<'a>,
    /// Update the parameter (else compute the moments only).
    update: bool,
    /// Per slot: the encoder of its new values.
    encs: [Option<&'e PieceEncoder>; 2],
    /// Per slot: collect the positions of exact zeros.
    zeros: [bool; 2],
    /// Per slot: gather the exact statistics of the new values.
    stats: [bool; 2],
    /// Per slot: decode the old state (else the slot's new values are computed from zeros and
    /// must not be used: a moments-only pass after one slot's statistics).
    decode: [bool; 2],
    /// Visit every `stride`-th piece only (1: all; more: a moments-only pass sampling the new
    /// state's statistics).
    stride: usize,
}

/// One piece's work: the parameter's piece, and per slot where its primary stream goes and
/// where its values are copied to.
struct Item<'b> {
    i: usize,
    p: &'b mut [f32],
    prim: [Option<Primary<'b>>; 2],
    dense: [Option<&'b mut [f32]>; 2],
}

/// What one piece gives back.
struct PieceOut {
    tallies: [Tally; 2],
    enc: [Option<EncodedPiece>; 2],
    zeros: [Vec<i64>; 2],
    moments: [Option<PieceMoments>; 2],
}

/// A worker's reusable buffers.
#[derive(Default)]
struct Work {
    m: Vec<f32>,
    v: Vec<f32>,
    sbuf: Vec<f32>,
    scratch: PieceScratch,
}

/// One slot after a [`Pass`].
struct SlotPass {
    tally: Tally,
    pieces: Vec<EncodedPiece>,
    zeros: Vec<i64>,
    stats: PieceStats,
}

/// Where each slot of a pass writes: the encoders' primary streams (empty when the slot is
/// not encoded) and the dense copies.
type Sinks<'b> = ([Vec<Primary<'b>>; 2], [Option<&'b mut [f32]>; 2]);

impl Pass<'_, '_> {
    /// Piece `it.i`. The statistics go into `first` (in order: the pieces before the shift of
    /// the sums is known) or come back as moments around `shift`.
    fn piece(
        &self,
        it: Item<'_>,
        mut first: Option<&mut [PieceStats; 2]>,
        shift: [f64; 2],
        w: &mut Work,
    ) -> Result<PieceOut> {
        let Item { i, p, prim, dense } = it;
        let b = &self.base;
        let (lo, k) = (i * b.len, p.len());
        let g = &b.grad[lo..lo + k];
        w.m.resize(k, 0.0);
        w.v.resize(k, 0.0);
        for (j, buf) in [&mut w.m, &mut w.v].into_iter().enumerate() {
            let slot = b.slots[j];
            if !self.decode[j] {
                buf.fill(0.0);
                continue;
            }
            if let SlotIn::Packed { packed, .. } = slot {
                packed.decode_piece(i, DataMut::F32(buf))?;
            }
            restore_zeros(slot, lo, buf);
        }
        let tallies = if self.update {
            adam_chunk(b.s, p, g, &mut w.m, &mut w.v)
        } else {
            moments_chunk(b.s, p, g, &mut w.m, &mut w.v)
        };
        let mut out = PieceOut {
            tallies,
            enc: [None, None],
            zeros: [Vec::new(), Vec::new()],
            moments: [None, None],
        };
        let Work {
            m,
            v,
            sbuf,
            scratch,
        } = w;
        for (j, (x, (prim, dense))) in [&*m, &*v]
            .into_iter()
            .zip(prim.into_iter().zip(dense))
            .enumerate()
        {
            if let (Some(e), Some(mut b)) = (self.encs[j], prim) {
                out.enc[j] = Some(e.encode_piece(i, x, b.bytes(), scratch)?);
            }
            if let Some(d) = dense {
                d.copy_from_slice(x);
            }
            let z = tallies[j].zeros;
            if self.zeros[j] && z > 0 {
                out.zeros[j] = zmap::zero_positions(x, z);
                out.zeros[j].iter_mut().for_each(|at| *at += lo as i64);
            }
            if self.stats[j] {
                let cfg = &b.cfgs[j];
                // Without zeros the encoder's log-domain values are the statistics' values
                // (they differ only at zeros): no second logarithm.
                let sv = if cfg.log && z == 0 && out.enc[j].is_some() {
                    scratch.logs()
                } else {
                    cfg.stat_values(x, sbuf)
                };
                match first.as_deref_mut() {
                    Some(ps) => ps[j].add(sv),
                    None => out.moments[j] = Some(PieceStats::moments(sv, shift[j])),
                }
            }
        }
        Ok(out)
    }

    /// Runs over every piece of `param`: in order until the shift of each gathered slot's sums
    /// is known (its first finite value: usually piece 0 alone), then in parallel.
    fn run(&self, param: &mut [f32], sinks: Sinks<'_>) -> Result<[SlotPass; 2]> {
        let len = self.base.len;
        let ([pm, pv], [dm, dv]) = sinks;
        let mut pm = pm.into_iter();
        let mut pv = pv.into_iter();
        let mut dm = dm.map(|d| d.chunks_mut(len));
        let mut dv = dv.map(|d| d.chunks_mut(len));
        let mut items = Vec::with_capacity(param.len().div_ceil(len));
        for (i, p) in param.chunks_mut(len).enumerate() {
            let it = Item {
                i,
                p,
                prim: [pm.next(), pv.next()],
                dense: [
                    dm.as_mut().and_then(|d| d.next()),
                    dv.as_mut().and_then(|d| d.next()),
                ],
            };
            if i % self.stride == 0 {
                items.push(it);
            }
        }
        let mut ps = [PieceStats::new(), PieceStats::new()];
        let mut outs = Vec::with_capacity(items.len());
        let mut items = items.into_iter();
        let mut w = Work::default();
        while (0..2).any(|j| self.stats[j] && ps[j].shift().is_none()) {
            let Some(it) = items.next() else { break };
            outs.push(self.piece(it, Some(&mut ps), [0.0; 2], &mut w)?);
        }
        drop(w);
        let shift = [0, 1].map(|j| ps[j].shift().unwrap_or(0.0));
        let rest: Vec<Item<'_>> = items.collect();
        let more: Vec<PieceOut> =
            crate::pool::map_items(rest, Work::default, |w, it| self.piece(it, None, shift, w))
                .into_iter()
                .collect::<Result<_>>()?;
        let mut res = ps.map(|stats| SlotPass {
            tally: Tally::EMPTY,
            pieces: Vec::new(),
            zeros: Vec::new(),
            stats,
        });
        for o in outs.into_iter().chain(more) {
            let PieceOut {
                tallies,
                enc,
                zeros,
                moments,
            } = o;
            for (j, ((e, z), mo)) in enc.into_iter().zip(zeros).zip(moments).enumerate() {
                let r = &mut res[j];
                r.tally = r.tally.then(tallies[j]);
                r.pieces.extend(e);
                r.zeros.extend(z);
                // The pieces gathered in order added theirs already (and come first).
                if let Some(mo) = mo {
                    r.stats.merge(mo);
                }
            }
        }
        Ok(res)
    }
}

/// Packs the encoded pieces of one slot.
fn pack(
    enc: PieceEncoder,
    out: PieceOutput,
    pieces: Vec<EncodedPiece>,
    shape: &[u64],
) -> Result<Packed> {
    let lead = Packed::head_len(shape);
    let version = enc.format_version();
    let (bytes, meta_len) = enc.finish(out, pieces, lead)?;
    Packed::from_encoding(
        bytes,
        meta_len,
        version,
        crate::dtype::DType::F32,
        &crate::codec::smaq::INFO,
        shape,
    )
}

/// The output buffer of an encoder, as the packed record lays it out.
fn output(enc: &PieceEncoder, shape: &[u64]) -> PieceOutput {
    enc.output(Packed::head_len(shape), crate::format::CHECKSUM_LEN)
}

/// An encoder for `n` values with these statistics (the plan made sure there is one).
fn encoder(cfg: &SmaqConfig, n: usize, stats: Stats) -> Result<PieceEncoder> {
    cfg.piece_encoder(n, stats)
        .ok_or_else(|| Error::Layout("the piece-wise step found no piece encoder".into()))
}

/// The piece-wise step (see [`adam_step_pieces`]): one pass where the slots carry provisional
/// statistics and the new state does not read the parameter, else two.
#[allow(clippy::too_many_arguments)]
fn adam_pieces(
    h: &AdamStep,
    param: &mut [f32],
    grad: &[f32],
    shape: &[u64],
    slots: [SlotIn<'_>; 2],
    rules: [Rule<'_>; 2],
    plan: PiecePlan,
) -> Result<([SlotOut; 2], StepPath)> {
    let n = param.len();
    let range_m = check_slot(slots[0], n, "exp_avg")?;
    let range_v = check_slot(slots[1], n, "exp_avg_sq")?;
    check_step(h, matches!(slots[0], SlotIn::Fresh))?;
    let s = adam_scalars(h, matches!(slots[0], SlotIn::Fresh), range_m, range_v);
    let base = Base {
        s: &s,
        slots: &slots,
        grad,
        len: plan.len,
        cfgs: &plan.cfgs,
    };
    // The one pass recomputes a rejected slot's new state after the parameter moved: only
    // sound when nothing in the moments reads the parameter (no L2 term in the gradient).
    if let (Some(pm), Some(pv), None) = (provisional(&slots[0]), provisional(&slots[1]), s.l2) {
        return one_pass(param, shape, &rules, &plan, [pm, pv], base);
    }
    // A large parameter without settled statistics: a first pass over every few pieces
    // (moments only) samples them, then one pass (a sample too far from the exact statistics
    // is caught by the one pass's check, and that slot is coded again with the exact ones).
    let pieces = n.div_ceil(plan.len);
    if s.l2.is_none() && pieces >= SAMPLED_MIN_PIECES {
        let kept = [provisional(&slots[0]), provisional(&slots[1])];
        let [m, v] = base
            .moments_pass(kept.map(|k| k.is_none()), (pieces / 8).clamp(1, 8))
            .run(param, ([Vec::new(), Vec::new()], [None, None]))?;
        let sampled = [
            kept[0].unwrap_or_else(|| m.stats.finish(plan.cfgs[0].spread)),
            kept[1].unwrap_or_else(|| v.stats.finish(plan.cfgs[1].spread)),
        ];
        let (out, path) = one_pass(param, shape, &rules, &plan, sampled, base)?;
        let path = match path {
            StepPath::OnePass => StepPath::Sampled,
            StepPath::Redone(r) => StepPath::SampledRedone(r),
            p => p,
        };
        return Ok((out, path));
    }
    // Only exp_avg_sq brings statistics (exp_avg's move more from step to step than
    // exp_avg_sq's log-domain ones): a first pass gathering exp_avg's alone (no logarithm taken;
    // exp_avg_sq not even decoded unless exp_avg is scaled) gives its exact statistics, then
    // one pass.
    if let (None, Some(pv), None, SlotIn::Packed { .. }) = (
        provisional(&slots[0]),
        provisional(&slots[1]),
        s.l2,
        slots[0],
    ) {
        let [m, _] = base
            .moments_pass([true, false], 1)
            .run(param, ([Vec::new(), Vec::new()], [None, None]))?;
        let pm = m.stats.finish(plan.cfgs[0].spread);
        let (out, path) = one_pass(param, shape, &rules, &plan, [pm, pv], base)?;
        let path = match path {
            StepPath::OnePass => StepPath::ExpAvgFirst,
            p => p,
        };
        return Ok((out, path));
    }
    // Pass 1: the new state's exact statistics, tallies (the parameter left alone).
    let first = base
        .pass(false, [None, None], [false; 2], [true; 2])
        .run(param, ([Vec::new(), Vec::new()], [None, None]))?;
    let layouts = [0, 1].map(|j| zmap::layout(n as u64, first[j].tally.zeros, &rules[j]));
    if layouts.contains(&Layout::Map) {
        return Ok((
            adam_whole(h, param, grad, shape, slots, rules)?,
            StepPath::Whole,
        ));
    }
    let exact = [0, 1].map(|j| first[j].stats.finish(plan.cfgs[j].spread));
    let em = encoder(&plan.cfgs[0], n, exact[0])?;
    let ev = encoder(&plan.cfgs[1], n, exact[1])?;
    // Pass 2: the same values again, the parameter updated, each new piece encoded in place.
    let (mut out_m, mut out_v) = (output(&em, shape), output(&ev, shape));
    let [a, b] = base
        .pass(
            true,
            [Some(&em), Some(&ev)],
            layouts.map(|l| l == Layout::List),
            [false; 2],
        )
        .run(
            param,
            ([out_m.primaries(), out_v.primaries()], [None, None]),
        )?;
    Ok((
        [
            SlotOut::Plain {
                packed: pack(em, out_m, a.pieces, shape)?,
                zeros: a.zeros,
                range: a.tally.range(n as u64),
                stats: Some(exact[0]),
            },
            SlotOut::Plain {
                packed: pack(ev, out_v, b.pieces, shape)?,
                zeros: b.zeros,
                range: b.tally.range(n as u64),
                stats: Some(exact[1]),
            },
        ],
        StepPath::TwoPass,
    ))
}

/// The one pass of [`adam_step_pieces`], with the provisional statistics `prov`, and the
/// second encode of the slots that need it.
fn one_pass(
    param: &mut [f32],
    shape: &[u64],
    rules: &[Rule<'_>; 2],
    plan: &PiecePlan,
    prov: [Stats; 2],
    base: Base<'_>,
) -> Result<([SlotOut; 2], StepPath)> {
    let n = param.len();
    let em = encoder(&plan.cfgs[0], n, prov[0])?;
    let ev = encoder(&plan.cfgs[1], n, prov[1])?;
    let (mut out_m, mut out_v) = (output(&em, shape), output(&ev, shape));
    // Zero positions are collected wherever the layout could come out a list (a codec that
    // keeps zeros never needs one).
    let maybe_list = [!rules[0].keeps_zeros, !rules[1].keeps_zeros];
    let done = base
        .pass(true, [Some(&em), Some(&ev)], maybe_list, [true; 2])
        .run(
            param,
            ([out_m.primaries(), out_v.primaries()], [None, None]),
        )?;
    let layouts = [0, 1].map(|j| zmap::layout(n as u64, done[j].tally.zeros, &rules[j]));
    let exact = [0, 1].map(|j| done[j].stats.finish(plan.cfgs[j].spread));
    let redo = [0, 1].map(|j| layouts[j] == Layout::Map || !accepts(&prov[j], &exact[j]));
    let mut result: [Option<SlotOut>; 2] = [None, None];
    let [dm, dv] = done;
    for (j, ((d, enc), out)) in [dm, dv]
        .into_iter()
        .zip([em, ev])
        .zip([out_m, out_v])
        .enumerate()
    {
        if !redo[j] {
            result[j] = Some(SlotOut::Plain {
                packed: pack(enc, out, d.pieces, shape)?,
                zeros: if layouts[j] == Layout::List {
                    d.zeros
                } else {
                    Vec::new()
                },
                range: d.tally.range(n as u64),
                stats: Some(exact[j]),
            });
        }
    }
    if !redo.contains(&true) {
        let [a, b] = result.map(Option::unwrap);
        return Ok(([a, b], StepPath::OnePass));
    }
    // Done again: the old state decoded, the new one recomputed (the moments only; the
    // parameter has moved, and nothing they compute reads it) and encoded with the exact
    // statistics, or returned dense for a zero map.
    let mut encs: [Option<PieceEncoder>; 2] = [None, None];
    for j in 0..2 {
        if redo[j] && layouts[j] != Layout::Map {
            encs[j] = Some(encoder(&plan.cfgs[j], n, exact[j])?);
        }
    }
    let mut outs = encs
        .each_ref()
        .map(|e| e.as_ref().map(|e| output(e, shape)));
    let mut dense = [0, 1].map(|j| (layouts[j] == Layout::Map && redo[j]).then(|| vec![0f32; n]));
    let [om, ov] = outs
        .each_mut()
        .map(|o| o.as_mut().map(PieceOutput::primaries).unwrap_or_default());
    let [dm, dv] = dense.each_mut().map(|d| d.as_deref_mut());
    let again = base
        .pass(
            false,
            encs.each_ref().map(Option::as_ref),
            layouts.map(|l| l == Layout::List),
            [false; 2],
        )
        .run(param, ([om, ov], [dm, dv]))?;
    for (j, ((a, (enc, out)), d)) in again
        .into_iter()
        .zip(encs.into_iter().zip(outs))
        .zip(dense)
        .enumerate()
    {
        if !redo[j] {
            continue;
        }
        result[j] = Some(match (enc, out, d) {
            (Some(enc), Some(out), _) => SlotOut::Plain {
                packed: pack(enc, out, a.pieces, shape)?,
                zeros: a.zeros,
                range: a.tally.range(n as u64),
                stats: Some(exact[j]),
            },
            (_, _, Some(d)) => SlotOut::Dense(d),
            _ => unreachable!("a slot done again is encoded or dense"),
        });
    }
    let [a, b] = result.map(Option::unwrap);
    Ok(([a, b], StepPath::Redone(redo)))
}

/// Float32 scalars of an SGD step.
#[derive(Clone, Copy)]
struct SgdScalars {
    maximize: bool,
    l2: Option<f32>,
    /// Range the decoded momentum is clamped into.
    range: Option<[f32; 2]>,
    mom: f32,
    /// 1 - dampening.
    keep: f32,
    nesterov: bool,
    neg_lr: f32,
    fresh: bool,
}

/// The scalar SGD step of one element: the reference the SIMD loop reproduces bit for bit.
#[inline(always)]
fn sgd_one(s: &SgdScalars, p: &mut f32, g: f32, b: &mut f32) {
    let mut g = if s.maximize { -g } else { g };
    if let Some(wd) = s.l2 {
        g = p.mul_add(wd, g);
    }
    let bi = if s.fresh {
        g
    } else {
        let bo = match s.range {
            Some([lo, hi]) => clamp(*b, lo, hi),
            None => *b,
        };
        g.mul_add(s.keep, bo * s.mom)
    };
    *b = bi;
    g = if s.nesterov { bi.mul_add(s.mom, g) } else { bi };
    *p = g.mul_add(s.neg_lr, *p);
}

fn sgd_body(s: &SgdScalars, p: &mut [f32], g: &[f32], b: &mut [f32]) -> Tally {
    let mut t = Tally::EMPTY;
    for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
        sgd_one(s, p, g, b);
        t.add(*b as f64);
    }
    t
}

fn sgd_chunk(s: &SgdScalars, p: &mut [f32], g: &[f32], b: &mut [f32]) -> Tally {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU has the features the function is compiled for; the slices come from
        // zipped chunks of equal-length buffers.
        let mut t = unsafe { avx2::sgd(s, p, g, b) };
        fix_zero_signs(&mut t, b);
        return t;
    }
    sgd_body(s, p, g, b)
}

/// One SGD step with momentum of one parameter (see [`adam_step`]); `slot` is the momentum
/// buffer's state. `momentum` must be positive (without it there is no state to pack).
pub fn sgd_step(
    h: &SgdStep,
    param: &mut [f32],
    grad: &[f32],
    shape: &[u64],
    momentum_buffer: &mut [f32],
    slot: SlotIn<'_>,
    rule: Rule<'_>,
) -> Result<SlotOut> {
    let n = param.len();
    check_len("grad", grad.len(), n)?;
    check_len("momentum buffer", momentum_buffer.len(), n)?;
    if h.momentum <= 0.0 {
        return Err(Error::Layout(format!(
            "the fused SGD step needs a positive momentum, not {}",
            h.momentum
        )));
    }
    let range = check_slot(slot, n, "momentum_buffer")?;
    load(slot, momentum_buffer)?;
    let s = SgdScalars {
        maximize: h.maximize,
        l2: (h.weight_decay != 0.0).then_some(h.weight_decay as f32),
        range,
        mom: h.momentum as f32,
        keep: (1.0 - h.dampening) as f32,
        nesterov: h.nesterov,
        neg_lr: -h.lr as f32,
        fresh: matches!(slot, SlotIn::Fresh),
    };
    let items: Vec<_> = param
        .chunks_mut(TASK)
        .zip(grad.chunks(TASK))
        .zip(momentum_buffer.chunks_mut(TASK))
        .collect();
    let tallies = crate::pool::map_items(items, || (), |_, ((p, g), b)| sgd_chunk(&s, p, g, b));
    let t = tallies.into_iter().fold(Tally::EMPTY, Tally::then);
    store(momentum_buffer, shape, t, &rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn scaled_exp_avg_round_trips_and_the_step_scales_it_in_place() {
        let (k, kinv) = (
            scale_factor(0.9, 0.999, 7),
            1.0 / scale_factor(0.9, 0.999, 7),
        );
        let (k, kinv) = (k as f32, kinv as f32);
        // scaled, then multiplied back: the value, to a few ulps; exact zeros and specials.
        let mut m = values(1000, 21, true);
        let mut v: Vec<f32> = values(1000, 22, true).iter().map(|x| x * x * 1e3).collect();
        v[5] = 0.0;
        m[5] = 0.0;
        v[6] = f32::INFINITY;
        m[6] = 3.0;
        v[7] = f32::NAN;
        m[7] = -2.0;
        for (&m, &v) in m.iter().zip(&v) {
            let back = unscaled(scaled(m, v, k), v, kinv);
            if v == 0.0 {
                assert_eq!(back, 0.0);
            } else if m.is_nan() {
                assert!(back.is_nan());
            } else if !v.is_finite() {
                assert_eq!(back.to_bits(), m.to_bits());
            } else {
                let close = (back - m).abs() <= 4.0 * f32::EPSILON * m.abs();
                assert!(back == m || close, "{m} {v} {back}");
            }
        }
        // The step with the scaling inside: the old exp_avg multiplied back after the clamps,
        // the plain step, the new one scaled, element by element.
        let plain = AdamScalars {
            decay: Some(0.999),
            guard: Some(0.0123),
            // The range of the stored (scaled) values: the plain step takes them multiplied back.
            range_m: None,
            range_v: Some([1e-6, 1e3]),
            ..test_scalars()
        };
        let with = AdamScalars {
            range_m: Some([-1.0, 1.0]),
            unscale: Some(kinv),
            scale: Some(k),
            ..plain
        };
        let ms: Vec<f32> = m.iter().zip(&v).map(|(&x, &y)| scaled(x, y, k)).collect();
        let g = values(1000, 23, true);
        for i in 0..m.len() {
            let (mut m0, mut v0) = (
                unscaled(clamp(ms[i], -1.0, 1.0), clamp(v[i], 1e-6, 1e3), kinv),
                v[i],
            );
            // The plain step clamps exp_avg_sq again: the same value (clamp is idempotent).
            let p0 = adam_one::<true>(&plain, 0.5, g[i], &mut m0, &mut v0);
            let want = scaled(m0, v0, k);
            let (mut m1, mut v1) = (ms[i], v[i]);
            let p1 = adam_one::<true>(&with, 0.5, g[i], &mut m1, &mut v1);
            let bits = |x: f32| if x.is_nan() { u32::MAX } else { x.to_bits() };
            assert_eq!(
                (bits(m1), bits(v1), bits(p1)),
                (bits(want), bits(v0), bits(p0)),
                "element {i}"
            );
        }
    }

    /// Scalars of a plain step (no options), for the tests to vary.
    fn test_scalars() -> AdamScalars {
        AdamScalars {
            maximize: false,
            decay: None,
            l2: None,
            guard: None,
            range_m: None,
            range_v: None,
            w: 0.1,
            b2: 0.999,
            c2: 0.001,
            sqrt_bc2: 0.0447,
            eps: 1e-8,
            step_size: -0.01,
            fresh: false,
            unscale: None,
            scale: None,
        }
    }

    fn values(n: usize, seed: u64, specials: bool) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                match (specials, r.next_u64() % 16) {
                    (true, 0) => 0.0,
                    (true, 1) => -0.0,
                    (true, 2) if i % 7 == 0 => f32::NAN,
                    (true, 3) if i % 11 == 0 => f32::INFINITY,
                    _ => (u - 0.5) * 1e-2,
                }
            })
            .collect()
    }

    fn tally_bits(t: Tally) -> (u64, u64, u64, bool) {
        (t.zeros, t.min.to_bits(), t.max.to_bits(), t.nan)
    }

    /// The SIMD step gives the scalar step's bits: parameter, both states and both tallies
    /// (zero signs of the extremes included), over every option and awkward lengths.
    #[test]
    fn simd_adam_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        if !crate::simd::avx2() {
            return;
        }
        let mut case = 0u64;
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 63, 1000] {
            for specials in [false, true] {
                for variant in 0..16u32 {
                    case += 1;
                    // Variants 8..16: exp_avg stored scaled, multiplied back and scaled again.
                    let scaled = variant & 8 != 0;
                    let s = AdamScalars {
                        maximize: variant & 1 != 0,
                        decay: (variant & 2 != 0).then_some(0.999),
                        l2: (variant & 2 == 0).then_some(0.01),
                        guard: (variant & 4 != 0).then_some(0.0123),
                        range_m: (variant & 4 != 0).then_some([-3e-3, 4e-3]),
                        range_v: (variant & 1 != 0).then_some([-0.0, 2e-3]),
                        fresh: variant & 7 == 3,
                        unscale: (scaled && variant & 7 != 3).then_some(1.7),
                        scale: scaled.then_some(0.3),
                        ..test_scalars()
                    };
                    let p = values(n, case, specials);
                    let g = values(n, case + 100, specials);
                    let m = values(n, case + 200, specials);
                    let mut v = values(n, case + 300, specials);
                    v.iter_mut().for_each(|x| *x = x.abs());
                    let (mut p1, mut m1, mut v1) = (p.clone(), m.clone(), v.clone());
                    // SAFETY: four buffers of one length, the parameter lent mutably.
                    let want =
                        unsafe { adam_body::<true>(&s, p1.as_mut_ptr(), &g, &mut m1, &mut v1) };
                    // NaN payloads and signs follow operand order, which the compiler may swap
                    // in scalar code: NaNs compare as NaN, everything else bit for bit.
                    let bits = |x: &[f32]| {
                        x.iter()
                            .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
                            .collect::<Vec<_>>()
                    };
                    // The moments-only pass: the same moments and tallies, the parameter alone.
                    let (mut m3, mut v3) = (m.clone(), v.clone());
                    let moments = moments_chunk(&s, &p, &g, &mut m3, &mut v3);
                    assert_eq!(bits(&m3), bits(&m1), "moments m, n={n} variant={variant}");
                    assert_eq!(bits(&v3), bits(&v1), "moments v, n={n} variant={variant}");
                    for k in 0..2 {
                        assert_eq!(tally_bits(want[k]), tally_bits(moments[k]), "moments {k}");
                    }
                    let mut runs = Vec::new();
                    let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
                    let t = adam_chunk(&s, &mut p2, &g, &mut m2, &mut v2);
                    runs.push(("widest", p2, m2, v2, t));
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::avx512() {
                        // The AVX2 loop too, on a CPU that otherwise runs AVX-512.
                        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
                        // SAFETY: the CPU has AVX2 (implied by avx512()); one length.
                        let mut t = unsafe {
                            avx2::adam::<true>(&s, p2.as_mut_ptr(), &g, &mut m2, &mut v2)
                        };
                        fix_zero_signs(&mut t[0], &m2);
                        fix_zero_signs(&mut t[1], &v2);
                        runs.push(("avx2", p2, m2, v2, t));
                    }
                    for (kernel, p2, m2, v2, got) in runs {
                        let at = format!("{kernel}, n={n} variant={variant}");
                        assert_eq!(bits(&p1), bits(&p2), "p, {at}");
                        assert_eq!(bits(&m1), bits(&m2), "m, {at}");
                        assert_eq!(bits(&v1), bits(&v2), "v, {at}");
                        for k in 0..2 {
                            assert_eq!(tally_bits(want[k]), tally_bits(got[k]), "tally {k}, {at}");
                        }
                    }
                }
            }
        }
    }

    /// Same for SGD with momentum, over its options.
    #[test]
    fn simd_sgd_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        if !crate::simd::avx2() {
            return;
        }
        let canon = |x: &[f32]| {
            x.iter()
                .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
                .collect::<Vec<_>>()
        };
        let mut case = 0u64;
        for n in [0usize, 5, 8, 13, 1000] {
            for specials in [false, true] {
                for variant in 0..16u32 {
                    case += 1;
                    let s = SgdScalars {
                        maximize: variant & 1 != 0,
                        l2: (variant & 2 != 0).then_some(1e-3),
                        range: (variant & 4 != 0).then_some([-2e-3, 3e-3]),
                        mom: 0.9,
                        keep: 0.9,
                        nesterov: variant & 8 != 0,
                        neg_lr: -0.05,
                        fresh: variant == 5,
                    };
                    let p = values(n, case, specials);
                    let g = values(n, case + 100, specials);
                    let b = values(n, case + 200, specials);
                    let (mut p1, mut b1) = (p.clone(), b.clone());
                    let (mut p2, mut b2) = (p, b);
                    let want = sgd_body(&s, &mut p1, &g, &mut b1);
                    let got = sgd_chunk(&s, &mut p2, &g, &mut b2);
                    assert_eq!(canon(&p1), canon(&p2), "p, n={n} variant={variant}");
                    assert_eq!(canon(&b1), canon(&b2), "b, n={n} variant={variant}");
                    assert_eq!(tally_bits(want), tally_bits(got), "tally");
                }
            }
        }
    }

    /// Decoding the packed state piece by piece inside the fused pass gives what decoding it
    /// whole first gives: the parameter, the new state's bytes, zero lists and ranges.
    #[test]
    fn piecewise_decode_matches_whole_decode() {
        use crate::codec::{Param, Params};
        let n = 50_000;
        let params: Params = [
            ("chunk_size".to_string(), Param::Int(4096)),
            ("seed".to_string(), Param::Int(7)),
        ]
        .into();
        let pv: Params = [
            ("chunk_size".to_string(), Param::Int(4096)),
            ("seed".to_string(), Param::Int(8)),
            ("all_positive".to_string(), Param::Bool(true)),
        ]
        .into();
        let shape = [n as u64];
        let mut m0 = values(n, 1, false);
        let v0: Vec<f32> = values(n, 2, false).iter().map(|x| x * x).collect();
        for i in (0..n).step_by(97) {
            m0[i] = 0.0; // exact zeros, restored from the zero list
        }
        let pm = Packed::encode(Data::F32(&m0), &shape, "smaq", &params).unwrap();
        let pk = Packed::encode(Data::F32(&v0), &shape, "smaq", &pv).unwrap();
        assert_eq!(pm.piece_len(), Some(4096));
        let zeros: Vec<i64> = (0..n as i64).step_by(97).collect();
        let rule = |p| Rule {
            codec: "smaq",
            params: p,
            keeps_zeros: false,
            sparse_fraction: 0.15,
        };
        let h = super::tests_support::adam_w_step_3();
        let g = values(n, 3, false);
        let run = |piecewise: bool| {
            let mut p = values(n, 4, false);
            let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
            let range = Some([-0.004, 0.004]);
            let slots = if piecewise {
                [
                    SlotIn::Packed {
                        packed: &pm,
                        range,
                        zeros: &zeros,
                        stats: None,
                    },
                    SlotIn::Packed {
                        packed: &pk,
                        range: None,
                        zeros: &[],
                        stats: None,
                    },
                ]
            } else {
                // The whole-tensor path: a slot without pieces (the buffers decoded here).
                pm.decode_into(DataMut::F32(&mut m)).unwrap();
                pk.decode_into(DataMut::F32(&mut v)).unwrap();
                zeros.iter().for_each(|&i| m[i as usize] = 0.0);
                m.iter_mut().for_each(|x| *x = clamp(*x, -0.004, 0.004));
                [SlotIn::Dense, SlotIn::Dense]
            };
            let out = adam_step(
                &h,
                &mut p,
                &g,
                &shape,
                &mut m,
                &mut v,
                slots,
                [rule(&params), rule(&pv)],
            )
            .unwrap();
            let desc = out.map(|o| match o {
                SlotOut::Plain {
                    packed,
                    zeros,
                    range,
                    ..
                } => (packed.to_vec(), zeros, range.map(|r| r.map(f64::to_bits))),
                SlotOut::NeedsMap | SlotOut::Dense(_) => panic!("no map expected"),
            });
            (p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), desc)
        };
        assert_eq!(run(true), run(false));
    }

    /// A step's outcome: the parameter's bits, and each slot's bytes (or values) and zeros.
    type Outcome = (Vec<u32>, Vec<(Vec<u8>, Vec<i64>)>);

    /// One Adam step both ways from the same state.
    fn both_ways(n: usize, chunk: i64, fresh: bool, grad_zero_every: usize) -> [Outcome; 2] {
        use crate::codec::{Param, Params};
        let params = |seed: i64, pos: bool| -> Params {
            [
                ("chunk_size".to_string(), Param::Int(chunk)),
                ("seed".to_string(), Param::Int(seed)),
                ("log".to_string(), Param::Bool(pos)),
            ]
            .into()
        };
        let (pa, pb) = (params(7, false), params(8, true));
        let shape = [n as u64];
        let mut m0 = values(n, 1, false);
        let v0: Vec<f32> = values(n, 2, false).iter().map(|x| x * x).collect();
        for i in (0..n).step_by(97) {
            m0[i] = 0.0;
        }
        let old = |x: &[f32], p: &Params| Packed::encode(Data::F32(x), &shape, "smaq", p).unwrap();
        let (om, ov) = (old(&m0, &pa), old(&v0, &pb));
        let zeros: Vec<i64> = (0..n as i64).step_by(97).collect();
        let rule = |p| Rule {
            codec: "smaq",
            params: p,
            keeps_zeros: false,
            sparse_fraction: 0.15,
        };
        let h = AdamStep {
            decoded: !fresh,
            step: if fresh { 1 } else { 3 },
            ..super::tests_support::adam_w_step_3()
        };
        let mut g = values(n, 3, false);
        if grad_zero_every > 0 {
            for (i, x) in g.iter_mut().enumerate() {
                if i % grad_zero_every != 0 {
                    *x = 0.0;
                }
            }
        }
        let slots = || {
            if fresh {
                [SlotIn::Fresh, SlotIn::Fresh]
            } else {
                [
                    SlotIn::Packed {
                        packed: &om,
                        range: Some([-0.004, 0.004]),
                        zeros: &zeros,
                        stats: None,
                    },
                    SlotIn::Packed {
                        packed: &ov,
                        range: None,
                        zeros: &[],
                        stats: None,
                    },
                ]
            }
        };
        let desc = |o: SlotOut, buf: &[f32]| match o {
            SlotOut::Plain { packed, zeros, .. } => (packed.to_vec(), zeros),
            SlotOut::NeedsMap => (bytemuck::cast_slice(buf).to_vec(), vec![-1]),
            SlotOut::Dense(v) => (bytemuck::cast_slice(&v).to_vec(), vec![-1]),
        };
        let mut p1 = values(n, 4, false);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let [a, b] = adam_step(
            &h,
            &mut p1,
            &g,
            &shape,
            &mut m,
            &mut v,
            slots(),
            [rule(&pa), rule(&pb)],
        )
        .unwrap();
        let whole = (
            p1.iter().map(|x| x.to_bits()).collect(),
            vec![desc(a, &m), desc(b, &v)],
        );
        let mut p2 = values(n, 4, false);
        let ([a, b], _) =
            adam_step_pieces(&h, &mut p2, &g, &shape, slots(), [rule(&pa), rule(&pb)]).unwrap();
        let pieces = (
            p2.iter().map(|x| x.to_bits()).collect(),
            vec![desc(a, &[]), desc(b, &[])],
        );
        [whole, pieces]
    }

    #[test]
    fn two_pass_step_gives_the_whole_buffer_step_bit_for_bit() {
        // Pieces of 65,536 (the default): the same statistics, so the same packed bytes, for a
        // packed state with exact zeros, a fresh one, and a last piece that is short.
        for fresh in [false, true] {
            let [whole, pieces] = both_ways(150_000, 1 << 16, fresh, 0);
            assert_eq!(whole, pieces, "fresh={fresh}");
        }
        // A new state that needs a zero map: returned dense, the same values.
        let [whole, pieces] = both_ways(70_000, 1 << 16, true, 10);
        assert_eq!(whole, pieces);
        assert_eq!(pieces.1[0].1, vec![-1]);
    }

    #[test]
    fn two_pass_step_with_small_pieces_moves_the_parameter_identically() {
        // Pieces of 4,096: the statistics are summed in other blocks (last-bit differences in
        // the grid), the parameter update is still bit for bit.
        let [whole, pieces] = both_ways(50_000, 4096, false, 0);
        assert_eq!(whole.0, pieces.0);
        for (a, b) in whole.1.iter().zip(&pieces.1) {
            assert_eq!(a.1, b.1, "zero lists");
            let (pa, pb) = (
                Packed::from_bytes(a.0.clone()).unwrap(),
                Packed::from_bytes(b.0.clone()).unwrap(),
            );
            let (mut x, mut y) = (vec![0f32; 50_000], vec![0f32; 50_000]);
            pa.decode_into(DataMut::F32(&mut x)).unwrap();
            pb.decode_into(DataMut::F32(&mut y)).unwrap();
            let scale = x.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (u, w) in x.iter().zip(&y) {
                assert!((u - w).abs() <= scale * 1e-3, "{u} vs {w}");
            }
        }
    }

    #[test]
    fn zero_extremes_keep_the_first_zeros_sign() {
        let x = [1.0f32, -0.0, 0.0, 2.0];
        let mut u = Tally {
            zeros: 2,
            min: 0.0,
            max: 2.0,
            nan: false,
        };
        fix_zero_signs(&mut u, &x);
        assert_eq!(u.min.to_bits(), (-0.0f64).to_bits());
        assert_eq!(u.max, 2.0);
    }
}

#[cfg(test)]
mod one_pass_tests {
    use super::tests_support::*;
    use super::*;

    /// One piece-wise step from the fixture's state with these provisional statistics: the
    /// parameter's bits, each slot's bytes, zeros and returned statistics, and the path.
    fn step(decoupled: bool, stats: [Option<Stats>; 2]) -> (Vec<u32>, Vec<SlotDesc>, StepPath) {
        step_with(Fixture::new(150_000), decoupled, stats)
    }

    /// [`step`] from a given fixture.
    fn step_with(
        f: Fixture,
        decoupled: bool,
        stats: [Option<Stats>; 2],
    ) -> (Vec<u32>, Vec<SlotDesc>, StepPath) {
        let h = AdamStep { decoupled, ..f.h };
        let slots = [
            SlotIn::Packed {
                packed: &f.om,
                range: Some([-0.004, 0.004]),
                zeros: &f.zeros,
                stats: stats[0],
            },
            SlotIn::Packed {
                packed: &f.ov,
                range: None,
                zeros: &[],
                stats: stats[1],
            },
        ];
        let mut p = f.p.clone();
        let (outs, path) = adam_step_pieces(&h, &mut p, &f.g, &f.shape, slots, f.rules()).unwrap();
        let desc = outs.map(|o| match o {
            SlotOut::Plain {
                packed,
                zeros,
                range,
                stats,
            } => (
                packed.to_vec(),
                zeros,
                range.map(|r| r.map(f64::to_bits)),
                stats.map(|s| (s.mean.to_bits(), s.std.to_bits())),
            ),
            SlotOut::NeedsMap | SlotOut::Dense(_) => panic!("no zero map expected"),
        });
        (p.iter().map(|x| x.to_bits()).collect(), desc.to_vec(), path)
    }

    fn exact_stats(d: &[SlotDesc]) -> [Option<Stats>; 2] {
        [0, 1].map(|j| {
            d[j].3.map(|(m, s)| Stats {
                mean: f64::from_bits(m),
                std: f64::from_bits(s),
                count: 0,
            })
        })
    }

    #[test]
    fn one_pass_with_the_exact_statistics_gives_the_two_pass_bytes() {
        let (p2, d2, path) = step(true, [None, None]);
        assert_eq!(path, StepPath::TwoPass);
        assert!(
            !d2[0].1.is_empty(),
            "the new exp_avg has exact zeros (a zero list)"
        );
        // Provisional statistics equal to the exact ones: accepted, the same grid, so (same
        // seed) the same bytes; the parameter is the same bits whatever the statistics.
        let (p1, d1, path) = step(true, exact_stats(&d2));
        assert_eq!(path, StepPath::OnePass);
        assert_eq!(p1, p2);
        assert_eq!(d1, d2);
    }

    /// Only exp_avg_sq brings statistics: exp_avg's come from a first pass over it alone, so
    /// with exp_avg_sq's exact statistics the bytes are the two-pass step's.
    #[test]
    fn exp_avg_first_then_one_pass_gives_the_two_pass_bytes() {
        let (p2, d2, _) = step(true, [None, None]);
        let [_, v] = exact_stats(&d2);
        let (p1, d1, path) = step(true, [None, v]);
        assert_eq!(path, StepPath::ExpAvgFirst);
        assert_eq!(p1, p2);
        assert_eq!(d1, d2);
        // exp_avg_sq's statistics far off: exp_avg_sq alone is coded again.
        let far = v.map(|s| Stats {
            std: s.std * 3.0,
            ..s
        });
        let (p3, d3, path) = step(true, [None, far]);
        assert_eq!(path, StepPath::Redone([false, true]));
        assert_eq!((p3, d3), (p2, d2));
    }

    #[test]
    fn one_pass_accepts_near_statistics_and_decodes_within_the_codec_error() {
        let (p2, d2, _) = step(true, [None, None]);
        let near = exact_stats(&d2).map(|s| {
            s.map(|s| Stats {
                mean: s.mean + 0.02 * s.std,
                std: s.std * 0.98,
                count: 0,
            })
        });
        let (p1, d1, path) = step(true, near);
        assert_eq!(path, StepPath::OnePass);
        assert_eq!(p1, p2, "the parameter update reads the exact float32 state");
        for j in 0..2 {
            assert_eq!(d1[j].1, d2[j].1, "zero lists");
            assert_eq!(d1[j].2, d2[j].2, "ranges");
            assert_eq!(d1[j].3, d2[j].3, "the exact statistics are returned");
            assert_ne!(d1[j].0, d2[j].0, "a grid of its own");
        }
        // Against the exact float32 new state: about the two-pass code's error.
        let f = Fixture::new(150_000);
        let (mut p, mut m, mut v) = (f.p.clone(), vec![0f32; 150_000], vec![0f32; 150_000]);
        let slots = [
            SlotIn::Packed {
                packed: &f.om,
                range: Some([-0.004, 0.004]),
                zeros: &f.zeros,
                stats: None,
            },
            SlotIn::Packed {
                packed: &f.ov,
                range: None,
                zeros: &[],
                stats: None,
            },
        ];
        adam_step(
            &f.h,
            &mut p,
            &f.g,
            &f.shape,
            &mut m,
            &mut v,
            slots,
            f.rules(),
        )
        .unwrap();
        for (j, exact) in [m, v].iter().enumerate() {
            // exp_avg_sq is coded in the log domain: its error is relative.
            let err = |d: &SlotDesc| {
                let x = decode(&d.0);
                let e: Vec<f64> = x
                    .iter()
                    .zip(exact)
                    .map(|(&a, &b)| {
                        let e = (a - b) as f64;
                        if j == 1 && b != 0.0 {
                            e / b as f64
                        } else {
                            e
                        }
                    })
                    .collect();
                let rms = (e.iter().map(|e| e * e).sum::<f64>() / e.len() as f64).sqrt();
                (rms, e.iter().fold(0f64, |a, e| a.max(e.abs())))
            };
            let (one, two) = (err(&d1[j]), err(&d2[j]));
            assert!(one.0 <= 1.1 * two.0, "slot {j}: rms {} vs {}", one.0, two.0);
            assert!(one.1 <= 1.5 * two.1, "slot {j}: max {} vs {}", one.1, two.1);
        }
    }

    #[test]
    fn rejected_statistics_are_redone_with_the_exact_ones() {
        let (p2, d2, _) = step(true, [None, None]);
        let exact = exact_stats(&d2);
        let wide = |s: Option<Stats>| {
            s.map(|s| Stats {
                std: s.std * 3.0,
                ..s
            })
        };
        for (stats, redo) in [
            ([wide(exact[0]), wide(exact[1])], [true, true]),
            ([exact[0], wide(exact[1])], [false, true]),
            (
                [
                    exact[0].map(|s| Stats {
                        mean: s.mean + 0.2 * s.std,
                        ..s
                    }),
                    exact[1],
                ],
                [true, false],
            ),
        ] {
            let (p1, d1, path) = step(true, stats);
            assert_eq!(path, StepPath::Redone(redo));
            assert_eq!(p1, p2);
            assert_eq!(d1, d2, "redone {redo:?}: the two-pass bytes");
        }
    }

    /// A parameter of 16 pieces or more without statistics samples them from every few pieces,
    /// then takes one pass: the parameter's bits and the returned exact statistics are those of
    /// the step given the exact statistics, the state decodes close to it; a sample that misses
    /// how the rest of the state moved is caught and that slot coded with the exact ones.
    #[test]
    fn large_parameters_sample_their_statistics() {
        let n = 16 * 65_536 + 1000;
        let (p1, d1, path) = step_with(Fixture::new(n), true, [None, None]);
        assert_eq!(path, StepPath::Sampled);
        let (p2, d2, path) = step_with(Fixture::new(n), true, exact_stats(&d1));
        assert_eq!(path, StepPath::OnePass);
        assert_eq!(p1, p2);
        for j in 0..2 {
            assert_eq!(d1[j].3, d2[j].3, "slot {j}: the exact statistics");
            let (a, b) = (decode(&d1[j].0), decode(&d2[j].0));
            let rms =
                |x: &[f32]| (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
            let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
            assert!(
                rms(&diff) < 0.05 * rms(&b),
                "slot {j}: {} vs {}",
                rms(&diff),
                rms(&b)
            );
        }
        // Gradients 30 times larger outside the sampled pieces (every fourth): exp_avg_sq's
        // sampled statistics are far off, and it is coded again with the exact ones.
        let skewed = || {
            let mut f = Fixture::new(n);
            for (i, c) in f.g.chunks_mut(65_536).enumerate() {
                if i % 4 != 0 {
                    c.iter_mut().for_each(|x| *x *= 30.0);
                }
            }
            f
        };
        let (p1, d1, path) = step_with(skewed(), true, [None, None]);
        let StepPath::SampledRedone(redo) = path else {
            panic!("{path:?}: the sample should have been rejected");
        };
        assert!(redo[1], "exp_avg_sq redone");
        let (p2, d2, _) = step_with(skewed(), true, exact_stats(&d1));
        assert_eq!(p1, p2);
        assert_eq!(
            d1[1], d2[1],
            "exp_avg_sq redone: the bytes of its exact statistics"
        );
    }

    /// The first step of a large parameter samples too (the fresh moments need no decode):
    /// the parameter's bits as the whole-buffer step gives them, and the state as close to the
    /// new moments as the whole-buffer step's own packed state is.
    #[test]
    fn a_large_fresh_state_samples_too() {
        let n = 16 * 65_536 + 1000;
        let f = Fixture::new(n);
        let h = AdamStep {
            step: 1,
            decoded: false,
            scaled_in: false,
            ..f.h
        };
        let fresh = [SlotIn::Fresh, SlotIn::Fresh];
        let mut p1 = f.p.clone();
        let (outs, path) = adam_step_pieces(&h, &mut p1, &f.g, &f.shape, fresh, f.rules()).unwrap();
        assert!(
            matches!(path, StepPath::Sampled | StepPath::SampledRedone(_)),
            "{path:?}"
        );
        let mut p2 = f.p.clone();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let whole = adam_step(
            &h,
            &mut p2,
            &f.g,
            &f.shape,
            &mut m,
            &mut v,
            fresh,
            f.rules(),
        )
        .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p1), bits(&p2));
        // The whole-buffer step leaves the new state (exp_avg scaled) in its buffers.
        let rel = |out: SlotOut, want: &[f32]| {
            let SlotOut::Plain { packed, .. } = out else {
                panic!("no zero map expected");
            };
            let got = decode(&packed.to_vec());
            let sq = |x: f32| (x as f64).powi(2);
            let err: f64 = got.iter().zip(want).map(|(a, b)| sq(a - b)).sum();
            (err / want.iter().map(|&b| sq(b)).sum::<f64>()).sqrt()
        };
        for ((out, w), want) in outs.into_iter().zip(whole).zip([&m, &v]) {
            let (ours, theirs) = (rel(out, want), rel(w, want));
            assert!(ours <= 1.05 * theirs + 1e-4, "{ours} against {theirs}");
        }
    }

    #[test]
    fn l2_weight_decay_never_takes_one_pass() {
        let (p2, d2, path) = step(false, [None, None]);
        assert_eq!(path, StepPath::TwoPass);
        let (p1, d1, path) = step(false, exact_stats(&d2));
        assert_eq!(path, StepPath::TwoPass);
        assert_eq!((p1, d1), (p2, d2));
    }

    #[test]
    fn acceptance_bounds() {
        let e = Stats {
            mean: 1.0,
            std: 2.0,
            count: 10,
        };
        let at = |mean, std| {
            accepts(
                &Stats {
                    mean,
                    std,
                    count: 0,
                },
                &e,
            )
        };
        assert!(at(1.0, 2.0) && at(1.09, 1.94) && at(0.91, 2.02));
        assert!(!at(1.0, 1.93) && !at(1.0, 2.03) && !at(1.11, 2.0) && !at(f64::NAN, 2.0));
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// AdamW's defaults at step 3, on decoded state, exp_avg stored scaled (the Python
    /// optimizer's default).
    pub(super) fn adam_w_step_3() -> AdamStep {
        AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
            maximize: false,
            guard: true,
            decoded: true,
            step: 3,
            scaled_in: true,
            scaled_out: true,
        }
    }
    use crate::codec::{Param, Params};

    /// Bytes, zero list, range bits and returned statistics' bits of one slot.
    pub type SlotDesc = (Vec<u8>, Vec<i64>, Option<[u64; 2]>, Option<(u64, u64)>);

    /// A packed Adam state (exp_avg with exact zeros, log-domain exp_avg_sq) of `n` values, a
    /// parameter and a gradient that leaves some of exp_avg's zeros in place.
    pub struct Fixture {
        pub om: Packed,
        pub ov: Packed,
        pub zeros: Vec<i64>,
        pub p: Vec<f32>,
        pub g: Vec<f32>,
        pub shape: [u64; 1],
        pub h: AdamStep,
        pa: Params,
        pb: Params,
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2)
            .collect()
    }

    impl Fixture {
        pub fn new(n: usize) -> Fixture {
            let params = |seed: i64, log: bool| -> Params {
                [
                    ("seed".to_string(), Param::Int(seed)),
                    ("log".to_string(), Param::Bool(log)),
                ]
                .into()
            };
            let (pa, pb) = (params(7, false), params(8, true));
            let shape = [n as u64];
            let mut m0 = values(n, 1);
            let v0: Vec<f32> = values(n, 2).iter().map(|x| x * x).collect();
            for i in (0..n).step_by(97) {
                m0[i] = 0.0;
            }
            let mut g = values(n, 3);
            for i in (0..n).step_by(194) {
                g[i] = 0.0;
            }
            Fixture {
                om: Packed::encode(Data::F32(&m0), &shape, "smaq", &pa).unwrap(),
                ov: Packed::encode(Data::F32(&v0), &shape, "smaq", &pb).unwrap(),
                zeros: (0..n as i64).step_by(97).collect(),
                p: values(n, 4),
                g,
                shape,
                h: adam_w_step_3(),
                pa,
                pb,
            }
        }

        pub fn rules(&self) -> [Rule<'_>; 2] {
            [&self.pa, &self.pb].map(|params| Rule {
                codec: "smaq",
                params,
                keeps_zeros: false,
                sparse_fraction: 0.15,
            })
        }
    }

    pub fn decode(bytes: &[u8]) -> Vec<f32> {
        let p = Packed::from_bytes(bytes.to_vec()).unwrap();
        let mut x = vec![0f32; p.numel() as usize];
        p.decode_into(DataMut::F32(&mut x)).unwrap();
        x
    }
}

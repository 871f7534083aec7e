//! Glue for the fused optimizer steps (src/optim.rs). Python (smaq_rs/torch/optim.py) owns the
//! state dict, seeds and fallbacks; here float32 NumPy views of the parameter, gradient and
//! reusable state buffers are borrowed and the step runs with the GIL released.
//!
//! A slot's state is passed as `None` (first step), `(None, None, None, None)` (its buffer
//! already holds the values) or `(packed, (lo, hi) | None, int64 zero positions | None,
//! (mean, std) | None)`; the last element is the slot's provisional statistics (what the
//! previous step returned with it; the SGD step ignores them). A slot comes back as `None`
//! (store it with a zero map from its buffer) or `(packed, zero positions | None, (lo, hi) |
//! None, (mean, std) | None)`, the last element being the exact statistics of the new values in
//! the codec's domain (ln v for log-domain SmaQ) where the step gathered them: keep them with
//! the slot and pass them back in next step. The Adam step also takes no buffers at all
//! (`None, None`): it then runs piece by piece without whole-parameter buffers where it can
//! (`optim::adam_step_pieces`: in one pass when both slots bring statistics; the caller passes
//! them only once they have settled, `adam_stats_settled`), and a slot that
//! needs a zero map comes back as a float32 array of its new values. The Adam step returns
//! `(exp_avg, exp_avg_sq, path)`, `path` naming how it ran (`optim::StepPath::name`: "whole",
//! "two-pass", "one-pass", "redone-exp_avg", "redone-exp_avg_sq", "redone-both").

use super::{detached, not_contiguous, params_from_dict, DtypeError, LayoutError, PyPacked};
use crate::codec::Params;
use crate::optim::{self, AdamStep, SgdStep, SlotIn, SlotOut, StepPath};
use crate::stats::Stats;
use crate::zmap::Rule;
use numpy::{
    IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

type StateIn<'py> = Option<(
    Option<Bound<'py, PyPacked>>,
    Option<(f64, f64)>,
    Option<PyReadonlyArray1<'py, i64>>,
    Option<(f64, f64)>,
)>;
/// A slot after the step: None (store with a zero map: the new values are in the buffer passed
/// in), `(packed, zero positions or None, (min, max) or None, (mean, std) or None)`, or a
/// float32 array (store with a
/// zero map: these are the new values; only when no buffers were passed in).
type StateOut<'py> = Bound<'py, PyAny>;

fn f32_array<'py>(a: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    a.cast::<PyArrayDyn<f32>>()
        .cloned()
        .map_err(|_| match a.cast::<PyUntypedArray>() {
            Ok(u) => {
                DtypeError::new_err(format!("{what} must be a float32 array, got {}", u.dtype()))
            }
            Err(_) => DtypeError::new_err(format!(
                "{what} must be a float32 NumPy array, got {}",
                a.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            )),
        })
}

fn writable<'py>(a: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    f32_array(a, what)?
        .try_readwrite()
        .map_err(|e| LayoutError::new_err(format!("{what} cannot be written: {e}")))
}

fn readable<'py>(a: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    f32_array(a, what)?
        .try_readonly()
        .map_err(|e| LayoutError::new_err(format!("{what} cannot be read: {e}")))
}

/// Packed states borrowed for the step.
struct Held<'py> {
    packed: Option<Bound<'py, PyPacked>>,
    range: Option<[f64; 2]>,
    zeros: Option<PyReadonlyArray1<'py, i64>>,
    stats: Option<Stats>,
    fresh: bool,
}

impl<'py> Held<'py> {
    fn new(s: StateIn<'py>) -> Self {
        match s {
            None => Held {
                packed: None,
                range: None,
                zeros: None,
                stats: None,
                fresh: true,
            },
            Some((packed, range, zeros, stats)) => Held {
                packed,
                range: range.map(|(a, b)| [a, b]),
                zeros,
                stats: stats.map(|(mean, std)| Stats {
                    mean,
                    std,
                    count: 0,
                }),
                fresh: false,
            },
        }
    }
    fn slot(&self) -> PyResult<SlotIn<'_>> {
        if self.fresh {
            return Ok(SlotIn::Fresh);
        }
        let Some(p) = &self.packed else {
            return Ok(SlotIn::Dense);
        };
        let zeros = match &self.zeros {
            Some(z) => z.as_slice().map_err(|_| not_contiguous("zero positions"))?,
            None => &[],
        };
        Ok(SlotIn::Packed {
            packed: &p.get().inner,
            range: self.range,
            zeros,
            stats: self.stats,
        })
    }
}

fn out<'py>(py: Python<'py>, s: SlotOut) -> PyResult<StateOut<'py>> {
    Ok(match s {
        SlotOut::NeedsMap => py.None().into_bound(py),
        SlotOut::Dense(v) => v.into_pyarray(py).into_any(),
        SlotOut::Plain {
            packed,
            zeros,
            range,
            stats,
        } => (
            PyPacked { inner: packed },
            (!zeros.is_empty()).then(|| zeros.into_pyarray(py)),
            range.map(|[a, b]| (a, b)),
            stats.map(|s| (s.mean, s.std)),
        )
            .into_pyobject(py)?
            .into_any(),
    })
}

/// One fused Adam/AdamW step of one float32 parameter (module doc for the state tuples).
#[pyfunction]
#[pyo3(signature = (param, grad, exp_avg, exp_avg_sq, states, *, lr, beta1, beta2, eps,
                    weight_decay, decoupled, maximize, guard, decoded, step, codec, params,
                    keeps_zeros, sparse_fraction, scaled=(false, false)))]
#[allow(clippy::too_many_arguments)]
fn adam_step<'py>(
    py: Python<'py>,
    param: &Bound<'py, PyAny>,
    grad: &Bound<'py, PyAny>,
    exp_avg: Option<&Bound<'py, PyAny>>,
    exp_avg_sq: Option<&Bound<'py, PyAny>>,
    states: (StateIn<'py>, StateIn<'py>),
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled: bool,
    maximize: bool,
    guard: bool,
    decoded: bool,
    step: u64,
    codec: &str,
    params: (Bound<'py, PyDict>, Bound<'py, PyDict>),
    keeps_zeros: (bool, bool),
    sparse_fraction: f64,
    scaled: (bool, bool),
) -> PyResult<(StateOut<'py>, StateOut<'py>, &'static str)> {
    let h = AdamStep {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        maximize,
        guard,
        decoded,
        step,
        scaled_in: scaled.0,
        scaled_out: scaled.1,
    };
    let pm: Params = params_from_dict(Some(&params.0))?;
    let pv: Params = params_from_dict(Some(&params.1))?;
    let (sm, sv) = (Held::new(states.0), Held::new(states.1));
    let (sm, sv) = (sm.slot()?, sv.slot()?);
    let mut p = writable(param, "param")?;
    let shape: Vec<u64> = p.shape().iter().map(|&d| d as u64).collect();
    let g = readable(grad, "grad")?;
    let p = p.as_slice_mut().map_err(|_| not_contiguous("param"))?;
    let g = g.as_slice().map_err(|_| not_contiguous("grad"))?;
    let rule = |params, keeps_zeros| Rule {
        codec,
        params,
        keeps_zeros,
        sparse_fraction,
    };
    let rules = [rule(&pm, keeps_zeros.0), rule(&pv, keeps_zeros.1)];
    let ([om, ov], path) = match (exp_avg, exp_avg_sq) {
        (None, None) => detached(py, || {
            optim::adam_step_pieces(&h, p, g, &shape, [sm, sv], rules)
        })?,
        (Some(m), Some(v)) => {
            let mut m = writable(m, "exp_avg buffer")?;
            let mut v = writable(v, "exp_avg_sq buffer")?;
            let m = m
                .as_slice_mut()
                .map_err(|_| not_contiguous("exp_avg buffer"))?;
            let v = v
                .as_slice_mut()
                .map_err(|_| not_contiguous("exp_avg_sq buffer"))?;
            let outs = detached(py, || {
                optim::adam_step(&h, p, g, &shape, m, v, [sm, sv], rules)
            })?;
            (outs, StepPath::Whole)
        }
        _ => {
            return Err(LayoutError::new_err(
                "pass both exp_avg and exp_avg_sq buffers, or neither",
            ))
        }
    };
    Ok((out(py, om)?, out(py, ov)?, path.name()))
}

/// One fused SGD-with-momentum step of one float32 parameter (module doc for the state tuple).
#[pyfunction]
#[pyo3(signature = (param, grad, momentum_buffer, state, *, lr, momentum, dampening,
                    weight_decay, nesterov, maximize, codec, params, keeps_zeros,
                    sparse_fraction))]
#[allow(clippy::too_many_arguments)]
fn sgd_step<'py>(
    py: Python<'py>,
    param: &Bound<'py, PyAny>,
    grad: &Bound<'py, PyAny>,
    momentum_buffer: &Bound<'py, PyAny>,
    state: StateIn<'py>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    codec: &str,
    params: Bound<'py, PyDict>,
    keeps_zeros: bool,
    sparse_fraction: f64,
) -> PyResult<StateOut<'py>> {
    let h = SgdStep {
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
    };
    let params = params_from_dict(Some(&params))?;
    let held = Held::new(state);
    let slot = held.slot()?;
    let mut p = writable(param, "param")?;
    let shape: Vec<u64> = p.shape().iter().map(|&d| d as u64).collect();
    let g = readable(grad, "grad")?;
    let mut b = writable(momentum_buffer, "momentum buffer")?;
    let p = p.as_slice_mut().map_err(|_| not_contiguous("param"))?;
    let g = g.as_slice().map_err(|_| not_contiguous("grad"))?;
    let b = b
        .as_slice_mut()
        .map_err(|_| not_contiguous("momentum buffer"))?;
    let rule = Rule {
        codec,
        params: &params,
        keeps_zeros,
        sparse_fraction,
    };
    let o = detached(py, || optim::sgd_step(&h, p, g, &shape, b, slot, rule))?;
    out(py, o)
}

/// Whether a slot's statistics `kept` (mean, std) from one step still stand for the `new` ones
/// the next step returned (`optim::accepts`): then its next step may try the one pass.
#[pyfunction]
fn adam_stats_settled(kept: (f64, f64), new: (f64, f64)) -> bool {
    let st = |(mean, std): (f64, f64)| Stats {
        mean,
        std,
        count: 0,
    };
    optim::accepts(&st(kept), &st(new))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(adam_stats_settled, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    Ok(())
}

//! Glue for zero-map storage (src/zmap.rs), which `python/smaq_rs/torch/_store.py` uses for CPU
//! tensors: one call packs a tensor with its zero map or zero list and value range, one call
//! puts it back into a caller's buffer. The GIL is released for the work.

use super::{detached, not_contiguous, params_from_dict, with_input, with_output, PyPacked};
use crate::dtype::DType;
use crate::zmap::{self, Rule, Zeros, ZerosRef};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

type Stored<'py> = (
    Option<PyPacked>,
    Option<Bound<'py, PyArray1<u8>>>,
    Option<Bound<'py, PyArray1<i64>>>,
    Option<(f64, f64)>,
);

/// Packs a C-contiguous array as `_store.encode(zeros="auto")` does: returns
/// `(packed | None, zero map | None, zero positions | None, (min, max) | None)`.
#[pyfunction]
#[pyo3(signature = (array, codec, params, keeps_zeros, sparse_fraction, dtype=None))]
fn store_encode<'py>(
    py: Python<'py>,
    array: &Bound<'py, PyUntypedArray>,
    codec: &str,
    params: Option<&Bound<'py, PyDict>>,
    keeps_zeros: bool,
    sparse_fraction: f64,
    dtype: Option<&str>,
) -> PyResult<Stored<'py>> {
    let params = params_from_dict(params)?;
    let shape: Vec<u64> = array.shape().iter().map(|&d| d as u64).collect();
    let rule = Rule {
        codec,
        params: &params,
        keeps_zeros,
        sparse_fraction,
    };
    let held = with_input(array, dtype, |data| {
        detached(py, || zmap::store_data(data, &shape, &rule))
    })?;
    let (mask, list) = match held.zeros {
        Zeros::Kept => (None, None),
        Zeros::List(l) => (None, Some(l.into_pyarray(py))),
        Zeros::Map(m) => (Some(m.into_pyarray(py)), None),
    };
    Ok((
        held.packed.map(|inner| PyPacked { inner }),
        mask,
        list,
        held.range.map(|[a, b]| (a, b)),
    ))
}

/// Decodes what [`store_encode`] returned into `out` (writable, C-contiguous, of `dtype`).
#[pyfunction]
#[pyo3(signature = (packed, mask, zeros, range, out, dtype))]
fn store_decode(
    py: Python<'_>,
    packed: Option<PyRef<'_, PyPacked>>,
    mask: Option<PyReadonlyArray1<'_, u8>>,
    zeros: Option<PyReadonlyArray1<'_, i64>>,
    range: Option<(f64, f64)>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let want = DType::from_name(dtype)?;
    let z = match (&mask, &zeros) {
        (Some(m), _) => ZerosRef::Map(m.as_slice().map_err(|_| not_contiguous("zero map"))?),
        (None, Some(l)) => {
            ZerosRef::List(l.as_slice().map_err(|_| not_contiguous("zero positions"))?)
        }
        (None, None) => ZerosRef::Kept,
    };
    let p = packed.as_ref().map(|p| &p.inner);
    let numel = out
        .getattr("size")
        .and_then(|s| s.extract::<u64>())
        .unwrap_or(0);
    with_output(out, want, numel, |dst| {
        detached(py, || {
            zmap::restore_data(p, z, range.map(|(a, b)| [a, b]), dst)
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(store_encode, m)?)?;
    m.add_function(wrap_pyfunction!(store_decode, m)?)?;
    Ok(())
}

//! Glue for the sparse Linear kernels (src/sparse/): a frozen pattern object built once per layer,
//! and forward / backward calls on float32 NumPy arrays borrowed without copies (the torch layer
//! passes views of its tensors). The GIL is released for the work.

use super::{detached, not_contiguous, DtypeError, LayoutError};
use crate::sparse::{self, Csr, Level};
use numpy::{
    PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

/// The non-zero pattern of a sparse weight (out x in) in CSR, with its transpose.
#[pyclass(module = "smaq_rs._core", name = "CsrPattern", frozen)]
pub(crate) struct PyCsr {
    inner: Csr,
}

fn int64<'py>(a: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArrayDyn<'py, i64>> {
    let arr: PyReadonlyArrayDyn<'py, i64> = a
        .extract()
        .map_err(|_| DtypeError::new_err(format!("{what} must be a 1-D int64 array")))?;
    if arr.ndim() != 1 {
        return Err(LayoutError::new_err(format!(
            "{what} must be 1-D, found {} dimensions",
            arr.ndim()
        )));
    }
    Ok(arr)
}

#[pymethods]
impl PyCsr {
    /// A pattern from CSR arrays (int64): `row_ptr` (rows + 1, from 0 to nnz, non-decreasing),
    /// `col_idx` (nnz, strictly increasing within each row, below `cols`).
    #[new]
    fn new(
        py: Python<'_>,
        rows: usize,
        cols: usize,
        row_ptr: &Bound<'_, PyAny>,
        col_idx: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let p = int64(row_ptr, "row_ptr")?;
        let c = int64(col_idx, "col_idx")?;
        let ps = p.as_slice().map_err(|_| not_contiguous("row_ptr"))?;
        let cs = c.as_slice().map_err(|_| not_contiguous("col_idx"))?;
        let inner = detached(py, || Csr::new(rows, cols, ps, cs))?;
        Ok(Self { inner })
    }
    #[getter]
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    #[getter]
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    #[getter]
    fn nnz(&self) -> usize {
        self.inner.nnz()
    }
    /// Bytes per column index as stored (2 when cols <= 65536, else 4).
    #[getter]
    fn index_width(&self) -> usize {
        self.inner.col_idx().width()
    }
    fn __repr__(&self) -> String {
        format!(
            "CsrPattern(rows={}, cols={}, nnz={}, index_width={})",
            self.inner.rows(),
            self.inner.cols(),
            self.inner.nnz(),
            self.inner.col_idx().width()
        )
    }
}

fn f32_in<'py>(
    a: &Bound<'py, PyUntypedArray>,
    what: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    a.extract().map_err(|_| {
        let dt = a.dtype().str().map(|s| s.to_string()).unwrap_or_default();
        DtypeError::new_err(format!("{what} must be a float32 array, found {dt}"))
    })
}

fn f32_out<'py>(
    a: &Bound<'py, PyUntypedArray>,
    what: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    if a.cast::<PyArrayDyn<f32>>().is_err() {
        let dt = a.dtype().str().map(|s| s.to_string()).unwrap_or_default();
        return Err(DtypeError::new_err(format!(
            "{what} must be a writable float32 array, found {dt}"
        )));
    }
    a.extract()
        .map_err(|e| LayoutError::new_err(format!("{what} cannot be written: {e}")))
}

fn level(name: Option<&str>) -> PyResult<Level> {
    match name {
        None => Ok(Level::best()),
        Some("portable") => Ok(Level::Portable),
        Some("avx2") => Ok(Level::Avx2.usable()),
        Some("avx512") => Ok(Level::Avx512.usable()),
        Some(o) => Err(LayoutError::new_err(format!(
            "level must be 'portable', 'avx2' or 'avx512', found {o:?}"
        ))),
    }
}

/// `y_t = W x_t + bias` per batch column: `x_t` (in x ld) and `out` (out x ld) float32,
/// C-contiguous, of which the first `batch` columns (all by default) are used; `values` the
/// non-zeros in CSR order.
#[pyfunction]
#[pyo3(signature = (pattern, values, x_t, bias, out, batch=None, level=None))]
#[allow(clippy::too_many_arguments)]
fn sparse_linear_forward(
    py: Python<'_>,
    pattern: &PyCsr,
    values: &Bound<'_, PyUntypedArray>,
    x_t: &Bound<'_, PyUntypedArray>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    out: &Bound<'_, PyUntypedArray>,
    batch: Option<usize>,
    level: Option<&str>,
) -> PyResult<()> {
    let lv = self::level(level)?;
    let ld = batch_of(x_t, "x_t", pattern.inner.cols())?;
    let batch = batch.unwrap_or(ld);
    let v = f32_in(values, "values")?;
    let x = f32_in(x_t, "x_t")?;
    let b = bias.map(|b| f32_in(b, "bias")).transpose()?;
    let mut y = f32_out(out, "out")?;
    let vs = v.as_slice().map_err(|_| not_contiguous("values"))?;
    let xs = x.as_slice().map_err(|_| not_contiguous("x_t"))?;
    let bs = match &b {
        Some(b) => Some(b.as_slice().map_err(|_| not_contiguous("bias"))?),
        None => None,
    };
    let ys = y.as_slice_mut().map_err(|_| not_contiguous("out"))?;
    let csr = &pattern.inner;
    detached(py, || sparse::forward(csr, vs, xs, batch, ld, bs, ys, lv))
}

/// The row length of a 2-D `rows x ld` array.
fn batch_of(a: &Bound<'_, PyUntypedArray>, what: &str, rows: usize) -> PyResult<usize> {
    let s = a.shape();
    if s.len() != 2 || s[0] != rows {
        return Err(LayoutError::new_err(format!(
            "{what} must be 2-D with {rows} rows (features x batch), found shape {s:?}"
        )));
    }
    Ok(s[1])
}

/// Any of `dx_t` (in x ld), `dw` (nnz, CSR order) and `db` (out) from `x_t` (in x ld) and
/// `dy_t` (out x ld), of which the first `batch` columns (all by default) are used; outputs given
/// as None are not computed; with `accumulate`, `dw` and `db` are added to.
#[pyfunction]
#[pyo3(signature = (pattern, values, x_t, dy_t, dx_t=None, dw=None, db=None, batch=None, accumulate=false, level=None))]
#[allow(clippy::too_many_arguments)]
fn sparse_linear_backward(
    py: Python<'_>,
    pattern: &PyCsr,
    values: &Bound<'_, PyUntypedArray>,
    x_t: &Bound<'_, PyUntypedArray>,
    dy_t: &Bound<'_, PyUntypedArray>,
    dx_t: Option<&Bound<'_, PyUntypedArray>>,
    dw: Option<&Bound<'_, PyUntypedArray>>,
    db: Option<&Bound<'_, PyUntypedArray>>,
    batch: Option<usize>,
    accumulate: bool,
    level: Option<&str>,
) -> PyResult<()> {
    let lv = self::level(level)?;
    let ld = batch_of(x_t, "x_t", pattern.inner.cols())?;
    let ld_dy = batch_of(dy_t, "dy_t", pattern.inner.rows())?;
    if ld_dy != ld {
        return Err(LayoutError::new_err(format!(
            "x_t rows hold {ld} columns but dy_t rows hold {ld_dy}"
        )));
    }
    let batch = batch.unwrap_or(ld);
    let v = f32_in(values, "values")?;
    let x = f32_in(x_t, "x_t")?;
    let dy = f32_in(dy_t, "dy_t")?;
    let mut dxa = dx_t.map(|a| f32_out(a, "dx_t")).transpose()?;
    let mut dwa = dw.map(|a| f32_out(a, "dw")).transpose()?;
    let mut dba = db.map(|a| f32_out(a, "db")).transpose()?;
    let vs = v.as_slice().map_err(|_| not_contiguous("values"))?;
    let xs = x.as_slice().map_err(|_| not_contiguous("x_t"))?;
    let dys = dy.as_slice().map_err(|_| not_contiguous("dy_t"))?;
    let dxs = match dxa.as_mut() {
        Some(a) => Some(a.as_slice_mut().map_err(|_| not_contiguous("dx_t"))?),
        None => None,
    };
    let dws = match dwa.as_mut() {
        Some(a) => Some(a.as_slice_mut().map_err(|_| not_contiguous("dw"))?),
        None => None,
    };
    let dbs = match dba.as_mut() {
        Some(a) => Some(a.as_slice_mut().map_err(|_| not_contiguous("db"))?),
        None => None,
    };
    let csr = &pattern.inner;
    detached(py, || {
        sparse::backward(csr, vs, xs, dys, batch, ld, dxs, dws, dbs, accumulate, lv)
    })
}

/// The row stride (floats) the kernels run best with for `batch` columns (see
/// `crate::sparse::padded_ld`).
#[pyfunction]
fn sparse_padded_ld(batch: usize) -> usize {
    sparse::padded_ld(batch)
}

/// `dst[c, r] = src[r, c]` for `r < rows`, `c < cols`: `src` 2-D (rows x src_ld), `dst` 2-D
/// (cols x dst_ld), both float32 C-contiguous; `rows` and `cols` default to all of `src`.
#[pyfunction]
#[pyo3(signature = (src, dst, rows=None, cols=None))]
fn sparse_transpose(
    py: Python<'_>,
    src: &Bound<'_, PyUntypedArray>,
    dst: &Bound<'_, PyUntypedArray>,
    rows: Option<usize>,
    cols: Option<usize>,
) -> PyResult<()> {
    let (ss, ds) = (src.shape().to_vec(), dst.shape().to_vec());
    if ss.len() != 2 || ds.len() != 2 {
        return Err(LayoutError::new_err(format!(
            "transpose takes 2-D arrays, found shapes {ss:?} and {ds:?}"
        )));
    }
    let rows = rows.unwrap_or(ss[0]);
    let cols = cols.unwrap_or(ss[1]);
    if rows > ss[0] || cols > ds[0] {
        return Err(LayoutError::new_err(format!(
            "transpose of {rows} x {cols} from shape {ss:?} into shape {ds:?}"
        )));
    }
    let s = f32_in(src, "src")?;
    let mut d = f32_out(dst, "dst")?;
    let s_all = s.as_slice().map_err(|_| not_contiguous("src"))?;
    let s_used = &s_all[..rows * ss[1]];
    let d_all = d.as_slice_mut().map_err(|_| not_contiguous("dst"))?;
    let d_used = &mut d_all[..cols * ds[1]];
    detached(py, || {
        sparse::transpose(s_used, rows, cols, ss[1], d_used, ds[1])
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sparse_transpose, m)?)?;
    m.add_class::<PyCsr>()?;
    m.add_function(wrap_pyfunction!(sparse_padded_ld, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_linear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_linear_backward, m)?)?;
    Ok(())
}

//! The PyO3 glue: the only module that knows about Python (one file per area, registered below).
//! Buffers are borrowed from NumPy arrays while the GIL is held, the work runs with the GIL
//! released ([`detached`]), and every core error becomes one exception class (`From<Error> for
//! PyErr`, in `errors.rs`).

mod checkpoint;
mod errors;
mod optim;
mod sparse;
mod zmap;

pub(crate) use errors::{CodecError, DtypeError, FormatError, LayoutError};

use crate::codec::{self, Param, Params};
use crate::dtype::{not_packable, DType, Data, DataMut, Owned};
use crate::format::Packed;
use half::{bf16, f16};
use numpy::{
    IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString, PyTuple};

/// Runs `f` without the GIL and maps its error.
pub(crate) fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    py.detach(f).map_err(PyErr::from)
}

/// The bytes of each array; a LayoutError ("`what` must be C-contiguous") for one that is not.
pub(crate) fn byte_slices<'a>(
    arrays: &'a [numpy::PyReadonlyArray1<'_, u8>],
    what: &str,
) -> PyResult<Vec<&'a [u8]>> {
    arrays
        .iter()
        .map(|a| {
            a.as_slice()
                .map_err(|_| LayoutError::new_err(format!("{what} must be C-contiguous")))
        })
        .collect()
}

fn not_contiguous(what: &str) -> PyErr {
    LayoutError::new_err(format!(
        "{what} is not C-contiguous; pass np.ascontiguousarray(x) or x.contiguous() \
         (smaq_rs never copies silently)"
    ))
}

pub(crate) fn params_from_dict(d: Option<&Bound<'_, PyDict>>) -> PyResult<Params> {
    let mut out = Params::new();
    let Some(d) = d else { return Ok(out) };
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        let p = if v.is_none() {
            Param::None
        } else if v.is_instance_of::<PyBool>() {
            Param::Bool(v.extract()?)
        } else if v.is_instance_of::<PyInt>() {
            Param::Int(v.extract().map_err(|_| {
                CodecError::new_err(format!("parameter {key} = {v} does not fit in 64 bits"))
            })?)
        } else if v.is_instance_of::<PyFloat>() {
            Param::Float(v.extract()?)
        } else if v.is_instance_of::<PyString>() {
            Param::Str(v.extract()?)
        } else {
            return Err(CodecError::new_err(format!(
                "parameter {key} has type {}; expected bool, int, float, str or None",
                v.get_type().name()?
            )));
        };
        out.insert(key, p);
    }
    Ok(out)
}

pub(crate) fn params_to_dict<'py>(py: Python<'py>, p: &Params) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in p {
        match v {
            Param::Bool(b) => d.set_item(k, b)?,
            Param::Int(i) => d.set_item(k, i)?,
            Param::Float(x) => d.set_item(k, x)?,
            Param::Str(s) => d.set_item(k, s)?,
            Param::None => d.set_item(k, py.None())?,
        }
    }
    Ok(d)
}

/// A tensor in packed form. Created by `encode` or `Packed.from_bytes`; immutable.
#[pyclass(module = "smaq_rs._core", name = "Packed", frozen)]
struct PyPacked {
    inner: Packed,
}

#[pymethods]
impl PyPacked {
    /// Parses packed bytes (bytes, bytearray, memoryview...), verifying the checksum.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        // Any contiguous byte buffer: bytes, bytearray, memoryview ('B' or 'b'), uint8 arrays.
        let bytes = match PyBuffer::<u8>::get(data) {
            Ok(buf) => buf.to_vec(py)?,
            Err(_) => match PyBuffer::<i8>::get(data) {
                Ok(buf) => buf.to_vec(py)?.into_iter().map(|b| b as u8).collect(),
                Err(_) => {
                    let kind = data
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default();
                    return Err(FormatError::new_err(format!(
                        "expected bytes-like packed data, got {kind}"
                    )));
                }
            },
        };
        let inner = detached(py, move || Packed::from_bytes(bytes))?;
        Ok(Self { inner })
    }

    /// The packed bytes, exactly `nbytes` of them (a fresh encoding's checksum is computed
    /// here, the first time, without the GIL).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let sum = detached(py, || Ok(self.inner.checksum()))?;
        let body = self.inner.body();
        PyBytes::new_with(py, self.inner.nbytes(), |out| {
            let (head, tail) = out.split_at_mut(body.len());
            head.copy_from_slice(body);
            tail.copy_from_slice(&sum.to_le_bytes());
            Ok(())
        })
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }
    #[getter]
    fn dense_nbytes(&self) -> u64 {
        self.inner.dense_nbytes()
    }
    #[getter]
    fn meta_nbytes(&self) -> usize {
        self.inner.meta_len()
    }
    #[getter]
    fn payload_nbytes(&self) -> usize {
        self.inner.payload_len()
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().name()
    }
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.shape())
    }
    #[getter]
    fn codec(&self) -> &'static str {
        self.inner.codec_name()
    }
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        params_to_dict(py, &self.inner.params())
    }
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        params_to_dict(py, &self.inner.stats())
    }

    /// Decodes into a new NumPy array (bfloat16 comes back as its uint16 bit pattern).
    fn decode<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyUntypedArray>> {
        let owned = detached(py, || self.inner.decode())?;
        let shape: Vec<usize> = self.inner.shape().iter().map(|&d| d as usize).collect();
        let arr = match owned {
            Owned::F32(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
            Owned::F64(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
            Owned::F16(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
            Owned::BF16(v) => {
                let bits: Vec<u16> = bytemuck::cast_vec(v);
                bits.into_pyarray(py).reshape(shape)?.into_any()
            }
        };
        Ok(arr.cast_into::<PyUntypedArray>()?)
    }

    /// Decodes into `out`, a writable C-contiguous array of the tensor's dtype and size
    /// (uint16 for bfloat16).
    fn decode_into(&self, py: Python<'_>, out: &Bound<'_, PyAny>) -> PyResult<()> {
        with_output(out, self.inner.dtype(), self.inner.numel(), |dst| {
            detached(py, move || self.inner.decode_into(dst))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Packed(codec={:?}, dtype={}, shape={:?}, nbytes={})",
            self.inner.codec_name(),
            self.inner.dtype().name(),
            self.inner.shape(),
            self.inner.nbytes()
        )
    }
}

/// Runs `f` on the elements of a C-contiguous NumPy array, borrowed. `dtype` names the element
/// type ("bfloat16" for a uint16 array holding bfloat16 bits); by default the array's own.
pub(crate) fn with_input<R>(
    array: &Bound<'_, PyUntypedArray>,
    dtype: Option<&str>,
    f: impl FnOnce(Data<'_>) -> PyResult<R>,
) -> PyResult<R> {
    let np_dtype = array.dtype().str()?.to_string();
    let want = match dtype {
        Some(d) => DType::from_name(d)?,
        None => match np_dtype.as_str() {
            "float32" => DType::F32,
            "float64" => DType::F64,
            "float16" => DType::F16,
            other => {
                return Err(DtypeError::new_err(format!(
                    "cannot compress an array of dtype {other} ({}); supported: float32, float16, \
                     float64, and bfloat16 (from torch)",
                    array.dtype()
                )))
            }
        },
    };
    macro_rules! run {
        ($t:ty, |$s:ident| $wrap:expr) => {{
            let arr: PyReadonlyArrayDyn<'_, $t> = array.extract().map_err(|_| {
                DtypeError::new_err(format!(
                    "array of dtype {np_dtype} does not hold {}",
                    want.name()
                ))
            })?;
            let $s = arr.as_slice().map_err(|_| not_contiguous("input"))?;
            f($wrap)
        }};
    }
    match want {
        DType::F32 => run!(f32, |s| Data::F32(s)),
        DType::F64 => run!(f64, |s| Data::F64(s)),
        DType::F16 => run!(f16, |s| Data::F16(s)),
        DType::BF16 => run!(u16, |s| Data::BF16(bytemuck::cast_slice::<u16, bf16>(s))),
        other => Err(not_packable(other).into()),
    }
}

/// Runs `f` on the elements of `out`, a writable C-contiguous array of `want` with `numel`
/// elements (uint16 for bfloat16), borrowed.
pub(crate) fn with_output<R>(
    out: &Bound<'_, PyAny>,
    want: DType,
    numel: u64,
    f: impl FnOnce(DataMut<'_>) -> PyResult<R>,
) -> PyResult<R> {
    let check = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(LayoutError::new_err(format!(
                "out must be a writable {} array with {numel} elements",
                if want == DType::BF16 {
                    "uint16 (bfloat16 bits)"
                } else {
                    want.name()
                },
            )))
        }
    };
    macro_rules! into {
        ($t:ty, |$s:ident| $wrap:expr) => {{
            check(out.cast::<PyArrayDyn<$t>>().is_ok())?;
            let mut arr: PyReadwriteArrayDyn<'_, $t> = out.extract()?;
            let $s = arr.as_slice_mut().map_err(|_| not_contiguous("out"))?;
            f($wrap)
        }};
    }
    match want {
        DType::F32 => into!(f32, |s| DataMut::F32(s)),
        DType::F64 => into!(f64, |s| DataMut::F64(s)),
        DType::F16 => into!(f16, |s| DataMut::F16(s)),
        DType::BF16 => into!(u16, |s| DataMut::BF16(
            bytemuck::cast_slice_mut::<u16, bf16>(s)
        )),
        other => Err(not_packable(other).into()),
    }
}

/// Encodes a C-contiguous NumPy array (see [`with_input`] for `dtype`); the array's shape is
/// recorded.
#[pyfunction]
#[pyo3(signature = (array, codec, params=None, dtype=None))]
fn encode(
    py: Python<'_>,
    array: &Bound<'_, PyUntypedArray>,
    codec: &str,
    params: Option<&Bound<'_, PyDict>>,
    dtype: Option<&str>,
) -> PyResult<PyPacked> {
    let params = params_from_dict(params)?;
    let shape: Vec<u64> = array.shape().iter().map(|&d| d as u64).collect();
    let inner = with_input(array, dtype, |data| {
        detached(py, || Packed::encode(data, &shape, codec, &params))
    })?;
    Ok(PyPacked { inner })
}

/// Every codec: a list of dicts with name, id, doc and default parameters.
#[pyfunction]
fn codecs<'py>(py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    codec::REGISTRY
        .iter()
        .map(|c| {
            let d = PyDict::new(py);
            d.set_item("name", c.name)?;
            d.set_item("id", c.id)?;
            d.set_item("doc", c.doc)?;
            d.set_item("defaults", params_to_dict(py, &(c.defaults)())?)?;
            Ok(d)
        })
        .collect()
}

/// Validates codec parameters without encoding; returns the full resolved configuration.
#[pyfunction]
#[pyo3(signature = (codec, params=None))]
fn resolve_params<'py>(
    py: Python<'py>,
    codec: &str,
    params: Option<&Bound<'_, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let info = codec::by_name(codec)?;
    let given = params_from_dict(params)?;
    (info.encoder)(&given)?;
    let mut full = (info.defaults)();
    full.extend(given);
    params_to_dict(py, &full)
}

/// Whether `codec` with `params` gives back every exact zero (the registry's answer; a seed
/// is ignored). Invalid parameters raise CodecError, as in `resolve_params`.
#[pyfunction]
#[pyo3(signature = (codec, params=None))]
fn keeps_zeros(codec: &str, params: Option<&Bound<'_, PyDict>>) -> PyResult<bool> {
    let info = codec::by_name(codec)?;
    Ok(codec::keeps_zeros(info, &params_from_dict(params)?)?)
}

/// Elements of a float tensor's bytes (`itemsize` bytes each) that are not zeros of either sign;
/// with `limit`, counting stops past it (the result is then some count above `limit`).
#[pyfunction]
#[pyo3(signature = (data, itemsize, limit=None))]
fn count_nonzero_bits(
    py: Python<'_>,
    data: numpy::PyReadonlyArray1<'_, u8>,
    itemsize: usize,
    limit: Option<u64>,
) -> PyResult<u64> {
    let bytes = data
        .as_slice()
        .map_err(|_| LayoutError::new_err("count_nonzero_bits: the buffer must be C-contiguous"))?;
    detached(py, || {
        crate::zmap::count_nonzero_bits(bytes, itemsize, limit)
    })
}

/// XXH3-64 of a buffer's bytes (the packed format's checksum), for content hashes of tensors.
#[pyfunction]
fn checksum(py: Python<'_>, data: numpy::PyReadonlyArray1<'_, u8>) -> PyResult<u64> {
    let bytes = data
        .as_slice()
        .map_err(|_| LayoutError::new_err("checksum: the buffer must be C-contiguous"))?;
    detached(py, || Ok(crate::format::checksum(bytes)))
}

/// XXH3-64 of each buffer (what `checksum` gives), the buffers hashed in parallel.
#[pyfunction]
fn checksums(py: Python<'_>, data: Vec<numpy::PyReadonlyArray1<'_, u8>>) -> PyResult<Vec<u64>> {
    let slices = byte_slices(&data, "checksums: the buffers")?;
    Ok(py.detach(|| {
        use rayon::prelude::*;
        // On the Rayon pool, as the checkpoint writer's encodes that follow (see
        // `zmap::count_nonzero_bits`).
        crate::pool::install(|| {
            slices
                .par_iter()
                .with_max_len(1)
                .map(|s| crate::format::checksum(s))
                .collect()
        })
    }))
}

#[pyfunction]
fn set_num_threads(n: usize) {
    crate::pool::set_num_threads(n)
}

#[pyfunction]
fn get_num_threads() -> usize {
    crate::pool::num_threads()
}

/// Where the codecs' parallel loops run now: "openmp" (the host's team, e.g. torch's) or "rayon".
#[pyfunction]
fn thread_backend() -> &'static str {
    crate::pool::backend()
}

/// Frees the recycled packed buffers kept for reuse; returns the bytes released.
#[pyfunction]
fn empty_cache() -> usize {
    crate::buf::empty_cache()
}

/// Bytes held by recycled packed buffers kept for reuse.
#[pyfunction]
fn cached_bytes() -> usize {
    crate::buf::cached_bytes()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", crate::format::VERSION)?;
    errors::register(m)?;
    m.add_class::<PyPacked>()?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(codecs, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_params, m)?)?;
    m.add_function(wrap_pyfunction!(keeps_zeros, m)?)?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(thread_backend, m)?)?;
    m.add_function(wrap_pyfunction!(count_nonzero_bits, m)?)?;
    m.add_function(wrap_pyfunction!(checksums, m)?)?;
    m.add_function(wrap_pyfunction!(empty_cache, m)?)?;
    m.add_function(wrap_pyfunction!(cached_bytes, m)?)?;
    // Other areas register here, one line each: `area::register(m)?;`
    checkpoint::register(m)?;
    optim::register(m)?;
    sparse::register(m)?;
    zmap::register(m)?;
    Ok(())
}

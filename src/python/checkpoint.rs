//! Glue for the checkpoint container (src/format/container/): a writer fed in batches of raw
//! byte arrays, and a reader that decodes entries by name. Python (python/smaq_rs/checkpoint/) owns the
//! policy, the JSON skeleton and the torch/NumPy views.

use super::{byte_slices, detached, params_from_dict, params_to_dict, LayoutError};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::container::{Encoding, EntrySpec, FileSource, Reader, Writer};
use crate::format::Packed;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;

/// (name, dtype, shape, codec, params) of one entry, as Python passes it.
type Spec<'py> = (String, String, Vec<u64>, String, Option<Bound<'py, PyDict>>);
/// (params, encoder statistics) of a packed entry, as dicts; (None, None) for raw and zstd entries.
type ParamsAndInfo<'py> = (Option<Bound<'py, PyDict>>, Option<Bound<'py, PyDict>>);

/// Runs `f` without the GIL; an error is said of the entry `name` ([`Error::in_entry`]).
fn detached_entry<T: Send>(
    py: Python<'_>,
    name: &str,
    f: impl FnOnce() -> Result<T> + Send,
) -> PyResult<T> {
    py.detach(f).map_err(|e| e.in_entry(name).into())
}

/// Writes a checkpoint to a temporary file beside `path`; `finish()` renames it into place.
#[pyclass(module = "smaq_rs._core", name = "CheckpointWriter")]
struct PyWriter {
    inner: Option<Writer>,
}

#[pymethods]
impl PyWriter {
    /// `specs`: one (name, dtype, shape, codec, params) per entry, in order; codec is "raw",
    /// "zstd" (params: level) or a registered codec name. `json`: the document stored beside.
    #[new]
    fn new(py: Python<'_>, path: PathBuf, specs: Vec<Spec<'_>>, json: String) -> PyResult<Self> {
        let mut out = Vec::with_capacity(specs.len());
        for (name, dtype, shape, codec, params) in specs {
            let dtype = DType::stored_from_name(&dtype).map_err(|e| e.in_entry(&name))?;
            let params = params_from_dict(params.as_ref())?;
            let encoding = match codec.as_str() {
                "raw" => Encoding::Raw,
                "zstd" => Encoding::zstd(params)?,
                other => {
                    let info = crate::codec::by_name(other).map_err(|e| e.in_entry(&name))?;
                    (info.encoder)(&params).map_err(|e| e.in_entry(&name))?;
                    if !dtype.is_packable() {
                        let e =
                            format!("codec {other:?} needs a float tensor, not {}", dtype.name());
                        return Err(Error::Dtype(e).in_entry(&name).into());
                    }
                    Encoding::Packed(other.to_string(), params)
                }
            };
            out.push(EntrySpec {
                name,
                dtype,
                shape,
                encoding,
            });
        }
        let inner = detached(py, move || Writer::create(&path, out, json))?;
        Ok(Self { inner: Some(inner) })
    }

    /// Encodes and appends the next entries: one C-contiguous uint8 array of raw bytes each.
    /// Returns their stored sizes in bytes.
    fn write(
        &mut self,
        py: Python<'_>,
        arrays: Vec<PyReadonlyArray1<'_, u8>>,
    ) -> PyResult<Vec<u64>> {
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| LayoutError::new_err("the checkpoint writer is closed"))?;
        let slices = byte_slices(&arrays, "entry bytes")?;
        detached(py, || w.write_batch(&slices))
    }

    /// Writes the header, fsyncs (unless `durable` is false) and renames into place; returns
    /// the seconds the fsyncs took.
    #[pyo3(signature = (durable=true))]
    fn finish(&mut self, py: Python<'_>, durable: bool) -> PyResult<f64> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| LayoutError::new_err("the checkpoint writer is closed"))?;
        detached(py, || w.finish(durable))
    }

    /// Discards the temporary file (the target is untouched).
    fn abort(&mut self) {
        self.inner.take();
    }
}

/// A checkpoint opened for reading: the header is parsed at open, entries are read on demand.
#[pyclass(module = "smaq_rs._core", name = "CheckpointReader", frozen)]
struct PyReader {
    inner: Reader<FileSource>,
}

impl PyReader {
    fn index(&self, name: &str) -> PyResult<usize> {
        self.inner.find(name).ok_or_else(|| {
            pyo3::exceptions::PyKeyError::new_err(format!("no entry named {name:?}"))
        })
    }
}

#[pymethods]
impl PyReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = detached(py, move || Reader::open(&path))?;
        Ok(Self { inner })
    }

    /// The JSON document.
    #[getter]
    fn json(&self) -> &str {
        &self.inner.header.json
    }

    #[getter]
    fn file_nbytes(&self) -> u64 {
        self.inner.header.file_len
    }

    /// Names in file order.
    fn names(&self) -> Vec<String> {
        self.inner
            .header
            .entries
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// What the header says of every entry: name, dtype, shape, codec, nbytes, dense_nbytes,
    /// offset (in the file), checksum.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let h = &self.inner.header;
        h.entries
            .iter()
            .map(|e| {
                let d = PyDict::new(py);
                d.set_item("name", &e.name)?;
                d.set_item("dtype", e.dtype.name())?;
                d.set_item("shape", e.shape.clone())?;
                d.set_item("codec", e.codec_name())?;
                d.set_item("nbytes", e.length)?;
                d.set_item("dense_nbytes", e.dense_len())?;
                d.set_item("offset", h.data_start + e.offset)?;
                d.set_item("checksum", e.checksum)?;
                Ok(d)
            })
            .collect()
    }

    /// Parameters and encoder statistics of a packed entry (reads and verifies its bytes);
    /// (None, None) for raw and zstd entries.
    fn codec_info<'py>(&self, py: Python<'py>, name: &str) -> PyResult<ParamsAndInfo<'py>> {
        let i = self.index(name)?;
        if self.inner.header.entries[i].encoding != crate::format::container::ENC_PACKED {
            return Ok((None, None));
        }
        let p = detached_entry(py, name, || {
            Packed::from_verified_bytes(self.inner.stored(i)?)
        })?;
        Ok((
            Some(params_to_dict(py, &p.params())?),
            Some(params_to_dict(py, &p.stats())?),
        ))
    }

    /// The stored bytes of an entry, checksum verified.
    fn stored<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        let i = self.index(name)?;
        let b = detached_entry(py, name, || self.inner.stored(i))?;
        Ok(PyBytes::new(py, &b))
    }

    /// Decodes an entry into an 8-byte-aligned uint64 buffer holding its raw little-endian bytes
    /// first (view it as uint8, cut to dense_nbytes, view as the dtype).
    fn read<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let i = self.index(name)?;
        let v = detached_entry(py, name, || self.inner.read(i))?;
        Ok(v.into_pyarray(py))
    }

    /// Decodes several entries in parallel (see `read`).
    fn read_many<'py>(
        &self,
        py: Python<'py>,
        names: Vec<String>,
    ) -> PyResult<Vec<Bound<'py, PyArray1<u64>>>> {
        let idx = names
            .iter()
            .map(|n| self.index(n))
            .collect::<PyResult<Vec<_>>>()?;
        let out = py.detach(|| self.inner.read_many(&idx));
        out.into_iter()
            .zip(&names)
            .map(|(r, n)| {
                r.map(|v| v.into_pyarray(py))
                    .map_err(|e| e.in_entry(n).into())
            })
            .collect()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyWriter>()?;
    m.add_class::<PyReader>()?;
    m.add("CHECKPOINT_VERSION", crate::format::container::VERSION)?;
    Ok(())
}

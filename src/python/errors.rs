//! The Python exception tree, declared once, and the one mapping of a core [`Error`] to it.
//!
//! `SmaqError(ValueError)` is the base; `FormatError` (with `ChecksumError` below it),
//! `CodecError`, `DtypeError` and `LayoutError` derive from it. [`Error::Io`] becomes the `OSError`
//! subclass of its kind (`FileNotFoundError`, `PermissionError`...), as Python's own I/O does.

use crate::error::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

create_exception!(
    smaq_rs,
    SmaqError,
    PyValueError,
    "Base class of every smaq_rs error."
);
create_exception!(
    smaq_rs,
    FormatError,
    SmaqError,
    "Bytes that are not a valid packed tensor."
);
create_exception!(
    smaq_rs,
    ChecksumError,
    FormatError,
    "Packed bytes whose checksum does not match."
);
create_exception!(
    smaq_rs,
    CodecError,
    SmaqError,
    "Unknown codec or invalid codec parameters."
);
create_exception!(smaq_rs, DtypeError, SmaqError, "Unsupported element type.");
create_exception!(
    smaq_rs,
    LayoutError,
    SmaqError,
    "Non-contiguous input or a mismatched output buffer."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        exception(&e, msg)
    }
}

/// The exception of `e`'s class with the message `msg` (an [`Error::Entry`] takes its source's).
fn exception(e: &Error, msg: String) -> PyErr {
    match e {
        Error::Format(_) => FormatError::new_err(msg),
        Error::Checksum { .. } => ChecksumError::new_err(msg),
        Error::Codec(_) => CodecError::new_err(msg),
        Error::Dtype(_) => DtypeError::new_err(msg),
        Error::Layout(_) => LayoutError::new_err(msg),
        Error::Io { kind, .. } => PyErr::from(std::io::Error::new(*kind, msg)),
        Error::Entry { source, .. } => exception(source, msg),
    }
}

/// Adds the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SmaqError", py.get_type::<SmaqError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("ChecksumError", py.get_type::<ChecksumError>())?;
    m.add("CodecError", py.get_type::<CodecError>())?;
    m.add("DtypeError", py.get_type::<DtypeError>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    Ok(())
}

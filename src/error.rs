//! The one error type of the core. The Python glue maps each variant to one exception class.

use thiserror::Error;

/// Everything that can go wrong in the core. Messages say what was expected and what was found.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// Bytes that are not a valid packed tensor: bad magic, version, lengths, inconsistent metadata.
    #[error("{0}")]
    Format(String),
    /// The bytes parse but their checksum does not match.
    #[error("checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum { stored: u64, computed: u64 },
    /// Unknown codec or invalid codec parameters.
    #[error("{0}")]
    Codec(String),
    /// Unsupported element type, or an output buffer of the wrong type.
    #[error("{0}")]
    Dtype(String),
    /// Shape or size mismatch (e.g. an `out=` buffer of the wrong length).
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::Format(..))` unless `cond` holds.
macro_rules! ensure_format {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::Format(format!($($arg)+)));
        }
    };
}
pub(crate) use ensure_format;

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
    /// Shape, size or memory layout mismatch (e.g. an `out=` buffer of the wrong length); Python's
    /// `LayoutError`.
    #[error("{0}")]
    Layout(String),
    /// A file that could not be opened, read, written or renamed: what was being done, and the
    /// system's error (of which the kind is kept, so Python raises the matching `OSError`).
    #[error("{context}: {message}")]
    Io {
        context: String,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// An error about one named entry of a checkpoint; it stands for its `source` otherwise.
    #[error("entry {name:?}: {source}")]
    Entry { name: String, source: Box<Error> },
}

impl Error {
    /// Turns an I/O failure into [`Error::Io`] with `context` (what was being done).
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |e| Error::Io {
            context,
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    /// The error, said of the checkpoint entry `name` ([`Error::Entry`]); an [`Error::Io`] names
    /// its file already and is returned as it is.
    pub fn in_entry(self, name: &str) -> Error {
        match self {
            e @ Error::Io { .. } => e,
            e => Error::Entry {
                name: name.to_string(),
                source: Box::new(e),
            },
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = Error::io("cannot open a.smaq")(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(matches!(
            &e,
            Error::Io {
                kind: std::io::ErrorKind::NotFound,
                ..
            }
        ));
        assert_eq!(e.to_string(), "cannot open a.smaq: entity not found");
        assert_eq!(e.clone().in_entry("w"), e);
        let c = Error::Checksum {
            stored: 1,
            computed: 2,
        }
        .in_entry("w");
        assert_eq!(
            c.to_string(),
            "entry \"w\": checksum mismatch: stored 0x0000000000000001, computed 0x0000000000000002"
        );
    }
}

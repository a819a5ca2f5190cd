//! The error type of the library and the CLI.

use std::io;
use std::path::PathBuf;

use crate::asif::format::FormatError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The header or metadata breaks the format's rules.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// An index structure is inconsistent (bad entry, chunk out of range).
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("range {offset:#x}+{len:#x} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("image is open read-only")]
    ReadOnly,
    #[error("{}: image is in use by another process (locked)", path.display())]
    Locked { path: PathBuf },
    /// The image is served, but not for writing (found at open).
    #[error("{}: not writable: {reason}", path.display())]
    WritesRefused { path: PathBuf, reason: String },
    /// A bad argument or option.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Format(_) | Error::Corrupt(_) => libc::EIO,
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::ReadOnly | Error::WritesRefused { .. } => libc::EROFS,
            Error::Locked { .. } => libc::EBUSY,
            Error::Invalid(_) => libc::EINVAL,
        }
    }
}

use thiserror::Error;

/// A structure on disk breaks the format's rules. Each variant names the
/// field, so a user sees what is wrong with the file rather than a panic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("not an ASIF image (magic {0:02x?}, expected \"shdw\")")]
    BadMagic([u8; 4]),
    #[error("unsupported ASIF version {0} (only version 1 is known)")]
    BadVersion(u32),
    #[error("header is truncated ({0} bytes, need {1})")]
    Truncated(usize, usize),
    #[error("invalid header field {field}: {value:#x} ({why})")]
    BadField {
        field: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("invalid metadata: {0}")]
    BadMetadata(String),
}

impl FormatError {
    pub(crate) fn field(field: &'static str, value: u64, why: &'static str) -> Self {
        FormatError::BadField { field, value, why }
    }
}

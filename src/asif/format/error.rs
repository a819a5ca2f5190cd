use thiserror::Error;

/// A structure on disk breaks the format's rules. Each variant names the
/// field, so a user sees what is wrong with the file rather than a panic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("not an ASIF image (magic {}, expected \"shdw\")", show_magic(.0))]
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

/// A magic as a user reads it: quoted text when every byte is printable
/// ASCII, else hex (`0x00000000`), never a Rust byte array.
fn show_magic(m: &[u8; 4]) -> String {
    let plain = |b: &u8| (b.is_ascii_graphic() || *b == b' ') && !matches!(b, b'"' | b'\\');
    if m.iter().all(plain) {
        format!("\"{}\"", String::from_utf8_lossy(m))
    } else {
        format!("{:#010x}", u32::from_be_bytes(*m))
    }
}

impl FormatError {
    pub(crate) fn field(field: &'static str, value: u64, why: &'static str) -> Self {
        FormatError::BadField { field, value, why }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_magic_reads_as_text_or_hex() {
        let msg = |m: [u8; 4]| FormatError::BadMagic(m).to_string();
        assert_eq!(
            msg(*b"shdx"),
            "not an ASIF image (magic \"shdx\", expected \"shdw\")"
        );
        assert_eq!(
            msg([0; 4]),
            "not an ASIF image (magic 0x00000000, expected \"shdw\")"
        );
        assert_eq!(
            msg(*b"QFI\xfb"),
            "not an ASIF image (magic 0x514649fb, expected \"shdw\")"
        );
        // A newline or quote in the file must not break the line or the quoting.
        assert_eq!(
            msg(*b"a\nbc"),
            "not an ASIF image (magic 0x610a6263, expected \"shdw\")"
        );
        assert_eq!(
            msg(*b"ab\"c"),
            "not an ASIF image (magic 0x61622263, expected \"shdw\")"
        );
    }
}

//! The password of an encrypted image: held once, shared by every open
//! that needs it, wiped from memory when the last holder drops it, and
//! never printed (its `Debug` says only that it is there).

use std::sync::Arc;

use zeroize::Zeroizing;

#[derive(Clone)]
pub struct Password(Arc<Zeroizing<Vec<u8>>>);

impl Password {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Password {
        Password(Arc::new(bytes))
    }

    /// The first line of `text` (without its line ending), as hdiutil's
    /// `-stdinpass` and most password files hold it; a NUL ends it too.
    pub fn first_line(text: &[u8]) -> Password {
        let end = text
            .iter()
            .position(|&b| b == b'\n' || b == 0)
            .unwrap_or(text.len());
        let line = &text[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        Password::new(Zeroizing::new(line.to_vec()))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_ends_at_a_newline_a_crlf_or_a_nul() {
        assert_eq!(Password::first_line(b"secret\nnext").bytes(), b"secret");
        assert_eq!(Password::first_line(b"secret\r\n").bytes(), b"secret");
        assert_eq!(Password::first_line(b"sec ret\0junk").bytes(), b"sec ret");
        assert_eq!(Password::first_line(b"plain").bytes(), b"plain");
        assert_eq!(Password::first_line(b"").bytes(), b"");
        assert_eq!(format!("{:?}", Password::first_line(b"x")), "Password(..)");
    }
}

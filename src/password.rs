//! The password of an encrypted image: held once, shared by every open
//! that needs it, wiped from memory when the last holder drops it, and
//! never printed (its `Debug` says only that it is there).
//!
//! It comes from `--password-file` (its first line), `--stdinpass` (as
//! hdiutil: standard input up to a newline or NUL), `-o password-file=` of
//! mount and serve, or a prompt on a terminal when none is given and an
//! image needs one. Never from the command line itself.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use zeroize::Zeroizing;

use crate::error::{Error, Result};

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

/// Longest password file or standard input read for a password.
const MAX_PASSWORD_INPUT: u64 = 64 << 10;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct PasswordArgs {
    /// Password of an encrypted image: the first line of FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "stdinpass")]
    pub password_file: Option<PathBuf>,
    /// Read the password of an encrypted image from standard input (up to
    /// a newline or NUL), as hdiutil -stdinpass.
    #[arg(long)]
    pub stdinpass: bool,
}

/// Standard input is read once, however many images need the password.
static STDIN_PASSWORD: OnceLock<std::result::Result<Password, String>> = OnceLock::new();

/// The first line of the file at `path`.
pub fn from_file(path: &Path) -> Result<Password> {
    let ctx = |e| Error::io(format!("{}: reading the password file", path.display()), e);
    let f = std::fs::File::open(path).map_err(ctx)?;
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_PASSWORD_INPUT)
        .read_to_end(&mut bytes)
        .map_err(ctx)?;
    Ok(Password::first_line(&bytes))
}

fn from_stdin() -> Result<Password> {
    STDIN_PASSWORD
        .get_or_init(|| {
            let mut bytes = Zeroizing::new(Vec::new());
            std::io::stdin()
                .lock()
                .take(MAX_PASSWORD_INPUT)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("reading the password from standard input: {e}"))?;
            Ok(Password::first_line(&bytes))
        })
        .clone()
        .map_err(Error::Invalid)
}

impl PasswordArgs {
    /// The password `--password-file` or `--stdinpass` gives, if either.
    pub fn given(&self) -> Result<Option<Password>> {
        if let Some(f) = &self.password_file {
            return from_file(f).map(Some);
        }
        if self.stdinpass {
            return from_stdin().map(Some);
        }
        Ok(None)
    }

    /// The password for the image at `path`: the one given, else, when the
    /// image is encrypted and standard input is a terminal, one typed at a
    /// prompt. `None` otherwise: opening an encrypted image without one
    /// then says what it needs.
    pub fn for_image(&self, path: &Path) -> Result<Option<Password>> {
        if let Some(p) = self.given()? {
            return Ok(Some(p));
        }
        if !std::io::stdin().is_terminal() || !crate::registry::is_encrypted(path)? {
            return Ok(None);
        }
        prompt(&format!("Password for {}: ", path.display())).map(Some)
    }

    /// The password of a new image: the one given, else typed twice at a
    /// terminal prompt.
    pub fn for_new_image(&self, path: &Path) -> Result<Password> {
        if let Some(p) = self.given()? {
            return Ok(p);
        }
        if !std::io::stdin().is_terminal() {
            return Err(Error::Invalid(format!(
                "{}: an encrypted image needs a password (--password-file FILE or --stdinpass)",
                path.display()
            )));
        }
        let first = prompt(&format!("New password for {}: ", path.display()))?;
        let again = prompt("Again: ")?;
        if first.bytes() != again.bytes() {
            return Err(Error::Invalid("the two passwords differ".into()));
        }
        Ok(first)
    }
}

/// The one password of every encrypted image a mount or server serves:
/// `-o password-file=` (`file`), else `--password-file` or `--stdinpass`,
/// else, on a terminal and when SOURCE holds an encrypted image, a prompt.
/// `None` leaves encrypted images to be skipped with the reason.
pub fn for_source(
    args: &PasswordArgs,
    file: Option<&Path>,
    source: &Path,
) -> Result<Option<Password>> {
    if let Some(f) = file {
        return from_file(f).map(Some);
    }
    if let Some(p) = args.given()? {
        return Ok(Some(p));
    }
    if !std::io::stdin().is_terminal() || !holds_encrypted(source) {
        return Ok(None);
    }
    prompt(&format!(
        "Password for the encrypted images of {}: ",
        source.display()
    ))
    .map(Some)
}

/// Whether `source` is, or (as a directory) holds, an encrypted image.
fn holds_encrypted(source: &Path) -> bool {
    let one = |p: &Path| crate::registry::is_encrypted(p).unwrap_or(false);
    if one(source) {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(source) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        p.extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| crate::registry::IMAGE_EXTENSIONS.contains(&x))
            && one(&p)
    })
}

/// Reads a password at the terminal without echo.
pub fn prompt(question: &str) -> Result<Password> {
    let typed = rpassword::prompt_password(question)
        .map_err(|e| Error::io("reading the password from the terminal", e))?;
    let typed = Zeroizing::new(typed.into_bytes());
    Ok(Password::first_line(&typed))
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

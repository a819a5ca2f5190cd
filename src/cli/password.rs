//! Where the password of an encrypted image comes from: `--password-file`
//! (its first line), `--stdinpass` (as hdiutil: standard input up to a
//! newline or NUL), or a prompt on a terminal when neither is given and
//! the image is encrypted. Never from the command line itself.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::password::Password;

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
    /// prompt; `None` for a plain image.
    pub fn for_image(&self, path: &Path) -> Result<Option<Password>> {
        if let Some(p) = self.given()? {
            return Ok(Some(p));
        }
        if !crate::registry::is_encrypted(path)? {
            return Ok(None);
        }
        if !std::io::stdin().is_terminal() {
            return Err(Error::Invalid(format!(
                "{}: encrypted disk image: needs its password (--password-file FILE or --stdinpass)",
                path.display()
            )));
        }
        prompt(&format!("Password for {}: ", path.display())).map(Some)
    }
}

/// Reads a password at the terminal without echo.
pub fn prompt(question: &str) -> Result<Password> {
    let typed = rpassword::prompt_password(question)
        .map_err(|e| Error::io("reading the password from the terminal", e))?;
    let typed = Zeroizing::new(typed.into_bytes());
    Ok(Password::first_line(&typed))
}

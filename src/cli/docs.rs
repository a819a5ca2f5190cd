//! Shell completions and manual pages, generated from the clap definition
//! so they never drift from the commands they describe (`make install`
//! writes them). `asiffs completions SHELL` and `asiffs manpages DIR` are
//! parsed apart from [`Cli`], so that neither shows up in what they make.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};

use super::Cli;
use crate::error::{Error, Result};

#[derive(Parser, Debug)]
#[command(name = "asiffs")]
pub enum Docs {
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write asiffs.1 and asiffs-COMMAND.1 into DIR (made if missing).
    Manpages { dir: PathBuf },
}

/// The docs command `args` ask for, if they ask for one (exits on a usage
/// error, as clap does).
pub fn parse(args: &[OsString]) -> Option<Docs> {
    let first = args.get(1)?;
    (first == "completions" || first == "manpages").then(|| Docs::parse_from(args))
}

pub fn run(d: Docs) -> Result<i32> {
    match d {
        Docs::Completions { shell } => {
            use std::io::Write;
            // Into memory first: clap_complete panics on a write error (a
            // closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "asiffs", &mut script);
            std::io::stdout()
                .write_all(&script)
                .map_err(|e| Error::io("writing the completion script", e))?;
        }
        Docs::Manpages { dir } => {
            let ctx = |e| Error::io(dir.display().to_string(), e);
            std::fs::create_dir_all(&dir).map_err(ctx)?;
            clap_mangen::generate_to(Cli::command(), &dir).map_err(ctx)?;
        }
    }
    Ok(0)
}

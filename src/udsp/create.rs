//! A new, empty `.sparseimage`: the header node alone, written under a
//! temporary name, synced, then moved into place, so a crash never leaves
//! half an image under the real name.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{Header, DEFAULT_BAND_SIZE, SECTOR};
use crate::engine::{lock_file, LockMode};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes, a multiple of 512.
    pub size: u64,
    /// Bytes per band, a positive multiple of 512 (default 1 MiB).
    pub band_size: u64,
    /// Replace an existing file (unless another process has it open).
    pub force: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            band_size: DEFAULT_BAND_SIZE,
            force: false,
        }
    }
}

/// The header a new image of these options starts with.
pub fn new_header(opts: &CreateOptions) -> Result<Header> {
    let bs = opts.band_size;
    if bs == 0 || bs % SECTOR != 0 {
        return Err(Error::Invalid(format!(
            "band size {bs} is not a positive multiple of {SECTOR} bytes"
        )));
    }
    let spb = u32::try_from(bs / SECTOR).map_err(|_| {
        Error::Invalid(format!(
            "band size {bs} is too large (at most {} bytes)",
            u64::from(u32::MAX) * SECTOR
        ))
    })?;
    if opts.size % SECTOR != 0 {
        return Err(Error::Invalid(format!(
            "size {} is not a multiple of {SECTOR} bytes",
            opts.size
        )));
    }
    let bands = opts.size.div_ceil(bs);
    if bands > u64::from(u32::MAX) {
        return Err(Error::Invalid(format!(
            "size {} needs {bands} bands of {bs} bytes, more than 32-bit band ids allow",
            opts.size
        )));
    }
    Header::new(opts.size / SECTOR, spb)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.asiffs-new-{}", std::process::id()))
}

/// Creates an empty image of `size` bytes with bands of `band_size` bytes
/// at `path`, which must not exist.
pub fn create(path: &Path, size: u64, band_size: u64) -> Result<()> {
    create_with(
        path,
        &CreateOptions {
            size,
            band_size,
            force: false,
        },
    )
}

pub fn create_with(path: &Path, opts: &CreateOptions) -> Result<()> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    let header = new_header(opts)?;
    match std::fs::symlink_metadata(path) {
        Ok(_) if !opts.force => {
            return Err(Error::Invalid(format!(
                "{}: file exists (use --force to replace it)",
                path.display()
            )))
        }
        Ok(m) if !m.is_file() => {
            return Err(Error::Invalid(format!(
                "{}: not a regular file",
                path.display()
            )))
        }
        Ok(_) => {
            // Refuse to replace an image someone has open.
            let f = File::open(path).map_err(ctx)?;
            lock_file(&f, LockMode::Exclusive, path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx(e)),
    }
    let tmp = temp_path(path);
    // Only a run of ours with this pid, killed, can have left one.
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(ctx)?;
    let done = file
        .write_all_at(&header.encode(), 0)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            if opts.force {
                std::fs::rename(&tmp, path)
            } else {
                // hard_link fails if the name appeared meanwhile: never clobber.
                std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
            }
        });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(ctx(e));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(ctx)?;
    Ok(())
}

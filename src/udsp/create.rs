//! A new, empty `.sparseimage`: the header node alone, written under a
//! temporary name, synced, then moved into place, so a crash never leaves
//! half an image under the real name.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{Header, DEFAULT_BAND_SIZE, SECTOR};
use crate::atomic_file::{check_replaceable, temp_path, write_new, Place, NEW_TAG};
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
    let header = new_header(opts)?;
    check_replaceable(path, opts.force)?;
    // Only a run of ours with this pid, killed, can have left one.
    let _ = std::fs::remove_file(temp_path(path, NEW_TAG));
    // Without --force, linking fails if the name appeared meanwhile.
    let place = if opts.force {
        Place::Rename
    } else {
        Place::Link
    };
    write_new(path, NEW_TAG, place, |file| {
        file.write_all_at(&header.encode(), 0)
    })
    .map_err(|f| Error::io(path.display().to_string(), f.error))
}

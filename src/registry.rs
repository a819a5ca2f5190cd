//! Which format a container holds, and opening it as a [`Disk`].
//!
//! Probing reads only the container's first and last bytes (and, for a
//! directory, its root): magic numbers first, then the `.dmg` rule. A
//! `.dmg` without a `koly` trailer is hdiutil's UDRW, the disk's bytes as
//! they are, so it opens as a raw disk rather than as a corrupt UDIF.

use std::fs::File;
use std::path::Path;

use crate::disk::{Disk, Format};
use crate::engine::storage::{FileStorage, Storage};
use crate::engine::OpenOptions;
use crate::error::{Error, Result};

/// The extensions of the containers a mount serves from a directory.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["asif", "dmg", "sparseimage", "sparsebundle"];

const ENCRYPTED_HEAD: &[u8; 8] = b"encrcdsa";
const ENCRYPTED_TAIL: &[u8; 8] = b"cdsaencr";
const KOLY_SIZE: u64 = 512;

/// Whether `path` is named as a `.dmg`.
pub fn has_dmg_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("dmg"))
}

/// The format of the image at `path`, from its magic (and, for bundles,
/// its layout; for a `.dmg`, the trailer or its absence); `None` for
/// anything asiffs does not serve as an image.
pub fn probe(path: &Path) -> Result<Option<Format>> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    let md = std::fs::metadata(path).map_err(ctx)?;
    if md.is_dir() {
        return Ok(crate::udsb::is_bundle(path).then_some(Format::Udsb));
    }
    if !md.is_file() {
        return Ok(None);
    }
    let s = FileStorage::new(File::open(path).map_err(ctx)?);
    let len = s.len().map_err(ctx)?;
    let mut head = [0u8; 8];
    s.read_at(&mut head, 0).map_err(ctx)?;
    if len >= 4 && head[..4] == crate::format::MAGIC {
        return Ok(Some(Format::Asif));
    }
    if len >= 4 && head[..4] == crate::udsp::header::MAGIC {
        return Ok(Some(Format::Udsp));
    }
    if len >= 8 && &head == ENCRYPTED_HEAD {
        return Err(encrypted(path, "encrcdsa"));
    }
    if len >= KOLY_SIZE {
        let mut tail = [0u8; KOLY_SIZE as usize];
        s.read_at(&mut tail, len - KOLY_SIZE).map_err(ctx)?;
        if tail.ends_with(ENCRYPTED_TAIL) {
            return Err(encrypted(path, "cdsaencr"));
        }
        if tail[..4] == crate::udif::trailer::KOLY_MAGIC[..] {
            return Ok(Some(Format::Udif));
        }
    }
    if has_dmg_name(path) {
        if len == 0 || len % crate::raw::SECTOR != 0 {
            return Err(Error::Corrupt(format!(
                "{}: neither a UDIF image (no koly trailer in the last 512 bytes) nor a raw UDRW disk ({len} bytes is not whole 512-byte sectors)",
                path.display()
            )));
        }
        return Ok(Some(Format::Udrw));
    }
    Ok(None)
}

fn encrypted(path: &Path, magic: &str) -> Error {
    Error::Invalid(format!(
        "{}: encrypted disk image ({magic}): not supported",
        path.display()
    ))
}

/// The one-line refusal of a file no format claims.
pub fn unknown(path: &Path) -> Error {
    Error::Invalid(format!(
        "{}: not a disk image asiffs knows (ASIF, UDIF .dmg, raw UDRW .dmg, .sparseimage or .sparsebundle)",
        path.display()
    ))
}

/// Opens the image at `path` as `format` (probed when `None`).
pub fn open(path: &Path, format: Option<Format>, opts: &OpenOptions) -> Result<Box<dyn Disk>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?.ok_or_else(|| unknown(path))?,
    };
    match format {
        Format::Asif => Ok(Box::new(crate::engine::Image::open(path, opts)?)),
        Format::Udif => Ok(Box::new(crate::udif::Udif::open(path, opts)?)),
        Format::Udsb => Ok(Box::new(crate::udsb::SparseBundle::open(path, opts)?)),
        Format::Udsp => Ok(Box::new(crate::udsp::SparseImage::open(path, opts)?)),
        Format::Udrw => Ok(Box::new(crate::raw::RawDisk::open(path, opts)?)),
        Format::Raw => Err(Error::Invalid(format!(
            "{}: raw files are served as they are, not opened as images",
            path.display()
        ))),
    }
}

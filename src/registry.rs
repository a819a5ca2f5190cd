//! Which format a container holds, and opening it as a [`Disk`].
//!
//! Probing reads only the container's first and last bytes (and, for a
//! directory, its root): magic numbers first, then the `.dmg` rule. A
//! `.dmg` without a `koly` trailer is hdiutil's UDRW, the disk's bytes as
//! they are, so it opens as a raw disk rather than as a corrupt UDIF.
//!
//! Encryption is a layer under the formats: an encrypted file is unlocked
//! into a [`CryptStorage`] of plaintext, and the same probe, on the
//! plaintext, names what it holds (ASIF, a sparse image, a whole UDIF
//! file, or else a raw disk), opened on that storage as on a file.

use std::fs::File;
use std::path::Path;

use std::sync::Arc;

use crate::asif::engine::{CacheMode, OpenOptions};
use crate::disk::{Disk, Format};
use crate::error::{Error, Result};
use crate::host::crypt::{CryptStorage, Scheme};
use crate::host::file::{open_container, FileStorage, Storage};

/// The extensions of the containers a mount serves from a directory.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["asif", "dmg", "sparseimage", "sparsebundle"];

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
    if crate::host::crypt::detect(&s)
        .map_err(|e| in_file(path, e))?
        .is_some()
    {
        return Ok(Some(Format::Encrypted));
    }
    let len = s.len().map_err(ctx)?;
    match probe_content(&s, len).map_err(ctx)? {
        Some(f) => Ok(Some(f)),
        None if has_dmg_name(path) => {
            if len == 0 || len % crate::raw::SECTOR != 0 {
                return Err(Error::Corrupt(format!(
                    "{}: neither a UDIF image (no koly trailer in the last 512 bytes) nor a raw UDRW disk ({len} bytes is not whole 512-byte sectors)",
                    path.display()
                )));
            }
            Ok(Some(Format::Udrw))
        }
        None => Ok(None),
    }
}

/// The format a container's bytes announce by their magic: ASIF or UDSP
/// at the start, a UDIF `koly` trailer at the end.
fn probe_content(s: &dyn Storage, len: u64) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 4];
    s.read_at(&mut head, 0)?;
    if len >= 4 && head == crate::asif::format::MAGIC {
        return Ok(Some(Format::Asif));
    }
    if len >= 4 && head == crate::udsp::header::MAGIC {
        return Ok(Some(Format::Udsp));
    }
    if len >= KOLY_SIZE {
        let mut tail = [0u8; KOLY_SIZE as usize];
        s.read_at(&mut tail, len - KOLY_SIZE)?;
        if tail[..4] == crate::udif::trailer::KOLY_MAGIC[..] {
            return Ok(Some(Format::Udif));
        }
    }
    Ok(None)
}

/// Names the file in an error of the crypt layer, which knows no paths.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Io { context, source } => {
            Error::io(format!("{}: {context}", path.display()), source)
        }
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", path.display())),
        Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", path.display())),
        e => e,
    }
}

/// How the file at `path` is encrypted, from its signatures alone; `None`
/// for a plain file (or a directory: bundles keep theirs in `token`).
pub fn encryption(path: &Path) -> Result<Option<Scheme>> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    if !std::fs::metadata(path).map_err(ctx)?.is_file() {
        return Ok(None);
    }
    let s = FileStorage::new(File::open(path).map_err(ctx)?);
    crate::host::crypt::detect(&s).map_err(|e| in_file(path, e))
}

/// Whether the image at `path` needs a password: an encrypted file, or a
/// bundle whose `token` holds an `encrcdsa` header.
pub fn is_encrypted(path: &Path) -> Result<bool> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    if std::fs::metadata(path).map_err(ctx)?.is_dir() {
        let mut head = [0u8; 8];
        let n = match File::open(path.join("token")) {
            Ok(f) => {
                use std::io::Read;
                f.take(8).read(&mut head).unwrap_or(0)
            }
            Err(_) => 0,
        };
        return Ok(n == 8 && &head == crate::host::crypt::header_v2::MAGIC);
    }
    Ok(encryption(path)?.is_some())
}

/// Why a disk opened for writing from `path` takes no changes because of
/// its encryption (version-1 images are read-only), beside the format's
/// own [`Disk::write_refusal`]: for the one line a transport logs or a
/// command prints.
pub fn encryption_refusal(path: &Path, disk: &dyn Disk) -> Option<String> {
    match encryption(path) {
        Ok(Some(Scheme::TrailerV1)) if !disk.is_writable() => {
            Some("version-1 encrypted images (cdsaencr trailer) are read-only".into())
        }
        _ => None,
    }
}

/// What `info` says of an encrypted file without unlocking it.
pub fn describe_encryption(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::HeaderV2 => "encrcdsa version 2 header",
        Scheme::TrailerV1 => "cdsaencr version 1 trailer",
    }
}

/// Unlocks the encrypted file at `path` and opens what it holds.
fn open_encrypted(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Disk>> {
    // Each block is decrypted in memory: O_DIRECT would only add copies.
    let file_opts = OpenOptions {
        cache: CacheMode::Writeback,
        ..opts.clone()
    };
    let file: Arc<dyn Storage> = Arc::new(open_container(path, &file_opts)?);
    let Some(password) = &opts.password else {
        return Err(Error::Invalid(format!(
            "{}: encrypted disk image: needs its password (--password-file FILE or --stdinpass)",
            path.display()
        )));
    };
    let plain = CryptStorage::unlock(file, password.bytes()).map_err(|e| in_file(path, e))?;
    // Version 1 keeps its trailer at the end: growing would move it.
    let writable = opts.writable && plain.scheme() != Scheme::TrailerV1;
    let len = plain
        .len()
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    let format =
        probe_content(&plain, len).map_err(|e| Error::io(path.display().to_string(), e))?;
    let plain: Arc<dyn Storage> = Arc::new(plain);
    let inner_opts = OpenOptions {
        writable,
        ..opts.clone()
    };
    let disk: Box<dyn Disk> = match format {
        Some(Format::Asif) => Box::new(crate::asif::engine::Image::from_storage(
            path,
            plain,
            &inner_opts,
        )?),
        Some(Format::Udsp) => Box::new(crate::udsp::SparseImage::from_storage(
            path,
            plain,
            &inner_opts,
        )?),
        Some(Format::Udif) => Box::new(crate::udif::Udif::from_storage(path, plain, writable)?),
        _ => Box::new(crate::raw::RawDisk::from_storage(
            path,
            Format::Udrw,
            plain,
            writable,
        )?),
    };
    Ok(disk)
}

/// What kind of file `md` describes, in the words skip reasons use.
pub fn file_kind(md: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a regular file"
    }
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
        Format::Asif => Ok(Box::new(crate::asif::engine::Image::open(path, opts)?)),
        Format::Udif => Ok(Box::new(crate::udif::Udif::open(path, opts)?)),
        Format::Udsb => Ok(Box::new(crate::udsb::SparseBundle::open(path, opts)?)),
        Format::Udsp => Ok(Box::new(crate::udsp::SparseImage::open(path, opts)?)),
        Format::Udrw => Ok(Box::new(crate::raw::RawDisk::open(path, opts)?)),
        Format::Encrypted => open_encrypted(path, opts),
        Format::Raw => Err(Error::Invalid(format!(
            "{}: raw files are served as they are, not opened as images",
            path.display()
        ))),
    }
}

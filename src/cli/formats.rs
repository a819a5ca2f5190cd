//! The CLI's per-format dispatch: which container `create` makes, how
//! `check` checks each format, and what `resize` and `compact` refuse.
//!
//! A format is named by `--format`/`-O` or taken from the file's extension
//! (`.asif`, `.dmg` = UDRW, `.sparseimage` = UDSP, `.sparsebundle`), as
//! hdiutil and diskutil do.

use std::path::Path;

use super::size::parse_size;
use crate::asif::engine::OpenOptions;
use crate::disk::Format;
use crate::error::{Error, Result};

/// What `create` makes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateFormat {
    Asif,
    /// A read-write `.dmg` as hdiutil writes it now: the raw disk, sparse,
    /// no trailer.
    Udrw,
    /// A read-write UDIF `.dmg` with a `koly` trailer and block tables.
    Udif,
    /// A sparse image (`.sparseimage`).
    Udsp,
    /// A sparse bundle (`.sparsebundle` directory).
    Udsb,
}

/// Sparse images use 1 MiB bands, as hdiutil writes them.
pub const UDSP_BAND_SIZE: u64 = 1 << 20;

/// The format an image name stands for, from its extension.
pub fn by_extension(path: &Path) -> Option<CreateFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "asif" => CreateFormat::Asif,
        "dmg" => CreateFormat::Udrw,
        "sparseimage" => CreateFormat::Udsp,
        "sparsebundle" => CreateFormat::Udsb,
        _ => return None,
    })
}

/// `--format`, else the extension, else a one-line refusal.
pub fn create_format(path: &Path, given: Option<CreateFormat>) -> Result<CreateFormat> {
    given.or_else(|| by_extension(path)).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: cannot tell the format from the name (use .asif, .dmg, .sparseimage or .sparsebundle, or --format)",
            path.display()
        ))
    })
}

/// The band size `create` uses: `--band-size`, else the format's default.
pub fn band_size(format: CreateFormat, given: Option<&str>) -> Result<u64> {
    match given {
        Some(s) => parse_size(s).map_err(Error::Invalid),
        None => Ok(match format {
            CreateFormat::Udsb => crate::udsb::DEFAULT_BAND_SIZE,
            _ => UDSP_BAND_SIZE,
        }),
    }
}

/// Creates an empty UDRW, UDSP or UDSB image (ASIF is made by the caller).
/// `force` replaces an existing file (never a directory).
pub fn create_other(
    path: &Path,
    format: CreateFormat,
    size: u64,
    band: u64,
    force: bool,
) -> Result<()> {
    if force && !matches!(format, CreateFormat::Udsb | CreateFormat::Udrw) {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.is_file() {
                std::fs::remove_file(path).map_err(|e| Error::io(path.display().to_string(), e))?;
            }
        }
    }
    match format {
        CreateFormat::Asif => unreachable!("ASIF is created by the caller"),
        CreateFormat::Udrw => crate::raw::create(path, size, force),
        CreateFormat::Udif => crate::udif::create_udrw(path, size),
        CreateFormat::Udsb => crate::udsb::SparseBundle::create(path, size, band)?.close(),
        CreateFormat::Udsp => crate::udsp::create(path, size, band),
    }
}

/// Creates an empty encrypted image: a raw UDRW `.dmg` (the whole disk as
/// encrypted zeros, as hdiutil writes it), a sparse image (its header node
/// inside the encryption), or a sparse bundle (the header in `token`).
pub fn create_encrypted(
    path: &Path,
    format: CreateFormat,
    size: u64,
    band: u64,
    force: bool,
    password: &crate::password::Password,
    enc: crate::host::crypt::Encryption,
) -> Result<()> {
    use crate::host::crypt::create_file;
    match format {
        CreateFormat::Udrw => {
            crate::raw::check_new_size(size)?;
            create_file(path, force, password.bytes(), enc, size, |_| Ok(()))
        }
        CreateFormat::Udsp => {
            let header = crate::udsp::create::new_header(&crate::udsp::create::CreateOptions {
                size,
                band_size: band,
                force,
            })?;
            create_file(path, force, password.bytes(), enc, 0, |s| {
                s.write_at(&header.encode(), 0)
                    .map_err(|e| Error::io(format!("{}: writing the header", path.display()), e))
            })
        }
        CreateFormat::Udsb => crate::udsb::SparseBundle::create_encrypted(
            path,
            size,
            band,
            password.bytes(),
            enc.key_bits(),
        )?
        .close(),
        f => Err(Error::Invalid(format!(
            "{}: --encryption makes udrw, udsp and udsb images, not {}",
            path.display(),
            format!("{f:?}").to_ascii_lowercase()
        ))),
    }
}

/// `check` of a format other than ASIF: its report as lines, and the exit
/// code (0 clean, 2 corrupt).
pub fn check_other(path: &Path, format: Format, json: bool) -> Result<i32> {
    let (lines, clean, report) = match format {
        Format::Udif => {
            let r = crate::udif::check(path)?;
            let v = serde_json::to_value(&r).expect("serialising plain data");
            (r.lines(), r.is_clean(), v)
        }
        Format::Udsb => {
            let problems = crate::udsb::check(path)?;
            let mut lines: Vec<String> = problems.iter().map(|p| format!("corrupt: {p}")).collect();
            let clean = problems.is_empty();
            lines.insert(0, format!("{}: sparse bundle", path.display()));
            lines.push(if clean { "clean" } else { "corrupt" }.to_string());
            let v = serde_json::json!({ "path": path.display().to_string(), "problems": problems });
            (lines, clean, v)
        }
        Format::Udsp => {
            let problems = crate::udsp::check(path)?;
            let mut lines: Vec<String> = problems.iter().map(|p| format!("corrupt: {p}")).collect();
            let clean = problems.is_empty();
            lines.insert(0, format!("{}: sparse image", path.display()));
            lines.push(if clean { "clean" } else { "corrupt" }.to_string());
            let v = serde_json::json!({ "path": path.display().to_string(), "problems": problems });
            (lines, clean, v)
        }
        Format::Udrw => {
            let d = crate::raw::RawDisk::open(path, &OpenOptions::default())?;
            let lines = vec![
                format!(
                    "{}: raw UDRW disk of {} bytes: no structure to check",
                    path.display(),
                    crate::disk::Disk::size(&d)
                ),
                "clean".to_string(),
            ];
            let v = serde_json::json!({ "path": path.display().to_string(), "problems": [] });
            (lines, true, v)
        }
        f => return Err(not_supported(path, "check", f)),
    };
    let code = if clean { 0 } else { 2 };
    if json {
        let mut v = report;
        v["format"] = format.name().into();
        v["exit_code"] = code.into();
        super::print_json(&v);
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    Ok(code)
}

/// `check` of an encrypted image holding something other than ASIF: the
/// password unlocked it and its format's structures were read and checked
/// at open (an image that breaks them does not open).
pub fn check_unlocked(path: &Path, disk: &dyn crate::disk::Disk, json: bool) -> Result<i32> {
    let encryption = crate::registry::encryption(path)?.map_or(
        "encrcdsa header in token",
        crate::registry::describe_encryption,
    );
    if json {
        super::print_json(&serde_json::json!({
            "path": path.display().to_string(),
            "format": disk.format().name(),
            "encryption": encryption,
            "problems": [],
            "exit_code": 0,
        }));
    } else {
        println!(
            "{}: encrypted ({encryption}), unlocked: a {} disk of {} bytes whose structures read clean",
            path.display(),
            disk.format().name(),
            disk.size()
        );
        println!("clean");
    }
    Ok(0)
}

pub fn not_supported(path: &Path, what: &str, format: Format) -> Error {
    Error::Invalid(format!(
        "{}: {what} is not supported for {} images",
        path.display(),
        format.name()
    ))
}

/// The format of an existing image, as the commands dispatch on it. A
/// file no format claims is refused in one line, except one named `.asif`,
/// which is opened as ASIF so that its errors say what is wrong with it.
pub fn format_of(path: &Path) -> Result<Format> {
    match crate::registry::probe(path)? {
        Some(f) => Ok(f),
        None if has_asif_name(path) => Ok(Format::Asif),
        None => Err(crate::registry::unknown(path)),
    }
}

pub fn has_asif_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("asif"))
}

/// `resize` of a bundle, a sparse image or a UDRW image (the other formats
/// that can change size): the size rounded up to whole sectors, as they
/// store it.
pub fn resize_other(
    path: &Path,
    format: Format,
    opts: &OpenOptions,
    wanted: impl Fn(u64) -> Result<u64>,
    shrink: bool,
) -> Result<(u64, u64)> {
    if !matches!(
        format,
        Format::Udsb | Format::Udsp | Format::Udif | Format::Udrw | Format::Encrypted
    ) {
        return Err(Error::Invalid(format!(
            "{}: resizing {} images is not supported (ASIF, UDRW, sparse images and sparse bundles can be resized)",
            path.display(),
            format.name()
        )));
    }
    let disk = crate::registry::open(path, Some(format), opts)?;
    let why = disk.write_refusal();
    if let Some(why) = why.or_else(|| crate::registry::encryption_refusal(path, &*disk)) {
        return Err(Error::Invalid(format!(
            "{}: cannot resize: {why}",
            path.display()
        )));
    }
    if !disk.is_writable() {
        return Err(Error::Invalid(format!(
            "{}: cannot resize: the image is read-only",
            path.display()
        )));
    }
    let old = disk.size();
    let want = wanted(old)?;
    let new = want
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::Invalid(format!("size {want} is too large")))?;
    if new < old && !shrink {
        return Err(Error::Invalid(format!(
            "shrinking {} from {old} to {new} bytes discards the data past the new end; use --shrink to do it",
            path.display()
        )));
    }
    if new != old {
        disk.resize(new)?;
    }
    disk.flush()?;
    Ok((old, new))
}

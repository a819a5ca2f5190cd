//! `asiffs resize` and `asiffs compact`: the parts of an image's life cycle
//! that change an existing container in place.
//!
//! Both open the image writable, which takes the exclusive lock: an image
//! that is mounted (or open in any other asiffs process) is refused with
//! `Error::Locked` before anything is touched.

use std::path::PathBuf;

use super::progress;
use super::size::{human, parse_size};
use crate::asif::engine::{Image, OpenOptions};
use crate::error::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    file: PathBuf,
    /// New virtual size (64G, 100GB, ...), or a change of it: +SIZE grows,
    /// -SIZE shrinks. Rounded up to a whole number of blocks.
    #[arg(allow_hyphen_values = true)]
    size: String,
    /// Allow making the disk smaller; the data past the new end is lost.
    #[arg(long)]
    shrink: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    password: crate::password::PasswordArgs,
}

#[derive(clap::Args, Debug)]
pub struct CompactArgs {
    file: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// What the user asked for: an absolute size, or a change of the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeSpec {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

fn parse_spec(s: &str) -> Result<SizeSpec> {
    let t = s.trim();
    let (ctor, rest): (fn(u64) -> SizeSpec, &str) = if let Some(r) = t.strip_prefix('+') {
        (SizeSpec::Grow, r)
    } else if let Some(r) = t.strip_prefix('-') {
        (SizeSpec::Shrink, r)
    } else {
        (SizeSpec::Absolute, t)
    };
    parse_size(rest).map(ctor).map_err(Error::Invalid)
}

/// The new size in bytes, before rounding.
fn target(spec: SizeSpec, old: u64) -> Result<u64> {
    match spec {
        SizeSpec::Absolute(n) => Ok(n),
        SizeSpec::Grow(d) => old
            .checked_add(d)
            .ok_or_else(|| Error::Invalid(format!("{old} + {d} bytes overflows"))),
        SizeSpec::Shrink(d) => old.checked_sub(d).ok_or_else(|| {
            Error::Invalid(format!(
                "cannot shrink by {d} bytes: the disk is only {old} bytes"
            ))
        }),
    }
}

pub fn resize(a: ResizeArgs) -> Result<i32> {
    // Parse before opening, so that a typo never takes the lock.
    let spec = parse_spec(&a.size)?;
    let format = super::formats::format_of(&a.file)?;
    if format != crate::disk::Format::Asif {
        let opts = OpenOptions {
            password: a.password.for_image(&a.file)?,
            ..OpenOptions::writable()
        };
        let (old, new) = super::formats::resize_other(
            &a.file,
            format,
            &opts,
            |old| target(spec, old),
            a.shrink,
        )?;
        return Ok(resized(old, new, a.json));
    }
    let img = Image::open(&a.file, &OpenOptions::writable())?;
    let old = img.size();
    let wanted = target(spec, old)?;
    let bs = img.geometry().block_size;
    // Like qemu-img: a size that is not a whole number of blocks is rounded up.
    let new = wanted
        .checked_next_multiple_of(bs)
        .ok_or_else(|| Error::Invalid(format!("size {wanted} is too large")))?;
    let max = img.max_size();
    if new > max {
        return Err(Error::Invalid(format!(
            "size {new} is larger than the maximum of this image ({max} bytes)"
        )));
    }
    if new < old && !a.shrink {
        return Err(Error::Invalid(format!(
            "shrinking {} from {old} to {new} bytes discards the data past the new end; use --shrink to do it",
            a.file.display()
        )));
    }
    if new != wanted && !a.json {
        eprintln!("asiffs: size {wanted} rounded up to {new}, a whole number of {bs}-byte blocks");
    }
    if new != old {
        img.resize(new)?;
    }
    img.close()?;
    Ok(resized(old, new, a.json))
}

fn resized(old: u64, new: u64, json: bool) -> i32 {
    if json {
        super::print_json(&serde_json::json!({ "old_size": old, "new_size": new }));
    } else {
        println!(
            "Image resized from {} ({old} bytes) to {} ({new} bytes).",
            human(old),
            human(new)
        );
    }
    0
}

fn compact_udsp(a: &CompactArgs) -> Result<i32> {
    let img = crate::udsp::SparseImage::open(&a.file, &OpenOptions::writable())?;
    let pb = progress::bar(0, "compacting");
    let report = img.compact(&mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let report = report?;
    img.close()?;
    if a.json {
        super::print_json(&report);
    } else {
        println!(
            "Compacted: {} bands moved, {} all-zero bands dropped; file {} -> {} bytes.",
            report.bands_moved, report.bands_dropped, report.old_file_size, report.new_file_size
        );
    }
    Ok(0)
}

pub fn compact(a: CompactArgs) -> Result<i32> {
    match super::formats::format_of(&a.file)? {
        crate::disk::Format::Asif => {}
        crate::disk::Format::Udsp => return compact_udsp(&a),
        f => {
            return Err(super::formats::not_supported(
                &a.file,
                "compact (ASIF and UDSP images only)",
                f,
            ))
        }
    }
    let img = Image::open(&a.file, &OpenOptions::writable())?;
    let cs = img.geometry().chunk_size;
    let pb = progress::bar(0, "compacting");
    // The engine counts chunks; the bar shows bytes.
    let report = img.compact(&mut |done, total| {
        pb.set_length(total.saturating_mul(cs));
        pb.set_position(done.saturating_mul(cs));
    });
    pb.finish_and_clear();
    let report = report?;
    img.close()?;
    if a.json {
        super::print_json(&report);
    } else {
        println!(
            "Reclaimed {} bytes ({} -> {}).",
            report.bytes_reclaimed,
            human(report.old_file_size),
            human(report.new_file_size)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_spec("10G").unwrap(), SizeSpec::Absolute(10 << 30));
        assert_eq!(parse_spec("+1M").unwrap(), SizeSpec::Grow(1 << 20));
        assert_eq!(parse_spec("-512").unwrap(), SizeSpec::Shrink(512));
        assert!(parse_spec("+").is_err());
        assert!(parse_spec("--1G").is_err());
        assert_eq!(target(SizeSpec::Grow(5), 10).unwrap(), 15);
        assert_eq!(target(SizeSpec::Shrink(5), 10).unwrap(), 5);
        assert!(target(SizeSpec::Shrink(11), 10).is_err());
        assert!(target(SizeSpec::Grow(u64::MAX), 10).is_err());
    }
}

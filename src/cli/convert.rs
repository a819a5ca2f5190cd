//! `asiffs convert`: raw <-> ASIF, ASIF -> ASIF (compact rewrite), and any
//! format qemu-img reads, streamed through it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::progress;
use super::size::parse_size;
use crate::engine::{CreateOptions, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::MAGIC;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Asif,
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    src: PathBuf,
    dst: PathBuf,
    /// Output format (default: from DST's extension, .asif or raw).
    #[arg(short = 'O', value_enum)]
    output_format: Option<Format>,
    /// Replace DST if it exists.
    #[arg(long)]
    force: bool,
    /// Chunk size of an ASIF output (macOS has only been seen to use 1M).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    chunk_size: u64,
    /// Block size of an ASIF output (macOS has only been seen to use 512).
    #[arg(long, value_parser = parse_size, default_value = "512")]
    block_size: u64,
}

/// Bytes moved per step; one chunk of a default image.
const STEP: usize = 1 << 20;

/// Where the virtual disk comes from.
enum Source {
    Asif(Image),
    Raw(File, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Asif(i) => i.size(),
            Source::Raw(_, n) => *n,
        }
    }

    /// Ranges that may hold data, in order.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match self {
            Source::Asif(i) => Ok(i
                .extents()?
                .into_iter()
                .filter(|e| e.data)
                .map(|e| (e.start, e.start + e.length))
                .collect()),
            Source::Raw(f, size) => raw_data_ranges(f, *size),
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Source::Asif(i) => i.read_at(buf, off),
            Source::Raw(f, _) => {
                let mut done = 0;
                while done < buf.len() {
                    match f.read_at(&mut buf[done..], off + done as u64) {
                        Ok(0) => {
                            buf[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io("reading the source", e)),
                    }
                }
                Ok(())
            }
        }
    }
}

/// SEEK_DATA/SEEK_HOLE over a raw file; the whole file where unsupported.
fn raw_data_ranges(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: plain syscalls on an owned descriptor.
        let d = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() => {
                    return Ok(vec![(0, size)])
                }
                _ => return Err(Error::io("looking for data in the source", e)),
            }
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(Error::io(
                "looking for holes in the source",
                std::io::Error::last_os_error(),
            ));
        }
        out.push((d as u64, (h as u64).min(size)));
        at = h as u64;
    }
    Ok(out)
}

fn is_asif(path: &Path) -> Result<bool> {
    let mut f = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let mut m = [0u8; 4];
    match f.read_exact(&mut m) {
        Ok(()) => Ok(m == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path.display().to_string(), e)),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

pub fn run(a: ConvertArgs) -> Result<i32> {
    if same_file(&a.src, &a.dst) {
        return Err(Error::Invalid(
            "source and destination are the same file".into(),
        ));
    }
    let out = a.output_format.unwrap_or_else(|| {
        if a.dst
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("asif"))
        {
            Format::Asif
        } else {
            Format::Raw
        }
    });
    if !a.force && std::fs::symlink_metadata(&a.dst).is_ok() {
        return Err(Error::Invalid(format!(
            "{}: file exists (use --force to replace it)",
            a.dst.display()
        )));
    }
    let src = if is_asif(&a.src)? {
        Source::Asif(Image::open(&a.src, &OpenOptions::default())?)
    } else {
        let f = File::open(&a.src).map_err(|e| Error::io(a.src.display().to_string(), e))?;
        let m = f
            .metadata()
            .map_err(|e| Error::io(a.src.display().to_string(), e))?;
        if !m.is_file() {
            return Err(Error::Invalid(format!(
                "{}: not a regular file",
                a.src.display()
            )));
        }
        Source::Raw(f, m.len())
    };
    match out {
        Format::Asif => {
            let (chunk_size, block_size) = super::geometry_options(a.chunk_size, a.block_size)?;
            let opts = CreateOptions {
                size: src.size(),
                force: a.force,
                chunk_size,
                block_size,
            };
            let dst = Image::create(&a.dst, &opts)?;
            copy(&src, |buf, off| dst.write_at(buf, off))?;
            dst.close()?;
        }
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&a.dst)
                .map_err(|e| Error::io(a.dst.display().to_string(), e))?;
            let ctx = |e| Error::io(a.dst.display().to_string(), e);
            f.set_len(src.size()).map_err(ctx)?;
            copy(&src, |buf, off| f.write_all_at(buf, off).map_err(ctx))?;
            f.sync_all().map_err(ctx)?;
        }
    }
    Ok(0)
}

/// Copies every non-zero step of `src`'s data ranges through `write`.
fn copy(src: &Source, mut write: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    let ranges = src.data_ranges()?;
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let pb = progress::bar(total, "converting");
    let mut buf = vec![0u8; STEP];
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            // Steps end on STEP boundaries so that chunks are written whole.
            let n = ((at / STEP as u64 + 1) * STEP as u64).min(end) - at;
            let b = &mut buf[..n as usize];
            src.read_at(b, at)?;
            if !is_zero(b) {
                write(b, at)?;
            }
            at += n;
            pb.inc(n);
        }
    }
    pb.finish_and_clear();
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    let (head, body, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

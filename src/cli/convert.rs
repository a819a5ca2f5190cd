//! `asiffs convert`: any format [`crate::registry::open`] opens, raw, or any
//! format qemu-img reads (streamed through it), into ASIF or raw.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::progress;
use crate::asif::engine::{CreateOptions, Image, LockMode, OpenOptions};
use crate::disk::{self, Disk};
use crate::error::{Error, Result};
use crate::registry;

/// What `convert` writes (`-O`); sources are whatever [`registry::open`] or
/// qemu-img reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Raw,
    Asif,
    /// Read-write `.dmg` as hdiutil writes it: the raw disk, sparse, no
    /// trailer.
    Udrw,
    /// Read-write UDIF `.dmg` with a `koly` trailer and block tables.
    Udif,
    /// Sparse bundle (`.sparsebundle`).
    Udsb,
    /// Sparse image (`.sparseimage`).
    Udsp,
    /// Written by qemu-img from an NBD export of the source.
    Qcow2,
    Vmdk,
    Vhdx,
}

impl OutputFormat {
    /// The format DST's extension names; raw for any other name.
    fn of(dst: &Path) -> OutputFormat {
        use super::formats::CreateFormat as C;
        let ext = dst
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match (super::formats::by_extension(dst), ext.as_deref()) {
            (Some(C::Asif), _) => OutputFormat::Asif,
            (Some(C::Udrw), _) => OutputFormat::Udrw,
            (Some(C::Udif), _) => OutputFormat::Udif,
            (Some(C::Udsb), _) => OutputFormat::Udsb,
            (Some(C::Udsp), _) => OutputFormat::Udsp,
            (None, Some("qcow2")) => OutputFormat::Qcow2,
            (None, Some("vmdk")) => OutputFormat::Vmdk,
            (None, Some("vhdx")) => OutputFormat::Vhdx,
            _ => OutputFormat::Raw,
        }
    }

    fn qemu_name(self) -> Option<&'static str> {
        match self {
            OutputFormat::Qcow2 => Some("qcow2"),
            OutputFormat::Vmdk => Some("vmdk"),
            OutputFormat::Vhdx => Some("vhdx"),
            _ => None,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    pub(super) src: PathBuf,
    dst: PathBuf,
    /// Source format: asif, raw, another format asiffs opens, or any format
    /// qemu-img reads (default: probed).
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    source_format: Option<String>,
    /// Output format, as qemu-img convert -O (default: from DST's
    /// extension, .asif or raw).
    #[arg(short = 'O', value_enum, value_name = "FMT")]
    output_format: Option<OutputFormat>,
    /// Replace DST if it exists.
    #[arg(long)]
    force: bool,
    /// Chunk and block size of an ASIF output.
    #[command(flatten)]
    geometry: super::GeometryArgs,
    /// The password of an encrypted source.
    #[command(flatten)]
    password: crate::password::PasswordArgs,
}

/// Bytes moved per step at least; one chunk of a default image.
const STEP: u64 = 1 << 20;

/// Steps read at once: fewer, larger reads (each NBD request is a round
/// trip through qemu-nbd); zeros are still skipped step by step.
const READ_STEPS: u64 = 4;

/// Copy workers. Each reads a step, skips it if it is all zeros, and writes
/// it; several of them keep both the source and the destination busy (the
/// serial loop spent half its time waiting on one while the other idled).
const WORKERS: usize = 4;

/// Where the virtual disk comes from.
pub(super) enum Source {
    /// A format asiffs opens itself.
    Disk(std::sync::Arc<dyn Disk>),
    Raw(File, u64),
    /// Any other format qemu-img reads, exported by qemu-nbd.
    Qemu(qemu::Export),
}

/// One worker's handle on the source: the shared file or image, or its own
/// NBD connection.
enum Reader<'a> {
    Shared(&'a Source),
    Nbd(qemu::Nbd),
}

impl Reader<'_> {
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Reader::Shared(s) => s.read_at(buf, off),
            Reader::Nbd(c) => c.read_at(buf, off),
        }
    }
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Disk(d) => d.size(),
            Source::Raw(_, n) => *n,
            Source::Qemu(q) => q.size,
        }
    }

    /// Ranges that may hold data, in order.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match self {
            Source::Disk(d) => Ok(d
                .extents()?
                .into_iter()
                .filter(|e| e.data)
                .map(|e| (e.start, e.start + e.length))
                .collect()),
            Source::Raw(f, size) => raw_data_ranges(f, *size),
            Source::Qemu(q) => q.data_ranges(),
        }
    }

    fn reader(&self) -> Result<Reader<'_>> {
        match self {
            Source::Qemu(q) => Ok(Reader::Nbd(q.connect()?)),
            _ => Ok(Reader::Shared(self)),
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Source::Disk(d) => d.read_at(buf, off),
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
            Source::Qemu(_) => unreachable!("qemu sources are read through a Reader"),
        }
    }
}

/// SEEK_DATA/SEEK_HOLE over a raw file; the whole file where unsupported.
fn raw_data_ranges(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    use rustix::io::Errno;
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let d = match seek(f, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) if out.is_empty() => return Ok(vec![(0, size)]),
            Err(e) => return Err(Error::io("looking for data in the source", e.into())),
        };
        let h = seek(f, SeekFrom::Hole(d))
            .map_err(|e| Error::io("looking for holes in the source", e.into()))?;
        out.push((d, h.min(size)));
        at = h;
    }
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What keeps an existing DST locked until it is replaced.
enum Held {
    File(File),
    /// Open for writing, so that its exclusive lock is held.
    Bundle {
        _lock: Box<dyn Disk>,
    },
}

/// Refuses DST unless it may be replaced, and if it exists takes its
/// exclusive lock (as a writable open does), held until it is replaced: an
/// image in use is never touched. A directory may only be replaced by a
/// bundle, and only if it is one.
fn hold_destination(dst: &Path, force: bool, out: OutputFormat) -> Result<Option<Held>> {
    let ctx = |e| Error::io(dst.display().to_string(), e);
    match std::fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ctx(e)),
        Ok(_) if !force => Err(Error::Invalid(format!(
            "{}: file exists (use --force to replace it)",
            dst.display()
        ))),
        Ok(m) if m.is_dir() && out == OutputFormat::Udsb && crate::udsb::is_bundle(dst) => {
            let b = registry::open(dst, Some(disk::Format::Udsb), &OpenOptions::writable())?;
            Ok(Some(Held::Bundle { _lock: b }))
        }
        Ok(m) if !m.is_file() => Err(Error::Invalid(format!(
            "{}: not a regular file",
            dst.display()
        ))),
        Ok(_) => {
            let f = File::open(dst).map_err(ctx)?;
            crate::asif::engine::lock_file(&f, LockMode::Exclusive, dst)?;
            Ok(Some(Held::File(f)))
        }
    }
}

/// Where the output is written before it replaces DST: beside it, so the
/// final rename stays on one file system.
fn temp_path(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dst.with_file_name(format!(".{name}.asiffs-tmp-{}", std::process::id()))
}

/// Gives the output the replaced DST's permissions, as rewriting it in
/// place used to keep them.
fn keep_mode(held: Option<&Held>, tmp: &Path) -> Result<()> {
    let Some(Held::File(f)) = held else {
        return Ok(());
    };
    let ctx = |e| Error::io(tmp.display().to_string(), e);
    std::fs::set_permissions(tmp, f.metadata().map_err(ctx)?.permissions()).map_err(ctx)
}

/// Moves the finished output into place and makes the new name durable.
fn install(tmp: &Path, dst: &Path, force: bool) -> Result<()> {
    let ctx = |e| Error::io(dst.display().to_string(), e);
    if tmp.is_dir() {
        install_dir(tmp, dst)?;
    } else if force {
        std::fs::rename(tmp, dst).map_err(ctx)?;
    } else {
        // Fails if DST appeared meanwhile: without --force, never clobber.
        std::fs::hard_link(tmp, dst).map_err(ctx)?;
        std::fs::remove_file(tmp).map_err(ctx)?;
    }
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(ctx)
}

/// Moves a finished bundle into place: swapped atomically with the bundle
/// it replaces (then removed), or renamed where nothing is.
fn install_dir(tmp: &Path, dst: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let ctx = |e: rustix::io::Errno| Error::io(dst.display().to_string(), e.into());
    if dst.symlink_metadata().is_ok() {
        renameat_with(CWD, tmp, CWD, dst, RenameFlags::EXCHANGE).map_err(ctx)?;
        return remove_any(tmp);
    }
    renameat_with(CWD, tmp, CWD, dst, RenameFlags::NOREPLACE).map_err(ctx)
}

/// Removes a file or a whole directory.
fn remove_any(p: &Path) -> Result<()> {
    let r = if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    r.map_err(|e| Error::io(p.display().to_string(), e))
}

pub fn run(a: ConvertArgs) -> Result<i32> {
    if same_file(&a.src, &a.dst) {
        return Err(Error::Invalid(
            "source and destination are the same file".into(),
        ));
    }
    let out = a.output_format.unwrap_or_else(|| OutputFormat::of(&a.dst));
    let held = hold_destination(&a.dst, a.force, out)?;
    let password = a.password.for_image(&a.src)?;
    let src = open_source(&a.src, a.source_format.as_deref(), password)?;
    let tmp = temp_path(&a.dst);
    // Only a run of ours with this pid, killed, can have left one.
    let _ = remove_any(&tmp);
    interrupt::remove_on_signal(&tmp);
    // Made first so that a missing or read-only directory is reported
    // against DST, the name the user gave, not the temporary one.
    let done = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(a.dst.display().to_string(), e))
        .and_then(|_| write_output(&a, out, &src, &tmp))
        .and_then(|()| keep_mode(held.as_ref(), &tmp))
        .and_then(|()| install(&tmp, &a.dst, a.force));
    if done.is_err() {
        // Half a disk is worse than none; DST itself was never touched.
        let _ = remove_any(&tmp);
    }
    interrupt::forget();
    drop(held);
    done.map(|()| 0)
}

/// Ctrl-C, SIGTERM or a hang-up in the middle of a long copy must not leave
/// the temporary output behind: the handler removes it, then dies of the
/// signal as it would have.
mod interrupt {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicPtr, Ordering};

    /// The path to remove: a leaked `CString`, or null.
    static TEMP: AtomicPtr<libc::c_char> = AtomicPtr::new(null_mut());
    const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

    extern "C" fn on_signal(sig: libc::c_int) {
        let p = TEMP.swap(null_mut(), Ordering::SeqCst);
        // SAFETY: unlink, signal and raise are async-signal-safe; `p` is
        // null or a string nothing else frees once swapped out.
        unsafe {
            if !p.is_null() {
                libc::unlink(p);
            }
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }

    pub fn remove_on_signal(tmp: &Path) {
        let Ok(c) = CString::new(tmp.as_os_str().as_bytes()) else {
            return;
        };
        forget();
        TEMP.store(c.into_raw(), Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(libc::c_int);
        for sig in SIGNALS {
            // SAFETY: installs a handler that only makes async-signal-safe calls.
            unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        }
    }

    /// The output is installed or removed: nothing is left to clean up.
    pub fn forget() {
        let p = TEMP.swap(null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: made by CString::into_raw and swapped out, so ours alone.
            drop(unsafe { CString::from_raw(p) });
        }
    }
}

/// Writes the whole output, synced, over `to` (an empty file of ours).
pub(super) fn write_output(
    a: &ConvertArgs,
    out: OutputFormat,
    src: &Source,
    to: &Path,
) -> Result<()> {
    match out {
        OutputFormat::Asif => {
            let (chunk_size, block_size) = a.geometry.sizes()?;
            let opts = CreateOptions {
                size: src.size(),
                force: true,
                chunk_size,
                block_size,
            };
            let dst = Image::create(to, &opts)?;
            let step = u64::from(chunk_size).clamp(STEP, 8 * STEP);
            copy(src, step, |buf, off| dst.write_at(buf, off))?;
            dst.close()?;
        }
        OutputFormat::Raw => {
            let ctx = |e| Error::io(to.display().to_string(), e);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(to)
                .map_err(ctx)?;
            f.set_len(src.size()).map_err(ctx)?;
            copy(src, STEP, |buf, off| f.write_all_at(buf, off).map_err(ctx))?;
            f.sync_all().map_err(ctx)?;
        }
        OutputFormat::Udrw | OutputFormat::Udif | OutputFormat::Udsb => {
            // The format's own create wants the name free.
            remove_any(to)?;
            let dst = if out == OutputFormat::Udrw {
                crate::raw::create(to, src.size(), false)?;
                registry::open(to, Some(disk::Format::Udrw), &OpenOptions::writable())?
            } else if out == OutputFormat::Udif {
                crate::udif::create_udrw(to, src.size())?;
                registry::open(to, Some(disk::Format::Udif), &OpenOptions::writable())?
            } else {
                let b = crate::udsb::SparseBundle::create(
                    to,
                    src.size(),
                    crate::udsb::DEFAULT_BAND_SIZE,
                )?;
                Box::new(b)
            };
            copy(src, STEP, |buf, off| dst.write_at(buf, off))?;
            dst.flush()?;
        }
        OutputFormat::Udsp => {
            remove_any(to)?;
            let dst =
                crate::udsp::SparseImage::create(to, src.size(), super::formats::UDSP_BAND_SIZE)?;
            copy(src, STEP, |buf, off| dst.write_at(buf, off))?;
            dst.close()?;
        }
        OutputFormat::Qcow2 | OutputFormat::Vmdk | OutputFormat::Vhdx => {
            let fmt = out.qemu_name().expect("a qemu format");
            super::qemu_out::convert(a, src, fmt, to)?;
        }
    }
    Ok(())
}

/// A qemu driver name such as `qcow2` or `host_device`: it reaches
/// qemu-nbd as `--format=NAME`, so it may hold nothing else (no options).
fn is_format_name(f: &str) -> bool {
    !f.is_empty()
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Opens the source as `format` says, else as what it looks like: a
/// format [`registry::probe`] knows is opened by [`registry::open`]. A file named
/// `.asif` is opened as ASIF whatever its magic, so a damaged image is
/// refused rather than copied as if it were a raw disk.
fn open_source(
    path: &Path,
    format: Option<&str>,
    password: Option<crate::password::Password>,
) -> Result<Source> {
    use clap::ValueEnum;
    let opts = OpenOptions {
        password,
        ..OpenOptions::default()
    };
    let open = |f| Ok(Source::Disk(registry::open(path, Some(f), &opts)?.into()));
    match format {
        Some(f) if !is_format_name(f) => {
            return Err(Error::Invalid(format!(
                "unknown source format {f:?}: expected raw, asif or a qemu-img format name"
            )))
        }
        // Raw sources are read as plain files, below.
        Some(f) => match disk::Format::from_str(f, false) {
            Ok(disk::Format::Raw) | Err(_) => {}
            Ok(known) => return open(known),
        },
        None if super::formats::has_asif_name(path) => return open(disk::Format::Asif),
        None => match registry::probe(path)? {
            None | Some(disk::Format::Raw) => {}
            Some(known) => return open(known),
        },
    }
    let f = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let m = f
        .metadata()
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    if !m.is_file() {
        return Err(Error::Invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let qemu_format = match format {
        Some("raw") => None,
        Some(f) => Some(f.to_string()),
        None => {
            let probed = qemu::probe(path)?;
            if probed.is_none() {
                eprintln!(
                    "asiffs: warning: {}: no source format given and none recognised; reading it as raw (-f raw says so, -f FMT picks another)",
                    path.display()
                );
            }
            probed
        }
    };
    match qemu_format {
        None => Ok(Source::Raw(f, m.len())),
        Some(format) => Ok(Source::Qemu(qemu::Export::start(path, &format, WORKERS)?)),
    }
}

/// Copies every non-zero step of `src`'s data ranges through `write`, with
/// [`WORKERS`] threads. Steps end on multiples of `step` so that chunks are
/// written whole.
fn copy(src: &Source, step: u64, write: impl Fn(&[u8], u64) -> Result<()> + Sync) -> Result<()> {
    let ranges = src.data_ranges()?;
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let pb = progress::bar(total, "converting");
    let (tx, rx) = crossbeam_channel::bounded::<(u64, u64)>(WORKERS * 2);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        first_error.lock().get_or_insert(e);
    };
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            let rx = rx.clone();
            let (pb, write, fail, failed) = (&pb, &write, &fail, &failed);
            s.spawn(move || {
                let mut reader = match src.reader() {
                    Ok(r) => r,
                    Err(e) => return fail(e),
                };
                let mut buf = vec![0u8; (step * READ_STEPS) as usize];
                for (at, n) in rx {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let b = &mut buf[..n as usize];
                    let r = reader.read_at(b, at).and_then(|()| {
                        // Written a step at a time, all-zero steps skipped.
                        let mut done = 0u64;
                        while done < n {
                            let k = ((at + done) / step + 1) * step - (at + done);
                            let piece = &b[done as usize..(done + k.min(n - done)) as usize];
                            if !is_zero(piece) {
                                write(piece, at + done)?;
                            }
                            done += piece.len() as u64;
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        return fail(e);
                    }
                    pb.inc(n);
                }
            });
        }
        drop(rx);
        'feed: for (start, end) in ranges {
            let mut at = start;
            while at < end {
                let big = step * READ_STEPS;
                let n = ((at / big + 1) * big).min(end) - at;
                // Fails only once every worker has quit (on an error).
                if failed.load(Ordering::Relaxed) || tx.send((at, n)).is_err() {
                    break 'feed;
                }
                at += n;
            }
        }
        drop(tx);
    });
    pb.finish_and_clear();
    match first_error.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed blocks lets the compiler vectorise the scan.
    let mut blocks = b.chunks_exact(64);
    blocks.all(|c| c.iter().fold(0, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Sources in the formats qemu-img reads (qcow2, vmdk, vhdx, vdi, vpc, ...).
///
/// How they are read, and why (measured on a 2 GiB qcow2 holding 1 GiB of
/// data, 2 CPUs, warm page cache):
/// - `qemu-img convert -O raw` cannot write to a pipe (it resizes and seeks
///   its target), and neither can `qemu-img dd`.
/// - A temporary sparse raw copy next to DST works anywhere but costs the
///   source's data size in disk space and took 4.6 s just to make.
/// - `qemu-storage-daemon` with a FUSE export reads as a plain file (even
///   SEEK_DATA works) but managed 320 MB/s.
/// - `qemu-nbd` on a private unix socket, read by the small NBD client
///   below with one connection per copy worker: no extra disk space, no
///   FUSE, and the data ranges come from `qemu-img map --output=json`, so
///   holes are never read at all. This is what we use.
///
/// `qemu-nbd --fork` returns once the socket accepts connections, so there
/// is no polling. It runs without `--persistent`: it exits by itself when
/// its last client disconnects, including when asiffs dies. A control
/// connection is held open from start to end so that the workers, which
/// connect later, always find it running.
pub(super) mod qemu {
    use std::io::{Read, Write};
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use crate::error::{Error, Result};

    /// The qemu format of a source that is neither ASIF nor raw, or `None`
    /// for raw. Without qemu-img, files carrying a known magic are refused
    /// (they must not be copied as if they were raw disks).
    pub fn probe(path: &Path) -> Result<Option<String>> {
        let abs = absolute(path)?;
        let out = match Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&abs)
            .output()
        {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match sniff(path)? {
                    Some(fmt) => Err(Error::Invalid(format!(
                        "{}: looks like a {fmt} image; converting it needs qemu-img (install qemu-utils)",
                        path.display()
                    ))),
                    None => Ok(None),
                };
            }
            Err(e) => return Err(Error::io("running qemu-img", e)),
        };
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "qemu-img info {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            Error::Invalid(format!("qemu-img info printed something unexpected: {e}"))
        })?;
        match v["format"].as_str() {
            Some("raw") => Ok(None),
            Some(f) => Ok(Some(f.to_string())),
            None => Err(Error::Invalid(
                "qemu-img info printed no format".to_string(),
            )),
        }
    }

    /// Magics of the common formats, for when qemu-img is not installed.
    fn sniff(path: &Path) -> Result<Option<&'static str>> {
        let mut f =
            std::fs::File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let mut b = [0u8; 512];
        let mut n = 0;
        while n < b.len() {
            match f.read(&mut b[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path.display().to_string(), e)),
            }
        }
        let b = &b[..n];
        let at = |off: usize, m: &[u8]| b.len() >= off + m.len() && &b[off..off + m.len()] == m;
        Ok(if at(0, b"QFI\xfb") {
            Some("qcow2")
        } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") || at(0, b"COWD") {
            Some("vmdk")
        } else if at(0, b"vhdxfile") {
            Some("vhdx")
        } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
            Some("vdi")
        } else if at(0, b"conectix") {
            Some("vhd")
        } else if at(0, b"QED\0") {
            Some("qed")
        } else if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
            Some("parallels")
        } else {
            None
        })
    }

    /// An absolute path, so that qemu never reads `name:rest` as a protocol.
    fn absolute(path: &Path) -> Result<PathBuf> {
        std::path::absolute(path).map_err(|e| Error::io(path.display().to_string(), e))
    }

    /// A read-only qemu-nbd export of one image.
    pub struct Export {
        pub size: u64,
        pub format: String,
        pub path: PathBuf,
        dir: PathBuf,
        socket: PathBuf,
        /// Held open so the server outlives the gaps between worker connections.
        control: Option<Nbd>,
        /// The server, as a pidfd: immune to pid reuse, and pollable for its
        /// exit although it is not our child (`--fork` reparents it).
        pidfd: Option<std::os::fd::OwnedFd>,
    }

    impl Export {
        pub fn start(path: &Path, format: &str, workers: usize) -> Result<Export> {
            let abs = absolute(path)?;
            let dir = std::env::temp_dir().join(format!("asiffs-nbd-{}", uuid::Uuid::new_v4()));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(dir.display().to_string(), e))?;
            let mut ex = Export {
                size: 0,
                format: format.to_string(),
                path: abs,
                socket: dir.join("s"),
                dir,
                control: None,
                pidfd: None,
            };
            let pidfile = ex.dir.join("pid");
            let out = Command::new("qemu-nbd")
                .arg("--fork")
                .arg("--read-only")
                .arg(format!("--shared={}", workers + 1))
                .arg(format!("--format={format}"))
                .arg("--socket")
                .arg(&ex.socket)
                .arg("--pid-file")
                .arg(&pidfile)
                .arg(&ex.path)
                .output()
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::Invalid(format!(
                        "{}: converting a {format} image needs qemu-nbd (install qemu-utils)",
                        path.display()
                    )),
                    _ => Error::io("running qemu-nbd", e),
                })?;
            ex.pidfd = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
                .and_then(pidfd_open);
            if !out.status.success() {
                return Err(Error::Invalid(format!(
                    "qemu-nbd {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let c = ex.connect()?;
            ex.size = c.size;
            ex.control = Some(c);
            Ok(ex)
        }

        pub fn connect(&self) -> Result<Nbd> {
            Nbd::connect(&self.socket)
        }

        /// The ranges `qemu-img map` reports as holding data (zero ranges,
        /// allocated or not, are left out), merged.
        pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
            let out = Command::new("qemu-img")
                .args(["map", "--output=json", "-f", &self.format])
                .arg(&self.path)
                .output()
                .map_err(|e| Error::io("running qemu-img map", e))?;
            if !out.status.success() {
                return Err(Error::Invalid(format!(
                    "qemu-img map {}: {}",
                    self.path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let bad = |what: &str| Error::Invalid(format!("qemu-img map printed {what}"));
            let v: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).map_err(|_| bad("something unexpected"))?;
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for e in v {
                let (Some(start), Some(len)) = (e["start"].as_u64(), e["length"].as_u64()) else {
                    return Err(bad("an extent without start or length"));
                };
                if e["data"].as_bool() != Some(true) || e["zero"].as_bool() == Some(true) {
                    continue;
                }
                let end = (start + len).min(self.size);
                match ranges.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ if start < end => ranges.push((start, end)),
                    _ => {}
                }
            }
            Ok(ranges)
        }
    }

    fn pidfd_open(pid: libc::pid_t) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: the descriptor was just created for us and nothing else owns it.
        (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }

    impl Drop for Export {
        fn drop(&mut self) {
            use std::os::fd::AsRawFd;
            // Closing the last connection makes qemu-nbd exit; a server no
            // client ever reached would wait forever, so that one is told to.
            if self.control.take().is_none() {
                if let Some(fd) = &self.pidfd {
                    // SAFETY: plain syscall on a pidfd we own.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            fd.as_raw_fd(),
                            libc::SIGTERM,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        )
                    };
                }
            }
            // Wait (bounded) until it has gone, so that nothing of ours
            // outlives the command.
            if let Some(fd) = &self.pidfd {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 10_000) };
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const NBD_OPT_EXPORT_NAME: u32 = 1;
    const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1;
    const NBD_FLAG_NO_ZEROES: u16 = 2;
    const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
    const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    const NBD_CMD_READ: u16 = 0;
    const NBD_CMD_DISC: u16 = 2;
    /// qemu-nbd's largest request.
    const MAX_REQUEST: usize = 32 << 20;

    /// A minimal NBD client: fixed-newstyle handshake, the default export,
    /// simple replies (no structured replies are asked for), reads only.
    pub struct Nbd {
        sock: UnixStream,
        pub size: u64,
        handle: u64,
    }

    fn proto(what: &str) -> Error {
        Error::Invalid(format!("qemu-nbd: unexpected {what}"))
    }

    impl Nbd {
        fn connect(path: &Path) -> Result<Nbd> {
            let io = |e| Error::io("talking to qemu-nbd", e);
            let mut sock = UnixStream::connect(path).map_err(io)?;
            let mut hello = [0u8; 18];
            sock.read_exact(&mut hello).map_err(io)?;
            if &hello[..16] != b"NBDMAGICIHAVEOPT" {
                return Err(proto("greeting"));
            }
            let flags = u16::from_be_bytes([hello[16], hello[17]]);
            if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
                return Err(proto("handshake (not fixed newstyle)"));
            }
            let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
            let client = u32::from(NBD_FLAG_FIXED_NEWSTYLE | (flags & NBD_FLAG_NO_ZEROES));
            let mut m = Vec::with_capacity(20);
            m.extend_from_slice(&client.to_be_bytes());
            m.extend_from_slice(b"IHAVEOPT");
            m.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
            sock.write_all(&m).map_err(io)?;
            let mut info = [0u8; 10];
            sock.read_exact(&mut info).map_err(io)?;
            if !no_zeroes {
                sock.read_exact(&mut [0u8; 124]).map_err(io)?;
            }
            let size = u64::from_be_bytes(info[..8].try_into().expect("8 bytes"));
            Ok(Nbd {
                sock,
                size,
                handle: 0,
            })
        }

        fn request(&mut self, kind: u16, off: u64, len: u32) -> std::io::Result<()> {
            self.handle += 1;
            let mut r = [0u8; 28];
            r[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            r[6..8].copy_from_slice(&kind.to_be_bytes());
            r[8..16].copy_from_slice(&self.handle.to_be_bytes());
            r[16..24].copy_from_slice(&off.to_be_bytes());
            r[24..28].copy_from_slice(&len.to_be_bytes());
            self.sock.write_all(&r)
        }

        pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
            let io = |e| Error::io("reading from qemu-nbd", e);
            for (i, piece) in buf.chunks_mut(MAX_REQUEST).enumerate() {
                let at = off + (i * MAX_REQUEST) as u64;
                self.request(NBD_CMD_READ, at, piece.len() as u32)
                    .map_err(io)?;
                let mut rep = [0u8; 16];
                self.sock.read_exact(&mut rep).map_err(io)?;
                let magic = u32::from_be_bytes(rep[..4].try_into().expect("4 bytes"));
                let err = u32::from_be_bytes(rep[4..8].try_into().expect("4 bytes"));
                let handle = u64::from_be_bytes(rep[8..].try_into().expect("8 bytes"));
                if magic != NBD_SIMPLE_REPLY_MAGIC || handle != self.handle {
                    return Err(proto("reply"));
                }
                if err != 0 {
                    return Err(Error::io(
                        format!("qemu-nbd could not read {at:#x}+{:#x}", piece.len()),
                        std::io::Error::from_raw_os_error(err as i32),
                    ));
                }
                self.sock.read_exact(piece).map_err(io)?;
            }
            Ok(())
        }
    }

    impl Drop for Nbd {
        fn drop(&mut self) {
            let _ = self.request(NBD_CMD_DISC, 0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::{PlainDisk, PLAIN_SIZE};
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        a: ConvertArgs,
    }

    /// A source of another format is copied through the Disk trait, its
    /// holes skipped, into either output format.
    #[test]
    fn converts_any_disk() {
        let disk = PlainDisk::new();
        let want = disk.bytes();
        let src = Source::Disk(std::sync::Arc::new(disk));
        let written = Mutex::new(Vec::new());
        copy(&src, STEP, |buf, off| {
            written.lock().push((off, buf.to_vec()));
            Ok(())
        })
        .unwrap();
        let written = written.into_inner();
        assert_eq!(
            written
                .iter()
                .map(|(o, b)| (*o, b.len()))
                .collect::<Vec<_>>(),
            [(0, STEP as usize)],
            "only the data extent is written"
        );
        assert!(written[0].1 == want[..STEP as usize]);

        let tmp = tempfile::tempdir().unwrap();
        for out in ["asif", "raw"] {
            let to = tmp.path().join(format!("out.{out}"));
            File::create(&to).unwrap();
            let a = Args::parse_from(["t", "src", "dst", "-O", out]).a;
            write_output(&a, a.output_format.unwrap(), &src, &to).unwrap();
            let got = match out {
                "asif" => {
                    let img = Image::open(&to, &OpenOptions::default()).unwrap();
                    assert_eq!(img.size(), PLAIN_SIZE);
                    let mut b = vec![0u8; PLAIN_SIZE as usize];
                    img.read_at(&mut b, 0).unwrap();
                    b
                }
                _ => std::fs::read(&to).unwrap(),
            };
            assert!(got == want, "{out}: contents differ");
        }
    }
}

//! The `asiffs` command line.

mod convert;
mod docs;
mod formats;
mod lifecycle;
mod mount_clients;
mod progress;
mod qemu_out;
pub mod size;
#[cfg(test)]
mod tests;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::asif::engine::{CreateOptions, Image, LockMode, OpenOptions};
use crate::asif::format::{DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE};
use crate::disk::{Disk, Format};
use crate::error::{Error, Result};
use size::{human, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "asiffs",
    version,
    about = "Apple Sparse Image Format (ASIF) disk images on Linux",
    after_help = "`asiffs SOURCE MOUNTPOINT [-o OPTS]`, without a command, is `asiffs mount`: \
                  the form mount(8) runs for `mount -t fuse.asiffs` and fstab lines."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an empty image (asif, udrw, udsb; from the extension or --format).
    Create(CreateArgs),
    /// Show an image's sizes, identity and index figures.
    Info(ImageArgs),
    /// Show which ranges of the virtual disk hold data.
    Map(ImageArgs),
    /// Check an image (asif, udif, udsb); exit 0 clean, 2 corrupt, 3 leaks only.
    Check(CheckArgs),
    /// Convert between asif, raw, udrw, udsb (and qcow2/vmdk/vhdx through qemu-img).
    Convert(convert::ConvertArgs),
    /// Change an image's virtual size (SIZE, +SIZE or -SIZE; shrinking needs --shrink).
    Resize(lifecycle::ResizeArgs),
    /// Pack an image's chunks and give unused space back to the host.
    Compact(lifecycle::CompactArgs),
    /// Present a directory of disk images as raw files through FUSE.
    Mount(crate::fs::MountArgs),
    /// Flush and unmount an asiffs mount.
    Umount(mount_clients::UmountArgs),
    /// Per-image counters of a running mount, as JSON.
    Stats(mount_clients::StatsArgs),
    /// Serve images over NBD (a Unix socket or TCP, optionally with TLS).
    Serve(crate::nbd::ServeArgs),
}

#[derive(clap::Args, Debug)]
struct CreateArgs {
    file: PathBuf,
    /// Virtual size: bytes, K/M/G/T/P (powers of 1024) or KB/MB/GB/TB (powers of 1000).
    #[arg(short, long, value_parser = parse_size)]
    size: u64,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
    /// Container format (default: from FILE's extension).
    #[arg(long, value_enum, value_name = "FMT")]
    format: Option<formats::CreateFormat>,
    /// Band size of a sparse image (default 1M) or bundle (default 8M).
    #[arg(long, value_name = "SIZE")]
    band_size: Option<String>,
    /// Encrypt the image (udrw, udsp, udsb) with a password, as hdiutil
    /// -encryption does.
    #[arg(long, value_enum, value_name = "aes-128|aes-256")]
    encryption: Option<crate::host::crypt::Encryption>,
    #[command(flatten)]
    password: crate::password::PasswordArgs,
    #[command(flatten)]
    geometry: GeometryArgs,
}

/// Chunk and block size of a new image.
#[derive(clap::Args, Debug)]
pub(crate) struct GeometryArgs {
    /// Chunk size (macOS has only been seen to use 1M).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    chunk_size: u64,
    /// Block size (macOS has only been seen to use 512).
    #[arg(long, value_parser = parse_size, default_value = "512")]
    block_size: u64,
}

#[derive(clap::Args, Debug)]
struct ImageArgs {
    file: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Output format; `--output=json` is `--json`, as qemu-img users type it.
    #[arg(long, value_enum, value_name = "FMT", conflicts_with = "json")]
    output: Option<OutputFormat>,
    /// Read even if another process has the image open for writing.
    #[arg(short = 'U', long)]
    force_share: bool,
    #[command(flatten)]
    password: crate::password::PasswordArgs,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Repair in place: `leaks` frees unreferenced chunks and cuts unused
    /// ones off the end; `all` also repairs entries (out of rule, past the
    /// end, shared chunks). Needs the image to itself.
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    repair: Option<Repair>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Repair {
    Leaks,
    All,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OutputFormat {
    Human,
    Json,
}

impl ImageArgs {
    fn json(&self) -> bool {
        self.json || self.output == Some(OutputFormat::Json)
    }
}

/// Runs the command line and returns the exit status.
pub fn main() -> i32 {
    let args: Vec<_> = std::env::args_os().collect();
    let result = match docs::parse(&args) {
        Some(d) => docs::run(d),
        None => {
            let cli = Cli::parse_from(mount_by_default(args));
            init_logging();
            run(cli)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("asiffs: {e}");
            match e {
                // A file that breaks the format is what `check` calls corrupt.
                Error::Format(_) | Error::Corrupt(_) => 2,
                _ => 1,
            }
        }
    }
}

/// `asiffs SOURCE MOUNTPOINT ...` means `asiffs mount SOURCE MOUNTPOINT
/// ...`: mount.fuse3 runs the program named by `-t fuse.TYPE` that way.
/// Taken so only when the first word is no command and no option, and a
/// second word follows that is no option either; the first must also be a
/// path (exist or hold a '/'), so a mistyped command still gets clap's hint.
fn mount_by_default(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let word = |i: usize| {
        args.get(i)
            .filter(|a| !a.as_encoded_bytes().starts_with(b"-"))
    };
    let (Some(first), Some(_)) = (word(1), word(2)) else {
        return args;
    };
    let cmd = Cli::command();
    let is_command = first == "help" || cmd.find_subcommand(first).is_some();
    let is_path = first.as_encoded_bytes().contains(&b'/') || PathBuf::from(first).exists();
    if !is_command && is_path {
        args.insert(1, "mount".into());
    }
    args
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ASIFFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Create(a) => create(a),
        Command::Info(a) => info(a),
        Command::Map(a) => map(a),
        Command::Check(a) => check(a),
        Command::Convert(a) => convert::run(a),
        Command::Resize(a) => lifecycle::resize(a),
        Command::Compact(a) => lifecycle::compact(a),
        Command::Mount(a) => crate::fs::cmd_mount(&a),
        Command::Umount(a) => mount_clients::cmd_umount(&a),
        Command::Stats(a) => mount_clients::cmd_stats(&a),
        Command::Serve(a) => crate::nbd::cmd_serve(&a),
    }
}

/// Chunk and block sizes other than macOS's own work here but may not there.
impl GeometryArgs {
    /// Chunk and block size as the engine takes them, warning when they are
    /// not what macOS uses.
    pub(crate) fn sizes(&self) -> Result<(u32, u32)> {
        let (chunk_size, block_size) = (self.chunk_size, self.block_size);
        let cs = u32::try_from(chunk_size)
            .map_err(|_| Error::Invalid(format!("chunk size {chunk_size} is too large")))?;
        let bs = u32::try_from(block_size)
            .map_err(|_| Error::Invalid(format!("block size {block_size} is too large")))?;
        if (cs, bs) != (DEFAULT_CHUNK_SIZE, DEFAULT_BLOCK_SIZE.into()) {
            eprintln!(
                "asiffs: warning: macOS has only been seen to use 1 MiB chunks and 512-byte blocks"
            );
        }
        Ok((cs, bs))
    }
}

fn create(a: CreateArgs) -> Result<i32> {
    let format = formats::create_format(&a.file, a.format)?;
    if let Some(enc) = a.encryption {
        let band = formats::band_size(format, a.band_size.as_deref())?;
        let password = a.password.for_new_image(&a.file)?;
        formats::create_encrypted(&a.file, format, a.size, band, a.force, &password, enc)?;
        let name = format!("{format:?}").to_ascii_lowercase();
        println!(
            "Formatting '{}', fmt={name} size={} encryption={}",
            a.file.display(),
            a.size,
            enc.key_bits()
        );
        return Ok(0);
    }
    if format != formats::CreateFormat::Asif {
        let band = formats::band_size(format, a.band_size.as_deref())?;
        formats::create_other(&a.file, format, a.size, band, a.force)?;
        let name = format!("{format:?}").to_ascii_lowercase();
        println!(
            "Formatting '{}', fmt={name} size={}",
            a.file.display(),
            a.size
        );
        return Ok(0);
    }
    let (chunk_size, block_size) = a.geometry.sizes()?;
    let opts = CreateOptions {
        size: a.size,
        force: a.force,
        chunk_size,
        block_size,
    };
    let img = Image::create(&a.file, &opts)?;
    println!(
        "Formatting '{}', fmt=asif size={}",
        a.file.display(),
        img.size()
    );
    img.close()?;
    Ok(0)
}

/// Opens FILE in whatever format [`formats::format_of`] finds.
fn open_for_reading(a: &ImageArgs) -> Result<Box<dyn Disk>> {
    let lock = if a.force_share {
        LockMode::None
    } else {
        LockMode::Shared
    };
    let format = formats::format_of(&a.file)?;
    crate::registry::open(
        &a.file,
        Some(format),
        &OpenOptions {
            lock,
            password: a.password.for_image(&a.file)?,
            ..OpenOptions::default()
        },
    )
}

/// `info --json`: the format first, then what the format has to say.
#[derive(serde::Serialize)]
struct InfoJson<T> {
    format: Format,
    /// How the container is encrypted, for an encrypted one.
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption: Option<&'static str>,
    #[serde(flatten)]
    info: T,
}

/// What `info` says of any disk; the ASIF translator says more.
#[derive(serde::Serialize)]
struct DiskInfo {
    path: String,
    virtual_size: u64,
    /// Bytes the host has allocated to the container.
    actual_size: u64,
}

fn print_json(v: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("serialising plain data")
    );
}

fn info(a: ImageArgs) -> Result<i32> {
    let disk = open_for_reading(&a)?;
    let encryption =
        crate::registry::encryption(&a.file)?.map(crate::registry::describe_encryption);
    print!("{}", info_text(&*disk, encryption, a.json())?);
    Ok(0)
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).expect("serialising plain data") + "\n"
}

/// What `info` prints: the figures every format has, then the ASIF
/// translator's own.
fn info_text(disk: &dyn Disk, encryption: Option<&'static str>, json: bool) -> Result<String> {
    let format = disk.format();
    let summary = |path: &str, virtual_size: u64, actual_size: u64| {
        format!(
            "image: {path}\nfile format: {}\nvirtual size: {} ({virtual_size} bytes)\ndisk size: {}\n{}",
            format.name(),
            human(virtual_size),
            human(actual_size),
            encryption.map_or(String::new(), |e| format!("encryption: {e}\n"))
        )
    };
    let Some(details) = disk.details() else {
        let info = DiskInfo {
            path: disk.path().display().to_string(),
            virtual_size: disk.size(),
            actual_size: disk.allocated_bytes()?,
        };
        if json {
            return Ok(json_text(&InfoJson {
                format,
                encryption,
                info,
            }));
        }
        return Ok(summary(&info.path, info.virtual_size, info.actual_size));
    };
    let i = details?;
    if json {
        return Ok(json_text(&InfoJson {
            format,
            encryption,
            info: &i,
        }));
    }
    Ok(summary(&i.path, i.virtual_size, i.actual_size)
        + &format!(
            "file length: {}\nchunk size: {}\nblock size: {}\nmax size: {} ({} bytes)\n\
             uuid: {}\nstable uuid: {}\nactive directory: {} (version {})\ntables: {}\n\
             data chunks: {} ({} partially valid)\n",
            human(i.file_size),
            i.chunk_size,
            i.block_size,
            human(i.max_size),
            i.max_size,
            i.uuid,
            i.stable_uuid.as_deref().unwrap_or("(unreadable)"),
            i.active_directory,
            i.directory_version,
            i.tables,
            i.data_chunks,
            i.partial_chunks
        ))
}

fn map(a: ImageArgs) -> Result<i32> {
    let disk = open_for_reading(&a)?;
    print!("{}", map_text(&*disk, &a.file, a.json())?);
    Ok(0)
}

/// What `map` prints: every extent as JSON, or the data extents as
/// qemu-img map does.
fn map_text(disk: &dyn Disk, file: &std::path::Path, json: bool) -> Result<String> {
    let extents = disk.extents()?;
    if json {
        let v: Vec<_> = extents
            .iter()
            .map(|e| {
                serde_json::json!({
                    "start": e.start, "length": e.length, "data": e.data, "zero": !e.data,
                    "offset": e.offset,
                })
            })
            .collect();
        return Ok(json_text(&v));
    }
    let mut t = format!("{:<20}{:<20}{:<20}File\n", "Offset", "Length", "Mapped to");
    for e in extents.iter().filter(|e| e.data) {
        t += &format!(
            "{:<20}{:<20}{:<20}{}\n",
            format!("{:#x}", e.start),
            format!("{:#x}", e.length),
            format!("{:#x}", e.offset.unwrap_or(0)),
            file.display()
        );
    }
    Ok(t)
}

/// `check -r`: repairs, then checks again and reports both.
fn repair(a: &ImageArgs, mode: Repair) -> Result<i32> {
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.blocks() * 512)
            .map_err(|e| Error::io(p.display().to_string(), e))
    };
    let before = allocated(&a.file)?;
    if let Some(f) = crate::registry::probe(&a.file)?.filter(|&f| f != Format::Asif) {
        return Err(formats::not_supported(&a.file, "check -r (repair)", f));
    }
    let mut img = Image::open(&a.file, &OpenOptions::writable())?;
    let mut entries = Vec::new();
    if img.write_refusal().is_some() || img.check()?.is_corrupt() {
        if mode == Repair::Leaks {
            return Err(Error::Invalid(format!(
                "{}: the image is corrupt, and -r leaks repairs only leaks (-r all repairs entries too)",
                a.file.display()
            )));
        }
        entries = img.repair_entries()?;
        img.close()?;
        img = Image::open(&a.file, &OpenOptions::writable())?;
    }
    let mut rep = img.repair_leaks(before)?;
    rep.entries_repaired = entries;
    let r = img.check()?;
    if a.json() {
        let v = serde_json::json!({
            "repair": rep,
            "check": r,
            "exit_code": r.exit_code(),
        });
        print_json(&v);
        return Ok(r.exit_code());
    }
    for e in &rep.entries_repaired {
        println!("Repaired: {e}");
    }
    println!(
        "Repaired {} leaked chunks and {} entries; file {} -> {} bytes, {} given back to the host.",
        rep.leaked_chunks_freed,
        rep.entries_repaired.len(),
        rep.old_file_size,
        rep.new_file_size,
        human(rep.bytes_reclaimed)
    );
    print_check(&img, &r);
    Ok(r.exit_code())
}

fn check(c: CheckArgs) -> Result<i32> {
    let a = c.image;
    if let Some(mode) = c.repair {
        return repair(&a, mode);
    }
    match crate::registry::probe(&a.file) {
        Ok(Some(f @ (Format::Udif | Format::Udsb | Format::Udsp | Format::Udrw))) => {
            if f != Format::Udsb || !crate::registry::is_encrypted(&a.file)? {
                return formats::check_other(&a.file, f, a.json());
            }
            let disk = open_for_reading(&a)?;
            return formats::check_unlocked(&a.file, &*disk, a.json());
        }
        Ok(Some(Format::Encrypted)) => {
            let disk = open_for_reading(&a)?;
            if disk.check_report().is_none() {
                return formats::check_unlocked(&a.file, &*disk, a.json());
            }
            return check_asif(&a, disk);
        }
        Err(e) if !a.json() => return Err(e),
        _ => {}
    }
    let disk = match open_for_reading(&a) {
        Ok(disk) => disk,
        // A script asking for JSON gets it for an image too broken to open.
        Err(e @ (Error::Format(_) | Error::Corrupt(_))) if a.json() => {
            eprintln!("asiffs: {e}");
            let r = crate::asif::engine::CheckReport {
                corruptions: vec![e.to_string()],
                ..Default::default()
            };
            let mut v = serde_json::to_value(&r).expect("serialising plain data");
            v["exit_code"] = r.exit_code().into();
            print_json(&v);
            return Ok(r.exit_code());
        }
        Err(e) => return Err(e),
    };
    check_asif(&a, disk)
}

fn check_asif(a: &ImageArgs, disk: Box<dyn Disk>) -> Result<i32> {
    checkable(&a.file, &*disk)?;
    let r = disk
        .check_report()
        .ok_or_else(|| not_checked(&a.file, disk.format()))??;
    if a.json() {
        let mut v = serde_json::to_value(&r).expect("serialising plain data");
        v["exit_code"] = r.exit_code().into();
        print_json(&v);
        return Ok(r.exit_code());
    }
    print_check(&*disk, &r);
    Ok(r.exit_code())
}

/// `check` knows the structures of ASIF images only (those that answer
/// [`Disk::check_report`]).
fn checkable(file: &std::path::Path, disk: &dyn Disk) -> Result<()> {
    match disk.format() {
        Format::Asif => Ok(()),
        f => Err(not_checked(file, f)),
    }
}

fn not_checked(file: &std::path::Path, format: Format) -> Error {
    Error::Invalid(format!(
        "{}: asiffs checks ASIF images only, not {}",
        file.display(),
        format.name()
    ))
}

fn print_check(img: &dyn Disk, r: &crate::asif::engine::CheckReport) {
    for c in &r.corruptions {
        println!("ERROR {c}");
    }
    if r.corruptions_not_listed > 0 {
        println!("ERROR ... and {} more", r.corruptions_not_listed);
    }
    for w in &r.warnings {
        println!("Warning: {w}");
    }
    if r.leaked_chunks > 0 {
        let cs = match img.details() {
            Some(Ok(i)) => i.chunk_size,
            _ => 0,
        };
        println!(
            "{} leaked chunks ({}): unreferenced but holding space; `asiffs check -r leaks` or `asiffs compact` reclaims them",
            r.leaked_chunks,
            human(r.leaked_chunks * cs)
        );
    }
    match r.exit_code() {
        0 => println!("No errors were found on the image."),
        2 => {
            let n = r.corruptions.len() as u64 + r.corruptions_not_listed;
            println!(
                "{n} error{} found on the image.",
                if n == 1 { " was" } else { "s were" }
            );
        }
        _ => println!("No corruption was found, but the image leaks space."),
    }
    println!(
        "{} tables, {} data chunks ({} partial), {} bitmap chunks, {} free chunks, {} chunks in the file",
        r.tables, r.data_chunks, r.partial_chunks, r.bitmap_chunks, r.free_chunks, r.file_chunks
    );
}

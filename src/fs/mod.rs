//! The FUSE layer: `asiffs mount`.
//!
//! SOURCE is a directory of images (`NAME.asif`, `NAME.dmg`,
//! `NAME.sparseimage`, `NAME.sparsebundle`), each shown as a flat raw file
//! `NAME.img`, or a single image (the mountpoint may then be a regular file
//! itself). Which name shows which container, and how images come and go
//! while mounted, is `namespace`'s.
//!
//! Three parts, so that only the last knows FUSE:
//! - `namespace`: the names and open images (create, unlink and rename
//!   act on the containers in SOURCE);
//! - `volume`: every request's logic as plain calls answering an errno,
//!   tested in-process without a mount;
//! - `ops`: the fuser `Filesystem`, which decodes, calls the volume and
//!   replies, on fuser's threads, the `pool`, or (images on plain files,
//!   with io_uring) from the ring's thread.
//!
//! This file parses the mount options and runs the session. Per-image
//! counters are the JSON value of the xattr `user.asiffs.stats`; the root
//! carries `user.asiffs.pid`; `asiffs umount` and `asiffs stats` read them
//! (`cli::mount_clients`).

mod kernel;
mod namespace;
mod ops;
mod pool;
mod volume;

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};
use tracing::{debug, error, info, warn};

use crate::{Error, Result};
use namespace::{Namespace, Source};
use ops::AsifFs;
use pool::Pool;
use volume::Volume;
pub(crate) use volume::{XATTR_PID, XATTR_STATS};

/// How requests are spread over threads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// fuser's own loop: N threads, each reading its own cloned /dev/fuse fd.
    Fuser,
    /// One reader thread feeding a crossbeam-channel pool of N workers.
    Pool,
}

/// How container I/O is issued.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    /// io_uring: a request's container I/O is submitted and the serving
    /// thread goes on; as many requests reach the host as the kernel sends.
    /// Falls back to `threads`, with a logged reason, where io_uring is
    /// unavailable.
    Uring,
    /// Blocking reads and writes on the serving threads.
    Threads,
}

/// Whether FUSE requests travel over io_uring (`-o uring=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UringMode {
    /// When the kernel offers it and asiffs can mount itself (root).
    Auto,
    /// Always; the mount fails with the reason when it cannot.
    On,
    /// Never: `/dev/fuse` through fuser.
    Off,
}

/// When the kernel page cache is bypassed (`FOPEN_DIRECT_IO`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectIo {
    /// Only for opens with O_DIRECT (QEMU cache=none): parallel direct writes.
    Auto,
    /// For every open.
    Always,
    /// Never: O_DIRECT still works, through the kernel's generic path.
    Never,
}

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// A directory of images (NAME.asif, NAME.dmg, NAME.sparseimage,
    /// NAME.sparsebundle), or one image.
    pub source: PathBuf,
    /// Where to mount: a directory, or (for a single image) a regular file.
    pub mountpoint: PathBuf,
    /// Stay in the foreground instead of returning once the mount is ready.
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount options, comma separated (ro, allow_other, allow_root,
    /// default_permissions, auto_unmount, nodev, nosuid, noexec, noatime,
    /// fsname=, subtype=, direct_io, cache=none|writeback,
    /// passthrough=on|off, uring=auto|on|off, password-file=PATH; others
    /// go to the kernel as they are). cache=none (the default) reads and writes guest data with
    /// O_DIRECT on the container, as QEMU's cache.direct=on;
    /// cache=writeback goes through the host page cache. passthrough=on
    /// (the default) hands a raw disk's reads and writes to the kernel.
    /// uring=auto (the default) carries FUSE requests over io_uring when
    /// the kernel offers it (root, /sys/module/fuse/parameters/
    /// enable_uring = 1); on fails when it cannot; off never does.
    /// password-file= unlocks the encrypted images.
    #[arg(short = 'o', value_name = "OPTS", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// Index cache size per image, in chunk-groups.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub cache_tables: usize,
    /// Threads serving requests. Each blocks on one container read at a
    /// time, so this bounds the reads in flight to the host: 16 doubled
    /// cold 4 KiB random reads at queue depth 32 over 4.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub threads: usize,
    /// Threading model.
    #[arg(long, value_enum, default_value_t = Dispatch::Fuser)]
    pub dispatch: Dispatch,
    /// How container I/O is issued.
    #[arg(long, value_enum, default_value_t = Aio::Uring)]
    pub aio: Aio,
    /// Page-cache bypass policy.
    #[arg(long, value_enum, default_value_t = DirectIo::Auto)]
    pub direct_io: DirectIo,
    /// Once detached, append log lines to FILE (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// The password of the encrypted images (also `-o password-file=PATH`).
    #[command(flatten)]
    pub password: crate::password::PasswordArgs,
}

fn io_err(context: impl Into<String>, e: io::Error) -> Error {
    Error::Io {
        context: context.into(),
        source: e,
    }
}

/// What `-o` asked for, split into what fuser mounts with and what we do.
#[derive(Debug)]
struct Opts {
    mount: Vec<MountOption>,
    acl: SessionACL,
    readonly: bool,
    direct_io: Option<DirectIo>,
    /// Host page cache for the containers' guest data (`cache=`).
    cache: crate::CacheMode,
    /// `password-file=`: unlocks every encrypted image of SOURCE.
    password_file: Option<PathBuf>,
    /// `passthrough=on|off`: raw disks' I/O handed to the kernel.
    passthrough: bool,
    /// `uring=auto|on|off`.
    uring: UringMode,
}

fn parse_options(list: &[String], source: &Path) -> Result<Opts> {
    let mut o = Opts {
        mount: Vec::new(),
        acl: SessionACL::Owner,
        readonly: false,
        direct_io: None,
        // See the README: cold random reads 1.6x faster, QD1 p99 latency a
        // fifth, and nothing cached twice.
        cache: crate::CacheMode::None,
        password_file: None,
        passthrough: true,
        uring: UringMode::Auto,
    };
    let mut fsname = false;
    let mut subtype = false;
    let mut default_permissions = false;
    for raw in list.iter().flat_map(|s| s.split(',')) {
        let opt = raw.trim();
        let m = match opt {
            "" => continue,
            "ro" => {
                o.readonly = true;
                MountOption::RO
            }
            "rw" => {
                o.readonly = false;
                MountOption::RW
            }
            "allow_other" => {
                o.acl = SessionACL::All;
                continue;
            }
            "allow_root" => {
                o.acl = SessionACL::RootAndOwner;
                continue;
            }
            "default_permissions" => {
                default_permissions = true;
                continue;
            }
            "auto_unmount" => MountOption::AutoUnmount,
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            "suid" => MountOption::Suid,
            "nosuid" => MountOption::NoSuid,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dirsync" => MountOption::DirSync,
            "direct_io" => {
                o.direct_io = Some(DirectIo::Always);
                continue;
            }
            "cache=none" => {
                o.cache = crate::CacheMode::None;
                continue;
            }
            "cache=writeback" => {
                o.cache = crate::CacheMode::Writeback;
                continue;
            }
            x if x.starts_with("cache=") => {
                return Err(Error::Invalid(format!(
                    "bad mount option {x:?}: cache= takes none or writeback"
                )));
            }
            "passthrough=on" => {
                o.passthrough = true;
                continue;
            }
            "passthrough=off" => {
                o.passthrough = false;
                continue;
            }
            x if x.starts_with("passthrough=") => {
                return Err(Error::Invalid(format!(
                    "bad mount option {x:?}: passthrough= takes on or off"
                )));
            }
            "uring=auto" | "uring=on" | "uring=off" => {
                o.uring = match &opt[6..] {
                    "on" => UringMode::On,
                    "off" => UringMode::Off,
                    _ => UringMode::Auto,
                };
                continue;
            }
            x if x.starts_with("uring=") => {
                return Err(Error::Invalid(format!(
                    "bad mount option {x:?}: uring= takes auto, on or off"
                )));
            }
            x if x.starts_with("password-file=") => {
                o.password_file = Some(PathBuf::from(&x["password-file=".len()..]));
                continue;
            }
            // libfuse-only knobs with no meaning here.
            "kernel_cache" | "auto_cache" | "big_writes" => continue,
            // fstab words for mount(8) and systemd, not for the file
            // system; mount.fuse3 drops some of them, not all.
            "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "users" | "nouser"
            | "owner" | "group" => {
                debug!("ignoring fstab option {opt}");
                continue;
            }
            x if x.starts_with("x-") || x.starts_with("X-") || x.starts_with("comment=") => {
                debug!("ignoring fstab option {x}");
                continue;
            }
            x if x.starts_with("fsname=") => {
                fsname = true;
                MountOption::FSName(x[7..].to_string())
            }
            x if x.starts_with("subtype=") => {
                subtype = true;
                MountOption::Subtype(x[8..].to_string())
            }
            x if x.contains(char::is_whitespace) => {
                return Err(Error::Invalid(format!("bad mount option {x:?}")));
            }
            x => MountOption::CUSTOM(x.to_string()),
        };
        o.mount.retain(|e| e != &m);
        o.mount.push(m);
    }
    if o.mount.contains(&MountOption::RO) && o.mount.contains(&MountOption::RW) {
        o.mount.retain(|m| {
            *m != if o.readonly {
                MountOption::RW
            } else {
                MountOption::RO
            }
        });
    }
    // Other users get in only through the kernel's permission checks on the container's mode.
    if default_permissions || o.acl != SessionACL::Owner {
        o.mount.push(MountOption::DefaultPermissions);
    }
    if o.mount.contains(&MountOption::AutoUnmount) && o.acl == SessionACL::Owner {
        return Err(Error::Invalid(
            "auto_unmount needs allow_other or allow_root".into(),
        ));
    }
    if !fsname {
        o.mount
            .push(MountOption::FSName(source.display().to_string()));
    }
    if !subtype {
        o.mount.push(MountOption::Subtype("asiffs".into()));
    }
    Ok(o)
}

/// `asiffs mount SOURCE MOUNTPOINT`: returns once the mount is ready
/// (the server goes on in a detached child), or serves in the foreground with `-f`.
pub fn cmd_mount(args: &MountArgs) -> Result<i32> {
    let source = args
        .source
        .canonicalize()
        .map_err(|e| io_err(format!("source {}", args.source.display()), e))?;
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .map_err(|e| io_err(format!("mountpoint {}", args.mountpoint.display()), e))?;
    let opts = parse_options(&args.options, &source)?;
    let password =
        crate::password::for_source(&args.password, opts.password_file.as_deref(), &source)?;
    let src_md = std::fs::metadata(&source).map_err(|e| io_err(source.display().to_string(), e))?;
    let mp_md =
        std::fs::metadata(&mountpoint).map_err(|e| io_err(mountpoint.display().to_string(), e))?;
    // A sparse bundle is a directory but one image.
    let is_bundle = src_md.is_dir()
        && source.extension().is_some_and(|e| e == "sparsebundle")
        && source.join("Info.plist").is_file();
    let source_kind = if src_md.is_dir() && !is_bundle {
        if !mp_md.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: a directory source needs a directory mountpoint",
                mountpoint.display()
            )));
        }
        Source::Dir(source.clone())
    } else if src_md.is_file() || is_bundle {
        if !mp_md.is_dir() && !mp_md.is_file() {
            return Err(Error::Invalid(format!(
                "{}: mountpoint must be a directory or a regular file",
                mountpoint.display()
            )));
        }
        Source::File {
            path: source.clone(),
            root_is_file: mp_md.is_file(),
        }
    } else {
        return Err(Error::Invalid(format!(
            "{}: not a directory or a disk image",
            source.display()
        )));
    };
    if args.threads == 0 {
        return Err(Error::Invalid("--threads must be at least 1".into()));
    }
    // Said here, before the fork, so that the user sees why.
    own_transport(opts.uring, &opts.mount)?;

    if args.foreground {
        return serve(args, opts, source_kind, password, &mountpoint, None);
    }
    // Fork before anything starts threads; the child reports readiness on a pipe.
    match fork_daemon()? {
        Forked::Parent { message, pid } => {
            if message.starts_with("OK") {
                return Ok(0);
            }
            // The child already printed why; pass on its exit status.
            Ok(failed_child_status(pid))
        }
        Forked::Child(wr) => serve(args, opts, source_kind, password, &mountpoint, Some(wr)),
    }
}

/// Which side of [`fork_daemon`] this is.
pub(crate) enum Forked {
    /// What the child wrote on the readiness pipe before closing it.
    Parent { message: String, pid: libc::pid_t },
    /// The write end of the readiness pipe; the child is in a session of
    /// its own.
    Child(OwnedFd),
}

/// Forks a daemon that tells its parent, over a pipe, when it is ready
/// (`mount` and `serve`). Call before any thread exists.
pub(crate) fn fork_daemon() -> Result<Forked> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io_err("pipe", io::Error::last_os_error()));
    }
    // SAFETY: fds are fresh and owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller is single-threaded (nothing spawned yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_err("fork", io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(wr);
        let mut message = String::new();
        let _ = std::fs::File::from(rd).read_to_string(&mut message);
        return Ok(Forked::Parent { message, pid });
    }
    drop(rd);
    // SAFETY: in the child; a new session so the terminal's hangup does not reach us.
    unsafe { libc::setsid() };
    Ok(Forked::Child(wr))
}

/// The exit status of a child that did not report ready: its own, or 1
/// if it exited 0 or died of a signal.
pub(crate) fn failed_child_status(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    };
    if code == 0 {
        1
    } else {
        code
    }
}

fn serve(
    args: &MountArgs,
    opts: Opts,
    source_kind: Source,
    password: Option<crate::password::Password>,
    mountpoint: &Path,
    ready: Option<OwnedFd>,
) -> Result<i32> {
    let root_md = match &source_kind {
        Source::Dir(d) => std::fs::metadata(d),
        Source::File { path, .. } => std::fs::metadata(path.parent().unwrap_or(Path::new("/"))),
    }
    .map_err(|e| io_err("source", e))?;
    let ns = Arc::new(
        Namespace::new(source_kind, !opts.readonly, args.cache_tables, opts.cache)
            .with_password(password),
    );
    ns.load_single().map_err(|e| {
        if let Error::Locked { .. } = e {
            error!("{e}: is it mounted elsewhere? (asiffs umount, or mount with -o ro)");
        }
        e
    })?;
    ns.rescan();
    let direct_io = opts.direct_io.unwrap_or(args.direct_io);

    // Signals are taken by a dedicated thread; block them before any thread exists.
    // SAFETY: plain signal-mask calls on a zeroed sigset.
    let sigs = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let own = own_transport(opts.uring, &opts.mount)?;
    let pool = match (own, args.dispatch) {
        (true, _) | (false, Dispatch::Pool) => Some(Arc::new(
            Pool::new(args.threads).map_err(|e| io_err("threads", e))?,
        )),
        (false, Dispatch::Fuser) => None,
    };
    let ring = match (own, args.aio) {
        // The ring transport does its container I/O on its own rings.
        (true, _) | (false, Aio::Threads) => None,
        (false, Aio::Uring) => match crate::host::uring::Ring::new() {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                warn!(
                    "{}: container I/O falls back to blocking calls on {} threads",
                    crate::host::uring::unavailable_reason(&e),
                    args.threads
                );
                None
            }
        },
    };
    let aio = if ring.is_some() || (own && args.aio == Aio::Uring) {
        "io_uring"
    } else {
        "blocking"
    };
    let vol = Arc::new(Volume::new(ns.clone(), ring, direct_io, root_md));
    let mounted = if own {
        let m = kernel::mount(
            mountpoint,
            &opts.mount,
            opts.acl != SessionACL::Owner,
            ns.root_is_file(),
        )
        .map_err(|e| io_err(format!("mounting on {}", mountpoint.display()), e))?;
        Mounted::Own(m)
    } else {
        let fs = AsifFs::new(vol.clone(), pool.clone(), opts.passthrough);
        let mut config = Config::default();
        config.mount_options = opts.mount.clone();
        config.acl = opts.acl;
        config.n_threads = Some(match args.dispatch {
            Dispatch::Fuser => args.threads,
            Dispatch::Pool => 1,
        });
        config.clone_fd = true;
        let session = Session::new(fs, mountpoint, &config)
            .map_err(|e| io_err(format!("mounting on {}", mountpoint.display()), e))?;
        Mounted::Fuser(session)
    };
    info!(
        "mounted {} images on {} ({}, {} threads, {aio} I/O, direct_io {:?}{})",
        ns.listing().len(),
        mountpoint.display(),
        if own {
            "own transport".to_string()
        } else {
            format!("{:?}", args.dispatch)
        },
        args.threads,
        direct_io,
        if opts.readonly { ", read-only" } else { "" }
    );

    raise_readahead(mountpoint);

    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("asiffs-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigs holds the blocked set.
            if unsafe { libc::sigwait(&sigs, &mut sig) } != 0 {
                continue;
            }
            info!("signal {sig}: unmounting {}", mp.display());
            if let Err(e) = unmount(&mp, false) {
                warn!("unmount {}: {e}; detaching lazily", mp.display());
                let _ = unmount(&mp, true);
            }
        })
        .map_err(|e| io_err("signal thread", e))?;

    let log = args.log.clone();
    let tell_ready = move || {
        if let Some(wr) = ready {
            detach_stdio(log.as_deref());
            let _ = std::fs::File::from(wr).write_all(b"OK\n");
        }
    };
    let r = match mounted {
        Mounted::Fuser(session) => {
            tell_ready();
            session.run()
        }
        Mounted::Own(m) => {
            let plan = kernel::Plan {
                ring: opts.uring != UringMode::Off,
                require_ring: opts.uring == UringMode::On,
                passthrough: opts.passthrough,
                access: match opts.acl {
                    SessionACL::Owner => kernel::Access::Owner,
                    SessionACL::RootAndOwner => kernel::Access::RootAndOwner,
                    SessionACL::All => kernel::Access::All,
                },
                ring_io: args.aio == Aio::Uring,
            };
            let pool = pool.clone().expect("the own transport has a pool");
            let r = kernel::serve(m, vol.clone(), pool, plan, |_| tell_ready());
            if r.is_err() {
                // Nothing serves the mount any more: take it away.
                let _ = unmount(mountpoint, true);
            }
            r.map(|_| ())
        }
    };
    if let Some(p) = &pool {
        p.shutdown();
    }
    let mut failed = false;
    for n in ns.all() {
        if n.disk.is_writable() {
            if let Err(e) = n.disk.flush() {
                error!("{}: final flush failed: {e}", n.path().display());
                failed = true;
            }
        }
    }
    match r {
        Ok(()) => info!("unmounted {}; images flushed", mountpoint.display()),
        Err(e) => {
            error!("session on {} ended: {e}", mountpoint.display());
            failed = true;
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// The two transports: fuser's over `/dev/fuse`, or asiffs' own (which
/// speaks FUSE over io_uring).
enum Mounted {
    Fuser(Session<AsifFs>),
    Own(kernel::Mounted),
}

/// Whether the mount uses asiffs' own transport (FUSE over io_uring):
/// `uring=on` insists (an error names why it cannot), `auto` takes it
/// when it can and logs why not.
fn own_transport(mode: UringMode, options: &[MountOption]) -> Result<bool> {
    let why_not = kernel::unusable(options).or_else(|| kernel::uring_available().err());
    match (mode, why_not) {
        (UringMode::Off, _) => Ok(false),
        (_, None) => Ok(true),
        (UringMode::On, Some(why)) => Err(Error::Invalid(format!(
            "-o uring=on: FUSE over io_uring unavailable: {why}"
        ))),
        (UringMode::Auto, Some(why)) => {
            info!("FUSE over io_uring not used: {why}");
            Ok(false)
        }
    }
}

/// The kernel caps FUSE readahead at its 128 KiB default whatever INIT asks;
/// root may raise it through sysfs, which doubles buffered sequential reads.
/// The device number comes from mountinfo: a stat of the mountpoint would
/// wait on this very server, which does not serve yet.
fn raise_readahead(mountpoint: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let want = mountinfo_escape(mountpoint);
    let Some(dev) = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4].as_bytes() == want.as_slice()).then(|| f[2].to_string())
    }) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    let kb = ops::MAX_WRITE / 1024;
    match std::fs::write(&knob, format!("{kb}\n")) {
        Ok(()) => debug!("{knob} = {kb}"),
        Err(e) => debug!("cannot raise readahead ({knob}): {e}"),
    }
}

/// A path as /proc/self/mountinfo spells it (space, tab, newline, backslash in octal).
fn mountinfo_escape(p: &Path) -> Vec<u8> {
    let mut s = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => s.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            _ => s.push(b),
        }
    }
    s
}

/// Points stdin/stdout at /dev/null and stderr (the log) at `log` or /dev/null.
pub(crate) fn detach_stdio(log: Option<&Path>) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let err = match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .or_else(|e| {
                warn!("log file {}: {e}", p.display());
                std::fs::OpenOptions::new().write(true).open("/dev/null")
            }),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
    };
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors from files open here.
    unsafe {
        if let Ok(n) = &null {
            libc::dup2(n.as_raw_fd(), 0);
            libc::dup2(n.as_raw_fd(), 1);
        }
        if let Ok(e) = &err {
            libc::dup2(e.as_raw_fd(), 2);
        }
        libc::chdir(c"/".as_ptr());
    }
}

/// Unmounts directly (root), else through fusermount3.
pub(crate) fn unmount(mp: &Path, lazy: bool) -> io::Result<()> {
    let c = CString::new(mp.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let st = cmd.arg("--").arg(mp).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("fusermount3 -u failed ({st})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = parse_options(
            &["ro,allow_other".into(), "noatime".into()],
            Path::new("/s"),
        )
        .unwrap();
        assert!(o.readonly);
        assert_eq!(o.acl, SessionACL::All);
        assert!(o.mount.contains(&MountOption::RO));
        assert!(o.mount.contains(&MountOption::NoAtime));
        assert!(o.mount.contains(&MountOption::DefaultPermissions));
        let o = parse_options(&["ro,rw".into()], Path::new("/s")).unwrap();
        assert!(!o.readonly);
        assert!(!o.mount.contains(&MountOption::RO));
        assert!(parse_options(&["auto_unmount".into()], Path::new("/s")).is_err());
        let o = parse_options(&["direct_io,max_read=131072".into()], Path::new("/s")).unwrap();
        assert_eq!(o.direct_io, Some(DirectIo::Always));
        assert!(o
            .mount
            .contains(&MountOption::CUSTOM("max_read=131072".into())));
        let cache = |s: &str| parse_options(&[s.into()], Path::new("/s")).map(|o| o.cache);
        assert_eq!(cache("rw").unwrap(), crate::CacheMode::None);
        assert_eq!(
            cache("cache=writeback").unwrap(),
            crate::CacheMode::Writeback
        );
        assert_eq!(cache("cache=none").unwrap(), crate::CacheMode::None);
        assert_eq!(
            cache("cache=none,cache=writeback").unwrap(),
            crate::CacheMode::Writeback
        );
        assert_eq!(
            cache("cache=unsafe").unwrap_err().to_string(),
            "bad mount option \"cache=unsafe\": cache= takes none or writeback"
        );
    }

    /// What an fstab line hands over beside the file system's own options
    /// leaves the mount exactly as without it.
    #[test]
    fn fstab_options_are_ignored() {
        let plain = parse_options(&["rw,cache=none".into()], Path::new("/s")).unwrap();
        let fstab = parse_options(
            &[
                "defaults,rw,auto,noauto,nofail,_netdev,user,users,nouser,owner,group,\
               x-systemd.automount,X-mount.mkdir,comment=systemd.x,cache=none"
                    .into(),
            ],
            Path::new("/s"),
        )
        .unwrap();
        assert_eq!(fstab.mount, plain.mount);
        assert_eq!(fstab.cache, crate::CacheMode::None);
        assert_eq!((fstab.readonly, fstab.acl), (false, SessionACL::Owner));
    }
}

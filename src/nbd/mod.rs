//! `asiffs serve`: the images of a directory (or one image) as NBD exports.
//!
//! - [`proto`]: the wire format, pure encode/decode;
//! - [`server`]: listeners and per-client sessions over the [`Disk`] trait;
//! - [`room`]: the one bound on write payload bytes held across clients;
//! - [`tls`]: rustls configuration for `NBD_OPT_STARTTLS`.
//!
//! Each image is opened once (writable with an exclusive lock, or with
//! `-r` read-only with a shared lock, as the mount does) and that one
//! [`Disk`] serves all its clients. An image that fails to open is skipped
//! with a logged reason; the others are served.

pub mod jobs;
pub mod proto;
pub mod room;
pub mod server;
pub mod tls;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::disk::Disk;
use crate::registry;
use crate::{CacheMode, Error, LockMode, OpenOptions, Result};
use server::{Config, Export, Server};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("endpoint").required(true).args(["socket", "listen"])))]
pub struct ServeArgs {
    /// A directory of images, or one image.
    pub source: PathBuf,
    /// Listen on this Unix socket (nbd+unix:///NAME?socket=PATH).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP: PORT (on 127.0.0.1) or HOST:PORT; port 0 picks one.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve only this image (its export name or file name).
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Serve read-only (shared lock; writes get EPERM).
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Host page cache for guest data: none opens it with O_DIRECT (as QEMU's cache.direct=on).
    #[arg(long, value_name = "none|writeback", default_value = "none", value_parser = parse_cache)]
    pub cache: CacheMode,
    /// Stay in the foreground instead of returning once the server is ready.
    #[arg(short, long)]
    pub foreground: bool,
    /// Server certificate chain (PEM); turns TLS on and makes it mandatory.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to; clients without one are refused.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Allow listening on a non-loopback address without TLS.
    #[arg(long)]
    pub insecure: bool,
    /// Seconds a client may take for the handshake; a write payload gets
    /// as long plus one second per MiB.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub handshake_timeout: u64,
    /// MiB of write payloads held across all clients at once (at least
    /// 32); a client past it waits for room.
    #[arg(long, value_name = "MIB", default_value_t = server::DEFAULT_PAYLOAD_MEMORY >> 20)]
    pub max_payload_memory: u64,
    /// Clients served at once.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections: usize,
    /// How container I/O is issued: uring submits a plain session's
    /// reads and writes to an io_uring of its own; threads does each on
    /// a worker thread (also where io_uring is unavailable).
    #[arg(long, value_enum, default_value_t = crate::fs::Aio::Uring)]
    pub aio: crate::fs::Aio,
    /// Write the server's process id here (removed on exit).
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Once detached, append log lines to FILE (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Options, comma separated: password-file=PATH unlocks the encrypted
    /// images (the form fstab-like configurations use).
    #[arg(short = 'o', value_name = "OPTS", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// The password of the encrypted images.
    #[command(flatten)]
    pub password: crate::password::PasswordArgs,
}

/// `-o` of serve: only `password-file=PATH` means something here.
fn password_file_option(options: &[String]) -> Result<Option<PathBuf>> {
    let mut file = None;
    for o in options.iter().flat_map(|s| s.split(',')).map(str::trim) {
        match o.strip_prefix("password-file=") {
            Some(p) => file = Some(PathBuf::from(p)),
            None if o.is_empty() => {}
            None => {
                return Err(Error::Invalid(format!(
                    "bad serve option {o:?}: -o takes password-file=PATH"
                )))
            }
        }
    }
    Ok(file)
}

/// A buffer is often allocated by one thread (a worker, a reader) and
/// freed by another (the sender): with an arena per thread, every arena
/// kept megabytes of freed 1 MiB buffers, and 1 MiB sequential reads took
/// the server to 71 MiB resident; with two arenas, 44 MiB at the same
/// speed. Called before any thread exists.
fn few_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn parse_cache(s: &str) -> std::result::Result<CacheMode, String> {
    match s {
        "none" => Ok(CacheMode::None),
        "writeback" => Ok(CacheMode::Writeback),
        _ => Err("takes none or writeback".into()),
    }
}

fn io_err(context: impl Into<String>, e: io::Error) -> Error {
    Error::io(context, e)
}

/// The TCP addresses of `--listen`: PORT alone means loopback.
fn listen_addrs(spec: &str) -> Result<Vec<SocketAddr>> {
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]);
    }
    let addrs: Vec<SocketAddr> = spec
        .to_socket_addrs()
        .map_err(|e| Error::Invalid(format!("--listen {spec}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Invalid(format!("--listen {spec}: no address")));
    }
    Ok(addrs)
}

fn has_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| registry::IMAGE_EXTENSIONS.contains(&e))
}

/// What `path` is when it is neither a regular file nor a directory.
fn special_kind(path: &Path) -> Option<&'static str> {
    let md = std::fs::metadata(path).ok()?;
    (!md.is_file() && !md.is_dir()).then(|| registry::file_kind(&md))
}

/// Export names for the images of `source`: the file name without its
/// extension, or the whole file name where two images would share one.
fn find_images(source: &Path, only: Option<&str>) -> Result<Vec<(String, PathBuf)>> {
    let md = std::fs::metadata(source).map_err(|e| io_err(source.display().to_string(), e))?;
    let mut found: Vec<(String, String, PathBuf)> = Vec::new(); // (stem, file name, path)
    let mut add = |path: PathBuf| {
        let (Some(stem), Some(file)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.file_name().and_then(|s| s.to_str()),
        ) else {
            warn!("{}: skipped: the name is not UTF-8", path.display());
            return;
        };
        found.push((stem.to_string(), file.to_string(), path.clone()));
    };
    if md.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(source)
            .map_err(|e| io_err(source.display().to_string(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            match registry::probe(&path) {
                Ok(Some(_)) => add(path),
                // Named as an image but not a file the probe can read: say so,
                // as for every other skipped image.
                Ok(None) if has_image_name(&path) => {
                    if let Some(kind) = special_kind(&path) {
                        warn!("{}: skipped: {kind}, not a regular file", path.display());
                    }
                }
                Ok(None) => {}
                Err(e) => warn!("{}: skipped: {e}", path.display()),
            }
        }
    } else {
        add(source.to_path_buf());
    }
    let mut stems: BTreeMap<String, usize> = BTreeMap::new();
    for (stem, _, _) in &found {
        *stems.entry(stem.clone()).or_default() += 1;
    }
    let mut images: Vec<(String, PathBuf)> = found
        .into_iter()
        .map(|(stem, file, path)| {
            let name = if stems[&stem] > 1 { file } else { stem };
            (name, path)
        })
        .collect();
    if let Some(only) = only {
        images.retain(|(name, path)| {
            name == only || path.file_name().and_then(|f| f.to_str()) == Some(only)
        });
        if images.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no image named {only:?}",
                source.display()
            )));
        }
    }
    if images.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no image asiffs can serve",
            source.display()
        )));
    }
    Ok(images)
}

/// Opens every image; those that fail are skipped with a warning, unless
/// none opens.
fn open_exports(
    images: &[(String, PathBuf)],
    read_only: bool,
    cache: CacheMode,
    password: Option<crate::password::Password>,
) -> Result<Vec<Export>> {
    let base = if read_only {
        OpenOptions {
            lock: LockMode::Shared,
            ..OpenOptions::default()
        }
    } else {
        OpenOptions::writable()
    };
    let opts = OpenOptions {
        cache,
        password,
        ..base
    };
    let mut exports = Vec::new();
    let mut last_err = None;
    for (name, path) in images {
        match registry::open(path, None, &opts) {
            Ok(d) => {
                let disk: Arc<dyn Disk> = Arc::from(d);
                let ro = read_only || !disk.is_writable();
                if !read_only {
                    let why = disk.write_refusal();
                    if let Some(why) = why.or_else(|| registry::encryption_refusal(path, &*disk)) {
                        warn!("{}: served read-only: {why}", path.display());
                    }
                }
                exports.push(Export {
                    name: name.clone(),
                    disk,
                    read_only: ro,
                });
            }
            Err(e) => {
                warn!("{}: skipped: {e}", path.display());
                last_err = Some(e);
            }
        }
    }
    if exports.is_empty() {
        return Err(match (images.len(), last_err) {
            (1, Some(e)) => e,
            _ => Error::Invalid("no image could be opened".into()),
        });
    }
    Ok(exports)
}

/// Where the server listens, bound and ready.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn describe(&self) -> String {
        match self {
            Listener::Unix(_, p) => p.display().to_string(),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
        }
    }
}

/// Binds a Unix socket, replacing a stale one but never a live one.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a socket",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Invalid(format!(
                "{}: another server is listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| io_err(path.display().to_string(), e))?;
    }
    UnixListener::bind(path).map_err(|e| io_err(format!("binding {}", path.display()), e))
}

/// `asiffs serve SOURCE (--socket PATH | --listen HOST:PORT)`.
pub fn cmd_serve(a: &ServeArgs) -> Result<i32> {
    few_malloc_arenas();
    let source = a
        .source
        .canonicalize()
        .map_err(|e| io_err(format!("source {}", a.source.display()), e))?;
    let tcp = match &a.listen {
        Some(spec) => {
            let addrs = listen_addrs(spec)?;
            if a.tls_cert.is_none() && !a.insecure && !addrs.iter().all(|x| x.ip().is_loopback()) {
                return Err(Error::Invalid(format!(
                    "--listen {spec} is not a loopback address: use TLS (--tls-cert/--tls-key) or say --insecure"
                )));
            }
            Some(addrs)
        }
        None => None,
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(tls::server_config(c, k, a.tls_ca.as_deref())?),
        _ => None,
    };
    let password = crate::password::for_source(
        &a.password,
        password_file_option(&a.options)?.as_deref(),
        &source,
    )?;
    if a.handshake_timeout == 0 {
        return Err(Error::Invalid(
            "--handshake-timeout must be at least 1".into(),
        ));
    }
    if a.max_connections == 0 {
        return Err(Error::Invalid(
            "--max-connections must be at least 1".into(),
        ));
    }
    let min_room = u64::from(server::MAX_PAYLOAD) >> 20;
    if a.max_payload_memory < min_room {
        return Err(Error::Invalid(format!(
            "--max-payload-memory must be at least {min_room} (MiB): one write payload"
        )));
    }
    let images = find_images(&source, a.export.as_deref())?;
    let config = Config {
        tls,
        handshake_timeout: Duration::from_secs(a.handshake_timeout),
        max_connections: a.max_connections,
        max_payload_memory: a.max_payload_memory.saturating_mul(1 << 20),
        ring: a.aio == crate::fs::Aio::Uring,
    };
    let socket = match &a.socket {
        Some(p) => Some(std::path::absolute(p).map_err(|e| io_err(p.display().to_string(), e))?),
        None => None,
    };
    if a.foreground {
        return run(a, &images, config, password, socket, tcp, None);
    }
    // As `mount`: fork before any thread exists; the child says when it is ready.
    match crate::fs::fork_daemon()? {
        crate::fs::Forked::Parent { message, pid } => {
            if let Some(line) = message.strip_prefix("OK ") {
                print!("{line}");
                return Ok(0);
            }
            Ok(crate::fs::failed_child_status(pid))
        }
        crate::fs::Forked::Child(wr) => run(a, &images, config, password, socket, tcp, Some(wr)),
    }
}

fn run(
    a: &ServeArgs,
    images: &[(String, PathBuf)],
    config: Config,
    password: Option<crate::password::Password>,
    socket: Option<PathBuf>,
    tcp: Option<Vec<SocketAddr>>,
    ready: Option<OwnedFd>,
) -> Result<i32> {
    let exports = open_exports(images, a.read_only, a.cache, password)?;
    let listener = match (socket, tcp) {
        (Some(p), _) => Listener::Unix(bind_unix(&p)?, p),
        (None, Some(addrs)) => Listener::Tcp(TcpListener::bind(&addrs[..]).map_err(|e| {
            io_err(
                format!("listening on {}", a.listen.as_deref().unwrap_or("")),
                e,
            )
        })?),
        (None, None) => return Err(Error::Invalid("give --socket or --listen".into())),
    };
    let names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
    let server = Server::new(exports, config);
    // Absolute: the daemon changes to / before it removes the file.
    let pid_file = match &a.pid_file {
        Some(p) => Some(std::path::absolute(p).map_err(|e| io_err(p.display().to_string(), e))?),
        None => None,
    };
    if let Some(p) = &pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| io_err(format!("pid file {}", p.display()), e))?;
    }
    let socket_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };

    // Signals are taken by one thread; block them before any thread exists.
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
    let on_signal = Arc::clone(&server);
    let (sp, pf) = (socket_path.clone(), pid_file.clone());
    std::thread::Builder::new()
        .name("asiffs-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigs holds the blocked set.
            if unsafe { libc::sigwait(&sigs, &mut sig) } != 0 {
                continue;
            }
            info!("signal {sig}: flushing and stopping");
            let ok = on_signal.flush_all();
            cleanup(sp.as_deref(), pf.as_deref());
            std::process::exit(if ok { 0 } else { 1 });
        })
        .map_err(|e| io_err("signal thread", e))?;

    let line = format!(
        "serving {} on {}{}\n",
        names.join(", "),
        listener.describe(),
        if a.read_only { " (read-only)" } else { "" }
    );
    info!("{}", line.trim_end());
    match ready {
        Some(wr) => {
            crate::fs::detach_stdio(a.log.as_deref());
            let _ = std::fs::File::from(wr).write_all(format!("OK {line}").as_bytes());
        }
        None => {
            print!("{line}");
            let _ = io::stdout().flush();
        }
    }
    let r = match listener {
        Listener::Unix(l, _) => server.serve_unix(l),
        Listener::Tcp(l) => server.serve_tcp(l),
    };
    let ok = server.flush_all();
    cleanup(socket_path.as_deref(), pid_file.as_deref());
    if let Err(e) = r {
        error!("listener failed: {e}");
        return Err(io_err("accepting clients", e));
    }
    Ok(if ok { 0 } else { 1 })
}

fn cleanup(socket: Option<&Path>, pid_file: Option<&Path>) {
    for p in [socket, pid_file].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_spec() {
        assert_eq!(
            listen_addrs("10809").unwrap(),
            vec!["127.0.0.1:10809".parse().unwrap()]
        );
        assert_eq!(
            listen_addrs("[::1]:7").unwrap(),
            vec!["[::1]:7".parse().unwrap()]
        );
        assert_eq!(
            listen_addrs("0.0.0.0:1").unwrap(),
            vec!["0.0.0.0:1".parse().unwrap()]
        );
        assert!(listen_addrs("nohost").is_err());
    }

    #[test]
    fn cache_option_reaches_the_image() {
        assert_eq!(parse_cache("none"), Ok(CacheMode::None));
        assert_eq!(parse_cache("writeback"), Ok(CacheMode::Writeback));
        assert_eq!(parse_cache("direct"), Err("takes none or writeback".into()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.asif");
        let opts = crate::CreateOptions {
            size: 1 << 20,
            ..Default::default()
        };
        crate::Image::create(&path, &opts).unwrap();
        let images = vec![("a".to_string(), path)];
        for (mode, want) in [
            (CacheMode::None, "none"),
            (CacheMode::Writeback, "writeback"),
        ] {
            let exports = open_exports(&images, false, mode, None).unwrap();
            assert_eq!(exports[0].disk.stats()["cache"], want);
        }
    }
}

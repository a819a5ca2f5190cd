//! `convert -O qcow2|vmdk|vhdx`: qemu-img writes the output. A source
//! asiffs opens itself is served read-only over NBD, in this process, on a
//! private unix socket; qemu-img asks for block status, so holes are never
//! read or written. Raw and qemu-format sources are handed to it directly.

use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::convert::{ConvertArgs, Source};
use crate::error::{Error, Result};
use crate::nbd::server::{Config, Export, Server, Sock};

/// The export's name in the NBD URI.
const EXPORT: &str = "source";

/// A private directory holding the socket, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `to` (replacing it) as `fmt` from `src`.
pub fn convert(a: &ConvertArgs, src: &Source, fmt: &str, to: &Path) -> Result<()> {
    let abs = |p: &Path| std::path::absolute(p).map_err(|e| Error::io(p.display().to_string(), e));
    match src {
        Source::Disk(d) => {
            let dir = std::env::temp_dir().join(format!("asiffs-out-{}", uuid::Uuid::new_v4()));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(dir.display().to_string(), e))?;
            let dir = TempDir(dir);
            let socket = dir.0.join("s");
            let listener = UnixListener::bind(&socket)
                .map_err(|e| Error::io(socket.display().to_string(), e))?;
            let server = Server::new(
                vec![Export {
                    name: EXPORT.into(),
                    disk: Arc::clone(d),
                    read_only: true,
                }],
                Config::default(),
            );
            let stop = Arc::new(AtomicBool::new(false));
            let accept = {
                let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
                std::thread::spawn(move || {
                    for s in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(s) = s else { continue };
                        let server = Arc::clone(&server);
                        std::thread::spawn(move || server.session(Sock::Unix(s)));
                    }
                })
            };
            let uri = format!("nbd+unix:///{EXPORT}?socket={}", socket.display());
            let r = qemu_img(&[&uri], "raw", fmt, to);
            stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so that it sees `stop`.
            let _ = UnixStream::connect(&socket);
            let _ = accept.join();
            r
        }
        Source::Raw(..) => qemu_img(&[&abs(&a.src)?.display().to_string()], "raw", fmt, to),
        Source::Qemu(q) => qemu_img(&[&q.path.display().to_string()], &q.format, fmt, to),
    }
}

/// Runs `qemu-img convert`; its progress (-p) goes straight to a terminal.
fn qemu_img(input: &[&str], in_fmt: &str, fmt: &str, to: &Path) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let mut c = Command::new("qemu-img");
    c.arg("convert");
    if tty {
        c.arg("-p");
    }
    c.args(["-f", in_fmt]).args(input).args(["-O", fmt]).arg(to);
    c.stdin(Stdio::null()).stderr(Stdio::piped());
    if !tty {
        c.stdout(Stdio::null());
    }
    let out = c.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Invalid(format!(
            "writing {fmt} needs qemu-img, which is not installed (install qemu-utils)"
        )),
        _ => Error::io("running qemu-img", e),
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Invalid(format!(
            "qemu-img convert: {}",
            msg.lines().last().unwrap_or("failed").trim()
        )));
    }
    // qemu-img does not sync its output.
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(to.display().to_string(), e))
}

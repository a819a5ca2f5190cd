//! The NBD server: listeners, and one thread per client session.
//!
//! Invariants:
//! - every client of an image shares that image's one `Arc<dyn Disk>`, so a
//!   flush (or FUA) on any connection covers the writes of all of them,
//!   which is what `NBD_FLAG_CAN_MULTI_CONN` promises;
//! - a plain session answers up to `WORKERS` requests at once, plus the
//!   reads and writes its io_uring carries, each reply whole and
//!   contiguous, in completion order (TLS sessions: one at a time);
//!   replies that complete together share one `writev`, but none waits for
//!   another to complete; a request's reply is sent only after the disk
//!   call returned (and, with FUA, after the flush), so an acknowledged
//!   flush survives the client vanishing; a flush covers every write
//!   completed before it;
//! - the ring's thread never waits on a client: what the socket does not
//!   take at once goes to the session's sender thread, so a client that
//!   stops reading holds no lock of the image;
//! - on `NBD_CMD_DISC` every request already read is answered before close;
//! - hostile input never panics: sizes are checked before any allocation
//!   (options over [`MAX_OPTION_LEN`], payloads over [`MAX_PAYLOAD`]), bad
//!   magic or a broken handshake closes only that connection, and a peer
//!   that takes too long over the handshake or a write payload (see
//!   [`payload_time`]) is dropped;
//! - write payloads are read piece by piece into room taken from one
//!   [`Room`] for the whole server, so what clients announce costs nothing
//!   until they send it, and all payloads together never hold more than
//!   [`Config::max_payload_memory`].

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use tracing::{debug, info, warn};

use super::jobs::Jobs;
use super::proto::*;
use super::room::{Room, PIECE};
use crate::disk::Disk;
use crate::host::uring::{ReadBuf, ReadDone, Ring, WriteDone};
use crate::Error;

/// Longest option data accepted; longer options are answered with
/// `NBD_REP_ERR_TOO_BIG` and the connection is closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest read or write payload, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised to clients.
const PREFERRED_BLOCK: u32 = 4096;
/// Most `base:allocation` descriptors in one reply.
const MAX_EXTENTS: usize = 4096;
/// Holes shorter than this inside a read are sent as data, not as a chunk
/// of their own.
const MIN_HOLE_CHUNK: u64 = 4096;
/// The id of `base:allocation` once selected.
const CONTEXT_ID: u32 = 1;
/// What the server offers in the handshake flags.
const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
/// A client that stops reading replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`Config::max_payload_memory`]: two payloads of the largest
/// size.
pub const DEFAULT_PAYLOAD_MEMORY: u64 = 2 * MAX_PAYLOAD as u64;
/// Slowest rate a write payload may arrive at, on top of the handshake
/// timeout: a 32 MiB payload gets the timeout plus 32 s.
pub const MIN_PAYLOAD_RATE: u64 = 1024 * 1024;

/// How long a client has to send a whole write payload of `len` bytes,
/// not counting time the server spent waiting for room.
pub fn payload_time(timeout: Duration, len: u64) -> Duration {
    timeout + Duration::from_secs_f64(len as f64 / MIN_PAYLOAD_RATE as f64)
}

/// One served image.
pub struct Export {
    pub name: String,
    pub disk: Arc<dyn Disk>,
    pub read_only: bool,
}

/// How the server treats its clients.
#[derive(Clone)]
pub struct Config {
    /// With TLS, every option but `STARTTLS` and `ABORT` is refused until
    /// the client has started TLS (the spec's FORCEDTLS mode).
    pub tls: Option<Arc<ServerConfig>>,
    /// Time a client may take for the whole handshake, and (with
    /// [`payload_time`]) for each write payload.
    pub handshake_timeout: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Write payload bytes held across all connections at once; at least
    /// [`MAX_PAYLOAD`]. A client past it waits for room.
    pub max_payload_memory: u64,
    /// Plain sessions submit the reads and writes the disk translates to
    /// an io_uring of their own (`--aio uring`), instead of a worker each.
    pub ring: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tls: None,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_payload_memory: DEFAULT_PAYLOAD_MEMORY,
            ring: true,
        }
    }
}

pub struct Server {
    exports: BTreeMap<String, Arc<Export>>,
    config: Config,
    active: AtomicUsize,
    /// Room for the write payloads of every connection.
    room: Room,
}

/// A connected client socket.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn peer(&self) -> String {
        match self {
            Sock::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp peer".into()),
            Sock::Unix(_) => "unix peer".into(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    /// One `writev` for several replies.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket whose reads can share one deadline: each read waits only for
/// what is left of it, so trickling bytes cannot stretch it (TLS reads the
/// socket many times per record, hence the deadline lives down here).
struct Timed {
    sock: Sock,
    deadline: Option<Instant>,
    /// The socket has a read timeout set (one syscall saved per payload
    /// read from the buffer alone).
    armed: bool,
}

impl Timed {
    fn new(sock: Sock) -> Timed {
        Timed {
            sock,
            deadline: None,
            armed: false,
        }
    }

    /// Sets or clears the deadline; clearing leaves reads without a timeout.
    fn set_deadline(&mut self, d: Option<Instant>) -> io::Result<()> {
        self.deadline = d;
        if d.is_none() && self.armed {
            self.sock.set_read_timeout(None)?;
            self.armed = false;
        }
        Ok(())
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.sock.set_read_timeout(Some(left))?;
            self.armed = true;
        }
        self.sock.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    /// rustls hands over every TLS record it has queued (a reply over
    /// 16 KiB is several) at once: one `writev` instead of one write each.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.sock.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The byte stream of a session: the socket, or TLS over it after STARTTLS.
enum Conn {
    Plain(Timed),
    Tls(Box<StreamOwned<ServerConnection, Timed>>),
    /// Only while switching to TLS.
    Gone,
}

impl Conn {
    fn sock(&self) -> Option<&Sock> {
        match self {
            Conn::Plain(s) => Some(&s.sock),
            Conn::Tls(t) => Some(&t.sock.sock),
            Conn::Gone => None,
        }
    }

    fn timed(&mut self) -> Option<&mut Timed> {
        match self {
            Conn::Plain(s) => Some(s),
            Conn::Tls(t) => Some(&mut t.sock),
            Conn::Gone => None,
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.sock() {
            Some(s) => s.set_read_timeout(t),
            None => Ok(()),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
            Conn::Gone => Err(gone()),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
            Conn::Gone => Err(gone()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
            Conn::Gone => Err(gone()),
        }
    }
}

/// Why a session ended early: logged, never sent.
#[derive(Debug)]
struct Stop(String);

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop(e.to_string())
    }
}

type Step<T> = std::result::Result<T, Stop>;

/// The NBD error value for a disk error.
fn errno_of(e: &Error) -> u32 {
    match e {
        Error::OutOfRange { .. } | Error::Invalid(_) => EINVAL,
        Error::ReadOnly | Error::WritesRefused { .. } => EPERM,
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            _ => EIO,
        },
        _ => EIO,
    }
}

impl Server {
    pub fn new(exports: Vec<Export>, config: Config) -> Arc<Server> {
        Arc::new(Server {
            exports: exports
                .into_iter()
                .map(|e| (e.name.clone(), Arc::new(e)))
                .collect(),
            room: Room::new(config.max_payload_memory.max(MAX_PAYLOAD.into())),
            config,
            active: AtomicUsize::new(0),
        })
    }

    /// Write payload bytes held right now, across all connections.
    pub fn payload_bytes_held(&self) -> u64 {
        self.room.used()
    }

    pub fn exports(&self) -> impl Iterator<Item = &Export> {
        self.exports.values().map(|e| &**e)
    }

    /// The export a client names; the empty name is the default export
    /// when there is exactly one.
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.values().next().cloned();
        }
        self.exports.get(name).cloned()
    }

    /// Flushes every writable export; false if any flush failed.
    pub fn flush_all(&self) -> bool {
        let mut ok = true;
        for e in self.exports.values().filter(|e| !e.read_only) {
            if let Err(err) = e.disk.flush() {
                tracing::error!("{}: flush failed: {err}", e.name);
                ok = false;
            }
        }
        ok
    }

    /// Accepts clients forever.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((s, _)) => self.spawn(Sock::Unix(s)),
                Err(e) => accept_failed(e)?,
            }
        }
    }

    /// Accepts clients forever.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    keepalive(&s);
                    self.spawn(Sock::Tcp(s))
                }
                Err(e) => accept_failed(e)?,
            }
        }
    }

    fn spawn(self: &Arc<Self>, sock: Sock) {
        let n = self.active.fetch_add(1, Ordering::SeqCst);
        if n >= self.config.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            warn!("{}: refused: already {n} connections", sock.peer());
            sock.shutdown();
            return;
        }
        let server = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("asiffs-nbd".into())
            .spawn(move || {
                server.session(sock);
                server.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a session thread: {e}");
        }
    }

    /// Serves one client until it leaves; never panics on its input.
    pub fn session(&self, sock: Sock) {
        let peer = sock.peer();
        let _ = sock.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut s = Session {
            server: self,
            conn: Conn::Plain(Timed::new(sock)),
            no_zeroes: false,
            structured: false,
            tls: false,
            meta: None,
            deadline: Instant::now() + self.config.handshake_timeout,
        };
        debug!("{peer}: connected");
        let r = match s.handshake() {
            Ok(Some(export)) => s.transmission(&export),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => debug!("{peer}: disconnected"),
            Err(Stop(why)) => info!("{peer}: connection closed: {why}"),
        }
        if let Conn::Tls(t) = &mut s.conn {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        if let Some(sock) = s.conn.sock() {
            sock.shutdown();
        }
    }
}

fn accept_failed(e: io::Error) -> io::Result<()> {
    match e.raw_os_error() {
        // Out of descriptors or memory, or a client that left before we
        // took it: wait a little rather than spin or give up.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            warn!("accept: {e}");
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        }
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => Ok(()),
        _ => Err(e),
    }
}

/// TCP keepalive, so a peer that vanished without a word (cable, crash)
/// frees its session within minutes rather than hours.
fn keepalive(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ] {
        let v: libc::c_int = value;
        // SAFETY: fd is an open socket borrowed from `s`; the option value
        // is a c_int whose size is passed along.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

struct Session<'a> {
    server: &'a Server,
    conn: Conn,
    no_zeroes: bool,
    structured: bool,
    tls: bool,
    /// The export `base:allocation` was selected for.
    meta: Option<String>,
    /// When the whole handshake must be over.
    deadline: Instant,
}

impl Session<'_> {
    fn send(&mut self, bytes: &[u8]) -> Step<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()?;
        Ok(())
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Step<()> {
        self.send(&option_reply(option, reply, data))
    }

    fn reply_err(&mut self, option: u32, reply: u32, message: &str) -> Step<()> {
        self.reply(option, reply, message.as_bytes())
    }

    /// What is left of the handshake's time.
    fn time_left(&self) -> Step<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Stop("the handshake took too long".into()));
        }
        Ok(left)
    }

    /// Reads during the handshake: all of it must arrive before the
    /// deadline, however slowly the bytes trickle in.
    fn recv(&mut self, buf: &mut [u8]) -> Step<()> {
        let mut got = 0;
        while got < buf.len() {
            self.conn.set_read_timeout(Some(self.time_left()?))?;
            match self.conn.read(&mut buf[got..]) {
                Ok(0) => return Err(Stop("the client left during the handshake".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Option haggling; `Some(export)` enters transmission, `None` ends
    /// the session cleanly (`NBD_OPT_ABORT`).
    fn handshake(&mut self) -> Step<Option<Arc<Export>>> {
        self.send(&greeting(HANDSHAKE_FLAGS))?;
        let mut cf = [0u8; 4];
        self.recv(&mut cf)?;
        let flags = decode_client_flags(cf, HANDSHAKE_FLAGS).map_err(|e| Stop(e.to_string()))?;
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 && self.server.config.tls.is_some() {
            return Err(Stop(
                "TLS is required and the client is not fixed newstyle".into(),
            ));
        }
        loop {
            let mut hb = [0u8; OPTION_HEADER_LEN];
            self.recv(&mut hb)?;
            let h = OptionHeader::decode(&hb).map_err(|e| Stop(format!("option: {e}")))?;
            if h.len > MAX_OPTION_LEN {
                if h.option != OPT_EXPORT_NAME {
                    let msg = format!("option data of {} bytes is over the limit", h.len);
                    let _ = self.reply_err(h.option, REP_ERR_TOO_BIG, &msg);
                }
                return Err(Stop(format!(
                    "option {} with {} bytes of data",
                    h.option, h.len
                )));
            }
            let mut data = vec![0u8; h.len as usize];
            self.recv(&mut data)?;
            match self.option(h.option, &data)? {
                Haggle::More => {}
                Haggle::Go(e) => return Ok(Some(e)),
                Haggle::Abort => return Ok(None),
            }
        }
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Step<Haggle> {
        if self.server.config.tls.is_some() && !self.tls && opt != OPT_STARTTLS && opt != OPT_ABORT
        {
            if opt == OPT_EXPORT_NAME {
                return Err(Stop("NBD_OPT_EXPORT_NAME before TLS".into()));
            }
            self.reply_err(
                opt,
                REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            )?;
            return Ok(Haggle::More);
        }
        match opt {
            OPT_EXPORT_NAME => {
                let name =
                    decode_export_name(data).map_err(|e| Stop(format!("export name: {e}")))?;
                // This option cannot fail politely: an unknown name ends the session.
                let e = self
                    .server
                    .lookup(&name)
                    .ok_or_else(|| Stop(format!("no export named {name:?}")))?;
                let flags = self.transmission_flags(&e);
                let r = export_name_reply(e.disk.size(), flags, self.no_zeroes);
                self.send(&r)?;
                Ok(Haggle::Go(e))
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = self.reply(opt, REP_ACK, &[]);
                Ok(Haggle::Abort)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_err(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    return Ok(Haggle::More);
                }
                let names: Vec<String> = self.server.exports.keys().cloned().collect();
                for n in names {
                    self.reply(opt, REP_SERVER, &rep_server(&n))?;
                }
                self.reply(opt, REP_ACK, &[])?;
                Ok(Haggle::More)
            }
            OPT_STARTTLS => self.starttls(data),
            OPT_INFO | OPT_GO => self.info(opt, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_err(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else if self.structured {
                    self.reply_err(opt, REP_ERR_INVALID, "structured replies are already on")?;
                } else {
                    self.structured = true;
                    self.reply(opt, REP_ACK, &[])?;
                }
                Ok(Haggle::More)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, data),
            _ => {
                self.reply_err(
                    opt,
                    REP_ERR_UNSUP,
                    &format!("option {opt} is not supported"),
                )?;
                Ok(Haggle::More)
            }
        }
    }

    fn starttls(&mut self, data: &[u8]) -> Step<Haggle> {
        let opt = OPT_STARTTLS;
        let Some(cfg) = self.server.config.tls.clone() else {
            self.reply_err(opt, REP_ERR_POLICY, "this server has no TLS configured")?;
            return Ok(Haggle::More);
        };
        if self.tls {
            self.reply_err(opt, REP_ERR_INVALID, "TLS is already on")?;
            return Ok(Haggle::More);
        }
        if !data.is_empty() {
            self.reply_err(opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
            return Ok(Haggle::More);
        }
        self.reply(opt, REP_ACK, &[])?;
        let Conn::Plain(sock) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Err(Stop("STARTTLS on a TLS stream".into()));
        };
        let tls = ServerConnection::new(cfg).map_err(|e| Stop(format!("TLS: {e}")))?;
        let mut stream = StreamOwned::new(tls, sock);
        while stream.conn.is_handshaking() {
            stream.sock.sock.set_read_timeout(Some(self.time_left()?))?;
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| Stop(format!("TLS handshake: {e}")))?;
        }
        self.conn = Conn::Tls(Box::new(stream));
        self.tls = true;
        // Whatever was negotiated in the clear does not carry over.
        self.structured = false;
        self.meta = None;
        Ok(Haggle::More)
    }

    fn info(&mut self, opt: u32, data: &[u8]) -> Step<Haggle> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.reply_err(opt, REP_ERR_INVALID, &format!("bad request: {e}"))?;
                return Ok(Haggle::More);
            }
        };
        let Some(e) = self.server.lookup(&req.name) else {
            self.reply_err(
                opt,
                REP_ERR_UNKNOWN,
                &format!("no export named {:?}", req.name),
            )?;
            return Ok(Haggle::More);
        };
        let flags = self.transmission_flags(&e);
        self.reply(opt, REP_INFO, &info_export(e.disk.size(), flags))?;
        if req.requests.contains(&INFO_NAME) {
            self.reply(opt, REP_INFO, &info_name(&e.name))?;
        }
        if req.requests.contains(&INFO_BLOCK_SIZE) {
            self.reply(
                opt,
                REP_INFO,
                &info_block_size(1, PREFERRED_BLOCK, MAX_PAYLOAD),
            )?;
        }
        self.reply(opt, REP_ACK, &[])?;
        if opt == OPT_INFO {
            return Ok(Haggle::More);
        }
        // Contexts selected for another export do not apply to this one.
        if self.meta.as_deref() != Some(e.name.as_str()) {
            self.meta = None;
        }
        Ok(Haggle::Go(e))
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Step<Haggle> {
        if !self.structured {
            self.reply_err(opt, REP_ERR_INVALID, "negotiate structured replies first")?;
            return Ok(Haggle::More);
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.reply_err(opt, REP_ERR_INVALID, &format!("bad request: {e}"))?;
                return Ok(Haggle::More);
            }
        };
        let Some(e) = self.server.lookup(&req.name) else {
            self.reply_err(
                opt,
                REP_ERR_UNKNOWN,
                &format!("no export named {:?}", req.name),
            )?;
            return Ok(Haggle::More);
        };
        let matched = if opt == OPT_LIST_META_CONTEXT {
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == BASE_ALLOCATION)
        } else {
            req.queries.iter().any(|q| q == BASE_ALLOCATION)
        };
        if matched {
            let id = if opt == OPT_SET_META_CONTEXT {
                CONTEXT_ID
            } else {
                0
            };
            self.reply(opt, REP_META_CONTEXT, &meta_context(id, BASE_ALLOCATION))?;
        }
        if opt == OPT_SET_META_CONTEXT {
            self.meta = matched.then(|| e.name.clone());
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok(Haggle::More)
    }

    fn transmission_flags(&self, e: &Export) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
        if e.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            f |= FLAG_SEND_DF;
        }
        f
    }

    fn transmission(&mut self, export: &Export) -> Step<()> {
        // Idle clients are normal once connected (a VM with a quiet disk).
        self.conn.set_read_timeout(None)?;
        let peer = self.conn.sock().map(Sock::peer).unwrap_or_default();
        let ctx = Ctx {
            export,
            structured: self.structured,
            meta: self.meta.as_deref() == Some(export.name.as_str()),
            room: &self.server.room,
            timeout: self.server.config.handshake_timeout,
            peer: &peer,
            ring: self.server.config.ring,
        };
        match std::mem::replace(&mut self.conn, Conn::Gone) {
            Conn::Plain(sock) => {
                let r = concurrent(&ctx, &sock.sock);
                self.conn = Conn::Plain(sock);
                r
            }
            // A rustls stream cannot be split into a reading and a writing
            // half, so TLS sessions answer one request at a time.
            conn => {
                self.conn = conn;
                self.serial(&ctx)
            }
        }
    }

    fn serial(&mut self, ctx: &Ctx) -> Step<()> {
        let mut out = Vec::new();
        loop {
            let Some(job) = next_request(&mut self.conn, ctx, &mut out, &mut |_| {})? else {
                return Ok(());
            };
            out.clear();
            answer(ctx, &job.req, &job.payload.pieces, &mut out);
            drop(job);
            self.send(&out)?;
        }
    }
}

/// What answering a request needs, fixed once transmission starts.
struct Ctx<'a> {
    export: &'a Export,
    structured: bool,
    /// `base:allocation` was selected for this export.
    meta: bool,
    /// Where write payloads take their memory from.
    room: &'a Room,
    /// The handshake timeout, the base of each payload's deadline.
    timeout: Duration,
    peer: &'a str,
    /// [`Config::ring`].
    ring: bool,
}

/// A write payload in pieces of at most [`PIECE`] bytes, with the room
/// they hold (given back when it is dropped).
struct Payload<'a> {
    pieces: Vec<Vec<u8>>,
    _grant: Option<super::room::Grant<'a>>,
}

/// A request read off the wire, with its write payload.
struct Job<'a> {
    req: Request,
    payload: Payload<'a>,
    /// Bytes of [`BUDGET`] it holds until answered.
    cost: u64,
}

/// Worker threads per plain connection: requests in flight at once.
const WORKERS: usize = 16;
/// Requests read ahead of the workers before the reader waits.
const QUEUED: usize = 32;
/// Payload and read data one plain connection may hold at once; a request
/// over it waits until the others are answered (one alone always runs).
const BUDGET: u64 = 2 * MAX_PAYLOAD as u64;

/// Bytes of [`BUDGET`] in use, and whether the reader waits for some.
struct Budget {
    used: std::sync::Mutex<(u64, bool)>,
    freed: std::sync::Condvar,
}

impl Budget {
    fn new() -> Self {
        Budget {
            used: std::sync::Mutex::new((0, false)),
            freed: std::sync::Condvar::new(),
        }
    }

    fn take(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while used.0 > 0 && used.0 + n > BUDGET {
            used.1 = true;
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        used.1 = false;
        used.0 += n;
    }

    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.0 -= n;
        // A wake is a syscall; only the reader ever waits.
        if used.1 {
            self.freed.notify_all();
        }
    }
}

/// Reads the next request and its payload. `None` is a clean end (EOF or
/// `NBD_CMD_DISC`); an oversize write is answered (bytes left in `out`,
/// already sent by the caller's stream) and ends the session.
fn next_request<'a, S: Read + Write + Deadline>(
    conn: &mut S,
    ctx: &Ctx<'a>,
    out: &mut Vec<u8>,
    reserve: &mut dyn FnMut(u64),
) -> Step<Option<Job<'a>>> {
    let mut hb = [0u8; REQUEST_LEN];
    match conn.read_exact(&mut hb) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let req = Request::decode(&hb).map_err(|e| Stop(format!("request: {e}")))?;
    if req.command == CMD_DISC {
        return Ok(None);
    }
    // Memory the request will hold: its payload or its read data.
    let cost = match req.command {
        CMD_WRITE | CMD_READ => req.len.min(MAX_PAYLOAD).into(),
        _ => 0,
    };
    reserve(cost);
    let mut payload = Payload {
        pieces: Vec::new(),
        _grant: None,
    };
    if req.command == CMD_WRITE {
        if req.len > MAX_PAYLOAD {
            // The payload is not read: the stream cannot be trusted past it.
            let msg = format!(
                "write of {} bytes is over the {MAX_PAYLOAD} byte limit",
                req.len
            );
            out.clear();
            fail(ctx, &req, EINVAL, &msg, out);
            conn.write_all(out)?;
            conn.flush()?;
            return Err(Stop(msg));
        }
        payload = read_payload(conn, ctx, req.len.into())?;
    }
    Ok(Some(Job { req, payload, cost }))
}

/// Reads a write payload of `len` bytes, taking room for each piece just
/// before reading it. The whole payload must arrive within
/// [`payload_time`]; time spent waiting for room is the server's, not the
/// client's, and moves the deadline.
fn read_payload<'a, S: Read + Deadline>(
    conn: &mut S,
    ctx: &Ctx<'a>,
    len: u64,
) -> Step<Payload<'a>> {
    let mut payload = Payload {
        pieces: Vec::new(),
        _grant: None,
    };
    if len == 0 {
        return Ok(payload);
    }
    let allowed = payload_time(ctx.timeout, len);
    let mut deadline = Instant::now() + allowed;
    let grant = payload._grant.insert(ctx.room.start(len));
    let mut got = 0;
    while got < len {
        let n = (len - got).min(PIECE);
        let asked = Instant::now();
        if grant.grow(n) {
            deadline += asked.elapsed();
        }
        conn.set_deadline(Some(deadline))?;
        let mut piece = vec![0u8; n as usize];
        let r = conn.read_exact(&mut piece);
        conn.set_deadline(None)?;
        match r {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                let why = format!(
                    "dropped: write payload of {len} bytes not received within {:.1} s \
                     ({got} bytes came)",
                    allowed.as_secs_f64()
                );
                warn!("{}: {why}", ctx.peer);
                return Err(Stop(why));
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Stop(format!(
                    "the client left during a write payload ({got} of {len} bytes came)"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        got += n;
        payload.pieces.push(piece);
    }
    Ok(payload)
}

/// Setting the read deadline of whatever stream a session reads from.
trait Deadline {
    fn set_deadline(&mut self, d: Option<Instant>) -> io::Result<()>;
}

impl Deadline for Conn {
    fn set_deadline(&mut self, d: Option<Instant>) -> io::Result<()> {
        match self.timed() {
            Some(t) => t.set_deadline(d),
            None => Ok(()),
        }
    }
}

/// Bytes one plain connection receives at once: a `recv` brings every
/// request header (and the start of any write payload) already sent, and
/// they are parsed from here before the socket is asked again. Payload
/// bytes found here are copied into pieces that took their room first; the
/// buffer itself is a fixed cost per connection, outside that bound.
const RECV_BUF: usize = 64 * 1024;
/// Replies queued for sending at most; a worker with another waits for the
/// sender to take them (a client that sends and never reads cannot make the
/// queue grow without bound).
const MAX_QUEUED_REPLIES: usize = 1024;
/// Reply buffers kept for reuse; a big read's buffer is never kept.
const SPARE_REPLIES: usize = WORKERS;
const SPARE_CAPACITY: usize = 256 * 1024;
/// Buffers given to one `writev` (Linux takes up to 1024).
const MAX_IOV: usize = 256;

/// A plain connection: this thread reads requests (through a
/// [`RECV_BUF`] buffer). A read or write the disk translates goes to the
/// connection's io_uring ([`Config::ring`]), whose thread queues the reply
/// once the host I/O is over; every other request goes to one of
/// [`WORKERS`] threads, which does the disk call and queues its whole
/// reply. Replies go out of the [`Outbox`] in completion order (NBD matches
/// them by handle). On `NBD_CMD_DISC`, EOF or a read error the requests
/// already read are still answered before the session ends; a failed
/// reply write shuts the socket, which ends the reading too.
fn concurrent(ctx: &Ctx, sock: &Sock) -> Step<()> {
    let budget = Arc::new(Budget::new());
    let outbox = Arc::new(Outbox::new(sock.try_clone()?, budget.clone()));
    let mut ring = if ctx.ring { session_ring() } else { None };
    let mut reader = io::BufReader::with_capacity(RECV_BUF, Timed::new(sock.try_clone()?));
    let jobs = Jobs::<Job>::new(QUEUED);
    // The sender thread outlives the workers, whose replies it may send.
    let r = std::thread::scope(|outer| {
        if ring.is_some() {
            let spawned = std::thread::Builder::new()
                .name("asiffs-nbd-send".into())
                .spawn_scoped(outer, || outbox.sender());
            if let Err(e) = spawned {
                warn!("cannot start an NBD sender thread, serving without io_uring: {e}");
                ring = None;
            }
        }
        if let Some(ring) = &ring {
            // Replies completed together leave in one `writev`.
            let outbox = outbox.clone();
            ring.set_after_reap(Some(Arc::new(move || outbox.flush())));
        }
        let r = serve_requests(ctx, &mut reader, ring.as_ref(), &outbox, &budget, &jobs);
        outbox.close();
        r
    });
    r?;
    match outbox.broken() {
        Some(why) => Err(Stop(why)),
        None => Ok(()),
    }
}

/// The reading half of [`concurrent`], with its workers.
fn serve_requests<'a>(
    ctx: &Ctx<'a>,
    reader: &mut io::BufReader<Timed>,
    ring: Option<&Ring>,
    outbox: &Arc<Outbox>,
    budget: &Budget,
    jobs: &Jobs<Job<'a>>,
) -> Step<()> {
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            let worker = jobs.join();
            let (outbox, budget) = (&outbox, &budget);
            let spawned = std::thread::Builder::new()
                .name("asiffs-nbd-io".into())
                .spawn_scoped(scope, move || {
                    let mut out = Vec::new();
                    // Once the socket broke, the queue is still drained (without
                    // disk calls) so the reader never waits on the budget forever.
                    for job in worker {
                        let Job { req, payload, cost } = job;
                        if outbox.is_broken() {
                            drop(payload);
                            budget.give(cost);
                            continue;
                        }
                        out.clear();
                        answer(ctx, &req, &payload.pieces, &mut out);
                        // Its room is needed by other clients more than by
                        // this reply.
                        drop(payload);
                        out = outbox.send(out, cost);
                    }
                });
            if let Err(e) = spawned {
                // Fewer workers still serve; none ends the session below.
                warn!("cannot start an NBD worker thread: {e}");
                break;
            }
        }
        let pusher = jobs.pusher();
        let mut out = Vec::new();
        let r = loop {
            let job = match next_request(&mut WriteVia(reader, outbox), ctx, &mut out, &mut |n| {
                budget.take(n)
            }) {
                Ok(Some(job)) => job,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let job = match ring {
                Some(ring) => match on_ring(ctx, ring, outbox, job) {
                    Some(job) => job,
                    None => continue,
                },
                None => job,
            };
            if pusher.push(job).is_err() {
                break Ok(());
            }
        };
        if let Some(ring) = ring {
            // Every request on it answered (or dropped, if the socket broke).
            ring.shutdown();
            ring.set_after_reap(None);
        }
        drop(pusher);
        r
    })
}

/// A plain session's own ring, or `None` (said once) where io_uring is
/// unavailable.
fn session_ring() -> Option<Ring> {
    match Ring::new() {
        Ok(r) => Some(r),
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                warn!(
                    "NBD sessions serve without io_uring: {}",
                    crate::host::uring::unavailable_reason(&e)
                )
            });
            None
        }
    }
}

/// Largest request put on a session's ring. Small random I/O is what the
/// ring speeds up; larger requests on it held each megabyte twice (the
/// ring's aligned buffer beside the payload or the reply) and took the
/// server's peak RSS under 1 MiB sequential I/O from 55 to 97 MiB.
const RING_LARGEST: u32 = 256 * 1024;

/// Puts a valid read or write of 1 to [`RING_LARGEST`] bytes on the
/// session's ring, if the disk translates it; hands back every other
/// request (and any the ring does not take) for a worker. What the ring
/// takes is answered exactly as [`answer`] would.
fn on_ring<'a>(ctx: &Ctx, ring: &Ring, outbox: &Arc<Outbox>, job: Job<'a>) -> Option<Job<'a>> {
    let req = &job.req;
    let read = req.command == CMD_READ;
    let plain = match req.command {
        // One data chunk, as `read` sends when it does not look for holes.
        CMD_READ => !ctx.structured || req.flags & CMD_FLAG_DF != 0 || req.len <= SMALL_READ,
        // FUA needs a flush after the write: a worker's job.
        CMD_WRITE => req.flags & CMD_FLAG_FUA == 0 && job.payload.pieces.len() == 1,
        _ => false,
    };
    if !plain
        || !(1..=RING_LARGEST).contains(&req.len)
        || refusal(ctx, req).is_some()
        || outbox.is_broken()
    {
        return Some(job);
    }
    let (handle, offset, len, cost) = (req.handle, req.offset, req.len, job.cost);
    let structured = ctx.structured;
    let disk = &ctx.export.disk;
    let reply_to = outbox.clone();
    let taken = if read {
        let done: ReadDone = Box::new(move |r| {
            let mut head = reply_to.spare();
            let data = match r {
                Ok(data) => {
                    if structured {
                        head.extend_from_slice(&chunk_offset_data_header(
                            handle, offset, len, true,
                        ));
                    } else {
                        head.extend_from_slice(&simple_reply(handle, 0));
                    }
                    Some(data)
                }
                Err(e) => {
                    fail_reply(structured, handle, errno_of(&e), &e.to_string(), &mut head);
                    None
                }
            };
            reply_to.hold(Reply { head, data, cost });
        });
        ring.try_read(disk, offset, len as usize, done)
            .map_err(drop)
    } else {
        let done: WriteDone = Box::new(move |r| {
            let mut head = reply_to.spare();
            match r {
                Ok(()) => head.extend_from_slice(&simple_reply(handle, 0)),
                Err(e) => {
                    warn!("{e}");
                    fail_reply(structured, handle, errno_of(&e), &e.to_string(), &mut head)
                }
            }
            reply_to.hold(Reply {
                head,
                data: None,
                cost,
            });
        });
        ring.try_write(disk, &job.payload.pieces[0], offset, done)
            .map_err(drop)
    };
    match taken {
        // The reply was held for the reaper's flush, which may not come.
        Ok(true) => {
            outbox.flush();
            None
        }
        // A write's data was copied into the ring's buffer: its room is free.
        Ok(false) => None,
        Err(_) => Some(job),
    }
}

/// One whole reply.
struct Reply {
    head: Vec<u8>,
    /// A read's data as the ring read it, sent after `head` without a copy.
    data: Option<ReadBuf>,
    /// Bytes of [`BUDGET`] it holds until sent or dropped.
    cost: u64,
}

impl Reply {
    fn len(&self) -> usize {
        self.head.len() + self.data.as_ref().map_or(0, |d| d.as_slice().len())
    }

    /// Its bytes from `off` on, in up to two slices.
    fn from(&self, off: usize) -> impl Iterator<Item = &[u8]> {
        let data = self.data.as_ref().map_or(&[][..], |d| d.as_slice());
        let (h, d) = if off < self.head.len() {
            (&self.head[off..], data)
        } else {
            (&[][..], &data[off - self.head.len()..])
        };
        [h, d].into_iter().filter(|s| !s.is_empty())
    }
}

/// Replies waiting to go out.
struct Queue {
    replies: Vec<Reply>,
    /// A thread is sending (and will send whatever is queued meanwhile).
    sending: bool,
    /// Why the socket broke, once it has.
    broken: Option<String>,
    /// Sent reply buffers, cleared, for reuse.
    spare: Vec<Vec<u8>>,
    /// [`Outbox::flush`] found the socket full: the sender thread takes
    /// over (`sending` stays set).
    handoff: bool,
    /// The session is over: the sender thread leaves.
    closed: bool,
}

/// The reply side of a plain connection. A worker queues its reply; if no
/// thread is sending, it becomes the sender and writes everything queued
/// with one `writev`, again and again until the queue is empty. So replies
/// that complete while a write is under way go out together with the next
/// one, each whole, and none waits for more than the writes ahead of it.
struct Outbox {
    /// Written only by the sender; the lock is never contended.
    sock: std::sync::Mutex<Sock>,
    queue: std::sync::Mutex<Queue>,
    /// The sender took a batch (room in the queue) or the socket broke.
    taken: std::sync::Condvar,
    /// A handoff, or the close.
    kick: std::sync::Condvar,
    budget: Arc<Budget>,
}

impl Outbox {
    fn new(sock: Sock, budget: Arc<Budget>) -> Self {
        Outbox {
            sock: std::sync::Mutex::new(sock),
            queue: std::sync::Mutex::new(Queue {
                replies: Vec::new(),
                sending: false,
                broken: None,
                spare: Vec::new(),
                handoff: false,
                closed: false,
            }),
            taken: std::sync::Condvar::new(),
            kick: std::sync::Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    /// An empty buffer for a reply.
    fn spare(&self) -> Vec<u8> {
        self.lock().spare.pop().unwrap_or_default()
    }

    /// Queues one whole reply holding `cost` bytes of the budget (given
    /// back once it is sent or dropped), and sends if nobody is; returns
    /// an empty buffer for the next reply.
    fn send(&self, reply: Vec<u8>, cost: u64) -> Vec<u8> {
        let reply = Reply {
            head: reply,
            data: None,
            cost,
        };
        match self.push(reply) {
            Some(mut q) => q.spare.pop().unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Queues a reply without sending it: [`Outbox::flush`], or the
    /// sender at work, sends it. Never waits for room: a caller's replies
    /// are bounded by the [`BUDGET`] their requests took.
    fn hold(&self, reply: Reply) {
        let mut q = self.lock();
        if q.broken.is_some() {
            drop(q);
            self.budget.give(reply.cost);
            return;
        }
        q.replies.push(reply);
    }

    /// Sends what is queued, unless a sender is at it, without waiting
    /// for the client: what the socket does not take at once goes to the
    /// sender thread ([`Outbox::sender`]). For the ring's reaper, which
    /// must not wait on one client while the completions (and the locks)
    /// of other requests wait on it.
    fn flush(&self) {
        let mut q = self.lock();
        if q.broken.is_some() || q.sending {
            return;
        }
        q.sending = true;
        drop(self.send_queued(q, false));
    }

    /// The thread that finishes what [`Outbox::flush`] handed over, with
    /// blocking writes; returns once the outbox is closed.
    fn sender(&self) {
        let mut q = self.lock();
        loop {
            while !q.handoff && !q.closed {
                q = self.kick.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if !q.handoff {
                return;
            }
            q.handoff = false;
            q = self.send_all(q);
        }
    }

    /// Ends [`Outbox::sender`] once nothing is handed over.
    fn close(&self) {
        self.lock().closed = true;
        self.kick.notify_all();
    }

    /// Keeps some sent buffers for reuse.
    fn recycle(&self, q: &mut Queue, batch: Vec<Reply>) {
        for Reply { mut head, .. } in batch {
            if q.spare.len() < SPARE_REPLIES && head.capacity() <= SPARE_CAPACITY {
                head.clear();
                q.spare.push(head);
            }
        }
    }

    /// Records why the socket broke and drops what is queued; returns
    /// with `sending` clear.
    fn broke<'q>(
        &'q self,
        mut q: std::sync::MutexGuard<'q, Queue>,
        e: io::Error,
    ) -> std::sync::MutexGuard<'q, Queue> {
        self.sock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
        q.broken.get_or_insert_with(|| e.to_string());
        let dropped: u64 = q.replies.drain(..).map(|r| r.cost).sum();
        q.sending = false;
        self.taken.notify_all();
        drop(q);
        self.budget.give(dropped);
        self.lock()
    }

    /// `None` once the socket broke (the reply is dropped).
    fn push(&self, reply: Reply) -> Option<std::sync::MutexGuard<'_, Queue>> {
        let mut q = self.lock();
        while q.broken.is_none() && q.replies.len() >= MAX_QUEUED_REPLIES {
            q = self.taken.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.broken.is_some() {
            drop(q);
            self.budget.give(reply.cost);
            return None;
        }
        q.replies.push(reply);
        if !q.sending {
            q.sending = true;
            q = self.send_all(q);
        }
        Some(q)
    }

    /// Sends batches until the queue is empty; called with `sending` set,
    /// returns with it clear.
    fn send_all<'q>(
        &'q self,
        q: std::sync::MutexGuard<'q, Queue>,
    ) -> std::sync::MutexGuard<'q, Queue> {
        self.send_queued(q, true)
    }

    /// Sends batches until the queue is empty (then `sending` is clear) or,
    /// without `wait`, until the socket is full: then the rest is handed to
    /// the sender thread (`handoff` set, `sending` still set).
    fn send_queued<'q>(
        &'q self,
        mut q: std::sync::MutexGuard<'q, Queue>,
        wait: bool,
    ) -> std::sync::MutexGuard<'q, Queue> {
        loop {
            let mut batch = std::mem::take(&mut q.replies);
            if batch.is_empty() {
                q.sending = false;
                return q;
            }
            // Only a full queue has waiters (a wake is a syscall).
            if batch.len() >= MAX_QUEUED_REPLIES {
                self.taken.notify_all();
            }
            drop(q);
            let mut at = (0, 0);
            let r = {
                let mut sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
                if wait {
                    write_all_vectored(&mut *sock, &batch, &mut at)
                } else {
                    write_all_vectored(&mut NoWait(&sock), &batch, &mut at)
                }
            };
            let sent: u64 = batch[..at.0].iter().map(|r| r.cost).sum();
            self.budget.give(sent);
            q = self.lock();
            match r {
                Ok(()) => self.recycle(&mut q, batch),
                Err(e) if !wait && e.kind() == io::ErrorKind::WouldBlock => {
                    let mut rest = batch.split_off(at.0);
                    if at.1 > 0 {
                        // What is left of a reply the socket took part of.
                        let first = &mut rest[0];
                        let head = first.from(at.1).flatten().copied().collect();
                        *first = Reply {
                            head,
                            data: None,
                            cost: first.cost,
                        };
                    }
                    self.recycle(&mut q, batch);
                    rest.append(&mut q.replies);
                    q.replies = rest;
                    q.handoff = true;
                    self.kick.notify_one();
                    return q;
                }
                Err(e) => {
                    let unsent: u64 = batch[at.0..].iter().map(|r| r.cost).sum();
                    self.budget.give(unsent);
                    return self.broke(q, e);
                }
            }
        }
    }
}

/// Writes to a socket without waiting: a full socket is `WouldBlock`.
struct NoWait<'a>(&'a Sock);

impl Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
        let fd = match self.0 {
            Sock::Tcp(s) => std::os::fd::AsFd::as_fd(s),
            Sock::Unix(s) => std::os::fd::AsFd::as_fd(s),
        };
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        Ok(sendmsg(
            fd,
            bufs,
            &mut SendAncillaryBuffer::default(),
            flags,
        )?)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes every reply of `batch` in order, [`MAX_IOV`] buffers per
/// `writev` at most, resuming after short writes. `at` is where it stands
/// (the first reply not wholly sent, and how much of it was), also after
/// an error.
fn write_all_vectored(
    w: &mut impl Write,
    batch: &[Reply],
    at: &mut (usize, usize),
) -> io::Result<()> {
    let mut slices = Vec::new();
    while at.0 < batch.len() {
        slices.clear();
        slices.extend(batch[at.0].from(at.1).map(io::IoSlice::new));
        for r in &batch[at.0 + 1..] {
            if slices.len() + 2 > MAX_IOV {
                break;
            }
            slices.extend(r.from(0).map(io::IoSlice::new));
        }
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while at.0 < batch.len() && n >= batch[at.0].len() - at.1 {
            n -= batch[at.0].len() - at.1;
            *at = (at.0 + 1, 0);
        }
        at.1 += n;
    }
    Ok(())
}

/// Reads from the buffered reader half; writes (rare: the oversize-write
/// error) go through the outbox like any reply.
struct WriteVia<'a>(&'a mut io::BufReader<Timed>, &'a Outbox);

impl Read for WriteVia<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }
}

impl Write for WriteVia<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.1.send(buf.to_vec(), 0);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Deadline for WriteVia<'_> {
    fn set_deadline(&mut self, d: Option<Instant>) -> io::Result<()> {
        self.0.get_mut().set_deadline(d)
    }
}

/// Appends the reply to a request that failed with `error`.
fn fail(ctx: &Ctx, req: &Request, error: u32, message: &str, out: &mut Vec<u8>) {
    fail_reply(ctx.structured, req.handle, error, message, out)
}

fn fail_reply(structured: bool, handle: u64, error: u32, message: &str, out: &mut Vec<u8>) {
    if structured {
        out.extend_from_slice(&chunk_error(handle, error, message, true));
    } else {
        out.extend_from_slice(&simple_reply(handle, error));
    }
}

/// Does what `req` asks and appends its whole reply to `out`; a write's
/// payload comes in pieces, written in order.
/// Why `req` must be refused, as the error the spec asks for and a
/// message; `None` when it may run.
fn refusal(ctx: &Ctx, req: &Request) -> Option<(u32, String)> {
    let allowed = match req.command {
        CMD_READ if ctx.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        c => return Some((EINVAL, format!("command {c} is not supported"))),
    };
    if req.flags & !allowed != 0 {
        let msg = format!(
            "flags {:#x} are not valid for command {}",
            req.flags, req.command
        );
        return Some((EINVAL, msg));
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && ctx.export.read_only {
        return Some((EPERM, "the export is read-only".into()));
    }
    let size = ctx.export.disk.size();
    let end = req.offset.checked_add(req.len.into());
    let past_end = match end {
        Some(end) => end > size,
        None => true,
    };
    if req.command != CMD_FLUSH && past_end {
        let msg = format!(
            "range {:#x}+{:#x} is past the end of the export ({size} bytes)",
            req.offset, req.len
        );
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        return Some((if writes { ENOSPC } else { EINVAL }, msg));
    }
    None
}

fn answer(ctx: &Ctx, req: &Request, payload: &[Vec<u8>], out: &mut Vec<u8>) {
    if let Some((error, msg)) = refusal(ctx, req) {
        return fail(ctx, req, error, &msg, out);
    }
    let export = ctx.export;
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let disk = &*export.disk;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = match req.command {
        CMD_READ => return read(ctx, disk, req, out),
        CMD_BLOCK_STATUS => return block_status(ctx, req, out),
        CMD_WRITE => payload
            .iter()
            .try_fold(req.offset, |at, piece| {
                disk.write_at(piece, at).map(|()| at + piece.len() as u64)
            })
            .map(|_| ()),
        CMD_TRIM => disk.discard(req.offset, req.len.into()),
        CMD_WRITE_ZEROES => {
            let r = disk.write_zeroes(req.offset, req.len.into());
            if req.flags & CMD_FLAG_NO_HOLE != 0 {
                // Zeros, and stored: later writes there cannot run out of space.
                r.and_then(|()| disk.allocate(req.offset, req.len.into()))
            } else {
                r
            }
        }
        // Nothing to persist on an export that takes no writes.
        _ if export.read_only => Ok(()),
        // Covers every write completed so far, which includes every write
        // replied to before this flush arrived (all the spec asks).
        _ => disk.flush(),
    };
    let done = done.and_then(|()| if fua && writes { disk.flush() } else { Ok(()) });
    match done {
        Ok(()) => out.extend_from_slice(&simple_reply(req.handle, 0)),
        Err(e) => {
            warn!("{}: {e}", export.name);
            fail(ctx, req, errno_of(&e), &e.to_string(), out)
        }
    }
}

/// Reads at most this long are sent as one data chunk without asking the
/// index for holes: the walk would cost more than the zeros it saves.
const SMALL_READ: u32 = 64 * 1024;

fn read(ctx: &Ctx, disk: &dyn Disk, req: &Request, out: &mut Vec<u8>) {
    if req.len > MAX_PAYLOAD {
        let msg = format!(
            "read of {} bytes is over the {MAX_PAYLOAD} byte limit",
            req.len
        );
        return fail(ctx, req, EINVAL, &msg, out);
    }
    let len = req.len as usize;
    if !ctx.structured {
        let start = out.len();
        out.extend_from_slice(&simple_reply(req.handle, 0));
        let at = out.len();
        out.resize(at + len, 0);
        if let Err(e) = disk.read_at(&mut out[at..], req.offset) {
            out.truncate(start);
            fail(ctx, req, errno_of(&e), &e.to_string(), out);
        }
        return;
    }
    if len == 0 {
        return out.extend_from_slice(&chunk_none(req.handle));
    }
    let segments = if req.flags & CMD_FLAG_DF != 0 || req.len <= SMALL_READ {
        vec![(req.offset, req.len.into(), false)]
    } else {
        segments(disk, req.offset, req.len.into())
    };
    let last = segments.len() - 1;
    for (i, &(at, n, hole)) in segments.iter().enumerate() {
        if hole {
            out.extend_from_slice(&chunk_offset_hole(req.handle, at, n as u32, i == last));
            continue;
        }
        let start = out.len();
        out.extend_from_slice(&chunk_offset_data_header(
            req.handle,
            at,
            n as u32,
            i == last,
        ));
        let data = out.len();
        out.resize(data + n as usize, 0);
        if let Err(e) = disk.read_at(&mut out[data..], at) {
            // The chunks before this one stand; the error ends the reply.
            out.truncate(start);
            return fail(ctx, req, errno_of(&e), &e.to_string(), out);
        }
    }
}

fn block_status(ctx: &Ctx, req: &Request, out: &mut Vec<u8>) {
    if !ctx.structured || !ctx.meta {
        return fail(ctx, req, EINVAL, "no metadata context was selected", out);
    }
    if req.len == 0 {
        return fail(ctx, req, EINVAL, "block status of an empty range", out);
    }
    let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    match allocation(&*ctx.export.disk, req.offset, req.len.into(), limit) {
        Ok(ext) => {
            let desc: Vec<(u32, u32)> = ext
                .iter()
                .map(|&(n, hole)| {
                    let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
                    (n as u32, flags)
                })
                .collect();
            out.extend_from_slice(&chunk_block_status(req.handle, CONTEXT_ID, &desc, true));
        }
        Err(e) => fail(ctx, req, errno_of(&e), &e.to_string(), out),
    }
}

enum Haggle {
    More,
    Go(Arc<Export>),
    Abort,
}

/// Runs of `offset..offset+len` as (length, is hole), at most `limit` of
/// them, from the disk's index. Every length is nonzero and at most `len`.
pub fn allocation(
    disk: &dyn Disk,
    offset: u64,
    len: u64,
    limit: usize,
) -> crate::Result<Vec<(u64, bool)>> {
    let end = offset.saturating_add(len);
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut at = offset;
    while at < end && runs.len() < limit {
        let (next, hole) = match disk.seek_data(at)? {
            Some(d) if d <= at => {
                let h = disk.seek_hole(at)?;
                (if h > at { h.min(end) } else { end }, false)
            }
            Some(d) => (d.min(end), true),
            None => (end, true),
        };
        match runs.last_mut() {
            Some(last) if last.1 == hole => last.0 += next - at,
            _ => runs.push((next - at, hole)),
        }
        at = next;
    }
    Ok(runs)
}

/// How a read of `offset..offset+len` is cut into chunks: (start, length,
/// is hole). Short holes stay inside data chunks; if the index cannot be
/// read, the whole range is one data chunk (the read itself reports why).
fn segments(disk: &dyn Disk, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let runs = allocation(disk, offset, len, usize::MAX).unwrap_or_default();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = offset;
    for (n, hole) in runs {
        let hole = hole && n >= MIN_HOLE_CHUNK;
        match out.last_mut() {
            Some(last) if last.2 == hole && !hole => last.1 += n,
            _ => out.push((at, n, hole)),
        }
        at += n;
    }
    if at != offset + len || out.is_empty() {
        return vec![(offset, len, false)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `step` bytes a call and refuses every third call as a
    /// full socket would.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[io::IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 3 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut left = self.step;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
            }
            Ok(self.step - left)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Replies with and without read data go out byte for byte, in order,
    /// through short writes and refusals, resuming where they stopped;
    /// more replies than one `writev` takes.
    #[test]
    fn replies_resume_after_short_and_refused_writes() {
        let bytes = |seed: u8, n: usize| (0..n).map(|i| seed ^ (i as u8)).collect::<Vec<u8>>();
        for step in [1, 7, 16, 4099, 1 << 20] {
            let mut want = Vec::new();
            let batch: Vec<Reply> = (0..300u32)
                .map(|i| {
                    let head = bytes(i as u8, 16 + (i % 5) as usize);
                    want.extend_from_slice(&head);
                    let data = (i % 3 != 0).then(|| {
                        let d = bytes(0x80 | i as u8, 1 + (i as usize * 37) % 5000);
                        want.extend_from_slice(&d);
                        ReadBuf::from_bytes(&d)
                    });
                    Reply {
                        head,
                        data,
                        cost: 0,
                    }
                })
                .collect();
            let mut w = Trickle {
                out: Vec::new(),
                step,
                calls: 0,
            };
            let mut at = (0, 0);
            loop {
                match write_all_vectored(&mut w, &batch, &mut at) {
                    Ok(()) => break,
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
                }
            }
            assert_eq!(at, (300, 0), "step {step}");
            assert!(w.out == want, "step {step}: bytes differ");
        }
    }

    /// What is left of a partly sent reply, from any offset.
    #[test]
    fn a_reply_from_an_offset() {
        let r = Reply {
            head: vec![1, 2, 3],
            data: Some(ReadBuf::from_bytes(&[4, 5, 6, 7])),
            cost: 0,
        };
        assert_eq!(r.len(), 7);
        for off in 0..7 {
            let rest: Vec<u8> = r.from(off).flatten().copied().collect();
            assert_eq!(rest, (off as u8 + 1..=7).collect::<Vec<u8>>(), "from {off}");
        }
    }
}

//! asiffs' own FUSE transport, for FUSE over io_uring (`-o uring=`),
//! which fuser does not speak.
//!
//! It mounts `/dev/fuse` itself (root), answers INIT, and then serves two
//! ways at once: the per-CPU ring queues (`ring`), which carry every
//! request once the kernel has an entry in each queue, and a reader on
//! `/dev/fuse`, which takes what never travels over the ring (forget,
//! interrupt) and everything when the kernel declines the ring. Both
//! decode and answer through `dispatch`, on the same [`Volume`] as the
//! fuser transport.

mod abi;
mod dispatch;
mod mount;
mod ring;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::MountOption;
use tracing::{debug, info, warn};

use super::pool::Pool;
use super::volume::Volume;
use abi::{init, op, InHeader, InitIn, InitOut};
pub(super) use dispatch::Access;
use dispatch::{dispatch, Outcome, Session};

/// Largest request on the ring. Every entry's payload buffer must hold
/// one, and buffers touched stay resident: at 1 MiB, 32 entries per CPU
/// took the daemon to 87 MiB under 1 MiB sequential I/O; at 256 KiB it
/// peaked at 43 MiB with the same throughput, within the noise (a 1 MiB
/// request becomes four).
pub(crate) const MAX_WRITE: u32 = 256 << 10;
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel carries FUSE requests over io_uring now; the
/// reason when it does not.
pub(super) fn uring_available() -> Result<(), String> {
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(v) if v.trim() == "Y" || v.trim() == "1" => Ok(()),
        Ok(_) => Err(format!(
            "the kernel has FUSE over io_uring turned off (echo 1 > {ENABLE_URING})"
        )),
        Err(_) => Err("the kernel has no FUSE over io_uring (6.14+, CONFIG_FUSE_IO_URING)".into()),
    }
}

/// Why this transport cannot mount with these options, if it cannot.
pub(super) fn unusable(options: &[MountOption]) -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("mounting without fusermount3 needs root".into());
    }
    if mount::mount_data(options, false).is_none() {
        return Some("auto_unmount needs fusermount3".into());
    }
    None
}

/// A mounted, not yet initialised connection.
pub(super) struct Mounted {
    dev: Arc<OwnedFd>,
}

pub(super) fn mount(
    mountpoint: &Path,
    options: &[MountOption],
    allow_other: bool,
    root_is_file: bool,
) -> io::Result<Mounted> {
    let m = mount::mount_data(options, allow_other)
        .ok_or_else(|| io::Error::other("auto_unmount needs fusermount3"))?;
    Ok(Mounted {
        dev: Arc::new(mount::mount(mountpoint, &m, root_is_file)?),
    })
}

/// How the session goes: the ring wanted (and whether it must be had),
/// passthrough wanted, and the access rule.
pub(super) struct Plan {
    pub ring: bool,
    pub require_ring: bool,
    pub passthrough: bool,
    pub access: Access,
    /// Container I/O of translatable requests on the queues' rings
    /// (`--aio uring`); else everything runs on the pool.
    pub ring_io: bool,
}

fn read_dev(dev: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reading into a buffer we own, at most its length.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        // ENOENT: the request was interrupted before we read it.
        if !matches!(
            e.raw_os_error(),
            Some(libc::EINTR | libc::EAGAIN | libc::ENOENT)
        ) {
            return Err(e);
        }
    }
}

/// Writes one reply to `/dev/fuse`.
fn reply_dev(dev: &OwnedFd, unique: u64, outcome: &Outcome, out: &[u8]) {
    let (error, body) = match outcome {
        Outcome::None => return,
        Outcome::Reply => (0, out),
        Outcome::Error(e) => (*e, &[][..]),
    };
    let hdr = abi::out_header(abi::OUT_HEADER + body.len(), error, unique);
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut _,
            iov_len: body.len(),
        },
    ];
    // SAFETY: two iovecs over buffers alive across the call.
    let n = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the request was interrupted and is gone.
        if e.raw_os_error() != Some(libc::ENOENT) {
            debug!("reply to {unique}: {e}");
        }
    }
}

/// Answers INIT; the flags granted.
fn init(dev: &OwnedFd, plan: &Plan) -> io::Result<u64> {
    let mut buf = vec![0u8; MAX_WRITE as usize + 64 * 1024];
    let n = read_dev(dev, &mut buf)?;
    let h = InHeader::parse(&buf[..n])
        .filter(|h| h.opcode == op::INIT)
        .ok_or_else(|| io::Error::other("the kernel's first request is not INIT"))?;
    let i = InitIn::parse(&buf[abi::IN_HEADER..n]);
    if i.major != abi::KERNEL_VERSION {
        reply_dev(dev, h.unique, &Outcome::Error(libc::EPROTO), &[]);
        return Err(io::Error::other(format!(
            "the kernel speaks FUSE {}.{}, not 7",
            i.major, i.minor
        )));
    }
    let mut want = init::ASYNC_READ
        | init::BIG_WRITES
        | init::MAX_PAGES
        // Several requests of one direct or AIO read or write in flight.
        | init::ASYNC_DIO
        | init::PARALLEL_DIROPS
        // SB_NOSEC: no getxattr(security.capability) before every write.
        | init::HANDLE_KILLPRIV_V2
        | init::DIRECT_IO_ALLOW_MMAP
        | init::INIT_EXT;
    if plan.passthrough {
        want |= init::PASSTHROUGH;
    }
    if plan.ring && i.minor >= abi::KERNEL_MINOR {
        want |= init::OVER_IO_URING;
    }
    let flags = want & i.flags;
    let out = InitOut {
        minor: i.minor.min(abi::KERNEL_MINOR),
        max_readahead: i.max_readahead.min(MAX_WRITE),
        flags,
        max_background: 128,
        congestion_threshold: 96,
        max_write: MAX_WRITE,
        max_pages: (MAX_WRITE / 4096) as u16,
        // The images' files are on an ordinary file system.
        max_stack_depth: u32::from(flags & init::PASSTHROUGH != 0),
    };
    let mut body = Vec::new();
    out.encode(&mut body);
    reply_dev(dev, h.unique, &Outcome::Reply, &body);
    Ok(flags)
}

/// Serves the mount until it is unmounted; `ready` is told the transport
/// once requests flow. Answers the transport used.
pub(super) fn serve(
    mounted: Mounted,
    vol: Arc<Volume>,
    pool: Arc<Pool>,
    plan: Plan,
    ready: impl FnOnce(&'static str),
) -> io::Result<&'static str> {
    let dev = mounted.dev;
    let sess = Arc::new(Session::new(vol.clone(), dev.clone(), plan.access));
    let flags = init(&dev, &plan)?;
    if plan.passthrough {
        let on = flags & init::PASSTHROUGH != 0;
        sess.set_passthrough(on);
        if on {
            info!("FUSE passthrough on for raw disks");
        } else {
            info!("FUSE passthrough off: the kernel does not offer it");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut queues = Vec::new();
    let mut transport = "classic";
    if flags & init::OVER_IO_URING != 0 {
        match start_queues(&dev, &sess, &pool, &stop, plan.ring_io) {
            Ok(q) => {
                queues = q;
                transport = "uring";
            }
            Err(e) => {
                if plan.require_ring {
                    stop.store(true, Ordering::Relaxed);
                    return Err(io::Error::other(format!(
                        "FUSE over io_uring refused by the kernel: {e}"
                    )));
                }
                warn!("FUSE over io_uring refused by the kernel ({e}); serving /dev/fuse");
            }
        }
    } else if plan.require_ring {
        return Err(io::Error::other(
            "the kernel did not offer FUSE over io_uring at INIT",
        ));
    }
    vol.set_transport(transport, transport == "uring" && plan.ring_io);
    info!(
        "transport: {}",
        if transport == "uring" {
            format!("FUSE over io_uring, {} queues", queues.len())
        } else {
            "/dev/fuse".to_string()
        }
    );
    ready(transport);
    let r = classic(&dev, &sess, &pool);
    stop.store(true, Ordering::Relaxed);
    for q in queues {
        let _ = q.join();
    }
    r.map(|()| transport)
}

fn start_queues(
    dev: &Arc<OwnedFd>,
    sess: &Arc<Session>,
    pool: &Arc<Pool>,
    stop: &Arc<AtomicBool>,
    ring_io: bool,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let n = ring::possible_cpus();
    let (tx, rx) = crossbeam_channel::bounded::<io::Result<()>>(n);
    let mut threads = Vec::new();
    for qid in 0..n {
        let (dev, sess, pool, stop, tx) = (
            dev.clone(),
            sess.clone(),
            pool.clone(),
            stop.clone(),
            tx.clone(),
        );
        let t = std::thread::Builder::new()
            .name(format!("asiffs-q{qid}"))
            .spawn(move || {
                ring::pin(qid);
                let q = ring::Queue::new(qid as u16, dev.as_raw_fd(), sess, pool, ring_io)
                    .and_then(|mut q| q.register().map(|()| q));
                match q {
                    Ok(q) => {
                        let _ = tx.send(Ok(()));
                        q.run(&stop);
                        // The descriptor stays open until the queue is gone.
                        drop(dev);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        threads.push(t);
    }
    drop(tx);
    let mut first_err = None;
    for _ in 0..n {
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(io::Error::other("a queue thread died"));
            }
        }
    }
    match first_err {
        None => Ok(threads),
        Some(e) => {
            // Registered entries end with the connection; the threads with them.
            stop.store(true, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// The `/dev/fuse` reader: forget and interrupt with the ring, every
/// request without it. Ends at unmount (ENODEV).
fn classic(dev: &Arc<OwnedFd>, sess: &Arc<Session>, pool: &Arc<Pool>) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_WRITE as usize + 64 * 1024];
    loop {
        let n = match read_dev(dev, &mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(h) = InHeader::parse(&buf[..n]) else {
            warn!("short request of {n} bytes from the kernel");
            continue;
        };
        if matches!(h.opcode, op::FORGET | op::BATCH_FORGET | op::INTERRUPT) {
            continue;
        }
        let body = &buf[abi::IN_HEADER..n.min(h.len as usize).max(abi::IN_HEADER)];
        let split = abi::op_in_size(h.opcode).min(body.len());
        let (arg, tail) = (body[..split].to_vec(), body[split..].to_vec());
        if h.opcode == op::DESTROY {
            let mut out = Vec::new();
            let o = dispatch(sess, &h, &arg, &tail, &mut out);
            reply_dev(dev, h.unique, &o, &out);
            continue;
        }
        let (dev, sess) = (dev.clone(), sess.clone());
        pool.submit(Box::new(move || {
            let mut out = Vec::new();
            let o = dispatch(&sess, &h, &arg, &tail, &mut out);
            reply_dev(&dev, h.unique, &o, &out);
        }));
    }
}

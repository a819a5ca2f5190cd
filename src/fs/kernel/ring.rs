//! FUSE over io_uring: one queue per possible CPU, each a thread with its
//! own ring holding both the queue's FUSE entries and the container I/O
//! of the requests in them, so that one `io_uring_enter` commits a batch
//! of replies and submits a batch of host reads and writes.
//!
//! An entry is a 288-byte header buffer and a payload buffer of the
//! largest request, registered once (`REGISTER`) and then cycled by
//! `COMMIT_AND_FETCH`: the kernel completes the command when it puts a
//! request in the entry; the reply goes back in the same buffers.
//!
//! Invariants:
//! - an entry's buffers are the kernel's from submission to completion
//!   and this thread's in between; they live in one mapping that outlives
//!   the ring (dropped after it);
//! - a request on the fast path keeps its translation's hold until its
//!   last host I/O completes, and its host I/O reads into and writes from
//!   the entry's payload directly (page-aligned, so `O_DIRECT` works);
//! - a request off the fast path runs on the pool with copies of its
//!   arguments; its reply comes back over a channel and an eventfd the
//!   ring watches, and only this thread touches the entry again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use tracing::{debug, warn};

use super::abi::{self, op, Fields, InHeader};
use super::dispatch::{dispatch, Outcome, Session};
use crate::disk::{Disk, Translation};
use crate::fs::pool::Pool;

/// Entries per queue: requests the queue holds at once.
pub const DEPTH: usize = 32;
/// Payload buffer of an entry: the largest write (`max_write`) or read.
pub const PAYLOAD: usize = super::MAX_WRITE as usize;

const TAG_SHIFT: u32 = 62;
const TAG_FUSE: u64 = 0;
const TAG_IO: u64 = 1;
const TAG_WAKE: u64 = 2;

/// Anonymous memory for a queue's buffers: untouched pages cost nothing.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; which thread may touch which part
// is the queue's protocol (see the module invariants).
unsafe impl Send for Region {}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        // SAFETY: an anonymous private mapping, no file, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The bytes at `at..at + len`.
    ///
    /// # Safety
    /// The range is inside the mapping and the kernel does not own it now.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [u8] {
        debug_assert!(at + len <= self.len);
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The host I/O of a fast-path request in an entry.
struct Io {
    disk: Arc<dyn Disk>,
    _hold: Box<dyn Send>,
    remaining: usize,
    error: Option<io::Error>,
    len: usize,
    write: bool,
}

/// One host read or write of an entry's request.
struct Piece {
    ent: usize,
    fd: RawFd,
    host: u64,
    at: usize,
    len: usize,
}

/// A reply made on the pool, for entry `ent`.
struct Done {
    ent: usize,
    unique: u64,
    outcome: Outcome,
    out: Vec<u8>,
}

struct Ent {
    iov: Box<[libc::iovec; 2]>,
    unique: u64,
    io: Option<Io>,
}

pub struct Queue {
    qid: u16,
    dev: RawFd,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    ents: Vec<Ent>,
    pieces: Slab<Piece>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// Shared with the pool's jobs, which may outlive the queue.
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    sess: Arc<Session>,
    pool: Arc<Pool>,
    /// Whether translated reads and writes run on this ring.
    ring_io: bool,
    /// Entries the kernel holds or this thread works on; the queue ends
    /// when none is left.
    live: usize,
    // Last: the kernel may write the buffers until the ring is gone.
    region: Region,
}

fn tag(kind: u64, n: usize) -> u64 {
    (kind << TAG_SHIFT) | n as u64
}

/// The kind and index a completion's user data carries.
fn untag(ud: u64) -> (u64, usize) {
    (ud >> TAG_SHIFT, (ud & ((1 << TAG_SHIFT) - 1)) as usize)
}

/// The possible CPUs: the kernel makes one queue for each.
pub fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map_or(1, |m| m + 1)
}

fn uring_cmd(
    dev: RawFd,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov: &[libc::iovec; 2],
) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6]; }
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    let e = opcode::UringCmd80::new(types::Fd(dev), cmd_op)
        .cmd(cmd)
        .addr(Some(iov.as_ptr() as u64))
        .build();
    // SAFETY: an SQE is 128 bytes of plain integers (`Entry128` is
    // repr(C) without padding); the kernel reads the iovec count from
    // `len` (offset 24), which the builder has no setter for.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above, back to the same type.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

impl Queue {
    pub fn new(
        qid: u16,
        dev: RawFd,
        sess: Arc<Session>,
        pool: Arc<Pool>,
        ring_io: bool,
    ) -> io::Result<Queue> {
        // Built on the queue's own thread, the only one that submits:
        // the kernel then runs completions' task work only when this
        // thread asks for completions, not by interrupting it.
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize((DEPTH * 8) as u32)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build((DEPTH * 4) as u32)?;
        let region = Region::new(DEPTH * (abi::URING_HEADERS.next_multiple_of(4096) + PAYLOAD))?;
        let ents = (0..DEPTH)
            .map(|i| {
                let (h, p) = Self::offsets(i);
                Ent {
                    iov: Box::new([
                        libc::iovec {
                            // SAFETY: inside the mapping (offsets).
                            iov_base: unsafe { region.ptr.add(h) }.cast(),
                            iov_len: abi::URING_HEADERS,
                        },
                        libc::iovec {
                            // SAFETY: inside the mapping (offsets).
                            iov_base: unsafe { region.ptr.add(p) }.cast(),
                            iov_len: PAYLOAD,
                        },
                    ]),
                    unique: 0,
                    io: None,
                }
            })
            .collect();
        // SAFETY: eventfd makes a fresh descriptor or fails.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        let (done_tx, done_rx) = unbounded();
        Ok(Queue {
            qid,
            dev,
            ring,
            ents,
            pieces: Slab::new(),
            done_tx,
            done_rx,
            // SAFETY: efd is fresh and owned here.
            wake: Arc::new(unsafe { OwnedFd::from_raw_fd(efd) }),
            wake_buf: Box::new(0),
            sess,
            pool,
            ring_io,
            live: 0,
            region,
        })
    }

    /// Where entry `i`'s header and payload buffers start in the region.
    fn offsets(i: usize) -> (usize, usize) {
        let stride = abi::URING_HEADERS.next_multiple_of(4096) + PAYLOAD;
        (
            i * stride,
            i * stride + abi::URING_HEADERS.next_multiple_of(4096),
        )
    }

    fn push(&mut self, e: &squeue::Entry128) {
        loop {
            // SAFETY: every buffer an entry names lives in `region` or in
            // boxes owned by the queue, which outlive the ring's use of them.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                debug!("queue {}: submit: {err}", self.qid);
            }
        }
    }

    /// Registers every entry and watches the eventfd; an error here is
    /// the kernel refusing the ring.
    pub fn register(&mut self) -> io::Result<()> {
        for i in 0..DEPTH {
            let e = uring_cmd(
                self.dev,
                abi::URING_CMD_REGISTER,
                self.qid,
                0,
                &self.ents[i].iov,
            )
            .user_data(tag(TAG_FUSE, i));
            self.push(&e);
        }
        self.arm_wake();
        self.ring.submit()?;
        self.live = DEPTH;
        // Refusals complete at once; a registered entry completes only
        // with its first request, which may also be here already.
        let early = self.reaped();
        for &(_, res) in &early {
            if res < 0 && res != -libc::EAGAIN {
                return Err(io::Error::from_raw_os_error(-res));
            }
        }
        for (ud, res) in early {
            self.complete(ud, res);
        }
        Ok(())
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(tag(TAG_WAKE, 0));
        self.push(&e.into());
    }

    /// Serves until the kernel ends every entry (unmount) or `stop`.
    pub fn run(mut self, stop: &AtomicBool) {
        let ts = types::Timespec::from(Duration::from_millis(500));
        let args = types::SubmitArgs::new().timespec(&ts);
        while self.live > 0 && !stop.load(Ordering::Relaxed) {
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    warn!("queue {}: io_uring_enter: {e}", self.qid);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let done = self.reaped();
            for (ud, res) in done {
                self.complete(ud, res);
            }
        }
        // Host I/O still in flight names the region: wait for it.
        while !self.pieces.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let done = self.reaped();
            for (ud, _) in done {
                if let (TAG_IO, key) = untag(ud) {
                    self.pieces.try_remove(key);
                }
            }
        }
    }

    /// The completions posted so far, as (user data, result).
    fn reaped(&mut self) -> Vec<(u64, i32)> {
        self.ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect()
    }

    fn complete(&mut self, ud: u64, res: i32) {
        let (kind, n) = untag(ud);
        match kind {
            TAG_FUSE => {
                if res < 0 {
                    // ENOTCONN / ECANCELED: the connection is going away.
                    if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                        warn!(
                            "queue {}: entry {n} ended: {}",
                            self.qid,
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    self.live -= 1;
                    return;
                }
                self.request(n);
            }
            TAG_IO => self.piece_done(n, res),
            _ => {
                while let Ok(d) = self.done_rx.try_recv() {
                    self.commit_outcome(d.ent, d.unique, d.outcome, &d.out);
                }
                // Cancelled: the ring is being torn down.
                if res != -libc::ECANCELED {
                    self.arm_wake();
                }
            }
        }
    }

    /// The header buffer and payload of entry `i`.
    ///
    /// # Safety
    /// The kernel has handed the entry to this thread (its command
    /// completed and no new one is submitted yet).
    #[allow(clippy::mut_from_ref)]
    unsafe fn bufs(&self, i: usize) -> (&mut [u8], &mut [u8]) {
        let (h, p) = Self::offsets(i);
        // SAFETY: the caller's contract; the two ranges do not overlap.
        unsafe {
            (
                self.region.slice(h, abi::URING_HEADERS),
                self.region.slice(p, PAYLOAD),
            )
        }
    }

    fn request(&mut self, i: usize) {
        let (h, unique, arg, arg_len, tail_len) = {
            // SAFETY: entry `i`'s command just completed.
            let (hdr, _) = unsafe { self.bufs(i) };
            let Some(h) = InHeader::parse(&hdr[..abi::IN_HEADER]) else {
                return self.commit(i, 0, Outcome::Error(libc::EIO), 0);
            };
            let f = Fields(hdr);
            let arg_len = abi::op_in_size(h.opcode).min(abi::URING_OP_IN);
            let mut arg = [0u8; abi::URING_OP_IN];
            arg[..arg_len].copy_from_slice(&hdr[abi::URING_IN_OUT..abi::URING_IN_OUT + arg_len]);
            let tail_len = (f.u32(abi::URING_PAYLOAD_SZ) as usize).min(PAYLOAD);
            (h, f.u64(abi::URING_COMMIT_ID), arg, arg_len, tail_len)
        };
        self.ents[i].unique = unique;
        if self.ring_io && matches!(h.opcode, op::READ | op::WRITE) {
            let a = Fields(&arg);
            if let Some(started) = self.fast(i, &h, a.u64(8), a.u32(16) as usize) {
                if let Err(e) = started {
                    self.commit(i, unique, Outcome::Error(e), 0);
                }
                return;
            }
        }
        let arg = arg[..arg_len].to_vec();
        let tail = {
            // SAFETY: entry `i` is still this thread's.
            let (_, payload) = unsafe { self.bufs(i) };
            payload[..tail_len].to_vec()
        };
        let (sess, tx, wake) = (self.sess.clone(), self.done_tx.clone(), self.wake.clone());
        self.pool.submit(Box::new(move || {
            let mut out = Vec::new();
            let outcome = dispatch(&sess, &h, &arg, &tail, &mut out);
            let _ = tx.send(Done {
                ent: i,
                unique,
                outcome,
                out,
            });
            let one: u64 = 1;
            // SAFETY: an 8-byte write to an eventfd this job holds open.
            unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }));
    }

    /// Starts a read or write of the entry's request on the host, if the
    /// disk translates it: `None` when it takes the slow path.
    fn fast(
        &mut self,
        i: usize,
        h: &InHeader,
        offset: u64,
        size: usize,
    ) -> Option<Result<(), i32>> {
        let vol = self.sess.vol.clone();
        let node = vol.node(h.nodeid).ok()?;
        if !node.disk.may_translate() || size > PAYLOAD {
            return None;
        }
        let write = h.opcode == op::WRITE;
        let (len, t) = if write {
            match vol.translate_write(&node, offset, size) {
                Ok(Some(t)) => (size, t),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        } else {
            match vol.translate_read(&node, offset, size as u32) {
                Ok(Some((len, t))) => (len, t),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        };
        let Translation { pieces, hold } = t;
        if !write {
            // SAFETY: entry `i` is this thread's (its command completed).
            let (_, payload) = unsafe { self.bufs(i) };
            crate::host::uring::zero_gaps(&mut payload[..len], &pieces);
        }
        if pieces.is_empty() {
            node.disk.io_done(write, len as u64, true);
            drop(hold);
            self.reply_io(i, write, len);
            return Some(Ok(()));
        }
        self.ents[i].io = Some(Io {
            disk: node.disk.clone(),
            _hold: hold,
            remaining: pieces.len(),
            error: None,
            len,
            write,
        });
        for p in pieces {
            let key = self.pieces.insert(Piece {
                ent: i,
                fd: p.fd,
                host: p.host,
                at: p.at,
                len: p.len,
            });
            self.submit_piece(key);
        }
        Some(Ok(()))
    }

    fn submit_piece(&mut self, key: usize) {
        let p = &self.pieces[key];
        let write = self.ents[p.ent].io.as_ref().is_some_and(|io| io.write);
        let (_, base) = Self::offsets(p.ent);
        // SAFETY: inside the entry's payload (the translation was checked
        // against the request's length, at most PAYLOAD).
        let ptr = unsafe { self.region.ptr.add(base + p.at) };
        let (fd, host, len) = (types::Fd(p.fd), p.host, p.len as u32);
        let e = if write {
            opcode::Write::new(fd, ptr, len).offset(host).build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(host).build()
        };
        self.push(&e.user_data(tag(TAG_IO, key)).into());
    }

    fn piece_done(&mut self, key: usize, res: i32) {
        let Some(p) = self.pieces.get_mut(key) else {
            return;
        };
        let ent = p.ent;
        let write = self.ents[ent].io.as_ref().is_some_and(|io| io.write);
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return self.submit_piece(key);
            }
            if let Some(io) = self.ents[ent].io.as_mut() {
                io.error.get_or_insert(io::Error::from_raw_os_error(-res));
            }
        } else if (res as usize) < p.len {
            if res > 0 {
                let n = res as usize;
                p.at += n;
                p.host += n as u64;
                p.len -= n;
                return self.submit_piece(key);
            }
            // End of file: a read there is zeros (the buffer was zeroed
            // where pieces land only for gaps, so zero the rest here).
            if write {
                if let Some(io) = self.ents[ent].io.as_mut() {
                    io.error.get_or_insert(io::ErrorKind::WriteZero.into());
                }
            } else {
                let (at, len) = (p.at, p.len);
                // SAFETY: entry `ent` is this thread's while its I/O runs.
                let (_, payload) = unsafe { self.bufs(ent) };
                payload[at..at + len].fill(0);
            }
        }
        self.pieces.remove(key);
        let Some(io) = self.ents[ent].io.as_mut() else {
            return;
        };
        io.remaining -= 1;
        if io.remaining > 0 {
            return;
        }
        let Some(io) = self.ents[ent].io.take() else {
            return;
        };
        io.disk.io_done(io.write, io.len as u64, io.error.is_none());
        let (write, len) = (io.write, io.len);
        match io.error {
            None => {
                drop(io._hold);
                self.reply_io(ent, write, len);
            }
            Some(e) => {
                warn!(
                    "{}: {} of {len} bytes failed: {e}",
                    io.disk.path().display(),
                    if write { "write" } else { "read" }
                );
                drop(io._hold);
                let unique = self.ents[ent].unique;
                self.commit(
                    ent,
                    unique,
                    Outcome::Error(e.raw_os_error().unwrap_or(libc::EIO)),
                    0,
                );
            }
        }
    }

    /// Replies to a finished fast-path request: the read data already
    /// sits in the payload; a write answers its size.
    fn reply_io(&mut self, i: usize, write: bool, len: usize) {
        let unique = self.ents[i].unique;
        if write {
            // SAFETY: entry `i` is this thread's until committed.
            let (_, payload) = unsafe { self.bufs(i) };
            payload[..4].copy_from_slice(&(len as u32).to_le_bytes());
            payload[4..8].fill(0);
            self.commit(i, unique, Outcome::Reply, 8);
        } else {
            self.commit(i, unique, Outcome::Reply, len);
        }
    }

    fn commit_outcome(&mut self, i: usize, unique: u64, outcome: Outcome, out: &[u8]) {
        if out.len() > PAYLOAD {
            return self.commit(i, unique, Outcome::Error(libc::EIO), 0);
        }
        // SAFETY: entry `i` is this thread's until committed.
        let (_, payload) = unsafe { self.bufs(i) };
        payload[..out.len()].copy_from_slice(out);
        self.commit(i, unique, outcome, out.len());
    }

    /// Writes the out header and the payload's size, and hands the entry
    /// back with the reply (`len` bytes already in the payload).
    fn commit(&mut self, i: usize, unique: u64, outcome: Outcome, len: usize) {
        let (error, len) = match outcome {
            Outcome::Reply | Outcome::None => (0, len),
            Outcome::Error(e) => (e, 0),
        };
        // SAFETY: entry `i` is this thread's until the command below.
        let (hdr, _) = unsafe { self.bufs(i) };
        hdr[..abi::OUT_HEADER].copy_from_slice(&abi::out_header(
            abi::OUT_HEADER + len,
            error,
            unique,
        ));
        hdr[abi::URING_PAYLOAD_SZ..abi::URING_PAYLOAD_SZ + 4]
            .copy_from_slice(&(len as u32).to_le_bytes());
        let e = uring_cmd(
            self.dev,
            abi::URING_CMD_COMMIT_AND_FETCH,
            self.qid,
            unique,
            &self.ents[i].iov,
        )
        .user_data(tag(TAG_FUSE, i));
        self.push(&e);
    }
}

/// Pins the calling thread to `cpu` (requests from a CPU go to its queue).
pub fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < 8 * std::mem::size_of::<libc::cpu_set_t>() {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

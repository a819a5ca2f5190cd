//! Asynchronous guest-data I/O through io_uring, for every format.
//!
//! The mount asks the disk where a request lies in its host files
//! ([`Disk::translate`]) on the thread that received it, hands those host
//! reads and writes to a [`Ring`] and goes back for the next request; the
//! ring's reaper thread finishes it. The host then sees as many requests
//! in flight as the kernel sends, not one per serving thread.
//!
//! Invariants:
//! - a request keeps the translation's `hold` from translation until its
//!   last host I/O completes, so whatever the format locks against (a
//!   resize, compaction, ASIF's chunk reuse) waits for it, as it waits for
//!   the synchronous path;
//! - a buffer given to the kernel belongs to its [`Op`], which stays alive
//!   (in the ring's table of pieces) until every piece has been reaped;
//! - what the disk does not translate (allocation, compressed or
//!   encrypted data, partially valid chunks) runs synchronously on the
//!   calling thread, through `read_at`/`write_at`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;
use slab::Slab;

use crate::disk::{Disk, HostPiece, Translation};
use crate::error::{Error, Result};
use crate::host::file::{AlignedBuf, DIRECT_ALIGN};

/// Called once with the bytes read.
pub type ReadDone = Box<dyn FnOnce(Result<ReadBuf>) + Send>;
/// Called once when the write is complete (or failed).
pub type WriteDone = Box<dyn FnOnce(Result<()>) + Send>;
/// See [`Ring::set_before_submit`].
pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// Bytes read by [`Ring::read`].
pub struct ReadBuf {
    /// `None` only once dropped.
    buf: Option<AlignedBuf>,
    pool: Option<Arc<BufPool>>,
}

impl ReadBuf {
    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| b.as_slice())
    }

    /// Bytes held outside any ring (tests of what consumes a `ReadBuf`).
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> ReadBuf {
        let mut buf = AlignedBuf::new(bytes.len());
        buf.as_mut().copy_from_slice(bytes);
        ReadBuf {
            buf: Some(buf),
            pool: None,
        }
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let (Some(pool), Some(buf)) = (&self.pool, self.buf.take()) {
            pool.give(buf);
        }
    }
}

/// Buffers kept for reuse, at most this many bytes in all. Allocating
/// on the serving threads and freeing on the ring's thread left every
/// thread's malloc arena holding megabytes (200 MiB resident under fio).
const POOL_BYTES: usize = 32 << 20;
/// Buffers larger than this are not kept.
const POOL_LARGEST: usize = 1 << 20;

/// Aligned buffers by size class (powers of two from 4 KiB).
struct BufPool {
    classes: Vec<Mutex<Vec<AlignedBuf>>>,
    kept: AtomicUsize,
}

impl BufPool {
    fn new() -> BufPool {
        let n = (POOL_LARGEST / DIRECT_ALIGN).trailing_zeros() as usize + 1;
        BufPool {
            classes: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            kept: AtomicUsize::new(0),
        }
    }

    fn class(len: usize) -> Option<(usize, usize)> {
        let size = len.max(DIRECT_ALIGN).checked_next_power_of_two()?;
        (size <= POOL_LARGEST).then(|| ((size / DIRECT_ALIGN).trailing_zeros() as usize, size))
    }

    /// A buffer of `len` bytes; its contents are whatever it last held.
    fn take(&self, len: usize) -> AlignedBuf {
        let Some((c, size)) = Self::class(len) else {
            return AlignedBuf::new(len);
        };
        let mut buf = match self.classes[c].lock().pop() {
            Some(b) => {
                self.kept.fetch_sub(size, Ordering::Relaxed);
                b
            }
            None => AlignedBuf::new(size),
        };
        buf.resize(len);
        buf
    }

    fn give(&self, buf: AlignedBuf) {
        let Some((c, size)) = Self::class(buf.capacity()) else {
            return;
        };
        if size != buf.capacity()
            || self.kept.fetch_add(size, Ordering::Relaxed) + size > POOL_BYTES
        {
            if size == buf.capacity() {
                self.kept.fetch_sub(size, Ordering::Relaxed);
            }
            return;
        }
        self.classes[c].lock().push(buf);
    }
}

/// Ring slots; the completion queue is twice as large and the kernel keeps
/// overflowing completions (IORING_FEAT_NODROP), so this bounds batching,
/// not the requests in flight.
const ENTRIES: u32 = 256;
const STOP: u64 = u64::MAX;

/// An io_uring instance with a reaper thread.
pub struct Ring {
    shared: Arc<Shared>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    ring: IoUring,
    /// Held while pushing submission entries: one pusher at a time.
    sq: Mutex<()>,
    pieces: Mutex<Slab<Piece>>,
    buffers: Arc<BufPool>,
    stopping: AtomicBool,
    /// Runs between translating a request and submitting it: tests use it
    /// to hold requests in flight while other operations run.
    before_submit: Mutex<Option<Hook>>,
    /// Host I/Os submitted so far.
    submitted: AtomicU64,
    /// Runs on the reaper after each batch of completions.
    after_reap: Mutex<Option<Hook>>,
}

/// One host read or write of an operation.
struct Piece {
    op: Arc<Op>,
    fd: i32,
    host: u64,
    /// Offset within the operation's buffer.
    at: usize,
    len: usize,
}

enum Done {
    Read(ReadDone),
    Write(WriteDone),
}

/// One request: its buffer, what it holds and how to finish it.
struct Op {
    disk: Arc<dyn Disk>,
    /// Dropped once the host I/O is over and [`Disk::io_done`] ran, before
    /// `done`: a reply that waits (a slow NBD client) holds no lock.
    hold: Mutex<Option<Box<dyn Send>>>,
    /// Start of `buf`'s bytes; the heap block does not move while `buf`
    /// lives, and `buf` is taken out only once no piece is in flight.
    base: usize,
    buf: Mutex<Option<AlignedBuf>>,
    remaining: AtomicUsize,
    error: Mutex<Option<io::Error>>,
    done: Mutex<Option<Done>>,
    len: usize,
    write: bool,
    pool: Arc<BufPool>,
}

impl Ring {
    /// Sets up a ring and checks that the kernel runs requests on it (a
    /// seccomp filter or `io_uring_disabled` shows up here, not later).
    pub fn new() -> io::Result<Ring> {
        let ring = IoUring::new(ENTRIES)?;
        // SAFETY: a NOP names no memory; nothing else uses the ring yet.
        unsafe {
            ring.submission_shared()
                .push(&opcode::Nop::new().build().user_data(0))
        }
        .map_err(|_| io::Error::other("io_uring submission queue full at start"))?;
        ring.submit_and_wait(1)?;
        // SAFETY: no other completion queue handle exists yet.
        let probe: Vec<i32> = unsafe { ring.completion_shared() }
            .map(|c| c.result())
            .collect();
        if let Some(&res) = probe.first() {
            if res < 0 {
                return Err(io::Error::from_raw_os_error(-res));
            }
        }
        let shared = Arc::new(Shared {
            ring,
            sq: Mutex::new(()),
            pieces: Mutex::new(Slab::new()),
            buffers: Arc::new(BufPool::new()),
            stopping: AtomicBool::new(false),
            before_submit: Mutex::new(None),
            submitted: AtomicU64::new(0),
            after_reap: Mutex::new(None),
        });
        let s = shared.clone();
        let reaper = std::thread::Builder::new()
            .name("asiffs-ring".into())
            .spawn(move || s.reap())?;
        Ok(Ring {
            shared,
            reaper: Mutex::new(Some(reaper)),
        })
    }

    /// Runs `hook` on the reaper after each batch of completions (after
    /// their `done` calls): a caller that queues replies in `done` sends
    /// them together here.
    pub fn set_after_reap(&self, hook: Option<Hook>) {
        *self.shared.after_reap.lock() = hook;
    }

    /// Host reads and writes submitted since the ring was set up.
    pub fn submitted(&self) -> u64 {
        self.shared.submitted.load(Ordering::Relaxed)
    }

    /// Pieces in flight now (for tests and stats).
    pub fn in_flight(&self) -> usize {
        self.shared.pieces.lock().len()
    }

    /// Runs `hook` on the requesting thread between translating each
    /// request and submitting it, with the request's locks held: tests race
    /// other operations against requests in flight with it.
    pub fn set_before_submit(&self, hook: Option<Hook>) {
        *self.shared.before_submit.lock() = hook;
    }

    /// Waits for every piece in flight, then stops the reaper. Later
    /// submissions are refused.
    pub fn shutdown(&self) {
        let Some(reaper) = self.reaper.lock().take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared
            .push(&opcode::Nop::new().build().user_data(STOP));
        let _ = reaper.join();
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    /// Pushes one entry and submits it.
    fn push(&self, entry: &io_uring::squeue::Entry) {
        let _one = self.sq.lock();
        loop {
            // SAFETY: the `sq` lock makes this the only submission queue
            // handle; every buffer an entry names is owned by an `Op` kept
            // in `pieces` until its completion is reaped.
            let pushed = unsafe { self.ring.submission_shared().push(entry) }.is_ok();
            if pushed {
                break;
            }
            // Full: hand what is queued to the kernel, which frees the slots.
            self.enter();
        }
        self.enter();
    }

    /// Submits what is queued. The kernel's errors here (EAGAIN, EBUSY
    /// while completions overflow, EINTR) are transient: retry.
    fn enter(&self) {
        while let Err(e) = self.ring.submit() {
            tracing::debug!("io_uring submit: {e}");
            std::thread::yield_now();
        }
    }

    fn submit(&self, p: Piece, write: bool) {
        let ptr = (p.op.base + p.at) as *mut u8;
        let (fd, host, len) = (types::Fd(p.fd), p.host, p.len as u32);
        let key = self.pieces.lock().insert(p) as u64;
        self.submitted.fetch_add(1, Ordering::Relaxed);
        let entry = if write {
            opcode::Write::new(fd, ptr, len).offset(host).build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(host).build()
        };
        self.push(&entry.user_data(key));
    }

    fn reap(&self) {
        let mut stop = false;
        loop {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::debug!("io_uring wait: {e}");
                    std::thread::yield_now();
                }
            }
            // SAFETY: this thread is the only one that reads completions.
            let done: Vec<(u64, i32)> = unsafe { self.ring.completion_shared() }
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (key, res) in done {
                if key == STOP {
                    stop = true;
                    continue;
                }
                let Some(p) = self.pieces.lock().try_remove(key as usize) else {
                    continue;
                };
                self.finish_piece(p, res);
            }
            let hook = self.after_reap.lock().clone();
            if let Some(hook) = hook {
                hook();
            }
            if stop && self.pieces.lock().is_empty() {
                return;
            }
        }
    }

    fn finish_piece(&self, mut p: Piece, res: i32) {
        let write = p.op.write;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if e.kind() == io::ErrorKind::Interrupted {
                return self.submit(p, write);
            }
            p.op.error.lock().get_or_insert(e);
        } else if (res as usize) < p.len {
            if res == 0 {
                // End of file: only a read gets here (a write of 0 bytes
                // would be an error). Chunks lie inside the file, but a
                // shorter file reads as zeros, as `Storage::read_at` says.
                if !write {
                    self.piece_done(p.op);
                    return;
                }
                p.op.error
                    .lock()
                    .get_or_insert(io::ErrorKind::WriteZero.into());
            } else {
                let n = res as usize;
                p.at += n;
                p.host += n as u64;
                p.len -= n;
                return self.submit(p, write);
            }
        }
        self.piece_done(p.op);
    }

    /// Whether this was the op's last piece (its `done` ran here).
    fn piece_done(&self, op: Arc<Op>) -> bool {
        let last = op.remaining.fetch_sub(1, Ordering::AcqRel) == 1;
        if last {
            op.complete();
        }
        last
    }
}

impl Op {
    fn complete(&self) {
        let error = self.error.lock().take();
        let buf = self.buf.lock().take();
        let Some(done) = self.done.lock().take() else {
            return;
        };
        self.disk
            .io_done(self.write, self.len as u64, error.is_none());
        drop(self.hold.lock().take());
        let io_err = |what: &str, e: io::Error| {
            Error::io(format!("{}: {what}", self.disk.path().display()), e)
        };
        match done {
            Done::Read(f) => match (error, buf) {
                (None, Some(buf)) => f(Ok(ReadBuf {
                    buf: Some(buf),
                    pool: Some(self.pool.clone()),
                })),
                (e, _) => f(Err(io_err(
                    "reading",
                    e.unwrap_or_else(|| io::Error::other("buffer lost")),
                ))),
            },
            Done::Write(f) => {
                if let Some(buf) = buf {
                    self.pool.give(buf);
                }
                match error {
                    None => f(Ok(())),
                    Some(e) => f(Err(io_err("writing", e))),
                }
            }
        }
    }
}

impl Ring {
    /// Whether `done` already ran, on this thread.
    fn start(&self, disk: Arc<dyn Disk>, t: Translation, mut buf: AlignedBuf, done: Done) -> bool {
        let write = matches!(done, Done::Write(_));
        let hook = self.shared.before_submit.lock().clone();
        if let Some(hook) = hook {
            hook();
        }
        let base = buf.as_mut().as_mut_ptr() as usize;
        let op = Arc::new(Op {
            disk,
            hold: Mutex::new(Some(t.hold)),
            base,
            len: buf.as_slice().len(),
            buf: Mutex::new(Some(buf)),
            // One extra count, dropped below, so that a fast completion
            // cannot finish the op before every piece is submitted.
            remaining: AtomicUsize::new(t.pieces.len() + 1),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
            write,
            pool: self.shared.buffers.clone(),
        });
        for p in t.pieces {
            self.shared.submit(
                Piece {
                    op: op.clone(),
                    fd: p.fd,
                    host: p.host,
                    at: p.at,
                    len: p.len,
                },
                write,
            );
        }
        self.shared.piece_done(op)
    }

    /// Reads `len` bytes at `offset` of `disk` and calls `done` with them,
    /// from the ring's thread when the disk translates the request, else
    /// before returning (through `read_at`).
    pub fn read(&self, disk: Arc<dyn Disk>, offset: u64, len: usize, done: ReadDone) {
        let Err(done) = self.try_read(&disk, offset, len, done) else {
            return;
        };
        let mut buf = self.shared.buffers.take(len);
        let r = disk.read_at(buf.as_mut(), offset);
        let buf = ReadBuf {
            buf: Some(buf),
            pool: Some(self.shared.buffers.clone()),
        };
        done(r.map(|()| buf))
    }

    /// Like [`Ring::read`], but hands `done` back, uncalled, when the disk
    /// does not translate the range, so the caller chooses how to serve it.
    /// `Ok(true)`: `done` already ran, on this thread (a hole, an error, or
    /// host I/O that finished at once).
    pub fn try_read(
        &self,
        disk: &Arc<dyn Disk>,
        offset: u64,
        len: usize,
        done: ReadDone,
    ) -> std::result::Result<bool, ReadDone> {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(done);
        }
        // A translation not taken is dropped (with its hold) before the
        // caller's synchronous path runs: that path takes the same locks.
        let t = match disk.translate(offset, len as u64, false) {
            Ok(t) => t.filter(|t| usable(t, len)),
            Err(e) => {
                done(Err(e));
                return Ok(true);
            }
        };
        let Some(t) = t else {
            return Err(done);
        };
        let mut buf = self.shared.buffers.take(len);
        zero_gaps(buf.as_mut(), &t.pieces);
        Ok(self.start(disk.clone(), t, buf, Done::Read(done)))
    }

    /// Writes `data` at `offset` of `disk` and calls `done`, from the
    /// ring's thread when the disk translates the request, else before
    /// returning (through `write_at`, which may allocate).
    pub fn write(&self, disk: Arc<dyn Disk>, data: &[u8], offset: u64, done: WriteDone) {
        if let Err(done) = self.try_write(&disk, data, offset, done) {
            done(disk.write_at(data, offset));
        }
    }

    /// Like [`Ring::write`], but hands `done` back, uncalled, when the disk
    /// does not translate every byte of the range; `Ok(true)` as in
    /// [`Ring::try_read`].
    pub fn try_write(
        &self,
        disk: &Arc<dyn Disk>,
        data: &[u8],
        offset: u64,
        done: WriteDone,
    ) -> std::result::Result<bool, WriteDone> {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(done);
        }
        let t = match disk.translate(offset, data.len() as u64, true) {
            // Every byte of a write must land somewhere.
            Ok(t) => t.filter(|t| covers(t, data.len())),
            Err(e) => {
                done(Err(e));
                return Ok(true);
            }
        };
        let Some(t) = t else {
            return Err(done);
        };
        let mut buf = self.shared.buffers.take(data.len());
        buf.as_mut().copy_from_slice(data);
        Ok(self.start(disk.clone(), t, buf, Done::Write(done)))
    }
}

/// Whether a translation can be carried out on a buffer of `len` bytes:
/// pieces in order, not overlapping, inside it; for a write
/// (`covering`), every byte lands somewhere.
pub fn usable(t: &Translation, len: usize) -> bool {
    let mut end = 0;
    t.pieces.iter().all(|p| {
        let ok = p.at >= end && p.len > 0 && p.at + p.len <= len;
        end = p.at + p.len;
        ok
    })
}

/// Whether every byte of a `len`-byte write lands in some piece.
pub fn covers(t: &Translation, len: usize) -> bool {
    usable(t, len) && t.pieces.iter().map(|p| p.len).sum::<usize>() == len
}

/// Zeroes what no piece will fill (holes), in a reused buffer.
pub fn zero_gaps(buf: &mut [u8], pieces: &[HostPiece]) {
    let mut at = 0;
    for p in pieces {
        buf[at..p.at].fill(0);
        at = p.at + p.len;
    }
    buf[at..].fill(0);
}

/// Why the mount serves without io_uring, when it does.
pub fn unavailable_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring".into(),
        Some(libc::EPERM) => "io_uring is not permitted here (io_uring_disabled or seccomp)".into(),
        _ => format!("io_uring setup failed: {e}"),
    }
}

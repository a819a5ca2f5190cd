//! Chunk allocation and the rules for handing freed chunks out again.
//!
//! Invariants:
//! - A chunk handed out reads as zeros: it is either past the old end of
//!   the file (grown with `set_len`, a host hole) or a freed chunk whose
//!   range was punched when it was freed.
//! - A chunk is handed out only below the file's *durable* length: the file
//!   grows a batch of chunks at a time and is synced before any of them is
//!   used, so an entry that reaches the disk early (entries are written
//!   through at once, see `data.rs`) never points past the end after a
//!   power cut. The next batch is grown ahead, by a caller that holds no
//!   lock, once half of the current one is used, so writers rarely wait for
//!   that sync.
//! - A freed chunk waits in `pending` until a flush has made the entry
//!   change that released it durable *and* every I/O that might still hold
//!   the old translation has finished ([`IoGate`]); only then is it reused.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::MAX_CHUNK_NUMBER;

/// Chunks the file grows by at a time: half what it holds, within these
/// bounds, so a large sequential write pays for few syncs.
const GROWTH: (u64, u64) = (64, 4096);

fn batch(len: u64) -> u64 {
    (len / 2).clamp(GROWTH.0, GROWTH.1)
}

/// A chunk handed out, and whether the caller should grow the file ahead.
#[must_use]
pub struct Allocation {
    pub chunk: u64,
    pub grow_ahead: bool,
}

struct State {
    /// Chunks handed out or in use: everything at or past it is unused.
    end: u64,
    /// Chunks in the file, durable (its length divided by the chunk size).
    len: u64,
    /// A caller is growing the file (outside the lock).
    growing: bool,
    /// Chunks free for reuse, lowest first so that images stay compact.
    free: BTreeSet<u64>,
    /// Chunks released since the last flush's snapshot.
    pending: Vec<u64>,
}

pub struct Allocator {
    chunk_size: u64,
    state: Mutex<State>,
    grown: Condvar,
    /// Mirror of `state.end` for lock-free range checks of entries.
    end: AtomicU64,
}

impl Allocator {
    pub fn new(chunk_size: u64, end: u64) -> Allocator {
        Allocator {
            chunk_size,
            grown: Condvar::new(),
            state: Mutex::new(State {
                end,
                len: end,
                growing: false,
                free: BTreeSet::new(),
                pending: Vec::new(),
            }),
            end: AtomicU64::new(end),
        }
    }

    /// Chunks in use or handed out; entries must point below it.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Hands out one zero-reading chunk. When the answer says so, the
    /// caller should call [`Allocator::grow`] once it holds no lock.
    pub fn allocate(&self, storage: &dyn Storage) -> Result<Allocation> {
        let mut s = self.state.lock();
        if let Some(n) = s.free.pop_first() {
            return Ok(Allocation {
                chunk: n,
                grow_ahead: false,
            });
        }
        loop {
            let n = s.end;
            if n >= MAX_CHUNK_NUMBER {
                return Err(Error::io(
                    "allocating a chunk",
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
            if n < s.len {
                s.end = n + 1;
                self.end.store(n + 1, Ordering::Release);
                let grow_ahead = !s.growing && s.len - s.end <= batch(s.len) / 2;
                s.growing |= grow_ahead;
                return Ok(Allocation {
                    chunk: n,
                    grow_ahead,
                });
            }
            if s.growing {
                self.grown.wait(&mut s);
                continue;
            }
            // The durable part is used up: grow now, this caller waits.
            s.growing = true;
            drop(s);
            let r = self.grow(storage);
            s = self.state.lock();
            r?;
        }
    }

    /// Grows the file by one batch and makes the length durable. Called
    /// by [`Allocator::allocate`] itself when the durable part ran out, or
    /// by its caller, holding no lock, when the answer asked to grow ahead;
    /// either way `growing` is set.
    pub fn grow(&self, storage: &dyn Storage) -> Result<()> {
        let target = {
            let s = self.state.lock();
            (s.len + batch(s.len)).min(MAX_CHUNK_NUMBER)
        };
        let r = storage
            .extend(target * self.chunk_size)
            .map_err(|e| Error::io("growing the container", e));
        let mut s = self.state.lock();
        if r.is_ok() {
            s.len = target;
        }
        s.growing = false;
        self.grown.notify_all();
        r
    }

    /// Records a chunk whose entry no longer points at it (already punched).
    pub fn release(&self, n: u64) {
        self.state.lock().pending.push(n);
    }

    /// Takes the chunks released so far; a flush calls it before it
    /// snapshots the index, so their entry changes are in that snapshot.
    pub fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut self.state.lock().pending)
    }

    /// Makes chunks reusable (after the flush and a grace period).
    pub fn make_free(&self, chunks: Vec<u64>) {
        self.state.lock().free.extend(chunks);
    }

    /// Puts back chunks that a failed flush could not make durable.
    pub fn restore_pending(&self, chunks: Vec<u64>) {
        self.state.lock().pending.extend(chunks);
    }

    pub fn free_count(&self) -> usize {
        self.state.lock().free.len()
    }

    /// Gives back the chunks grown but never handed out (on close).
    /// Returns whether the file changed.
    pub fn trim_tail(&self, storage: &dyn Storage) -> std::io::Result<bool> {
        let mut s = self.state.lock();
        if s.len <= s.end {
            return Ok(false);
        }
        storage.set_len(s.end * self.chunk_size)?;
        s.len = s.end;
        Ok(true)
    }

    /// Sets the chunk count after the file was rewritten (compaction).
    pub fn reset(&self, end: u64) {
        let mut s = self.state.lock();
        s.free.clear();
        s.pending.clear();
        s.end = end;
        s.len = end;
        self.end.store(end, Ordering::Release);
    }
}

/// A two-epoch grace period: every data-path I/O holds a [`GateGuard`];
/// [`IoGate::wait_for_readers`] returns once every I/O that started before
/// it has finished. No I/O ever waits on the gate.
pub struct IoGate {
    epoch: AtomicUsize,
    active: [AtomicUsize; 2],
    flip: Mutex<()>,
}

pub struct GateGuard<'a> {
    gate: &'a IoGate,
    slot: usize,
}

impl IoGate {
    pub fn new() -> IoGate {
        IoGate {
            epoch: AtomicUsize::new(0),
            active: [AtomicUsize::new(0), AtomicUsize::new(0)],
            flip: Mutex::new(()),
        }
    }

    pub fn enter(&self) -> GateGuard<'_> {
        loop {
            let slot = self.epoch.load(Ordering::SeqCst) & 1;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            // If the epoch moved between the load and the increment, the
            // waiter may already have seen this slot empty: go again.
            if self.epoch.load(Ordering::SeqCst) & 1 == slot {
                return GateGuard { gate: self, slot };
            }
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn wait_for_readers(&self) {
        // After each wait every live guard sits in the current slot, so
        // flipping once and draining the old slot covers all earlier I/O.
        let _one_at_a_time = self.flip.lock();
        let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        while self.active[old].load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
    }
}

impl Default for IoGate {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.gate.active[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn gate_waits_for_io_started_before() {
        let gate = Arc::new(IoGate::new());
        let g = gate.enter();
        let (tx, rx) = std::sync::mpsc::channel();
        let g2 = gate.clone();
        let t = std::thread::spawn(move || {
            g2.wait_for_readers();
            tx.send(()).unwrap();
        });
        // The waiter cannot finish while the guard lives.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(g);
        rx.recv().unwrap();
        t.join().unwrap();
        // New I/O does not block the next wait.
        let _g = gate.enter();
        drop(_g);
        gate.wait_for_readers();
    }
}

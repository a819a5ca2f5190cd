//! Chunk allocation and the rules for handing freed chunks out again.
//!
//! Invariants:
//! - A chunk handed out reads as zeros: it is either past the old end of
//!   the file (grown with `set_len`, a host hole) or a freed chunk whose
//!   range was punched after every I/O that could still reach it ended.
//! - A chunk is handed out only below the file's *durable* length: the file
//!   grows a batch of chunks at a time and is synced before any of them is
//!   used, so an entry that reaches the disk early (entries are written
//!   through at once, see `data.rs`) never points past the end after a
//!   power cut. The next batch is grown ahead, by a caller that holds no
//!   lock, once half of the current one is used, so writers rarely wait for
//!   that sync.
//! - A chunk leaves an entry as a [`Released`] token. Only a flush turns
//!   tokens into free chunks: after the entry change that released them is
//!   durable, after every I/O that might still hold the old translation has
//!   finished ([`IoGate`]), and after a fresh, durable punch (a write that
//!   translated before the release may have landed after the first punch).
//! - The free set is kept as ranges and capped ([`MAX_FREE_RANGES`]), so
//!   its memory is bounded whatever the file's size; what does not fit
//!   stays unused until `compact` or the next open.

use std::collections::BTreeMap;

use super::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use super::sync::{Condvar, Mutex};
use super::types::PhysChunk;
use crate::asif::format::MAX_CHUNK_NUMBER;
use crate::error::{Error, Result};
use crate::host::file::Storage;

/// Chunks the file grows by at a time: half what it holds, within these
/// bounds, so a large sequential write pays for few syncs.
const GROWTH: (u64, u64) = (64, 4096);

/// Most free ranges remembered (about 40 bytes each).
pub const MAX_FREE_RANGES: usize = 1 << 18;

fn batch(len: u64) -> u64 {
    (len / 2).clamp(GROWTH.0, GROWTH.1)
}

/// A chunk handed out, and whether the caller should grow the file ahead.
#[must_use]
pub struct Allocation {
    pub chunk: PhysChunk,
    pub grow_ahead: bool,
}

/// A chunk that an entry no longer names, already punched once. It must
/// reach [`Allocator::release`]; only a flush makes it reusable.
#[must_use = "a released chunk must be handed to Allocator::release"]
#[derive(Debug)]
pub struct Released(PhysChunk);

impl Released {
    /// Made only where an entry that named `n` has just been unmapped.
    pub(super) fn new(n: PhysChunk) -> Released {
        Released(n)
    }

    pub fn chunk(&self) -> PhysChunk {
        self.0
    }
}

/// Free chunks as `start -> end` ranges, lowest handed out first so that
/// images stay compact.
#[derive(Default, Debug)]
pub struct FreeRanges {
    ranges: BTreeMap<u64, u64>,
    count: u64,
    /// Chunks not remembered because the cap was reached.
    pub dropped: u64,
}

impl FreeRanges {
    /// Adds `start..end`, which must not overlap a range already held.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut s = start;
        let mut e = end;
        if let Some((&ps, &pe)) = self.ranges.range(..start).next_back() {
            debug_assert!(pe <= start, "free ranges overlap");
            if pe == start {
                s = ps;
                self.ranges.remove(&ps);
            }
        }
        if let Some(ne) = self.ranges.remove(&end) {
            e = ne;
        }
        if self.ranges.len() >= MAX_FREE_RANGES && (s, e) == (start, end) {
            self.dropped += end - start;
            return;
        }
        self.ranges.insert(s, e);
        self.count += end - start;
    }

    pub fn pop_first(&mut self) -> Option<u64> {
        let (s, e) = self.ranges.pop_first()?;
        if s + 1 < e {
            self.ranges.insert(s + 1, e);
        }
        self.count -= 1;
        Some(s)
    }

    /// Chunks held.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

struct State {
    /// Chunks handed out or in use: everything at or past it is unused.
    end: u64,
    /// Chunks in the file, durable (its length divided by the chunk size).
    len: u64,
    /// A caller is growing the file (outside the lock).
    growing: bool,
    free: FreeRanges,
    /// Chunks released since the last flush's snapshot.
    pending: Vec<Released>,
}

pub struct Allocator {
    chunk_size: u64,
    /// One past the largest chunk number: an entry holds 55 bits, and a
    /// file offset must fit in an `off_t`.
    limit: u64,
    state: Mutex<State>,
    grown: Condvar,
    /// Mirror of `state.end` for lock-free range checks of entries.
    end: AtomicU64,
}

impl Allocator {
    pub fn new(chunk_size: u64, end: u64) -> Allocator {
        Allocator {
            chunk_size,
            limit: MAX_CHUNK_NUMBER.min(i64::MAX as u64 / chunk_size),
            grown: Condvar::new(),
            state: Mutex::new(State {
                end,
                len: end,
                growing: false,
                free: FreeRanges::default(),
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
                chunk: PhysChunk(n),
                grow_ahead: false,
            });
        }
        loop {
            let n = s.end;
            if n >= self.limit {
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
                    chunk: PhysChunk(n),
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
            (s.len + batch(s.len)).min(self.limit)
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

    /// Takes a chunk whose entry no longer names it; a flush frees it.
    pub fn release(&self, r: Released) {
        self.state.lock().pending.push(r);
    }

    /// Takes the chunks released so far; a flush calls it before it
    /// snapshots the index, so their entry changes are in that snapshot.
    pub fn take_pending(&self) -> Vec<Released> {
        std::mem::take(&mut self.state.lock().pending)
    }

    /// Puts back chunks that a failed flush could not recycle.
    pub fn restore_pending(&self, chunks: Vec<Released>) {
        self.state.lock().pending.extend(chunks);
    }

    /// Makes released chunks reusable. The caller (a flush) has made their
    /// release durable, waited out the grace period and punched them again
    /// durably; taking the tokens is its proof of that order.
    pub fn recycle(&self, chunks: Vec<Released>) {
        let mut s = self.state.lock();
        for Released(n) in chunks {
            s.free.insert(n.0, n.0 + 1);
        }
    }

    /// Adds the chunks an index scan found unused (each punched durably).
    /// Only chunks below the end seen by the scan, which the session has
    /// not touched since: the scan ran before any write was allowed.
    pub fn add_scanned(&self, free: &FreeRanges) {
        let mut s = self.state.lock();
        for (a, b) in free.iter() {
            s.free.insert(a, b);
        }
    }

    pub fn free_count(&self) -> u64 {
        self.state.lock().free.count()
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
        s.free = FreeRanges::default();
        debug_assert!(s.pending.is_empty());
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
        GateGuard {
            gate: self,
            slot: self.enter_slot(),
        }
    }

    /// As [`IoGate::enter`], for I/O that completes on another thread.
    pub fn enter_owned(self: &std::sync::Arc<Self>) -> OwnedGateGuard {
        OwnedGateGuard {
            gate: self.clone(),
            slot: self.enter_slot(),
        }
    }

    fn enter_slot(&self) -> usize {
        loop {
            let slot = self.epoch.load(Ordering::SeqCst) & 1;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            // If the epoch moved between the load and the increment, the
            // waiter may already have seen this slot empty: go again.
            if self.epoch.load(Ordering::SeqCst) & 1 == slot {
                return slot;
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

/// A [`GateGuard`] that keeps its gate alive.
pub struct OwnedGateGuard {
    gate: std::sync::Arc<IoGate>,
    slot: usize,
}

impl Drop for OwnedGateGuard {
    fn drop(&mut self) {
        self.gate.active[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn free_ranges_merge_and_hand_out_lowest_first() {
        let mut f = FreeRanges::default();
        f.insert(10, 12);
        f.insert(5, 6);
        f.insert(6, 10);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(5, 12)]);
        assert_eq!(f.count(), 7);
        assert_eq!(f.pop_first(), Some(5));
        f.insert(20, 21);
        f.insert(12, 20);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(6, 21)]);
        let got: Vec<_> = std::iter::from_fn(|| f.pop_first()).collect();
        assert_eq!(got, (6..21).collect::<Vec<_>>());
        assert_eq!(f.count(), 0);
    }

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

//! One bound on the write payload bytes held by all connections at once.
//!
//! A payload is read in pieces of at most [`PIECE`] bytes, and room for a
//! piece is taken just before it is read, so memory follows the bytes a
//! client actually sends, never the length it announces.
//!
//! Taking room piece by piece could deadlock: payloads each holding part of
//! the bound, all waiting for more. So a piece is granted only if, after
//! the grant, the payloads still being read can all finish in some order
//! with what is free plus what the earlier ones give back (the banker's
//! test). Finished payloads (waiting for their disk write) need nothing
//! more and count as given back. A client that stops sending is dropped by
//! its payload deadline, which gives its room back too.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Largest piece of a payload read at once (and the largest single
/// reservation).
pub const PIECE: u64 = 1024 * 1024;

struct State {
    /// Bytes granted and not yet given back.
    used: u64,
    /// Payloads still being read: id -> (bytes held, bytes still to come).
    reading: BTreeMap<u64, (u64, u64)>,
    next_id: u64,
    /// Grants waiting for room (a wake is a syscall, so none without one).
    waiting: usize,
}

/// Room for payload bytes, shared by every connection of a server.
pub struct Room {
    limit: u64,
    state: Mutex<State>,
    freed: Condvar,
}

impl Room {
    /// `limit` must be at least the largest payload, so that a payload
    /// alone always fits.
    pub fn new(limit: u64) -> Room {
        Room {
            limit,
            state: Mutex::new(State {
                used: 0,
                reading: BTreeMap::new(),
                next_id: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes granted now (for tests and logs).
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// A payload of `len` bytes about to be read; it holds nothing yet.
    pub fn start(&self, len: u64) -> Grant<'_> {
        assert!(len <= self.limit, "payload over the room's limit");
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.reading.insert(id, (0, len));
        Grant {
            room: self,
            id,
            held: 0,
        }
    }

    /// Whether giving `n` more bytes to payload `id` leaves a state where
    /// every payload being read can still finish.
    fn safe(&self, s: &State, id: u64, n: u64) -> bool {
        if s.used + n > self.limit {
            return false;
        }
        let mut needs: Vec<(u64, u64)> = Vec::with_capacity(s.reading.len());
        let mut held_by_reading = 0;
        for (&k, &(held, left)) in &s.reading {
            let (held, left) = if k == id {
                (held + n, left - n)
            } else {
                (held, left)
            };
            if left > 0 {
                needs.push((left, held));
                held_by_reading += held;
            }
        }
        // Finished payloads give everything back without asking for more.
        let mut avail = self.limit - held_by_reading;
        needs.sort_unstable();
        for (left, held) in needs {
            if left > avail {
                return false;
            }
            avail += held;
        }
        true
    }
}

/// The room one payload holds; given back when dropped.
pub struct Grant<'a> {
    room: &'a Room,
    id: u64,
    held: u64,
}

impl Grant<'_> {
    /// Waits until `n` more bytes (at most what is still to come) may be
    /// held; returns whether it had to wait.
    pub fn grow(&mut self, n: u64) -> bool {
        let mut s = self.room.lock();
        let mut waited = false;
        while !self.room.safe(&s, self.id, n) {
            waited = true;
            s.waiting += 1;
            s = self.room.freed.wait(s).unwrap_or_else(|p| p.into_inner());
            s.waiting -= 1;
        }
        s.used += n;
        let e = s.reading.get_mut(&self.id).expect("a grant is registered");
        e.0 += n;
        e.1 -= n;
        self.held += n;
        waited
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        let mut s = self.room.lock();
        s.used -= self.held;
        s.reading.remove(&self.id);
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.room.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const M: u64 = PIECE;

    #[test]
    fn grants_that_could_deadlock_wait() {
        let room = Room::new(4 * M);
        let mut a = room.start(3 * M);
        let mut b = room.start(3 * M);
        assert!(!a.grow(M));
        assert!(!b.grow(M));
        // a can still finish with the 1 M left afterwards.
        assert!(!a.grow(M));
        // A piece for b now would leave both needing 1 M with none free.
        let s = room.lock();
        assert!(!room.safe(&s, b.id, M));
        assert!(room.safe(&s, a.id, M));
        drop(s);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(move || {
                b.grow(M);
                b
            });
            // b waits until a is written and gives its room back.
            a.grow(M);
            drop(a);
            let b = waiter.join().unwrap();
            assert_eq!(room.used(), 2 * M);
            drop(b);
        });
        assert_eq!(room.used(), 0);
    }

    /// Two payloads as large as the room: the second waits for the whole
    /// first (neither could finish holding a part each).
    #[test]
    fn payloads_as_large_as_the_room_go_one_at_a_time() {
        let room = Room::new(4 * M);
        let mut a = room.start(4 * M);
        let b = room.start(4 * M);
        a.grow(M);
        let s = room.lock();
        assert!(!room.safe(&s, b.id, M));
        drop(s);
    }

    #[test]
    fn finished_payloads_count_as_given_back() {
        let room = Room::new(4 * M);
        let mut done = room.start(M);
        done.grow(M);
        let mut a = room.start(4 * M);
        let s = room.lock();
        // 3 M free now, but a's 4 M will be there once `done` is written.
        assert!(room.safe(&s, a.id, M));
        drop(s);
        a.grow(M);
        drop(done);
        for _ in 0..3 {
            a.grow(M);
        }
        assert_eq!(room.used(), 4 * M);
    }

    /// Many payloads larger than half the limit, read piece by piece from
    /// many threads: all finish, and the bound is never passed.
    #[test]
    fn contended_payloads_all_finish_under_the_bound() {
        let room = Room::new(5 * M);
        let peak = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let (room, peak) = (&room, &peak);
                scope.spawn(move || {
                    for round in 0..4 {
                        let len = 3 * M + (t + round) % 3 * M / 2;
                        let mut g = room.start(len);
                        let mut got = 0;
                        while got < len {
                            let n = (len - got).min(M);
                            g.grow(n);
                            got += n;
                            peak.fetch_max(room.used(), Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(room.used(), 0);
        assert!(peak.load(Ordering::SeqCst) <= 5 * M);
    }
}

//! The hand-off of requests from a connection's reader to its workers.
//!
//! An idle worker sleeps on a condvar and is woken only when a request
//! comes and no worker is free. It never spins or yields: with few cores,
//! idle workers spinning in a channel's receive took the CPU from the
//! client and the busy threads (4 KiB reads at queue depth 32 on two
//! cores lost a quarter of their rate to it once replies no longer held
//! workers back).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

struct State<T> {
    queue: VecDeque<T>,
    /// No more items will be pushed.
    closed: bool,
    /// Workers sleeping in [`Jobs::pop`].
    idle: usize,
    /// One of them was woken and has not taken the lock yet.
    waking: bool,
    /// Workers that have not left.
    workers: usize,
    /// The pusher sleeps until there is room.
    full: bool,
}

/// A bounded queue from one pusher to many workers.
pub struct Jobs<T> {
    state: Mutex<State<T>>,
    /// An item came, or the queue closed.
    ready: Condvar,
    /// An item was taken, or the last worker left.
    room: Condvar,
    bound: usize,
}

impl<T> Jobs<T> {
    /// A queue holding at most `bound` items (at least one).
    pub fn new(bound: usize) -> Self {
        Jobs {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(bound.max(1)),
                closed: false,
                idle: 0,
                waking: false,
                workers: 0,
                full: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            bound: bound.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a worker; it leaves when the guard is dropped (also on
    /// a panic), so the pusher learns when none is left.
    pub fn join(&self) -> Worker<'_, T> {
        self.lock().workers += 1;
        Worker { jobs: self }
    }

    /// The pushing side; the queue closes when it is dropped (also on a
    /// panic), so workers never wait for items that cannot come.
    pub fn pusher(&self) -> Pusher<'_, T> {
        Pusher { jobs: self }
    }

    /// Queues `item`, waiting while the queue is full; gives it back if
    /// no worker is left to take it.
    fn push(&self, item: T) -> Result<(), T> {
        let mut s = self.lock();
        while s.workers > 0 && s.queue.len() >= self.bound {
            s.full = true;
            s = self.room.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.full = false;
        if s.workers == 0 {
            return Err(item);
        }
        s.queue.push_back(item);
        self.wake_one(s);
        Ok(())
    }

    /// Wakes a sleeping worker for what is queued, unless one is already
    /// on its way: that one wakes the next if more is queued, so a burst of
    /// items costs the pusher (the connection's reader) one wake, not one
    /// each. None at all if every worker is busy: a wake is a syscall, and
    /// a busy worker takes the item when it is done.
    fn wake_one(&self, mut s: MutexGuard<'_, State<T>>) {
        let wake = !s.queue.is_empty() && s.idle > 0 && !s.waking;
        if wake {
            s.waking = true;
        }
        drop(s);
        if wake {
            self.ready.notify_one();
        }
    }

    /// No more items: workers finish what is queued, then leave.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// Where items go in; see [`Jobs::pusher`].
pub struct Pusher<'a, T> {
    jobs: &'a Jobs<T>,
}

impl<T> Pusher<'_, T> {
    /// Queues `item`, waiting while the queue is full; gives it back if
    /// no worker is left to take it.
    pub fn push(&self, item: T) -> Result<(), T> {
        self.jobs.push(item)
    }
}

impl<T> Drop for Pusher<'_, T> {
    fn drop(&mut self) {
        self.jobs.close();
    }
}

/// A worker's place at the queue.
pub struct Worker<'a, T> {
    jobs: &'a Jobs<T>,
}

impl<T> Worker<'_, T> {
    /// The next item, sleeping until there is one; `None` once the queue
    /// is closed and empty.
    pub fn pop(&self) -> Option<T> {
        let j = self.jobs;
        let mut s = j.lock();
        loop {
            if let Some(item) = s.queue.pop_front() {
                if s.full {
                    j.room.notify_one();
                }
                j.wake_one(s);
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s.idle += 1;
            s = j.ready.wait(s).unwrap_or_else(|p| p.into_inner());
            s.idle -= 1;
            s.waking = false;
        }
    }
}

impl<T> Iterator for Worker<'_, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.pop()
    }
}

impl<T> Drop for Worker<'_, T> {
    fn drop(&mut self) {
        let mut s = self.jobs.lock();
        s.workers -= 1;
        let last = s.workers == 0;
        drop(s);
        if last {
            self.jobs.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_is_taken_once_then_workers_leave() {
        let jobs = Jobs::new(4);
        let sum = AtomicUsize::new(0);
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                let w = jobs.join();
                let (sum, count) = (&sum, &count);
                s.spawn(move || {
                    for i in w {
                        sum.fetch_add(i, Ordering::Relaxed);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let p = jobs.pusher();
            for i in 1..=10_000 {
                p.push(i).unwrap();
            }
        });
        assert_eq!(count.into_inner(), 10_000);
        assert_eq!(sum.into_inner(), 10_000 * 10_001 / 2);
    }

    #[test]
    fn push_fails_once_no_worker_is_left() {
        let jobs = Jobs::new(1);
        let p = jobs.pusher();
        assert_eq!(p.push(1), Err(1));
        let w = jobs.join();
        p.push(2).unwrap();
        std::thread::scope(|s| {
            // The queue is full: the push waits until the worker leaves.
            s.spawn(|| assert_eq!(p.push(3), Err(3)));
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(w);
        });
    }

    #[test]
    fn a_full_queue_waits_for_a_taker() {
        let jobs = Jobs::new(1);
        let w = jobs.join();
        let p = jobs.pusher();
        p.push(1).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| p.push(2).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(w.pop(), Some(1));
            assert_eq!(w.pop(), Some(2));
        });
        drop(p);
        assert_eq!(w.pop(), None);
    }

    #[test]
    fn a_pusher_that_panics_still_lets_workers_leave() {
        let jobs = Jobs::<u32>::new(4);
        std::thread::scope(|s| {
            let w = jobs.join();
            let worker = s.spawn(move || w.count());
            let pushed = s.spawn(|| {
                let p = jobs.pusher();
                p.push(1).unwrap();
                panic!("the reader failed");
            });
            assert!(pushed.join().is_err());
            assert_eq!(worker.join().unwrap(), 1);
        });
    }
}

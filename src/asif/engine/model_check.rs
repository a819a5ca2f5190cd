//! Model checks of the concurrency core: the group cache, the I/O gate and
//! the allocator's release → flush → reuse flow, run under shuttle's
//! schedulers (`sync.rs` swaps in its locks and atomics). Each test runs a
//! small scenario over many thread interleavings and asserts the module's
//! invariants; shuttle also fails a run that deadlocks. Run with:
//!
//! `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test --release --lib model_check`
//!
//! A failure prints a schedule and a seed; `SHUTTLE_RANDOM_SEED=<seed>`
//! replays it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex as StdMutex, Weak};

use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
use shuttle::thread;

use super::alloc::{Allocator, IoGate, Released};
use super::cache::{Group, GroupCache};
use super::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use super::types::{GroupKey, PhysChunk};
use crate::asif::format::ChunkState;
use crate::host::file::Storage;

/// Runs `f` under one scheduler for `iterations` interleavings.
fn run(scheduler: impl Scheduler + 'static, f: impl Fn() + Send + Sync + 'static) {
    let mut config = shuttle::Config::new();
    // Shuttle runs every atomic as SeqCst and would warn about the
    // engine's Acquire/Release ones; the gate's are SeqCst already.
    config.silence_warnings = true;
    shuttle::Runner::new(scheduler, config).run(f);
}

/// Random walks plus PCT (which favours the deep, few-switch schedules
/// that random walks rarely hit). PCT only for code without spin loops:
/// the gate spins with `std::thread::yield_now`, which PCT cannot see, so
/// a spinner it favours would run into the step limit.
fn explore(iterations: usize, f: impl Fn() + Send + Sync + Clone + 'static) {
    run(RandomScheduler::new(iterations), f.clone());
    run(PctScheduler::new(3, iterations), f);
}

// ---- GroupCache ----

/// Data entries per group in the model.
const ENTRIES: usize = 2;

/// The model's container: group key → the group's bytes.
#[derive(Default)]
struct Disk(StdMutex<HashMap<u64, Vec<u8>>>);

impl Disk {
    fn read(&self, key: u64) -> Vec<u8> {
        let d = self.0.lock().unwrap();
        d.get(&key)
            .cloned()
            .unwrap_or_else(|| vec![0; 8 * (ENTRIES + 1)])
    }

    fn write(&self, key: u64, bytes: &[u8]) {
        self.0.lock().unwrap().insert(key, bytes.to_vec());
    }
}

/// Every group handle the scenario got, to prove there is never a second
/// copy of a key: all live handles of one key are one allocation.
#[derive(Default)]
struct Handles(StdMutex<Vec<(u64, Weak<Group>)>>);

impl Handles {
    fn add(&self, g: &Arc<Group>) {
        let mut v = self.0.lock().unwrap();
        v.retain(|(_, w)| w.strong_count() > 0);
        for (k, w) in v.iter() {
            assert!(
                *k != g.key.0 || std::ptr::eq(w.as_ptr(), Arc::as_ptr(g)),
                "two copies of group {k} alive"
            );
        }
        v.push((g.key.0, Arc::downgrade(g)));
    }

    fn any_alive(&self, key: u64) -> bool {
        let v = self.0.lock().unwrap();
        v.iter().any(|(k, w)| *k == key && w.strong_count() > 0)
    }
}

struct CacheModel {
    cache: GroupCache,
    disk: Disk,
    handles: Handles,
    /// (key, entry) → the last chunk number written there.
    last: StdMutex<HashMap<(u64, usize), u64>>,
}

impl CacheModel {
    fn new(capacity: usize) -> CacheModel {
        CacheModel {
            cache: GroupCache::new(capacity),
            disk: Disk::default(),
            handles: Handles::default(),
            last: StdMutex::default(),
        }
    }

    fn get(&self, key: u64) -> Arc<Group> {
        let g = self
            .cache
            .get_or_load(GroupKey(key), || {
                assert!(
                    !self.handles.any_alive(key),
                    "group {key} read from disk while a copy is alive"
                );
                let bytes = self.disk.read(key);
                // A read takes time: let the others run meanwhile.
                thread::yield_now();
                Ok::<_, ()>(Some(Group::decode(
                    GroupKey(key),
                    key << 12,
                    &bytes,
                    |_, _| true,
                )))
            })
            .unwrap()
            .unwrap();
        self.handles.add(&g);
        g
    }

    /// Maps `(key, entry)` to chunk `n` the way the engine changes a group.
    fn set(&self, key: u64, entry: usize, n: u64) {
        let g = self.get(key);
        self.cache.write(&g).set_state(entry, ChunkState::Full(n));
        self.last.lock().unwrap().insert((key, entry), n);
    }

    /// What a flush does with the cache: snapshot, write, mark clean.
    fn flush(&self) {
        let snap = self.cache.dirty_snapshot();
        for d in &snap {
            self.disk.write(d.group.key.0, &d.bytes);
            thread::yield_now();
        }
        self.cache.mark_clean(&snap);
    }

    /// After the threads are done: one last flush, then every change must
    /// be both on the model disk and in what the cache hands out.
    fn check_nothing_lost(&self) {
        self.flush();
        assert_eq!(self.cache.dirty_len(), 0, "a flush left groups dirty");
        let last = self.last.lock().unwrap().clone();
        for (&(key, entry), &n) in &last {
            let on_disk = Group::decode(GroupKey(key), 0, &self.disk.read(key), |_, _| true);
            assert_eq!(
                on_disk.state(entry),
                Some(ChunkState::Full(n)),
                "change to group {key} entry {entry} never reached the disk"
            );
            assert_eq!(
                self.get(key).state(entry),
                Some(ChunkState::Full(n)),
                "change to group {key} entry {entry} lost from the cache"
            );
        }
    }
}

/// Two writers share groups 1 and 2 (one entry each), a loader of other
/// keys keeps the one-group cache evicting, and a flusher writes back.
fn writers_evictor_flusher() -> Arc<CacheModel> {
    let m = Arc::new(CacheModel::new(1));
    let mut threads = Vec::new();
    for w in 0..ENTRIES {
        let m = m.clone();
        threads.push(thread::spawn(move || {
            for (round, key) in [1, 2, 1].into_iter().enumerate() {
                m.set(key, w, 10 * (w as u64 + 1) + round as u64);
            }
        }));
    }
    let evictor = m.clone();
    threads.push(thread::spawn(move || {
        for key in [7, 8] {
            drop(evictor.get(key));
        }
    }));
    let flusher = m.clone();
    threads.push(thread::spawn(move || {
        for _ in 0..2 {
            flusher.flush();
        }
    }));
    for t in threads {
        t.join().unwrap();
    }
    m
}

/// One copy per key (checked in `CacheModel::get`) and no deadlock.
#[test]
fn cache_keeps_one_copy() {
    explore(10_000, || {
        writers_evictor_flusher();
    });
}

/// A change made through `write()` survives flushes and eviction.
/// It found that `mark_clean` could run between a writer's store and its
/// generation bump, dropping the change from the dirty set.
#[test]
fn cache_loses_no_change() {
    explore(10_000, || writers_evictor_flusher().check_nothing_lost());
}

/// Several threads miss on one key at once: one read at a time, one copy,
/// and a failed read lets a waiter read instead of hanging it.
#[test]
fn cache_loads_each_key_once() {
    explore(10_000, || {
        let m = Arc::new(CacheModel::new(1));
        let reading = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for t in 0..3 {
            let (m, reading) = (m.clone(), reading.clone());
            threads.push(thread::spawn(move || {
                let r = m.cache.get_or_load(GroupKey(5), || {
                    assert_eq!(reading.fetch_add(1, SeqCst), 0, "two loads of one key");
                    thread::yield_now();
                    reading.fetch_sub(1, SeqCst);
                    // The first reader fails: its waiters must retry.
                    if t == 0 {
                        return Err(());
                    }
                    Ok(Some(Group::decode(
                        GroupKey(5),
                        0,
                        &m.disk.read(5),
                        |_, _| true,
                    )))
                });
                if let Ok(Some(g)) = r {
                    m.handles.add(&g);
                    // Hold it while another key is loaded: no eviction.
                    drop(m.get(6));
                    m.handles.add(&g);
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
    });
}

// ---- IoGate ----

/// Two readers take guards while a flusher waits for readers three times:
/// each wait returns only after every guard alive at its call is dropped.
#[test]
fn gate_waits_for_every_earlier_guard() {
    run(RandomScheduler::new(20_000), || {
        let gate = Arc::new(IoGate::new());
        // Per reader, bumped after enter() and before the guard drops:
        // odd while a guard is certainly alive.
        let seq: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let mut threads = Vec::new();
        for r in 0..2 {
            let (gate, seq) = (gate.clone(), seq.clone());
            threads.push(thread::spawn(move || {
                for _ in 0..2 {
                    let guard = gate.enter();
                    seq[r].fetch_add(1, SeqCst);
                    thread::yield_now();
                    seq[r].fetch_add(1, SeqCst);
                    drop(guard);
                }
            }));
        }
        for _ in 0..3 {
            let before: Vec<usize> = seq.iter().map(|s| s.load(SeqCst)).collect();
            gate.wait_for_readers();
            for (r, &b) in before.iter().enumerate() {
                assert!(
                    b % 2 == 0 || seq[r].load(SeqCst) > b,
                    "wait_for_readers returned while reader {r}'s guard lived"
                );
            }
        }
        for t in threads {
            t.join().unwrap();
        }
    });
}

// ---- Allocator ----

/// A container that only remembers its length.
#[derive(Default)]
struct MemStorage(StdMutex<u64>);

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], _: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(*self.0.lock().unwrap())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        *self.0.lock().unwrap() = len;
        Ok(())
    }
    fn punch(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn reserve(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(0)
    }
}

/// The chunks' owners as the scenario sees them.
#[derive(Default)]
struct Chunks {
    /// Named by an entry or handed out, and not released since.
    named: HashSet<u64>,
    /// Chunk → I/Os reading it through a translation taken under a guard.
    reading: HashMap<u64, usize>,
}

impl Chunks {
    fn start_read(&mut self, n: u64) {
        *self.reading.entry(n).or_default() += 1;
    }

    fn end_read(&mut self, n: u64) {
        *self.reading.get_mut(&n).unwrap() -= 1;
    }
}

/// Entries 0 and 1 name chunks 0 and 1. An I/O through entry 0 is in
/// flight from the start, another through entry 1 races, a discarder
/// unmaps and releases both, a flusher runs take_pending →
/// wait_for_readers → recycle, and two allocators take chunks. No chunk may
/// be handed out while named, nor while an I/O that translated to it
/// before its release is still running.
#[test]
fn released_chunks_are_reused_only_after_readers() {
    run(RandomScheduler::new(20_000), || {
        let alloc = Arc::new(Allocator::new(1, 2));
        let storage = Arc::new(MemStorage::default());
        let gate = Arc::new(IoGate::new());
        // Entry value: chunk + 1, 0 when unmapped.
        let entries: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(1), AtomicU64::new(2)]);
        let chunks = Arc::new(StdMutex::new(Chunks {
            named: HashSet::from([0, 1]),
            reading: HashMap::new(),
        }));
        let mut threads = Vec::new();

        let io = gate.enter();
        let first = entries[0].load(SeqCst) - 1;
        chunks.lock().unwrap().start_read(first);

        let (g, e, c) = (gate.clone(), entries.clone(), chunks.clone());
        threads.push(thread::spawn(move || {
            let _io = g.enter();
            if let Some(n) = e[1].load(SeqCst).checked_sub(1) {
                c.lock().unwrap().start_read(n);
                thread::yield_now();
                c.lock().unwrap().end_read(n);
            }
        }));

        let (a, e, c) = (alloc.clone(), entries.clone(), chunks.clone());
        threads.push(thread::spawn(move || {
            for entry in e.iter() {
                let n = entry.swap(0, SeqCst) - 1;
                c.lock().unwrap().named.remove(&n);
                a.release(Released::new(PhysChunk(n)));
            }
        }));

        let (a, g) = (alloc.clone(), gate.clone());
        threads.push(thread::spawn(move || {
            // Flush until both released chunks are free again.
            let mut freed = 0;
            while freed < 2 {
                let pending = a.take_pending();
                freed += pending.len();
                g.wait_for_readers();
                a.recycle(pending);
                thread::yield_now();
            }
        }));

        for _ in 0..2 {
            let (a, s, c) = (alloc.clone(), storage.clone(), chunks.clone());
            threads.push(thread::spawn(move || {
                for _ in 0..2 {
                    let got = a.allocate(&*s).unwrap();
                    if got.grow_ahead {
                        a.grow(&*s).unwrap();
                    }
                    let n = got.chunk.0;
                    let mut c = c.lock().unwrap();
                    assert!(c.named.insert(n), "chunk {n} handed out while named");
                    let r = c.reading.get(&n).copied().unwrap_or(0);
                    assert_eq!(r, 0, "chunk {n} handed out while an earlier I/O reads it");
                }
            }));
        }

        for _ in 0..3 {
            thread::yield_now();
        }
        chunks.lock().unwrap().end_read(first);
        drop(io);
        for t in threads {
            t.join().unwrap();
        }
    });
}

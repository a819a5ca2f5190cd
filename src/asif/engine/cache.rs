//! The bounded cache of chunk-groups, the index blocks of the translator.
//!
//! Invariants:
//! - **One copy.** Every group in memory is reachable from `resident`, and a
//!   group is read from disk only while its key is in `loading`, which at
//!   most one thread holds per key; others wait for it. So two copies of one
//!   group can never exist, and a change is never made to a copy that a
//!   later load would shadow.
//! - **Pinned while held.** A [`Group`] handle is an `Arc`; the cache evicts
//!   a group only when it holds the sole reference, so a group somebody is
//!   translating through, changing or flushing stays resident. The cache may
//!   run over its capacity by the number of groups pinned at that moment.
//! - **Dirty until written.** A group is changed only through a
//!   [`GroupWrite`], which puts it in the dirty set before and after each
//!   change, and the dirty set holds a reference, so a dirty group is never
//!   evicted. A flush removes it only if nothing changed since the bytes it
//!   wrote (model-checked in `model_check.rs`).
//! - Entries are atomics: translating an offset takes no lock once the group
//!   is cached.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lru::LruCache;

use super::sync::atomic::{AtomicU64, Ordering};
use super::sync::{Condvar, Mutex, MutexGuard};
use super::types::{GroupKey, PhysChunk};
use crate::asif::format::{be_u64, put_u64, ChunkEntry, ChunkState};

/// One chunk-group in memory: `N` data entries then the bitmap entry.
pub struct Group {
    pub key: GroupKey,
    /// Byte offset of the group in the container.
    pub disk_offset: u64,
    entries: Box<[AtomicU64]>,
    /// Indexes of entries found out of rule when loaded; touching them is
    /// an error. Our own updates never create one.
    invalid: Box<[u32]>,
    /// Bumped after every change; a flush records it to know whether the
    /// group changed again while it was being written.
    generation: AtomicU64,
    /// Serialises allocation, promotion and discard of this group's chunks.
    /// Never taken on the path that reads or overwrites an allocated chunk.
    pub alloc_lock: Mutex<()>,
}

impl Group {
    /// Builds a group from its on-disk bytes; `valid` says whether a data
    /// entry's raw value is acceptable in this image.
    pub fn decode(
        key: GroupKey,
        disk_offset: u64,
        bytes: &[u8],
        valid: impl Fn(usize, u64) -> bool,
    ) -> Group {
        let n = bytes.len() / 8;
        let entries: Box<[AtomicU64]> = (0..n)
            .map(|i| AtomicU64::new(be_u64(bytes, 8 * i)))
            .collect();
        let invalid = (0..n)
            .filter(|&i| !valid(i, entries[i].load(Ordering::Relaxed)))
            .map(|i| i as u32)
            .collect();
        Group {
            key,
            disk_offset,
            entries,
            invalid,
            generation: AtomicU64::new(0),
            alloc_lock: Mutex::new(()),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len() - 1
    }

    pub fn is_invalid(&self, index: usize) -> bool {
        !self.invalid.is_empty() && self.invalid.binary_search(&(index as u32)).is_ok()
    }

    pub fn raw(&self, index: usize) -> u64 {
        self.entries[index].load(Ordering::Acquire)
    }

    /// The decoded state of data entry `index`, `None` when out of rule.
    pub fn state(&self, index: usize) -> Option<ChunkState> {
        if self.is_invalid(index) {
            return None;
        }
        ChunkEntry(self.raw(index)).state()
    }

    /// Raw bitmap entry.
    pub fn bitmap_raw(&self) -> u64 {
        self.raw(self.len())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The group's on-disk bytes as they are in memory now.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.entries.len() * 8];
        for (i, e) in self.entries.iter().enumerate() {
            put_u64(&mut b, 8 * i, e.load(Ordering::Acquire));
        }
        b
    }

    fn store(&self, index: usize, raw: u64) {
        self.entries[index].store(raw, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The only way to change a group: obtained from [`GroupCache::write`].
/// The group is put in the dirty set before and again after each change:
/// a flush that took its bytes before the change may mark it clean between
/// the store and the generation bump, and must not have the last word.
pub struct GroupWrite<'a> {
    cache: &'a GroupCache,
    group: &'a Arc<Group>,
}

impl GroupWrite<'_> {
    /// Sets a data entry.
    pub fn set_state(&self, index: usize, state: ChunkState) {
        self.group.store(index, ChunkEntry::encode(state).0);
        self.cache.mark_dirty(self.group);
    }

    /// Points the group's bitmap entry at chunk `n`.
    pub fn set_bitmap(&self, n: PhysChunk) {
        self.group.store(self.group.len(), n.0);
        self.cache.mark_dirty(self.group);
    }
}

/// A dirty group as captured by [`GroupCache::dirty_snapshot`].
pub struct DirtyGroup {
    pub group: Arc<Group>,
    pub generation: u64,
    pub bytes: Vec<u8>,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
}

struct Inner {
    /// Every group in memory, most recently used first. Unbounded as a
    /// container; [`GroupCache::evict`] keeps it near `capacity`.
    resident: LruCache<GroupKey, Arc<Group>>,
    /// Keys being read from disk by one thread.
    loading: HashSet<GroupKey>,
    dirty: HashMap<GroupKey, Arc<Group>>,
    counters: CacheCounters,
}

/// The resident groups, the dirty set and the loads in progress.
pub struct GroupCache {
    capacity: usize,
    inner: Mutex<Inner>,
    loaded: Condvar,
}

impl GroupCache {
    pub fn new(capacity: usize) -> GroupCache {
        GroupCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                resident: LruCache::unbounded(),
                loading: HashSet::new(),
                dirty: HashMap::new(),
                counters: CacheCounters::default(),
            }),
            loaded: Condvar::new(),
        }
    }

    /// The group `key`, loaded by `load` if no copy is in memory. `load`
    /// runs without the cache lock, and only in one thread per key at a
    /// time; `Ok(None)` from it (no table there) is passed on, not cached.
    pub fn get_or_load<E>(
        &self,
        key: GroupKey,
        load: impl FnOnce() -> Result<Option<Group>, E>,
    ) -> Result<Option<Arc<Group>>, E> {
        let mut g = self.inner.lock();
        loop {
            if let Some(grp) = g.resident.get(&key).cloned() {
                g.counters.hits += 1;
                return Ok(Some(grp));
            }
            if !g.loading.contains(&key) {
                break;
            }
            self.loaded.wait(&mut g);
        }
        g.counters.misses += 1;
        g.loading.insert(key);
        drop(g);
        // If `load` panics the key must not stay "loading" forever.
        let guard = LoadingGuard { cache: self, key };
        let r = load();
        let mut g = guard.finish();
        let out = match r {
            Ok(Some(grp)) => {
                debug_assert_eq!(grp.key, key);
                let grp = Arc::new(grp);
                g.resident.put(key, grp.clone());
                self.evict(&mut g);
                Ok(Some(grp))
            }
            other => other.map(|_| None),
        };
        drop(g);
        self.loaded.notify_all();
        out
    }

    /// Drops the least recently used groups that nobody holds, until the
    /// cache is back at its capacity or only pinned groups are left.
    fn evict(&self, g: &mut Inner) {
        let excess = g.resident.len().saturating_sub(self.capacity);
        if excess == 0 {
            return;
        }
        let victims: Vec<GroupKey> = g
            .resident
            .iter()
            .rev()
            .filter(|(_, grp)| Arc::strong_count(grp) == 1)
            .map(|(k, _)| *k)
            .take(excess)
            .collect();
        for k in victims {
            g.resident.pop(&k);
        }
    }

    /// Marks `grp` dirty and returns the handle to change it with.
    pub fn write<'a>(&'a self, grp: &'a Arc<Group>) -> GroupWrite<'a> {
        self.mark_dirty(grp);
        GroupWrite {
            cache: self,
            group: grp,
        }
    }

    /// Also called after each change: a flush that snapshotted before the
    /// change may have marked the group clean in between.
    fn mark_dirty(&self, grp: &Arc<Group>) {
        let mut g = self.inner.lock();
        g.dirty.entry(grp.key).or_insert_with(|| grp.clone());
    }

    /// The dirty groups, each with its bytes and the generation they are
    /// at least as new as. The bytes are taken now, so that nothing changed
    /// after this call (a chunk allocated later) can reach the disk with it.
    pub fn dirty_snapshot(&self) -> Vec<DirtyGroup> {
        let groups: Vec<Arc<Group>> = self.inner.lock().dirty.values().cloned().collect();
        let mut v: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let generation = group.generation();
                let bytes = group.encode();
                DirtyGroup {
                    group,
                    generation,
                    bytes,
                }
            })
            .collect();
        v.sort_by_key(|d| d.group.disk_offset);
        v
    }

    /// Marks clean the groups whose generation did not move since written.
    pub fn mark_clean(&self, written: &[DirtyGroup]) {
        let mut g = self.inner.lock();
        for d in written {
            if d.group.generation() == d.generation {
                g.dirty.remove(&d.group.key);
            }
        }
    }

    pub fn dirty_len(&self) -> usize {
        self.inner.lock().dirty.len()
    }

    pub fn resident_len(&self) -> usize {
        self.inner.lock().resident.len()
    }

    pub fn counters(&self) -> CacheCounters {
        self.inner.lock().counters
    }

    /// Drops every group after tables moved (compaction holds the image
    /// exclusively and has flushed: nothing is dirty or held).
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        debug_assert!(g.dirty.is_empty() && g.loading.is_empty());
        g.resident.clear();
    }
}

/// Clears a key's "loading" mark even if the load unwinds.
struct LoadingGuard<'a> {
    cache: &'a GroupCache,
    key: GroupKey,
}

impl<'a> LoadingGuard<'a> {
    fn finish(self) -> MutexGuard<'a, Inner> {
        let mut g = self.cache.inner.lock();
        g.loading.remove(&self.key);
        std::mem::forget(self);
        g
    }
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        self.cache.inner.lock().loading.remove(&self.key);
        self.cache.loaded.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn zeroed(key: u64, entries: usize) -> Group {
        Group::decode(
            GroupKey(key),
            key * 1000,
            &vec![0u8; 8 * (entries + 1)],
            |_, _| true,
        )
    }

    fn load(c: &GroupCache, key: u64) -> Arc<Group> {
        c.get_or_load(GroupKey(key), || Ok::<_, ()>(Some(zeroed(key, 4))))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn dirty_groups_survive_eviction() {
        let c = GroupCache::new(1);
        let g1 = load(&c, 1);
        c.write(&g1).set_state(0, ChunkState::Full(9));
        drop(g1);
        load(&c, 2); // over capacity: 1 is dirty, so it stays
        let again = c
            .get_or_load(GroupKey(1), || -> Result<_, ()> { panic!("reloaded") })
            .unwrap()
            .unwrap();
        assert_eq!(again.state(0), Some(ChunkState::Full(9)));
    }

    #[test]
    fn held_groups_are_not_evicted_and_never_loaded_twice() {
        let c = GroupCache::new(1);
        let held = load(&c, 1);
        for k in 2..10 {
            load(&c, k);
        }
        // Still resident: a second load would make a second copy.
        let again = c
            .get_or_load(GroupKey(1), || -> Result<_, ()> { panic!("second copy") })
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&held, &again));
        drop((held, again));
        load(&c, 11);
        assert_eq!(c.resident_len(), 1, "unpinned groups go once over capacity");
    }

    #[test]
    fn concurrent_loads_of_one_key_read_once() {
        let c = Arc::new(GroupCache::new(1));
        let reads = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (c, reads, rx) = (c.clone(), reads.clone(), rx.clone());
                std::thread::spawn(move || {
                    c.get_or_load(GroupKey(7), || {
                        reads.fetch_add(1, Ordering::SeqCst);
                        // Hold the load until the test lets it finish.
                        rx.lock().recv().unwrap();
                        Ok::<_, ()>(Some(zeroed(7, 4)))
                    })
                    .unwrap()
                    .unwrap()
                })
            })
            .collect();
        tx.send(()).unwrap();
        let groups: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(groups.iter().all(|g| Arc::ptr_eq(g, &groups[0])));
    }

    #[test]
    fn a_failed_load_lets_the_next_one_try() {
        let c = GroupCache::new(2);
        assert_eq!(
            c.get_or_load(GroupKey(1), || Err::<Option<Group>, _>("eio"))
                .err(),
            Some("eio")
        );
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.get_or_load(GroupKey(1), || -> Result<Option<Group>, ()> {
                panic!("boom")
            })
        }));
        assert!(r.is_err());
        load(&c, 1);
    }

    #[test]
    fn mark_clean_keeps_groups_changed_since_snapshot() {
        let c = GroupCache::new(4);
        let g = load(&c, 3);
        c.write(&g).set_state(0, ChunkState::Full(5));
        let snap = c.dirty_snapshot();
        c.write(&g).set_state(1, ChunkState::Unmapped);
        c.mark_clean(&snap);
        assert_eq!(c.dirty_len(), 1);
        let snap = c.dirty_snapshot();
        c.mark_clean(&snap);
        assert_eq!(c.dirty_len(), 0);
    }

    #[test]
    fn invalid_entries_are_flagged() {
        let mut bytes = vec![0u8; 8 * 3];
        put_u64(&mut bytes, 8, 0x4000_0000_0000_0063);
        let g = Group::decode(GroupKey(0), 0, &bytes, |_, raw| raw == 0);
        assert!(g.is_invalid(1));
        assert_eq!(g.state(1), None);
        assert_eq!(g.state(0), Some(ChunkState::Unwritten));
    }
}

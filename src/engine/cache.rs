//! The bounded cache of chunk-groups, the index blocks of the translator.
//!
//! Invariants:
//! - A group is loaded from disk at most once while any copy of it is
//!   reachable: a loader only inserts when neither the LRU nor the dirty set
//!   holds the key, and only if no write-back happened during its read
//!   ([`GroupCache::writebacks`]), so a stale copy never shadows a newer one.
//! - A modified group stays in the dirty set until a flush has written the
//!   exact generation it last saw; eviction from the LRU never loses a change.
//! - Entries are atomics: readers never take a lock to translate an offset.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::format::{be_u64, put_u64, ChunkEntry, ChunkState};

/// One chunk-group in memory: `N` data entries then the bitmap entry.
pub struct Group {
    /// Byte offset of the group in the container.
    pub disk_offset: u64,
    entries: Box<[AtomicU64]>,
    /// Indexes of entries found out of rule when loaded; touching them is
    /// an error. Our own updates never create one.
    invalid: Box<[u32]>,
    /// Bumped after every change; a flush records it to know whether the
    /// group changed again while it was being written.
    generation: AtomicU64,
    /// Serialises allocation and promotion of this group's chunks. Never
    /// taken on the path that reads or overwrites an allocated chunk.
    pub alloc_lock: Mutex<()>,
}

impl Group {
    #[cfg(test)]
    pub fn zeroed(disk_offset: u64, entries: u64) -> Group {
        Group {
            disk_offset,
            entries: (0..=entries).map(|_| AtomicU64::new(0)).collect(),
            invalid: Box::new([]),
            generation: AtomicU64::new(0),
            alloc_lock: Mutex::new(()),
        }
    }

    /// Builds a group from its on-disk bytes; `valid` says whether a data
    /// entry's raw value is acceptable in this image.
    pub fn decode(disk_offset: u64, bytes: &[u8], valid: impl Fn(usize, u64) -> bool) -> Group {
        let n = bytes.len() / 8;
        let entries: Box<[AtomicU64]> = (0..n)
            .map(|i| AtomicU64::new(be_u64(bytes, 8 * i)))
            .collect();
        let invalid = (0..n)
            .filter(|&i| !valid(i, entries[i].load(Ordering::Relaxed)))
            .map(|i| i as u32)
            .collect();
        Group {
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

    /// Sets a data entry, keeping any reserved bits it carried.
    pub fn set_state(&self, index: usize, state: ChunkState) {
        self.entries[index].store(ChunkEntry::encode(state).0, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Points the group's bitmap entry at chunk `n`.
    pub fn set_bitmap(&self, n: u64) {
        self.entries[self.len()].store(n, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
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
}

/// A dirty group as captured by [`GroupCache::dirty_snapshot`].
pub struct DirtyGroup {
    pub key: u64,
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
    lru: LruCache<u64, Arc<Group>>,
    dirty: HashMap<u64, Arc<Group>>,
    counters: CacheCounters,
}

/// LRU of clean groups plus the set of dirty ones.
pub struct GroupCache {
    inner: Mutex<Inner>,
    writebacks: AtomicU64,
}

/// The answer to a lookup that missed: load, then call [`GroupCache::insert`].
pub struct Miss {
    pub writebacks: u64,
}

impl GroupCache {
    pub fn new(capacity: usize) -> GroupCache {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap();
        GroupCache {
            inner: Mutex::new(Inner {
                lru: LruCache::new(cap),
                dirty: HashMap::new(),
                counters: CacheCounters::default(),
            }),
            writebacks: AtomicU64::new(0),
        }
    }

    pub fn get(&self, key: u64) -> Result<Arc<Group>, Miss> {
        let mut g = self.inner.lock();
        if let Some(grp) = g.lru.get(&key).cloned() {
            g.counters.hits += 1;
            return Ok(grp);
        }
        if let Some(grp) = g.dirty.get(&key).cloned() {
            g.counters.hits += 1;
            g.lru.put(key, grp.clone());
            return Ok(grp);
        }
        g.counters.misses += 1;
        Err(Miss {
            writebacks: self.writebacks.load(Ordering::SeqCst),
        })
    }

    /// Inserts a freshly loaded group. Returns the group to use: an existing
    /// copy if another thread got there first, or `None` if a write-back ran
    /// during the load (the caller must load again).
    pub fn insert(&self, key: u64, grp: Group, miss: &Miss) -> Option<Arc<Group>> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(existing) = inner
            .lru
            .get(&key)
            .or_else(|| inner.dirty.get(&key))
            .cloned()
        {
            inner.lru.put(key, existing.clone());
            return Some(existing);
        }
        if self.writebacks.load(Ordering::SeqCst) != miss.writebacks {
            return None;
        }
        let grp = Arc::new(grp);
        g.lru.put(key, grp.clone());
        Some(grp)
    }

    /// Records that `grp` changed; returns the number of dirty groups.
    pub fn mark_dirty(&self, key: u64, grp: &Arc<Group>) -> usize {
        let mut g = self.inner.lock();
        g.dirty.entry(key).or_insert_with(|| grp.clone());
        g.dirty.len()
    }

    /// The dirty groups, each with its bytes and the generation they are
    /// at least as new as. The bytes are taken now, so that nothing changed
    /// after this call (a chunk allocated later) can reach the disk with it.
    pub fn dirty_snapshot(&self) -> Vec<DirtyGroup> {
        let groups: Vec<_> = self
            .inner
            .lock()
            .dirty
            .iter()
            .map(|(k, g)| (*k, g.clone()))
            .collect();
        let mut v: Vec<_> = groups
            .into_iter()
            .map(|(key, group)| {
                let generation = group.generation();
                let bytes = group.encode();
                DirtyGroup {
                    key,
                    group,
                    generation,
                    bytes,
                }
            })
            .collect();
        v.sort_by_key(|d| d.group.disk_offset);
        v
    }

    /// Called after a snapshot's groups are written, before they are marked
    /// clean: loads racing with the write-back must start over.
    pub fn note_writeback(&self) {
        self.writebacks.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks clean the groups whose generation did not move since written.
    pub fn mark_clean(&self, written: &[DirtyGroup]) {
        let mut g = self.inner.lock();
        for d in written {
            if d.group.generation() == d.generation {
                g.dirty.remove(&d.key);
            }
        }
    }

    pub fn dirty_len(&self) -> usize {
        self.inner.lock().dirty.len()
    }

    pub fn counters(&self) -> CacheCounters {
        self.inner.lock().counters
    }

    /// Drops every group after tables moved (compaction, after a flush:
    /// nothing is dirty).
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        debug_assert!(g.dirty.is_empty());
        g.lru.clear();
        self.writebacks.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_groups_survive_eviction() {
        let c = GroupCache::new(1);
        let m = c.get(1).err().expect("miss");
        let g1 = c.insert(1, Group::zeroed(0, 4), &m).expect("inserted");
        g1.set_state(0, ChunkState::Full(9));
        c.mark_dirty(1, &g1);
        let m = c.get(2).err().expect("miss");
        c.insert(2, Group::zeroed(100, 4), &m).expect("inserted"); // evicts 1 from the LRU
        let again = c.get(1).ok().expect("dirty group must still be found");
        assert_eq!(again.state(0), Some(ChunkState::Full(9)));
    }

    #[test]
    fn load_racing_a_writeback_is_refused() {
        let c = GroupCache::new(4);
        let m = c.get(1).err().expect("miss");
        c.note_writeback();
        assert!(c.insert(1, Group::zeroed(0, 4), &m).is_none());
        let m = c.get(1).err().expect("miss");
        assert!(c.insert(1, Group::zeroed(0, 4), &m).is_some());
    }

    #[test]
    fn mark_clean_keeps_groups_changed_since_snapshot() {
        let c = GroupCache::new(4);
        let m = c.get(3).err().expect("miss");
        let g = c.insert(3, Group::zeroed(0, 4), &m).expect("inserted");
        g.set_state(0, ChunkState::Full(5));
        c.mark_dirty(3, &g);
        let snap = c.dirty_snapshot();
        g.set_state(1, ChunkState::Unmapped);
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
        let g = Group::decode(0, &bytes, |_, raw| raw == 0);
        assert!(g.is_invalid(1));
        assert_eq!(g.state(1), None);
        assert_eq!(g.state(0), Some(ChunkState::Unwritten));
    }
}

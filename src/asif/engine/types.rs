//! Newtypes that keep the engine's chunk numbers apart: a physical chunk of
//! the container, and the key of a chunk-group in the cache. Mixing them up
//! is how a write lands in the wrong place, so the compiler checks it.

use std::fmt;

/// A chunk of the container file, by number (file offset = n * chunk size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysChunk(pub u64);

impl PhysChunk {
    /// Byte offset of the chunk's start in the container.
    pub fn offset(self, chunk_size: u64) -> u64 {
        self.0 * chunk_size
    }
}

impl fmt::Display for PhysChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk {}", self.0)
    }
}

/// A chunk-group of the whole index: table * groups-per-table + group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey(pub u64);

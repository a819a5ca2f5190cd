//! Striped locks over cipher blocks: a write re-encrypts whole blocks, so
//! writers of neighbouring bytes in one block must not interleave their
//! read-modify-writes, and a reader must not decrypt a half-written block.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Stripes of block locks: block `n` takes stripe `n % STRIPES`.
const STRIPES: usize = 64;

pub(crate) struct BlockLocks {
    stripes: Box<[RwLock<()>]>,
}

impl BlockLocks {
    pub(crate) fn new() -> BlockLocks {
        BlockLocks {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    /// Stripe indices of blocks `b0..b1`, ascending (the lock order).
    fn stripe_set(b0: u64, b1: u64) -> Vec<usize> {
        if b1 - b0 >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut v: Vec<usize> = (b0..b1).map(|b| (b % STRIPES as u64) as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Blocks `b0..b1` held for reading.
    pub(crate) fn read(&self, b0: u64, b1: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        Self::stripe_set(b0, b1)
            .into_iter()
            .map(|i| self.stripes[i].read())
            .collect()
    }

    /// Blocks `b0..b1` held for a read-modify-write.
    pub(crate) fn write(&self, b0: u64, b1: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        Self::stripe_set(b0, b1)
            .into_iter()
            .map(|i| self.stripes[i].write())
            .collect()
    }
}

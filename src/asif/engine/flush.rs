//! Flush: the only place index changes reach the disk (see the protocol in
//! the module docs of `engine`).

use std::sync::atomic::Ordering;

use super::Image;
use crate::asif::format::Directory;
use crate::error::{Error, Result};

impl Image {
    pub(super) fn note_data_change(&self) {
        if !self.data_dirty.load(Ordering::Relaxed) {
            self.data_dirty.store(true, Ordering::Release);
        }
    }

    /// Makes every write, discard and resize that completed before this call
    /// durable. Safe to call concurrently with I/O.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _shared = self.exclusive.read();
        self.flush_inner()
    }

    /// The flush, for callers that already hold the image (shared or not).
    pub(super) fn flush_inner(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _one = self.flush_lock.lock();
        // Order matters: released chunks first, so that the entry change
        // that released each of them is inside the index snapshot below.
        let released = self.alloc.take_pending();
        let data_dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        let groups = self.cache.dirty_snapshot();
        if !data_dirty && groups.is_empty() && released.is_empty() {
            return Ok(());
        }
        let sync = |what: &str| self.storage.sync().map_err(|e| self.io_err(what, e));
        let result = (|| -> Result<()> {
            sync("syncing data")?;
            if !groups.is_empty() {
                for g in &groups {
                    self.storage
                        .write_at(&g.bytes, g.group.disk_offset)
                        .map_err(|e| self.io_err("writing a table", e))?;
                }
                sync("syncing tables")?;
                self.cache.mark_clean(&groups);
            }
            if !released.is_empty() {
                // The releases are durable. A write that translated one of
                // these chunks before its release may still be in flight and
                // land after the first punch: wait for every such I/O, then
                // punch again, durably, before anyone may reuse the chunk.
                self.gate.wait_for_readers();
                let cs = self.geo.chunk_size;
                for r in &released {
                    self.storage
                        .punch(r.chunk().offset(cs), cs)
                        .map_err(|e| self.io_err("punching a freed chunk", e))?;
                }
                sync("syncing freed chunks")?;
            }
            Ok(())
        })();
        drop(groups);
        match result {
            Ok(()) => {
                self.alloc.recycle(released);
                self.counters.io.flush();
                Ok(())
            }
            Err(e) => {
                self.data_dirty.store(true, Ordering::Release);
                self.alloc.restore_pending(released);
                Err(e)
            }
        }
    }

    /// The version a new directory gets. A hostile image may already be at
    /// the largest: wrapping to 0 would lose to the old directory.
    pub(super) fn next_version(&self, d: &super::DirState) -> Result<u64> {
        d.versions[d.active].checked_add(1).ok_or_else(|| {
            Error::Corrupt(format!(
                "{}: the directory version is at its largest and cannot grow",
                self.path.display()
            ))
        })
    }

    /// Writes a directory with `version` into the slot that is not
    /// `active` and returns that slot. Every table it names must already be
    /// durable. The body goes first, then the sector holding the version:
    /// until that lands, a crash leaves the old directory active.
    pub(super) fn write_directory(
        &self,
        active: usize,
        version: u64,
        tables: Vec<u64>,
    ) -> Result<usize> {
        let slot = 1 - active;
        let bytes = Directory { version, tables }.encode(self.geo.directory_bytes as usize);
        let off = self.geo.directory_offsets[slot];
        let bs = self.geo.block_size as usize;
        let sync = |what: &str| self.storage.sync().map_err(|e| self.io_err(what, e));
        self.storage
            .write_at(&bytes[bs..], off + bs as u64)
            .map_err(|e| self.io_err("writing a directory", e))?;
        sync("syncing a directory")?;
        self.storage
            .write_at(&bytes[..bs], off)
            .map_err(|e| self.io_err("writing a directory", e))?;
        sync("syncing a directory")?;
        Ok(slot)
    }

    /// Changes the virtual size. Shrinking discards the tail; growing makes
    /// sure the new range reads as zeros. Durable on return.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let _only = self.begin_exclusive()?;
        let bs = self.geo.block_size;
        if new_size % bs != 0 {
            return Err(Error::Invalid(format!(
                "size {new_size} is not a multiple of the {bs}-byte block size"
            )));
        }
        if new_size > self.max_size() {
            return Err(Error::Invalid(format!(
                "size {new_size} is larger than the format allows ({} bytes)",
                self.max_size()
            )));
        }
        let old = self.size();
        if new_size < old {
            self.discard_range(new_size, old)?;
            self.size.store(new_size, Ordering::Release);
        } else if new_size > old {
            self.discard_range(old, new_size)?;
        }
        self.flush_inner()?;
        let mut h = self.header.lock();
        h.sector_count = new_size / bs;
        self.storage
            .write_at(&h.encode(), 0)
            .map_err(|e| self.io_err("writing the header", e))?;
        self.storage
            .sync()
            .map_err(|e| self.io_err("syncing the header", e))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

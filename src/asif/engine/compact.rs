//! Compaction: move chunks from the end of the container into unused
//! chunks lower down, then cut the file short.
//!
//! Invariants:
//! - A chunk is copied only into a chunk nothing references, and the entry
//!   (or directory) that names it is switched only after the copy is
//!   durable; the source is never written. A crash at any point leaves
//!   each entry naming either the old or the new copy, both complete.
//! - The file is cut only after every switch is durable.
//! - It holds the image exclusively (no I/O in flight), enforced by the
//!   engine's own lock, and takes the file lock's word for other processes.

use serde::Serialize;

use std::collections::BTreeMap;

use super::types::PhysChunk;
use super::usage::{self, Owner};
use super::Image;
use crate::asif::format::{BitmapEntry, ChunkState, Location};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct CompactReport {
    pub old_file_size: u64,
    pub new_file_size: u64,
    /// Host space given back.
    pub bytes_reclaimed: u64,
    pub chunks_moved: u64,
}

/// Chunks copied between two index switches.
const BATCH: usize = 256;

impl Image {
    /// Packs the container. `progress` gets (chunks moved, chunks to move).
    pub fn compact(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CompactReport> {
        let _only = self.begin_exclusive()?;
        self.flush_inner()?;
        let cs = self.geo.chunk_size;
        let old_len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        let old_alloc = self.allocated_bytes()?;
        let report = self.census()?;
        if report.is_corrupt() {
            return Err(Error::Corrupt(format!(
                "{}: refusing to compact a corrupt image ({}); run asiffs check",
                self.path.display(),
                report.corruptions[0]
            )));
        }
        // Memory grows with the chunks in use, not with the file's length.
        let mut owners = BTreeMap::new();
        let tables = self.dir.read().tables.clone();
        usage::for_each_use(
            &*self.storage,
            &self.geo,
            &tables,
            old_len / cs,
            |c, who, _| {
                owners.insert(c, who);
            },
        )
        .map_err(|e| self.io_err("reading the index", e))?;
        self.unmap_empty_chunks(&mut owners)?;

        // Highest used chunk goes into the lowest unused one, while that is lower.
        let mut moves = Vec::new();
        let mut lo = 1u64;
        loop {
            while owners.contains_key(&lo) {
                lo += 1;
            }
            let Some((&hi, _)) = owners.last_key_value() else {
                break;
            };
            if lo >= hi {
                break;
            }
            let owner = owners.remove(&hi).expect("just seen");
            owners.insert(lo, owner);
            moves.push((hi, lo, owner));
        }
        let total = moves.len() as u64;
        progress(0, total);
        for (i, batch) in moves.chunks(BATCH).enumerate() {
            self.move_batch(batch)?;
            progress((i * BATCH + batch.len()) as u64, total);
        }
        let new_end = owners.last_key_value().map_or(1, |(&c, _)| c + 1);
        self.storage
            .set_len(new_end * cs)
            .and_then(|()| self.storage.sync())
            .map_err(|e| self.io_err("truncating the container", e))?;
        self.alloc.reset(new_end);
        Ok(CompactReport {
            old_file_size: old_len,
            new_file_size: new_end * cs,
            bytes_reclaimed: old_alloc.saturating_sub(self.allocated_bytes()?),
            chunks_moved: total,
        })
    }

    fn data_location(&self, t: u64, g: u64, k: u64) -> Location {
        self.geo.locate(
            t * self.geo.table_span + (g * self.geo.entries_per_group + k) * self.geo.chunk_size,
        )
    }

    /// Fully valid chunks whose host range is all hole read as zeros: they
    /// become unmapped instead of being moved.
    fn unmap_empty_chunks(&self, owners: &mut BTreeMap<u64, Owner>) -> Result<()> {
        let cs = self.geo.chunk_size;
        let data: Vec<(u64, Owner)> = owners
            .iter()
            .filter(|(_, o)| matches!(o, Owner::Data(..)))
            .map(|(&n, &o)| (n, o))
            .collect();
        for (n, owner) in data {
            let Owner::Data(t, g, k) = owner else {
                continue;
            };
            let empty = match self
                .storage
                .next_data(n * cs)
                .map_err(|e| self.io_err("looking for data", e))?
            {
                Some(d) => d >= (n + 1) * cs,
                None => true,
            };
            if !empty {
                continue;
            }
            let loc = self.data_location(t, g, k);
            let grp = self
                .group(&loc, false)?
                .expect("the census found this table");
            if grp.state(k as usize) == Some(ChunkState::Full(n)) {
                self.cache
                    .write(&grp)
                    .set_state(k as usize, ChunkState::Unmapped);
                owners.remove(&n);
            }
        }
        self.flush_inner()
    }

    /// Copies chunk `src` over `dst` (which nothing references). The
    /// target may hold leaked bytes: clear it, then copy only what is not
    /// zero so holes stay holes.
    fn copy_chunk(&self, src: u64, dst: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.geo.chunk_size;
        self.storage
            .punch(dst * cs, cs)
            .map_err(|e| self.io_err("clearing a chunk", e))?;
        self.storage
            .read_at(buf, src * cs)
            .map_err(|e| self.io_err("reading a chunk", e))?;
        for (i, block) in buf.chunks(64 << 10).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let at = dst * cs + (i * (64 << 10)) as u64;
                self.storage
                    .write_at(block, at)
                    .map_err(|e| self.io_err("writing a chunk", e))?;
            }
        }
        Ok(())
    }

    fn move_batch(&self, batch: &[(u64, u64, Owner)]) -> Result<()> {
        let mut buf = vec![0u8; self.geo.chunk_size as usize];
        // Tables are copied last, once the entries they hold are final.
        for &(src, dst, owner) in batch {
            if !matches!(owner, Owner::Table(_)) {
                self.copy_chunk(src, dst, &mut buf)?;
            }
        }
        let mut table_moves = Vec::new();
        for &(src, dst, owner) in batch {
            match owner {
                Owner::Data(t, g, k) => {
                    let loc = self.data_location(t, g, k);
                    let grp = self
                        .group(&loc, false)?
                        .expect("the census found this table");
                    let state = match grp.state(k as usize) {
                        Some(ChunkState::Full(n)) if n == src => ChunkState::Full(dst),
                        Some(ChunkState::Partial(n)) if n == src => ChunkState::Partial(dst),
                        other => {
                            return Err(Error::Corrupt(format!(
                                "entry changed during compaction: {other:?}"
                            )))
                        }
                    };
                    self.cache.write(&grp).set_state(k as usize, state);
                }
                Owner::Bitmap(t, g) => {
                    let loc = self.data_location(t, g, 0);
                    let grp = self
                        .group(&loc, false)?
                        .expect("the census found this table");
                    debug_assert_eq!(BitmapEntry(grp.bitmap_raw()).chunk(), Ok(Some(src)));
                    self.cache.write(&grp).set_bitmap(PhysChunk(dst));
                }
                Owner::Table(t) => table_moves.push((t, src, dst)),
                Owner::Header => unreachable!("chunk 0 never moves"),
            }
        }
        // Copies durable, then the entries naming them.
        self.flush_inner()?;
        if !table_moves.is_empty() {
            for &(_, src, dst) in &table_moves {
                self.copy_chunk(src, dst, &mut buf)?;
            }
            self.storage
                .sync()
                .map_err(|e| self.io_err("syncing moved tables", e))?;
            let mut d = self.dir.write();
            let mut tables = d.tables.clone();
            for &(t, _, dst) in &table_moves {
                tables[t as usize] = dst;
            }
            let version = self.next_version(&d)?;
            let slot = self.write_directory(d.active, version, tables.clone())?;
            d.active = slot;
            d.versions[slot] = version;
            d.table_chunks = tables.iter().copied().filter(|&n| n != 0).collect();
            d.tables = tables;
            drop(d);
            // Cached groups still point into the old table chunks.
            self.cache.clear();
        }
        Ok(())
    }
}

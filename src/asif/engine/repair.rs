//! `check -r`: repairs in place, in the manner of `qemu-img check -r`.
//!
//! Crash safety: nothing an entry names is overwritten. Leaked chunks are
//! unreferenced, so punching them is harmless at any instant; the file is
//! cut only after that is durable. An entry is repaired by one 8-byte write
//! inside one sector (old or new after a crash, both readable); a chunk two
//! entries share is first copied into a new chunk past the old end, made
//! durable, and only then is the second entry pointed at the copy.

use std::collections::HashSet;

use serde::Serialize;

use super::alloc::FreeRanges;
use super::usage;
use super::Image;
use crate::asif::format::{be_u64, BitmapEntry, ChunkEntry, ChunkState};
use crate::error::{Error, Result};

/// What a repair changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Unused chunks that held data, now punched.
    pub leaked_chunks_freed: u64,
    /// Entries changed, one line each.
    pub entries_repaired: Vec<String>,
    pub old_file_size: u64,
    pub new_file_size: u64,
    /// Host space given back.
    pub bytes_reclaimed: u64,
}

/// One repaired entry: where it lives in the file and its new value.
struct Fix {
    at: u64,
    raw: u64,
    what: String,
}

impl Image {
    /// Repairs leaks in place: the scan at open has already punched unused
    /// chunks that held data; this also cuts unused chunks off the end of
    /// the file. `allocated_before` is the container's host allocation
    /// before it was opened.
    pub fn repair_leaks(&self, allocated_before: u64) -> Result<RepairReport> {
        let _only = self.begin_exclusive()?;
        self.flush_inner()?;
        let cs = self.geo.chunk_size;
        let old_len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        let tables = self.dir.read().tables.clone();
        let u = usage::scan(&*self.storage, &self.geo, &tables, old_len / cs)
            .map_err(|e| self.io_err("reading the index", e))?;
        let mut new_end = old_len / cs;
        if let Some((a, b)) = u.free.iter().last() {
            if b == new_end {
                new_end = a;
            }
        }
        if new_end < old_len / cs {
            self.storage
                .set_len(new_end * cs)
                .and_then(|()| self.storage.sync())
                .map_err(|e| self.io_err("shortening the container", e))?;
            self.alloc.reset(new_end);
            let mut below = FreeRanges::default();
            for (a, b) in u.free.iter().filter(|&(a, _)| a < new_end) {
                below.insert(a, b.min(new_end));
            }
            self.alloc.add_scanned(&below);
        }
        Ok(RepairReport {
            leaked_chunks_freed: self.open_scan.punched(),
            old_file_size: old_len,
            new_file_size: new_end * cs,
            bytes_reclaimed: allocated_before.saturating_sub(self.allocated_bytes()?),
            ..Default::default()
        })
    }

    /// Repairs the entries that make an image unwritable: entries out of
    /// rule or naming a chunk past the end, the header or a table read as
    /// zeros afterwards (unmapped); a partially valid chunk whose group has
    /// no usable bitmap likewise; a chunk named twice gets a copy for each
    /// later user, so every entry reads what it read before. Reopen the
    /// image afterwards (the scan at open saw the old index).
    pub fn repair_entries(&self) -> Result<Vec<String>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let _only = self.exclusive.write();
        let cs = self.geo.chunk_size;
        let len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        let mut done = Vec::new();
        let mut end = len / cs;
        if len % cs != 0 {
            end += 1;
            self.storage
                .set_len(end * cs)
                .and_then(|()| self.storage.sync())
                .map_err(|e| self.io_err("rounding the file up", e))?;
            done.push(format!(
                "file length {len} rounded up to {} ({end} whole chunks)",
                end * cs
            ));
        }
        let tables = self.dir.read().tables.clone();
        let reserved: HashSet<u64> = tables.iter().copied().chain([0]).collect();
        let mut claimed: HashSet<u64> = HashSet::new();
        let mut fixes = Vec::new();
        let mut copies: Vec<(u64, u64, ChunkState, String)> = Vec::new();
        let n = self.geo.entries_per_group as usize;
        usage::for_each_group(&*self.storage, &self.geo, &tables, end, |t, g, b| {
            let group_at = tables[t as usize] * cs + self.geo.group_offset_in_table(g);
            let entry_at = |k: usize| group_at + self.geo.entry_offset_in_group(k as u64);
            let raw_bitmap = be_u64(b, 8 * n);
            let bitmap_ok = match BitmapEntry(raw_bitmap).chunk() {
                Ok(None) => false,
                Ok(Some(c)) if c < end && !reserved.contains(&c) && claimed.insert(c) => true,
                _ => {
                    fixes.push(Fix {
                        at: group_at + self.geo.bitmap_entry_offset_in_group(),
                        raw: 0,
                        what: format!(
                            "table {t} group {g}: bitmap entry {raw_bitmap:#018x} cleared"
                        ),
                    });
                    false
                }
            };
            for k in 0..n {
                let raw = be_u64(b, 8 * k);
                let who = format!("table {t} group {g} entry {k}");
                let unmap = |why: &str| Fix {
                    at: entry_at(k),
                    raw: ChunkEntry::encode(ChunkState::Unmapped).0,
                    what: format!("{who}: {why}; now reads zeros"),
                };
                let (c, state) = match ChunkEntry(raw).state() {
                    None => {
                        fixes.push(unmap(&format!("entry {raw:#018x} was out of rule")));
                        continue;
                    }
                    Some(ChunkState::Partial(_)) if !bitmap_ok => {
                        fixes.push(unmap("partially valid without a usable bitmap"));
                        continue;
                    }
                    Some(s @ (ChunkState::Full(c) | ChunkState::Partial(c))) => (c, s),
                    Some(_) => continue,
                };
                if c >= end {
                    fixes.push(unmap(&format!("named chunk {c}, past the end of the file")));
                } else if reserved.contains(&c) {
                    fixes.push(unmap(&format!("named chunk {c}, which holds the index")));
                } else if !claimed.insert(c) {
                    copies.push((entry_at(k), c, state, who));
                }
            }
            Ok(())
        })
        .map_err(|e| self.io_err("reading the index", e))?;

        // Copies for the later users of shared chunks, past the old end.
        if !copies.is_empty() {
            let new_end = end + copies.len() as u64;
            self.storage
                .extend(new_end * cs)
                .map_err(|e| self.io_err("growing the container", e))?;
            let mut buf = vec![0u8; cs as usize];
            for (i, (at, c, state, who)) in copies.into_iter().enumerate() {
                let dst = end + i as u64;
                self.storage
                    .read_at(&mut buf, c * cs)
                    .and_then(|()| self.storage.write_at(&buf, dst * cs))
                    .map_err(|e| self.io_err("copying a shared chunk", e))?;
                let raw = match state {
                    ChunkState::Partial(_) => ChunkEntry::encode(ChunkState::Partial(dst)),
                    _ => ChunkEntry::encode(ChunkState::Full(dst)),
                };
                fixes.push(Fix {
                    at,
                    raw: raw.0,
                    what: format!("{who}: shared chunk {c}, now its own copy in chunk {dst}"),
                });
            }
            self.storage
                .sync()
                .map_err(|e| self.io_err("syncing copies", e))?;
        }
        for f in &fixes {
            self.storage
                .write_at(&f.raw.to_be_bytes(), f.at)
                .map_err(|e| self.io_err("writing a repaired entry", e))?;
        }
        if !fixes.is_empty() {
            self.storage
                .sync()
                .map_err(|e| self.io_err("syncing repaired entries", e))?;
        }
        self.cache.clear();
        done.extend(fixes.into_iter().map(|f| f.what));
        Ok(done)
    }
}

//! Whole-image walks: extents (map, SEEK_DATA/SEEK_HOLE), info and check.

use std::ops::ControlFlow;

use serde::Serialize;

use super::types::PhysChunk;
use super::usage::{self, Owner};
use super::Image;
use crate::asif::format::{
    be_u64, bitmap_span, BitmapEntry, ChunkEntry, ChunkState, Directory, FlagBits, SectorState,
};
use crate::error::{Error, Result};

/// A run of the virtual disk that is all data or all zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub data: bool,
    /// Where the run lives in the container, for data runs.
    pub offset: Option<u64>,
}

impl Extent {
    /// Appends `e` to `out`, merged into the last extent when both are data
    /// (or both holes) and, for data, contiguous in the container too.
    pub fn push_merged(out: &mut Vec<Extent>, e: Extent) {
        match out.last_mut() {
            Some(l)
                if l.data == e.data
                    && match (l.offset, e.offset) {
                        (Some(a), Some(b)) => a + l.length == b,
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                l.length += e.length
            }
            _ => out.push(e),
        }
    }
}

impl Image {
    /// Calls `f` for consecutive runs covering `from..to`, in order.
    /// Partially valid chunks are reported sector by sector.
    fn walk(&self, from: u64, to: u64, mut f: impl FnMut(Extent) -> ControlFlow<()>) -> Result<()> {
        let cs = self.geo.chunk_size;
        let bs = self.geo.block_size;
        let mut at = from;
        while at < to {
            let loc = self.geo.locate(at);
            let Some(g) = self.group(&loc, false)? else {
                let end = ((loc.table + 1) * self.geo.table_span).min(to);
                if f(Extent {
                    start: at,
                    length: end - at,
                    data: false,
                    offset: None,
                })
                .is_break()
                {
                    return Ok(());
                }
                at = end;
                continue;
            };
            let chunk_end = (at - loc.within + cs).min(to);
            let flow = match g.state(loc.index as usize) {
                None => return Err(self.corrupt_entry(&loc)),
                Some(ChunkState::Unwritten | ChunkState::Unmapped) => f(Extent {
                    start: at,
                    length: chunk_end - at,
                    data: false,
                    offset: None,
                }),
                Some(ChunkState::Full(n)) => f(Extent {
                    start: at,
                    length: chunk_end - at,
                    data: true,
                    offset: Some(n * cs + loc.within),
                }),
                Some(ChunkState::Partial(n)) => {
                    let spc = self.geo.sectors_per_chunk();
                    let first = loc.within / bs;
                    let last = (chunk_end - (at - loc.within) - 1) / bs;
                    let states =
                        self.sector_states(&g, loc.index * spc + first, last - first + 1)?;
                    let mut flow = ControlFlow::Continue(());
                    let mut s = at;
                    for (i, st) in states.iter().enumerate() {
                        let sector_end =
                            ((first + i as u64 + 1) * bs + (at - loc.within)).min(chunk_end);
                        let data = *st == SectorState::Written;
                        let offset = data.then(|| n * cs + (s - (at - loc.within)));
                        flow = f(Extent {
                            start: s,
                            length: sector_end - s,
                            data,
                            offset,
                        });
                        if flow.is_break() {
                            break;
                        }
                        s = sector_end;
                    }
                    flow
                }
            };
            if flow.is_break() {
                return Ok(());
            }
            at = chunk_end;
        }
        Ok(())
    }

    /// The disk as merged runs of data and zeros, like `qemu-img map`.
    /// Fails if two entries share a chunk: the disk's content would be a
    /// guess (the walk sees every chunk, so this check costs no I/O).
    pub fn extents(&self) -> Result<Vec<Extent>> {
        let _shared = self.exclusive.read();
        let cs = self.geo.chunk_size;
        let mut out: Vec<Extent> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut last_chunk = None;
        let mut shared = None;
        self.walk(0, self.size(), |e| {
            if let Some(off) = e.offset {
                let chunk = off / cs;
                if last_chunk != Some(chunk) && !seen.insert(chunk) {
                    shared = Some((e.start, chunk));
                    return ControlFlow::Break(());
                }
                last_chunk = Some(chunk);
            }
            Extent::push_merged(&mut out, e);
            ControlFlow::Continue(())
        })?;
        if let Some((at, chunk)) = shared {
            return Err(self.shared_chunk(at / cs, chunk));
        }
        Ok(out)
    }

    fn shared_chunk(&self, logical: u64, chunk: u64) -> Error {
        Error::Corrupt(format!(
            "{}: logical chunk {logical} uses chunk {chunk}, which another entry uses too",
            self.path.display()
        ))
    }

    /// First offset at or after `offset` that holds data (SEEK_DATA);
    /// `None` when only zeros follow.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        let _shared = self.exclusive.read();
        let mut found = None;
        self.walk(offset, self.size(), |e| {
            if e.data {
                found = Some(e.start);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        Ok(found)
    }

    /// First offset at or after `offset` that reads as zeros because nothing
    /// is stored there (SEEK_HOLE); the disk size when there is none.
    /// `offset` must be below the size.
    pub fn seek_hole(&self, offset: u64) -> Result<u64> {
        let _shared = self.exclusive.read();
        let size = self.size();
        if offset >= size {
            return Err(Error::OutOfRange {
                offset,
                len: 0,
                size,
            });
        }
        let mut found = size;
        self.walk(offset, size, |e| {
            if !e.data {
                found = e.start;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        Ok(found)
    }
}

/// Summary for `asiffs info`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub path: String,
    pub virtual_size: u64,
    /// Bytes the host has allocated to the container.
    pub actual_size: u64,
    pub file_size: u64,
    pub chunk_size: u64,
    pub block_size: u64,
    pub max_size: u64,
    pub uuid: String,
    pub stable_uuid: Option<String>,
    pub active_directory: char,
    pub directory_version: u64,
    pub tables: u64,
    /// Data chunks mapped (fully or partially valid).
    pub data_chunks: u64,
    pub partial_chunks: u64,
}

/// Result of [`Image::check`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Rules broken; any makes the image corrupt.
    pub corruptions: Vec<String>,
    /// Corruptions past the first [`MAX_REPORTED`] are only counted.
    pub corruptions_not_listed: u64,
    /// Oddities that do not endanger data.
    pub warnings: Vec<String>,
    /// Chunks no entry references that still hold host space.
    pub leaked_chunks: u64,
    /// Chunks no entry references whose space is already given back.
    pub free_chunks: u64,
    pub file_chunks: u64,
    pub tables: u64,
    pub data_chunks: u64,
    pub partial_chunks: u64,
    pub bitmap_chunks: u64,
}

/// How many corruptions a report lists in full.
pub const MAX_REPORTED: usize = 100;

impl CheckReport {
    fn corrupt(&mut self, msg: String) {
        if self.corruptions.len() < MAX_REPORTED {
            self.corruptions.push(msg);
        } else {
            self.corruptions_not_listed += 1;
        }
    }

    pub fn is_corrupt(&self) -> bool {
        !self.corruptions.is_empty()
    }

    /// Exit status in the manner of `qemu-img check`: 0 clean, 2 corrupt,
    /// 3 only leaks.
    pub fn exit_code(&self) -> i32 {
        if self.is_corrupt() {
            2
        } else if self.leaked_chunks > 0 {
            3
        } else {
            0
        }
    }
}

impl Image {
    /// Counts for `asiffs info`, read through the index cache.
    pub fn info(&self) -> Result<ImageInfo> {
        let (active, version) = self.active_directory();
        let _shared = self.exclusive.read();
        let tables: Vec<u64> = self.dir.read().tables.clone();
        let usage = usage::scan(&*self.storage, &self.geo, &tables, self.alloc.end())
            .map_err(|e| self.io_err("reading the index", e))?;
        if let Some(who) = usage.out_of_rule {
            return Err(Error::Corrupt(format!(
                "{}: {who} is out of rule (run asiffs check)",
                self.path.display()
            )));
        }
        if let Some((c, who)) = usage.past_end.first() {
            return Err(Error::Corrupt(format!(
                "{}: {who} points at chunk {}, past the end of the file",
                self.path.display(),
                c.0
            )));
        }
        if let Some((c, who)) = usage.shared.first() {
            return Err(Error::Corrupt(format!(
                "{}: {who} uses chunk {}, which another entry uses too",
                self.path.display(),
                c.0
            )));
        }
        let (data, partial) = (usage.data_chunks, usage.partial_chunks);
        let h = self.header();
        Ok(ImageInfo {
            path: self.path.display().to_string(),
            virtual_size: self.size(),
            actual_size: self.allocated_bytes()?,
            file_size: self.storage.len().map_err(|e| self.io_err("stat", e))?,
            chunk_size: self.geo.chunk_size,
            block_size: self.geo.block_size,
            max_size: self.max_size(),
            uuid: uuid::Uuid::from_bytes(h.uuid).hyphenated().to_string(),
            stable_uuid: self.metadata_inner().ok().map(|m| m.stable_uuid),
            active_directory: if active == 0 { 'A' } else { 'B' },
            directory_version: version,
            tables: tables.iter().filter(|&&n| n != 0).count() as u64,
            data_chunks: data,
            partial_chunks: partial,
        })
    }

    /// Reads every structure from disk and checks every rule of the format.
    /// Never changes the file. Memory stays bounded whatever the file size.
    pub fn check(&self) -> Result<CheckReport> {
        let _shared = self.exclusive.read();
        self.census()
    }

    pub(super) fn census(&self) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let cs = self.geo.chunk_size;
        let len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        if len % cs != 0 {
            r.corrupt(format!(
                "file length {len} is not a whole number of {cs}-byte chunks"
            ));
        }
        let end = len / cs;
        r.file_chunks = end;

        // Both directories: the active one must be right, the other only
        // has to be harmless.
        let (active, _) = self.active_directory();
        let mut dirs = Vec::new();
        for off in self.geo.directory_offsets {
            let mut b = vec![0u8; self.geo.directory_bytes as usize];
            self.storage
                .read_at(&mut b, off)
                .map_err(|e| self.io_err("reading a directory", e))?;
            dirs.push(Directory::decode(&b, self.geo.directory_entries));
        }
        for (slot, d) in dirs.iter().enumerate() {
            if slot == active {
                continue;
            }
            if let Some((t, n)) = d.tables.iter().enumerate().find(|(_, &n)| n >= end) {
                r.warnings.push(format!(
                    "inactive directory {} entry {t} points past the end of the file (chunk {n})",
                    if slot == 0 { 'A' } else { 'B' }
                ));
            }
        }
        let tables = &dirs[active].tables;
        r.tables = tables.iter().filter(|&&n| n != 0).count() as u64;

        // Who uses what: a windowed bitmap, then one more walk to name the
        // first user of each chunk found shared.
        let usage = usage::scan(&*self.storage, &self.geo, tables, end)
            .map_err(|e| self.io_err("reading the index", e))?;
        for (c, who) in &usage.past_end {
            r.corrupt(format!(
                "{who} points at chunk {}, past the end of the file ({end} chunks)",
                c.0
            ));
        }
        let shared: Vec<PhysChunk> = usage.shared.iter().map(|(c, _)| *c).collect();
        let first = usage::first_users(&*self.storage, &self.geo, tables, end, &shared)
            .map_err(|e| self.io_err("reading the index", e))?;
        for (c, who) in &usage.shared {
            match first.get(&c.0) {
                Some(other) => r.corrupt(format!(
                    "{who} points at chunk {}, already used by {other}",
                    c.0
                )),
                None => r.corrupt(format!("{who} points at chunk {}, used twice", c.0)),
            }
        }
        r.corruptions_not_listed += usage.shared_count - usage.shared.len() as u64;

        // The rules of each entry.
        let n_entries = self.geo.entries_per_group as usize;
        let mut bitmaps_to_check = Vec::new();
        usage::for_each_group(&*self.storage, &self.geo, tables, end, |t, g, gbuf| {
            let raw_bitmap = be_u64(gbuf, 8 * n_entries);
            let bitmap = match BitmapEntry(raw_bitmap).chunk() {
                Ok(b) => b,
                Err(FlagBits) => {
                    r.corrupt(format!(
                        "table {t} group {g}: bitmap entry {raw_bitmap:#018x} has flag bits set"
                    ));
                    None
                }
            };
            if bitmap.is_some() {
                r.bitmap_chunks += 1;
            }
            let bitmap_ok = bitmap.is_some_and(|b| b < end && !shared.contains(&PhysChunk(b)));
            for k in 0..n_entries {
                let raw = be_u64(gbuf, 8 * k);
                let who = Owner::Data(t, g, k as u64);
                match ChunkEntry(raw).state() {
                    None => r.corrupt(format!("{who}: entry {raw:#018x} is out of rule")),
                    Some(ChunkState::Full(_)) => r.data_chunks += 1,
                    Some(ChunkState::Partial(_)) => {
                        r.data_chunks += 1;
                        r.partial_chunks += 1;
                        match bitmap {
                            None => r.corrupt(format!(
                                "{who}: partially valid chunk but the group has no bitmap"
                            )),
                            Some(b) if bitmap_ok => bitmaps_to_check.push((b, k as u64, who)),
                            Some(_) => {}
                        }
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        })
        .map_err(|e| self.io_err("reading a table", e))?;
        for (b, k, who) in bitmaps_to_check {
            self.check_bitmap(&mut r, b, k, who)?;
        }
        if let Err(e) = self.metadata_inner() {
            r.corrupt(format!("metadata chunk: {e}"));
        }

        // Unused chunks: free if all hole or zeros on the host, leaked if
        // they hold data nothing can read.
        let mut buf = vec![0u8; cs as usize];
        let mut leaked = 0u64;
        for (a, b) in usage.free.iter() {
            usage::chunks_holding_data(&*self.storage, cs, a, b, |c| {
                self.storage.read_at(&mut buf, c * cs)?;
                if buf.iter().any(|&x| x != 0) {
                    leaked += 1;
                }
                Ok(())
            })
            .map_err(|e| self.io_err("looking for data", e))?;
        }
        r.leaked_chunks = leaked;
        r.free_chunks = usage.free.count() + usage.free.dropped - leaked;
        Ok(r)
    }

    fn check_bitmap(&self, r: &mut CheckReport, bitmap: u64, k: u64, who: Owner) -> Result<()> {
        let spc = self.geo.sectors_per_chunk();
        let span = bitmap_span(k * spc, spc);
        let mut bytes = vec![0u8; (span.end - span.start) as usize];
        self.storage
            .read_at(&mut bytes, bitmap * self.geo.chunk_size + span.start)
            .map_err(|e| self.io_err("reading a bitmap", e))?;
        for s in k * spc..(k + 1) * spc {
            if let SectorState::Unknown(v) =
                SectorState::from_byte(bytes[(s / 4 - span.start) as usize], s % 4)
            {
                r.corrupt(format!(
                    "{who}: sector {} has unknown bitmap state {v:#b}",
                    s - k * spc
                ));
                break;
            }
        }
        Ok(())
    }
}

//! The data path: read, write, discard, zero and allocate.

use std::sync::Arc;

use super::alloc::Released;
use super::cache::Group;
use super::types::{GroupKey, PhysChunk};
use super::Image;
use crate::asif::format::{bitmap_span, BitmapEntry, ChunkState, Location, SectorState};
use crate::error::{Error, Result};

/// One piece of a request that stays inside a single chunk.
pub(super) struct Piece {
    pub loc: Location,
    /// Offset of the piece within the request.
    pub at: usize,
    pub len: usize,
}

impl Image {
    pub(super) fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let cs = self.geo.chunk_size;
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let loc = self.geo.locate(offset + done);
            let n = (cs - loc.within).min(len - done);
            let p = Piece {
                loc,
                at: done as usize,
                len: n as usize,
            };
            done += n;
            Some(p)
        })
    }

    /// The chunk-group for `loc`, loading it if needed. With `create`, an
    /// absent table is allocated; without, `None` means "reads as zeros".
    /// The handle pins the group in the cache for as long as it is held.
    pub(super) fn group(&self, loc: &Location, create: bool) -> Result<Option<Arc<Group>>> {
        let key = GroupKey(self.geo.group_number(loc));
        loop {
            let g = self.cache.get_or_load(key, || {
                let table = self.dir.read().tables[loc.table as usize];
                if table == 0 {
                    return Ok(None);
                }
                self.load_group(key, table, loc.group).map(Some)
            })?;
            match g {
                Some(g) => return Ok(Some(g)),
                None if !create => return Ok(None),
                None => self.add_table(loc.table)?,
            }
        }
    }

    pub(super) fn load_group(&self, key: GroupKey, table: u64, group: u64) -> Result<Group> {
        let cs = self.geo.chunk_size;
        let off = table * cs + self.geo.group_offset_in_table(group);
        let mut b = vec![0u8; self.geo.group_bytes as usize];
        self.storage.read_at(&mut b, off).map_err(|e| {
            Error::io(
                format!("{}: reading table chunk {table}", self.path.display()),
                e,
            )
        })?;
        let end = self.alloc.end();
        let n = self.geo.entries_per_group as usize;
        let dir = self.dir.read();
        Ok(Group::decode(key, off, &b, |i, raw| {
            if i == n {
                self.bitmap_entry_is_valid(raw, end, &dir.table_chunks)
            } else {
                self.entry_is_valid(raw, end, &dir.table_chunks)
            }
        }))
    }

    /// Writes an entry that changed between allocated and not through to
    /// the file at once (not synced). Safe before a flush: the chunk it
    /// names lies inside the durable file and reads as zeros until its data
    /// lands, and a freed chunk is not reused before a flush. It means a
    /// killed process (as opposed to a power cut) leaves no leaked chunk.
    fn write_through(&self, g: &Group, k: usize) -> Result<()> {
        self.storage
            .write_at(
                &g.raw(k).to_be_bytes(),
                g.disk_offset + self.geo.entry_offset_in_group(k as u64),
            )
            .map_err(|e| self.io_err("writing a table entry", e))
    }

    /// Allocates table `t` (a zeroed chunk: every entry "never written") and
    /// publishes it in a new directory at once, so that entries written
    /// through into it are never orphaned.
    fn add_table(&self, t: u64) -> Result<()> {
        let mut d = self.dir.write();
        if d.tables[t as usize] != 0 {
            return Ok(());
        }
        let version = self.next_version(&d)?;
        let a = self.alloc.allocate(&*self.storage)?;
        let n = a.chunk.0;
        let mut tables = d.tables.clone();
        tables[t as usize] = n;
        let written = self.write_directory(d.active, version, tables);
        // On failure the new directory may still have reached the disk, so
        // the chunk is not handed out again this session (the next open's
        // scan finds it if it is unused).
        if let Ok(slot) = written {
            d.tables[t as usize] = n;
            d.table_chunks.insert(n);
            d.versions[slot] = version;
            d.active = slot;
            self.counters.chunks_allocated.bump(1);
        }
        drop(d);
        self.grow_ahead_if(a.grow_ahead);
        written.map(|_| ())
    }

    /// Grows the file ahead of need when an allocation asked for it; called
    /// holding no lock. A failure only delays growth to the next allocation,
    /// which then reports it.
    fn grow_ahead_if(&self, asked: bool) {
        if asked {
            if let Err(e) = self.alloc.grow(&*self.storage) {
                tracing::warn!(path = %self.path.display(), "growing the container ahead failed: {e}");
            }
        }
    }

    pub(super) fn corrupt_entry(&self, loc: &Location) -> Error {
        Error::Corrupt(format!(
            "{}: table {} group {} entry {} is out of rule",
            self.path.display(),
            loc.table,
            loc.group,
            loc.index
        ))
    }

    pub(super) fn io_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.path.display()), e)
    }

    /// Reads `buf.len()` bytes at `offset` of the virtual disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _shared = self.exclusive.read();
        let _io = self.gate.enter();
        self.read_inner(buf, offset)?;
        self.counters.io.read(buf.len() as u64);
        Ok(())
    }

    /// Reads without the size check: the metadata chunk lies past the disk.
    pub(super) fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.geo.chunk_size;
        for p in self.pieces(offset, buf.len() as u64) {
            let piece = &mut buf[p.at..p.at + p.len];
            let Some(g) = self.group(&p.loc, false)? else {
                piece.fill(0);
                continue;
            };
            match g.state(p.loc.index as usize) {
                None => return Err(self.corrupt_entry(&p.loc)),
                Some(ChunkState::Unwritten | ChunkState::Unmapped) => piece.fill(0),
                Some(ChunkState::Full(n)) => self
                    .storage
                    .read_data(piece, n * cs + p.loc.within)
                    .map_err(|e| self.io_err("reading a data chunk", e))?,
                Some(ChunkState::Partial(n)) => {
                    self.storage
                        .read_data(piece, n * cs + p.loc.within)
                        .map_err(|e| self.io_err("reading a data chunk", e))?;
                    self.mask_unwritten(&g, &p.loc, piece)?;
                }
            }
        }
        Ok(())
    }

    /// The bitmap states of the sectors `first..first+count` of `g`.
    pub(super) fn sector_states(
        &self,
        g: &Group,
        first: u64,
        count: u64,
    ) -> Result<Vec<SectorState>> {
        let bitmap = match BitmapEntry(g.bitmap_raw()).chunk() {
            Ok(Some(b)) if !g.is_invalid(g.len()) => b,
            _ => {
                return Err(Error::Corrupt(format!(
                    "{}: partially valid chunk in a group without a valid bitmap chunk",
                    self.path.display()
                )))
            }
        };
        let span = bitmap_span(first, count);
        let mut bytes = vec![0u8; (span.end - span.start) as usize];
        self.storage
            .read_at(&mut bytes, bitmap * self.geo.chunk_size + span.start)
            .map_err(|e| self.io_err("reading a bitmap chunk", e))?;
        (first..first + count)
            .map(
                |s| match SectorState::from_byte(bytes[(s / 4 - span.start) as usize], s % 4) {
                    SectorState::Unknown(v) => Err(Error::Corrupt(format!(
                        "{}: bitmap state {v:#b} for a sector is unknown",
                        self.path.display()
                    ))),
                    st => Ok(st),
                },
            )
            .collect()
    }

    /// Zeroes the parts of `piece` whose sectors the bitmap marks unwritten.
    fn mask_unwritten(&self, g: &Group, loc: &Location, piece: &mut [u8]) -> Result<()> {
        let bs = self.geo.block_size;
        let base = loc.index * self.geo.sectors_per_chunk();
        let first = loc.within / bs;
        let last = (loc.within + piece.len() as u64 - 1) / bs;
        let states = self.sector_states(g, base + first, last - first + 1)?;
        for (i, st) in states.into_iter().enumerate() {
            if st == SectorState::Unwritten {
                let s = (first + i as u64) * bs;
                let from = s.max(loc.within) - loc.within;
                let to = (s + bs).min(loc.within + piece.len() as u64) - loc.within;
                piece[from as usize..to as usize].fill(0);
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset` of the virtual disk.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _shared = self.begin_change()?;
        self.check_range(offset, buf.len() as u64)?;
        {
            let _io = self.gate.enter();
            let cs = self.geo.chunk_size;
            for p in self.pieces(offset, buf.len() as u64) {
                let data = &buf[p.at..p.at + p.len];
                let (n, fresh) = self.writable_chunk(&p.loc)?;
                if fresh && p.len as u64 == cs {
                    // A whole new chunk: reserving it in one call spares the
                    // host filesystem block-by-block allocation under its
                    // inode lock (fresh 1 MiB writes ran 2-5x faster).
                    // Best effort: a failure shows up in the write itself.
                    let _ = self.storage.reserve(n.offset(cs), cs);
                }
                self.storage
                    .write_data(data, n.offset(cs) + p.loc.within)
                    .map_err(|e| self.io_err("writing a data chunk", e))?;
            }
            self.note_data_change();
            self.counters.io.write(buf.len() as u64);
        }
        self.flush_if_too_dirty()
    }

    /// The physical chunk to write `loc` into: allocated when absent (then
    /// the flag is set), promoted to fully valid when macOS left it partial.
    fn writable_chunk(&self, loc: &Location) -> Result<(PhysChunk, bool)> {
        let g = self.group(loc, true)?.expect("group exists after creation");
        let k = loc.index as usize;
        match g.state(k) {
            Some(ChunkState::Full(n)) => return Ok((PhysChunk(n), false)),
            None => return Err(self.corrupt_entry(loc)),
            _ => {}
        }
        let mut grow = false;
        let r = self.map_chunk(&g, loc, &mut grow);
        self.grow_ahead_if(grow);
        r
    }

    /// Under the group's allocation lock: allocate or promote `loc`'s chunk.
    fn map_chunk(
        &self,
        g: &Arc<Group>,
        loc: &Location,
        grow: &mut bool,
    ) -> Result<(PhysChunk, bool)> {
        let k = loc.index as usize;
        let _alloc = g.alloc_lock.lock();
        match g.state(k) {
            Some(ChunkState::Full(n)) => Ok((PhysChunk(n), false)),
            Some(ChunkState::Partial(n)) => {
                self.promote(g, loc, n)?;
                Ok((PhysChunk(n), false))
            }
            Some(ChunkState::Unwritten | ChunkState::Unmapped) => {
                let a = self.alloc.allocate(&*self.storage)?;
                *grow = a.grow_ahead;
                self.cache
                    .write(g)
                    .set_state(k, ChunkState::Full(a.chunk.0));
                self.counters.chunks_allocated.bump(1);
                self.write_through(g, k)?;
                Ok((a.chunk, true))
            }
            None => Err(self.corrupt_entry(loc)),
        }
    }

    /// Turns a partially valid chunk into a fully valid one: its unwritten
    /// sectors may hold stale bytes, so they are zeroed before the entry
    /// says 01 (and so before the entry can reach the disk). Caller holds
    /// the group's allocation lock.
    fn promote(&self, g: &Arc<Group>, loc: &Location, n: u64) -> Result<()> {
        let bs = self.geo.block_size;
        let spc = self.geo.sectors_per_chunk();
        let states = self.sector_states(g, loc.index * spc, spc)?;
        let cs = self.geo.chunk_size;
        let mut s = 0;
        while s < spc {
            if states[s as usize] != SectorState::Unwritten {
                s += 1;
                continue;
            }
            let start = s;
            while s < spc && states[s as usize] == SectorState::Unwritten {
                s += 1;
            }
            self.storage
                .punch(n * cs + start * bs, (s - start) * bs)
                .map_err(|e| self.io_err("zeroing stale sectors", e))?;
        }
        self.cache
            .write(g)
            .set_state(loc.index as usize, ChunkState::Full(n));
        Ok(())
    }

    /// Makes `offset..offset+len` read as zeros and gives whole chunks back
    /// (state 10, host space punched). Any alignment; clamped to the disk.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _shared = self.begin_change()?;
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(());
        }
        self.discard_range(offset, end)?;
        self.counters.io.discard(end - offset);
        self.flush_if_too_dirty()
    }

    /// Zeroes a range. Discarded ranges read as zeros, so this is a discard.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    /// Discards `offset..end` with no size check (resize uses it past the end).
    pub(super) fn discard_range(&self, offset: u64, end: u64) -> Result<()> {
        let _io = self.gate.enter();
        let cs = self.geo.chunk_size;
        let disk_end = self.size().max(end);
        let mut at = offset;
        while at < end {
            let loc = self.geo.locate(at);
            let Some(g) = self.group(&loc, false)? else {
                // No table: the whole table's span already reads as zeros.
                at = ((loc.table + 1) * self.geo.table_span).min(end);
                continue;
            };
            let n = (cs - loc.within).min(end - at);
            let whole = loc.within == 0 && (n == cs || at + n >= disk_end);
            self.discard_piece(&g, &loc, n, whole)?;
            at += n;
        }
        self.note_data_change();
        Ok(())
    }

    fn discard_piece(&self, g: &Arc<Group>, loc: &Location, len: u64, whole: bool) -> Result<()> {
        let cs = self.geo.chunk_size;
        let k = loc.index as usize;
        let _alloc = g.alloc_lock.lock();
        match g.state(k) {
            None => Err(self.corrupt_entry(loc)),
            Some(ChunkState::Unwritten | ChunkState::Unmapped) => Ok(()),
            Some(ChunkState::Full(n) | ChunkState::Partial(n)) if whole => {
                // Punch before the entry lets go: a process killed between
                // the two leaves a mapped chunk of zeros, never an
                // unreferenced chunk that still holds data.
                self.storage
                    .punch(n * cs, cs)
                    .map_err(|e| self.io_err("punching a chunk", e))?;
                self.cache.write(g).set_state(k, ChunkState::Unmapped);
                let released = Released::new(PhysChunk(n));
                let through = self.write_through(g, k);
                // Even if the entry did not reach the file, memory says
                // unmapped: the flush writes it or the chunk stays pending.
                self.alloc.release(released);
                self.counters.chunks_freed.bump(1);
                through
            }
            Some(ChunkState::Partial(n)) => {
                self.promote(g, loc, n)?;
                self.storage
                    .punch(n * cs + loc.within, len)
                    .map_err(|e| self.io_err("punching part of a chunk", e))
            }
            Some(ChunkState::Full(n)) => self
                .storage
                .punch(n * cs + loc.within, len)
                .map_err(|e| self.io_err("punching part of a chunk", e)),
        }
    }

    /// Maps every chunk of the range and reserves host space for it, so that
    /// later writes there cannot fail for lack of space (fallocate mode 0).
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let _shared = self.begin_change()?;
        self.check_range(offset, len)?;
        {
            let _io = self.gate.enter();
            let cs = self.geo.chunk_size;
            for p in self.pieces(offset, len) {
                let (n, _) = self.writable_chunk(&p.loc)?;
                self.storage
                    .reserve(n.offset(cs) + p.loc.within, p.len as u64)
                    .map_err(|e| self.io_err("reserving space", e))?;
            }
            self.note_data_change();
        }
        self.flush_if_too_dirty()
    }

    fn flush_if_too_dirty(&self) -> Result<()> {
        if self.cache.dirty_len() > self.max_dirty {
            self.flush_inner()?;
        }
        Ok(())
    }
}

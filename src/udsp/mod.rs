//! UDSP (`.sparseimage`): Apple's single-file sparse image. A header node
//! at offset 0, then bands appended in the order they were first written;
//! when the header node's 1008 slots are full, an index node is appended
//! and its 1010 slots name the bands that follow it (see `layout.rs`).
//!
//! ## Invariants and update protocol (crash safety)
//! There is no journal; ordering keeps every crash state valid:
//! 1. A new band takes the slot after the last used one. Its area is made
//!    to read as zeros durably first: grown with a durable length
//!    (`Storage::extend`), or, when a crash left bytes there, punched and
//!    synced. Then its data is written, then the 4-byte slot naming it.
//!    A slot lies inside one sector, so it lands whole; if it lands before
//!    the data, the band reads as zeros where the data did not land.
//! 2. A new index node is written whole (empty), synced, and only then
//!    linked from the node before it, so a link never names a node that is
//!    not on disk.
//! 3. A flush syncs the file: data, slots and punches written before it
//!    become durable.
//! 4. Discards punch holes inside bands; slots stay (as macOS does), and
//!    `compact` gives the space back. Compaction moves a band by copying
//!    it, syncing, recording the move in the header's reserved bytes,
//!    then naming the new slot and clearing the old one (a sync between
//!    each), so a crash leaves either slot alone or the recorded pair.
//! 5. Growing zeroes what the old last band held past the old end (synced)
//!    before the new size is written; shrinking clears the slots of bands
//!    past the new end and syncs before the new size is written.
//!
//! Concurrency: every read, write and discard holds `exclusive` shared;
//! compact and resize hold it alone. New bands are taken under `alloc`, so
//! two writers never take the same slot and slot writes never race.

mod compact;
pub mod create;
pub mod header;
pub mod index;
pub mod layout;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use serde::Serialize;

use crate::asif::engine::{lock_file, Extent, OpenOptions};
use crate::disk::{Disk, Format, HostPiece, Translation};
use crate::error::{Error, Result};
use crate::host::file::{open_container, FileStorage, Storage};
use crate::stats::{Counter, IoCounters, IoStats};
pub use compact::CompactReport;
pub use create::{create, create_with, CreateOptions};
use header::{Header, NODE_SIZE, SECTOR};
use index::IndexNode;
use layout::{locate, Layout};

/// Counters of one open image, for `asiffs stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub io: IoStats,
    pub bands_allocated: u64,
    pub bands_used: u64,
    pub index_nodes: u64,
    pub band_size: u64,
}

#[derive(Default)]
struct Counters {
    io: IoCounters,
    bands_allocated: Counter,
}

/// An open `.sparseimage`. Every method takes `&self` and may run on many
/// threads at once.
pub struct SparseImage {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    writable: bool,
    band_size: u64,
    /// The header's fields as on disk (its slots live in `layout`).
    header: Mutex<Header>,
    size: AtomicU64,
    /// Shared by I/O (held by a translated request until its host I/O
    /// completes), exclusive for compact and resize.
    exclusive: Arc<RwLock<()>>,
    layout: RwLock<Layout>,
    /// Held while a new band or node is taken; holds the end of the area
    /// past the last band known to read as zeros durably (see
    /// `prepare_area`).
    alloc: Mutex<u64>,
    flush_lock: Mutex<()>,
    /// Set by every change; a flush with nothing to do skips its sync.
    dirty: AtomicBool,
    counters: Counters,
}

/// How far ahead the file grows for new bands.
const GROW: u64 = 16 << 20;

/// One band's share of a request: logical band, offset in it, bytes of
/// the request before it, length.
struct Piece {
    band: u32,
    within: u64,
    at: usize,
    len: u64,
}

fn pieces(offset: u64, len: u64, bs: u64) -> impl Iterator<Item = Result<Piece>> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let within = pos % bs;
        let n = (bs - within).min(end - pos);
        let piece = u32::try_from(pos / bs)
            .map_err(|_| Error::Corrupt(format!("offset {pos:#x} is past the last band id")))
            .map(|band| Piece {
                band,
                within,
                at: (pos - offset) as usize,
                len: n,
            });
        pos += n;
        Some(piece)
    })
}

impl SparseImage {
    /// Opens the `.sparseimage` at `path`; a writer takes an exclusive
    /// `flock`, so a second opener gets [`Error::Locked`].
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<SparseImage> {
        let path = path.as_ref();
        let storage = open_container(path, opts)?;
        Self::from_storage(path, Arc::new(storage), opts)
    }

    /// Opens an image on any [`Storage`] (tests replaying crashes, fuzzing).
    /// Nothing is written unless the image is valid and opened writable.
    pub fn from_storage(
        path: &Path,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
    ) -> Result<SparseImage> {
        let ctx = |what: &str| format!("{}: {what}", path.display());
        let len = storage.len().map_err(|e| Error::io(ctx("stat"), e))?;
        let (header, survey) = survey(&*storage, len).map_err(|e| match e {
            Error::Io { context, source } => Error::io(ctx(&context), source),
            e => e,
        })?;
        if let Some(first) = survey.problems.into_iter().next() {
            return Err(Error::Corrupt(first));
        }
        let img = SparseImage {
            path: path.to_path_buf(),
            band_size: header.band_size(),
            size: AtomicU64::new(header.size()),
            header: Mutex::new(header),
            storage,
            writable: opts.writable,
            exclusive: Arc::new(RwLock::new(())),
            layout: RwLock::new(survey.layout),
            alloc: Mutex::new(0),
            flush_lock: Mutex::new(()),
            dirty: AtomicBool::new(false),
            counters: Counters::default(),
        };
        if img.writable {
            img.finish_interrupted_move()?;
        }
        Ok(img)
    }

    /// Creates an image (see [`create`]) and opens it for writing.
    pub fn create(path: impl AsRef<Path>, size: u64, band_size: u64) -> Result<SparseImage> {
        create(path.as_ref(), size, band_size)?;
        SparseImage::open(path, &OpenOptions::writable())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Largest size [`SparseImage::resize`] accepts: as many bands as
    /// 32-bit band ids can name.
    pub fn max_size(&self) -> u64 {
        (u64::from(u32::MAX).saturating_mul(self.band_size) / SECTOR) * SECTOR
    }

    pub fn band_size(&self) -> u64 {
        self.band_size
    }

    /// A copy of the header node's fields and slots as they are now.
    pub fn header(&self) -> Header {
        let mut h = self.header.lock().clone();
        h.slots = self.layout.read().nodes[0].slots.clone();
        h
    }

    /// Offsets of the index nodes, in chain order.
    pub fn index_nodes(&self) -> Vec<u64> {
        self.layout.read().nodes[1..]
            .iter()
            .map(|n| n.offset)
            .collect()
    }

    /// Where logical band `band` lives in the file, if it has a slot.
    pub fn band_offset(&self, band: u32) -> Option<u64> {
        let l = self.layout.read();
        l.slot_offset(*l.map.get(&band)?)
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.path.display()), e)
    }

    fn begin_change(&self) -> Result<RwLockReadGuard<'_, ()>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        Ok(self.exclusive.read())
    }

    fn begin_exclusive(&self) -> Result<RwLockWriteGuard<'_, ()>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        Ok(self.exclusive.write())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn lookup(&self, band: u32) -> Option<u64> {
        let l = self.layout.read();
        l.slot_offset(*l.map.get(&band)?)
    }

    fn sync(&self) -> Result<()> {
        self.storage.sync().map_err(|e| self.io_err("sync", e))
    }

    fn write_raw(&self, buf: &[u8], at: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, at)
            .map_err(|e| self.io_err(what, e))
    }

    /// Writes the header's fields (first sector, one write).
    fn write_header_fields(&self, h: &Header) -> Result<()> {
        self.write_raw(&h.encode_fields(), 0, "writing the header")
    }

    /// Writes band id `id` into global slot `g` (one 4-byte write).
    fn write_slot(&self, g: u64, id: u32) -> Result<()> {
        let field = self
            .layout
            .read()
            .slot_field(g)
            .ok_or_else(|| Error::Corrupt(format!("slot {g} has no node")))?;
        self.write_raw(&id.to_be_bytes(), field, "writing a band slot")
    }

    /// Makes `start..end` of the file read as zeros durably, growing it
    /// when it ends before `end`. The file grows [`GROW`] bytes ahead at a
    /// time, one durable length change for many new bands; `prepared` (the
    /// `alloc` guard) remembers how far, and close trims what is unused.
    fn prepare_area(&self, prepared: &mut u64, start: u64, end: u64) -> Result<()> {
        if start < *prepared && end <= *prepared {
            return Ok(());
        }
        let end = end.max(start.saturating_add(GROW));
        let len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        let r = if start >= len {
            self.storage.extend(end)
        } else {
            // Bytes an interrupted allocation left behind.
            self.storage
                .punch(start, end.min(len) - start)
                .and_then(|()| {
                    if len < end {
                        self.storage.set_len(end)
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| self.storage.sync())
        };
        r.map_err(|e| self.io_err("growing the file", e))?;
        *prepared = end;
        Ok(())
    }

    /// Appends an empty index node after the last node's bands and links
    /// it. Called with `alloc` held.
    fn add_node(&self, prepared: &mut u64) -> Result<()> {
        let (at, number, prev) = {
            let l = self.layout.read();
            let at = l
                .next_node_offset()
                .ok_or_else(|| Error::Corrupt("the next index node lies past 2^64".into()))?;
            (at, l.nodes.len(), l.nodes[l.nodes.len() - 1].offset)
        };
        let end = at
            .checked_add(NODE_SIZE)
            .ok_or_else(|| Error::Corrupt("the next index node lies past 2^64".into()))?;
        let number =
            u32::try_from(number).map_err(|_| Error::Corrupt("too many index nodes".into()))?;
        self.prepare_area(prepared, at, end)?;
        self.write_raw(
            &IndexNode::new(number).encode(),
            at,
            "writing an index node",
        )?;
        self.sync()?;
        if number == 1 {
            let mut h = self.header.lock();
            h.next_node = at;
            self.write_header_fields(&h)?;
        } else {
            self.write_raw(
                &at.to_be_bytes(),
                prev + index::off::NEXT_NODE as u64,
                "linking an index node",
            )?;
        }
        self.layout.write().nodes.push(layout::NodeInfo {
            offset: at,
            number,
            slots: vec![0; index::INDEX_SLOTS],
        });
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes `data` at `within` of logical band `band`, giving the band a
    /// slot first if it has none.
    fn write_new_band(&self, band: u32, within: u64, data: &[u8]) -> Result<()> {
        let mut prepared = self.alloc.lock();
        if let Some(host) = self.lookup(band) {
            // Another writer gave it a slot meanwhile.
            return self.write_data(data, host + within);
        }
        let g = self.layout.read().next_slot;
        if locate(g).0 >= self.layout.read().nodes.len() {
            self.add_node(&mut prepared)?;
        }
        let host = self
            .layout
            .read()
            .slot_offset(g)
            .ok_or_else(|| Error::Corrupt(format!("slot {g} lies past 2^64")))?;
        let end = host
            .checked_add(self.band_size)
            .ok_or_else(|| Error::Corrupt(format!("slot {g} lies past 2^64")))?;
        self.prepare_area(&mut prepared, host, end)?;
        let written = self
            .write_data(data, host + within)
            .and_then(|()| self.write_slot(g, band + 1));
        if written.is_err() {
            // The area may hold bytes now: the next band punches it again.
            *prepared = 0;
        }
        written?;
        {
            let mut l = self.layout.write();
            l.set_slot(g, band + 1);
            l.map.insert(band, g);
            l.next_slot = g + 1;
        }
        self.counters.bands_allocated.bump(1);
        Ok(())
    }

    fn write_data(&self, data: &[u8], at: u64) -> Result<()> {
        self.storage
            .write_data(data, at)
            .map_err(|e| self.io_err("writing a band", e))
    }

    /// Completes a band move an interrupted compaction recorded: the new
    /// slot is in use, the old one is cleared before anything else.
    fn finish_interrupted_move(&self) -> Result<()> {
        let Some((from, _to)) = self.layout.read().interrupted_move else {
            return Ok(());
        };
        self.write_slot(from, 0)?;
        self.sync()?;
        let mut h = self.header.lock();
        h.reserved[..header::intent::LEN].copy_from_slice(&header::encode_intent(None));
        self.write_header_fields(&h)?;
        self.sync()?;
        let mut l = self.layout.write();
        l.set_slot(from, 0);
        l.interrupted_move = None;
        Ok(())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _shared = self.exclusive.read();
        for p in pieces(offset, buf.len() as u64, self.band_size) {
            let p = p?;
            let dst = &mut buf[p.at..p.at + p.len as usize];
            match self.lookup(p.band) {
                Some(host) => self
                    .storage
                    .read_data(dst, host + p.within)
                    .map_err(|e| self.io_err("reading a band", e))?,
                None => dst.fill(0),
            }
        }
        self.counters.io.read(buf.len() as u64);
        Ok(())
    }

    /// Where `offset..offset+len` lies in the file: a piece per band
    /// that has a slot. A read leaves bands without one to the zeroed
    /// buffer; a write touching one is not translated (it takes a slot).
    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        let Some(fds) = self.storage.async_fds() else {
            return Ok(None);
        };
        if write && !self.writable {
            return Ok(None);
        }
        let shared = self.exclusive.read_arc();
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        for p in pieces(offset, len, self.band_size) {
            let p = p?;
            match self.lookup(p.band) {
                Some(host) => out.push(HostPiece::on(fds, p.at, host + p.within, p.len as usize)),
                None if write => return Ok(None),
                None => {}
            }
        }
        Ok(Some(Translation {
            pieces: out,
            hold: Box::new(shared),
        }))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _shared = self.begin_change()?;
        self.check_range(offset, buf.len() as u64)?;
        let result = (|| -> Result<()> {
            for p in pieces(offset, buf.len() as u64, self.band_size) {
                let p = p?;
                let src = &buf[p.at..p.at + p.len as usize];
                match self.lookup(p.band) {
                    Some(host) => self.write_data(src, host + p.within)?,
                    None => self.write_new_band(p.band, p.within, src)?,
                }
            }
            Ok(())
        })();
        // Even a failed write may have changed the file.
        self.dirty.store(true, Ordering::Release);
        result?;
        self.counters.io.write(buf.len() as u64);
        Ok(())
    }

    /// Punches `offset..offset+len` inside the bands that have slots.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        for p in pieces(offset, len, self.band_size) {
            let p = p?;
            if let Some(host) = self.lookup(p.band) {
                self.dirty.store(true, Ordering::Release);
                self.storage
                    .punch(host + p.within, p.len)
                    .map_err(|e| self.io_err("punching a band", e))?;
            }
        }
        self.counters.io.discard(len);
        Ok(())
    }

    /// Makes the range read as zeros and frees its host blocks; clamped to
    /// the disk.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _shared = self.begin_change()?;
        let size = self.size();
        if offset >= size {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(size);
        self.zero_range(offset, end - offset)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _shared = self.begin_change()?;
        self.check_range(offset, len)?;
        self.zero_range(offset, len)
    }

    /// Makes every change that returned before it durable.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _f = self.flush_lock.lock();
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.storage.sync() {
                self.dirty.store(true, Ordering::Release);
                return Err(self.io_err("sync", e));
            }
        }
        self.counters.io.flush();
        Ok(())
    }

    /// Changes the size (a multiple of 512 bytes). A shrink clears the
    /// slots of the bands past the new end and punches their blocks; the
    /// room their slots take in the file returns at the next `compact`.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let _only = self.begin_exclusive()?;
        if new_size % SECTOR != 0 {
            return Err(Error::Invalid(format!(
                "size {new_size} is not a multiple of {SECTOR} bytes"
            )));
        }
        let bs = self.band_size;
        let bands = new_size.div_ceil(bs);
        if bands > u64::from(u32::MAX) {
            return Err(Error::Invalid(format!(
                "size {new_size} needs {bands} bands of {bs} bytes, more than 32-bit band ids allow"
            )));
        }
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        self.dirty.store(true, Ordering::Release);
        // What the band holding the smaller end keeps past it reads as
        // zeros once the size passes it.
        let edge = old.min(new_size);
        if edge % bs != 0 {
            if let Some(host) = self.lookup((edge / bs) as u32) {
                let within = edge % bs;
                self.storage
                    .punch(host + within, bs - within)
                    .map_err(|e| self.io_err("punching a band", e))?;
            }
        }
        if new_size < old {
            let gone: Vec<(u32, u64)> = {
                let l = self.layout.read();
                l.map
                    .range(u32::try_from(bands).unwrap_or(u32::MAX)..)
                    .map(|(&b, &g)| (b, g))
                    .collect()
            };
            for &(band, g) in &gone {
                self.write_slot(g, 0)?;
                let mut l = self.layout.write();
                l.set_slot(g, 0);
                l.map.remove(&band);
            }
            self.sync()?;
            {
                let mut h = self.header.lock();
                h.sector_count = new_size / SECTOR;
                self.write_header_fields(&h)?;
            }
            self.size.store(new_size, Ordering::Release);
            // The slots are cleared durably: free their blocks.
            for &(_, g) in &gone {
                let host = self.layout.read().slot_offset(g);
                if let Some(host) = host {
                    self.storage
                        .punch(host, bs)
                        .map_err(|e| self.io_err("punching a band", e))?;
                }
            }
        } else {
            self.sync()?;
            let mut h = self.header.lock();
            h.sector_count = new_size / SECTOR;
            self.write_header_fields(&h)?;
            self.size.store(new_size, Ordering::Release);
        }
        Ok(())
    }

    /// First offset at or after `offset` inside a band that has a slot.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        let _shared = self.exclusive.read();
        let size = self.size();
        if offset >= size {
            return Ok(None);
        }
        let bs = self.band_size;
        let first = u32::try_from(offset / bs).unwrap_or(u32::MAX);
        let l = self.layout.read();
        Ok(l.map
            .range(first..)
            .next()
            .map(|(&b, _)| (u64::from(b) * bs).max(offset))
            .filter(|&at| at < size))
    }

    /// First offset at or after `offset` in a band without a slot; the
    /// size if none.
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
        let bs = self.band_size;
        let mut band = offset / bs;
        let l = self.layout.read();
        for (&b, _) in l.map.range(u32::try_from(band).unwrap_or(u32::MAX)..) {
            if u64::from(b) != band {
                break;
            }
            band += 1;
        }
        Ok((band * bs).max(offset).min(size))
    }

    /// The disk as runs of bands with slots (data) and without (zeros).
    pub fn extents(&self) -> Result<Vec<Extent>> {
        let _shared = self.exclusive.read();
        let size = self.size();
        let bs = self.band_size;
        let l = self.layout.read();
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| Extent::push_merged(&mut out, e);
        let mut at = 0;
        for (&b, &g) in &l.map {
            let start = u64::from(b) * bs;
            if start >= size {
                break;
            }
            if start > at {
                push(Extent {
                    start: at,
                    length: start - at,
                    data: false,
                    offset: None,
                });
            }
            let end = (start + bs).min(size);
            push(Extent {
                start,
                length: end - start,
                data: true,
                offset: l.slot_offset(g),
            });
            at = end;
        }
        if at < size {
            push(Extent {
                start: at,
                length: size - at,
                data: false,
                offset: None,
            });
        }
        Ok(out)
    }

    pub fn allocated_bytes(&self) -> Result<u64> {
        self.storage
            .allocated_bytes()
            .map_err(|e| self.io_err("stat", e))
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let l = self.layout.read();
        Stats {
            io: c.io.snapshot(),
            bands_allocated: c.bands_allocated.get(),
            bands_used: l.used(),
            index_nodes: l.nodes.len() as u64 - 1,
            band_size: self.band_size,
        }
    }

    /// Problems in the image as it is on disk, one line each (none: clean).
    pub fn check(&self) -> Result<Vec<String>> {
        let _shared = self.exclusive.read();
        let len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        check_storage(&*self.storage, len)
    }

    /// Flushes and closes, reporting a failure that `Drop` would only log.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// Flushes, then gives back the room the file grew by but no band
    /// took. A second call finds nothing to do.
    fn shutdown(&self) -> Result<()> {
        self.flush()?;
        if !self.writable {
            return Ok(());
        }
        let mut prepared = self.alloc.lock();
        if *prepared == 0 {
            return Ok(());
        }
        let used_end = self.layout.read().used_end();
        let len = self.storage.len().map_err(|e| self.io_err("stat", e))?;
        if len > used_end {
            self.storage
                .set_len(used_end)
                .and_then(|()| self.storage.sync())
                .map_err(|e| self.io_err("trimming the file", e))?;
        }
        *prepared = 0;
        Ok(())
    }
}

impl Drop for SparseImage {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(path = %self.path.display(), "flush on close failed: {e}");
        }
    }
}

/// Reads and decodes the header and walks the chain.
fn survey(storage: &dyn Storage, len: u64) -> Result<(Header, layout::Survey)> {
    let mut hb = vec![0u8; NODE_SIZE.min(len) as usize];
    storage
        .read_at(&mut hb, 0)
        .map_err(|e| Error::io("reading the header", e))?;
    let header = Header::decode(&hb)?;
    let survey = Layout::survey(&header, len, |at| {
        let mut b = vec![0u8; NODE_SIZE as usize];
        storage
            .read_at(&mut b, at)
            .map_err(|e| Error::io("reading an index node", e))?;
        Ok(b)
    })?;
    Ok((header, survey))
}

fn check_storage(storage: &dyn Storage, len: u64) -> Result<Vec<String>> {
    match survey(storage, len) {
        Ok((_, s)) => Ok(s.problems),
        Err(Error::Corrupt(line)) => Ok(vec![line]),
        Err(e) => Err(e),
    }
}

/// Problems in the `.sparseimage` at `path`, one line each; an empty list
/// means it is clean. A file that is no sparse image at all is an error.
pub fn check(path: &Path) -> Result<Vec<String>> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    let file = File::open(path).map_err(ctx)?;
    lock_file(&file, crate::asif::engine::LockMode::Shared, path)?;
    let storage = FileStorage::new(file);
    let len = storage.len().map_err(ctx)?;
    check_storage(&storage, len)
}

impl Disk for SparseImage {
    fn format(&self) -> Format {
        Format::Udsp
    }
    fn path(&self) -> &Path {
        SparseImage::path(self)
    }
    fn size(&self) -> u64 {
        SparseImage::size(self)
    }
    fn max_size(&self) -> u64 {
        SparseImage::max_size(self)
    }
    fn is_writable(&self) -> bool {
        SparseImage::is_writable(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        SparseImage::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        SparseImage::write_at(self, buf, offset)
    }
    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        SparseImage::translate(self, offset, len, write)
    }
    fn may_translate(&self) -> bool {
        self.storage.async_fds().is_some()
    }
    fn io_done(&self, write: bool, len: u64, ok: bool) {
        if write {
            self.dirty.store(true, Ordering::Release);
        }
        self.counters.io.done(write, len, ok);
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        SparseImage::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        SparseImage::write_zeroes(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        SparseImage::flush(self)
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        SparseImage::resize(self, new_size)
    }
    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        SparseImage::seek_data(self, offset)
    }
    fn seek_hole(&self, offset: u64) -> Result<u64> {
        SparseImage::seek_hole(self, offset)
    }
    fn extents(&self) -> Result<Vec<Extent>> {
        SparseImage::extents(self)
    }
    fn allocated_bytes(&self) -> Result<u64> {
        SparseImage::allocated_bytes(self)
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(SparseImage::stats(self)).unwrap_or(serde_json::Value::Null)
    }
}

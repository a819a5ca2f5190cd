//! UDIF (`.dmg`) images: a data fork, an XML property list whose `blkx`
//! resources are `mish` block tables, and a 512-byte `koly` trailer.
//!
//! [`Udif`] serves the disk the tables describe. Invariants:
//! - the run map is sorted, non-overlapping, and every run with data lies
//!   inside the data fork, at its table's data start plus its offset (see
//!   [`blkx::RunMap`], whose runs hold that sum); sectors no run covers,
//!   and zero and free runs, read as zeros;
//! - images with any compressed run (UDZO, UDBZ, ULFO, ULMO, ADC) are
//!   read-only: every change is [`Error::ReadOnly`] and the file is opened
//!   without write access; so are images whose raw runs share bytes or
//!   whose data fork overlaps the property list, and images that would
//!   need new space but cannot have it (a resource fork after the data
//!   fork, or more than [`edit::MAX_RUNS`] runs) (`write_obstacle`);
//! - in a writable (UDRW) image a write to a raw run goes straight to the
//!   run's bytes, a discard punches a hole in the host file (zero and
//!   free runs already read as zeros), a flush is `fdatasync`. Before the
//!   first change after an open, the data-fork, master and per-table
//!   CRC32s (which the change would make stale) are set to "none", in
//!   place (the property list keeps its length), in an order a crash
//!   cannot tear into a mismatch (`clear_checksums`);
//! - a write (or `allocate`) touching a zero or free run, or sectors no
//!   run covers, first gives each aligned 64 MiB piece it touches new
//!   space at the end of the data fork (a hole in the host file until
//!   written), as a raw run ([`edit`]); `extents` follows the host file's
//!   holes inside raw runs, so such a piece maps as data only where
//!   written; `resize` grows the disk by free runs (space comes only
//!   when written) or cuts the runs past a smaller end and punches their
//!   bytes. Either is a new property list and trailer, written by
//!   `commit` in an order that only ever leaves a valid trailer in the
//!   file's last sector: (a) a copy of the current trailer at the new end
//!   of the file (a whole 512-byte sector of it), synced; (b) the new
//!   property list after the new space, synced; (c) the new trailer over
//!   the copy (one sector), synced. Only then are the old property list
//!   and trailer, now unreferenced bytes inside the data fork, punched.
//!   The file never shrinks: the data fork only grows, holding holes
//!   where old tails were. The file's length grows only with a write
//!   that extends it, as on Linux filesystems;
//! - a crash at any instant leaves an image that opens and checks clean,
//!   holding every write a completed flush (or resize) covered: replayed
//!   crash point by crash point in `tests/udif.rs`.

pub mod blkx;
pub mod check;
pub mod codec;
pub mod create;
pub mod edit;
pub mod plist;
pub mod trailer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::asif::engine::{lock_file, Extent, OpenOptions};
use crate::disk::{Disk, Format, HostPiece, Translation};
use crate::error::{Error, Result};
use crate::host::crypt::{header_v2::MAGIC as ENCRYPTED_HEAD, trailer_v1::MAGIC as ENCRYPTED_TAIL};
use crate::host::file::{FileStorage, Storage};
use crate::stats::{Counter, IoCounters, IoStats};
use blkx::{Mish, RunKind, RunMap, SECTOR};
pub use check::{check, CheckReport};
pub use create::{create_udrw, MAX_UDRW_SIZE};
use edit::Tables;
use trailer::{Checksum, Koly, TRAILER_SIZE};

/// A structure of the image breaks the format's rules (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// Largest property list asiffs reads.
pub const MAX_PLIST: u64 = 256 << 20;
/// Decompressed runs kept in memory.
pub const CACHE_BYTES: usize = 32 << 20;

/// Why an image with a resource fork gets no new space: the data fork
/// would grow over it.
const RSRC_FORK: &str = "the image has a resource fork, which a larger data fork would cover";

/// What the file says, decoded and checked.
#[derive(Debug, Clone)]
pub struct Layout {
    pub koly: Koly,
    pub blkx: Vec<plist::BlkxResource>,
    pub tables: Vec<Mish>,
    pub map: RunMap,
}

impl Layout {
    /// Why the image cannot be written in place, if it cannot.
    fn write_obstacle(&self) -> Option<Obstacle> {
        if let Some(k) = self.map.has_compressed() {
            return Some(Obstacle::Compressed(k));
        }
        let mut raw: Vec<(u64, u64)> = self
            .map
            .runs
            .iter()
            .filter(|r| r.kind == RunKind::Raw)
            .map(|r| (r.offset, r.length))
            .collect();
        raw.sort_unstable();
        if raw.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Some(Obstacle::Refused(
                "raw runs share bytes of the data fork".into(),
            ));
        }
        let raw_sectors: u64 = self
            .map
            .runs
            .iter()
            .filter(|r| r.kind == RunKind::Raw)
            .map(|r| r.sectors)
            .sum();
        if self.koly.rsrc_fork_length != 0 && raw_sectors != self.map.sectors {
            return Some(Obstacle::Refused(RSRC_FORK.into()));
        }
        let runs = edit::cover_cost(&self.tables, self.map.sectors);
        if runs > edit::MAX_RUNS {
            return Some(Obstacle::Refused(format!(
                "runs covering the disk's {} sectors would number {runs}, more than the {} asiffs writes",
                self.map.sectors,
                edit::MAX_RUNS
            )));
        }
        // Both ranges were checked to end before the trailer.
        let k = &self.koly;
        let fork = k.data_fork_offset..k.data_fork_offset + k.data_fork_length;
        let plist = k.plist_offset..k.plist_offset + k.plist_length;
        if fork.start < plist.end && plist.start < fork.end {
            return Some(Obstacle::Refused(
                "the data fork overlaps the property list".into(),
            ));
        }
        None
    }
}

enum Obstacle {
    Compressed(RunKind),
    Refused(String),
}

/// The hdiutil format name of images compressed with `kind`.
fn format_name(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Adc => "UDCO",
        RunKind::Zlib => "UDZO",
        RunKind::Bzip2 => "UDBZ",
        RunKind::Lzfse => "ULFO",
        RunKind::Lzma => "ULMO",
        _ => "UDRW",
    }
}

fn read_vec(s: &dyn Storage, offset: u64, len: u64, path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    s.read_at(&mut b, offset)
        .map_err(|e| Error::io(format!("{}: reading {what}", path.display()), e))?;
    Ok(b)
}

/// Reads and checks the trailer, the property list and every table.
pub fn parse(s: &dyn Storage, path: &Path) -> Result<Layout> {
    let corrupt = |m: Malformed| Error::Corrupt(format!("{}: {m}", path.display()));
    let len = s
        .len()
        .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
    let head = read_vec(s, 0, len.min(8), path, "the header")?;
    if head.as_slice() == ENCRYPTED_HEAD {
        return Err(encrypted(path, "encrcdsa"));
    }
    let tail_len = len.min(TRAILER_SIZE as u64);
    let tail = read_vec(s, len - tail_len, tail_len, path, "the trailer")?;
    if tail.ends_with(ENCRYPTED_TAIL) {
        return Err(encrypted(path, "cdsaencr"));
    }
    let koly = Koly::decode(&tail).map_err(corrupt)?;
    koly.validate(len).map_err(corrupt)?;
    if koly.plist_length > MAX_PLIST {
        return Err(corrupt(Malformed(format!(
            "XML property list of {} bytes is larger than the {} MiB asiffs reads",
            koly.plist_length,
            MAX_PLIST >> 20
        ))));
    }
    let xml = read_vec(
        s,
        koly.plist_offset,
        koly.plist_length,
        path,
        "the property list",
    )?;
    let blkx = plist::decode(&xml).map_err(corrupt)?;
    let tables = blkx
        .iter()
        .enumerate()
        .map(|(i, b)| Mish::decode(&b.data).map_err(|m| Malformed(format!("blkx entry {i}: {m}"))))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(corrupt)?;
    let map = RunMap::build(&tables, koly.sector_count, koly.data_fork_length).map_err(corrupt)?;
    Ok(Layout {
        koly,
        blkx,
        tables,
        map,
    })
}

fn encrypted(path: &Path, magic: &str) -> Error {
    Error::Invalid(format!(
        "{}: encrypted disk image ({magic}): unlock it with its password rather than read it as a plain UDIF",
        path.display()
    ))
}

/// How an open image takes changes.
enum Mode {
    /// Opened read-only.
    ReadOnly,
    /// Opened for writing, but compressed.
    Compressed(RunKind),
    /// Opened for writing, but not writable in place.
    Refused(String),
    Writable,
}

#[derive(Default)]
struct Counters {
    io: IoCounters,
    decompressions: Counter,
    cache_hits: Counter,
}

/// Counters of one open image, for `asiffs stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub io: IoStats,
    /// Runs decompressed (each miss of the run cache).
    pub decompressions: u64,
    pub cache_hits: u64,
    pub cached_runs: u64,
    pub cached_bytes: u64,
    /// "UDZO", "UDRW", ...
    pub variant: &'static str,
}

/// Decompressed runs by run index, bounded by bytes.
struct RunCache {
    lru: LruCache<usize, Arc<Vec<u8>>>,
    bytes: usize,
}

/// An open UDIF image. Every method takes `&self` and may run on many
/// threads at once.
pub struct Udif {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    /// The descriptor holding the `flock`, kept for the image's lifetime.
    _lock: Option<File>,
    /// Replaced whole by each change of the tables; readers take a copy
    /// of the pointer, never hold the lock.
    layout: RwLock<Arc<Layout>>,
    /// Held by every change of the tables (new space, resize).
    change: Mutex<()>,
    mode: Mode,
    cache: Mutex<RunCache>,
    counters: Counters,
    /// Whether the checksums a change makes stale are cleared (see the
    /// module docs); taken by every change until it is.
    checksums_cleared: Mutex<bool>,
    dirty: AtomicBool,
}

/// A piece of a request inside one run (or a gap between runs).
struct Piece {
    /// Byte offset in the disk.
    at: u64,
    len: u64,
    /// Index into the run map, `None` for a gap.
    run: Option<usize>,
    /// Byte offset inside the run.
    within: u64,
}

impl Udif {
    /// Opens the image at `path`: read-only unless `opts.writable` and it
    /// is raw throughout; locked as `opts.lock` says.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Udif> {
        let path = path.as_ref();
        let io = |e| Error::io(path.display().to_string(), e);
        let ro = File::open(path).map_err(io)?;
        if !ro.metadata().map_err(io)?.is_file() {
            return Err(Error::Invalid(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        lock_file(&ro, opts.lock, path)?;
        let reader: Arc<dyn Storage> = Arc::new(FileStorage::new(ro.try_clone().map_err(io)?));
        let layout = parse(&*reader, path)?;
        let storage: Arc<dyn Storage> = if opts.writable && layout.write_obstacle().is_none() {
            let rw = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io)?;
            Arc::new(FileStorage::new(rw))
        } else {
            reader
        };
        Ok(Udif::from_layout(
            path,
            storage,
            layout,
            opts.writable,
            Some(ro),
        ))
    }

    /// Opens an image on any [`Storage`] (no lock): for tests and fuzzing.
    pub fn from_storage(path: &Path, storage: Arc<dyn Storage>, writable: bool) -> Result<Udif> {
        let layout = parse(&*storage, path)?;
        Ok(Udif::from_layout(path, storage, layout, writable, None))
    }

    fn from_layout(
        path: &Path,
        storage: Arc<dyn Storage>,
        layout: Layout,
        writable: bool,
        lock: Option<File>,
    ) -> Udif {
        let mode = match (writable, layout.write_obstacle()) {
            (false, _) => Mode::ReadOnly,
            (true, None) => Mode::Writable,
            (true, Some(Obstacle::Compressed(k))) => Mode::Compressed(k),
            (true, Some(Obstacle::Refused(r))) => Mode::Refused(r),
        };
        Udif {
            path: path.to_path_buf(),
            storage,
            _lock: lock,
            layout: RwLock::new(Arc::new(layout)),
            change: Mutex::new(()),
            mode,
            cache: Mutex::new(RunCache {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            counters: Counters::default(),
            checksums_cleared: Mutex::new(false),
            dirty: AtomicBool::new(false),
        }
    }

    /// The layout as it is now.
    pub fn layout(&self) -> Arc<Layout> {
        self.layout.read().clone()
    }

    /// "UDRW" for an image without compressed runs, else the hdiutil name
    /// of its compression.
    pub fn variant(&self) -> &'static str {
        format_name(self.layout().map.has_compressed().unwrap_or(RunKind::Raw))
    }

    /// Runs decompressed so far.
    pub fn decompressions(&self) -> u64 {
        self.counters.decompressions.get()
    }

    pub fn udif_stats(&self) -> Stats {
        let c = &self.counters;
        let cache = self.cache.lock();
        Stats {
            io: c.io.snapshot(),
            decompressions: c.decompressions.get(),
            cache_hits: c.cache_hits.get(),
            cached_runs: cache.lru.len() as u64,
            cached_bytes: cache.bytes as u64,
            variant: self.variant(),
        }
    }

    fn ctx(&self, what: &str) -> String {
        format!("{}: {what}", self.path.display())
    }

    /// Splits `offset..offset+len` (inside the disk) at run boundaries.
    fn pieces(l: &Layout, offset: u64, len: u64) -> Vec<Piece> {
        let runs = &l.map.runs;
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        let mut i = l.map.find(at / SECTOR);
        while at < end {
            match runs.get(i) {
                Some(r) if r.start * SECTOR <= at => {
                    let stop = end.min(r.end() * SECTOR);
                    out.push(Piece {
                        at,
                        len: stop - at,
                        run: Some(i),
                        within: at - r.start * SECTOR,
                    });
                    at = stop;
                    i += 1;
                }
                next => {
                    let stop = next.map_or(end, |r| end.min(r.start * SECTOR));
                    out.push(Piece {
                        at,
                        len: stop - at,
                        run: None,
                        within: 0,
                    });
                    at = stop;
                }
            }
        }
        out
    }

    /// Host offset of byte `within` of run `i` (its offset already holds
    /// its table's data start; the sum lies inside the fork).
    fn host(l: &Layout, i: usize, within: u64) -> u64 {
        l.koly.data_fork_offset + l.map.runs[i].offset + within
    }

    /// Run `i`, decompressed, from the cache or the file. (Only images
    /// with compressed runs use the cache; their tables never change.)
    fn expanded(&self, l: &Layout, i: usize) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.cache.lock().lru.get(&i) {
            self.counters.cache_hits.bump(1);
            return Ok(b.clone());
        }
        let bytes = Arc::new(self.decompress_run(l, i)?);
        self.counters.decompressions.bump(1);
        let mut c = self.cache.lock();
        if c.lru.put(i, bytes.clone()).is_none() {
            c.bytes += bytes.len();
        }
        while c.bytes > CACHE_BYTES {
            match c.lru.pop_lru() {
                Some((_, b)) => c.bytes -= b.len(),
                None => break,
            }
        }
        Ok(bytes)
    }

    /// Decompresses run `i` without the cache.
    pub(crate) fn decompress_run(&self, l: &Layout, i: usize) -> Result<Vec<u8>> {
        let r = l.map.runs[i];
        let src = read_vec(
            &*self.storage,
            Self::host(l, i, 0),
            r.length,
            &self.path,
            "a compressed run",
        )?;
        codec::decompress(r.kind, &src, (r.sectors * SECTOR) as usize).map_err(|m| {
            let t = &l.tables[r.table];
            let run_index = t
                .runs
                .iter()
                .position(|e| e.kind == r.kind && e.sector == r.start - t.first_sector)
                .unwrap_or(0);
            Error::Corrupt(format!(
                "{}: blkx entry {} run {run_index}: {m}",
                self.path.display(),
                r.table
            ))
        })
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let l = self.layout();
        Self::in_disk(&l, offset, buf.len() as u64)?;
        for p in Self::pieces(&l, offset, buf.len() as u64) {
            let out = &mut buf[(p.at - offset) as usize..(p.at - offset + p.len) as usize];
            let Some(i) = p.run else {
                out.fill(0);
                continue;
            };
            match l.map.runs[i].kind {
                RunKind::Raw => self
                    .storage
                    .read_data(out, Self::host(&l, i, p.within))
                    .map_err(|e| Error::io(self.ctx("reading a raw run"), e))?,
                k if k.is_compressed() => {
                    let run = self.expanded(&l, i)?;
                    out.copy_from_slice(&run[p.within as usize..(p.within + p.len) as usize]);
                }
                _ => out.fill(0),
            }
        }
        Ok(())
    }

    /// Entry point of every change.
    fn begin_change(&self) -> Result<()> {
        match &self.mode {
            Mode::Writable => {}
            Mode::ReadOnly | Mode::Compressed(_) => return Err(Error::ReadOnly),
            Mode::Refused(reason) => {
                return Err(Error::WritesRefused {
                    path: self.path.clone(),
                    reason: reason.clone(),
                })
            }
        }
        let mut cleared = self.checksums_cleared.lock();
        if !*cleared {
            self.clear_checksums()?;
            *cleared = true;
        }
        Ok(())
    }

    /// Sets the checksums a change makes stale to "none", durably, in an
    /// order a power cut cannot tear into a mismatch: the trailer first
    /// (one sector; with the master checksum gone the tables' checksums
    /// may change in any order), then each table's checksum type (a single
    /// base64 character changes), then the values the types now disown.
    fn clear_checksums(&self) -> Result<()> {
        let l = self.layout();
        let koly = &l.koly;
        let stale = koly.data_checksum.kind != trailer::CHECKSUM_NONE
            || koly.master_checksum.kind != trailer::CHECKSUM_NONE
            || l.tables
                .iter()
                .any(|t| t.checksum.kind != trailer::CHECKSUM_NONE);
        if !stale {
            return Ok(());
        }
        let io = |e| Error::io(self.ctx("clearing the checksums"), e);
        let mut k = koly.clone();
        k.data_checksum = Checksum::NONE;
        k.master_checksum = Checksum::NONE;
        let len = self.storage.len().map_err(io)?;
        self.storage
            .write_at(&k.encode(), len - TRAILER_SIZE as u64)
            .and_then(|()| self.storage.sync())
            .map_err(io)?;
        // The type alone, then the whole field.
        for whole in [false, true] {
            let edit = |t: &mut Vec<u8>| {
                if whole {
                    Checksum::NONE.encode(&mut t[0x40..0xC8]);
                } else {
                    t[0x40..0x44].copy_from_slice(&trailer::CHECKSUM_NONE.to_be_bytes());
                }
            };
            let xml = read_vec(
                &*self.storage,
                koly.plist_offset,
                koly.plist_length,
                &self.path,
                "the property list",
            )?;
            let patches = plist::patch_tables(&xml, |t| {
                if t.len() >= blkx::MISH_HEADER {
                    edit(t)
                }
            });
            for (at, bytes) in patches {
                self.storage
                    .write_at(&bytes, koly.plist_offset + at as u64)
                    .map_err(io)?;
            }
            self.storage.sync().map_err(io)?;
        }
        Ok(())
    }

    /// The range must lie inside the disk `l` describes (it may have
    /// shrunk since the caller looked).
    fn in_disk(l: &Layout, offset: u64, len: u64) -> Result<()> {
        let size = l.map.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Zeros a range of the disk: punches the host file under raw runs
    /// (the rest reads as zeros already).
    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.begin_change()?;
        let l = self.layout();
        Self::in_disk(&l, offset, len)?;
        for p in Self::pieces(&l, offset, len) {
            if let Some(i) = p.run.filter(|&i| l.map.runs[i].kind == RunKind::Raw) {
                self.storage
                    .punch(Self::host(&l, i, p.within), p.len)
                    .map_err(|e| Error::io(self.ctx("punching a hole"), e))?;
            }
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// The sector ranges of `offset..offset+len` that are not raw runs.
    fn unbacked(l: &Layout, offset: u64, len: u64) -> Vec<(u64, u64)> {
        Self::pieces(l, offset, len)
            .iter()
            .filter(|p| p.run.map_or(true, |i| l.map.runs[i].kind != RunKind::Raw))
            .map(|p| (p.at / SECTOR, (p.at + p.len).div_ceil(SECTOR)))
            .collect()
    }

    /// The layout once `offset..offset+len` lies in raw runs: new space
    /// is given to what does not (see the module docs).
    fn backed(&self, offset: u64, len: u64) -> Result<Arc<Layout>> {
        let l = self.layout();
        Self::in_disk(&l, offset, len)?;
        if Self::unbacked(&l, offset, len).is_empty() {
            return Ok(l);
        }
        {
            let _one = self.change.lock();
            let cur = self.layout();
            Self::in_disk(&cur, offset, len)?;
            let need = Self::unbacked(&cur, offset, len);
            if !need.is_empty() {
                let mut t = Tables::new(&cur.tables, cur.map.sectors);
                t.cover();
                let map = t
                    .map(cur.koly.data_fork_length)
                    .map_err(|m| Error::Corrupt(self.ctx(&m.0)))?;
                let pieces = Tables::pieces(&map, &need);
                let len = self.file_len()?;
                let start = len
                    .checked_next_multiple_of(4096)
                    .ok_or_else(|| Error::Invalid(self.ctx("the file is too large to grow")))?;
                let added = t
                    .back(&pieces, start - cur.koly.data_fork_offset)
                    .map_err(|m| Error::Corrupt(self.ctx(&m.0)))?;
                let end = start
                    .checked_add(added)
                    .ok_or_else(|| Error::Invalid(self.ctx("the file is too large to grow")))?;
                self.commit(&cur, &t, len, start, end)?;
            }
        }
        let l = self.layout();
        Self::in_disk(&l, offset, len)?;
        Ok(l)
    }

    fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io(self.ctx("stat"), e))
    }

    /// Writes the tables `t` out (see the module docs for the order): the
    /// file is `len` bytes now; the data fork grows to end at `end`, where
    /// the new property list goes; new space lies at `start..end`. What
    /// lay between the old data fork's end and `start` (the old property
    /// list and trailer) is punched once the new trailer is durable.
    fn commit(&self, cur: &Layout, t: &Tables, len: u64, start: u64, end: u64) -> Result<()> {
        let k0 = &cur.koly;
        if k0.rsrc_fork_length != 0 {
            return Err(Error::WritesRefused {
                path: self.path.clone(),
                reason: RSRC_FORK.into(),
            });
        }
        let io = |what: &'static str| move |e| Error::io(self.ctx(what), e);
        let xml = read_vec(
            &*self.storage,
            k0.plist_offset,
            k0.plist_length,
            &self.path,
            "the property list",
        )?;
        let entries: Vec<(Option<usize>, Option<Vec<u8>>)> = (0..t.tables.len())
            .map(|i| {
                let keep = !t.changed[i] && t.origin[i].is_some();
                (t.origin[i], (!keep).then(|| t.tables[i].encode()))
            })
            .collect();
        let corrupt = |m: Malformed| Error::Corrupt(self.ctx(&m.0));
        let xml = plist::rewrite(&xml, &entries).map_err(corrupt)?;
        if xml.len() as u64 > MAX_PLIST {
            return Err(Error::Invalid(self.ctx(&format!(
                "the tables would take a property list of {} bytes, more than the {} MiB asiffs reads",
                xml.len(),
                MAX_PLIST >> 20
            ))));
        }
        let mut k = k0.clone();
        k.data_fork_length = end - k.data_fork_offset;
        k.plist_offset = end;
        k.plist_length = xml.len() as u64;
        k.data_checksum = Checksum::NONE;
        k.master_checksum = Checksum::NONE;
        k.sector_count = t.sectors;
        // The trailer takes a whole sector of the file, so that a torn
        // write of it is the old sector or the new one.
        let new_len = (end + xml.len() as u64).next_multiple_of(SECTOR) + TRAILER_SIZE as u64;
        // Never write what would not open, writable, again.
        k.validate(new_len).map_err(corrupt)?;
        let blkx = plist::decode(&xml).map_err(corrupt)?;
        let tables = blkx
            .iter()
            .map(|b| Mish::decode(&b.data))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(corrupt)?;
        let map = RunMap::build(&tables, k.sector_count, k.data_fork_length).map_err(corrupt)?;
        let next = Layout {
            koly: k.clone(),
            blkx,
            tables,
            map,
        };
        let why = match next.write_obstacle() {
            None => None,
            Some(Obstacle::Refused(r)) => Some(r),
            Some(Obstacle::Compressed(k)) => Some(format!("{} runs", k.name())),
        };
        if let Some(r) = why {
            return Err(Error::Corrupt(self.ctx(&format!("new tables: {r}"))));
        }
        let trailer_at = new_len - TRAILER_SIZE as u64;
        let old = read_vec(
            &*self.storage,
            len - TRAILER_SIZE as u64,
            TRAILER_SIZE as u64,
            &self.path,
            "the trailer",
        )?;
        let s = &*self.storage;
        // (a) The file ends in the current trailer, at its new length.
        s.write_at(&old, trailer_at)
            .and_then(|()| s.sync())
            .map_err(io("extending the file"))?;
        // (b) The new property list, after the new space.
        s.write_at(&xml, end)
            .and_then(|()| s.sync())
            .map_err(io("writing the property list"))?;
        // (c) The new trailer: one sector, so it is old or new, not both.
        s.write_at(&k.encode(), trailer_at)
            .and_then(|()| s.sync())
            .map_err(io("writing the trailer"))?;
        *self.layout.write() = Arc::new(next);
        let fork_end = k0.data_fork_offset + k0.data_fork_length;
        let mut garbage = vec![(k0.plist_offset, k0.plist_length)];
        if fork_end < start {
            garbage.push((fork_end, start - fork_end));
        }
        for (at, n) in garbage {
            s.punch(at, n)
                .map_err(io("punching the old property list"))?;
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Changes the disk to `new_size` bytes (see the module docs).
    fn resize_to(&self, new_size: u64) -> Result<()> {
        if new_size == 0 || new_size % SECTOR != 0 {
            return Err(Error::Invalid(self.ctx(&format!(
                "a UDIF disk is a whole, nonzero number of 512-byte sectors, not {new_size} bytes"
            ))));
        }
        let max = self.max_size();
        if new_size > max {
            return Err(Error::Invalid(self.ctx(&format!(
                "{new_size} bytes is larger than the {max} bytes this UDIF image grows to"
            ))));
        }
        {
            let _one = self.change.lock();
            let cur = self.layout();
            let sectors = new_size / SECTOR;
            if sectors != cur.map.sectors {
                let mut t = Tables::new(&cur.tables, cur.map.sectors);
                let freed = if sectors < cur.map.sectors {
                    t.shrink(sectors)
                } else {
                    t.sectors = sectors;
                    t.cover();
                    Vec::new()
                };
                let len = self.file_len()?;
                self.commit(&cur, &t, len, len, len)?;
                for (at, n) in freed {
                    self.storage
                        .punch(cur.koly.data_fork_offset + at, n)
                        .map_err(|e| Error::io(self.ctx("punching cut runs"), e))?;
                }
            }
        }
        // Earlier writes are durable once resize returns, as a flush.
        self.dirty.store(true, Ordering::Release);
        Disk::flush(self)
    }

    /// Runs and gaps from `offset` on, as extents (raw runs split where
    /// the host file has holes).
    fn walk(&self, offset: u64, mut f: impl FnMut(Extent) -> bool) -> Result<()> {
        let l = self.layout();
        let size = l.map.size();
        if offset >= size {
            return Ok(());
        }
        let mut piece = Vec::new();
        for p in Self::pieces(&l, offset, size - offset) {
            piece.clear();
            match p.run.map(|i| (i, l.map.runs[i].kind)) {
                Some((i, RunKind::Raw)) => {
                    // New space and punched ranges are holes in the file.
                    crate::disk::host_extents(
                        &*self.storage,
                        p.at,
                        p.len,
                        Self::host(&l, i, p.within),
                        &mut piece,
                    )
                    .map_err(|e| Error::io(self.ctx("looking for data"), e))?
                }
                Some((_, k)) if k.is_compressed() => piece.push(Extent {
                    start: p.at,
                    length: p.len,
                    data: true,
                    offset: None,
                }),
                _ => piece.push(hole(p.at, p.len)),
            }
            for e in piece.drain(..) {
                if !f(e) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn hole(start: u64, length: u64) -> Extent {
    Extent {
        start,
        length,
        data: false,
        offset: None,
    }
}

impl Disk for Udif {
    fn format(&self) -> Format {
        Format::Udif
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        self.layout().map.size()
    }
    /// A writable image grows to [`MAX_UDRW_SIZE`] (1 TiB, the largest
    /// UDRW image `create` makes; its tables then stay a few MiB), or
    /// stays at its size if that is larger.
    fn max_size(&self) -> u64 {
        match self.mode {
            Mode::Writable => self.size().max(MAX_UDRW_SIZE),
            _ => self.size(),
        }
    }
    fn is_writable(&self) -> bool {
        matches!(self.mode, Mode::Writable)
    }
    fn write_refusal(&self) -> Option<String> {
        match &self.mode {
            Mode::Compressed(k) => Some(format!(
                "compressed UDIF image ({}, {} runs) is read-only",
                format_name(*k),
                k.name()
            )),
            Mode::Refused(r) => Some(r.clone()),
            _ => None,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_inner(buf, offset)?;
        self.counters.io.read(buf.len() as u64);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.begin_change()?;
        let l = self.backed(offset, buf.len() as u64)?;
        for p in Self::pieces(&l, offset, buf.len() as u64) {
            let Some(i) = p.run.filter(|&i| l.map.runs[i].kind == RunKind::Raw) else {
                return Err(Error::Corrupt(
                    self.ctx("a write fell outside every raw run"),
                ));
            };
            let src = &buf[(p.at - offset) as usize..(p.at - offset + p.len) as usize];
            self.storage
                .write_data(src, Self::host(&l, i, p.within))
                .map_err(|e| Error::io(self.ctx("writing a raw run"), e))?;
        }
        self.dirty.store(true, Ordering::Release);
        self.counters.io.write(buf.len() as u64);
        Ok(())
    }
    /// Raw runs map to the data fork; a read leaves zero and free runs
    /// and gaps to the zeroed buffer; a write there (it needs new space)
    /// or anything compressed is not translated. The hold is the layout
    /// the pieces come from: like the synchronous path, a translated
    /// request takes no lock against a table change (those only add
    /// space, or punch what a shrink cut off the disk).
    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        let Some(fds) = self.storage.async_fds() else {
            return Ok(None);
        };
        if write {
            if !matches!(self.mode, Mode::Writable) {
                return Ok(None);
            }
            self.begin_change()?;
        }
        let l = self.layout();
        Self::in_disk(&l, offset, len)?;
        let mut pieces = Vec::new();
        for p in Self::pieces(&l, offset, len) {
            let kind = p.run.map(|i| l.map.runs[i].kind);
            match (p.run, kind) {
                (Some(i), Some(RunKind::Raw)) => pieces.push(HostPiece::on(
                    fds,
                    (p.at - offset) as usize,
                    Self::host(&l, i, p.within),
                    p.len as usize,
                )),
                (_, Some(k)) if k.is_compressed() => return Ok(None),
                _ if write => return Ok(None),
                _ => {}
            }
        }
        Ok(Some(Translation {
            pieces,
            hold: Box::new(l),
        }))
    }
    fn may_translate(&self) -> bool {
        self.storage.async_fds().is_some() && self.layout().map.has_compressed().is_none()
    }
    fn io_done(&self, write: bool, len: u64, ok: bool) {
        if write {
            self.dirty.store(true, Ordering::Release);
        }
        self.counters.io.done(write, len, ok);
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        let start = offset.min(size);
        let end = offset.saturating_add(len).min(size);
        self.punch(start, end - start)?;
        self.counters.io.discard(end - start);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.punch(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.begin_change()?;
        let l = self.backed(offset, len)?;
        for p in Self::pieces(&l, offset, len) {
            if let Some(i) = p.run.filter(|&i| l.map.runs[i].kind == RunKind::Raw) {
                self.storage
                    .reserve(Self::host(&l, i, p.within), p.len)
                    .map_err(|e| Error::io(self.ctx("reserving space"), e))?;
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.counters.io.flush();
            if let Err(e) = self.storage.sync() {
                self.dirty.store(true, Ordering::Release);
                return Err(Error::io(self.ctx("syncing"), e));
            }
        }
        Ok(())
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        self.begin_change()?;
        self.resize_to(new_size)
    }
    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        let mut found = None;
        self.walk(offset, |e| {
            if e.data {
                found = Some(e.start);
            }
            found.is_none()
        })?;
        Ok(found)
    }
    fn seek_hole(&self, offset: u64) -> Result<u64> {
        let size = self.size();
        if offset >= size {
            return Err(Error::OutOfRange {
                offset,
                len: 0,
                size,
            });
        }
        let mut found = size;
        self.walk(offset, |e| {
            if !e.data {
                found = e.start;
            }
            e.data
        })?;
        Ok(found)
    }
    fn extents(&self) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        self.walk(0, |e| {
            Extent::push_merged(&mut out, e);
            true
        })?;
        Ok(out)
    }
    fn allocated_bytes(&self) -> Result<u64> {
        self.storage
            .allocated_bytes()
            .map_err(|e| Error::io(self.path.display().to_string(), e))
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(self.udif_stats()).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Udif {
    fn drop(&mut self) {
        if let Err(e) = Disk::flush(self) {
            tracing::error!(path = %self.path.display(), "flush on close failed: {e}");
        }
    }
}

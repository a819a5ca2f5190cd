//! The sparse block translator: an [`Image`] maps reads, writes and
//! discards of a virtual disk onto chunks of an ASIF container.
//!
//! ## Update protocol (crash safety)
//! The format has no journal, so safety comes from ordering alone:
//! 1. Data goes straight to its chunk. A new chunk is taken from past the
//!    end of the file (grown first) or from chunks freed and punched
//!    earlier, so it reads as zeros until written.
//!    The file grows a batch of chunks at a time, synced before use.
//! 2. An entry that changes between mapped and unmapped is also written
//!    through at once (unsynced): it names a chunk inside the durable file
//!    that reads as zeros until its data lands, so any order of arrival is
//!    valid, and a killed process leaves no orphaned chunk.
//! 3. A flush snapshots the dirty groups, syncs the container (data, punches
//!    and growth become durable), writes the groups in place and syncs
//!    again. Each 8-byte entry lies inside one sector, so a torn group write
//!    leaves each entry either old or new, and both are valid. Promoting a
//!    chunk macOS left partial waits for this path: its stale sectors must be
//!    zeroed durably before the entry says "fully valid".
//! 4. A new table is published at once: a new directory goes to the
//!    *inactive* slot with version + 1, all sectors but the first, sync,
//!    then the first (holding the version), sync. A torn directory write
//!    keeps the old version, so the old directory stays active.
//! 5. A chunk freed by a discard returns to the allocator only after the
//!    flush that made its entry change durable, and after every I/O that
//!    could still hold its old translation has finished.
//!
//! See `docs/design.md` for the reasoning and the crash-replay tests.

mod alloc;
mod cache;
mod compact;
mod create;
mod data;
mod flush;
pub mod memory;
mod open_scan;
mod repair;
mod scan;
mod sync;
mod translate;
pub mod types;
mod usage;

#[cfg(all(test, shuttle))]
mod model_check;

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use serde::Serialize;

use crate::asif::format::{
    BitmapEntry, ChunkEntry, Directory, Geometry, Header, Metadata, HEADER_SIZE,
};
use crate::error::{Error, Result};
use crate::host::file::Storage;
use crate::stats::{Counter, IoCounters, IoStats};
use alloc::{Allocator, IoGate};
use cache::GroupCache;
pub use compact::CompactReport;
pub use create::CreateOptions;
use open_scan::OpenScan;
pub use repair::RepairReport;
pub use scan::{CheckReport, Extent, ImageInfo};

/// How an image is locked against other processes (`flock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody else may open it (default for writers).
    Exclusive,
    /// Other readers may open it, writers may not (default for readers).
    Shared,
    /// No lock: reading an image another process may be changing.
    None,
}

/// Whether guest data goes through the host page cache, as QEMU's
/// `cache.direct`: `None` opens the container's data path with `O_DIRECT`,
/// so a guest that caches for itself is not cached twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    Writeback,
    None,
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub writable: bool,
    /// Host page cache for guest data (the index always uses it).
    pub cache: CacheMode,
    /// Chunk-groups kept in the index cache (16 KiB each for 1 MiB chunks).
    pub cache_groups: usize,
    pub lock: LockMode,
    /// A writable open scans the index for free and shared chunks before
    /// the first change; with more tables than this it does so on a
    /// background thread (reads go on, changes wait for it).
    pub scan_inline_tables: usize,
    /// Unlocks encrypted containers; without it they are refused.
    pub password: Option<crate::password::Password>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            cache: CacheMode::Writeback,
            cache_groups: 512,
            lock: LockMode::Shared,
            scan_inline_tables: 8,
            password: None,
        }
    }
}

impl OpenOptions {
    pub fn writable() -> Self {
        OpenOptions {
            writable: true,
            lock: LockMode::Exclusive,
            ..Default::default()
        }
    }
}

/// Counters of one open image, for `asiffs stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub io: IoStats,
    pub chunks_allocated: u64,
    pub chunks_freed: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub dirty_groups: u64,
    pub resident_groups: u64,
    pub free_chunks: u64,
    /// "none" when guest data bypasses the host page cache, else "writeback".
    pub cache: &'static str,
}

#[derive(Default)]
struct Counters {
    io: IoCounters,
    chunks_allocated: Counter,
    chunks_freed: Counter,
}

/// The directory as the engine keeps it.
struct DirState {
    /// Slot (0 = A, 1 = B) holding the active directory.
    active: usize,
    versions: [u64; 2],
    tables: Vec<u64>,
    table_chunks: HashSet<u64>,
}

/// An open ASIF image. Cheap to share behind an `Arc`; every method takes
/// `&self` and may run on many threads at once.
pub struct Image {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    geo: Geometry,
    header: Mutex<Header>,
    size: AtomicU64,
    writable: bool,
    /// Shared by every read, write, discard and flush; exclusive for the
    /// operations that move chunks or tables (compact, resize, repair), so
    /// the engine itself keeps them apart from I/O.
    exclusive: Arc<RwLock<()>>,
    /// The index scan of a writable open: free chunks, and whether the
    /// image may be written at all.
    open_scan: OpenScan,
    dir: RwLock<DirState>,
    cache: GroupCache,
    alloc: Allocator,
    gate: Arc<IoGate>,
    flush_lock: Mutex<()>,
    /// Set by every data change; a flush with nothing to do skips its sync.
    data_dirty: AtomicBool,
    counters: Counters,
    /// Past this many dirty groups a write flushes, bounding memory.
    max_dirty: usize,
    /// Guest data bypasses the host page cache (`CacheMode::None` in effect).
    direct_data: bool,
}

/// Takes the advisory lock that keeps writers apart (`flock`, non-blocking).
///
/// A conflict is retried for up to 200 ms before it is reported: a process
/// that forks while it has the image open leaves the lock with the child
/// until the child's `exec` closes the descriptor, so an image closed a
/// moment ago can still look locked.
pub(crate) fn lock_file(file: &File, mode: LockMode, path: &Path) -> Result<()> {
    use rustix::fs::FlockOperation as Op;
    let op = match mode {
        LockMode::Exclusive => Op::NonBlockingLockExclusive,
        LockMode::Shared => Op::NonBlockingLockShared,
        LockMode::None => return Ok(()),
    };
    for attempt in 0.. {
        match rustix::fs::flock(file, op) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if attempt < 20 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(rustix::io::Errno::WOULDBLOCK) => break,
            Err(e) => return Err(Error::io(format!("{}: locking", path.display()), e.into())),
        }
    }
    Err(Error::Locked {
        path: path.to_path_buf(),
    })
}

impl Image {
    /// Opens an existing image, validating its header and directories.
    /// Tables are read on demand, so opening costs the same at any size.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let storage = crate::host::file::open_container(path, opts)?;
        let direct = storage.is_direct();
        let mut img = Self::from_storage(path, Arc::new(storage), opts)?;
        img.direct_data = direct;
        Ok(img)
    }

    /// Opens an image on any [`Storage`] (used by tests that replay crashes).
    pub fn from_storage(
        path: &Path,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let ctx = |what: &str| format!("{}: {what}", path.display());
        let len = storage.len().map_err(|e| Error::io(ctx("stat"), e))?;
        let mut hb = [0u8; HEADER_SIZE];
        if len < HEADER_SIZE as u64 {
            return Err(Error::Format(crate::asif::format::FormatError::Truncated(
                len as usize,
                HEADER_SIZE,
            )));
        }
        storage
            .read_at(&mut hb, 0)
            .map_err(|e| Error::io(ctx("reading the header"), e))?;
        let header = Header::decode(&hb)?;
        let geo = Geometry::new(&header)?;
        let cs = geo.chunk_size;
        if len < cs {
            return Err(Error::Corrupt(format!(
                "container is truncated ({len} bytes, less than one chunk)"
            )));
        }
        if opts.writable && len % cs != 0 {
            return Err(Error::Corrupt(format!(
                "container length {len} is not a whole number of {cs}-byte chunks"
            )));
        }
        let end = len / cs;
        // Only the versions of both, then the active one whole: opening a
        // directory of images reads half as much.
        let mut versions = [0u64; 2];
        for (v, off) in versions.iter_mut().zip(geo.directory_offsets) {
            let mut b = [0u8; 8];
            storage
                .read_at(&mut b, off)
                .map_err(|e| Error::io(ctx("reading a directory"), e))?;
            *v = u64::from_be_bytes(b);
        }
        let active = Directory::active(versions);
        let mut b = vec![0u8; geo.directory_bytes as usize];
        storage
            .read_at(&mut b, geo.directory_offsets[active])
            .map_err(|e| Error::io(ctx("reading a directory"), e))?;
        let tables = Directory::decode(&b, geo.directory_entries).tables;
        let mut table_chunks = HashSet::new();
        for (t, &n) in tables.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if n >= end {
                return Err(Error::Corrupt(format!(
                    "directory entry {t} points at chunk {n}, past the end of the file ({end} chunks)"
                )));
            }
            if !table_chunks.insert(n) {
                return Err(Error::Corrupt(format!(
                    "directory entry {t} reuses table chunk {n}"
                )));
            }
        }
        let dir = DirState {
            active,
            versions,
            tables,
            table_chunks,
        };
        let cache_groups = opts.cache_groups.max(1);
        let open_scan = if opts.writable {
            OpenScan::start(path, &storage, &geo, &dir.tables, end, opts)
        } else {
            OpenScan::none()
        };
        Ok(Image {
            path: path.to_path_buf(),
            size: AtomicU64::new(geo.size),
            storage,
            header: Mutex::new(header),
            writable: opts.writable,
            exclusive: Arc::new(RwLock::new(())),
            open_scan,
            dir: RwLock::new(dir),
            cache: GroupCache::new(cache_groups),
            alloc: Allocator::new(cs, end),
            gate: Arc::new(IoGate::new()),
            flush_lock: Mutex::new(()),
            data_dirty: AtomicBool::new(false),
            counters: Counters::default(),
            max_dirty: cache_groups.max(64),
            direct_data: false,
            geo,
        })
    }

    /// Creates a new, empty image (see [`CreateOptions`]) and opens it for
    /// writing with an exclusive lock.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
        create::create(path.as_ref(), opts)?;
        Image::open(path, &OpenOptions::writable())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Largest size [`Image::resize`] accepts.
    pub fn max_size(&self) -> u64 {
        self.geo.size_limit()
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub fn header(&self) -> Header {
        self.header.lock().clone()
    }

    /// Whether changes are accepted: opened for writing, and the scan at
    /// open (if finished) found nothing that makes writing unsafe.
    pub fn is_writable(&self) -> bool {
        self.writable && self.open_scan.refusal().is_none()
    }

    /// Why writes are refused, if the scan at open has finished and
    /// refused them; does not wait for a scan still running.
    pub fn refusal_now(&self) -> Option<String> {
        self.open_scan.refusal()
    }

    /// Waits for the scan at open and says why writes are refused, if
    /// they are (entries sharing a chunk, entries out of rule).
    pub fn write_refusal(&self) -> Option<String> {
        if !self.writable {
            return None;
        }
        self.open_scan
            .wait(&self.alloc)
            .err()
            .map(|e| e.to_string())
    }

    /// Entry point of every change: shared access to the image, once the
    /// scan at open has finished and allowed writes.
    pub(super) fn begin_change(&self) -> Result<RwLockReadGuard<'_, ()>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let shared = self.exclusive.read();
        self.open_scan.wait(&self.alloc)?;
        Ok(shared)
    }

    /// Entry point of the operations that move chunks or tables (compact,
    /// resize, repair): the image to themselves, no I/O in flight.
    pub(super) fn begin_exclusive(&self) -> Result<RwLockWriteGuard<'_, ()>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let only = self.exclusive.write();
        self.open_scan.wait(&self.alloc)?;
        Ok(only)
    }

    /// Which directory is active (0 = A, 1 = B) and its version.
    pub fn active_directory(&self) -> (usize, u64) {
        let d = self.dir.read();
        (d.active, d.versions[d.active])
    }

    /// Stat of the container file.
    pub fn container_metadata(&self) -> Result<std::fs::Metadata> {
        std::fs::metadata(&self.path).map_err(|e| Error::io(self.path.display().to_string(), e))
    }

    /// Bytes the host has allocated to the container.
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.storage
            .allocated_bytes()
            .map_err(|e| Error::io(self.path.display().to_string(), e))
    }

    /// The metadata chunk's contents (stable uuid, user metadata).
    pub fn metadata(&self) -> Result<Metadata> {
        let _shared = self.exclusive.read();
        self.metadata_inner()
    }

    pub(super) fn metadata_inner(&self) -> Result<Metadata> {
        let mut b = vec![0u8; (64 << 10).min(self.geo.chunk_size as usize)];
        self.read_inner(&mut b, self.geo.metadata_offset)?;
        Ok(Metadata::decode(&b)?)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let cc = self.cache.counters();
        Stats {
            io: c.io.snapshot(),
            chunks_allocated: c.chunks_allocated.get(),
            chunks_freed: c.chunks_freed.get(),
            cache_hits: cc.hits,
            cache_misses: cc.misses,
            dirty_groups: self.cache.dirty_len() as u64,
            resident_groups: self.cache.resident_len() as u64,
            free_chunks: self.alloc.free_count(),
            cache: if self.direct_data {
                "none"
            } else {
                "writeback"
            },
        }
    }

    /// Flushes and closes, reporting a failure that `Drop` would only log.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// Flushes, then gives back the chunks the file grew by but never used.
    /// A second call (`close` then `Drop`) finds nothing to do and no sync.
    fn shutdown(&self) -> Result<()> {
        // A scan still running holds the file; let it finish first.
        let _ = self.open_scan.wait(&self.alloc);
        self.flush()?;
        if self.is_writable() {
            let trimmed = self.alloc.trim_tail(&*self.storage);
            match trimmed {
                Ok(true) => self.storage.sync(),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(|e| self.io_err("trimming the container", e))?;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Whether a data entry may be used: in rule, and pointing at a chunk
    /// inside the file that is not part of the index.
    fn entry_is_valid(&self, raw: u64, end: u64, tables: &HashSet<u64>) -> bool {
        match ChunkEntry(raw).state() {
            None => false,
            Some(s) => match ChunkEntry::encode(s).chunk() {
                Some(n) => n < end && !tables.contains(&n),
                None => true,
            },
        }
    }

    fn bitmap_entry_is_valid(&self, raw: u64, end: u64, tables: &HashSet<u64>) -> bool {
        match BitmapEntry(raw).chunk() {
            Ok(None) => true,
            Ok(Some(n)) => n < end && !tables.contains(&n),
            Err(_) => false,
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(path = %self.path.display(), "flush on close failed: {e}");
        }
    }
}

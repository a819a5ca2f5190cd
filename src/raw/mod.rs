//! Raw disks: the container's bytes are the disk's, byte for byte. This is
//! what `hdiutil convert -format UDRW` and Disk Utility write as a
//! read-write `.dmg` (no `koly` trailer), and what a decrypted container
//! can hold.
//!
//! Invariants:
//! - the disk's size is the container's length; a resize sets the length;
//! - a discard (or zeroing) punches the range in the container: a plain
//!   file gets a hole, an encrypted container encrypted zeros (its store
//!   decides, see [`Storage::punch`]); either way the range reads as zeros;
//! - SEEK_DATA/SEEK_HOLE and `extents` are the container's holes;
//! - a flush is the container's sync, which covers every completed write,
//!   punch and length change;
//! - once its file is handed out for passthrough, writes may reach the file
//!   without passing here (and may grow it): the size is then the file's
//!   length, read at each use, and every flush syncs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::asif::engine::{Extent, OpenOptions};
use crate::atomic_file::{check_replaceable, temp_path, write_new, Place, NEW_TAG};
use crate::disk::{Disk, Format, HostPiece, Translation};
use crate::error::{Error, Result};
use crate::host::file::{open_container, Storage};
use crate::stats::IoCounters;

/// A disk is whole sectors, as hdiutil writes it.
pub const SECTOR: u64 = 512;

/// Largest raw disk `create` and `resize` make (the largest file ext4
/// holds with 4 KiB blocks is 16 TiB; larger hosts are left to the user).
pub const MAX_SIZE: u64 = 16 << 40;

/// An open raw disk. Every method takes `&self` and may run on many
/// threads at once; a resize waits for requests in flight.
pub struct RawDisk {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    format: Format,
    /// Taken shared by every request (held by a translated one until its
    /// I/O completes), exclusive by a resize.
    size: Arc<RwLock<u64>>,
    writable: bool,
    dirty: AtomicBool,
    counters: IoCounters,
    /// The container, when the disk is a plain file (not decrypted).
    file: Option<Arc<File>>,
    /// Set once `file` is handed out: the kernel may write it directly.
    bypassed: AtomicBool,
}

impl RawDisk {
    /// Opens the raw disk at `path` (a `.dmg` without a trailer):
    /// read-only unless `opts.writable`, locked as `opts.lock` says.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<RawDisk> {
        let path = path.as_ref();
        // The store keeps the locked descriptor for the disk's lifetime.
        let storage = open_container(path, opts)?;
        let file = storage
            .file()
            .try_clone()
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        let mut disk = Self::from_storage(path, Format::Udrw, Arc::new(storage), opts.writable)?;
        disk.file = Some(Arc::new(file));
        Ok(disk)
    }

    /// A raw disk on any [`Storage`] (a decrypted container, tests).
    pub fn from_storage(
        path: &Path,
        format: Format,
        storage: Arc<dyn Storage>,
        writable: bool,
    ) -> Result<RawDisk> {
        let size = storage
            .len()
            .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
        Ok(RawDisk {
            path: path.to_path_buf(),
            storage,
            format,
            size: Arc::new(RwLock::new(size)),
            writable,
            dirty: AtomicBool::new(false),
            counters: IoCounters::default(),
            file: None,
            bypassed: AtomicBool::new(false),
        })
    }

    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.path.display()), e)
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }

    /// The size under the resize lock: the file's length once the kernel
    /// may have written it directly.
    fn current(&self, cached: u64) -> Result<u64> {
        if !self.bypassed.load(Ordering::Acquire) {
            return Ok(cached);
        }
        self.storage.len().map_err(|e| self.io("stat", e))
    }

    fn in_range(size: u64, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Punches `offset..offset+len`, clamped to the disk.
    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size.read();
        let end = offset.saturating_add(len).min(self.current(*size)?);
        if offset >= end {
            return Ok(());
        }
        self.storage
            .punch(offset, end - offset)
            .map_err(|e| self.io("punching", e))?;
        self.dirty.store(true, Ordering::Release);
        self.counters.discard(end - offset);
        Ok(())
    }
}

impl Disk for RawDisk {
    fn format(&self) -> Format {
        self.format
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        let cached = *self.size.read();
        self.current(cached).unwrap_or(cached)
    }
    fn max_size(&self) -> u64 {
        MAX_SIZE.max(self.size())
    }
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size.read();
        Self::in_range(self.current(*size)?, offset, buf.len() as u64)?;
        self.storage
            .read_data(buf, offset)
            .map_err(|e| self.io("reading", e))?;
        self.counters.read(buf.len() as u64);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size.read();
        Self::in_range(self.current(*size)?, offset, buf.len() as u64)?;
        self.storage
            .write_data(buf, offset)
            .map_err(|e| self.io("writing", e))?;
        self.dirty.store(true, Ordering::Release);
        self.counters.write(buf.len() as u64);
        Ok(())
    }

    /// One piece, at the same offset in the file, held against a resize.
    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        let Some(fds) = self.storage.async_fds() else {
            return Ok(None);
        };
        if write && !self.writable {
            return Ok(None);
        }
        let size = self.size.read_arc();
        Self::in_range(self.current(*size)?, offset, len)?;
        let pieces = match len {
            0 => Vec::new(),
            _ => vec![HostPiece::on(fds, 0, offset, len as usize)],
        };
        Ok(Some(Translation {
            pieces,
            hold: Box::new(size),
        }))
    }
    fn may_translate(&self) -> bool {
        self.storage.async_fds().is_some()
    }
    fn io_done(&self, write: bool, len: u64, ok: bool) {
        if write {
            self.dirty.store(true, Ordering::Release);
        }
        self.counters.done(write, len, ok);
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.punch(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        Self::in_range(self.size(), offset, len)?;
        self.punch(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size.read();
        Self::in_range(self.current(*size)?, offset, len)?;
        self.storage
            .reserve(offset, len)
            .map_err(|e| self.io("allocating", e))?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        if dirty || self.bypassed.load(Ordering::Acquire) {
            if let Err(e) = self.storage.sync() {
                self.dirty.store(true, Ordering::Release);
                return Err(self.io("syncing", e));
            }
        }
        self.counters.flush();
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size % SECTOR != 0 {
            return Err(Error::Invalid(format!(
                "size {new_size} is not a multiple of {SECTOR} bytes"
            )));
        }
        if new_size > self.max_size() {
            return Err(Error::Invalid(format!(
                "size {new_size} is larger than the {} bytes a raw disk may have",
                self.max_size()
            )));
        }
        let mut size = self.size.write();
        self.storage
            .set_len(new_size)
            .map_err(|e| self.io("resizing", e))?;
        *size = new_size;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        let size = self.size();
        if offset >= size {
            return Ok(None);
        }
        let at = self
            .storage
            .next_data(offset)
            .map_err(|e| self.io("seeking data", e))?;
        Ok(at.filter(|&p| p < size))
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
        let at = self
            .storage
            .next_hole(offset)
            .map_err(|e| self.io("seeking a hole", e))?;
        Ok(at.clamp(offset, size))
    }

    fn extents(&self) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        crate::disk::host_extents(&*self.storage, 0, self.size(), 0, &mut out)
            .map_err(|e| self.io("looking for data", e))?;
        Ok(out)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        self.storage
            .allocated_bytes()
            .map_err(|e| self.io("stat", e))
    }

    fn stats(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.counters.snapshot()).unwrap_or_default();
        v["passthrough"] = self.bypassed.load(Ordering::Relaxed).into();
        v
    }

    fn passthrough_file(&self) -> Option<Arc<File>> {
        let file = self.file.clone()?;
        self.bypassed.store(true, Ordering::Release);
        Some(file)
    }
}

/// Refuses a size a new raw disk cannot have: not whole sectors, or past
/// [`MAX_SIZE`].
pub fn check_new_size(size: u64) -> Result<()> {
    if size == 0 || size % SECTOR != 0 {
        return Err(Error::Invalid(format!(
            "size {size} is not a positive number of whole {SECTOR}-byte sectors"
        )));
    }
    if size > MAX_SIZE {
        return Err(Error::Invalid(format!(
            "size {size} is larger than the {MAX_SIZE} bytes a raw disk may have"
        )));
    }
    Ok(())
}

/// Creates an empty raw disk of `size` bytes at `path` as hdiutil does
/// now: a sparse file, no trailer. `force` replaces an existing regular
/// file that no one holds open.
pub fn create(path: &Path, size: u64, force: bool) -> Result<()> {
    check_new_size(size)?;
    check_replaceable(path, force)?;
    let _ = std::fs::remove_file(temp_path(path, NEW_TAG));
    let place = if force { Place::Rename } else { Place::Link };
    write_new(path, NEW_TAG, place, |file| file.set_len(size))
        .map_err(|f| Error::io(format!("{}: {}", path.display(), f.step), f.error))
}

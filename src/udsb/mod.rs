//! Sparse bundles (UDSB, `.sparsebundle`): a directory holding `Info.plist`,
//! its copy `Info.bckup`, an empty `token` and `bands/`, where the file
//! named `n` in lowercase hex holds the disk's bytes
//! `[n * band-size, (n + 1) * band-size)`.
//!
//! Invariants while a bundle is open (the flock on `token` keeps other
//! asiffs processes from writing it):
//! - `present` is exactly the set of band files in `bands/`: regular files
//!   no longer than the band size, all below the disk's end;
//! - an absent band, and the part of one past its file's end, read as zeros;
//! - every band file written since the last flush is in `dirty` (or being
//!   synced early under `syncing`), and `dir_dirty` is set when `bands/`
//!   gained or lost an entry since then;
//! - at most `OPEN_BANDS + DIRTY_LIMIT` band files are open.
//!
//! Crash ordering: a shrink removes (durably) the bands past the new end
//! before the plist says the smaller size, and a grow cuts the last band
//! back to the old end before the plist says the larger one; the plist and
//! its copy are each replaced by rename. So a crash at any instant leaves a
//! bundle that opens, with every band inside the size it names.

pub mod info;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use rustix::fs::{AtFlags, FallocateFlags, Mode, OFlags, RenameFlags, SeekFrom, CWD};
use rustix::io::Errno;

use crate::disk::{Disk, Format};
use crate::engine::{lock_file, Extent, LockMode, OpenOptions};
use crate::error::{Error, Result};
use crate::stats::{Counter, IoCounters};
pub use info::{band_name, parse_band_name, Info, InfoError, DEFAULT_BAND_SIZE};
use info::{MAX_INFO_LEN, SECTOR};

pub const INFO: &str = "Info.plist";
pub const BACKUP: &str = "Info.bckup";
pub const TOKEN: &str = "token";
pub const BANDS: &str = "bands";
/// Ends the name of a plist being replaced; only a crash leaves one.
pub const TEMP_SUFFIX: &str = ".asiffs-tmp";
/// What an encrypted bundle's `token` starts with.
const ENCRYPTED_MAGIC: &[u8] = b"encrcdsa";
/// Band files kept open for reuse.
const OPEN_BANDS: usize = 64;
/// Written band files that may wait for a flush before a writer syncs them
/// early, which bounds the descriptors kept open for the next flush.
const DIRTY_LIMIT: usize = 256;

/// A sparse bundle opened as a virtual disk.
pub struct SparseBundle {
    path: PathBuf,
    writable: bool,
    band_size: u64,
    size: AtomicU64,
    info: Mutex<Info>,
    /// Taken shared by every request and alone by a resize.
    exclusive: RwLock<()>,
    bands: Mutex<Bands>,
    /// Held while files taken from `dirty` are synced, so that a flush
    /// cannot return while an early sync of a file it owes is under way.
    syncing: Mutex<()>,
    root: File,
    bands_dir: File,
    /// Holds the lock for as long as the bundle is open.
    _token: File,
    counters: Counters,
}

struct Bands {
    present: BTreeSet<u64>,
    open: LruCache<u64, Arc<File>>,
    /// Files to sync at the next flush, by address (a band removed and made
    /// again is another file); `true` when a sync must cover metadata too.
    dirty: HashMap<usize, (Arc<File>, bool)>,
    dir_dirty: bool,
}

#[derive(Default)]
struct Counters {
    io: IoCounters,
    bands_created: Counter,
    bands_removed: Counter,
}

/// What opening found before looking at the bands.
struct Parts {
    root: File,
    token: File,
    info: Info,
}

impl SparseBundle {
    /// Opens the bundle at `path`. Refuses, with one line naming the
    /// problem and without writing anything, a bundle that is encrypted,
    /// of another layout version, or damaged.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<SparseBundle> {
        let path = path.as_ref();
        let parts = open_parts(path, opts.lock)?;
        let bands_dir = open_bands_dir(&parts.root, path)?;
        let (present, mut problems) = scan_bands(path, &bands_dir, &parts.info)?;
        if !problems.is_empty() {
            return Err(problems.swap_remove(0));
        }
        if opts.writable {
            remove_leftovers(path, &parts.root)?;
        }
        Ok(SparseBundle {
            path: path.to_path_buf(),
            writable: opts.writable,
            band_size: parts.info.band_size,
            size: AtomicU64::new(parts.info.size),
            info: Mutex::new(parts.info),
            exclusive: RwLock::new(()),
            bands: Mutex::new(Bands {
                present,
                open: LruCache::new(NonZeroUsize::new(OPEN_BANDS).expect("nonzero")),
                dirty: HashMap::new(),
                dir_dirty: false,
            }),
            syncing: Mutex::new(()),
            root: parts.root,
            bands_dir,
            _token: parts.token,
            counters: Counters::default(),
        })
    }

    /// Creates an empty bundle of `size` bytes (rounded up to a whole
    /// sector) and opens it for writing. It is built in a temporary
    /// directory beside `path` and renamed into place, so `path` never
    /// holds half a bundle.
    pub fn create(path: impl AsRef<Path>, size: u64, band_size: u64) -> Result<SparseBundle> {
        let path = path.as_ref();
        let size = size.checked_next_multiple_of(SECTOR).unwrap_or(u64::MAX);
        let info = Info::new(size, band_size).map_err(|e| Error::Invalid(e.to_string()))?;
        let exists = || Error::Invalid(format!("{}: already exists", path.display()));
        if path.symlink_metadata().is_ok() {
            return Err(exists());
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a bundle name", path.display())))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = parent.join(format!(
            ".{}{TEMP_SUFFIX}-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        // Only a run of ours with this pid, killed, can have left one.
        let _ = std::fs::remove_dir_all(&tmp);
        let ctx = |e: std::io::Error| Error::io(path.display().to_string(), e);
        let built = build(&tmp, &info)
            .map_err(|e| match e {
                Error::Io { source, .. } => ctx(source),
                e => e,
            })
            .and_then(|()| {
                match rustix::fs::renameat_with(CWD, &tmp, CWD, path, RenameFlags::NOREPLACE) {
                    Ok(()) => Ok(()),
                    Err(Errno::EXIST | Errno::NOTEMPTY) => Err(exists()),
                    // A filesystem without RENAME_NOREPLACE: checked above.
                    Err(Errno::INVAL) => std::fs::rename(&tmp, path).map_err(ctx),
                    Err(e) => Err(ctx(e.into())),
                }
            })
            .and_then(|()| open_dir(parent)?.sync_all().map_err(ctx));
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        SparseBundle::open(path, &OpenOptions::writable())
    }

    pub fn band_size(&self) -> u64 {
        self.band_size
    }

    /// The plist as it is now (the size follows resizes).
    pub fn info(&self) -> Info {
        self.info.lock().clone()
    }

    /// Flushes and closes.
    pub fn close(self) -> Result<()> {
        Disk::flush(&self)
    }

    fn band_path(&self, n: u64) -> String {
        format!("{}/{BANDS}/{}", self.path.display(), band_name(n))
    }

    fn band_err(&self, n: u64, what: &str, e: impl Into<std::io::Error>) -> Error {
        Error::io(format!("{}: {what}", self.band_path(n)), e.into())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }

    /// Splits `offset..offset + len` at band boundaries into
    /// (band, offset in band, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let bs = self.band_size;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let (n, within) = (at / bs, at % bs);
                let len = (bs - within).min(end - at);
                at += len;
                (n, within, len)
            })
        })
    }

    /// Band `n`'s file, made if `create` and absent; `None` if absent.
    fn band(&self, n: u64, create: bool) -> Result<Option<Arc<File>>> {
        let mut st = self.bands.lock();
        if let Some(f) = st.open.get(&n) {
            return Ok(Some(f.clone()));
        }
        let known = st.present.contains(&n);
        if !known && !create {
            return Ok(None);
        }
        let mut flags = OFlags::NOFOLLOW | OFlags::CLOEXEC;
        flags |= if self.writable {
            OFlags::RDWR
        } else {
            OFlags::RDONLY
        };
        if create {
            flags |= OFlags::CREATE;
        }
        let fd = match rustix::fs::openat(
            &self.bands_dir,
            band_name(n),
            flags,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => fd,
            // Removed behind our back (an unlocked reader): reads as zeros.
            Err(Errno::NOENT) if !create => {
                st.present.remove(&n);
                return Ok(None);
            }
            Err(e) => return Err(self.band_err(n, "opening", e)),
        };
        if !known {
            st.present.insert(n);
            st.dir_dirty = true;
            self.counters.bands_created.bump(1);
        }
        let f = Arc::new(File::from(fd));
        st.open.put(n, f.clone());
        Ok(Some(f))
    }

    fn band_for_write(&self, n: u64) -> Result<Arc<File>> {
        self.band(n, true)?
            .ok_or_else(|| Error::Corrupt(format!("{}: vanished", self.band_path(n))))
    }

    /// Records that `f` changed; syncs early when too many files wait.
    fn mark_dirty(&self, f: &Arc<File>, metadata: bool) -> Result<()> {
        let spill = {
            let mut st = self.bands.lock();
            let e = st
                .dirty
                .entry(Arc::as_ptr(f) as usize)
                .or_insert_with(|| (f.clone(), false));
            e.1 |= metadata;
            st.dirty.len() > DIRTY_LIMIT
        };
        if !spill {
            return Ok(());
        }
        let _syncing = self.syncing.lock();
        let files = std::mem::take(&mut self.bands.lock().dirty);
        self.sync_files(files)
    }

    /// Syncs the files; on failure puts back the ones not yet synced.
    fn sync_files(&self, files: HashMap<usize, (Arc<File>, bool)>) -> Result<()> {
        let mut left = files.into_iter();
        while let Some((key, (f, metadata))) = left.next() {
            let r = if metadata {
                f.sync_all()
            } else {
                f.sync_data()
            };
            if let Err(e) = r {
                let mut st = self.bands.lock();
                st.dirty.insert(key, (f, metadata));
                st.dirty.extend(left);
                return Err(Error::io(
                    format!("{}: syncing a band", self.path.display()),
                    e,
                ));
            }
        }
        Ok(())
    }

    fn flush_inner(&self) -> Result<()> {
        let _syncing = self.syncing.lock();
        let (files, dir) = {
            let mut st = self.bands.lock();
            (
                std::mem::take(&mut st.dirty),
                std::mem::take(&mut st.dir_dirty),
            )
        };
        if let Err(e) = self.sync_files(files) {
            self.bands.lock().dir_dirty |= dir;
            return Err(e);
        }
        if dir {
            if let Err(e) = self.bands_dir.sync_all() {
                self.bands.lock().dir_dirty = true;
                return Err(Error::io(
                    format!("{}/{BANDS}: syncing", self.path.display()),
                    e,
                ));
            }
        }
        self.counters.io.flush();
        Ok(())
    }

    fn remove_band(&self, n: u64) -> Result<()> {
        let mut st = self.bands.lock();
        if !st.present.contains(&n) {
            return Ok(());
        }
        st.open.pop(&n);
        match rustix::fs::unlinkat(&self.bands_dir, band_name(n), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(self.band_err(n, "removing", e)),
        }
        st.present.remove(&n);
        st.dir_dirty = true;
        self.counters.bands_removed.bump(1);
        Ok(())
    }

    /// Zeroes part of band `n`, freeing whole host blocks inside it. The
    /// file length stays: cutting it could cut a concurrent write beyond.
    fn punch(&self, n: u64, within: u64, len: u64) -> Result<()> {
        let Some(f) = self.band(n, false)? else {
            return Ok(());
        };
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&*f, mode, within, len) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP) => {
                let flen = f.metadata().map_err(|e| self.band_err(n, "stat", e))?.len();
                let zeros = vec![0u8; 64 << 10];
                let mut at = within;
                let stop = (within + len).min(flen);
                while at < stop {
                    let k = (stop - at).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..k], at)
                        .map_err(|e| self.band_err(n, "zeroing", e))?;
                    at += k as u64;
                }
            }
            Err(e) => return Err(self.band_err(n, "punching a hole", e)),
        }
        self.mark_dirty(&f, true)
    }

    /// Discards `offset..end` of a disk of `size` bytes.
    fn discard_range(&self, offset: u64, end: u64, size: u64) -> Result<()> {
        for (n, within, len) in self.pieces(offset, end - offset) {
            let band_len = self.band_size.min(size - n * self.band_size);
            if within == 0 && len >= band_len {
                self.remove_band(n)?;
            } else {
                self.punch(n, within, len)?;
            }
        }
        Ok(())
    }

    /// Cuts the band that straddles `end` back to it, durably.
    fn cut_band_at(&self, end: u64) -> Result<()> {
        let within = end % self.band_size;
        let n = end / self.band_size;
        if within == 0 {
            return Ok(());
        }
        let Some(f) = self.band(n, false)? else {
            return Ok(());
        };
        let len = f.metadata().map_err(|e| self.band_err(n, "stat", e))?.len();
        if len > within {
            f.set_len(within)
                .and_then(|()| f.sync_all())
                .map_err(|e| self.band_err(n, "truncating", e))?;
        }
        Ok(())
    }

    /// Replaces `Info.plist`, then `Info.bckup`, each by rename, then makes
    /// the renames durable.
    fn write_info(&self, info: &Info) -> Result<()> {
        let bytes = info.encode();
        for name in [INFO, BACKUP] {
            replace_file(&self.root, &self.path, name, &bytes)?;
        }
        self.root
            .sync_all()
            .map_err(|e| Error::io(format!("{}: syncing", self.path.display()), e))
    }

    /// `SEEK_DATA`/`SEEK_HOLE` inside band `n`'s file; `None` when the
    /// kernel says nothing of the kind lies at or past the offset.
    fn seek_in(&self, n: u64, f: &File, whence: SeekFrom) -> Result<Option<u64>> {
        match rustix::fs::seek(f, whence) {
            Ok(p) => Ok(Some(p)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(self.band_err(n, "seeking", e)),
        }
    }

    fn next_present(&self, from: u64) -> Option<u64> {
        self.bands.lock().present.range(from..).next().copied()
    }
}

impl Drop for SparseBundle {
    fn drop(&mut self) {
        if self.writable {
            let _ = self.flush_inner();
        }
    }
}

impl Disk for SparseBundle {
    fn format(&self) -> Format {
        Format::Udsb
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _shared = self.exclusive.read();
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0;
        for (n, within, len) in self.pieces(offset, buf.len() as u64) {
            let piece = &mut buf[done..done + len as usize];
            done += len as usize;
            let Some(f) = self.band(n, false)? else {
                piece.fill(0);
                continue;
            };
            // A short band file reads as zeros past its end.
            let mut got = 0;
            while got < piece.len() {
                match f.read_at(&mut piece[got..], within + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.band_err(n, "reading", e)),
                }
            }
            piece[got..].fill(0);
        }
        self.counters.io.read(buf.len() as u64);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let _shared = self.exclusive.read();
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0;
        for (n, within, len) in self.pieces(offset, buf.len() as u64) {
            let piece = &buf[done..done + len as usize];
            done += len as usize;
            let f = self.band_for_write(n)?;
            f.write_all_at(piece, within)
                .map_err(|e| self.band_err(n, "writing", e))?;
            // Only now: a flush that took the dirty set before the write
            // landed must leave the file for the next one.
            self.mark_dirty(&f, false)?;
        }
        self.counters.io.write(buf.len() as u64);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let _shared = self.exclusive.read();
        let size = self.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        self.discard_range(offset, end, size)?;
        self.counters.io.discard(end - offset);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.discard(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let _shared = self.exclusive.read();
        self.check_range(offset, len)?;
        for (n, within, len) in self.pieces(offset, len) {
            let f = self.band_for_write(n)?;
            match rustix::fs::fallocate(&*f, FallocateFlags::empty(), within, len) {
                Ok(()) => self.mark_dirty(&f, true)?,
                Err(Errno::OPNOTSUPP) => {}
                Err(e) => return Err(self.band_err(n, "reserving space", e)),
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush_inner()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size % SECTOR != 0 {
            return Err(Error::Invalid(format!(
                "size {new_size} is not a multiple of {SECTOR} bytes"
            )));
        }
        let _only = self.exclusive.write();
        let info = self
            .info
            .lock()
            .with_size(new_size)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let old = self.size();
        if new_size < old {
            let keep = new_size.div_ceil(self.band_size);
            let gone: Vec<u64> = self.bands.lock().present.range(keep..).copied().collect();
            for n in gone {
                self.remove_band(n)?;
            }
            self.cut_band_at(new_size)?;
        } else if new_size > old {
            // What lies past the old end must read as zeros once inside.
            self.cut_band_at(old)?;
        }
        // Earlier writes, and the removals above, before the plist.
        self.flush_inner()?;
        self.write_info(&info)?;
        *self.info.lock() = info;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        let _shared = self.exclusive.read();
        let (size, bs) = (self.size(), self.band_size);
        let mut from = offset / bs;
        while let Some(n) = self.next_present(from) {
            let start = n * bs;
            if start >= size {
                break;
            }
            let within = offset.saturating_sub(start);
            let limit = bs.min(size - start);
            if let Some(f) = self.band(n, false)? {
                if let Some(p) = self.seek_in(n, &f, SeekFrom::Data(within))? {
                    if p < limit {
                        return Ok(Some(start + p));
                    }
                }
            }
            from = n + 1;
        }
        Ok(None)
    }

    fn seek_hole(&self, offset: u64) -> Result<u64> {
        let _shared = self.exclusive.read();
        let (size, bs) = (self.size(), self.band_size);
        if offset >= size {
            return Err(Error::OutOfRange {
                offset,
                len: 0,
                size,
            });
        }
        let mut n = offset / bs;
        loop {
            let start = n * bs;
            if start >= size {
                return Ok(size);
            }
            let at = offset.max(start);
            let Some(f) = self.band(n, false)? else {
                return Ok(at);
            };
            let limit = bs.min(size - start);
            match self.seek_in(n, &f, SeekFrom::Hole(at - start))? {
                Some(p) if p < limit => return Ok(start + p),
                Some(_) => n += 1,
                // Past the file's end: zeros.
                None => return Ok(at),
            }
        }
    }

    fn extents(&self) -> Result<Vec<Extent>> {
        let _shared = self.exclusive.read();
        let (size, bs) = (self.size(), self.band_size);
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |start: u64, end: u64, data: bool| {
            if start >= end {
                return;
            }
            match out.last_mut() {
                Some(l) if l.data == data && l.start + l.length == start => l.length += end - start,
                _ => out.push(Extent {
                    start,
                    length: end - start,
                    data,
                    offset: None,
                }),
            }
        };
        let mut at = 0;
        let mut from = 0;
        while let Some(n) = self.next_present(from) {
            from = n + 1;
            let start = n * bs;
            if start >= size {
                break;
            }
            let Some(f) = self.band(n, false)? else {
                continue;
            };
            let limit = bs.min(size - start);
            let mut w = 0;
            while w < limit {
                let Some(d) = self.seek_in(n, &f, SeekFrom::Data(w))? else {
                    break;
                };
                if d >= limit {
                    break;
                }
                let h = self
                    .seek_in(n, &f, SeekFrom::Hole(d))?
                    .unwrap_or(limit)
                    .min(limit);
                push(at, start + d, false);
                push(start + d, start + h, true);
                at = start + h;
                w = h;
            }
        }
        push(at, size, false);
        Ok(out)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let _shared = self.exclusive.read();
        let blocks = |dir: &File, name: &str| -> Result<u64> {
            match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Ok(st.st_blocks as u64 * 512),
                Err(Errno::NOENT) => Ok(0),
                Err(e) => Err(Error::io(
                    format!("{}/{name}: stat", self.path.display()),
                    e.into(),
                )),
            }
        };
        let mut total = 0;
        for name in [INFO, BACKUP, TOKEN] {
            total += blocks(&self.root, name)?;
        }
        let mut from = 0;
        while let Some(n) = self.next_present(from) {
            from = n + 1;
            total += blocks(&self.bands_dir, &band_name(n))?;
        }
        Ok(total)
    }

    fn stats(&self) -> serde_json::Value {
        let c = &self.counters;
        let st = self.bands.lock();
        let mut v = serde_json::to_value(c.io.snapshot()).unwrap_or_default();
        v["bands_created"] = c.bands_created.get().into();
        v["bands_removed"] = c.bands_removed.get().into();
        v["bands"] = st.present.len().into();
        v["open_bands"] = st.open.len().into();
        v
    }
}

fn open_dir(path: &Path) -> Result<File> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOENT => Error::Corrupt(format!("{}: missing", path.display())),
        Errno::NOTDIR => Error::Invalid(format!("{}: not a directory", path.display())),
        e => Error::io(path.display().to_string(), e.into()),
    })?;
    Ok(File::from(fd))
}

/// A small file of the bundle, no larger than `limit`, not followed if a
/// symlink.
fn read_small(root: &File, bundle: &Path, name: &str, limit: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let shown = format!("{}/{name}", bundle.display());
    let fd = rustix::fs::openat(
        root,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOENT => Error::Corrupt(format!("{shown}: missing")),
        Errno::LOOP => Error::Corrupt(format!("{shown}: is a symbolic link")),
        e => Error::io(shown.clone(), e.into()),
    })?;
    let f = File::from(fd);
    let md = f.metadata().map_err(|e| Error::io(shown.clone(), e))?;
    if !md.is_file() {
        return Err(Error::Corrupt(format!("{shown}: not a regular file")));
    }
    let mut b = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut b)
        .map_err(|e| Error::io(shown, e))?;
    Ok(b)
}

fn decode_info(bundle: &Path, name: &str, bytes: &[u8]) -> Result<Info> {
    Info::decode(bytes).map_err(|e| {
        let msg = format!("{}/{name}: {e}", bundle.display());
        match e {
            InfoError::Corrupt(_) => Error::Corrupt(msg),
            InfoError::Unsupported(_) => Error::Invalid(msg),
        }
    })
}

/// Opens the bundle directory and `token`, takes the lock, then reads the
/// plist and refuses encrypted bundles.
fn open_parts(path: &Path, lock: LockMode) -> Result<Parts> {
    let root = open_dir(path)?;
    let token_path = path.join(TOKEN);
    let fd = rustix::fs::openat(
        &root,
        TOKEN,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOENT => Error::Corrupt(format!("{}: missing", token_path.display())),
        Errno::LOOP => Error::Corrupt(format!("{}: is a symbolic link", token_path.display())),
        e => Error::io(token_path.display().to_string(), e.into()),
    })?;
    let token = File::from(fd);
    lock_file(&token, lock, path)?;
    let bytes = read_small(&root, path, INFO, MAX_INFO_LEN)?;
    let info = decode_info(path, INFO, &bytes)?;
    let head = read_small(&root, path, TOKEN, 4096)?;
    if head.starts_with(ENCRYPTED_MAGIC) {
        return Err(Error::Invalid(format!(
            "{}: encrypted (token holds an encrcdsa header); encrypted bundles are not supported",
            path.display()
        )));
    }
    if !head.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: token is not empty; only encrypted bundles keep data there, and those are not supported",
            path.display()
        )));
    }
    Ok(Parts { root, token, info })
}

/// `bands/`, not followed if a symlink (writes must stay in the bundle).
fn open_bands_dir(root: &File, bundle: &Path) -> Result<File> {
    let shown = format!("{}/{BANDS}", bundle.display());
    let fd = rustix::fs::openat(
        root,
        BANDS,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOENT => Error::Corrupt(format!("{shown}: missing")),
        Errno::NOTDIR | Errno::LOOP => Error::Corrupt(format!("{shown}: not a directory")),
        e => Error::io(shown.clone(), e.into()),
    })?;
    Ok(File::from(fd))
}

/// The bands present, and every band file that breaks the layout (each
/// one line, in name order).
fn scan_bands(path: &Path, dir: &File, info: &Info) -> Result<(BTreeSet<u64>, Vec<Error>)> {
    let shown_dir = format!("{}/{BANDS}", path.display());
    let list_err = |e: Errno| Error::io(shown_dir.clone(), e.into());
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir).map_err(list_err)? {
        let name = e.map_err(list_err)?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort();
    let mut present = BTreeSet::new();
    let mut problems = Vec::new();
    let count = info.band_count();
    for name in names {
        let shown = format!("{shown_dir}/{}", String::from_utf8_lossy(&name));
        let text = std::str::from_utf8(&name).unwrap_or("");
        // Finder's droppings (.DS_Store, ._0) are not bands.
        if name.starts_with(b".") {
            continue;
        }
        let Some(n) = parse_band_name(text) else {
            problems.push(Error::Corrupt(format!(
                "{shown}: not a band name (lowercase hex without leading zeros)"
            )));
            continue;
        };
        if n >= count {
            problems.push(Error::Corrupt(format!(
                "{shown}: band {n} lies past the end of the disk ({} bytes, {count} bands)",
                info.size
            )));
            continue;
        }
        let st = rustix::fs::statat(dir, text, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io(shown.clone(), e.into()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            problems.push(Error::Corrupt(format!("{shown}: not a regular file")));
            continue;
        }
        let len = st.st_size as u64;
        if len > info.band_size {
            problems.push(Error::Corrupt(format!(
                "{shown}: {len} bytes, longer than the {}-byte band size",
                info.band_size
            )));
            continue;
        }
        present.insert(n);
    }
    Ok((present, problems))
}

/// Removes plists a crash left half-replaced (only a writer, holding the
/// lock, may).
fn remove_leftovers(path: &Path, root: &File) -> Result<()> {
    for name in [INFO, BACKUP] {
        let tmp = format!("{name}{TEMP_SUFFIX}");
        match rustix::fs::unlinkat(root, tmp.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("{}/{tmp}: removing", path.display()),
                    e.into(),
                ))
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `name` in `root` by temp file, sync and rename.
fn replace_file(root: &File, bundle: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = format!("{name}{TEMP_SUFFIX}");
    let ctx = |e: std::io::Error| Error::io(format!("{}/{name}: replacing", bundle.display()), e);
    let fd = rustix::fs::openat(
        root,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| ctx(e.into()))?;
    let f = File::from(fd);
    f.write_all_at(bytes, 0)
        .and_then(|()| f.sync_all())
        .map_err(ctx)?;
    rustix::fs::renameat(root, tmp.as_str(), root, name).map_err(|e| ctx(e.into()))
}

/// Lays out a fresh bundle in `dir` (which must not exist), synced.
fn build(dir: &Path, info: &Info) -> Result<()> {
    let ctx = |e: std::io::Error| Error::io(dir.display().to_string(), e);
    std::fs::create_dir(dir).map_err(ctx)?;
    let bytes = info.encode();
    for (name, content) in [(INFO, &bytes[..]), (BACKUP, &bytes[..]), (TOKEN, &[][..])] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .map_err(ctx)?;
        f.write_all_at(content, 0)
            .and_then(|()| f.sync_all())
            .map_err(ctx)?;
    }
    std::fs::create_dir(dir.join(BANDS)).map_err(ctx)?;
    open_dir(&dir.join(BANDS))?.sync_all().map_err(ctx)?;
    open_dir(dir)?.sync_all().map_err(ctx)
}

/// Whether `path` (a directory) is a sparse bundle: named `.sparsebundle`,
/// or holding a plist of that bundle type.
pub fn is_bundle(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("sparsebundle"))
    {
        return true;
    }
    let Ok(root) = open_dir(path) else {
        return false;
    };
    let Ok(bytes) = read_small(&root, path, INFO, MAX_INFO_LEN) else {
        return false;
    };
    plist::Value::from_reader(std::io::Cursor::new(bytes))
        .ok()
        .and_then(|v| {
            v.into_dictionary()?
                .get(info::KEY_BUNDLE_TYPE)?
                .as_string()
                .map(|s| s == info::BUNDLE_TYPE)
        })
        .unwrap_or(false)
}

/// Every problem of the bundle at `path`, one line each; empty when it is
/// sound. Takes a shared lock, so it fails with [`Error::Locked`] while a
/// writer has the bundle open.
pub fn check(path: &Path) -> Result<Vec<String>> {
    let parts = match open_parts(path, LockMode::Shared) {
        Ok(p) => p,
        Err(e @ Error::Locked { .. }) => return Err(e),
        Err(e) => return Ok(vec![e.to_string()]),
    };
    let mut lines = Vec::new();
    match read_small(&parts.root, path, BACKUP, MAX_INFO_LEN)
        .and_then(|b| decode_info(path, BACKUP, &b))
    {
        Ok(copy) if copy == parts.info => {}
        Ok(_) => lines.push(format!(
            "{}/{BACKUP}: does not match {INFO}",
            path.display()
        )),
        Err(e) => lines.push(e.to_string()),
    }
    for name in [INFO, BACKUP] {
        let tmp = format!("{name}{TEMP_SUFFIX}");
        if rustix::fs::statat(&parts.root, tmp.as_str(), AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            lines.push(format!(
                "{}/{tmp}: left by an interrupted resize (a writable open removes it)",
                path.display()
            ));
        }
    }
    match open_bands_dir(&parts.root, path).and_then(|d| scan_bands(path, &d, &parts.info)) {
        Ok((_, problems)) => lines.extend(problems.iter().map(|e| e.to_string())),
        Err(e) => lines.push(e.to_string()),
    }
    Ok(lines)
}

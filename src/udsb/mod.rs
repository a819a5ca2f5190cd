//! Sparse bundles (UDSB, `.sparsebundle`): a directory holding `Info.plist`,
//! its copy `Info.bckup`, `token` and `bands/`, where the file named `n` in
//! lowercase hex holds the disk's bytes `[n * band-size, (n + 1) *
//! band-size)`. `token` is empty, or holds the `encrcdsa` header of an
//! encrypted bundle whose band files are ciphertext ([`crypt`]).
//!
//! Invariants while a bundle is open (the flock on `token` keeps other
//! asiffs processes from writing it):
//! - `present` is exactly the set of band files in `bands/`: regular files
//!   no longer than the band size, all below the disk's end;
//! - an absent band, and the part of one past its file's end, read as zeros;
//! - every band file written since the last flush is in `dirty` (or being
//!   synced early under `syncing`), a translated write's from its
//!   `io_done` on (before it is answered), and `dir_dirty` is set when
//!   `bands/` gained or lost an entry since then;
//! - at most `OPEN_BANDS + DIRTY_LIMIT` band files are open, plus those
//!   of translated requests in flight (whose files `io_done` may add to
//!   `dirty` past its limit; translation stops once it is reached);
//! - a band in `busy` (a translated request's host I/O is under way in its
//!   file) is not removed until it leaves it.
//!
//! Translated requests (the ring, [`crate::host::uring`]) of an
//! unencrypted bundle on the host go straight to the band files'
//! descriptors: reads over bands that exist, writes inside a band file's
//! current length. A write that would make or lengthen a band file, and
//! anything on an encrypted bundle, takes the synchronous path. A
//! translated request holds `exclusive` shared (a resize waits for it),
//! keeps its band files open, and registers them in `busy` (a discard that
//! removes one of them waits for it) until its host I/O has ended;
//! [`Disk::io_done`] then puts the files written in `dirty` for the next
//! flush.
//!
//! Crash ordering: a shrink removes (durably) the bands past the new end
//! before the plist says the smaller size, and a grow cuts the last band
//! back to the old end before the plist says the larger one; the plist and
//! its copy are each replaced by rename. So a crash at any instant leaves a
//! bundle that opens, with every band inside the size it names; a crash
//! between the two renames leaves the copy stale, and the next writable
//! open restores it from `Info.plist`. `tests/udsb.rs` replays every crash
//! point of a workload through a recording [`BundleDir`](crate::host::dir::BundleDir).

pub mod crypt;
pub mod info;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::lock_api::ArcRwLockReadGuard;
use parking_lot::{Condvar, Mutex, RawRwLock, RwLock};
use rustix::fs::{Mode, OFlags, RenameFlags, CWD};
use rustix::io::Errno;

use crate::asif::engine::{lock_file, Extent, LockMode, OpenOptions};
use crate::disk::{Disk, Format, HostPiece, Translation};
use crate::error::{Error, Result};
use crate::host::dir::{BandFile, BundleDir, HostDir};
use crate::stats::{Counter, IoCounters};
pub use info::{band_name, parse_band_name, Info, InfoError, DEFAULT_BAND_SIZE};
use info::{MAX_INFO_LEN, SECTOR};

use self::crypt::BandCrypt;
// What an encrypted bundle's `token` starts with.
use crate::host::crypt::header_v2::{HeaderV2, MAGIC as ENCRYPTED_MAGIC};
use crate::host::crypt::Unlocked;

pub const INFO: &str = "Info.plist";
pub const BACKUP: &str = "Info.bckup";
pub const TOKEN: &str = "token";
pub use crate::host::dir::{BANDS, TEMP_SUFFIX};
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
    /// Taken shared by every request (held by a translated one until its
    /// host I/O ends) and alone by a resize.
    exclusive: Arc<RwLock<()>>,
    bands: Arc<Mutex<Bands>>,
    /// Signalled when a band leaves `Bands::busy`.
    idle: Arc<Condvar>,
    /// Held while files taken from `dirty` are synced, so that a flush
    /// cannot return while an early sync of a file it owes is under way.
    syncing: Mutex<()>,
    dir: Arc<dyn BundleDir>,
    /// Holds the lock for as long as the bundle is open (none on a store
    /// that is not the host's).
    _token: Option<File>,
    /// The keys of an encrypted bundle; its band files are wrapped.
    crypt: Option<Arc<BandCrypt>>,
    counters: Counters,
}

type Band = Arc<dyn BandFile>;

struct Bands {
    present: BTreeSet<u64>,
    open: LruCache<u64, Band>,
    /// Files to sync at the next flush, by address (a band removed and made
    /// again is another file); `true` when a sync must cover metadata too.
    dirty: HashMap<usize, (Band, bool)>,
    dir_dirty: bool,
    /// Bands whose files translated requests are reading or writing.
    busy: HashMap<u64, Busy>,
    /// Bands a removal waits for: not translated again meanwhile, so that
    /// the removal is not starved.
    removing: BTreeSet<u64>,
}

/// A band's file while translated requests are under way in it.
struct Busy {
    file: Band,
    /// Requests in flight in it, and how many of them write.
    requests: usize,
    writes: usize,
}

/// What a translated request holds until its host I/O ends: the bundle
/// shared against a resize, and its bands in `Bands::busy` (which also
/// keeps their files, hence their descriptors, open).
struct Held {
    bands: Arc<Mutex<Bands>>,
    idle: Arc<Condvar>,
    busy: Vec<u64>,
    write: bool,
    _shared: ArcRwLockReadGuard<RawRwLock, ()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut st = self.bands.lock();
        let mut freed = false;
        for n in &self.busy {
            let Some(b) = st.busy.get_mut(n) else {
                continue;
            };
            b.requests -= 1;
            if self.write {
                b.writes -= 1;
                // Normally `io_done` did already; not if the ring dropped
                // the request without ending it, and the file may have
                // changed anyway.
                let f = b.file.clone();
                st.dirty.entry(file_key(&f)).or_insert((f, false));
            }
            if st.busy[n].requests == 0 {
                st.busy.remove(n);
                freed = true;
            }
        }
        drop(st);
        if freed {
            self.idle.notify_all();
        }
    }
}

/// The key of a band file in `Bands::dirty`.
fn file_key(f: &Band) -> usize {
    Arc::as_ptr(f) as *const () as usize
}

#[derive(Default)]
struct Counters {
    io: IoCounters,
    bands_created: Counter,
    bands_removed: Counter,
}

/// How an encrypted bundle is unlocked.
enum Unlock<'a> {
    Password(Option<&'a [u8]>),
    /// Keys just made with the header (no second key derivation).
    Keys(Box<Unlocked>),
}

impl SparseBundle {
    /// Opens the bundle at `path`; an encrypted one with
    /// `opts.password`. Refuses, with one line naming the problem and
    /// without writing anything, a bundle of another layout version, a
    /// damaged one, and an encrypted one without its password.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<SparseBundle> {
        let path = path.as_ref();
        let (dir, token) = open_host(path, opts.lock)?;
        let password = opts.password.as_ref().map(|p| p.bytes());
        SparseBundle::from_store_unlocking(
            path,
            Arc::new(dir),
            Some(token),
            opts.writable,
            Unlock::Password(password),
        )
    }

    /// Opens a bundle on any [`BundleDir`]; `token`, when given, holds the
    /// lock the caller took. Tests replaying crashes pass none.
    pub fn from_store(
        path: &Path,
        dir: Arc<dyn BundleDir>,
        token: Option<File>,
        writable: bool,
    ) -> Result<SparseBundle> {
        SparseBundle::from_store_with_password(path, dir, token, writable, None)
    }

    /// [`SparseBundle::from_store`] of a bundle that may be encrypted.
    pub fn from_store_with_password(
        path: &Path,
        dir: Arc<dyn BundleDir>,
        token: Option<File>,
        writable: bool,
        password: Option<&[u8]>,
    ) -> Result<SparseBundle> {
        SparseBundle::from_store_unlocking(path, dir, token, writable, Unlock::Password(password))
    }

    fn from_store_unlocking(
        path: &Path,
        dir: Arc<dyn BundleDir>,
        token: Option<File>,
        writable: bool,
        unlock: Unlock<'_>,
    ) -> Result<SparseBundle> {
        let (info, header) = read_info(&*dir, path)?;
        let (present, mut problems) = scan_bands(path, &*dir, &info)?;
        if !problems.is_empty() {
            return Err(problems.swap_remove(0));
        }
        // Cheap checks first: the key derivation takes a while.
        let crypt = match (header, unlock) {
            (None, _) => None,
            (Some(_), Unlock::Keys(keys)) => Some(*keys),
            (Some(_), Unlock::Password(None)) => {
                return Err(Error::Invalid(format!(
                    "{}: encrypted sparse bundle: needs its password (--password-file FILE or --stdinpass)",
                    path.display()
                )))
            }
            (Some(bytes), Unlock::Password(Some(pw))) => {
                match crate::host::crypt::unlock_header_v2(&bytes, pw) {
                    Ok((_, keys)) => Some(keys),
                    Err(e) if crate::host::crypt::is_wrong_password(&e) => {
                        return Err(Error::Invalid(format!(
                            "{}: {}",
                            path.display(),
                            crate::host::crypt::WRONG_PASSWORD
                        )))
                    }
                    Err(e) => return Err(token_error(path, e)),
                }
            }
        }
        .map(|keys| Arc::new(BandCrypt::new(keys, info.band_size)));
        if writable {
            remove_leftovers(path, &*dir)?;
            restore_backup(path, &*dir, &info)?;
        }
        Ok(SparseBundle {
            path: path.to_path_buf(),
            writable,
            band_size: info.band_size,
            size: AtomicU64::new(info.size),
            info: Mutex::new(info),
            exclusive: Arc::new(RwLock::new(())),
            bands: Arc::new(Mutex::new(Bands {
                present,
                open: LruCache::new(NonZeroUsize::new(OPEN_BANDS).expect("nonzero")),
                dirty: HashMap::new(),
                dir_dirty: false,
                busy: HashMap::new(),
                removing: BTreeSet::new(),
            })),
            idle: Arc::new(Condvar::new()),
            syncing: Mutex::new(()),
            dir,
            _token: token,
            crypt,
            counters: Counters::default(),
        })
    }

    /// Creates an empty bundle of `size` bytes (rounded up to a whole
    /// sector) and opens it for writing. It is built in a temporary
    /// directory beside `path` and renamed into place, so `path` never
    /// holds half a bundle.
    pub fn create(path: impl AsRef<Path>, size: u64, band_size: u64) -> Result<SparseBundle> {
        SparseBundle::create_with(path.as_ref(), size, band_size, None)
    }

    /// Creates an empty encrypted bundle as hdiutil lays one out: `token`
    /// is a fresh `encrcdsa` header (AES-`key_bits`, 4096-byte blocks,
    /// data size 0, [`crate::host::crypt::CREATE_ITERATIONS`]), the plist the
    /// same as a plain bundle's. Opens it for writing.
    pub fn create_encrypted(
        path: impl AsRef<Path>,
        size: u64,
        band_size: u64,
        password: &[u8],
        key_bits: u32,
    ) -> Result<SparseBundle> {
        SparseBundle::create_encrypted_with(
            path,
            size,
            band_size,
            password,
            key_bits,
            crate::host::crypt::CREATE_ITERATIONS,
        )
    }

    /// [`SparseBundle::create_encrypted`] with a chosen PBKDF2 iteration
    /// count (tests use few).
    pub fn create_encrypted_with(
        path: impl AsRef<Path>,
        size: u64,
        band_size: u64,
        password: &[u8],
        key_bits: u32,
        iterations: u32,
    ) -> Result<SparseBundle> {
        let path = path.as_ref();
        let size = size.checked_next_multiple_of(SECTOR).unwrap_or(u64::MAX);
        check_geometry(path, band_size, size, CREATE_BLOCK_SIZE)?;
        let (header, keys) = crate::host::crypt::new_header_v2_with(
            password,
            key_bits,
            CREATE_BLOCK_SIZE,
            0,
            iterations,
        )?;
        SparseBundle::create_with(path, size, band_size, Some((header, keys)))
    }

    fn create_with(
        path: &Path,
        size: u64,
        band_size: u64,
        token: Option<(Vec<u8>, Unlocked)>,
    ) -> Result<SparseBundle> {
        let size = size.checked_next_multiple_of(SECTOR).unwrap_or(u64::MAX);
        let info = Info::new(size, band_size).map_err(|e| Error::Invalid(e.to_string()))?;
        let (header, keys) = match token {
            Some((h, k)) => (h, Some(k)),
            None => (Vec::new(), None),
        };
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
        let built = build(&tmp, &info, &header)
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
        let Some(keys) = keys else {
            return SparseBundle::open(path, &OpenOptions::writable());
        };
        let (dir, token) = open_host(path, OpenOptions::writable().lock)?;
        SparseBundle::from_store_unlocking(
            path,
            Arc::new(dir),
            Some(token),
            true,
            Unlock::Keys(Box::new(keys)),
        )
    }

    /// Whether the bundle is encrypted (and was unlocked).
    pub fn is_encrypted(&self) -> bool {
        self.crypt.is_some()
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
    fn band(&self, n: u64, create: bool) -> Result<Option<Band>> {
        self.band_in(&mut self.bands.lock(), n, create)
    }

    /// [`SparseBundle::band`] with the band state already locked.
    fn band_in(&self, st: &mut Bands, n: u64, create: bool) -> Result<Option<Band>> {
        if let Some(f) = st.open.get(&n) {
            return Ok(Some(f.clone()));
        }
        let known = st.present.contains(&n);
        if !known && !create {
            return Ok(None);
        }
        let f = match self.dir.open_band(&band_name(n), create, self.writable) {
            Ok(Some(f)) => match &self.crypt {
                Some(c) => c.wrap(f, n),
                None => f,
            },
            // Removed behind our back (an unlocked reader): reads as zeros.
            Ok(None) => {
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
        st.open.put(n, f.clone());
        Ok(Some(f))
    }

    fn band_for_write(&self, n: u64) -> Result<Band> {
        self.band(n, true)?
            .ok_or_else(|| Error::Corrupt(format!("{}: vanished", self.band_path(n))))
    }

    /// Records that `f` changed; syncs early when too many files wait.
    fn mark_dirty(&self, f: &Band, metadata: bool) -> Result<()> {
        let spill = {
            let mut st = self.bands.lock();
            let e = st
                .dirty
                .entry(file_key(f))
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
    fn sync_files(&self, files: HashMap<usize, (Band, bool)>) -> Result<()> {
        let mut left = files.into_iter();
        while let Some((key, (f, metadata))) = left.next() {
            if let Err(e) = f.sync(metadata) {
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
            if let Err(e) = self.dir.sync_bands() {
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

    /// Removes band `n`'s file once no translated request is under way in
    /// it: a discard returns only after the host I/O it raced has ended,
    /// so none lands in the unlinked file after the discard returned.
    fn remove_band(&self, n: u64) -> Result<()> {
        let mut st = self.bands.lock();
        if st.busy.contains_key(&n) {
            st.removing.insert(n);
            while st.busy.contains_key(&n) {
                self.idle.wait(&mut st);
            }
            st.removing.remove(&n);
        }
        if !st.present.contains(&n) {
            return Ok(());
        }
        st.open.pop(&n);
        self.dir
            .remove_band(&band_name(n))
            .map_err(|e| self.band_err(n, "removing", e))?;
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
        f.punch(within, len)
            .map_err(|e| self.band_err(n, "punching a hole", e))?;
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
        let len = f.len().map_err(|e| self.band_err(n, "stat", e))?;
        if len > within {
            f.set_len(within)
                .and_then(|()| f.sync(true))
                .map_err(|e| self.band_err(n, "truncating", e))?;
        }
        Ok(())
    }

    /// Replaces `Info.plist`, then `Info.bckup`, each by rename, then makes
    /// the renames durable.
    fn write_info(&self, info: &Info) -> Result<()> {
        let bytes = info.encode();
        for name in [INFO, BACKUP] {
            self.dir
                .replace(name, &bytes)
                .map_err(|e| Error::io(format!("{}/{name}: replacing", self.path.display()), e))?;
        }
        self.dir
            .sync_root()
            .map_err(|e| Error::io(format!("{}: syncing", self.path.display()), e))
    }

    /// `SEEK_DATA` inside band `n`'s file; `None` when only a hole or the
    /// end follows.
    fn data_in(&self, n: u64, f: &Band, at: u64) -> Result<Option<u64>> {
        f.seek_data(at).map_err(|e| self.band_err(n, "seeking", e))
    }

    /// `SEEK_HOLE` inside band `n`'s file; `None` past its end.
    fn hole_in(&self, n: u64, f: &Band, at: u64) -> Result<Option<u64>> {
        f.seek_hole(at).map_err(|e| self.band_err(n, "seeking", e))
    }

    fn next_present(&self, from: u64) -> Option<u64> {
        self.bands.lock().present.range(from..).next().copied()
    }

    /// See [`Disk::translate`]: a piece per band whose file holds the
    /// range. A read leaves missing bands, and what lies past a band
    /// file's end, to the zeroed buffer; a write needs every band file to
    /// exist and already reach the end of its part (the synchronous path
    /// makes and lengthens files, and marks the directory dirty).
    fn translate_bands(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        if self.crypt.is_some() || !self.dir.band_fds() || (write && !self.writable) {
            return Ok(None);
        }
        let shared = self.exclusive.read_arc();
        self.check_range(offset, len)?;
        let mut pieces = Vec::new();
        let mut files = Vec::new();
        let mut at = 0;
        // Under the band lock throughout: a removal either ran before (the
        // band is missing here) or waits for the request to end.
        let mut st = self.bands.lock();
        // `io_done` adds the written files to `dirty` without syncing any
        // early: past the limit, the synchronous path does.
        if write && st.dirty.len() >= DIRTY_LIMIT {
            return Ok(None);
        }
        for (n, within, plen) in self.pieces(offset, len) {
            let piece_at = at;
            at += plen as usize;
            if st.removing.contains(&n) {
                return Ok(None);
            }
            let Some(f) = self.band_in(&mut st, n, false)? else {
                if write {
                    return Ok(None);
                }
                continue;
            };
            let Some(fds) = f.async_fds() else {
                return Ok(None);
            };
            // Band files only grow while the bundle is shared: a length
            // read now holds until the request ends.
            let flen = f.len().map_err(|e| self.band_err(n, "stat", e))?;
            let data = plen.min(flen.saturating_sub(within));
            if write && data < plen {
                return Ok(None);
            }
            if data == 0 {
                continue;
            }
            pieces.push(HostPiece::on(fds, piece_at, within, data as usize));
            files.push((n, f));
        }
        let mut busy = Vec::with_capacity(files.len());
        for (n, f) in files {
            let b = st.busy.entry(n).or_insert(Busy {
                file: f,
                requests: 0,
                writes: 0,
            });
            b.requests += 1;
            b.writes += usize::from(write);
            busy.push(n);
        }
        drop(st);
        Ok(Some(Translation {
            pieces,
            hold: Box::new(Held {
                bands: self.bands.clone(),
                idle: self.idle.clone(),
                busy,
                write,
                _shared: shared,
            }),
        }))
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

    /// The largest size a plist may name, in whole sectors: bands are files
    /// made as they are written, so growth costs nothing until then.
    fn max_size(&self) -> u64 {
        let max = match &self.crypt {
            Some(c) => info::MAX_SIZE.min(crypt::MAX_BLOCKS * c.block_size()),
            None => info::MAX_SIZE,
        };
        max / SECTOR * SECTOR
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
            let got = f
                .read_at(piece, within)
                .map_err(|e| self.band_err(n, "reading", e))?;
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

    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        self.translate_bands(offset, len, write)
    }

    fn may_translate(&self) -> bool {
        self.crypt.is_none() && self.dir.band_fds()
    }

    /// Every band file a translated write is under way in goes to `dirty`:
    /// this request's have landed (or failed, and may have changed them);
    /// others' are synced early, harmlessly, and added again by their own
    /// `io_done`.
    fn io_done(&self, write: bool, len: u64, ok: bool) {
        if write {
            let mut st = self.bands.lock();
            let Bands { busy, dirty, .. } = &mut *st;
            for b in busy.values().filter(|b| b.writes > 0) {
                dirty
                    .entry(file_key(&b.file))
                    .or_insert_with(|| (b.file.clone(), false));
            }
        }
        self.counters.io.done(write, len, ok);
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
            let reserved = f
                .reserve(within, len)
                .map_err(|e| self.band_err(n, "reserving space", e))?;
            if reserved {
                self.mark_dirty(&f, true)?;
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
        if let Some(c) = &self.crypt {
            check_geometry(&self.path, self.band_size, new_size, c.block_size() as u32)?;
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
                if let Some(p) = self.data_in(n, &f, within)? {
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
            match self.hole_in(n, &f, at - start)? {
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
            Extent::push_merged(
                &mut out,
                Extent {
                    start,
                    length: end - start,
                    data,
                    offset: None,
                },
            );
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
                let Some(d) = self.data_in(n, &f, w)? else {
                    break;
                };
                if d >= limit {
                    break;
                }
                let h = self.hole_in(n, &f, d)?.unwrap_or(limit).min(limit);
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
        let stat_err =
            |name: &str, e| Error::io(format!("{}/{name}: stat", self.path.display()), e);
        let mut total = 0;
        for name in [INFO, BACKUP, TOKEN] {
            total += self
                .dir
                .root_allocated(name)
                .map_err(|e| stat_err(name, e))?;
        }
        let mut from = 0;
        while let Some(n) = self.next_present(from) {
            from = n + 1;
            let name = band_name(n);
            total += self
                .dir
                .band_allocated(&name)
                .map_err(|e| stat_err(&format!("{BANDS}/{name}"), e))?;
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

/// A root file of the bundle, no larger than `limit`, not followed if a
/// symlink.
fn read_small(dir: &dyn BundleDir, bundle: &Path, name: &str, limit: usize) -> Result<Vec<u8>> {
    let shown = format!("{}/{name}", bundle.display());
    dir.read_small(name, limit)
        .map_err(|e| match (e.kind(), e.raw_os_error()) {
            (std::io::ErrorKind::InvalidData, _) => {
                Error::Corrupt(format!("{shown}: not a regular file"))
            }
            (_, Some(libc::ENOENT)) => Error::Corrupt(format!("{shown}: missing")),
            (_, Some(libc::ELOOP)) => Error::Corrupt(format!("{shown}: is a symbolic link")),
            _ => Error::io(shown, e),
        })
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

/// Opens the bundle directory and `token`, and takes the lock.
fn open_host(path: &Path, lock: LockMode) -> Result<(HostDir, File)> {
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
    Ok((HostDir::new(root), token))
}

/// Reads the plist and `token`: the token's bytes when it holds an
/// `encrcdsa` header (checked, but not unlocked), `None` when it is empty.
fn read_info(dir: &dyn BundleDir, path: &Path) -> Result<(Info, Option<Vec<u8>>)> {
    let bytes = read_small(dir, path, INFO, MAX_INFO_LEN)?;
    let info = decode_info(path, INFO, &bytes)?;
    let head = read_small(
        dir,
        path,
        TOKEN,
        crate::host::crypt::HEADER_READ_MAX as usize,
    )?;
    if head.starts_with(ENCRYPTED_MAGIC) {
        let (h, _) = HeaderV2::decode_with_blob(&head).map_err(|e| token_error(path, e))?;
        check_header(path, &h, &info)?;
        return Ok((info, Some(head)));
    }
    if !head.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: token is neither empty nor an encrcdsa header",
            path.display()
        )));
    }
    Ok((info, None))
}

/// Block size of the bundles we create, as hdiutil's.
const CREATE_BLOCK_SIZE: u32 = 4096;

/// What the bundle's geometry must be for its header (see [`crypt`]).
fn check_header(path: &Path, h: &HeaderV2, info: &Info) -> Result<()> {
    // The data size field is 0 in a bundle: the plist's size counts.
    check_geometry(path, info.band_size, info.size, h.block_size)
}

/// Blocks must not straddle bands, and their numbers must fit 32 bits.
fn check_geometry(path: &Path, band_size: u64, size: u64, block_size: u32) -> Result<()> {
    let bs = block_size as u64;
    if band_size % bs != 0 {
        return Err(Error::Invalid(format!(
            "{}: band size {band_size} is not a multiple of the {bs}-byte encryption block",
            path.display()
        )));
    }
    if size.div_ceil(bs) > crypt::MAX_BLOCKS {
        return Err(Error::Invalid(format!(
            "{}: {size} bytes is more than 2^32 encryption blocks of {bs} bytes",
            path.display()
        )));
    }
    Ok(())
}

/// A crypt error about `token`, named after it.
fn token_error(path: &Path, e: Error) -> Error {
    match e {
        Error::Corrupt(m) => Error::Corrupt(format!("{}/{TOKEN}: {m}", path.display())),
        Error::Invalid(m) => Error::Invalid(format!("{}/{TOKEN}: {m}", path.display())),
        e => e,
    }
}

/// The bands present, and every band file that breaks the layout (each
/// one line, in name order).
fn scan_bands(
    path: &Path,
    dir: &dyn BundleDir,
    info: &Info,
) -> Result<(BTreeSet<u64>, Vec<Error>)> {
    let shown_dir = format!("{}/{BANDS}", path.display());
    let mut names = dir.list_bands().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => Error::Corrupt(format!("{shown_dir}: missing")),
        Some(libc::ENOTDIR | libc::ELOOP) => {
            Error::Corrupt(format!("{shown_dir}: not a directory"))
        }
        _ => Error::io(shown_dir.clone(), e),
    })?;
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
        let st = dir
            .stat_band(text)
            .map_err(|e| Error::io(shown.clone(), e))?;
        if !st.regular {
            problems.push(Error::Corrupt(format!("{shown}: not a regular file")));
            continue;
        }
        if st.len > info.band_size {
            problems.push(Error::Corrupt(format!(
                "{shown}: {} bytes, longer than the {}-byte band size",
                st.len, info.band_size
            )));
            continue;
        }
        present.insert(n);
    }
    Ok((present, problems))
}

/// Removes plists a crash left half-replaced (only a writer, holding the
/// lock, may).
fn remove_leftovers(path: &Path, dir: &dyn BundleDir) -> Result<()> {
    for name in [INFO, BACKUP] {
        let tmp = format!("{name}{TEMP_SUFFIX}");
        dir.remove(&tmp)
            .map_err(|e| Error::io(format!("{}/{tmp}: removing", path.display()), e))?;
    }
    Ok(())
}

/// Copies `Info.plist` over `Info.bckup` when they differ, as a crash
/// between replacing the one and the other leaves them (`Info.plist` is the
/// one that counts).
fn restore_backup(path: &Path, dir: &dyn BundleDir, info: &Info) -> Result<()> {
    let copy = read_small(dir, path, BACKUP, MAX_INFO_LEN)
        .and_then(|b| decode_info(path, BACKUP, &b))
        .ok();
    if copy.as_ref() == Some(info) {
        return Ok(());
    }
    tracing::info!("{}: {BACKUP} restored from {INFO}", path.display());
    let bytes = read_small(dir, path, INFO, MAX_INFO_LEN)?;
    let ctx = |e| Error::io(format!("{}/{BACKUP}: replacing", path.display()), e);
    dir.replace(BACKUP, &bytes).map_err(ctx)?;
    dir.sync_root().map_err(ctx)
}

/// Lays out a fresh bundle in `dir` (which must not exist), synced.
fn build(dir: &Path, info: &Info, token: &[u8]) -> Result<()> {
    let ctx = |e: std::io::Error| Error::io(dir.display().to_string(), e);
    std::fs::create_dir(dir).map_err(ctx)?;
    let bytes = info.encode();
    for (name, content) in [(INFO, &bytes[..]), (BACKUP, &bytes[..]), (TOKEN, token)] {
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
    let Ok(bytes) = read_small(&HostDir::root_only(root), path, INFO, MAX_INFO_LEN) else {
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
    match open_host(path, LockMode::Shared) {
        Ok((dir, _token)) => Ok(check_store(path, &dir)),
        Err(e @ Error::Locked { .. }) => Err(e),
        Err(e) => Ok(vec![e.to_string()]),
    }
}

/// [`check`] of a bundle on any [`BundleDir`] (no lock).
pub fn check_store(path: &Path, dir: &dyn BundleDir) -> Vec<String> {
    let info = match read_info(dir, path) {
        Ok((i, _)) => i,
        Err(e) => return vec![e.to_string()],
    };
    let mut lines = Vec::new();
    match read_small(dir, path, BACKUP, MAX_INFO_LEN).and_then(|b| decode_info(path, BACKUP, &b)) {
        Ok(copy) if copy == info => {}
        Ok(_) => lines.push(format!(
            "{}/{BACKUP}: does not match {INFO}",
            path.display()
        )),
        Err(e) => lines.push(e.to_string()),
    }
    for name in [INFO, BACKUP] {
        let tmp = format!("{name}{TEMP_SUFFIX}");
        if dir.exists(&tmp) {
            lines.push(format!(
                "{}/{tmp}: left by an interrupted resize (a writable open removes it)",
                path.display()
            ));
        }
    }
    match scan_bands(path, dir, &info) {
        Ok((_, problems)) => lines.extend(problems.iter().map(|e| e.to_string())),
        Err(e) => lines.push(e.to_string()),
    }
    lines
}

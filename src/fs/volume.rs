//! The mounted volume without FUSE: SOURCE's images as flat files, each
//! request mapped onto [`Disk`] and [`Namespace`] calls.
//!
//! Methods take plain values (inode numbers, offsets, byte slices, modes,
//! whence) and answer `Result<T, i32>` where the error is a libc errno, the
//! one the kernel gets. No fuser type appears here, so every request's
//! logic is tested in-process (`volume/tests.rs`); `ops.rs` only decodes,
//! calls and replies.
//!
//! Invariants the errnos keep: changes to a read-only image or mount are
//! `EROFS`; growth past what a format can hold is `EFBIG`; unsupported
//! fallocate modes are `EOPNOTSUPP`; fallocate, lseek and fsync never answer
//! `ENOSYS` (the kernel would stop asking for the whole mount).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tracing::{debug, warn};

use super::namespace::{flush_logged, Namespace, Node, Source, ROOT_INO};
use super::DirectIo;
use crate::disk::Disk;
use crate::host::uring::Ring;

pub(crate) const XATTR_STATS: &str = "user.asiffs.stats";
pub(crate) const XATTR_PID: &str = "user.asiffs.pid";
/// fh bit: the handle may write (only those flush on close).
const FH_WRITE: u64 = 1;

/// A libc errno, as the kernel is answered.
pub(crate) type Errno = i32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Directory,
}

/// What `stat` shows of a file or the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte units the container occupies on the host.
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: now, or a given instant.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SetTime {
    Now,
    At(SystemTime),
}

/// What a setattr changes; `None` leaves it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// An open file handle and how the kernel should treat its I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    pub fh: u64,
    /// Bypass the page cache (`FOPEN_DIRECT_IO`); else keep it.
    pub direct_io: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

/// Free space of the file system holding SOURCE, in 4 KiB blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub(crate) struct Volume {
    pub ns: Arc<Namespace>,
    /// io_uring for container I/O, every format; `None`: blocking calls.
    ring: Option<Arc<Ring>>,
    direct_io: DirectIo,
    /// Directory listings taken at opendir, served by readdir.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_dir: AtomicU64,
    /// Attributes of the root directory (SOURCE's own stat).
    root_md: std::fs::Metadata,
    /// How requests reach the volume: `classic` (`/dev/fuse`) or `uring`,
    /// and whether that transport does the container I/O on its rings.
    transport: Mutex<(&'static str, bool)>,
}

thread_local! {
    /// Reused read buffer: avoids fresh zeroed pages on every large read.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn sys_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn attr_from(ino: u64, kind: Kind, size: u64, md: &std::fs::Metadata, nlink: u32) -> Attr {
    Attr {
        ino,
        kind,
        size,
        blocks: md.blocks(),
        atime: sys_time(md.atime(), md.atime_nsec()),
        mtime: sys_time(md.mtime(), md.mtime_nsec()),
        ctime: sys_time(md.ctime(), md.ctime_nsec()),
        perm: (md.mode() & 0o7777) as u16,
        nlink,
        uid: md.uid(),
        gid: md.gid(),
    }
}

fn io_errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Grows the image so that `end` fits (rounded up to a sector); never shrinks.
fn grow_to(node: &Node, end: u64) -> Result<(), Errno> {
    if end <= node.disk.size() {
        return Ok(());
    }
    let _g = node.resize_lock.lock();
    let target = end.checked_add(511).ok_or(libc::EFBIG)? & !511;
    if target > node.disk.max_size() {
        return Err(libc::EFBIG);
    }
    if node.disk.size() < target {
        node.disk.resize(target).map_err(|e| e.errno())?;
    }
    Ok(())
}

/// The checks every write makes before data moves: writable, and grown
/// so that `offset + len` fits.
fn prepare_write(node: &Node, offset: u64, len: usize) -> Result<(), Errno> {
    if !node.disk.is_writable() {
        return Err(libc::EROFS);
    }
    let end = offset.checked_add(len as u64).ok_or(libc::EFBIG)?;
    grow_to(node, end)
}

/// The bytes of a read of `size` at `offset` that lie inside the disk.
fn read_len(node: &Node, offset: u64, size: u32) -> usize {
    let disk = node.disk.size();
    if offset >= disk {
        return 0;
    }
    u64::from(size).min(disk - offset) as usize
}

fn do_flush(node: &Node) -> Result<(), Errno> {
    if !node.disk.is_writable() {
        return Ok(());
    }
    node.disk.flush().map_err(|e| {
        warn!("{}: flush failed: {e}", node.path().display());
        e.errno()
    })
}

fn set_times(
    path: &std::path::Path,
    atime: Option<SetTime>,
    mtime: Option<SetTime>,
) -> io::Result<()> {
    fn spec(t: Option<SetTime>) -> libc::timespec {
        match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(SetTime::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => libc::timespec {
                    tv_sec: d.as_secs() as _,
                    tv_nsec: d.subsec_nanos() as _,
                },
                Err(e) => {
                    let d = e.duration();
                    libc::timespec {
                        tv_sec: -(d.as_secs() as i64) as _,
                        tv_nsec: 0,
                    }
                }
            },
        }
    }
    let times = [spec(atime), spec(mtime)];
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Volume {
    pub fn new(
        ns: Arc<Namespace>,
        ring: Option<Arc<Ring>>,
        direct_io: DirectIo,
        root_md: std::fs::Metadata,
    ) -> Volume {
        Volume {
            ns,
            ring,
            direct_io,
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
            root_md,
            transport: Mutex::new(("classic", false)),
        }
    }

    /// Says how requests arrive, and whether their container I/O goes on
    /// the transport's rings (for `stats`).
    pub fn set_transport(&self, t: &'static str, ring_io: bool) {
        *self.transport.lock() = (t, ring_io);
    }

    /// Whether the root is the directory of images (not the image itself).
    fn root_is_dir(&self) -> bool {
        !self.ns.root_is_file()
    }

    pub fn node(&self, ino: u64) -> Result<Arc<Node>, Errno> {
        self.ns.get(ino).ok_or(libc::ENOENT)
    }

    fn node_attr(&self, node: &Node) -> Result<Attr, Errno> {
        // An open image outlives its name, as an unlinked file does.
        let current = if node.detached.load(Ordering::SeqCst) {
            None
        } else {
            match std::fs::metadata(node.path()) {
                Ok(md) if node.is_container(&md) => Some(md),
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_errno(e)),
            }
        };
        let (md, nlink) = match current {
            Some(md) => {
                *node.last_md.lock() = md.clone();
                (md, 1)
            }
            None => (node.last_md.lock().clone(), 0),
        };
        let mut attr = attr_from(node.ino, Kind::File, node.disk.size(), &md, nlink);
        // A bundle is a directory; its search bits do not make the disk executable.
        if md.is_dir() {
            attr.perm &= !0o111;
        }
        // What the container holds on the host (`du`); for a bundle, its bands.
        if let Ok(bytes) = node.disk.allocated_bytes() {
            attr.blocks = bytes.div_ceil(512);
        }
        Ok(attr)
    }

    fn root_attr(&self) -> Attr {
        let mut a = attr_from(ROOT_INO, Kind::Directory, 0, &self.root_md, 2);
        a.size = 4096;
        a.blocks = 8;
        a
    }

    fn open_direct(&self, flags: i32) -> bool {
        match self.direct_io {
            DirectIo::Always => true,
            DirectIo::Never => false,
            DirectIo::Auto => flags & libc::O_DIRECT != 0,
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        if parent != ROOT_INO || !self.root_is_dir() {
            return Err(libc::ENOENT);
        }
        let node = self.ns.lookup(name).ok_or(libc::ENOENT)?;
        self.node_attr(&node)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        if ino == ROOT_INO && self.root_is_dir() {
            return Ok(self.root_attr());
        }
        self.node_attr(&*self.node(ino)?)
    }

    /// Truncate (grow or shrink, as the format allows), chmod, chown, utimes.
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> Result<Attr, Errno> {
        if ino == ROOT_INO && self.root_is_dir() {
            return Ok(self.root_attr());
        }
        let node = self.node(ino)?;
        if let Some(size) = set.size {
            if !node.disk.is_writable() {
                return Err(libc::EROFS);
            }
            // As truncate(2) past the largest file.
            if size > node.disk.max_size() {
                return Err(libc::EFBIG);
            }
            let _g = node.resize_lock.lock();
            node.disk.resize(size).map_err(|e| {
                warn!("{}: resize to {size}: {e}", node.path().display());
                e.errno()
            })?;
        }
        let path = node.path();
        if let Some(mode) = set.mode {
            use std::os::unix::fs::PermissionsExt;
            let mut mode = mode & 0o7777;
            if path.is_dir() {
                // A bundle directory stays searchable by whoever may read it.
                mode |= (mode & 0o444) >> 2;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(io_errno)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            std::os::unix::fs::chown(&path, set.uid, set.gid).map_err(io_errno)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            set_times(&path, set.atime, set.mtime).map_err(io_errno)?;
        }
        self.node_attr(&node)
    }

    /// A new empty image (`NAME.img` -> `SOURCE/NAME.asif`); only regular files.
    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32) -> Result<Attr, Errno> {
        if parent != ROOT_INO || !self.root_is_dir() {
            return Err(libc::EPERM);
        }
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(libc::EPERM);
        }
        let node = self.ns.create(name)?;
        self.node_attr(&node)
    }

    /// Creates and opens; without `O_EXCL` an existing image is opened instead.
    pub fn create(&self, parent: u64, name: &OsStr, flags: i32) -> Result<(Attr, Opened), Errno> {
        if parent != ROOT_INO || !self.root_is_dir() {
            return Err(libc::EPERM);
        }
        let node = match self.ns.create(name) {
            Ok(n) => n,
            Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => {
                self.ns.lookup(name).ok_or(libc::EEXIST)?
            }
            Err(e) => return Err(e),
        };
        let attr = self.node_attr(&node)?;
        node.open.fetch_add(1, Ordering::SeqCst);
        let opened = Opened {
            fh: FH_WRITE,
            direct_io: self.open_direct(flags),
        };
        Ok((attr, opened))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if parent != ROOT_INO || !self.root_is_dir() {
            return Err(libc::ENOENT);
        }
        self.ns.unlink(name)
    }

    /// `flags`: the renameat2 bits; only `RENAME_NOREPLACE` is supported.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        if parent != ROOT_INO || newparent != ROOT_INO || !self.root_is_dir() {
            return Err(libc::EXDEV);
        }
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(libc::EINVAL);
        }
        self.ns
            .rename(name, newname, flags & libc::RENAME_NOREPLACE != 0)
    }

    pub fn open(&self, ino: u64, flags: i32) -> Result<Opened, Errno> {
        let node = self.node(ino)?;
        // An impossible access mode reads, as fuser decodes it.
        let write = matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR);
        if write && !node.disk.is_writable() {
            return Err(libc::EROFS);
        }
        node.open.fetch_add(1, Ordering::SeqCst);
        Ok(Opened {
            fh: if write { FH_WRITE } else { 0 },
            direct_io: self.open_direct(flags),
        })
    }

    /// The file to hand the kernel for passthrough, when the node's disk
    /// is its file byte for byte.
    pub fn passthrough_file(&self, ino: u64) -> Option<Arc<std::fs::File>> {
        self.node(ino).ok()?.disk.passthrough_file()
    }

    pub fn release(&self, ino: u64) {
        if let Some(node) = self.ns.get(ino) {
            self.ns.release(&node);
        }
    }

    /// Whether I/O on `node` goes through the ring ([`Volume::read_async`],
    /// [`Volume::write_async`]): every image whose store the ring can
    /// reach ([`Disk::may_translate`]), when io_uring is up. The rest
    /// (encrypted, compressed, bundles) stay on the serving pool.
    pub fn is_async(&self, node: &Node) -> bool {
        self.ring.is_some() && node.disk.may_translate()
    }

    /// Reads up to `size` bytes at `offset` (short at the end of the disk,
    /// empty past it) and hands them to `done` on this thread.
    pub fn read<R>(
        &self,
        node: &Node,
        offset: u64,
        size: u32,
        done: impl FnOnce(Result<&[u8], Errno>) -> R,
    ) -> R {
        let len = read_len(node, offset, size);
        if len == 0 {
            return done(Ok(&[]));
        }
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match node.disk.read_at(&mut buf[..len], offset) {
                Ok(()) => done(Ok(&buf[..len])),
                Err(e) => {
                    debug!("read {offset}+{len}: {e}");
                    done(Err(e.errno()))
                }
            }
        })
    }

    /// As [`Volume::read`], but the container I/O is submitted to the ring
    /// and `done` runs on the ring's thread once it completes (or at once
    /// on this thread when nothing needs the ring or it cannot be used).
    pub fn read_async(
        &self,
        node: &Node,
        offset: u64,
        size: u32,
        done: impl FnOnce(Result<&[u8], Errno>) + Send + 'static,
    ) {
        let len = read_len(node, offset, size);
        if len == 0 {
            return done(Ok(&[]));
        }
        let Some(ring) = &self.ring else {
            return done(Err(libc::EIO));
        };
        ring.read(
            node.disk.clone(),
            offset,
            len,
            Box::new(move |r| match r {
                Ok(buf) => done(Ok(buf.as_slice())),
                Err(e) => {
                    debug!("read {offset}+{len}: {e}");
                    done(Err(e.errno()))
                }
            }),
        );
    }

    /// Where a read of `size` at `offset` lies in the host files, for a
    /// transport that does the host I/O itself: the bytes inside the disk
    /// and their translation, or `None` for the slow path ([`Volume::read`]).
    pub fn translate_read(
        &self,
        node: &Node,
        offset: u64,
        size: u32,
    ) -> Result<Option<(usize, crate::disk::Translation)>, Errno> {
        let len = read_len(node, offset, size);
        if len == 0 {
            return Ok(None);
        }
        match node.disk.translate(offset, len as u64, false) {
            Ok(t) => Ok(t
                .filter(|t| crate::host::uring::usable(t, len))
                .map(|t| (len, t))),
            Err(e) => {
                debug!("read {offset}+{len}: {e}");
                Err(e.errno())
            }
        }
    }

    /// As [`Volume::translate_read`] for a write of `len` bytes, after the
    /// checks and growth a write makes; `None`: [`Volume::write`].
    pub fn translate_write(
        &self,
        node: &Node,
        offset: u64,
        len: usize,
    ) -> Result<Option<crate::disk::Translation>, Errno> {
        prepare_write(node, offset, len)?;
        match node.disk.translate(offset, len as u64, true) {
            Ok(t) => Ok(t.filter(|t| crate::host::uring::covers(t, len))),
            Err(e) => {
                warn!("write {offset}+{len}: {e}");
                Err(e.errno())
            }
        }
    }

    /// Writes `data` at `offset`, growing the disk where the format can;
    /// answers the bytes written.
    pub fn write(&self, node: &Node, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        prepare_write(node, offset, data.len())?;
        match node.disk.write_at(data, offset) {
            Ok(()) => Ok(data.len() as u32),
            Err(e) => {
                warn!("write {offset}+{}: {e}", data.len());
                Err(e.errno())
            }
        }
    }

    /// As [`Volume::write`] through the ring: `data` is copied or
    /// submitted before this returns; `done` runs on the ring's thread.
    pub fn write_async(
        &self,
        node: &Node,
        offset: u64,
        data: &[u8],
        done: impl FnOnce(Result<u32, Errno>) + Send + 'static,
    ) {
        if let Err(e) = prepare_write(node, offset, data.len()) {
            return done(Err(e));
        }
        let Some(ring) = &self.ring else {
            return done(Err(libc::EIO));
        };
        let len = data.len();
        ring.write(
            node.disk.clone(),
            data,
            offset,
            Box::new(move |r| match r {
                Ok(()) => done(Ok(len as u32)),
                Err(e) => {
                    warn!("write {offset}+{len}: {e}");
                    done(Err(e.errno()))
                }
            }),
        );
    }

    /// close(2) of handle `fh`: only handles that may write flush.
    pub fn flush(&self, node: &Node, fh: u64) -> Result<(), Errno> {
        if fh & FH_WRITE == 0 {
            return Ok(());
        }
        do_flush(node)
    }

    /// Whether a close of `fh` has anything to flush (so the caller can
    /// answer at once otherwise).
    pub fn flushes(fh: u64) -> bool {
        fh & FH_WRITE != 0
    }

    pub fn fsync(&self, node: &Node) -> Result<(), Errno> {
        do_flush(node)
    }

    /// fsync of the directory: every image reachable by name.
    pub fn fsync_all(&self) -> Result<(), Errno> {
        let mut r = Ok(());
        for n in self.ns.listing() {
            if let Err(e) = do_flush(&n) {
                r = Err(e);
            }
        }
        r
    }

    /// At unmount: every image, reachable or not; failures are logged.
    pub fn flush_all_logged(&self) {
        for n in self.ns.all() {
            flush_logged(&n);
        }
    }

    /// Modes: 0 and KEEP_SIZE reserve, ZERO_RANGE (with or without
    /// KEEP_SIZE) zeroes, PUNCH_HOLE|KEEP_SIZE discards; without KEEP_SIZE
    /// the disk grows to cover the range. Anything else is `EOPNOTSUPP`.
    pub fn fallocate(&self, node: &Node, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        use libc::{
            FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH,
            FALLOC_FL_ZERO_RANGE as ZERO,
        };
        let img = &*node.disk;
        if !img.is_writable() {
            return Err(libc::EROFS);
        }
        let end = offset.checked_add(length).ok_or(libc::EFBIG)?;
        // The part of [offset, end) inside the disk once any growth is done.
        let clamp = |img: &dyn Disk| -> Option<(u64, u64)> {
            let size = img.size();
            (offset < size).then(|| (offset, end.min(size) - offset))
        };
        let r = match mode {
            m if m == PUNCH | KEEP => match clamp(img) {
                Some((o, l)) => img.discard(o, l),
                None => Ok(()),
            },
            m if m & !KEEP == ZERO => {
                if m & KEEP == 0 {
                    grow_to(node, end)?;
                }
                match clamp(img) {
                    Some((o, l)) => img.write_zeroes(o, l),
                    None => Ok(()),
                }
            }
            0 | KEEP => {
                if mode & KEEP == 0 {
                    grow_to(node, end)?;
                }
                match clamp(img) {
                    Some((o, l)) => img.allocate(o, l),
                    None => Ok(()),
                }
            }
            _ => return Err(libc::EOPNOTSUPP),
        };
        r.map_err(|e| {
            warn!("fallocate mode {mode:#x} {offset}+{length}: {e}");
            e.errno()
        })
    }

    /// SEEK_DATA and SEEK_HOLE; `ENXIO` at or past the end.
    pub fn lseek(&self, node: &Node, offset: i64, whence: i32) -> Result<i64, Errno> {
        let size = node.disk.size();
        if offset < 0 || offset as u64 >= size {
            return Err(libc::ENXIO);
        }
        let off = offset as u64;
        match whence {
            libc::SEEK_DATA => match node.disk.seek_data(off).map_err(|e| e.errno())? {
                Some(o) if o < size => Ok(o as i64),
                _ => Err(libc::ENXIO),
            },
            libc::SEEK_HOLE => {
                Ok(node.disk.seek_hole(off).map_err(|e| e.errno())?.min(size) as i64)
            }
            // The kernel resolves the other kinds itself; never say ENOSYS here.
            _ => Err(libc::EINVAL),
        }
    }

    /// Takes the listing readdir will serve: `.`, `..`, then the images by name.
    pub fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        if ino != ROOT_INO || !self.root_is_dir() {
            return Err(libc::ENOTDIR);
        }
        self.ns.rescan();
        let dot = |name: &str| DirEntry {
            ino: ROOT_INO,
            kind: Kind::Directory,
            name: name.into(),
        };
        let mut list = vec![dot("."), dot("..")];
        list.extend(self.ns.listing().into_iter().map(|n| DirEntry {
            ino: n.ino,
            kind: Kind::File,
            name: n.name(),
        }));
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(list));
        Ok(fh)
    }

    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>, Errno> {
        self.dirs.lock().get(&fh).cloned().ok_or(libc::EBADF)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    pub fn statfs(&self) -> Result<StatFs, Errno> {
        let dir = match &self.ns.source {
            Source::Dir(d) => d.clone(),
            Source::File { path, .. } => path
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| "/".into()),
        };
        let st = rustix::fs::statvfs(&dir).map_err(|e| io_errno(e.into()))?;
        // Reported in 4 KiB units: loop devices take their discard granularity from f_bsize.
        let scale = |n: u64| n.saturating_mul(st.f_frsize) / 4096;
        Ok(StatFs {
            blocks: scale(st.f_blocks),
            bfree: scale(st.f_bfree),
            bavail: scale(st.f_bavail),
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }

    /// `user.asiffs.pid` (root only) and `user.asiffs.stats` (JSON: one
    /// image's counters, or for the root directory every image's by name).
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let name = name.as_bytes();
        if name == XATTR_PID.as_bytes() && ino == ROOT_INO {
            return Ok(std::process::id().to_string().into_bytes());
        }
        if name != XATTR_STATS.as_bytes() {
            return Err(libc::ENODATA);
        }
        if ino == ROOT_INO && self.root_is_dir() {
            self.ns.rescan();
            let mut map = serde_json::Map::new();
            for n in self.ns.listing() {
                map.insert(n.name().to_string_lossy().into_owned(), self.stats(&n));
            }
            return serde_json::to_vec(&map).map_err(|_| libc::EIO);
        }
        let node = self.node(ino)?;
        serde_json::to_vec(&self.stats(&node)).map_err(|_| libc::EIO)
    }

    /// The image's counters, and how the mount issues its container I/O.
    fn stats(&self, node: &Node) -> serde_json::Value {
        let mut v = node.disk.stats();
        v["format"] = node.disk.format().name().into();
        let (transport, ring_io) = *self.transport.lock();
        let io = if self.is_async(node) || (ring_io && node.disk.may_translate()) {
            "io_uring"
        } else {
            "blocking"
        };
        v["io"] = io.into();
        v["transport"] = transport.into();
        v
    }

    /// The attribute names, each NUL-terminated.
    pub fn listxattr(&self, ino: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(XATTR_STATS.as_bytes());
        v.push(0);
        if ino == ROOT_INO {
            v.extend_from_slice(XATTR_PID.as_bytes());
            v.push(0);
        }
        v
    }
}

#[cfg(test)]
mod tests;

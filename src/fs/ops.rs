//! The fuser `Filesystem`: maps kernel requests onto [`Image`](crate::Image) calls.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::namespace::{flush_logged, Namespace, Node, ROOT_INO};
use super::pool::Pool;
use super::DirectIo;
use crate::disk::Disk;
use crate::engine::aio::Ring;

/// Attribute cache lifetime.
const TTL: Duration = Duration::from_secs(1);
/// Names are not cached: SOURCE may gain, lose or replace images at any time,
/// and a lookup costs one stat.
const ENTRY_TTL: Duration = Duration::ZERO;
pub(crate) const MAX_WRITE: u32 = 1 << 20;
pub(crate) const XATTR_STATS: &str = "user.asiffs.stats";
pub(crate) const XATTR_PID: &str = "user.asiffs.pid";
/// fh bit: the handle may write (only those flush on close).
const FH_WRITE: u64 = 1;

/// A directory as opendir saw it: (ino, kind, name).
type Listing = Vec<(u64, FileType, std::ffi::OsString)>;

pub(crate) struct AsifFs {
    pub ns: Arc<Namespace>,
    pool: Option<Arc<Pool>>,
    /// io_uring for container I/O; `None`: blocking calls.
    ring: Option<Arc<Ring>>,
    direct_io: DirectIo,
    /// Directory listings taken at opendir, served by readdir.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    next_dir: AtomicU64,
    /// Attributes of the root directory (SOURCE's own stat).
    root_md: std::fs::Metadata,
}

thread_local! {
    /// Reused read buffer: avoids fresh zeroed pages on every large read.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn sys_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn attr_from(ino: u64, kind: FileType, size: u64, md: &std::fs::Metadata, nlink: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: md.blocks(),
        atime: sys_time(md.atime(), md.atime_nsec()),
        mtime: sys_time(md.mtime(), md.mtime_nsec()),
        ctime: sys_time(md.ctime(), md.ctime_nsec()),
        crtime: sys_time(md.ctime(), md.ctime_nsec()),
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink,
        uid: md.uid(),
        gid: md.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl AsifFs {
    pub fn new(
        ns: Arc<Namespace>,
        pool: Option<Arc<Pool>>,
        ring: Option<Arc<Ring>>,
        direct_io: DirectIo,
        root_md: std::fs::Metadata,
    ) -> AsifFs {
        AsifFs {
            ns,
            pool,
            ring,
            direct_io,
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
            root_md,
        }
    }

    fn node_attr(&self, node: &Node) -> Result<FileAttr, Errno> {
        let md = std::fs::metadata(node.path())
            .map_err(|e| errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let nlink = if node.detached.load(Ordering::SeqCst) {
            0
        } else {
            1
        };
        let mut attr = attr_from(
            node.ino,
            FileType::RegularFile,
            node.disk.size(),
            &md,
            nlink,
        );
        // What the container holds on the host (`du`); for a bundle, its bands.
        if let Ok(bytes) = node.disk.allocated_bytes() {
            attr.blocks = bytes.div_ceil(512);
        }
        Ok(attr)
    }

    fn root_attr(&self) -> FileAttr {
        let mut a = attr_from(ROOT_INO, FileType::Directory, 0, &self.root_md, 2);
        a.size = 4096;
        a.blocks = 8;
        a
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        if ino == ROOT_INO && !self.ns.root_is_file() {
            return Ok(self.root_attr());
        }
        let node = self.ns.get(ino).ok_or(Errno::ENOENT)?;
        self.node_attr(&node)
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.ns.get(ino.0).ok_or(Errno::ENOENT)
    }

    /// Runs `f` on the worker pool, or right here with fuser's own threads.
    fn exec(&self, f: impl FnOnce() + Send + 'static) {
        match &self.pool {
            Some(p) => p.submit(Box::new(f)),
            None => f(),
        }
    }

    fn open_flags(&self, flags: OpenFlags) -> FopenFlags {
        let odirect = flags.0 & libc::O_DIRECT != 0;
        let direct = match self.direct_io {
            DirectIo::Always => true,
            DirectIo::Never => false,
            DirectIo::Auto => odirect,
        };
        if direct {
            // Parallel: without it the kernel serialises direct writes on the inode lock.
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            // Only this process writes the image (exclusive lock): cached pages stay valid.
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    fn xattr_value(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let name = name.as_bytes();
        if name == XATTR_PID.as_bytes() && ino == ROOT_INO {
            return Ok(std::process::id().to_string().into_bytes());
        }
        if name != XATTR_STATS.as_bytes() {
            return Err(Errno::from_i32(libc::ENODATA));
        }
        if ino == ROOT_INO && !self.ns.root_is_file() {
            self.ns.rescan();
            let mut map = serde_json::Map::new();
            for n in self.ns.listing() {
                map.insert(n.name().to_string_lossy().into_owned(), self.stats(&n)?);
            }
            return serde_json::to_vec(&map).map_err(|_| Errno::EIO);
        }
        let node = self.ns.get(ino).ok_or(Errno::ENOENT)?;
        serde_json::to_vec(&self.stats(&node)?).map_err(|_| Errno::EIO)
    }

    /// The image's counters, and how the mount issues its container I/O.
    fn stats(&self, node: &Node) -> Result<serde_json::Value, Errno> {
        let mut v = node.disk.stats();
        v["format"] = node.disk.format().name().into();
        let io = if self.ring.is_some() && node.asif.is_some() {
            "io_uring"
        } else {
            "blocking"
        };
        v["io"] = io.into();
        Ok(v)
    }

    fn xattr_names(&self, ino: u64) -> Vec<u8> {
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

/// Grows the image so that `end` fits (rounded up to a sector); never shrinks.
fn grow_to(node: &Node, end: u64) -> Result<(), i32> {
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

fn do_read(node: &Node, offset: u64, size: u32, reply: ReplyData) {
    let disk = node.disk.size();
    if offset >= disk {
        return reply.data(&[]);
    }
    let len = (u64::from(size)).min(disk - offset) as usize;
    READ_BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        match node.disk.read_at(&mut buf[..len], offset) {
            Ok(()) => reply.data(&buf[..len]),
            Err(e) => {
                debug!("read {offset}+{len}: {e}");
                reply.error(errno(e.errno()))
            }
        }
    });
}

fn read_async(node: &Node, ring: &Ring, offset: u64, size: u32, reply: ReplyData) {
    let disk = node.disk.size();
    if offset >= disk {
        return reply.data(&[]);
    }
    let len = (u64::from(size)).min(disk - offset) as usize;
    let Some(image) = &node.asif else {
        return reply.error(Errno::EIO);
    };
    image.read_async(
        ring,
        offset,
        len,
        Box::new(move |r| match r {
            Ok(buf) => reply.data(buf.as_slice()),
            Err(e) => {
                debug!("read {offset}+{len}: {e}");
                reply.error(errno(e.errno()))
            }
        }),
    );
}

fn write_async(node: &Node, ring: &Ring, offset: u64, data: &[u8], reply: ReplyWrite) {
    if !node.disk.is_writable() {
        return reply.error(Errno::EROFS);
    }
    let Some(end) = offset.checked_add(data.len() as u64) else {
        return reply.error(Errno::EFBIG);
    };
    if let Err(e) = grow_to(node, end) {
        return reply.error(errno(e));
    }
    let len = data.len();
    let Some(image) = &node.asif else {
        return reply.error(Errno::EIO);
    };
    image.write_async(
        ring,
        data,
        offset,
        Box::new(move |r| match r {
            Ok(()) => reply.written(len as u32),
            Err(e) => {
                warn!("write {offset}+{len}: {e}");
                reply.error(errno(e.errno()))
            }
        }),
    );
}

fn do_write(node: &Node, offset: u64, data: &[u8], reply: ReplyWrite) {
    if !node.disk.is_writable() {
        return reply.error(Errno::EROFS);
    }
    let Some(end) = offset.checked_add(data.len() as u64) else {
        return reply.error(Errno::EFBIG);
    };
    if let Err(e) = grow_to(node, end) {
        return reply.error(errno(e));
    }
    match node.disk.write_at(data, offset) {
        Ok(()) => reply.written(data.len() as u32),
        Err(e) => {
            warn!("write {offset}+{}: {e}", data.len());
            reply.error(errno(e.errno()))
        }
    }
}

fn do_flush(node: &Node) -> Result<(), Errno> {
    if !node.disk.is_writable() {
        return Ok(());
    }
    node.disk.flush().map_err(|e| {
        warn!("{}: flush failed: {e}", node.path().display());
        errno(e.errno())
    })
}

fn do_fallocate(node: &Node, offset: u64, length: u64, mode: i32) -> Result<(), i32> {
    use libc::{
        FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_ZERO_RANGE as ZERO,
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

fn do_lseek(node: &Node, offset: i64, whence: i32) -> Result<i64, i32> {
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
        libc::SEEK_HOLE => Ok(node.disk.seek_hole(off).map_err(|e| e.errno())?.min(size) as i64),
        // The kernel resolves the other kinds itself; never say ENOSYS here.
        _ => Err(libc::EINVAL),
    }
}

fn set_times(
    path: &std::path::Path,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> io::Result<()> {
    fn spec(t: Option<TimeOrNow>) -> libc::timespec {
        match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(TimeOrNow::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
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

fn io_errno(e: io::Error) -> Errno {
    errno(e.raw_os_error().unwrap_or(libc::EIO))
}

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for AsifFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(max);
        }
        // Requests the kernel keeps in flight: with io_uring each can be a
        // host I/O in flight, so well above a guest's usual queue depth.
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        for cap in [
            // Lets the kernel keep several requests of one direct/AIO read or write in flight.
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Sets SB_NOSEC: no getxattr(security.capability) round trip before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // mmap stays possible on files opened with FOPEN_DIRECT_IO.
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if config.add_capabilities(cap).is_err() {
                debug!("kernel lacks {cap:?}");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        for n in self.ns.all() {
            flush_logged(&n);
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT_INO || self.ns.root_is_file() {
            return reply.error(Errno::ENOENT);
        }
        let Some(node) = self.ns.lookup(name) else {
            return reply.error(Errno::ENOENT);
        };
        match self.node_attr(&node) {
            Ok(a) => reply.entry_with_ttls(&TTL, &ENTRY_TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == ROOT_INO && !self.ns.root_is_file() {
            return reply.attr(&TTL, &self.root_attr());
        }
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let r = (|| -> Result<(), Errno> {
            if let Some(size) = size {
                if !node.disk.is_writable() {
                    return Err(Errno::EROFS);
                }
                let _g = node.resize_lock.lock();
                node.disk.resize(size).map_err(|e| {
                    warn!("{}: resize to {size}: {e}", node.path().display());
                    errno(e.errno())
                })?;
            }
            let path = node.path();
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(io_errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&path, uid, gid).map_err(io_errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                set_times(&path, atime, mtime).map_err(io_errno)?;
            }
            Ok(())
        })();
        match r.and_then(|()| self.node_attr(&node)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if parent.0 != ROOT_INO || self.ns.root_is_file() {
            return reply.error(Errno::EPERM);
        }
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        match self
            .ns
            .create(name)
            .map_err(errno)
            .and_then(|n| self.node_attr(&n))
        {
            Ok(a) => reply.entry_with_ttls(&TTL, &ENTRY_TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT_INO || self.ns.root_is_file() {
            return reply.error(Errno::EPERM);
        }
        let node = match self.ns.create(name) {
            Ok(n) => n,
            Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => match self.ns.lookup(name) {
                Some(n) => n,
                None => return reply.error(Errno::EEXIST),
            },
            Err(e) => return reply.error(errno(e)),
        };
        match self.node_attr(&node) {
            Ok(a) => {
                node.open.fetch_add(1, Ordering::SeqCst);
                let fh = FileHandle(FH_WRITE);
                reply.created(
                    &TTL,
                    &a,
                    Generation(0),
                    fh,
                    self.open_flags(OpenFlags(flags)),
                )
            }
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT_INO || self.ns.root_is_file() {
            return reply.error(Errno::ENOENT);
        }
        match self.ns.unlink(name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent.0 != ROOT_INO || newparent.0 != ROOT_INO || self.ns.root_is_file() {
            return reply.error(Errno::EXDEV);
        }
        let bits = flags.bits();
        if bits & !libc::RENAME_NOREPLACE != 0 {
            return reply.error(Errno::EINVAL);
        }
        match self
            .ns
            .rename(name, newname, bits & libc::RENAME_NOREPLACE != 0)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if write && !node.disk.is_writable() {
            return reply.error(Errno::EROFS);
        }
        node.open.fetch_add(1, Ordering::SeqCst);
        reply.opened(
            FileHandle(if write { FH_WRITE } else { 0 }),
            self.open_flags(flags),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match (self.node(ino), &self.ring) {
            (Ok(node), Some(ring)) if node.asif.is_some() => {
                read_async(&node, ring, offset, size, reply)
            }
            (Ok(node), _) => self.exec(move || do_read(&node, offset, size, reply)),
            (Err(e), _) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if let (Some(ring), Some(_)) = (&self.ring, &node.asif) {
            write_async(&node, ring, offset, data, reply);
        } else if self.pool.is_some() {
            // The request buffer is reused for the next request: the pool needs a copy.
            let data = data.to_vec();
            self.exec(move || do_write(&node, offset, &data, reply));
        } else {
            do_write(&node, offset, data, reply);
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        if fh.0 & FH_WRITE == 0 {
            return reply.ok();
        }
        match self.node(ino) {
            Ok(node) => self.exec(move || match do_flush(&node) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(node) = self.ns.get(ino.0) {
            self.ns.release(&node);
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        match self.node(ino) {
            Ok(node) => self.exec(move || match do_flush(&node) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != ROOT_INO || self.ns.root_is_file() {
            return reply.error(Errno::ENOTDIR);
        }
        self.ns.rescan();
        let mut list = vec![
            (ROOT_INO, FileType::Directory, ".".into()),
            (ROOT_INO, FileType::Directory, "..".into()),
        ];
        list.extend(
            self.ns
                .listing()
                .into_iter()
                .map(|n| (n.ino, FileType::RegularFile, n.name())),
        );
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(list));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(list) = self.dirs.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        let ns = self.ns.clone();
        self.exec(move || {
            let mut r = Ok(());
            for n in ns.listing() {
                if let Err(e) = do_flush(&n) {
                    r = Err(e);
                }
            }
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let dir = match &self.ns.source {
            super::namespace::Source::Dir(d) => d.clone(),
            super::namespace::Source::File { path, .. } => path
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| "/".into()),
        };
        let st = match rustix::fs::statvfs(&dir) {
            Ok(st) => st,
            Err(e) => return reply.error(io_errno(e.into())),
        };
        // Reported in 4 KiB units: loop devices take their discard granularity from f_bsize.
        let scale = |n: u64| n.saturating_mul(st.f_frsize) / 4096;
        reply.statfs(
            scale(st.f_blocks),
            scale(st.f_bfree),
            scale(st.f_bavail),
            st.f_files,
            st.f_ffree,
            4096,
            255,
            4096,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattr_value(ino.0, name) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, &self.xattr_names(ino.0));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.node(ino) {
            Ok(node) => self.exec(move || match do_fallocate(&node, offset, length, mode) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.node(ino) {
            Ok(node) => match do_lseek(&node, offset, whence) {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(e),
        }
    }
}

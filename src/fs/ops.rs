//! The fuser `Filesystem`: decodes each kernel request, calls the
//! [`Volume`] and replies. No logic of its own beyond the FUSE protocol
//! (attribute TTLs, open flags, xattr size probing, readdir cookies) and
//! where a request runs: on fuser's thread, the worker pool, or (ASIF with
//! io_uring) submitted so the ring's thread replies.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::pool::Pool;
use super::volume::{Attr, Kind, Opened, SetAttr, SetTime, Volume};

/// Attribute cache lifetime.
const TTL: Duration = Duration::from_secs(1);
/// Names are not cached: SOURCE may gain, lose or replace images at any time,
/// and a lookup costs one stat.
const ENTRY_TTL: Duration = Duration::ZERO;
pub(crate) const MAX_WRITE: u32 = 1 << 20;

pub(crate) struct AsifFs {
    vol: Arc<Volume>,
    pool: Option<Arc<Pool>>,
    passthrough: Passthrough,
}

/// FUSE passthrough: a disk that is its file byte for byte has its reads
/// and writes handed to the kernel, which does them on the file itself.
#[derive(Default)]
struct Passthrough {
    /// `-o passthrough=off` clears it.
    wanted: bool,
    /// The kernel took the capability at init, and no open has failed.
    on: AtomicBool,
    /// The backing registration of each inode with passthrough handles
    /// open, and how many: the kernel refuses a second, different backing
    /// file for an inode (EBUSY), so every open of it shares one. Dropped
    /// (unregistered) when its last handle is released.
    backing: Mutex<HashMap<u64, (BackingId, u64)>>,
}

/// Marks a passthrough handle; the low bit is the volume's write flag.
const FH_PASSTHROUGH: u64 = 2;

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Directory => FileType::Directory,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn fopen_flags(o: Opened) -> FopenFlags {
    if o.direct_io {
        // Parallel: without it the kernel serialises direct writes on the inode lock.
        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
    } else {
        // Only this process writes the image (exclusive lock): cached pages stay valid.
        FopenFlags::FOPEN_KEEP_CACHE
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), i32>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, i32>) {
    match r {
        Ok(a) => reply.entry_with_ttls(&TTL, &ENTRY_TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_attr(reply: ReplyAttr, r: Result<Attr, i32>) {
    match r {
        Ok(a) => reply.attr(&TTL, &file_attr(&a)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_data(reply: ReplyData, r: Result<&[u8], i32>) {
    match r {
        Ok(d) => reply.data(d),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_written(reply: ReplyWrite, r: Result<u32, i32>) {
    match r {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(errno(e)),
    }
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

impl AsifFs {
    pub fn new(vol: Arc<Volume>, pool: Option<Arc<Pool>>, passthrough: bool) -> AsifFs {
        AsifFs {
            vol,
            pool,
            passthrough: Passthrough {
                wanted: passthrough,
                ..Passthrough::default()
            },
        }
    }

    /// Runs `f` on the worker pool, or right here with fuser's own threads.
    fn exec(&self, f: impl FnOnce(&Volume) + Send + 'static) {
        match &self.pool {
            Some(p) => {
                let vol = self.vol.clone();
                p.submit(Box::new(move || f(&vol)))
            }
            None => f(&self.vol),
        }
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
        if self.passthrough.wanted {
            // Depth 1: the images' files are on an ordinary file system.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if ok {
                info!("FUSE passthrough on for raw disks");
            } else {
                info!("FUSE passthrough off: the kernel does not offer it");
            }
            self.passthrough.on.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.vol.flush_all_logged();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.vol.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.vol.getattr(ino.0));
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
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        reply_attr(reply, self.vol.setattr(ino.0, &set));
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
        reply_entry(reply, self.vol.mknod(parent.0, name, mode));
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
        match self.vol.create(parent.0, name, flags) {
            Ok((a, o)) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(0),
                FileHandle(o.fh),
                fopen_flags(o),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol.unlink(parent.0, name));
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
        let r = self
            .vol
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        reply_empty(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let o = match self.vol.open(ino.0, flags.0) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
        };
        let file = if self.passthrough.on.load(Ordering::Relaxed) {
            self.vol.passthrough_file(ino.0)
        } else {
            None
        };
        let Some(file) = file else {
            return reply.opened(FileHandle(o.fh), fopen_flags(o));
        };
        // Held across the reply, so a release cannot drop the registration
        // this open is being answered with.
        let mut backing = self.passthrough.backing.lock();
        let registered = match backing.remove(&ino.0) {
            Some((id, n)) => Ok((id, n)),
            None => reply.open_backing(&*file).map(|id| (id, 0)),
        };
        match registered {
            Ok((id, n)) => {
                let (id, _) = backing.entry(ino.0).or_insert((id, n + 1));
                reply.opened_passthrough(
                    FileHandle(o.fh | FH_PASSTHROUGH),
                    FopenFlags::empty(),
                    id,
                );
            }
            Err(e) => {
                drop(backing);
                // One refusal (no CAP_SYS_ADMIN, a stacked file system)
                // turns it off for the mount: mixing modes on an inode fails.
                if self.passthrough.on.swap(false, Ordering::Relaxed) {
                    warn!("FUSE passthrough off: registering a backing file failed: {e}");
                }
                reply.opened(FileHandle(o.fh), fopen_flags(o));
            }
        }
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
        let node = match self.vol.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(e)),
        };
        if self.vol.is_async(&node) {
            // Submitted here; the ring's thread replies.
            self.vol
                .read_async(&node, offset, size, move |r| reply_data(reply, r));
        } else {
            self.exec(move |vol| vol.read(&node, offset, size, |r| reply_data(reply, r)));
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
        let node = match self.vol.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(e)),
        };
        if self.vol.is_async(&node) {
            self.vol
                .write_async(&node, offset, data, move |r| reply_written(reply, r));
        } else if self.pool.is_some() {
            // The request buffer is reused for the next request: the pool needs a copy.
            let data = data.to_vec();
            self.exec(move |vol| reply_written(reply, vol.write(&node, offset, &data)));
        } else {
            reply_written(reply, self.vol.write(&node, offset, data));
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
        if !Volume::flushes(fh.0) {
            return reply.ok();
        }
        match self.vol.node(ino.0) {
            Ok(node) => self.exec(move |vol| reply_empty(reply, vol.flush(&node, fh.0))),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 & FH_PASSTHROUGH != 0 {
            let mut backing = self.passthrough.backing.lock();
            if let Some((_, n)) = backing.get_mut(&ino.0) {
                *n -= 1;
                if *n == 0 {
                    backing.remove(&ino.0);
                }
            }
        }
        self.vol.release(ino.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        match self.vol.node(ino.0) {
            Ok(node) => self.exec(move |vol| reply_empty(reply, vol.fsync(&node))),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.vol.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.vol.readdir(fh.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        // An entry's cookie is its index plus one: where the next call resumes.
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, kind(e.kind), &e.name) {
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
        self.vol.releasedir(fh.0);
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
        self.exec(move |vol| reply_empty(reply, vol.fsync_all()));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.vol.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
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
        match self.vol.getxattr(ino.0, name) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, &self.vol.listxattr(ino.0));
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
        match self.vol.node(ino.0) {
            Ok(node) => self.exec(move |vol| {
                reply_empty(reply, vol.fallocate(&node, offset, length, mode));
            }),
            Err(e) => reply.error(errno(e)),
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
        let r = self
            .vol
            .node(ino.0)
            .and_then(|node| self.vol.lseek(&node, offset, whence));
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opened_and_attr_convert_to_fusers_types() {
        let direct = fopen_flags(Opened {
            fh: 1,
            direct_io: true,
        });
        assert_eq!(
            direct,
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        );
        let cached = fopen_flags(Opened {
            fh: 0,
            direct_io: false,
        });
        assert_eq!(cached, FopenFlags::FOPEN_KEEP_CACHE);
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = Attr {
            ino: 7,
            kind: Kind::File,
            size: 1 << 30,
            blocks: 4096,
            atime: t,
            mtime: t + Duration::from_secs(1),
            ctime: t + Duration::from_secs(2),
            perm: 0o640,
            nlink: 1,
            uid: 1000,
            gid: 100,
        };
        let f = file_attr(&a);
        assert_eq!(f.ino, INodeNo(7));
        assert_eq!((f.size, f.blocks, f.blksize), (1 << 30, 4096, 4096));
        assert_eq!(f.kind, FileType::RegularFile);
        assert_eq!((f.mtime, f.ctime, f.crtime), (a.mtime, a.ctime, a.ctime));
        assert_eq!((f.perm, f.nlink, f.uid, f.gid), (0o640, 1, 1000, 100));
        assert_eq!(kind(Kind::Directory), FileType::Directory);
    }
}

//! One request in, one reply out: decodes a request of the FUSE wire
//! format, calls the [`Volume`] and encodes its answer. Used by both of
//! this transport's paths (the ring and `/dev/fuse`); no threads, no I/O
//! of its own beyond the volume's and the passthrough registration.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tracing::{debug, warn};

use super::abi::{self, fattr, op, Fields, InHeader};
use crate::fs::volume::{Attr, Kind, Opened, SetAttr, SetTime, Volume};

/// Attributes are cached a second; names not at all (SOURCE may change).
const ATTR_TTL: (u64, u32) = (1, 0);
const ENTRY_TTL: (u64, u32) = (0, 0);
/// Marks a passthrough handle; the low bit is the volume's write flag.
const FH_PASSTHROUGH: u64 = 2;

/// What a request comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success; the output is in the buffer.
    Reply,
    /// A libc errno.
    Error(i32),
    /// The kernel expects no reply (forget, interrupt).
    None,
}

/// Who besides the mounting user may use the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The kernel keeps everybody else out (no `allow_other`).
    Owner,
    /// `allow_root`: the kernel lets everyone in; root and the owner pass here.
    RootAndOwner,
    All,
}

/// A backing file registered with the kernel for passthrough, closed
/// when its last handle is released.
struct Backing {
    id: i32,
    dev: Arc<OwnedFd>,
}

impl Drop for Backing {
    fn drop(&mut self) {
        let id = self.id as u32;
        // SAFETY: the ioctl reads one u32 that lives across the call.
        unsafe { libc::ioctl(self.dev.as_raw_fd(), abi::DEV_IOC_BACKING_CLOSE as _, &id) };
    }
}

/// The transport-neutral state a request needs beside the volume.
pub struct Session {
    pub vol: Arc<Volume>,
    dev: Arc<OwnedFd>,
    access: Access,
    owner: u32,
    /// Passthrough granted at INIT and not yet refused by the kernel.
    passthrough: AtomicBool,
    /// One registration per inode, shared by its passthrough handles (the
    /// kernel refuses a second backing file for an inode).
    backing: Mutex<HashMap<u64, (Backing, u64)>>,
}

impl Session {
    pub fn new(vol: Arc<Volume>, dev: Arc<OwnedFd>, access: Access) -> Session {
        Session {
            vol,
            dev,
            access,
            // SAFETY: getuid cannot fail.
            owner: unsafe { libc::getuid() },
            passthrough: AtomicBool::new(false),
            backing: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    /// Registers `file` as an inode's backing file.
    fn backing_open(&self, file: &std::fs::File) -> std::io::Result<Backing> {
        // struct fuse_backing_map { i32 fd; u32 flags; u64 padding; }
        let mut map = [0u8; 16];
        map[0..4].copy_from_slice(&file.as_raw_fd().to_le_bytes());
        // SAFETY: the ioctl reads the 16-byte map, which lives across the call.
        let id = unsafe {
            libc::ioctl(
                self.dev.as_raw_fd(),
                abi::DEV_IOC_BACKING_OPEN as _,
                map.as_ptr(),
            )
        };
        if id < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Backing {
            id,
            dev: self.dev.clone(),
        })
    }

    /// The backing id for a passthrough open of `ino`, if it gets one.
    fn passthrough_open(&self, ino: u64) -> Option<i32> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let file = self.vol.passthrough_file(ino)?;
        let mut backing = self.backing.lock();
        if let Some((b, n)) = backing.get_mut(&ino) {
            *n += 1;
            return Some(b.id);
        }
        match self.backing_open(&file) {
            Ok(b) => {
                let id = b.id;
                backing.insert(ino, (b, 1));
                Some(id)
            }
            Err(e) => {
                // One refusal (no CAP_SYS_ADMIN, a stacked file system)
                // turns it off: mixing modes on an inode fails.
                if self.passthrough.swap(false, Ordering::Relaxed) {
                    warn!("FUSE passthrough off: registering a backing file failed: {e}");
                }
                None
            }
        }
    }

    fn passthrough_release(&self, ino: u64, fh: u64) {
        if fh & FH_PASSTHROUGH == 0 {
            return;
        }
        let mut backing = self.backing.lock();
        if let Some((_, n)) = backing.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                backing.remove(&ino);
            }
        }
    }

    fn allowed(&self, h: &InHeader) -> bool {
        match self.access {
            Access::Owner | Access::All => true,
            Access::RootAndOwner => h.uid == 0 || h.uid == self.owner,
        }
    }
}

/// The NUL-terminated name a request's tail starts with.
fn name(b: &[u8]) -> Option<&OsStr> {
    abi::name(b).map(|(n, _)| OsStr::from_bytes(n))
}

fn wire_attr(a: &Attr) -> abi::Attr {
    let kind = match a.kind {
        Kind::File => libc::S_IFREG,
        Kind::Directory => libc::S_IFDIR,
    };
    abi::Attr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime: abi::time(a.atime),
        mtime: abi::time(a.mtime),
        ctime: abi::time(a.ctime),
        mode: kind | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        blksize: 4096,
    }
}

pub fn fopen_flags(o: Opened) -> u32 {
    if o.direct_io {
        // Parallel: without it the kernel serialises direct writes on the inode lock.
        abi::FOPEN_DIRECT_IO | abi::FOPEN_PARALLEL_DIRECT_WRITES
    } else {
        // Only this process writes the image (exclusive lock): cached pages stay valid.
        abi::FOPEN_KEEP_CACHE
    }
}

fn done(r: Result<(), i32>) -> Outcome {
    match r {
        Ok(()) => Outcome::Reply,
        Err(e) => Outcome::Error(e),
    }
}

fn entry(out: &mut Vec<u8>, r: Result<Attr, i32>) -> Outcome {
    match r {
        Ok(a) => {
            abi::entry_out(out, &wire_attr(&a), ENTRY_TTL, ATTR_TTL);
            Outcome::Reply
        }
        Err(e) => Outcome::Error(e),
    }
}

fn attr(out: &mut Vec<u8>, r: Result<Attr, i32>) -> Outcome {
    match r {
        Ok(a) => {
            abi::attr_out(out, &wire_attr(&a), ATTR_TTL);
            Outcome::Reply
        }
        Err(e) => Outcome::Error(e),
    }
}

/// An xattr answer: its size when asked with size 0, else the value.
fn xattr(out: &mut Vec<u8>, size: u32, value: &[u8]) -> Outcome {
    if size == 0 {
        abi::put32(out, value.len() as u32);
        abi::put32(out, 0);
    } else if (size as usize) < value.len() {
        return Outcome::Error(libc::ERANGE);
    } else {
        out.extend_from_slice(value);
    }
    Outcome::Reply
}

fn set_time(valid: u32, set: u32, now: u32, secs: u64, nsecs: u32) -> Option<SetTime> {
    if valid & now != 0 {
        Some(SetTime::Now)
    } else if valid & set != 0 {
        Some(SetTime::At(
            std::time::UNIX_EPOCH + std::time::Duration::new(secs, nsecs),
        ))
    } else {
        None
    }
}

/// Answers one request: `arg` is the opcode's fixed argument, `tail`
/// what follows it; the output goes into `out` (empty on entry).
pub fn dispatch(s: &Session, h: &InHeader, arg: &[u8], tail: &[u8], out: &mut Vec<u8>) -> Outcome {
    let vol = &*s.vol;
    let a = Fields(arg);
    if matches!(h.opcode, op::FORGET | op::BATCH_FORGET | op::INTERRUPT) {
        // Inode numbers are stable (no lookup counts); an interrupted
        // request still completes, as the kernel allows.
        return Outcome::None;
    }
    if !s.allowed(h) {
        return Outcome::Error(libc::EACCES);
    }
    if arg.len() < abi::op_in_size(h.opcode) {
        debug!("opcode {}: argument of {} bytes", h.opcode, arg.len());
        return Outcome::Error(libc::EINVAL);
    }
    let node = || vol.node(h.nodeid);
    match h.opcode {
        op::LOOKUP => match name(tail) {
            Some(n) => entry(out, vol.lookup(h.nodeid, n)),
            None => Outcome::Error(libc::EINVAL),
        },
        op::GETATTR => attr(out, vol.getattr(h.nodeid)),
        op::SETATTR => {
            let valid = a.u32(0);
            let set = SetAttr {
                mode: (valid & fattr::MODE != 0).then(|| a.u32(68)),
                uid: (valid & fattr::UID != 0).then(|| a.u32(76)),
                gid: (valid & fattr::GID != 0).then(|| a.u32(80)),
                size: (valid & fattr::SIZE != 0).then(|| a.u64(16)),
                atime: set_time(valid, fattr::ATIME, fattr::ATIME_NOW, a.u64(32), a.u32(56)),
                mtime: set_time(valid, fattr::MTIME, fattr::MTIME_NOW, a.u64(40), a.u32(60)),
            };
            attr(out, vol.setattr(h.nodeid, &set))
        }
        op::MKNOD => match name(tail) {
            Some(n) => entry(out, vol.mknod(h.nodeid, n, a.u32(0))),
            None => Outcome::Error(libc::EINVAL),
        },
        op::CREATE => {
            let Some(n) = name(tail) else {
                return Outcome::Error(libc::EINVAL);
            };
            match vol.create(h.nodeid, n, a.u32(0) as i32) {
                Ok((at, o)) => {
                    abi::entry_out(out, &wire_attr(&at), ENTRY_TTL, ATTR_TTL);
                    abi::open_out(out, o.fh, fopen_flags(o), 0);
                    Outcome::Reply
                }
                Err(e) => Outcome::Error(e),
            }
        }
        op::UNLINK => match name(tail) {
            Some(n) => done(vol.unlink(h.nodeid, n)),
            None => Outcome::Error(libc::EINVAL),
        },
        op::RENAME | op::RENAME2 => {
            let flags = if h.opcode == op::RENAME2 { a.u32(8) } else { 0 };
            match abi::name(tail).and_then(|(old, rest)| Some((old, abi::name(rest)?.0))) {
                Some((old, new)) => done(vol.rename(
                    h.nodeid,
                    OsStr::from_bytes(old),
                    a.u64(0),
                    OsStr::from_bytes(new),
                    flags,
                )),
                None => Outcome::Error(libc::EINVAL),
            }
        }
        op::OPEN => {
            let o = match vol.open(h.nodeid, a.u32(0) as i32) {
                Ok(o) => o,
                Err(e) => return Outcome::Error(e),
            };
            match s.passthrough_open(h.nodeid) {
                Some(id) => abi::open_out(out, o.fh | FH_PASSTHROUGH, abi::FOPEN_PASSTHROUGH, id),
                None => abi::open_out(out, o.fh, fopen_flags(o), 0),
            }
            Outcome::Reply
        }
        op::READ => {
            let node = match node() {
                Ok(n) => n,
                Err(e) => return Outcome::Error(e),
            };
            vol.read(&node, a.u64(8), a.u32(16), |r| match r {
                Ok(d) => {
                    out.extend_from_slice(d);
                    Outcome::Reply
                }
                Err(e) => Outcome::Error(e),
            })
        }
        op::WRITE => {
            let size = a.u32(16) as usize;
            let Some(data) = tail.get(..size) else {
                return Outcome::Error(libc::EINVAL);
            };
            match node().and_then(|n| vol.write(&n, a.u64(8), data)) {
                Ok(n) => {
                    abi::put32(out, n);
                    abi::put32(out, 0);
                    Outcome::Reply
                }
                Err(e) => Outcome::Error(e),
            }
        }
        op::STATFS => match vol.statfs() {
            Ok(st) => {
                for v in [st.blocks, st.bfree, st.bavail, st.files, st.ffree] {
                    abi::put64(out, v);
                }
                for v in [st.bsize, st.namelen, st.frsize] {
                    abi::put32(out, v);
                }
                out.resize(80, 0);
                Outcome::Reply
            }
            Err(e) => Outcome::Error(e),
        },
        op::RELEASE => {
            s.passthrough_release(h.nodeid, a.u64(0));
            vol.release(h.nodeid);
            Outcome::Reply
        }
        op::FLUSH => {
            let fh = a.u64(0);
            if !Volume::flushes(fh) {
                return Outcome::Reply;
            }
            done(node().and_then(|n| vol.flush(&n, fh)))
        }
        op::FSYNC => done(node().and_then(|n| vol.fsync(&n))),
        op::OPENDIR => match vol.opendir(h.nodeid) {
            Ok(fh) => {
                abi::open_out(out, fh, 0, 0);
                Outcome::Reply
            }
            Err(e) => Outcome::Error(e),
        },
        op::READDIR => {
            let list = match vol.readdir(a.u64(0)) {
                Ok(l) => l,
                Err(e) => return Outcome::Error(e),
            };
            let limit = a.u32(16) as usize;
            // An entry's cookie is its index plus one: where the next call resumes.
            for (i, e) in list.iter().enumerate().skip(a.u64(8) as usize) {
                let dtype = match e.kind {
                    Kind::File => libc::DT_REG,
                    Kind::Directory => libc::DT_DIR,
                };
                if !abi::dirent(
                    out,
                    limit,
                    e.ino,
                    i as u64 + 1,
                    u32::from(dtype),
                    e.name.as_bytes(),
                ) {
                    break;
                }
            }
            Outcome::Reply
        }
        op::RELEASEDIR => {
            vol.releasedir(a.u64(0));
            Outcome::Reply
        }
        op::FSYNCDIR => done(vol.fsync_all()),
        op::GETXATTR => match name(tail) {
            Some(n) => match vol.getxattr(h.nodeid, n) {
                Ok(v) => xattr(out, a.u32(0), &v),
                Err(e) => Outcome::Error(e),
            },
            None => Outcome::Error(libc::EINVAL),
        },
        op::LISTXATTR => {
            let v = vol.listxattr(h.nodeid);
            xattr(out, a.u32(0), &v)
        }
        op::SETXATTR | op::REMOVEXATTR => Outcome::Error(libc::EOPNOTSUPP),
        op::ACCESS => Outcome::Reply,
        op::FALLOCATE => {
            done(node().and_then(|n| vol.fallocate(&n, a.u64(8), a.u64(16), a.u32(24) as i32)))
        }
        op::LSEEK => match node().and_then(|n| vol.lseek(&n, a.u64(8) as i64, a.u32(16) as i32)) {
            Ok(o) => {
                abi::put64(out, o as u64);
                Outcome::Reply
            }
            Err(e) => Outcome::Error(e),
        },
        op::DESTROY => {
            vol.flush_all_logged();
            Outcome::Reply
        }
        // The kernel falls back by itself for everything else (links,
        // locks, ioctl, copy_file_range, statx, syncfs).
        _ => Outcome::Error(libc::ENOSYS),
    }
}

#[cfg(test)]
mod tests {
    //! Requests as the kernel encodes them, answered by a real volume over
    //! a SOURCE directory: the exact bytes a transport would send back.
    use super::*;
    use crate::fs::namespace::{Namespace, Source, ROOT_INO};
    use crate::fs::DirectIo;
    use crate::{CacheMode, CreateOptions, Image};

    const SIZE: u64 = 8 << 20;

    fn session(dir: &std::path::Path, access: Access) -> Session {
        let opts = CreateOptions {
            size: SIZE,
            ..CreateOptions::default()
        };
        Image::create(dir.join("a.asif"), &opts).unwrap();
        let ns = Namespace::new(
            Source::Dir(dir.to_path_buf()),
            true,
            1,
            CacheMode::Writeback,
        );
        ns.rescan();
        let md = std::fs::metadata(dir).unwrap();
        let vol = Arc::new(Volume::new(Arc::new(ns), None, DirectIo::Auto, md));
        let null = std::fs::File::open("/dev/null").unwrap();
        Session::new(vol, Arc::new(OwnedFd::from(null)), access)
    }

    fn header(opcode: u32, nodeid: u64, uid: u32) -> InHeader {
        InHeader {
            len: 0,
            opcode,
            unique: 7,
            nodeid,
            uid,
            gid: 0,
            pid: 1,
        }
    }

    fn call(s: &Session, opcode: u32, nodeid: u64, arg: &[u8], tail: &[u8]) -> (Outcome, Vec<u8>) {
        let mut out = Vec::new();
        let o = dispatch(s, &header(opcode, nodeid, 0), arg, tail, &mut out);
        (o, out)
    }

    /// fuse_read_in / fuse_write_in: fh, offset, size, then zeros.
    fn rw_in(offset: u64, size: u32) -> Vec<u8> {
        let mut v = Vec::new();
        abi::put64(&mut v, 0);
        abi::put64(&mut v, offset);
        abi::put32(&mut v, size);
        v.resize(40, 0);
        v
    }

    fn lookup_ino(s: &Session) -> u64 {
        let (o, out) = call(s, op::LOOKUP, ROOT_INO, &[], b"a.img\0");
        assert_eq!(o, Outcome::Reply);
        assert_eq!(out.len(), 128);
        Fields(&out).u64(0)
    }

    #[test]
    fn lookup_and_getattr_answer_the_kernels_structures() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path(), Access::Owner);
        let ino = lookup_ino(&s);
        let (o, out) = call(&s, op::LOOKUP, ROOT_INO, &[], b"a.img\0");
        assert_eq!(o, Outcome::Reply);
        let f = Fields(&out);
        // entry_valid 0 s, attr_valid 1 s, then the attributes.
        assert_eq!((f.u64(16), f.u64(24)), (0, 1));
        assert_eq!(f.u64(40), ino);
        assert_eq!(f.u64(48), SIZE);
        assert_eq!(f.u32(40 + 60) & libc::S_IFMT, libc::S_IFREG);
        let mut arg = vec![0u8; 16];
        arg[0] = 0;
        let (o, out) = call(&s, op::GETATTR, ino, &arg, &[]);
        assert_eq!(o, Outcome::Reply);
        assert_eq!(out.len(), 104);
        assert_eq!(Fields(&out).u64(16 + 8), SIZE);
        assert_eq!(
            call(&s, op::LOOKUP, ROOT_INO, &[], b"nope.img\0").0,
            Outcome::Error(libc::ENOENT)
        );
        assert_eq!(
            call(&s, op::LOOKUP, ROOT_INO, &[], b"no-nul").0,
            Outcome::Error(libc::EINVAL)
        );
        let (o, out) = call(&s, op::GETATTR, ROOT_INO, &arg, &[]);
        assert_eq!(o, Outcome::Reply);
        assert_eq!(Fields(&out).u32(16 + 60) & libc::S_IFMT, libc::S_IFDIR);
    }

    #[test]
    fn written_bytes_read_back_and_short_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path(), Access::Owner);
        let ino = lookup_ino(&s);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let (o, out) = call(
            &s,
            op::WRITE,
            ino,
            &rw_in(4096 * 3 + 5, data.len() as u32),
            &data,
        );
        assert_eq!(o, Outcome::Reply);
        assert_eq!(out, [16, 39, 0, 0, 0, 0, 0, 0]);
        let (o, out) = call(&s, op::READ, ino, &rw_in(4096 * 3 + 5, 10_000), &[]);
        assert_eq!(o, Outcome::Reply);
        assert_eq!(out, data);
        let (_, out) = call(&s, op::READ, ino, &rw_in(SIZE - 100, 4096), &[]);
        assert_eq!(out.len(), 100);
        let (o, out) = call(&s, op::READ, ino, &rw_in(SIZE, 4096), &[]);
        assert_eq!((o, out.len()), (Outcome::Reply, 0));
        // A write whose data is shorter than it says is refused.
        assert_eq!(
            call(&s, op::WRITE, ino, &rw_in(0, 100), &[1; 50]).0,
            Outcome::Error(libc::EINVAL)
        );
        // A truncated argument is refused, not read as zeros.
        assert_eq!(
            call(&s, op::READ, ino, &rw_in(0, 10)[..20], &[]).0,
            Outcome::Error(libc::EINVAL)
        );
    }

    #[test]
    fn setattr_lseek_and_fallocate_reach_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path(), Access::Owner);
        let ino = lookup_ino(&s);
        let mut set = vec![0u8; 88];
        set[0..4].copy_from_slice(&fattr::SIZE.to_le_bytes());
        set[16..24].copy_from_slice(&(SIZE * 2).to_le_bytes());
        let (o, out) = call(&s, op::SETATTR, ino, &set, &[]);
        assert_eq!(o, Outcome::Reply);
        assert_eq!(Fields(&out).u64(16 + 8), SIZE * 2);
        call(&s, op::WRITE, ino, &rw_in(1 << 20, 4096), &[9; 4096]);
        let mut seek = vec![0u8; 24];
        seek[16..20].copy_from_slice(&(libc::SEEK_DATA as u32).to_le_bytes());
        let (o, out) = call(&s, op::LSEEK, ino, &seek, &[]);
        assert_eq!(o, Outcome::Reply);
        assert_eq!(Fields(&out).u64(0), 1 << 20);
        let mut fa = vec![0u8; 32];
        fa[8..16].copy_from_slice(&(1u64 << 20).to_le_bytes());
        fa[16..24].copy_from_slice(&4096u64.to_le_bytes());
        let mode = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32;
        fa[24..28].copy_from_slice(&mode.to_le_bytes());
        assert_eq!(call(&s, op::FALLOCATE, ino, &fa, &[]).0, Outcome::Reply);
        let (_, out) = call(&s, op::READ, ino, &rw_in(1 << 20, 4096), &[]);
        assert_eq!(out, vec![0; 4096]);
        // Never ENOSYS for these: the kernel would stop asking.
        fa[24..28].copy_from_slice(&0x40u32.to_le_bytes());
        assert_eq!(
            call(&s, op::FALLOCATE, ino, &fa, &[]).0,
            Outcome::Error(libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn readdir_resumes_at_its_cookie_and_stops_at_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path(), Access::Owner);
        let (o, out) = call(&s, op::OPENDIR, ROOT_INO, &[0; 8], &[]);
        assert_eq!(o, Outcome::Reply);
        let fh = Fields(&out).u64(0);
        let mut rd = rw_in(0, 4096);
        rd[0..8].copy_from_slice(&fh.to_le_bytes());
        let (_, out) = call(&s, op::READDIR, ROOT_INO, &rd, &[]);
        let names: Vec<&[u8]> = {
            let mut v = Vec::new();
            let mut at = 0;
            while at < out.len() {
                let f = Fields(&out[at..]);
                let n = f.u32(16) as usize;
                v.push(&out[at + 24..at + 24 + n]);
                at += (24 + n).next_multiple_of(8);
            }
            v
        };
        assert_eq!(names, [&b"."[..], b"..", b"a.img"]);
        rd[8..16].copy_from_slice(&2u64.to_le_bytes());
        let (_, out) = call(&s, op::READDIR, ROOT_INO, &rd, &[]);
        assert_eq!(&out[24..29], b"a.img");
        rd[16..20].copy_from_slice(&20u32.to_le_bytes());
        rd[8..16].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            call(&s, op::READDIR, ROOT_INO, &rd, &[]),
            (Outcome::Reply, vec![])
        );
    }

    #[test]
    fn xattr_size_probe_then_value_and_erange() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path(), Access::Owner);
        let ino = lookup_ino(&s);
        let (o, out) = call(&s, op::GETXATTR, ino, &[0; 8], b"user.asiffs.stats\0");
        assert_eq!(o, Outcome::Reply);
        let size = Fields(&out).u32(0);
        assert!(size > 10);
        let (_, value) = call(
            &s,
            op::GETXATTR,
            ino,
            &size.to_le_bytes().repeat(2),
            b"user.asiffs.stats\0",
        );
        let v: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(v["format"], "asif");
        assert_eq!(v["transport"], "classic");
        assert_eq!(
            call(
                &s,
                op::GETXATTR,
                ino,
                &[1, 0, 0, 0, 0, 0, 0, 0],
                b"user.asiffs.stats\0"
            )
            .0,
            Outcome::Error(libc::ERANGE)
        );
        assert_eq!(
            call(&s, op::GETXATTR, ino, &[0; 8], b"user.other\0").0,
            Outcome::Error(libc::ENODATA)
        );
    }

    #[test]
    fn forget_and_interrupt_get_no_reply_and_allow_root_keeps_others_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path(), Access::RootAndOwner);
        for opcode in [op::FORGET, op::BATCH_FORGET, op::INTERRUPT] {
            assert_eq!(call(&s, opcode, ROOT_INO, &[0; 8], &[]).0, Outcome::None);
        }
        let mut out = Vec::new();
        let stranger = header(op::GETATTR, ROOT_INO, 4321);
        assert_eq!(
            dispatch(&s, &stranger, &[0; 16], &[], &mut out),
            Outcome::Error(libc::EACCES)
        );
        assert_eq!(
            call(&s, 9999, ROOT_INO, &[], &[]).0,
            Outcome::Error(libc::ENOSYS)
        );
    }
}

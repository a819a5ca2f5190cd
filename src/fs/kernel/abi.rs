//! The kernel's FUSE wire format (`include/uapi/linux/fuse.h`, protocol
//! 7.42): opcodes, flags and the fixed-size structures, decoded from and
//! encoded into byte slices. Pure: no I/O, all little-endian (the only
//! byte order the kernel speaks on x86-64 and aarch64).
//!
//! A request is a 40-byte [`InHeader`], an opcode's own fixed-size
//! argument ([`op_in_size`]) and a variable tail (names, write data).
//! Over `/dev/fuse` the three are contiguous; over the ring the header
//! and argument sit in the entry's header buffer and the tail in its
//! payload buffer. A reply is a 16-byte out header and the opcode's
//! output; the kernel refuses an output of any other size than it expects.

use std::time::{SystemTime, UNIX_EPOCH};

pub const KERNEL_VERSION: u32 = 7;
/// The minor version asiffs speaks: the ring's (7.42).
pub const KERNEL_MINOR: u32 = 42;

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const MKNOD: u32 = 8;
    pub const UNLINK: u32 = 10;
    pub const RENAME: u32 = 12;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
}

/// INIT flags (the high 32 bits travel in `flags2`).
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const OVER_IO_URING: u64 = 1 << 41;
}

pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// setattr's `valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `ioctl(/dev/fuse, FUSE_DEV_IOC_BACKING_OPEN, &fuse_backing_map)`:
/// `_IOW(229, 1, 16 bytes)`.
pub const DEV_IOC_BACKING_OPEN: u64 = (1 << 30) | (16 << 16) | (229 << 8) | 1;
/// `_IOW(229, 2, u32)`.
pub const DEV_IOC_BACKING_CLOSE: u64 = (1 << 30) | (4 << 16) | (229 << 8) | 2;

/// The ring's commands (`IORING_OP_URING_CMD`'s `cmd_op`).
pub const URING_CMD_REGISTER: u32 = 1;
pub const URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// An entry's header buffer: the in/out header area, the opcode's argument
/// area and the entry's own in/out record.
pub const URING_IN_OUT: usize = 128;
pub const URING_OP_IN: usize = 128;
pub const URING_HEADERS: usize = URING_IN_OUT + URING_OP_IN + 32;
/// Offsets in the entry record: the commit id and the payload's size.
pub const URING_COMMIT_ID: usize = URING_IN_OUT + URING_OP_IN + 8;
pub const URING_PAYLOAD_SZ: usize = URING_IN_OUT + URING_OP_IN + 16;

/// The size of an opcode's fixed argument, the bytes before its tail.
pub fn op_in_size(opcode: u32) -> usize {
    match opcode {
        op::GETATTR | op::MKNOD | op::CREATE | op::RENAME2 | op::FSYNC | op::FSYNCDIR => 16,
        op::SETATTR => 88,
        op::RENAME
        | op::OPEN
        | op::OPENDIR
        | op::GETXATTR
        | op::LISTXATTR
        | op::SETXATTR
        | op::ACCESS
        | op::FORGET
        | op::BATCH_FORGET
        | op::INTERRUPT => 8,
        op::READ | op::WRITE | op::READDIR => 40,
        op::RELEASE | op::RELEASEDIR | op::FLUSH | op::LSEEK => 24,
        op::FALLOCATE => 32,
        op::INIT => 64,
        _ => 0,
    }
}

/// Little-endian fields out of a byte slice; short input reads as zeros
/// (the caller checks sizes first where it matters).
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    #[cfg(test)]
    pub fn u16(&self, at: usize) -> u16 {
        let mut b = [0; 2];
        if let Some(s) = self.0.get(at..at + 2) {
            b.copy_from_slice(s);
        }
        u16::from_le_bytes(b)
    }
    pub fn u32(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        if let Some(s) = self.0.get(at..at + 4) {
            b.copy_from_slice(s);
        }
        u32::from_le_bytes(b)
    }
    pub fn u64(&self, at: usize) -> u64 {
        let mut b = [0; 8];
        if let Some(s) = self.0.get(at..at + 8) {
            b.copy_from_slice(s);
        }
        u64::from_le_bytes(b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < IN_HEADER {
            return None;
        }
        let f = Fields(b);
        Some(InHeader {
            len: f.u32(0),
            opcode: f.u32(4),
            unique: f.u64(8),
            nodeid: f.u64(16),
            uid: f.u32(24),
            gid: f.u32(28),
            pid: f.u32(32),
        })
    }

    #[cfg(test)]
    pub fn encode(&self) -> [u8; IN_HEADER] {
        let mut b = [0u8; IN_HEADER];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..8].copy_from_slice(&self.opcode.to_le_bytes());
        b[8..16].copy_from_slice(&self.unique.to_le_bytes());
        b[16..24].copy_from_slice(&self.nodeid.to_le_bytes());
        b[24..28].copy_from_slice(&self.uid.to_le_bytes());
        b[28..32].copy_from_slice(&self.gid.to_le_bytes());
        b[32..36].copy_from_slice(&self.pid.to_le_bytes());
        b
    }
}

/// The out header: `len` counts the header too; `error` is a negated errno.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut b = [0u8; OUT_HEADER];
    b[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    b[4..8].copy_from_slice(&(-error).to_le_bytes());
    b[8..16].copy_from_slice(&unique.to_le_bytes());
    b
}

/// The INIT request's fields asiffs reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags` and, with `INIT_EXT`, `flags2` as the high half.
    pub flags: u64,
}

impl InitIn {
    pub fn parse(b: &[u8]) -> InitIn {
        let f = Fields(b);
        let low = u64::from(f.u32(12));
        let high = if low & init::INIT_EXT != 0 {
            u64::from(f.u32(16))
        } else {
            0
        };
        InitIn {
            major: f.u32(0),
            minor: f.u32(4),
            max_readahead: f.u32(8),
            flags: low | (high << 32),
        }
    }
}

/// The INIT reply (64 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
}

impl InitOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, KERNEL_VERSION);
        put32(out, self.minor);
        put32(out, self.max_readahead);
        put32(out, self.flags as u32 | init::INIT_EXT as u32);
        put16(out, self.max_background);
        put16(out, self.congestion_threshold);
        put32(out, self.max_write);
        put32(out, 1); // time_gran: nanoseconds
        put16(out, self.max_pages);
        put16(out, 0); // map_alignment
        put32(out, (self.flags >> 32) as u32);
        put32(out, self.max_stack_depth);
        out.extend_from_slice(&[0; 24]); // request_timeout, unused
    }
}

pub fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A file's attributes as `struct fuse_attr` (88 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (u64, u32),
    pub mtime: (u64, u32),
    pub ctime: (u64, u32),
    /// Type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// Seconds and nanoseconds since the epoch; times before it are the epoch.
pub fn time(t: SystemTime) -> (u64, u32) {
    t.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs(), d.subsec_nanos()))
        .unwrap_or((0, 0))
}

impl Attr {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put64(out, self.ino);
        put64(out, self.size);
        put64(out, self.blocks);
        put64(out, self.atime.0);
        put64(out, self.mtime.0);
        put64(out, self.ctime.0);
        put32(out, self.atime.1);
        put32(out, self.mtime.1);
        put32(out, self.ctime.1);
        put32(out, self.mode);
        put32(out, self.nlink);
        put32(out, self.uid);
        put32(out, self.gid);
        put32(out, 0); // rdev
        put32(out, self.blksize);
        put32(out, 0); // flags
    }
}

/// `fuse_entry_out` (128 bytes): a lookup's answer.
pub fn entry_out(out: &mut Vec<u8>, a: &Attr, entry_ttl: (u64, u32), attr_ttl: (u64, u32)) {
    put64(out, a.ino);
    put64(out, 0); // generation
    put64(out, entry_ttl.0);
    put64(out, attr_ttl.0);
    put32(out, entry_ttl.1);
    put32(out, attr_ttl.1);
    a.encode(out);
}

/// `fuse_attr_out` (104 bytes).
pub fn attr_out(out: &mut Vec<u8>, a: &Attr, ttl: (u64, u32)) {
    put64(out, ttl.0);
    put32(out, ttl.1);
    put32(out, 0);
    a.encode(out);
}

/// `fuse_open_out` (16 bytes).
pub fn open_out(out: &mut Vec<u8>, fh: u64, flags: u32, backing_id: i32) {
    put64(out, fh);
    put32(out, flags);
    out.extend_from_slice(&backing_id.to_le_bytes());
}

/// One `fuse_dirent`, padded to 8 bytes; `false` (and nothing written)
/// when it would take `out` past `limit`.
pub fn dirent(
    out: &mut Vec<u8>,
    limit: usize,
    ino: u64,
    next: u64,
    dtype: u32,
    name: &[u8],
) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if out.len() + len > limit {
        return false;
    }
    put64(out, ino);
    put64(out, next);
    put32(out, name.len() as u32);
    put32(out, dtype);
    out.extend_from_slice(name);
    out.resize(out.len() + (len - 24 - name.len()), 0);
    true
}

/// The NUL-terminated name at the start of `b`, and what follows it.
pub fn name(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_structures_have_the_kernels_sizes() {
        let a = Attr::default();
        let mut v = Vec::new();
        a.encode(&mut v);
        assert_eq!(v.len(), 88);
        v.clear();
        entry_out(&mut v, &a, (0, 0), (1, 0));
        assert_eq!(v.len(), 128);
        v.clear();
        attr_out(&mut v, &a, (1, 0));
        assert_eq!(v.len(), 104);
        v.clear();
        open_out(&mut v, 7, FOPEN_DIRECT_IO, 0);
        assert_eq!(v.len(), 16);
        v.clear();
        InitOut::default().encode(&mut v);
        assert_eq!(v.len(), 64);
        assert_eq!(URING_HEADERS, 288);
    }

    #[test]
    fn init_flags_take_flags2_only_with_init_ext() {
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(&7u32.to_le_bytes());
        b[4..8].copy_from_slice(&44u32.to_le_bytes());
        b[12..16].copy_from_slice(&((init::INIT_EXT | init::ASYNC_READ) as u32).to_le_bytes());
        b[16..20].copy_from_slice(&((init::OVER_IO_URING >> 32) as u32).to_le_bytes());
        let i = InitIn::parse(&b);
        assert_eq!((i.major, i.minor), (7, 44));
        assert_eq!(
            i.flags,
            init::INIT_EXT | init::ASYNC_READ | init::OVER_IO_URING
        );
        b[12..16].copy_from_slice(&(init::ASYNC_READ as u32).to_le_bytes());
        assert_eq!(InitIn::parse(&b).flags, init::ASYNC_READ);
        let mut out = Vec::new();
        InitOut {
            minor: 42,
            flags: init::OVER_IO_URING | init::ASYNC_READ,
            max_write: 1 << 20,
            max_pages: 256,
            ..InitOut::default()
        }
        .encode(&mut out);
        let f = Fields(&out);
        assert_eq!((f.u32(0), f.u32(4)), (7, 42));
        assert_eq!(u64::from(f.u32(12)), init::ASYNC_READ | init::INIT_EXT);
        assert_eq!((f.u32(20), f.u16(28)), (1 << 20, 256));
        assert_eq!(u64::from(f.u32(32)) << 32, init::OVER_IO_URING);
    }

    #[test]
    fn headers_round_trip_and_errors_are_negated() {
        let h = InHeader {
            len: 80,
            opcode: op::READ,
            unique: 0x1234_5678_9abc,
            nodeid: 2,
            uid: 1000,
            gid: 100,
            pid: 42,
        };
        assert_eq!(InHeader::parse(&h.encode()), Some(h));
        assert_eq!(InHeader::parse(&[0; 39]), None);
        let o = out_header(16, libc::ENOENT, 9);
        assert_eq!(Fields(&o).u32(0), 16);
        assert_eq!(Fields(&o).u32(4) as i32, -libc::ENOENT);
        assert_eq!(Fields(&o).u64(8), 9);
    }

    #[test]
    fn dirents_pad_to_eight_and_stop_at_the_limit() {
        let mut v = Vec::new();
        assert!(dirent(&mut v, 64, 5, 1, 8, b"a.img"));
        assert_eq!(v.len(), 32);
        assert_eq!(Fields(&v).u32(16), 5);
        assert_eq!(&v[24..29], b"a.img");
        assert!(v[29..].iter().all(|&b| b == 0));
        assert!(!dirent(&mut v, 64, 6, 2, 8, b"a-longer-name.img"));
        assert_eq!(v.len(), 32);
    }

    #[test]
    fn names_split_at_the_nul() {
        assert_eq!(name(b"old\0new\0"), Some((&b"old"[..], &b"new\0"[..])));
        assert_eq!(name(b"no-nul"), None);
    }

    #[test]
    fn ioctl_numbers() {
        assert_eq!(DEV_IOC_BACKING_OPEN, 0x4010_e501);
        assert_eq!(DEV_IOC_BACKING_CLOSE, 0x4004_e502);
    }
}

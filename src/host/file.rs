//! The container file underneath an image, behind a small trait so that
//! tests can substitute a recording store and replay crashes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

/// What the engine needs from the container. Every method may be called
/// from many threads at once.
#[allow(clippy::len_without_is_empty)] // a container is never empty
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Grows the file to `len` and makes that length durable. Nothing else
    /// needs to become durable, so a store may do less than a full sync.
    fn extend(&self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        self.sync()
    }
    /// Makes `offset..offset+len` read as zeros and frees whole host blocks
    /// inside it; the file length does not change.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves host space for a range inside the file (fallocate mode 0).
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write, punch and length change durable.
    fn sync(&self) -> io::Result<()>;
    /// First offset at or after `offset` that may hold data (SEEK_DATA).
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>>;
    /// First offset at or after `offset` in a hole (SEEK_HOLE); the length
    /// of the file when none lies before its end. A store that does not
    /// know its holes answers the length: all data.
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(self.len()?.max(offset))
    }
    /// Bytes the host has allocated to the container.
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Reads guest data from a data chunk (the index goes through
    /// `read_at`); a store may bypass the host page cache here.
    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Writes guest data into a data chunk; see [`Storage::read_data`].
    fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Descriptors for asynchronous guest-data I/O (`host::uring`): the
    /// buffered one and, when the page cache is bypassed, the `O_DIRECT`
    /// one. `None`: this store is used only through its methods.
    fn async_fds(&self) -> Option<AsyncFds> {
        None
    }
}

/// See [`Storage::async_fds`].
#[derive(Clone, Copy, Debug)]
pub struct AsyncFds {
    pub buffered: RawFd,
    pub direct: Option<RawFd>,
}

/// A container that is a regular file.
pub struct FileStorage {
    file: File,
    /// The same file opened with `O_DIRECT`, for guest data when the host
    /// page cache is to be bypassed (QEMU's `cache.direct`).
    direct: Option<File>,
}

/// Opens the regular file at `path` as a container: for writing if
/// `opts.writable`, locked as `opts.lock` says, guest data through
/// `O_DIRECT` too when `opts.cache` is `none` and the host allows it.
pub fn open_container(
    path: &std::path::Path,
    opts: &crate::OpenOptions,
) -> crate::Result<FileStorage> {
    use crate::error::Error;
    let ctx = |e| Error::io(path.display().to_string(), e);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(opts.writable)
        .open(path)
        .map_err(ctx)?;
    if !file.metadata().map_err(ctx)?.is_file() {
        return Err(Error::Invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    crate::asif::engine::lock_file(&file, opts.lock, path)?;
    Ok(match opts.cache {
        crate::CacheMode::None => match FileStorage::open_direct(path, opts.writable) {
            Ok(direct) => FileStorage::with_direct(file, direct),
            Err(e) => {
                tracing::warn!(
                    "{}: no O_DIRECT here ({e}); guest data goes through the host page cache",
                    path.display()
                );
                FileStorage::new(file)
            }
        },
        crate::CacheMode::Writeback => FileStorage::new(file),
    })
}

/// Alignment of `O_DIRECT` offsets, lengths and buffers: 4 KiB suits every
/// common host filesystem and device.
pub(crate) const DIRECT_ALIGN: usize = 4096;

impl FileStorage {
    pub fn new(file: File) -> FileStorage {
        FileStorage { file, direct: None }
    }

    /// Guest data bypasses the host page cache through a second, `O_DIRECT`
    /// descriptor. Requests that are not 4 KiB aligned take the buffered
    /// one; the kernel keeps the two coherent (a direct request first writes
    /// back and drops cached pages of its range).
    pub fn with_direct(file: File, direct: File) -> FileStorage {
        FileStorage {
            file,
            direct: Some(direct),
        }
    }

    /// Opens `path` for `O_DIRECT` reads (and writes, if `writable`);
    /// fails where the host filesystem does not support it.
    pub fn open_direct(path: &std::path::Path, writable: bool) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// One O_DSYNC write of the new last sector makes the size durable
    /// without writing back the rest of the file, which a sync would (and
    /// which stalls every writer while a large write streams in). The
    /// sector is punched again at once: an unused chunk stays a hole.
    fn extend(&self, len: u64) -> io::Result<()> {
        const SECTOR: usize = 512;
        let zeros = [0u8; SECTOR];
        let at = len
            .checked_sub(SECTOR as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let written = rustix::io::pwritev2(
            &self.file,
            &[io::IoSlice::new(&zeros)],
            at,
            rustix::io::ReadWriteFlags::DSYNC,
        );
        if written != Ok(SECTOR) {
            // Kernels or filesystems without per-write sync: the long way.
            self.set_len(len)?;
            return self.sync();
        }
        let _ = self.punch(at, SECTOR as u64);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, mode, offset, len) {
            // A host filesystem without hole punching still has to read
            // zeros there.
            Err(Errno::OPNOTSUPP) => write_zeros(self, offset, len),
            other => Ok(other?),
        }
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len) {
            // Nothing to reserve on a host that cannot: writes may still work.
            Err(Errno::OPNOTSUPP) => Ok(()),
            other => Ok(other?),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(at) => Ok(Some(at)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(offset)) {
            Ok(at) => Ok(at),
            Err(Errno::NXIO) => Ok(offset),
            Err(e) => Err(e.into()),
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) if aligned(offset, buf.len()) => with_bounce(buf.len(), |bounce| {
                let got = read_full(d, bounce, offset)?;
                buf[..got].copy_from_slice(&bounce[..got]);
                buf[got..].fill(0);
                Ok(())
            }),
            _ => self.read_at(buf, offset),
        }
    }

    fn async_fds(&self) -> Option<AsyncFds> {
        Some(AsyncFds {
            buffered: self.file.as_raw_fd(),
            direct: self.direct.as_ref().map(|d| d.as_raw_fd()),
        })
    }

    fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            // A FUSE payload is not aligned in memory: copy it into a
            // buffer that is.
            Some(d) if aligned(offset, buf.len()) => with_bounce(buf.len(), |bounce| {
                bounce.copy_from_slice(buf);
                d.write_all_at(bounce, offset)
            }),
            _ => self.write_at(buf, offset),
        }
    }
}

pub(crate) fn aligned(offset: u64, len: usize) -> bool {
    offset % DIRECT_ALIGN as u64 == 0 && len % DIRECT_ALIGN == 0 && len > 0
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Requests up to this size reuse their thread's bounce buffer; a fresh
/// buffer per request left every serving thread's allocator holding
/// megabytes (16 threads: 200 MiB resident).
const KEPT_BOUNCE: usize = 4 << 20;

thread_local! {
    static BOUNCE: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::new(0));
}

/// Runs `f` on an aligned buffer of `len` bytes.
fn with_bounce<T>(len: usize, f: impl FnOnce(&mut [u8]) -> io::Result<T>) -> io::Result<T> {
    if len > KEPT_BOUNCE {
        return f(AlignedBuf::new(len).as_mut());
    }
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        b.resize(len);
        f(b.as_mut())
    })
}

/// A zeroed heap buffer aligned for `O_DIRECT`, built from whole aligned
/// blocks.
pub(crate) struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; DIRECT_ALIGN]);

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> AlignedBuf {
        AlignedBuf {
            blocks: vec![Block([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
            len,
        }
    }

    /// Bytes the allocation holds.
    pub(crate) fn capacity(&self) -> usize {
        self.blocks.len() * DIRECT_ALIGN
    }

    /// Makes the buffer `len` bytes long, keeping its allocation when it
    /// is big enough already.
    pub(crate) fn resize(&mut self, len: usize) {
        let blocks = len.div_ceil(DIRECT_ALIGN);
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, Block([0; DIRECT_ALIGN]));
        }
        self.len = len;
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        debug_assert!(self.len <= self.blocks.len() * DIRECT_ALIGN);
        // SAFETY: as in `as_mut`, without the exclusivity: a shared borrow
        // of initialised bytes.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }

    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        debug_assert!(self.len <= self.blocks.len() * DIRECT_ALIGN);
        // SAFETY: `Block` is `repr(C)` around a byte array whose size equals
        // its alignment, so the vector is `blocks.len() * DIRECT_ALIGN`
        // initialised bytes with no padding; `len` stays within them, and
        // the `&mut self` borrow makes the slice the only access.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Writes zeros over a range, for stores that cannot punch.
pub(crate) fn write_zeros(s: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
    const BLOCK: u64 = 1 << 20;
    let zeros = vec![0u8; BLOCK.min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = BLOCK.min(offset + len - at);
        s.write_at(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

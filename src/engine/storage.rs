//! The container file underneath an image, behind a small trait so that
//! tests can substitute a recording store and replay crashes.

use std::fs::File;
use std::io;
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
    /// Bytes the host has allocated to the container.
    fn allocated_bytes(&self) -> io::Result<u64>;
}

/// A container that is a regular file.
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    pub fn new(file: File) -> FileStorage {
        FileStorage { file }
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

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
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

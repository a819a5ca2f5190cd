//! What a bundle needs from its directory, behind two small traits so that
//! tests can substitute a recording store and replay crashes, as the other
//! formats do with [`Storage`](crate::host::file::Storage).
//!
//! Durability is the host's: a band file's changes become durable at its
//! `sync`, and entries made, removed or renamed in `bands/` or in the
//! bundle's root at `sync_bands` or `sync_root`, not before.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::fs::{AtFlags, FallocateFlags, FileType, Mode, OFlags, SeekFrom};
use rustix::io::Errno;

use crate::host::file::AsyncFds;

/// The subdirectory holding a bundle's band files.
pub const BANDS: &str = "bands";
/// Ends the name of a root file being replaced; only a crash leaves one.
pub const TEMP_SUFFIX: &str = ".asiffs-tmp";

/// One band file.
#[allow(clippy::len_without_is_empty)] // a length, not a collection
pub trait BandFile: Send + Sync {
    /// Reads from `offset` until `buf` is full or the file ends; returns
    /// the bytes read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the range read as zeros without changing the length, freeing
    /// whole host blocks where the filesystem can.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves space (fallocate mode 0); `false` where the filesystem
    /// cannot.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// Makes the file's changes durable; `metadata` also its length and
    /// holes (`fsync` rather than `fdatasync`).
    fn sync(&self, metadata: bool) -> io::Result<()>;
    /// `SEEK_DATA`; `None` when only a hole or the end follows.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>>;
    /// `SEEK_HOLE`; `None` past the end.
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>>;
    /// The descriptors the ring ([`crate::host::uring`]) may read and
    /// write the file's bytes through, as they are (not for a file whose
    /// bytes are transformed, such as an encrypted band). The descriptor
    /// lives as long as this `BandFile`. `None`: used only through its
    /// methods.
    fn async_fds(&self) -> Option<AsyncFds> {
        None
    }
}

/// What `stat_band` tells of a name in `bands/`.
pub struct BandStat {
    pub regular: bool,
    pub len: u64,
}

/// The bundle directory: small files in its root, band files in `bands/`.
/// Errors keep their `errno` (ENOENT, ELOOP, ...) so that callers can name
/// the problem; a root file that is not a regular file is
/// [`io::ErrorKind::InvalidData`].
pub trait BundleDir: Send + Sync {
    /// A root file, at most `limit + 1` bytes of it.
    fn read_small(&self, name: &str, limit: usize) -> io::Result<Vec<u8>>;
    /// Replaces a root file by writing `name` + [`TEMP_SUFFIX`], syncing it
    /// and renaming it over `name` (durable at the next `sync_root`).
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Removes a root file; absent is fine.
    fn remove(&self, name: &str) -> io::Result<()>;
    fn exists(&self, name: &str) -> bool;
    fn sync_root(&self) -> io::Result<()>;
    /// Host bytes of a root file (0 if absent).
    fn root_allocated(&self, name: &str) -> io::Result<u64>;

    /// Names in `bands/`, `.` and `..` left out.
    fn list_bands(&self) -> io::Result<Vec<Vec<u8>>>;
    fn stat_band(&self, name: &str) -> io::Result<BandStat>;
    /// Opens band `name`, making it if `create`; `None` if absent.
    fn open_band(
        &self,
        name: &str,
        create: bool,
        writable: bool,
    ) -> io::Result<Option<Arc<dyn BandFile>>>;
    /// Removes a band file; absent is fine.
    fn remove_band(&self, name: &str) -> io::Result<()>;
    fn sync_bands(&self) -> io::Result<()>;
    /// Host bytes of a band file (0 if absent).
    fn band_allocated(&self, name: &str) -> io::Result<u64>;
    /// Whether the band files it opens may have
    /// [`BandFile::async_fds`]: a bundle on a store without them never
    /// translates.
    fn band_fds(&self) -> bool {
        false
    }
}

/// A bundle on the host filesystem, reached only through descriptors of
/// its root and `bands/` opened without following symlinks.
pub struct HostDir {
    root: File,
    /// `bands/`, or why it could not be opened (reported by the first
    /// call that needs it, so that a broken plist is named first).
    bands: Result<File, Errno>,
}

impl HostDir {
    pub fn new(root: File) -> HostDir {
        let bands = rustix::fs::openat(
            &root,
            BANDS,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(File::from);
        HostDir { root, bands }
    }

    /// The root alone, for reading its small files (`bands/` is not
    /// opened: probing a directory need not).
    pub fn root_only(root: File) -> HostDir {
        HostDir {
            root,
            bands: Err(Errno::NOENT),
        }
    }

    fn bands(&self) -> io::Result<&File> {
        self.bands.as_ref().map_err(|&e| e.into())
    }
}

fn allocated_at(dir: &File, name: &str) -> io::Result<u64> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(st.st_blocks as u64 * 512),
        Err(Errno::NOENT) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

impl BundleDir for HostDir {
    fn read_small(&self, name: &str, limit: usize) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let fd = rustix::fs::openat(
            &self.root,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let mut b = Vec::new();
        f.take(limit as u64 + 1).read_to_end(&mut b)?;
        Ok(b)
    }

    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = format!("{name}{TEMP_SUFFIX}");
        let fd = rustix::fs::openat(
            &self.root,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        let f = File::from(fd);
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
        rustix::fs::renameat(&self.root, tmp.as_str(), &self.root, name)?;
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.root, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn exists(&self, name: &str) -> bool {
        rustix::fs::statat(&self.root, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    fn sync_root(&self) -> io::Result<()> {
        self.root.sync_all()
    }

    fn root_allocated(&self, name: &str) -> io::Result<u64> {
        allocated_at(&self.root, name)
    }

    fn list_bands(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut names = Vec::new();
        for e in rustix::fs::Dir::read_from(self.bands()?)? {
            let name = e?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn stat_band(&self, name: &str) -> io::Result<BandStat> {
        let st = rustix::fs::statat(self.bands()?, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(BandStat {
            regular: FileType::from_raw_mode(st.st_mode) == FileType::RegularFile,
            len: st.st_size as u64,
        })
    }

    fn open_band(
        &self,
        name: &str,
        create: bool,
        writable: bool,
    ) -> io::Result<Option<Arc<dyn BandFile>>> {
        let mut flags = OFlags::NOFOLLOW | OFlags::CLOEXEC;
        flags |= if writable {
            OFlags::RDWR
        } else {
            OFlags::RDONLY
        };
        if create {
            flags |= OFlags::CREATE;
        }
        match rustix::fs::openat(self.bands()?, name, flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => Ok(Some(Arc::new(HostBand(File::from(fd))))),
            Err(Errno::NOENT) if !create => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn remove_band(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(self.bands()?, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn sync_bands(&self) -> io::Result<()> {
        self.bands()?.sync_all()
    }

    fn band_allocated(&self, name: &str) -> io::Result<u64> {
        allocated_at(self.bands()?, name)
    }

    fn band_fds(&self) -> bool {
        true
    }
}

/// A band file on the host.
struct HostBand(File);

impl HostBand {
    fn seek(&self, whence: SeekFrom) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.0, whence) {
            Ok(p) => Ok(Some(p)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl BandFile for HostBand {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.0.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.0, mode, offset, len) {
            Ok(()) => Ok(()),
            // A filesystem without holes: zeros inside the file's length.
            Err(Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; 64 << 10];
                let stop = (offset + len).min(self.len()?);
                let mut at = offset;
                while at < stop {
                    let k = (stop - at).min(zeros.len() as u64) as usize;
                    self.0.write_all_at(&zeros[..k], at)?;
                    at += k as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<bool> {
        match rustix::fs::fallocate(&self.0, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(true),
            Err(Errno::OPNOTSUPP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn sync(&self, metadata: bool) -> io::Result<()> {
        if metadata {
            self.0.sync_all()
        } else {
            self.0.sync_data()
        }
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(SeekFrom::Data(offset))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(SeekFrom::Hole(offset))
    }

    /// Band files are opened buffered: no `O_DIRECT` descriptor.
    fn async_fds(&self) -> Option<AsyncFds> {
        Some(AsyncFds {
            buffered: self.0.as_raw_fd(),
            direct: None,
        })
    }
}

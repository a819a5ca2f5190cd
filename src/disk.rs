//! The virtual disk every image format offers: what the mount, the NBD
//! server and the CLI use, whatever the container underneath.
//!
//! Contract, for every implementation:
//! - offsets and lengths are bytes of the virtual disk; a range that is not
//!   inside `0..size()` is [`Error::OutOfRange`] (except `discard`, which
//!   clamps to the disk);
//! - after `discard` or `write_zeroes` returns, the range reads as zeros;
//! - after `flush` returns, every write, discard and resize that returned
//!   before it survives a power cut;
//! - a disk that cannot be written answers every change with
//!   [`Error::ReadOnly`] or [`Error::WritesRefused`] and never touches its
//!   file.

use std::fs::File;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::asif::engine::{CheckReport, Extent, Image, ImageInfo, Stats};
use crate::error::{Error, Result};
use crate::host::file::{aligned, AsyncFds, Storage};

/// Where a request lies in the host files, for the ring (`host::uring`)
/// to read or write without the format's code on the way.
pub struct Translation {
    /// Sorted by `at`, not overlapping. Bytes of a read no piece covers
    /// read as zeros.
    pub pieces: Vec<HostPiece>,
    /// Keeps what the format needs held (its resize or compaction lock,
    /// ASIF's I/O gate) until the last host I/O completes and
    /// [`Disk::io_done`] has run: dropped then.
    pub hold: Box<dyn Send>,
}

/// One host read or write of a [`Translation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPiece {
    /// Offset in the request's buffer.
    pub at: usize,
    pub fd: RawFd,
    /// Offset in the host file.
    pub host: u64,
    pub len: usize,
}

impl HostPiece {
    /// A piece on the `O_DIRECT` descriptor when the store has one (it
    /// bypasses the page cache) and the piece is aligned in the file and
    /// in the buffer, else on the buffered one: the kernel keeps the two
    /// coherent, so pieces of one request may mix them.
    pub fn on(fds: AsyncFds, at: usize, host: u64, len: usize) -> HostPiece {
        let fd = match fds.direct {
            Some(d) if aligned(host, len) && aligned(at as u64, len) => d,
            _ => fds.buffered,
        };
        HostPiece { at, fd, host, len }
    }
}

/// Appends the data and holes of `len` disk bytes from `at`, stored from
/// `host` on in `storage`, as the host file's own holes say (a format
/// whose bytes lie in the file as they are: raw disks, UDIF raw runs).
pub fn host_extents(
    storage: &dyn Storage,
    at: u64,
    len: u64,
    host: u64,
    out: &mut Vec<Extent>,
) -> std::io::Result<()> {
    let end = host + len;
    let mut pos = host;
    while pos < end {
        let d = storage.next_data(pos)?.map_or(end, |d| d.clamp(pos, end));
        if d > pos {
            out.push(Extent {
                start: at + (pos - host),
                length: d - pos,
                data: false,
                offset: None,
            });
        }
        if d == end {
            break;
        }
        let h = storage.next_hole(d)?.clamp(d + 1, end);
        out.push(Extent {
            start: at + (d - host),
            length: h - d,
            data: true,
            offset: Some(d),
        });
        pos = h;
    }
    Ok(())
}

/// The container formats asiffs knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Apple Sparse Image Format (`.asif`).
    Asif,
    /// A plain raw disk file.
    Raw,
    /// Apple UDIF (`.dmg`): compressed images (UDZO, UDBZ, ULFO, ULMO,
    /// UDCO) are read-only, read-write ones (UDRW) are written in place.
    Udif,
    /// Apple sparse bundle (`.sparsebundle`, a directory of band files).
    Udsb,
    /// Apple sparse image (`.sparseimage`).
    Udsp,
    /// A read-write `.dmg` as hdiutil writes it (UDRW): the disk's bytes,
    /// with no trailer.
    Udrw,
    /// A file encrypted with Apple's scheme (`encrcdsa` header or
    /// `cdsaencr` trailer): what it holds is known only once unlocked, and
    /// the opened disk reports that format.
    Encrypted,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Asif => "asif",
            Format::Raw => "raw",
            Format::Udif => "udif",
            Format::Udsb => "udsb",
            Format::Udsp => "udsp",
            Format::Udrw => "udrw",
            Format::Encrypted => "encrypted",
        }
    }
}

pub trait Disk: Send + Sync {
    fn format(&self) -> Format;
    /// The container: a file, or a directory for bundles.
    fn path(&self) -> &Path;
    /// Nominal size in bytes.
    fn size(&self) -> u64;
    /// Largest size `resize` accepts; the size itself when it cannot grow.
    fn max_size(&self) -> u64 {
        self.size()
    }
    /// Whether changes are accepted now.
    fn is_writable(&self) -> bool;
    /// Why changes are refused, when the disk was opened for writing but
    /// the image cannot take them.
    fn write_refusal(&self) -> Option<String> {
        None
    }
    /// [`Disk::write_refusal`] as known now, without waiting for work the
    /// open started (ASIF's scan of a large image, which logs its own
    /// verdict when it ends).
    fn refusal_now(&self) -> Option<String> {
        self.write_refusal()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes the range read as zeros and frees what space the format can.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes the range read as zeros; the format may free space too.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Reserves space so later writes to the range do not fail for lack of
    /// it (fallocate mode 0). Formats that cannot reserve accept it as is.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)
    }
    fn flush(&self) -> Result<()>;
    /// Changes the nominal size; a shrink drops what lies past the end.
    fn resize(&self, new_size: u64) -> Result<()>;
    /// First offset at or after `offset` holding data; `None` if only
    /// zeros follow.
    fn seek_data(&self, offset: u64) -> Result<Option<u64>>;
    /// First offset at or after `offset` (below the size) that reads as
    /// zeros because nothing is stored there; the size if none.
    fn seek_hole(&self, offset: u64) -> Result<u64>;
    /// Consecutive runs covering the whole disk.
    fn extents(&self) -> Result<Vec<Extent>>;
    /// Host bytes the container occupies.
    fn allocated_bytes(&self) -> Result<u64>;
    /// Counters for `asiffs stats`.
    fn stats(&self) -> serde_json::Value;
    /// The file whose bytes are the disk's, byte for byte, when there is
    /// one: a transport may then hand reads and writes to the kernel
    /// (FUSE passthrough). From the first call on, the disk takes its
    /// size from the file and syncs it at every flush, since writes may
    /// have bypassed it.
    fn passthrough_file(&self) -> Option<Arc<File>> {
        None
    }
    /// Where `offset..offset+len` lies in the host files, for the ring.
    /// `Ok(None)`: take the synchronous path (`read_at`/`write_at`), which
    /// is what a format answers for anything but plain mapped bytes (a
    /// write that allocates, compressed runs, stores without descriptors
    /// such as encrypted ones). An error is the request's answer.
    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        let _ = (offset, len, write);
        Ok(None)
    }
    /// Whether [`Disk::translate`] may ever answer `Some`: the mount sends
    /// the other disks' requests to its thread pool rather than the ring.
    fn may_translate(&self) -> bool {
        false
    }
    /// Called by the ring when the host I/O of a translated request has
    /// ended (`ok`: without error), before the reply and with the hold
    /// still held: the format counts it and, for a write, marks itself
    /// dirty so that a later flush syncs (even a failed write may have
    /// changed the file).
    fn io_done(&self, write: bool, len: u64, ok: bool) {
        let _ = (write, len, ok);
    }
    /// The container's own figures for `info` beyond the common ones
    /// (ASIF's geometry and tables); `None` for formats that have none.
    fn details(&self) -> Option<Result<ImageInfo>> {
        None
    }
    /// A structural check of the container (`check`); `None` for formats
    /// that are checked by other means.
    fn check_report(&self) -> Option<Result<CheckReport>> {
        None
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }
}

impl Disk for Image {
    fn format(&self) -> Format {
        Format::Asif
    }
    fn path(&self) -> &Path {
        Image::path(self)
    }
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn max_size(&self) -> u64 {
        Image::max_size(self)
    }
    fn is_writable(&self) -> bool {
        Image::is_writable(self)
    }
    fn write_refusal(&self) -> Option<String> {
        Image::write_refusal(self)
    }
    fn refusal_now(&self) -> Option<String> {
        Image::refusal_now(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Image::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Image::write_at(self, buf, offset)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Image::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Image::write_zeroes(self, offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        Image::allocate(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Image::flush(self)
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        Image::resize(self, new_size)
    }
    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        Image::seek_data(self, offset)
    }
    fn seek_hole(&self, offset: u64) -> Result<u64> {
        Image::seek_hole(self, offset)
    }
    fn extents(&self) -> Result<Vec<Extent>> {
        Image::extents(self)
    }
    fn allocated_bytes(&self) -> Result<u64> {
        Image::allocated_bytes(self)
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::to_value::<Stats>(Image::stats(self)).unwrap_or(serde_json::Value::Null)
    }
    fn translate(&self, offset: u64, len: u64, write: bool) -> Result<Option<Translation>> {
        self.translate_data(offset, len, write)
    }
    fn io_done(&self, write: bool, len: u64, ok: bool) {
        self.translated_done(write, len, ok)
    }
    fn may_translate(&self) -> bool {
        self.has_async_fds()
    }
    fn details(&self) -> Option<Result<ImageInfo>> {
        Some(self.info())
    }
    fn check_report(&self) -> Option<Result<CheckReport>> {
        Some(self.check())
    }
}

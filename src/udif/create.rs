//! Writing new UDIF images: a read-write (UDRW) image of zeros, and any
//! image from a data fork and its tables (used to build test images).
//!
//! A new image is written to a temporary file beside its path, synced,
//! then renamed into place (and the directory synced): a crash leaves
//! either no image or a whole one.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::blkx::{Mish, RunEntry, RunKind, SECTOR};
use super::plist::{self, BlkxResource};
use super::trailer::{Checksum, Koly, KOLY_VERSION, TRAILER_SIZE};
use crate::atomic_file::{write_new, Place};
use crate::error::{Error, Result};

/// Sectors per raw run of a new UDRW image: 1 MiB, the run size hdiutil
/// uses for its images.
pub const UDRW_RUN_SECTORS: u64 = 2048;
/// Largest UDRW image created: its table then holds 2^20 runs (40 MiB).
pub const MAX_UDRW_SIZE: u64 = 1 << 40;

/// CRC32 state after `len` zero bytes, in O(log len) steps.
pub fn crc32_of_zeros(len: u64) -> crc32fast::Hasher {
    let mut total = crc32fast::Hasher::new();
    let mut block = crc32fast::Hasher::new();
    block.update(&[0]);
    let mut rest = len;
    while rest > 0 {
        if rest & 1 == 1 {
            total.combine(&block);
        }
        let b = block.clone();
        block.combine(&b);
        rest >>= 1;
    }
    total
}

/// The master checksum: a CRC32 over the tables' checksum values.
pub fn master_checksum<'a>(tables: impl IntoIterator<Item = &'a Mish>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for t in tables {
        h.update(&t.checksum.value[..4]);
    }
    h.finalize()
}

/// The property list and trailer that follow a data fork of `fork_len`
/// bytes. Tables are named `(name, table)`; their IDs count from 0.
pub fn tail(
    fork_len: u64,
    data_checksum: Checksum,
    tables: &[(String, Mish)],
    sector_count: u64,
) -> Vec<u8> {
    let blkx: Vec<BlkxResource> = tables
        .iter()
        .enumerate()
        .map(|(i, (name, m))| BlkxResource {
            attributes: "0x0050".into(),
            cf_name: name.clone(),
            id: i.to_string(),
            name: name.clone(),
            data: m.encode(),
        })
        .collect();
    let mut out = plist::encode(&blkx);
    let koly = Koly {
        version: KOLY_VERSION,
        header_size: TRAILER_SIZE as u32,
        flags: 1,
        running_data_fork_offset: 0,
        data_fork_offset: 0,
        data_fork_length: fork_len,
        rsrc_fork_offset: 0,
        rsrc_fork_length: 0,
        // As in hdiutil's images: not segmented, no segment id.
        segment_number: 0,
        segment_count: 0,
        segment_id: [0; 16],
        data_checksum,
        plist_offset: fork_len,
        plist_length: out.len() as u64,
        master_checksum: Checksum::crc32(master_checksum(tables.iter().map(|t| &t.1))),
        image_variant: 1,
        sector_count,
    };
    out.extend_from_slice(&koly.encode());
    out
}

/// Writes an image whose data fork is `data_fork` (tables as in [`tail`],
/// their checksums as given).
pub fn write_image(
    path: &Path,
    data_fork: &[u8],
    tables: &[(String, Mish)],
    sector_count: u64,
) -> Result<()> {
    let crc = crc32fast::hash(data_fork);
    let tail = tail(
        data_fork.len() as u64,
        Checksum::crc32(crc),
        tables,
        sector_count,
    );
    write_atomically(path, |f| {
        f.write_all(data_fork)?;
        f.write_all(&tail)
    })
}

/// Creates a read-write (UDRW) image of `size` bytes of zeros: a sparse
/// data fork, one table of raw runs of at most [`UDRW_RUN_SECTORS`]
/// covering the disk, CRC32 checksums throughout.
pub fn create_udrw(path: &Path, size: u64) -> Result<()> {
    if size == 0 || size % SECTOR != 0 {
        return Err(Error::Invalid(format!(
            "{}: a UDIF disk is a whole, nonzero number of 512-byte sectors, not {size} bytes",
            path.display()
        )));
    }
    if size > MAX_UDRW_SIZE {
        return Err(Error::Invalid(format!(
            "{}: {size} bytes is larger than the {} TiB asiffs creates as UDRW",
            path.display(),
            MAX_UDRW_SIZE >> 40
        )));
    }
    let sectors = size / SECTOR;
    let mut runs: Vec<RunEntry> = (0..sectors.div_ceil(UDRW_RUN_SECTORS))
        .map(|k| {
            let sector = k * UDRW_RUN_SECTORS;
            let n = UDRW_RUN_SECTORS.min(sectors - sector);
            RunEntry::new(RunKind::Raw, sector, n, sector * SECTOR, n * SECTOR)
        })
        .collect();
    runs.push(RunEntry::new(RunKind::End, sectors, 0, 0, 0));
    let crc = crc32_of_zeros(size).finalize();
    let table = Mish {
        first_sector: 0,
        sector_count: sectors,
        data_start: 0,
        buffers_needed: UDRW_RUN_SECTORS as u32,
        descriptor: 1,
        checksum: Checksum::crc32(crc),
        runs,
    };
    let tail = tail(
        size,
        Checksum::crc32(crc),
        &[("whole disk (unknown partition : 0)".into(), table)],
        sectors,
    );
    write_atomically(path, |f| {
        f.set_len(size)?;
        f.write_all_at(&tail, size)
    })
}

/// Runs `fill` on a fresh temporary file beside `path`, syncs it and
/// renames it to `path` (refused if `path` exists).
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::Invalid(format!(
            "{}: already exists",
            path.display()
        )));
    }
    if path.file_name().is_none() {
        return Err(Error::Invalid(format!(
            "{}: not a file name",
            path.display()
        )));
    }
    write_new(path, "tmp-", Place::Rename, fill)
        .map_err(|f| Error::io(format!("{}: {}", path.display(), f.step), f.error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_crc_matches_hashing() {
        for len in [0u64, 1, 511, 512, 4096, 1 << 20, (1 << 20) + 3] {
            assert_eq!(
                crc32_of_zeros(len).finalize(),
                crc32fast::hash(&vec![0u8; len as usize]),
                "{len} zeros"
            );
        }
    }

    #[test]
    fn refuses_bad_sizes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.dmg");
        let e = create_udrw(&p, 1000).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: a UDIF disk is a whole, nonzero number of 512-byte sectors, not 1000 bytes",
                p.display()
            )
        );
        let e = create_udrw(&p, (1 << 40) + 512).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: 1099511628288 bytes is larger than the 1 TiB asiffs creates as UDRW",
                p.display()
            )
        );
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(
            create_udrw(&p, 4096).unwrap_err().to_string(),
            format!("{}: already exists", p.display())
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
    }
}

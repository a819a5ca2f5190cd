//! Creating a fresh image, laid out exactly as macOS lays out its own:
//! chunk 0 header and both directories, chunk 1 the metadata table,
//! chunk 2 the metadata chunk, chunk 3 that group's bitmap.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::asif::format::{
    put_u64, BitmapEntry, ChunkEntry, ChunkState, Directory, Geometry, Header, Metadata,
    DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE, DEFAULT_MAX_SECTORS, DEFAULT_METADATA_CHUNK,
};
use crate::atomic_file::{check_replaceable, write_new, Place, NEW_TAG};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes, rounded up to a whole block.
    pub size: u64,
    /// Replace an existing file (refused while another process holds it).
    pub force: bool,
    pub chunk_size: u32,
    pub block_size: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            force: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            block_size: DEFAULT_BLOCK_SIZE.into(),
        }
    }
}

/// The header of a new image with the given options.
pub fn new_header(opts: &CreateOptions) -> Result<(Header, Geometry)> {
    let bs = u16::try_from(opts.block_size)
        .map_err(|_| Error::Invalid(format!("block size {} is too large", opts.block_size)))?;
    let sectors = opts.size.div_ceil(u64::from(opts.block_size.max(1)));
    let mut h = Header {
        flags: 0,
        directory_offsets: [0, 0],
        uuid: *uuid::Uuid::new_v4().as_bytes(),
        sector_count: 0,
        max_sector_count: DEFAULT_MAX_SECTORS,
        chunk_size: opts.chunk_size,
        block_size: bs,
        segment_count: 0,
        metadata_chunk: DEFAULT_METADATA_CHUNK,
        unknown: [0; 16],
        read_only_flags: 0,
        metadata_flags: 0,
        metadata_read_only_flags: 0,
    };
    // Keep the real images' 4 PiB limit in bytes whatever the block size.
    h.max_sector_count = (DEFAULT_MAX_SECTORS * 512) / u64::from(bs.max(1));
    h.metadata_chunk = ((DEFAULT_METADATA_CHUNK + 1) << 20) / u64::from(opts.chunk_size.max(1)) - 1;
    // Directory A right after the header and B right after A, as macOS does.
    let a = (crate::asif::format::HEADER_SIZE as u64).next_multiple_of(u64::from(bs));
    let dir_bytes = Geometry::directory_bytes_for(&h)?;
    h.directory_offsets = [a, a + dir_bytes];
    let geo = Geometry::new(&h)?;
    if opts.size > geo.size_limit() {
        return Err(Error::Invalid(format!(
            "size {} is larger than the format allows ({} bytes)",
            opts.size,
            geo.size_limit()
        )));
    }
    h.sector_count = sectors;
    let geo = Geometry::new(&h)?;
    Ok((h, geo))
}

/// Writes the fresh image into `file` (already sized to zero length);
/// the caller syncs it.
pub fn write_fresh(file: &File, h: &Header, geo: &Geometry, stable_uuid: &str) -> io::Result<()> {
    let cs = geo.chunk_size;
    let (table, meta, bitmap) = (1u64, 2u64, 3u64);
    file.set_len(4 * cs)?;
    file.write_all_at(&h.encode(), 0)?;
    let loc = geo.metadata_location();
    let mut tables = vec![0u64; geo.directory_entries as usize];
    tables[loc.table as usize] = table;
    for (slot, version) in [(0, 0u64), (1, 1u64)] {
        let d = Directory {
            version,
            tables: tables.clone(),
        };
        file.write_all_at(
            &d.encode(geo.directory_bytes as usize),
            geo.directory_offsets[slot],
        )?;
    }
    let group_at = table * cs + geo.group_offset_in_table(loc.group);
    let mut e = [0u8; 8];
    put_u64(&mut e, 0, ChunkEntry::encode(ChunkState::Partial(meta)).0);
    file.write_all_at(&e, group_at + geo.entry_offset_in_group(loc.index))?;
    put_u64(&mut e, 0, BitmapEntry(bitmap).0);
    file.write_all_at(&e, group_at + geo.bitmap_entry_offset_in_group())?;
    let m = Metadata::new(stable_uuid).encode(geo.block_size as usize);
    file.write_all_at(&m, meta * cs + loc.within)?;
    // Mark the metadata's sectors written, two bits each, low bits first.
    let first = loc.index * geo.sectors_per_chunk() + loc.within / geo.block_size;
    let count = m.len() as u64 / geo.block_size;
    let span = crate::asif::format::bitmap_span(first, count);
    let mut bits = vec![0u8; (span.end - span.start) as usize];
    for s in first..first + count {
        bits[(s / 4 - span.start) as usize] |= 1 << ((s % 4) * 2);
    }
    file.write_all_at(&bits, bitmap * cs + span.start)
}

/// Creates the image at `path`: written beside it under a temporary name,
/// synced, then moved into place, so a crash never leaves half an image.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let (h, geo) = new_header(opts)?;
    check_replaceable(path, opts.force)?;
    // Without --force, linking fails if the name appeared meanwhile.
    let place = if opts.force {
        Place::Rename
    } else {
        Place::Link
    };
    let stable = uuid::Uuid::new_v4().hyphenated().to_string();
    write_new(path, NEW_TAG, place, |file| {
        write_fresh(file, &h, &geo, &stable)
    })
    .map_err(|f| Error::io(path.display().to_string(), f.error))
}

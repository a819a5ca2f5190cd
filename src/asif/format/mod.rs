//! Pure encode/decode of the ASIF on-disk structures. Nothing here does I/O:
//! every function takes or returns bytes, so the whole layer is testable
//! against the real images byte by byte.
//!
//! All integers on disk are big-endian. Words used throughout: a *chunk* is
//! the unit of allocation (`cs` bytes, 1 MiB in every real image); a *table*
//! is one chunk of *chunk-groups*, each group holding `N` data-chunk entries
//! and one *bitmap* entry; the *directory* lists the tables.

mod bitmap;
mod directory;
mod entry;
mod error;
mod geometry;
mod header;
mod metadata;

pub use bitmap::{bitmap_span, SectorState};
pub use directory::Directory;
pub use entry::{BitmapEntry, ChunkEntry, ChunkState, FlagBits, MAX_CHUNK_NUMBER};
pub use error::FormatError;
pub use geometry::{Geometry, Location};
pub use header::{Header, HEADER_SIZE, MAGIC, VERSION};
pub use metadata::{Metadata, META_HEADER_SIZE, META_MAGIC};

/// Chunk size of every image macOS has been seen to write.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Block (sector) size of every image macOS has been seen to write.
pub const DEFAULT_BLOCK_SIZE: u16 = 512;
/// Max sector count of every real image: 4 PiB of 512-byte sectors.
pub const DEFAULT_MAX_SECTORS: u64 = 1 << 43;
/// Logical chunk number of the metadata chunk in every real image.
pub const DEFAULT_METADATA_CHUNK: u64 = 0xFFFF_FFFF;

pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

//! Derived figures of an image and the mapping from a virtual offset to its
//! table, chunk-group and entry.
//!
//! Every header value is hostile until [`Geometry::new`] accepts it, and it
//! computes with checked arithmetic only. What it accepts satisfies, so that
//! the plain arithmetic done later on a `Geometry` (here and in the engine)
//! cannot wrap:
//! - `bs <= 65024` and `bs <= cs <= 256 MiB`, hence `N`, `S`, `C` and every
//!   offset inside a chunk are below 2^32;
//! - `T * D` (the virtual span of the whole directory) fits in a u64. Any
//!   `table < T`, `group < C`, `index < N`, `within < cs` therefore give
//!   `table * D + (group * N + index) * cs + within < T * D`, and
//!   `table * C + group <= T * D` (`locate`, `group_number`, `group_start`);
//! - `size <= metadata_offset` and `metadata_offset + cs <= T * D`;
//!   `max_sector_count * bs` fits;
//! - both directories lie inside chunk 0: `offset + directory_bytes <= cs`,
//!   and `8 * (T + 1) <= directory_bytes`;
//! - a chunk-group lies inside its table chunk: `C * S <= cs`.
//!
//! A physical chunk number `n` read from the file is not bounded here: the
//! engine must refuse any `n` at or past the file's chunk count before it
//! computes `n * cs` (then `n * cs < file length`).

use super::{FormatError, Header, HEADER_SIZE};

/// Largest chunk size accepted. Real images use 1 MiB; the cap keeps a
/// hostile header from making us allocate or read absurd amounts.
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;

/// Everything that follows from the header's sizes, computed once with
/// overflow checks so that later arithmetic cannot overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// `cs`: bytes per chunk.
    pub chunk_size: u64,
    /// `bs`: bytes per sector.
    pub block_size: u64,
    /// `N`: data-chunk entries per chunk-group.
    pub entries_per_group: u64,
    /// `S`: bytes per chunk-group on disk (N data entries + 1 bitmap entry).
    pub group_bytes: u64,
    /// `C`: chunk-groups per table.
    pub groups_per_table: u64,
    /// `D`: virtual bytes covered by one table.
    pub table_span: u64,
    /// `T`: entries in a directory (after its version word).
    pub directory_entries: u64,
    /// Bytes one directory occupies, rounded up to a sector.
    pub directory_bytes: u64,
    pub directory_offsets: [u64; 2],
    /// Virtual disk size in bytes.
    pub size: u64,
    /// `max_sector_count * bs`.
    pub max_size: u64,
    /// Logical address of the metadata chunk.
    pub metadata_offset: u64,
}

/// Where a virtual byte offset lives in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Directory entry (table number).
    pub table: u64,
    /// Chunk-group within the table.
    pub group: u64,
    /// Data entry within the group.
    pub index: u64,
    /// Byte offset within the chunk.
    pub within: u64,
}

/// The sizes that follow from chunk size, block size and max sector count.
struct Shape {
    cs: u64,
    bs: u64,
    n: u64,
    s: u64,
    c: u64,
    d: u64,
    max_size: u64,
    t: u64,
    directory_bytes: u64,
}

impl Shape {
    fn new(h: &Header) -> Result<Shape, FormatError> {
        let bs = u64::from(h.block_size);
        if bs == 0 || bs % 512 != 0 {
            return Err(FormatError::field(
                "block size",
                bs,
                "must be a non-zero multiple of 512",
            ));
        }
        let cs = u64::from(h.chunk_size);
        if cs == 0 || cs % bs != 0 {
            return Err(FormatError::field(
                "chunk size",
                cs,
                "must be a non-zero multiple of the block size",
            ));
        }
        if cs > MAX_CHUNK_SIZE {
            return Err(FormatError::field("chunk size", cs, "larger than 256 MiB"));
        }
        let n = 4 * bs;
        let s = 8 * (n + 1);
        let c = cs / s;
        if c == 0 {
            return Err(FormatError::field(
                "chunk size",
                cs,
                "too small to hold one chunk-group",
            ));
        }
        let too_big = |field, v| FormatError::field(field, v, "geometry overflows 64 bits");
        // c * n < c * s <= cs <= 2^28, so d < 2^56: checked all the same.
        let d = c
            .checked_mul(n)
            .and_then(|x| x.checked_mul(cs))
            .ok_or_else(|| too_big("chunk size", cs))?;
        if h.max_sector_count == 0 {
            return Err(FormatError::field(
                "max sector count",
                0,
                "must not be zero",
            ));
        }
        let max_size = h
            .max_sector_count
            .checked_mul(bs)
            .ok_or_else(|| too_big("max sector count", h.max_sector_count))?;
        let t = max_size.div_ceil(d);
        // The whole directory's span must fit, or table * D could wrap.
        t.checked_mul(d)
            .ok_or_else(|| too_big("max sector count", h.max_sector_count))?;
        let directory_bytes = t
            .checked_add(1)
            .and_then(|x| x.checked_mul(8))
            .and_then(|x| x.checked_next_multiple_of(bs))
            .ok_or_else(|| too_big("max sector count", h.max_sector_count))?;
        let fits = directory_bytes
            .checked_mul(2)
            .and_then(|x| x.checked_add(HEADER_SIZE as u64))
            .is_some_and(|x| x <= cs);
        if !fits {
            return Err(FormatError::field(
                "max sector count",
                h.max_sector_count,
                "directories would not fit in chunk 0",
            ));
        }
        Ok(Shape {
            cs,
            bs,
            n,
            s,
            c,
            d,
            max_size,
            t,
            directory_bytes,
        })
    }
}

impl Geometry {
    /// Bytes one directory takes for this header's sizes, whatever its
    /// directory offsets (a writer needs it to place them).
    pub fn directory_bytes_for(h: &Header) -> Result<u64, FormatError> {
        Ok(Shape::new(h)?.directory_bytes)
    }

    pub fn new(h: &Header) -> Result<Geometry, FormatError> {
        let Shape {
            cs,
            bs,
            n,
            s,
            c,
            d,
            max_size,
            t,
            directory_bytes,
        } = Shape::new(h)?;
        let [a, b] = h.directory_offsets;
        for (field, o) in [("directory A offset", a), ("directory B offset", b)] {
            let inside = o.checked_add(directory_bytes).is_some_and(|e| e <= cs);
            if o < HEADER_SIZE as u64 || o % bs != 0 || !inside {
                return Err(FormatError::field(
                    field,
                    o,
                    "must be sector-aligned, after the header and inside chunk 0",
                ));
            }
        }
        if a < b + directory_bytes && b < a + directory_bytes {
            return Err(FormatError::field(
                "directory B offset",
                b,
                "overlaps directory A",
            ));
        }
        if h.sector_count > h.max_sector_count {
            return Err(FormatError::field(
                "sector count",
                h.sector_count,
                "larger than the max sector count",
            ));
        }
        // Both fit: sector_count <= max_sector_count, and Shape checked
        // max_sector_count * bs and t * d.
        let size = h.sector_count * bs;
        let span = t * d;
        let metadata_offset = h
            .metadata_chunk
            .checked_mul(cs)
            .filter(|m| m.checked_add(cs).is_some_and(|end| end <= span))
            .ok_or_else(|| {
                FormatError::field(
                    "metadata chunk",
                    h.metadata_chunk,
                    "outside the directory's span",
                )
            })?;
        if size > metadata_offset {
            return Err(FormatError::field(
                "sector count",
                h.sector_count,
                "virtual disk would overlap the metadata chunk",
            ));
        }
        Ok(Geometry {
            chunk_size: cs,
            block_size: bs,
            entries_per_group: n,
            group_bytes: s,
            groups_per_table: c,
            table_span: d,
            directory_entries: t,
            directory_bytes,
            directory_offsets: [a, b],
            size,
            max_size,
            metadata_offset,
        })
    }

    /// The largest virtual size this image can take: the disk must stay
    /// below the metadata chunk.
    pub fn size_limit(&self) -> u64 {
        self.metadata_offset.min(self.max_size)
    }

    pub fn locate(&self, offset: u64) -> Location {
        let cs = self.chunk_size;
        let q = (offset % self.table_span) / cs;
        Location {
            table: offset / self.table_span,
            group: q / self.entries_per_group,
            index: q % self.entries_per_group,
            within: offset % cs,
        }
    }

    /// Global number of the chunk-group holding `offset`: `table * C + group`.
    pub fn group_number(&self, loc: &Location) -> u64 {
        loc.table * self.groups_per_table + loc.group
    }

    /// Virtual offset where the global chunk-group `group_number` starts.
    pub fn group_start(&self, group_number: u64) -> u64 {
        let t = group_number / self.groups_per_table;
        let g = group_number % self.groups_per_table;
        t * self.table_span + g * self.entries_per_group * self.chunk_size
    }

    /// Virtual bytes covered by one chunk-group.
    pub fn group_span(&self) -> u64 {
        self.entries_per_group * self.chunk_size
    }

    /// Byte offset of a chunk-group inside its table chunk.
    pub fn group_offset_in_table(&self, group: u64) -> u64 {
        group * self.group_bytes
    }

    /// Byte offset of data entry `index` inside its chunk-group.
    pub fn entry_offset_in_group(&self, index: u64) -> u64 {
        8 * index
    }

    /// Byte offset of the bitmap entry inside its chunk-group.
    pub fn bitmap_entry_offset_in_group(&self) -> u64 {
        8 * self.entries_per_group
    }

    pub fn sectors_per_chunk(&self) -> u64 {
        self.chunk_size / self.block_size
    }

    pub fn metadata_location(&self) -> Location {
        self.locate(self.metadata_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn real_header(sectors: u64) -> Header {
        Header {
            flags: 0,
            directory_offsets: [0x200, 0x41400],
            uuid: [0; 16],
            sector_count: sectors,
            max_sector_count: 1 << 43,
            chunk_size: 1 << 20,
            block_size: 512,
            segment_count: 0,
            metadata_chunk: 0xFFFF_FFFF,
            unknown: [0; 16],
            read_only_flags: 0,
            metadata_flags: 0,
            metadata_read_only_flags: 0,
        }
    }

    #[test]
    fn real_geometry() {
        let g = Geometry::new(&real_header(1_000_000)).unwrap();
        assert_eq!(g.entries_per_group, 2048);
        assert_eq!(g.group_bytes, 16392);
        assert_eq!(g.groups_per_table, 63);
        assert_eq!(g.table_span, 126 << 30);
        assert_eq!(g.directory_entries, 33289);
        assert_eq!(g.directory_offsets[0] + g.directory_bytes, 0x41400);
        assert_eq!(g.size, 512_000_000);
        assert_eq!(g.metadata_offset, (4u64 << 50) - (1 << 20));
    }

    #[test]
    fn worked_example_from_spec() {
        let g = Geometry::new(&real_header(1_000_000)).unwrap();
        let l = g.locate((130 << 30) + (5 << 20) + 1000);
        assert_eq!(
            l,
            Location {
                table: 1,
                group: 2,
                index: 5,
                within: 1000
            }
        );
        // data entry index 4103, bitmap entry index 6146
        let idx = |off: u64| (g.group_offset_in_table(l.group) + off) / 8;
        assert_eq!(idx(g.entry_offset_in_group(l.index)), 4103);
        assert_eq!(idx(g.bitmap_entry_offset_in_group()), 6146);
        let m = g.metadata_location();
        assert_eq!((m.table, m.group, m.index), (33288, 7, 2047));
    }

    #[test]
    fn rejects_hostile_fields() {
        let field_of = |h: Header| match Geometry::new(&h) {
            Err(FormatError::BadField { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        };
        let mut h = real_header(1);
        h.block_size = 0;
        assert_eq!(field_of(h), "block size");
        let mut h = real_header(1);
        h.block_size = 1000;
        assert_eq!(field_of(h), "block size");
        let mut h = real_header(1);
        h.chunk_size = 1000;
        assert_eq!(field_of(h), "chunk size");
        let mut h = real_header(1);
        h.chunk_size = 0;
        assert_eq!(field_of(h), "chunk size");
        let mut h = real_header(1);
        h.chunk_size = 0x8000_0000;
        assert_eq!(field_of(h), "chunk size");
        let mut h = real_header(1);
        h.max_sector_count = u64::MAX;
        assert_eq!(field_of(h), "max sector count");
        let mut h = real_header(1);
        h.sector_count = (1 << 43) + 1;
        assert_eq!(field_of(h), "sector count");
        let mut h = real_header(1);
        h.directory_offsets[1] = 0x400;
        assert_eq!(field_of(h), "directory B offset");
        let mut h = real_header(1);
        h.directory_offsets[0] = 0x100000 - 0x200;
        assert_eq!(field_of(h), "directory A offset");
        let mut h = real_header(1);
        h.metadata_chunk = u64::MAX;
        assert_eq!(field_of(h), "metadata chunk");
        let mut h = real_header(1 << 43);
        h.metadata_chunk = 0xFFFF_FFFF;
        assert_eq!(field_of(h), "sector count");
    }

    /// Values chosen to wrap the old unchecked sums and products; each must
    /// be refused with the exact field and reason, never a panic or a wrap.
    #[test]
    fn hostile_values_do_not_overflow() {
        // The last sector-aligned offset below 2^64.
        const ALIGNED_MAX: u64 = !511;
        let outside = "must be sector-aligned, after the header and inside chunk 0";
        let overflows = "geometry overflows 64 bits";
        type Patch = fn(&mut Header);
        let cases: Vec<(&str, Patch, FormatError)> = vec![
            (
                "dir A u64::MAX",
                |h| h.directory_offsets[0] = u64::MAX,
                FormatError::field("directory A offset", u64::MAX, outside),
            ),
            (
                "dir A aligned near u64::MAX",
                |h| h.directory_offsets[0] = ALIGNED_MAX,
                FormatError::field("directory A offset", ALIGNED_MAX, outside),
            ),
            (
                "dir B aligned near u64::MAX",
                |h| h.directory_offsets[1] = ALIGNED_MAX,
                FormatError::field("directory B offset", ALIGNED_MAX, outside),
            ),
            (
                "dir B wrapping round to 0x200",
                |h| h.directory_offsets[1] = ALIGNED_MAX - 0x40e00,
                FormatError::field("directory B offset", ALIGNED_MAX - 0x40e00, outside),
            ),
            (
                "chunk size u32::MAX",
                |h| h.chunk_size = u32::MAX,
                FormatError::field(
                    "chunk size",
                    u32::MAX.into(),
                    "must be a non-zero multiple of the block size",
                ),
            ),
            (
                "chunk size u32::MAX, aligned",
                |h| h.chunk_size = !511u32,
                FormatError::field("chunk size", (!511u32).into(), "larger than 256 MiB"),
            ),
            (
                "max sector count u64::MAX",
                |h| h.max_sector_count = u64::MAX,
                FormatError::field("max sector count", u64::MAX, overflows),
            ),
            (
                // max_sector_count * bs fits, but T * D does not.
                "directory span past 2^64",
                |h| {
                    h.chunk_size = 256 << 20;
                    h.max_sector_count = u64::MAX / 512;
                },
                FormatError::field("max sector count", u64::MAX / 512, overflows),
            ),
            (
                "metadata chunk u64::MAX",
                |h| h.metadata_chunk = u64::MAX,
                FormatError::field("metadata chunk", u64::MAX, "outside the directory's span"),
            ),
            (
                // metadata_chunk * cs fits, + cs does not.
                "metadata chunk at the last MiB of 2^64",
                |h| h.metadata_chunk = u64::MAX >> 20,
                FormatError::field(
                    "metadata chunk",
                    u64::MAX >> 20,
                    "outside the directory's span",
                ),
            ),
        ];
        for (what, patch, want) in cases {
            let mut h = real_header(1);
            patch(&mut h);
            assert_eq!(Geometry::new(&h), Err(want), "{what}");
        }
    }

    /// The largest directory span that fits in 64 bits is accepted, and
    /// every figure derived from its last table is computable (unit tests
    /// run with overflow checks, so a wrap would panic here).
    #[test]
    fn largest_span_is_accepted_and_usable() {
        let mut h = real_header(1);
        h.chunk_size = 256 << 20;
        // D = C * N * cs with C = 2^28 / 16392 = 16376, N = 2048.
        let d = 16376 * 2048 * (256 << 20);
        let tables = u64::MAX / d;
        h.max_sector_count = tables * d / 512;
        h.metadata_chunk = tables * d / (256 << 20) - 1;
        let g = Geometry::new(&h).unwrap();
        assert_eq!((g.table_span, g.directory_entries), (d, tables));
        let last = g.locate(tables * d - 1);
        assert_eq!(
            (last.table, last.group),
            (tables - 1, g.groups_per_table - 1)
        );
        let n = g.group_number(&last);
        assert_eq!(g.group_start(n) + g.group_span(), tables * d);
        let in_table = g.group_offset_in_table(last.group) + g.group_bytes;
        assert!(in_table <= g.chunk_size);
        assert_eq!(g.metadata_offset + g.chunk_size, tables * d);
        // One more table's worth of sectors no longer fits.
        h.max_sector_count = tables * d / 512 + 1;
        assert_eq!(
            Geometry::new(&h),
            Err(FormatError::field(
                "max sector count",
                h.max_sector_count,
                "geometry overflows 64 bits"
            ))
        );
    }
}

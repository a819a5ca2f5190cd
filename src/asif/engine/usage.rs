//! Which chunks of the container the index uses: the walk over every table
//! that `check`, `compact` and the scan at open share.
//!
//! Memory is bounded whatever the virtual or file size: tables are read a
//! chunk-group at a time (holes in a table chunk are skipped, not read), and
//! "is this chunk used" is a bitmap over a window of at most [`WINDOW`]
//! chunks; a file longer than that is walked once per window.

use std::collections::HashMap;

use super::alloc::FreeRanges;
use super::types::PhysChunk;
use crate::asif::format::{
    be_u64, BitmapEntry, ChunkEntry, ChunkState, Geometry, MAX_CHUNK_NUMBER,
};
use crate::host::file::Storage;

/// Chunks covered by one pass (a 16 MiB bitmap; 128 TiB of 1 MiB chunks).
pub const WINDOW: u64 = 1 << 27;

/// What uses a chunk of the container.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Owner {
    Header,
    Table(u64),
    Data(u64, u64, u64),
    Bitmap(u64, u64),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Header => write!(f, "the header"),
            Owner::Table(t) => write!(f, "table {t}"),
            Owner::Data(t, g, k) => write!(f, "table {t} group {g} entry {k}"),
            Owner::Bitmap(t, g) => write!(f, "the bitmap of table {t} group {g}"),
        }
    }
}

/// Calls `f(table, group, bytes)` for every chunk-group of every table in
/// `tables` (physical table chunk numbers, 0 = none) that holds any data
/// on the host; groups that are all hole read as "never written" anyway.
/// Tables at or past `end` are skipped (the caller reports them).
pub fn for_each_group(
    storage: &dyn Storage,
    geo: &Geometry,
    tables: &[u64],
    end: u64,
    mut f: impl FnMut(u64, u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let cs = geo.chunk_size;
    let mut buf = vec![0u8; geo.group_bytes as usize];
    for (t, &tc) in tables.iter().enumerate() {
        if tc == 0 || tc >= end {
            continue;
        }
        let base = tc * cs;
        // Where the host's next data starts, as last asked; stale once a
        // group past it is reached.
        let mut next_data = 0u64;
        for g in 0..geo.groups_per_table {
            let at = base + geo.group_offset_in_table(g);
            let group_end = at + geo.group_bytes;
            if next_data < at {
                next_data = storage.next_data(at)?.unwrap_or(u64::MAX);
            }
            if next_data >= group_end {
                continue;
            }
            storage.read_at(&mut buf, at)?;
            f(t as u64, g, &buf)?;
        }
    }
    Ok(())
}

/// How an entry uses its chunk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Use {
    Whole,
    /// A partially valid data chunk.
    Partial,
    /// An entry out of rule; its chunk number (maybe 0) is still counted
    /// as used, so a damaged entry never makes its chunk look free.
    OutOfRule,
}

/// Calls `f(chunk, owner, use)` for every chunk the index names, including
/// chunk 0 and the table chunks, and for every entry out of rule.
pub fn for_each_use(
    storage: &dyn Storage,
    geo: &Geometry,
    tables: &[u64],
    end: u64,
    mut f: impl FnMut(u64, Owner, Use),
) -> std::io::Result<()> {
    f(0, Owner::Header, Use::Whole);
    for (t, &tc) in tables.iter().enumerate() {
        if tc != 0 {
            f(tc, Owner::Table(t as u64), Use::Whole);
        }
    }
    let n = geo.entries_per_group as usize;
    for_each_group(storage, geo, tables, end, |t, g, bytes| {
        let bitmap = be_u64(bytes, 8 * n);
        match BitmapEntry(bitmap).chunk() {
            Ok(None) => {}
            Ok(Some(b)) => f(b, Owner::Bitmap(t, g), Use::Whole),
            Err(_) => f(
                bitmap & MAX_CHUNK_NUMBER,
                Owner::Bitmap(t, g),
                Use::OutOfRule,
            ),
        }
        for k in 0..n {
            let raw = be_u64(bytes, 8 * k);
            let who = Owner::Data(t, g, k as u64);
            match ChunkEntry(raw).state() {
                Some(ChunkState::Full(c)) => f(c, who, Use::Whole),
                Some(ChunkState::Partial(c)) => f(c, who, Use::Partial),
                Some(_) => {}
                None => f(raw & MAX_CHUNK_NUMBER, who, Use::OutOfRule),
            }
        }
        Ok(())
    })
}

/// The result of [`scan`].
#[derive(Debug, Default)]
pub struct Usage {
    /// Chunks below the end that nothing names.
    pub free: FreeRanges,
    /// Chunks named twice, with the second user found (first few only).
    pub shared: Vec<(PhysChunk, Owner)>,
    /// How many chunks are named more than once.
    pub shared_count: u64,
    /// Chunks named at or past the end of the file (first few only).
    pub past_end: Vec<(PhysChunk, Owner)>,
    /// Chunks in use, counting chunk 0 and every table.
    pub used: u64,
    /// Data entries naming a chunk, and how many of them partially valid.
    pub data_chunks: u64,
    pub partial_chunks: u64,
    /// The first entry found out of rule.
    pub out_of_rule: Option<Owner>,
}

/// How many shared or out-of-range chunks a [`Usage`] lists.
pub const LISTED: usize = 100;

/// Walks the index once per window of the file's `end` chunks and reports
/// which chunks are used, free or shared.
pub fn scan(
    storage: &dyn Storage,
    geo: &Geometry,
    tables: &[u64],
    end: u64,
) -> std::io::Result<Usage> {
    let mut u = Usage::default();
    let mut lo = 0;
    while lo < end {
        let hi = (lo + WINDOW).min(end);
        let mut bits = vec![0u64; (hi - lo).div_ceil(64) as usize];
        for_each_use(storage, geo, tables, end, |c, who, how| {
            if lo == 0 {
                match (how, who) {
                    (Use::OutOfRule, _) => {
                        u.out_of_rule.get_or_insert(who);
                        if c == 0 {
                            return;
                        }
                    }
                    (Use::Partial, _) => {
                        u.data_chunks += 1;
                        u.partial_chunks += 1;
                    }
                    (Use::Whole, Owner::Data(..)) => u.data_chunks += 1,
                    _ => {}
                }
            } else if c == 0 {
                return;
            }
            if c >= end {
                if lo == 0 && u.past_end.len() < LISTED {
                    u.past_end.push((PhysChunk(c), who));
                }
                return;
            }
            if c < lo || c >= hi {
                return;
            }
            let i = (c - lo) as usize;
            let (w, b) = (i / 64, 1u64 << (i % 64));
            if bits[w] & b != 0 {
                u.shared_count += 1;
                if u.shared.len() < LISTED {
                    u.shared.push((PhysChunk(c), who));
                }
            } else {
                bits[w] |= b;
                u.used += 1;
            }
        })?;
        let mut c = lo.max(1);
        while c < hi {
            let i = (c - lo) as usize;
            if bits[i / 64] & (1 << (i % 64)) != 0 {
                c += 1;
                continue;
            }
            let start = c;
            while c < hi && bits[(c - lo) as usize / 64] & (1 << ((c - lo) % 64)) == 0 {
                c += 1;
            }
            u.free.insert(start, c);
        }
        lo = hi;
    }
    Ok(u)
}

/// The first user of each of `chunks`, found by one more walk (to name both
/// sides of a shared chunk).
pub fn first_users(
    storage: &dyn Storage,
    geo: &Geometry,
    tables: &[u64],
    end: u64,
    chunks: &[PhysChunk],
) -> std::io::Result<HashMap<u64, Owner>> {
    let mut want: HashMap<u64, Option<Owner>> = chunks.iter().map(|c| (c.0, None)).collect();
    for_each_use(storage, geo, tables, end, |c, who, _| {
        if let Some(slot @ None) = want.get_mut(&c) {
            *slot = Some(who);
        }
    })?;
    Ok(want
        .into_iter()
        .filter_map(|(c, o)| o.map(|o| (c, o)))
        .collect())
}

/// Offsets inside `start..end` chunks that hold data on the host, as
/// chunk numbers (each at most once), using SEEK_DATA.
pub fn chunks_holding_data(
    storage: &dyn Storage,
    cs: u64,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut c = start;
    while c < end {
        match storage.next_data(c * cs)? {
            Some(d) if d / cs < end => {
                let n = (d / cs).max(c);
                f(n)?;
                c = n + 1;
            }
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::file::FileStorage;
    use crate::{CreateOptions, Image, OpenOptions};

    /// Only the chunk-groups that hold data on the host are read: those
    /// written, and a neighbour sharing a host block with one (a group is
    /// 16,392 bytes, host holes are whole 4 KiB blocks).
    #[test]
    fn groups_that_are_holes_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.asif");
        let img = Image::create(
            &p,
            &CreateOptions {
                size: 200 << 30,
                ..Default::default()
            },
        )
        .unwrap();
        let geo = img.geometry().clone();
        for group in [5u64, 6, 40] {
            img.write_at(&[1u8; 512], geo.group_start(group)).unwrap();
        }
        img.close().unwrap();
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        let tables: Vec<u64> = (0..geo.directory_entries)
            .map(|t| {
                let mut b = [0u8; 8];
                let (active, _) = img.active_directory();
                let at = geo.directory_offsets[active] + 8 * (t + 1);
                std::os::unix::fs::FileExt::read_exact_at(
                    &std::fs::File::open(&p).unwrap(),
                    &mut b,
                    at,
                )
                .unwrap();
                u64::from_be_bytes(b)
            })
            .collect();
        let storage = FileStorage::new(std::fs::File::open(&p).unwrap());
        let end = storage.len().unwrap() / geo.chunk_size;
        let mut seen = Vec::new();
        for_each_group(&storage, &geo, &tables[..1], end, |t, g, _| {
            seen.push((t, g));
            Ok(())
        })
        .unwrap();
        let written = [5u64, 6, 40];
        for g in written {
            assert!(seen.contains(&(0, g)), "group {g} not read: {seen:?}");
        }
        for &(t, g) in &seen {
            assert_eq!(t, 0);
            assert!(
                written.iter().any(|&w| w.abs_diff(g) <= 1),
                "group {g} is all hole but was read: {seen:?}"
            );
        }
    }
}

//! `mish` block tables (one per `blkx` resource) and the run map built
//! from all of them.
//!
//! Invariants of a [`RunMap`] (checked by [`RunMap::build`]): runs are
//! sorted by sector, do not overlap, end inside the disk, and every run
//! with data names a range inside the data fork once its table's data
//! start is added to its offset; a compressed run expands to at most
//! [`MAX_RUN_BYTES`]. Sectors no run covers read as zeros.

use super::trailer::{be32, be64, Checksum};
use super::Malformed;

pub const MISH_MAGIC: &[u8; 4] = b"mish";
pub const MISH_VERSION: u32 = 1;
/// Bytes before the first run.
pub const MISH_HEADER: usize = 0xCC;
pub const RUN_SIZE: usize = 40;
pub const SECTOR: u64 = 512;
/// Largest run asiffs decompresses (hdiutil writes 1 MiB runs).
pub const MAX_RUN_BYTES: u64 = 64 << 20;

/// What a run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunKind {
    Zero,
    Raw,
    Free,
    Adc,
    Zlib,
    Bzip2,
    Lzfse,
    Lzma,
    Comment,
    End,
}

impl RunKind {
    pub fn from_u32(v: u32) -> Option<RunKind> {
        Some(match v {
            0x0000_0000 => RunKind::Zero,
            0x0000_0001 => RunKind::Raw,
            0x0000_0002 => RunKind::Free,
            0x8000_0004 => RunKind::Adc,
            0x8000_0005 => RunKind::Zlib,
            0x8000_0006 => RunKind::Bzip2,
            0x8000_0007 => RunKind::Lzfse,
            0x8000_0008 => RunKind::Lzma,
            0x7FFF_FFFE => RunKind::Comment,
            0xFFFF_FFFF => RunKind::End,
            _ => return None,
        })
    }

    pub fn to_u32(self) -> u32 {
        match self {
            RunKind::Zero => 0x0000_0000,
            RunKind::Raw => 0x0000_0001,
            RunKind::Free => 0x0000_0002,
            RunKind::Adc => 0x8000_0004,
            RunKind::Zlib => 0x8000_0005,
            RunKind::Bzip2 => 0x8000_0006,
            RunKind::Lzfse => 0x8000_0007,
            RunKind::Lzma => 0x8000_0008,
            RunKind::Comment => 0x7FFF_FFFE,
            RunKind::End => 0xFFFF_FFFF,
        }
    }

    pub fn is_compressed(self) -> bool {
        matches!(
            self,
            RunKind::Adc | RunKind::Zlib | RunKind::Bzip2 | RunKind::Lzfse | RunKind::Lzma
        )
    }

    /// Whether the run's bytes come from the data fork.
    pub fn has_data(self) -> bool {
        self == RunKind::Raw || self.is_compressed()
    }

    pub fn name(self) -> &'static str {
        match self {
            RunKind::Zero => "zero",
            RunKind::Raw => "raw",
            RunKind::Free => "free",
            RunKind::Adc => "ADC",
            RunKind::Zlib => "zlib",
            RunKind::Bzip2 => "bzip2",
            RunKind::Lzfse => "LZFSE",
            RunKind::Lzma => "LZMA",
            RunKind::Comment => "comment",
            RunKind::End => "end",
        }
    }
}

/// One 40-byte run of a `mish` table, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEntry {
    pub kind: RunKind,
    pub comment: u32,
    /// Relative to the table's first sector.
    pub sector: u64,
    pub sectors: u64,
    /// Relative to the table's data start (itself relative to the data
    /// fork).
    pub offset: u64,
    pub length: u64,
}

impl RunEntry {
    /// A run without a comment.
    pub fn new(kind: RunKind, sector: u64, sectors: u64, offset: u64, length: u64) -> RunEntry {
        RunEntry {
            kind,
            comment: 0,
            sector,
            sectors,
            offset,
            length,
        }
    }
}

/// A `mish` block table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mish {
    pub first_sector: u64,
    pub sector_count: u64,
    /// Added to every run's offset: where the table's data begins in the
    /// data fork (0 in what current hdiutil writes, not in older images).
    pub data_start: u64,
    pub buffers_needed: u32,
    pub descriptor: u32,
    pub checksum: Checksum,
    pub runs: Vec<RunEntry>,
}

impl Mish {
    pub fn decode(b: &[u8]) -> Result<Mish, Malformed> {
        if b.len() < MISH_HEADER {
            return Err(Malformed(format!(
                "mish table is truncated ({} of {MISH_HEADER} header bytes)",
                b.len()
            )));
        }
        if &b[0..4] != MISH_MAGIC {
            return Err(Malformed("data does not start with a mish table".into()));
        }
        let version = be32(b, 0x04);
        if version != MISH_VERSION {
            return Err(Malformed(format!(
                "mish table version {version} (only {MISH_VERSION} is known)"
            )));
        }
        let count = be32(b, 0xC8);
        let room = (b.len() - MISH_HEADER) / RUN_SIZE;
        if u64::from(count) > room as u64 {
            return Err(Malformed(format!(
                "mish table lists {count} runs but holds only {room}"
            )));
        }
        let mut runs = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let r = &b[MISH_HEADER + i * RUN_SIZE..MISH_HEADER + (i + 1) * RUN_SIZE];
            let raw_kind = be32(r, 0);
            let kind = RunKind::from_u32(raw_kind)
                .ok_or_else(|| Malformed(format!("run {i} has unknown type {raw_kind:#010x}")))?;
            runs.push(RunEntry {
                kind,
                comment: be32(r, 4),
                sector: be64(r, 8),
                sectors: be64(r, 16),
                offset: be64(r, 24),
                length: be64(r, 32),
            });
        }
        Ok(Mish {
            first_sector: be64(b, 0x08),
            sector_count: be64(b, 0x10),
            data_start: be64(b, 0x18),
            buffers_needed: be32(b, 0x20),
            descriptor: be32(b, 0x24),
            checksum: Checksum::decode(&b[0x40..0xC8]),
            runs,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; MISH_HEADER + self.runs.len() * RUN_SIZE];
        b[0..4].copy_from_slice(MISH_MAGIC);
        b[0x04..0x08].copy_from_slice(&MISH_VERSION.to_be_bytes());
        b[0x08..0x10].copy_from_slice(&self.first_sector.to_be_bytes());
        b[0x10..0x18].copy_from_slice(&self.sector_count.to_be_bytes());
        b[0x18..0x20].copy_from_slice(&self.data_start.to_be_bytes());
        b[0x20..0x24].copy_from_slice(&self.buffers_needed.to_be_bytes());
        b[0x24..0x28].copy_from_slice(&self.descriptor.to_be_bytes());
        self.checksum.encode(&mut b[0x40..0xC8]);
        b[0xC8..0xCC].copy_from_slice(&(self.runs.len() as u32).to_be_bytes());
        for (i, r) in self.runs.iter().enumerate() {
            let o = MISH_HEADER + i * RUN_SIZE;
            b[o..o + 4].copy_from_slice(&r.kind.to_u32().to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&r.comment.to_be_bytes());
            b[o + 8..o + 16].copy_from_slice(&r.sector.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&r.sectors.to_be_bytes());
            b[o + 24..o + 32].copy_from_slice(&r.offset.to_be_bytes());
            b[o + 32..o + 40].copy_from_slice(&r.length.to_be_bytes());
        }
        b
    }
}

/// A run placed on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Absolute first sector.
    pub start: u64,
    pub sectors: u64,
    pub kind: RunKind,
    /// Relative to the data fork: the table's data start plus the run's
    /// own offset.
    pub offset: u64,
    pub length: u64,
    /// Index of its table in the plist's `blkx` array.
    pub table: usize,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.start + self.sectors
    }
}

/// Every run of every table, sorted by sector.
#[derive(Debug, Clone)]
pub struct RunMap {
    pub runs: Vec<Run>,
    /// Disk size in sectors.
    pub sectors: u64,
}

impl RunMap {
    /// Places the runs of `tables` (in plist order) on a disk of
    /// `disk_sectors` sectors (0: as far as the tables reach), checking
    /// them against a data fork of `fork_len` bytes.
    pub fn build(tables: &[Mish], disk_sectors: u64, fork_len: u64) -> Result<RunMap, Malformed> {
        let mut spans = Vec::with_capacity(tables.len());
        for (t, m) in tables.iter().enumerate() {
            let end = m.first_sector.checked_add(m.sector_count).ok_or_else(|| {
                Malformed(format!(
                    "blkx entry {t}: first sector {} + sector count {} overflows",
                    m.first_sector, m.sector_count
                ))
            })?;
            spans.push((m.first_sector, end, t));
        }
        let sectors = if disk_sectors == 0 {
            spans.iter().map(|s| s.1).max().unwrap_or(0)
        } else {
            disk_sectors
        };
        if sectors.checked_mul(SECTOR).is_none() {
            return Err(Malformed(format!(
                "sector count {sectors} overflows a byte size"
            )));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            let ((s0, e0, t0), (s1, e1, t1)) = (w[0], w[1]);
            if s1 < e0 {
                return Err(Malformed(format!(
                    "blkx entry {t1} (sectors {s1}..{e1}) overlaps blkx entry {t0} (sectors {s0}..{e0})"
                )));
            }
        }
        if let Some(&(s, e, t)) = spans.iter().find(|s| s.1 > sectors) {
            return Err(Malformed(format!(
                "blkx entry {t} (sectors {s}..{e}) runs past the end of the disk ({sectors} sectors)"
            )));
        }
        let mut runs = Vec::new();
        for &(_, _, t) in &spans {
            place(&tables[t], t, fork_len, &mut runs)?;
        }
        Ok(RunMap { runs, sectors })
    }

    pub fn size(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Index of the first run ending after `sector` (`runs.len()` if none).
    pub fn find(&self, sector: u64) -> usize {
        self.runs.partition_point(|r| r.end() <= sector)
    }

    pub fn has_compressed(&self) -> Option<RunKind> {
        self.runs
            .iter()
            .find(|r| r.kind.is_compressed())
            .map(|r| r.kind)
    }
}

/// Checks one table's runs and appends them, made absolute.
fn place(m: &Mish, t: usize, fork_len: u64, out: &mut Vec<Run>) -> Result<(), Malformed> {
    let err = |i: usize, what: String| Malformed(format!("blkx entry {t} run {i}: {what}"));
    // Checked here, even for a table without data, so that a run an edit
    // adds past the fork's end is never before the table's data start.
    if m.data_start > fork_len {
        return Err(Malformed(format!(
            "blkx entry {t}: data start {:#x} lies past the end of the data fork ({fork_len} bytes)",
            m.data_start
        )));
    }
    let mut prev_end = 0u64;
    let mut prev = None;
    for (i, r) in m.runs.iter().enumerate() {
        if r.kind == RunKind::End {
            break;
        }
        if r.kind == RunKind::Comment || r.sectors == 0 {
            continue;
        }
        let end = r.sector.checked_add(r.sectors).ok_or_else(|| {
            err(
                i,
                format!("sector {} + count {} overflows", r.sector, r.sectors),
            )
        })?;
        if r.sector < prev_end {
            return Err(err(
                i,
                format!(
                    "starts at sector {}, before run {} ends (sector {prev_end}): runs overlap or are out of order",
                    r.sector,
                    prev.unwrap_or(0)
                ),
            ));
        }
        if end > m.sector_count {
            return Err(err(
                i,
                format!(
                    "ends at sector {end}, past the table's {} sectors",
                    m.sector_count
                ),
            ));
        }
        let bytes = r.sectors * SECTOR; // end <= sector_count, whose bytes fit
        if r.kind == RunKind::Raw && r.length != bytes {
            return Err(err(
                i,
                format!("raw run of {} sectors stores {} bytes", r.sectors, r.length),
            ));
        }
        if r.kind.is_compressed() && bytes > MAX_RUN_BYTES {
            return Err(err(
                i,
                format!(
                    "{} run of {} sectors is larger than the {} MiB asiffs decompresses",
                    r.kind.name(),
                    r.sectors,
                    MAX_RUN_BYTES >> 20
                ),
            ));
        }
        if r.kind.is_compressed() && r.length > MAX_RUN_BYTES + (1 << 20) {
            return Err(err(
                i,
                format!(
                    "{} run stores {} compressed bytes, more than any {} MiB run needs",
                    r.kind.name(),
                    r.length,
                    MAX_RUN_BYTES >> 20
                ),
            ));
        }
        // Data runs are checked against the fork; others carry no data,
        // whatever their offset says.
        let offset = if r.kind.has_data() {
            let at = m.data_start.checked_add(r.offset);
            match at.and_then(|a| a.checked_add(r.length)) {
                Some(e) if e <= fork_len => at.unwrap_or(0),
                _ => {
                    let start = match m.data_start {
                        0 => String::new(),
                        d => format!("data start {d:#x} + "),
                    };
                    return Err(err(
                        i,
                        format!(
                            "data at {start}{:#x}+{:#x} lies past the end of the data fork ({fork_len} bytes)",
                            r.offset, r.length
                        ),
                    ));
                }
            }
        } else {
            0
        };
        out.push(Run {
            start: m.first_sector + r.sector,
            sectors: r.sectors,
            kind: r.kind,
            offset,
            length: r.length,
            table: t,
        });
        prev_end = end;
        prev = Some(i);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(first: u64, count: u64, runs: Vec<RunEntry>) -> Mish {
        Mish {
            first_sector: first,
            sector_count: count,
            data_start: 0,
            buffers_needed: 2048,
            descriptor: 1,
            checksum: Checksum::crc32(0x1234_5678),
            runs,
        }
    }

    #[test]
    fn mish_round_trip() {
        let m = table(
            40,
            3760,
            vec![
                RunEntry::new(RunKind::Zlib, 0, 2010, 10251, 6158),
                RunEntry::new(RunKind::Zero, 2010, 38, 0, 0),
                RunEntry::new(RunKind::Free, 2048, 1712, 9781, 0),
                RunEntry::new(RunKind::End, 3760, 0, 0, 0),
            ],
        );
        let b = m.encode();
        assert_eq!(b.len(), 0xCC + 4 * 40);
        assert_eq!(be32(&b, 0xC8), 4);
        assert_eq!(be32(&b, 0xCC), 0x8000_0005);
        assert_eq!(Mish::decode(&b).unwrap(), m);
    }

    #[test]
    fn mish_refusals() {
        let m = table(0, 8, vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4096)]);
        let mut b = m.encode();
        assert_eq!(
            Mish::decode(&b[..100]).unwrap_err().0,
            "mish table is truncated (100 of 204 header bytes)"
        );
        b[0xC8..0xCC].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            Mish::decode(&b).unwrap_err().0,
            "mish table lists 2 runs but holds only 1"
        );
        b[0xC8..0xCC].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Mish::decode(&b).unwrap_err().0,
            "mish table lists 4294967295 runs but holds only 1"
        );
        b[0xC8..0xCC].copy_from_slice(&1u32.to_be_bytes());
        b[0xCC..0xD0].copy_from_slice(&0x8000_0009u32.to_be_bytes());
        assert_eq!(
            Mish::decode(&b).unwrap_err().0,
            "run 0 has unknown type 0x80000009"
        );
        b[4] = 9;
        assert_eq!(
            Mish::decode(&b).unwrap_err().0,
            "mish table version 150994945 (only 1 is known)"
        );
    }

    #[test]
    fn builds_sorted_map() {
        let a = table(8, 8, vec![RunEntry::new(RunKind::Raw, 0, 8, 4096, 4096)]);
        let b = table(0, 8, vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4096)]);
        let map = RunMap::build(&[a, b], 16, 8192).unwrap();
        assert_eq!(map.runs.len(), 2);
        assert_eq!((map.runs[0].start, map.runs[0].table), (0, 1));
        assert_eq!((map.runs[1].start, map.runs[1].table), (8, 0));
        assert_eq!(map.find(7), 0);
        assert_eq!(map.find(8), 1);
        assert_eq!(map.find(16), 2);
    }

    #[test]
    fn map_refusals() {
        let e =
            |tables: &[Mish], sectors, fork| RunMap::build(tables, sectors, fork).unwrap_err().0;
        let overlap = table(
            0,
            16,
            vec![
                RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
                RunEntry::new(RunKind::Zero, 4, 4, 0, 0),
            ],
        );
        assert_eq!(
            e(&[overlap], 16, 4096),
            "blkx entry 0 run 1: starts at sector 4, before run 0 ends (sector 8): runs overlap or are out of order"
        );
        let huge = table(
            0,
            u64::MAX,
            vec![RunEntry::new(RunKind::Zero, 0, u64::MAX, 0, 0)],
        );
        assert_eq!(
            e(std::slice::from_ref(&huge), 0, 0),
            format!("sector count {} overflows a byte size", u64::MAX)
        );
        assert_eq!(
            e(&[huge], 16, 0),
            format!(
                "blkx entry 0 (sectors 0..{}) runs past the end of the disk (16 sectors)",
                u64::MAX
            )
        );
        let wrap = table(1, u64::MAX, vec![]);
        assert_eq!(
            e(&[wrap], 16, 0),
            format!(
                "blkx entry 0: first sector 1 + sector count {} overflows",
                u64::MAX
            )
        );
        let run_wrap = table(0, 16, vec![RunEntry::new(RunKind::Zero, 2, u64::MAX, 0, 0)]);
        assert_eq!(
            e(&[run_wrap], 16, 0),
            format!(
                "blkx entry 0 run 0: sector 2 + count {} overflows",
                u64::MAX
            )
        );
        let past_table = table(0, 8, vec![RunEntry::new(RunKind::Zero, 4, 8, 0, 0)]);
        assert_eq!(
            e(&[past_table], 16, 0),
            "blkx entry 0 run 0: ends at sector 12, past the table's 8 sectors"
        );
        let past_fork = table(
            0,
            8,
            vec![RunEntry::new(RunKind::Raw, 0, 8, u64::MAX - 100, 4096)],
        );
        assert_eq!(
            e(&[past_fork], 8, 4096),
            "blkx entry 0 run 0: data at 0xffffffffffffff9b+0x1000 lies past the end of the data fork (4096 bytes)"
        );
        let short_raw = table(0, 8, vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4095)]);
        assert_eq!(
            e(&[short_raw], 8, 8192),
            "blkx entry 0 run 0: raw run of 8 sectors stores 4095 bytes"
        );
        let big = table(
            0,
            1 << 20,
            vec![RunEntry::new(RunKind::Bzip2, 0, 1 << 20, 0, 10)],
        );
        assert_eq!(
            e(&[big], 1 << 20, 4096),
            "blkx entry 0 run 0: bzip2 run of 1048576 sectors is larger than the 64 MiB asiffs decompresses"
        );
        let fat = table(0, 8, vec![RunEntry::new(RunKind::Lzfse, 0, 8, 0, 66 << 20)]);
        assert_eq!(
            e(&[fat], 8, 1 << 30),
            "blkx entry 0 run 0: LZFSE run stores 69206016 compressed bytes, more than any 64 MiB run needs"
        );
        let t1 = table(0, 10, vec![]);
        let t2 = table(8, 10, vec![]);
        assert_eq!(
            e(&[t1, t2], 20, 0),
            "blkx entry 1 (sectors 8..18) overlaps blkx entry 0 (sectors 0..10)"
        );
    }

    #[test]
    fn data_start_is_added_to_every_data_run() {
        let mut m = table(
            0,
            24,
            vec![
                RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
                RunEntry::new(RunKind::Comment, 8, 0, 99, 99),
                RunEntry::new(RunKind::Zlib, 8, 8, 4096, 100),
                // Free and zero runs keep whatever offset they hold.
                RunEntry::new(RunKind::Free, 16, 8, u64::MAX, 7),
                RunEntry::new(RunKind::End, 24, 0, 0, 0),
            ],
        );
        m.data_start = 1000;
        let map = RunMap::build(&[m.clone()], 24, 1000 + 4196).unwrap();
        let got: Vec<_> = map.runs.iter().map(|r| (r.kind, r.offset)).collect();
        assert_eq!(
            got,
            vec![
                (RunKind::Raw, 1000),
                (RunKind::Zlib, 5096),
                (RunKind::Free, 0)
            ]
        );
        assert_eq!(
            RunMap::build(&[m.clone()], 24, 1000 + 4195).unwrap_err().0,
            "blkx entry 0 run 2: data at data start 0x3e8 + 0x1000+0x64 lies past the end of the data fork (5195 bytes)"
        );
        m.data_start = u64::MAX;
        assert_eq!(
            RunMap::build(&[m.clone()], 24, 8192).unwrap_err().0,
            "blkx entry 0: data start 0xffffffffffffffff lies past the end of the data fork (8192 bytes)"
        );
        // The sum overflows even though each part fits the fork.
        m.data_start = 8192;
        m.runs[0].offset = u64::MAX - 10;
        assert_eq!(
            RunMap::build(&[m], 24, 8192).unwrap_err().0,
            "blkx entry 0 run 0: data at data start 0x2000 + 0xfffffffffffffff5+0x1000 lies past the end of the data fork (8192 bytes)"
        );
    }

    #[test]
    fn end_and_comment_runs_hold_nothing() {
        let m = table(
            0,
            8,
            vec![
                RunEntry::new(RunKind::Comment, 0, 0, 0, 0),
                RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
                RunEntry::new(RunKind::End, 8, 0, 0, 0),
                // Past the end marker: ignored, as hdiutil's readers do.
                RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
            ],
        );
        let map = RunMap::build(&[m], 8, 4096).unwrap();
        assert_eq!(map.runs.len(), 1);
    }
}

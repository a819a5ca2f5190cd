//! Edits of the block tables when a write lands in a zero or free run (or
//! in sectors no run covers) and when the disk is resized. Pure: the
//! caller writes the edited tables out (see `Udif::commit`).
//!
//! Invariants of the tables an edit produces:
//! - every table it changes lists its runs in order, back to back from
//!   its first sector to its end, closed by an end run; sectors it adds
//!   are free runs of at most [`FREE_RUN_SECTORS`];
//! - after [`Tables::cover`] the tables cover the whole disk, so every
//!   sector lies in exactly one run;
//! - a piece given new space becomes a raw run of at most
//!   [`ALLOC_SECTORS`], aligned to them on the disk; raw runs already
//!   there never move;
//! - tables a change does not touch keep their exact bytes; a table it
//!   touches keeps its data start, its runs' offsets stay relative to
//!   it (new raw runs included).

use super::blkx::{Mish, RunEntry, RunKind, RunMap, SECTOR};
use super::trailer::Checksum;
use super::Malformed;

/// Granularity of new space: whole aligned 64 MiB pieces (the largest run
/// qemu's reader takes). Each piece costs a rewrite of the property list
/// and three syncs, and adds a run to it, so small pieces make filling a
/// large disk quadratic; a big one costs nothing until written, since its
/// space is a hole in the host file until then (and `extents` follows
/// the host's holes inside raw runs).
pub const ALLOC_SECTORS: u64 = FREE_RUN_SECTORS;
/// Largest free run written: 64 MiB, the most sectors qemu's dmg reader
/// accepts in one run.
pub const FREE_RUN_SECTORS: u64 = 131_072;

/// Most runs an image's tables may need for it to be written: twice the
/// 1 MiB runs of a 1 TiB disk; their property list stays well under
/// [`super::MAX_PLIST`].
pub const MAX_RUNS: u64 = 1 << 21;

/// The tables as they will be rewritten.
#[derive(Debug, Clone)]
pub struct Tables {
    pub tables: Vec<Mish>,
    /// Each table's index in the current property list (`None`: new).
    pub origin: Vec<Option<usize>>,
    pub changed: Vec<bool>,
    /// Disk size in sectors.
    pub sectors: u64,
}

/// The runs that hold sectors, in order (comments and the end dropped).
fn plain(m: &Mish) -> Vec<RunEntry> {
    m.runs
        .iter()
        .take_while(|r| r.kind != RunKind::End)
        .filter(|r| r.kind != RunKind::Comment && r.sectors > 0)
        .copied()
        .collect()
}

/// Runs `tables` hold once covered (see [`Tables::cover`]) on a disk of
/// `sectors`, counted without building them (a hostile image may need
/// more than fit in memory).
pub fn cover_cost(tables: &[Mish], sectors: u64) -> u64 {
    if tables.is_empty() {
        return fills(0, sectors).saturating_add(1);
    }
    let plan = cover_plan(tables, &vec![false; tables.len()], sectors);
    let mut cost: u64 = tables.iter().map(|m| m.runs.len() as u64).sum();
    for (i, _, count, runs) in &plan {
        cost -= tables[*i].runs.len() as u64;
        let mut at = 0;
        for r in runs {
            cost = cost.saturating_add(fills(at, r.sector)).saturating_add(1);
            at = r.sector + r.sectors;
        }
        cost = cost.saturating_add(fills(at, *count)).saturating_add(1);
    }
    cost
}

/// What [`Tables::cover`] changes: `(table, first sector, sector count,
/// runs)` of each table it rewrites (those `changed` always).
fn cover_plan(
    tables: &[Mish],
    changed: &[bool],
    sectors: u64,
) -> Vec<(usize, u64, u64, Vec<RunEntry>)> {
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| tables[i].first_sector);
    let mut plan = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let next = order
            .get(k + 1)
            .map_or(sectors, |&j| tables[j].first_sector);
        let m = &tables[i];
        // The first table moves to sector 0; each reaches the next.
        let first = if k == 0 { 0 } else { m.first_sector };
        let end = next.max(m.first_sector + m.sector_count);
        if !changed[i] && first == m.first_sector && end == first + m.sector_count && contiguous(m)
        {
            continue;
        }
        let mut runs = plain(m);
        for r in &mut runs {
            r.sector += m.first_sector - first;
        }
        plan.push((i, first, end - first, runs));
    }
    plan
}

/// Whether `m`'s runs lie back to back over its sectors.
fn contiguous(m: &Mish) -> bool {
    let mut at = 0;
    let runs = m
        .runs
        .iter()
        .take_while(|r| r.kind != RunKind::End)
        .filter(|r| r.kind != RunKind::Comment && r.sectors > 0);
    for r in runs {
        if r.sector != at {
            return false;
        }
        at += r.sectors;
    }
    at == m.sector_count
}

/// Free runs that fill `from..to`.
fn fills(from: u64, to: u64) -> u64 {
    to.saturating_sub(from).div_ceil(FREE_RUN_SECTORS)
}

/// Sets `m`'s runs to `runs` (sorted, not overlapping), free runs filling
/// what they leave of `0..m.sector_count`, an end run closing them.
fn set_runs(m: &mut Mish, runs: Vec<RunEntry>) {
    let mut out = Vec::with_capacity(runs.len() + 1);
    let mut at = 0;
    let fill = |out: &mut Vec<RunEntry>, mut from: u64, to: u64| {
        while from < to {
            let n = FREE_RUN_SECTORS.min(to - from);
            out.push(RunEntry::new(RunKind::Free, from, n, 0, 0));
            from += n;
        }
    };
    for r in runs {
        fill(&mut out, at, r.sector);
        at = r.sector + r.sectors;
        out.push(r);
    }
    fill(&mut out, at, m.sector_count);
    out.push(RunEntry::new(RunKind::End, m.sector_count, 0, 0, 0));
    m.runs = out;
    // The image's checksums are "none" before any table changes.
    m.checksum = Checksum::NONE;
}

impl Tables {
    pub fn new(tables: &[Mish], sectors: u64) -> Tables {
        Tables {
            tables: tables.to_vec(),
            origin: (0..tables.len()).map(Some).collect(),
            changed: vec![false; tables.len()],
            sectors,
        }
    }

    pub fn any_changed(&self) -> bool {
        self.changed.iter().any(|&c| c)
            || self.origin.iter().enumerate().any(|(i, o)| *o != Some(i))
    }

    pub fn map(&self, fork_len: u64) -> Result<RunMap, Malformed> {
        RunMap::build(&self.tables, self.sectors, fork_len)
    }

    /// Makes the tables cover the whole disk: a gap before the first table
    /// moves its start to sector 0, a gap after a table extends it to the
    /// next (the last one to the disk's end), gaps inside a table become
    /// free runs; with no table at all, one is added.
    pub fn cover(&mut self) {
        if self.tables.is_empty() {
            self.tables.push(Mish {
                first_sector: 0,
                sector_count: 0,
                data_start: 0,
                buffers_needed: ALLOC_SECTORS as u32,
                descriptor: 1,
                checksum: Checksum::NONE,
                runs: Vec::new(),
            });
            self.origin.push(None);
            self.changed.push(true);
        }
        for (i, first, count, runs) in cover_plan(&self.tables, &self.changed, self.sectors) {
            let m = &mut self.tables[i];
            m.first_sector = first;
            m.sector_count = count;
            set_runs(m, runs);
            self.changed[i] = true;
        }
    }

    /// Cuts the disk to `sectors`: tables starting past it go, the one
    /// across it loses the runs past it. Returns the data-fork ranges
    /// `(offset, length)` of raw runs no longer referenced (data starts
    /// added; the tables passed [`RunMap::build`], so the sums fit).
    pub fn shrink(&mut self, sectors: u64) -> Vec<(u64, u64)> {
        let mut freed = Vec::new();
        let mut keep = Vec::new();
        for i in 0..self.tables.len() {
            let m = &mut self.tables[i];
            let base = m.data_start;
            if m.first_sector >= sectors {
                freed.extend(
                    plain(m)
                        .iter()
                        .filter(|r| r.kind == RunKind::Raw)
                        .map(|r| (base + r.offset, r.length)),
                );
                continue;
            }
            keep.push(i);
            let cut = sectors - m.first_sector;
            if m.sector_count <= cut {
                continue;
            }
            let mut runs = Vec::new();
            for mut r in plain(m) {
                if r.sector >= cut {
                    if r.kind == RunKind::Raw {
                        freed.push((base + r.offset, r.length));
                    }
                    continue;
                }
                if r.sector + r.sectors > cut {
                    r.sectors = cut - r.sector;
                    if r.kind == RunKind::Raw {
                        let kept = r.sectors * SECTOR;
                        freed.push((base + r.offset + kept, r.length - kept));
                        r.length = kept;
                    }
                }
                runs.push(r);
            }
            m.sector_count = cut;
            set_runs(m, runs);
            self.changed[i] = true;
        }
        self.changed = keep.iter().map(|&i| self.changed[i]).collect();
        self.origin = keep.iter().map(|&i| self.origin[i]).collect();
        self.tables = keep.iter().map(|&i| self.tables[i].clone()).collect();
        self.sectors = sectors;
        freed
    }

    /// The pieces (absolute sector ranges) of zero and free runs that
    /// writes to `ranges` need space for: each aligned [`ALLOC_SECTORS`]
    /// block they touch, cut to its run. Needs [`Tables::cover`] first.
    pub fn pieces(map: &RunMap, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &(s, e) in ranges {
            let mut i = map.find(s);
            while let Some(r) = map.runs.get(i).filter(|r| r.start < e) {
                if matches!(r.kind, RunKind::Zero | RunKind::Free) {
                    let (a, b) = (s.max(r.start), e.min(r.end()));
                    let mut p = a / ALLOC_SECTORS * ALLOC_SECTORS;
                    while p < b {
                        out.push((p.max(r.start), (p + ALLOC_SECTORS).min(r.end())));
                        p += ALLOC_SECTORS;
                    }
                }
                i += 1;
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Turns `pieces` (from [`Tables::pieces`], sorted) into raw runs
    /// whose bytes lie back to back from data-fork offset `base`, each
    /// stored relative to its table's data start. Returns the bytes of
    /// new space they take; refuses a table whose data start lies past
    /// `base` (which [`RunMap::build`] rules out for `base` at or past
    /// the fork's end).
    pub fn back(&mut self, pieces: &[(u64, u64)], base: u64) -> Result<u64, Malformed> {
        let mut at = base;
        let mut per_table: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); self.tables.len()];
        for &(s, e) in pieces {
            let t = self
                .tables
                .iter()
                .position(|m| m.first_sector <= s && e <= m.first_sector + m.sector_count)
                .expect("covered tables hold every piece");
            let m = &self.tables[t];
            let rel = at.checked_sub(m.data_start).ok_or_else(|| {
                Malformed(format!(
                    "blkx entry {t}: data start {:#x} lies past new space at {at:#x}",
                    m.data_start
                ))
            })?;
            per_table[t].push((s - m.first_sector, e - m.first_sector, rel));
            at += (e - s) * SECTOR;
        }
        for (t, mine) in per_table.iter().enumerate() {
            if mine.is_empty() {
                continue;
            }
            let m = &mut self.tables[t];
            let mut out = Vec::new();
            let mut next = mine.iter().peekable();
            for r in plain(m) {
                let end = r.sector + r.sectors;
                let mut from = r.sector;
                while let Some(&&(a, b, off)) = next.peek().filter(|p| p.0 < end) {
                    if a > from {
                        out.push(RunEntry {
                            sector: from,
                            sectors: a - from,
                            ..r
                        });
                    }
                    out.push(RunEntry::new(RunKind::Raw, a, b - a, off, (b - a) * SECTOR));
                    from = b;
                    next.next();
                }
                if from < end {
                    out.push(RunEntry {
                        sector: from,
                        sectors: end - from,
                        ..r
                    });
                }
            }
            set_runs(m, out);
            self.changed[t] = true;
        }
        Ok(at - base)
    }
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
            checksum: Checksum::crc32(7),
            runs,
        }
    }

    fn shape(m: &Mish) -> Vec<(RunKind, u64, u64, u64, u64)> {
        m.runs
            .iter()
            .map(|r| (r.kind, r.sector, r.sectors, r.offset, r.length))
            .collect()
    }

    #[test]
    fn cover_fills_every_gap() {
        let a = table(
            4,
            10,
            vec![
                RunEntry::new(RunKind::Raw, 2, 2, 0, 1024),
                RunEntry::new(RunKind::End, 10, 0, 0, 0),
            ],
        );
        let b = table(20, 4, vec![RunEntry::new(RunKind::Zero, 0, 4, 0, 0)]);
        let mut t = Tables::new(&[b, a], 30);
        t.cover();
        assert_eq!(t.changed, vec![true, true]);
        assert_eq!(
            (t.tables[1].first_sector, t.tables[1].sector_count),
            (0, 20)
        );
        assert_eq!(
            shape(&t.tables[1]),
            vec![
                (RunKind::Free, 0, 6, 0, 0),
                (RunKind::Raw, 6, 2, 0, 1024),
                (RunKind::Free, 8, 12, 0, 0),
                (RunKind::End, 20, 0, 0, 0),
            ]
        );
        assert_eq!(
            shape(&t.tables[0]),
            vec![
                (RunKind::Zero, 0, 4, 0, 0),
                (RunKind::Free, 4, 6, 0, 0),
                (RunKind::End, 10, 0, 0, 0),
            ]
        );
        assert_eq!(t.tables[0].checksum, Checksum::NONE);
        let map = t.map(1024).unwrap();
        assert_eq!(map.runs.iter().map(|r| r.sectors).sum::<u64>(), 30);
        // Covered tables are left alone.
        assert_eq!(cover_cost(&t.tables, 30), 7);
        let mut again = Tables::new(&t.tables, 30);
        again.cover();
        assert!(!again.any_changed());
    }

    #[test]
    fn cover_cost_counts_without_building() {
        let a = table(4, 10, vec![RunEntry::new(RunKind::Raw, 2, 2, 0, 1024)]);
        let b = table(20, 4, vec![RunEntry::new(RunKind::Zero, 0, 4, 0, 0)]);
        let t = Tables::new(&[b, a], 30);
        let mut built = t.clone();
        built.cover();
        let runs: usize = built.tables.iter().map(|m| m.runs.len()).sum();
        assert_eq!((cover_cost(&t.tables, t.sectors), runs), (7, 7));
        let huge = Tables::new(
            &[table(
                0,
                8,
                vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4096)],
            )],
            1 << 60,
        );
        assert_eq!(
            cover_cost(&huge.tables, huge.sectors),
            1 + (((1u64 << 60) - 8).div_ceil(FREE_RUN_SECTORS)) + 1
        );
        assert_eq!(cover_cost(&[], 1 << 20), 9);
    }

    #[test]
    fn growth_is_split_into_free_runs_qemu_takes() {
        let mut t = Tables::new(
            &[table(
                0,
                8,
                vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4096)],
            )],
            8,
        );
        t.sectors = 8 + FREE_RUN_SECTORS + 5;
        t.cover();
        assert_eq!(
            shape(&t.tables[0]),
            vec![
                (RunKind::Raw, 0, 8, 0, 4096),
                (RunKind::Free, 8, FREE_RUN_SECTORS, 0, 0),
                (RunKind::Free, 8 + FREE_RUN_SECTORS, 5, 0, 0),
                (RunKind::End, 8 + FREE_RUN_SECTORS + 5, 0, 0, 0),
            ]
        );
        let mut none = Tables::new(&[], 16);
        none.cover();
        assert_eq!(none.origin, vec![None]);
        assert_eq!(
            shape(&none.tables[0]),
            vec![(RunKind::Free, 0, 16, 0, 0), (RunKind::End, 16, 0, 0, 0)]
        );
    }

    #[test]
    fn pieces_are_aligned_blocks_cut_to_their_run() {
        const A: u64 = ALLOC_SECTORS;
        let piece = A * SECTOR;
        let m = table(
            0,
            3 * A,
            vec![
                RunEntry::new(RunKind::Raw, 0, 100, 0, 51200),
                RunEntry::new(RunKind::Zero, 100, 2 * A + 4 - 100, 0, 0),
                RunEntry::new(RunKind::Free, 2 * A + 4, A - 4, 0, 0),
            ],
        );
        let mut t = Tables::new(&[m], 3 * A);
        t.cover();
        let map = t.map(51200).unwrap();
        let p = Tables::pieces(
            &map,
            &[(50, 101), (2 * A - 1, 2 * A + 5), (3 * A - 1, 3 * A)],
        );
        assert_eq!(
            p,
            vec![(100, A), (A, 2 * A), (2 * A, 2 * A + 4), (2 * A + 4, 3 * A)]
        );
        let added = t.back(&p, 51200).unwrap();
        assert_eq!(added, (3 * A - 100) * SECTOR);
        let at = |s: u64| 51200 + (s - 100) * SECTOR;
        assert_eq!(
            shape(&t.tables[0]),
            vec![
                (RunKind::Raw, 0, 100, 0, 51200),
                (RunKind::Raw, 100, A - 100, at(100), (A - 100) * SECTOR),
                (RunKind::Raw, A, A, at(A), piece),
                (RunKind::Raw, 2 * A, 4, at(2 * A), 2048),
                (
                    RunKind::Raw,
                    2 * A + 4,
                    A - 4,
                    at(2 * A + 4),
                    (A - 4) * SECTOR
                ),
                (RunKind::End, 3 * A, 0, 0, 0),
            ]
        );
        // A piece in the middle of a run splits it in three.
        let mut t = Tables::new(
            &[table(
                0,
                4 * A,
                vec![RunEntry::new(RunKind::Zero, 0, 4 * A, 0, 0)],
            )],
            4 * A,
        );
        let map = t.map(0).unwrap();
        let p = Tables::pieces(&map, &[(A + 3, A + 4)]);
        assert_eq!(p, vec![(A, 2 * A)]);
        t.back(&p, 4096).unwrap();
        assert_eq!(
            shape(&t.tables[0]),
            vec![
                (RunKind::Zero, 0, A, 0, 0),
                (RunKind::Raw, A, A, 4096, piece),
                (RunKind::Zero, 2 * A, 2 * A, 0, 0),
                (RunKind::End, 4 * A, 0, 0, 0),
            ]
        );
    }

    #[test]
    fn edits_keep_each_tables_data_start() {
        let mut a = table(
            0,
            16,
            vec![
                RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
                RunEntry::new(RunKind::Free, 8, 8, 0, 0),
            ],
        );
        a.data_start = 512;
        let mut b = table(16, 8, vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4096)]);
        b.data_start = 4608;
        let mut t = Tables::new(&[b, a], 24);
        t.cover();
        let map = t.map(8704).unwrap();
        let p = Tables::pieces(&map, &[(9, 10)]);
        assert_eq!(t.back(&p, 8704).unwrap(), 8 * SECTOR);
        assert_eq!(t.tables[1].data_start, 512);
        // New space at fork offset 8704 is 8192 past the table's start.
        assert_eq!(
            shape(&t.tables[1]),
            vec![
                (RunKind::Raw, 0, 8, 0, 4096),
                (RunKind::Raw, 8, 8, 8192, 4096),
                (RunKind::End, 16, 0, 0, 0),
            ]
        );
        let map = t.map(8704 + 4096).unwrap();
        let fork: Vec<_> = map.runs.iter().map(|r| (r.start, r.offset)).collect();
        assert_eq!(fork, vec![(0, 512), (8, 8704), (16, 4608)]);
        // Freed ranges are data-fork offsets.
        assert_eq!(
            t.clone().shrink(12),
            vec![(4608, 4096), (8704 + 2048, 2048)]
        );
        let mut c = table(0, 8, vec![RunEntry::new(RunKind::Free, 0, 8, 0, 0)]);
        c.data_start = 9000;
        let mut t = Tables::new(&[c], 8);
        assert_eq!(
            t.back(&[(0, 8)], 4096).unwrap_err().0,
            "blkx entry 0: data start 0x2328 lies past new space at 0x1000"
        );
    }

    #[test]
    fn shrink_cuts_runs_and_frees_their_bytes() {
        let a = table(
            0,
            16,
            vec![
                RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
                RunEntry::new(RunKind::Raw, 8, 8, 8192, 4096),
            ],
        );
        let b = table(16, 8, vec![RunEntry::new(RunKind::Raw, 0, 8, 4096, 4096)]);
        let mut t = Tables::new(&[a, b], 24);
        let freed = t.shrink(10);
        assert_eq!(freed, vec![(8192 + 1024, 3072), (4096, 4096)]);
        assert_eq!(t.origin, vec![Some(0)]);
        assert_eq!(t.sectors, 10);
        assert_eq!(
            shape(&t.tables[0]),
            vec![
                (RunKind::Raw, 0, 8, 0, 4096),
                (RunKind::Raw, 8, 2, 8192, 1024),
                (RunKind::End, 10, 0, 0, 0),
            ]
        );
    }
}

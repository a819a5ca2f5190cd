//! Crash-point replay: a workload runs on a store that records every
//! container operation; then, for every point in that record, the states a
//! power cut could leave (the last synced state plus any subset of the
//! operations since, each write torn at sector granularity) are rebuilt and
//! opened. Each must open, pass `check` without corruption, and hold every
//! write acknowledged by a completed flush.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use asiffs::engine::storage::Storage;
use asiffs::{CreateOptions, Image, LockMode, OpenOptions};
use parking_lot::Mutex;

const PAGE: u64 = 4096;
const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A sparse in-memory file.
#[derive(Clone, Default)]
struct Mem {
    pages: BTreeMap<u64, Box<[u8]>>,
    len: u64,
}

impl Mem {
    /// Calls `f(page, offset in page, offset in request, length)` for each
    /// page a request touches.
    fn spans(off: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut done = 0;
        while done < len {
            let o = off + done as u64;
            let n = ((PAGE - o % PAGE) as usize).min(len - done);
            f(o / PAGE, (o % PAGE) as usize, done, n);
            done += n;
        }
    }

    fn read(&self, buf: &mut [u8], off: u64) {
        let len = self.len;
        Self::spans(off, buf.len(), |p, at, i, n| {
            let dst = &mut buf[i..i + n];
            match self.pages.get(&p) {
                Some(pg) => dst.copy_from_slice(&pg[at..at + n]),
                None => dst.fill(0),
            }
            // Bytes past the end read as zeros.
            let o = off + i as u64;
            if o + n as u64 > len {
                let keep = len.saturating_sub(o) as usize;
                dst[keep..].fill(0);
            }
        });
    }

    fn write(&mut self, data: &[u8], off: u64) {
        let pages = &mut self.pages;
        Self::spans(off, data.len(), |p, at, i, n| {
            let pg = pages
                .entry(p)
                .or_insert_with(|| vec![0u8; PAGE as usize].into());
            pg[at..at + n].copy_from_slice(&data[i..i + n]);
        });
        self.len = self.len.max(off + data.len() as u64);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len - len);
            self.pages.retain(|&p, _| p * PAGE < len);
        }
        self.len = len;
    }

    /// Punch: whole pages go away, partial ones are zeroed.
    fn zero(&mut self, off: u64, len: u64) {
        let end = off + len;
        let mut o = off;
        while o < end {
            let p = o / PAGE;
            let page_end = (p + 1) * PAGE;
            if o % PAGE == 0 && page_end <= end {
                self.pages.remove(&p);
            } else if let Some(pg) = self.pages.get_mut(&p) {
                pg[(o % PAGE) as usize..((page_end.min(end) - 1) % PAGE + 1) as usize].fill(0);
            }
            o = page_end.min(end);
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write(off, data) => self.write(data, *off),
            Op::SetLen(len) => self.set_len(*len),
            Op::Extend(len) => self.set_len(self.len.max(*len)),
            Op::Punch(off, len) => self.zero(*off, *len),
            Op::Sync | Op::Mark(_) => {}
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    /// Grow to a length that is durable at once (nothing else is synced).
    Extend(u64),
    Punch(u64, u64),
    Sync,
    /// Workload step `n` has returned.
    Mark(usize),
}

/// Storage that applies operations to a [`Mem`] and records them.
#[derive(Default)]
struct Recorder {
    mem: Mutex<Mem>,
    log: Mutex<Vec<Op>>,
    recording: AtomicBool,
}

impl Recorder {
    fn record(&self, op: Op) {
        if self.recording.load(Ordering::Relaxed) {
            self.log.lock().push(op.clone());
        }
        self.mem.lock().apply(&op);
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.lock().read(buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.mem.lock().len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Op::SetLen(len));
        Ok(())
    }
    fn extend(&self, len: u64) -> io::Result<()> {
        self.record(Op::Extend(len));
        Ok(())
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Op::Punch(offset, len));
        Ok(())
    }
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.record(Op::Sync);
        Ok(())
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let m = self.mem.lock();
        let first = m.pages.range(offset / PAGE..).next().map(|(&p, _)| p);
        Ok(first.map(|p| (p * PAGE).max(offset)).filter(|&o| o < m.len))
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.mem.lock().pages.len() as u64 * PAGE)
    }
}

fn open(store: Arc<Recorder>, writable: bool) -> asiffs::Result<Image> {
    let opts = OpenOptions {
        writable,
        cache_groups: 8,
        lock: LockMode::None,
        ..OpenOptions::default()
    };
    Image::from_storage(Path::new("crash.asif"), store, &opts)
}

/// Deterministic xorshift, so a failure names its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The bytes sector `s` holds after the write tagged `tag` (0: zeros).
fn pattern(tag: u32, s: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; SECTOR as usize];
    }
    let mut v = vec![(tag as u8) ^ (s as u8) | 1; SECTOR as usize];
    v[..4].copy_from_slice(&tag.to_le_bytes());
    v[4..12].copy_from_slice(&s.to_le_bytes());
    v
}

#[derive(Clone, Debug)]
enum Step {
    Write { sector: u64, count: u64, tag: u32 },
    Discard { sector: u64, count: u64 },
    Flush,
}

const DISK: u64 = 300 * GIB;

/// A workload that crosses chunk, chunk-group and table boundaries,
/// rewrites, discards whole and partial chunks, and reuses freed chunks.
fn workload(seed: u64, steps: usize) -> Vec<Step> {
    let mut r = Rng(seed);
    let hot = [
        0,
        MIB - 2 * SECTOR,
        5 * MIB,
        2 * GIB - 4 * SECTOR,
        126 * GIB - SECTOR,
        DISK - 8 * SECTOR,
    ];
    let mut tag = 0;
    (0..steps)
        .map(|_| {
            let base = hot[r.below(hot.len() as u64) as usize] + r.below(4) * MIB;
            let sector = (base.min(DISK - 3 * MIB)) / SECTOR;
            match r.below(10) {
                0..=5 => {
                    tag += 1;
                    let count = if r.below(5) == 0 {
                        2 * MIB / SECTOR
                    } else {
                        1 + r.below(16)
                    };
                    Step::Write { sector, count, tag }
                }
                6..=7 => {
                    let count = if r.below(2) == 0 {
                        MIB / SECTOR
                    } else {
                        1 + r.below(64)
                    };
                    let sector = if count == MIB / SECTOR {
                        sector / 2048 * 2048
                    } else {
                        sector
                    };
                    Step::Discard { sector, count }
                }
                _ => Step::Flush,
            }
        })
        .collect()
}

/// Per sector: the tag it must hold after step `i` (model), as a history.
struct Model {
    /// For each sector ever touched, (step, tag) in order.
    history: BTreeMap<u64, Vec<(usize, u32)>>,
}

impl Model {
    fn new(steps: &[Step]) -> Model {
        let mut history: BTreeMap<u64, Vec<(usize, u32)>> = BTreeMap::new();
        for (i, st) in steps.iter().enumerate() {
            match *st {
                Step::Write { sector, count, tag } => {
                    for s in sector..sector + count {
                        history.entry(s).or_default().push((i, tag));
                    }
                }
                Step::Discard { sector, count } => {
                    for s in sector..sector + count {
                        history.entry(s).or_default().push((i, 0));
                    }
                }
                Step::Flush => {}
            }
        }
        Model { history }
    }

    /// Tags sector `s` may hold after a crash once steps `..started` have
    /// begun and every step before `durable` (a completed flush) is safe:
    /// the last value set before `durable`, or any set after it.
    fn allowed(&self, s: u64, durable: usize, started: usize) -> Vec<u32> {
        let h = &self.history[&s];
        let mut v: Vec<u32> = vec![h.iter().rfind(|(i, _)| *i < durable).map_or(0, |x| x.1)];
        v.extend(
            h.iter()
                .filter(|(i, _)| *i >= durable && *i < started)
                .map(|x| x.1),
        );
        v
    }
}

fn run(store: &Arc<Recorder>, img: &Image, steps: &[Step]) {
    run_from(store, img, steps, 0)
}

/// Runs `steps[first..]`; the earlier ones describe the starting image.
fn run_from(store: &Arc<Recorder>, img: &Image, steps: &[Step], first: usize) {
    for (i, st) in steps.iter().enumerate().skip(first) {
        match *st {
            Step::Write { sector, count, tag } => {
                let mut buf = Vec::with_capacity((count * SECTOR) as usize);
                for s in sector..sector + count {
                    buf.extend(pattern(tag, s));
                }
                img.write_at(&buf, sector * SECTOR).unwrap();
            }
            Step::Discard { sector, count } => {
                img.discard(sector * SECTOR, count * SECTOR).unwrap()
            }
            Step::Flush => img.flush().unwrap(),
        }
        store.log.lock().push(Op::Mark(i));
    }
}

/// A crash state: the synced prefix plus a subset of later operations.
fn crash_state(synced: &Mem, pending: &[Op], r: &mut Rng, mode: u64) -> Mem {
    let mut m = synced.clone();
    for op in pending {
        match (mode, op) {
            (0, _) => {}
            (1, op) => m.apply(op),
            (_, Op::Write(off, data)) => {
                // Tear at absolute sector boundaries.
                let mut at = *off;
                let end = off + data.len() as u64;
                while at < end {
                    let next = ((at / SECTOR) + 1) * SECTOR;
                    let piece_end = next.min(end);
                    if r.below(2) == 0 {
                        m.write(&data[(at - off) as usize..(piece_end - off) as usize], at);
                    }
                    at = piece_end;
                }
            }
            (_, Op::Punch(off, len)) => {
                let mut at = *off;
                while at < off + len {
                    let piece_end = (((at / SECTOR) + 1) * SECTOR).min(off + len);
                    if r.below(2) == 0 {
                        m.zero(at, piece_end - at);
                    }
                    at = piece_end;
                }
            }
            (_, op) => {
                if r.below(2) == 0 {
                    m.apply(op)
                }
            }
        }
    }
    m
}

fn verify(state: Mem, model: &Model, durable: usize, started: usize, ctx: &str) {
    let store = Arc::new(Recorder {
        mem: Mutex::new(state),
        ..Default::default()
    });
    let img = open(store.clone(), false).unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    let report = img
        .check()
        .unwrap_or_else(|e| panic!("{ctx}: check failed: {e}"));
    assert!(
        report.corruptions.is_empty(),
        "{ctx}: corrupt: {:?}",
        report.corruptions
    );
    let mut buf = vec![0u8; SECTOR as usize];
    for &s in model.history.keys() {
        img.read_at(&mut buf, s * SECTOR)
            .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
        let allowed = model.allowed(s, durable, started);
        assert!(
            allowed.iter().any(|&t| pattern(t, s) == buf),
            "{ctx}: sector {s} holds tag {:?}, allowed {allowed:?}",
            u32::from_le_bytes(buf[..4].try_into().unwrap())
        );
    }
    drop(img);
    // The survivor must take new writes and stay consistent.
    let img =
        open(store, true).unwrap_or_else(|e| panic!("{ctx}: does not reopen for writing: {e}"));
    img.write_at(&vec![0xEE; 3 * MIB as usize], 7 * MIB + 512)
        .unwrap();
    img.discard(2 * GIB - MIB, 2 * MIB).unwrap();
    img.flush().unwrap();
    let report = img.check().unwrap();
    assert!(
        report.corruptions.is_empty(),
        "{ctx}: corrupt after recovery writes: {:?}",
        report.corruptions
    );
    let mut big = vec![0u8; 3 * MIB as usize];
    img.read_at(&mut big, 7 * MIB + 512).unwrap();
    assert!(big.iter().all(|&b| b == 0xEE), "{ctx}: recovery write lost");
}

fn fresh_image() -> Mem {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.asif");
    let opts = CreateOptions {
        size: DISK,
        ..Default::default()
    };
    Image::create(&path, &opts).unwrap().close().unwrap();
    let mut base = Mem::default();
    base.write(&std::fs::read(&path).unwrap(), 0);
    base
}

fn replay(seed: u64, steps: usize, variants: u64) {
    let base = fresh_image();
    let store = Arc::new(Recorder {
        mem: Mutex::new(base.clone()),
        log: Mutex::default(),
        recording: AtomicBool::new(true),
    });
    let plan = workload(seed, steps);
    {
        let img = open(store.clone(), true).unwrap();
        run(&store, &img, &plan);
        // Dropping the image is a clean close: flush and trim.
    }
    let log = store.log.lock().clone();
    sweep(seed, base, &log, &plan, variants, 0);
}

/// Rebuilds and verifies every crash state of `log`, applied to `base`.
/// Steps before `durable_from_start` count as flushed from the outset.
fn sweep(
    seed: u64,
    base: Mem,
    log: &[Op],
    plan: &[Step],
    variants: u64,
    durable_from_start: usize,
) {
    let model = Model::new(plan);
    let mut r = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut synced = base;
    let mut last_sync = 0; // index in `log` after the last Sync
    let mut durable = durable_from_start; // steps before this are covered by a completed flush
    let mut started = durable_from_start; // steps that have begun
    let mut crash_points = 0;
    for i in 0..=log.len() {
        // Crash just before log[i].
        for mode in 0..variants {
            let state = crash_state(&synced, &log[last_sync..i], &mut r, mode);
            let ctx = format!(
                "seed {seed}, crash before op {i} of {}, variant {mode}",
                log.len()
            );
            verify(state, &model, durable, started + 1, &ctx);
            crash_points += 1;
        }
        let Some(op) = log.get(i) else { break };
        match op {
            Op::Sync => {
                for o in &log[last_sync..i] {
                    synced.apply(o);
                }
                last_sync = i + 1;
            }
            // Durable by itself, without making earlier operations so.
            Op::Extend(_) => synced.apply(op),
            Op::Mark(n) => {
                started = n + 1;
                if matches!(plan[*n], Step::Flush) {
                    durable = n + 1;
                }
            }
            _ => {}
        }
    }
    assert!(
        crash_points > 10 * variants,
        "too few crash points ({crash_points}) to mean anything"
    );
}

/// Compaction after a workload: every crash point during it must keep all
/// data (everything was flushed before it began). The plan frees early
/// chunks after a table and data were placed late, so data chunks, a
/// table chunk and the directory all move.
fn replay_compaction(seed: u64) {
    let chunk = MIB / SECTOR;
    let mut plan = Vec::new();
    let mut tag = 0;
    let mut write = |plan: &mut Vec<Step>, sector: u64, count: u64| {
        tag += 1;
        plan.push(Step::Write { sector, count, tag });
    };
    for i in 0..6 {
        write(&mut plan, i * chunk, chunk);
    }
    write(&mut plan, 200 * GIB / SECTOR, 8); // table 1, late
    write(&mut plan, 6 * chunk + 3, 5);
    plan.push(Step::Flush);
    for i in [0, 2, 3] {
        plan.push(Step::Discard {
            sector: i * chunk,
            count: chunk,
        });
    }
    plan.push(Step::Flush);
    let mut r = Rng(seed);
    for _ in 0..4 {
        // Only chunks still mapped, so the holes stay for compaction.
        let s = [1, 4, 5][r.below(3) as usize] * chunk + r.below(chunk - 16);
        write(&mut plan, s, 1 + r.below(15));
    }
    plan.push(Step::Flush);

    let store = Arc::new(Recorder {
        mem: Mutex::new(fresh_image()),
        ..Default::default()
    });
    {
        let img = open(store.clone(), true).unwrap();
        run(&store, &img, &plan);
    }
    store.log.lock().clear();
    let base = store.mem.lock().clone();
    store.recording.store(true, Ordering::Relaxed);
    let moved = {
        let img = open(store.clone(), true).unwrap();
        img.compact(&mut |_, _| {}).unwrap().chunks_moved
    };
    assert!(
        moved >= 3,
        "seed {seed}: compaction moved {moved} chunks, expected the late ones"
    );
    let log = store.log.lock().clone();
    assert!(
        log.iter()
            .any(|op| matches!(op, Op::Write(off, _) if *off < MIB)),
        "no directory was rewritten"
    );
    sweep(seed, base, &log, &plan, 3, plan.len());
}

/// A chunk macOS left partially valid (state 11) holds stale bytes behind
/// its unwritten sectors. Writing into it and discarding part of it, at
/// every crash point, must never let those bytes show.
#[test]
fn partial_chunks_never_show_stale_bytes_after_a_crash() {
    let chunk = MIB / SECTOR;
    let c1 = chunk; // logical chunk 1, in sectors
    let stale_tag = 40;
    let store = Arc::new(Recorder {
        mem: Mutex::new(fresh_image()),
        ..Default::default()
    });
    {
        let img = open(store.clone(), true).unwrap();
        let stale = Step::Write {
            sector: c1,
            count: chunk,
            tag: stale_tag,
        };
        run(&store, &img, &[stale, Step::Flush]);
    }
    {
        // Fresh layout: chunks 0-3 are macOS's; table 0 went to chunk 4 and
        // logical chunk 1's data to chunk 5. Mark it partial with a bitmap
        // in a new chunk 6 that says only its sectors 0..3 are written.
        let mut m = store.mem.lock();
        let entry_at = 4 * MIB + 8; // table 4, group 0, entry 1
        let bitmap_entry_at = 4 * MIB + 8 * 2048;
        let mut e = [0u8; 8];
        m.read(&mut e, entry_at);
        assert_eq!(
            u64::from_be_bytes(e),
            0x4000_0000_0000_0005,
            "layout assumption"
        );
        m.write(&0xC000_0000_0000_0005u64.to_be_bytes(), entry_at);
        m.write(&6u64.to_be_bytes(), bitmap_entry_at);
        m.set_len(7 * MIB);
        m.write(&[0x55], 6 * MIB + chunk / 4); // sectors 2048..2051 of group 0
    }
    let base = store.mem.lock().clone();
    let plan = vec![
        // What the starting image holds, as the model sees it.
        Step::Write {
            sector: c1,
            count: 4,
            tag: stale_tag,
        },
        Step::Discard {
            sector: c1 + 4,
            count: chunk - 4,
        },
        // The workload.
        Step::Write {
            sector: c1 + 100,
            count: 8,
            tag: 50,
        },
        Step::Flush,
        Step::Write {
            sector: c1 + 2,
            count: 5,
            tag: 51,
        },
        Step::Discard {
            sector: c1 + 1000,
            count: 10,
        },
        Step::Flush,
        Step::Write {
            sector: c1 + 2040,
            count: 8,
            tag: 52,
        },
        Step::Flush,
    ];
    store.log.lock().clear();
    store.recording.store(true, Ordering::Relaxed);
    {
        let img = open(store.clone(), true).unwrap();
        run_from(&store, &img, &plan, 2);
    }
    let log = store.log.lock().clone();
    sweep(5, base, &log, &plan, 3, 2);
}

#[test]
fn every_crash_point_during_compaction_keeps_all_data() {
    for seed in [3, 11] {
        replay_compaction(seed);
    }
}

#[test]
fn every_crash_point_leaves_a_consistent_image() {
    replay(1, 40, 3);
}

#[test]
fn crash_points_with_other_seeds() {
    for seed in [7, 99, 12345] {
        replay(seed, 25, 3);
    }
}

#[test]
fn harness_detects_a_lost_flushed_write() {
    // The checker itself must fail when a flushed write is missing: drop
    // every operation after the first flush and claim it covered more.
    let plan = vec![
        Step::Write {
            sector: 0,
            count: 1,
            tag: 1,
        },
        Step::Flush,
        Step::Write {
            sector: 8,
            count: 1,
            tag: 2,
        },
        Step::Flush,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.asif");
    Image::create(
        &path,
        &CreateOptions {
            size: DISK,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let mut base = Mem::default();
    base.write(&std::fs::read(&path).unwrap(), 0);
    let store = Arc::new(Recorder {
        mem: Mutex::new(base.clone()),
        log: Mutex::default(),
        recording: AtomicBool::new(true),
    });
    {
        let img = open(store.clone(), true).unwrap();
        run(&store, &img, &plan[..2]);
    }
    let mut state = base;
    for op in store.log.lock().iter() {
        state.apply(op);
    }
    let model = Model::new(&plan);
    let outcome = std::panic::catch_unwind(|| verify(state, &model, 4, 4, "planted loss"));
    assert!(
        outcome.is_err(),
        "the checker accepted a state missing a flushed write"
    );
}

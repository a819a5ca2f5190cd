//! Crash-point replay, shared by every format whose translator runs on a
//! [`Storage`]: a workload runs on a store that records each container
//! operation; then, for every point in that record, the states a power
//! cut could leave are rebuilt (the last synced state plus none, all, or a
//! random subset of the operations since, writes and punches torn at
//! sector granularity, in order or shuffled) and handed to a format's
//! checker, which must find each one opens and holds every write a
//! completed flush covered.
//!
//! The bundle replay (a directory of files) is in `crash_dir`.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use asiffs::disk::Disk;
use asiffs::host::file::Storage;
use parking_lot::Mutex;

use super::Rng;

pub const PAGE: u64 = 4096;
pub const SECTOR: u64 = 512;

/// A sparse in-memory file.
#[derive(Clone, Default)]
pub struct Mem {
    pub pages: BTreeMap<u64, Box<[u8]>>,
    pub len: u64,
    /// What a power cut keeps or loses whole (0: a sector); an encrypted
    /// container's writes are whole cipher blocks.
    pub atom: u64,
}

impl Mem {
    /// A copy of the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Mem {
        let mut m = Mem::default();
        m.write(&std::fs::read(path).unwrap(), 0);
        m
    }

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

    /// Reads `buf.len()` bytes; past the end reads zeros.
    pub fn read(&self, buf: &mut [u8], off: u64) {
        let len = self.len;
        Self::spans(off, buf.len(), |p, at, i, n| {
            let dst = &mut buf[i..i + n];
            match self.pages.get(&p) {
                Some(pg) => dst.copy_from_slice(&pg[at..at + n]),
                None => dst.fill(0),
            }
            let o = off + i as u64;
            if o + n as u64 > len {
                dst[len.saturating_sub(o) as usize..].fill(0);
            }
        });
    }

    /// The whole file.
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0; self.len as usize];
        self.read(&mut v, 0);
        v
    }

    pub fn write(&mut self, data: &[u8], off: u64) {
        let pages = &mut self.pages;
        Self::spans(off, data.len(), |p, at, i, n| {
            pages
                .entry(p)
                .or_insert_with(|| vec![0u8; PAGE as usize].into())[at..at + n]
                .copy_from_slice(&data[i..i + n]);
        });
        self.len = self.len.max(off + data.len() as u64);
    }

    pub fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len - len);
            self.pages.retain(|&p, _| p * PAGE < len);
        }
        self.len = len;
    }

    /// A punch: whole pages go away, partial ones are zeroed.
    pub fn zero(&mut self, off: u64, len: u64) {
        let end = off + len;
        let mut o = off;
        while o < end {
            let p = o / PAGE;
            let page_end = (p + 1) * PAGE;
            let e = page_end.min(end);
            if o % PAGE == 0 && e == page_end {
                self.pages.remove(&p);
            } else if let Some(pg) = self.pages.get_mut(&p) {
                pg[(o % PAGE) as usize..(e - p * PAGE) as usize].fill(0);
            }
            o = e;
        }
    }

    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Write(off, data) => self.write(data, *off),
            Op::SetLen(len) => self.set_len(*len),
            Op::Extend(len) => self.set_len(self.len.max(*len)),
            Op::Punch(off, len) => self.zero(*off, *len),
            Op::Sync | Op::Mark(_) => {}
        }
    }

    /// First offset at or after `offset` inside a stored page (SEEK_DATA).
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let first = self.pages.range(offset / PAGE..).next().map(|(&p, _)| p);
        first
            .map(|p| (p * PAGE).max(offset))
            .filter(|&o| o < self.len)
    }

    /// First offset at or after `offset` outside every stored page
    /// (SEEK_HOLE); the length when none is.
    pub fn next_hole(&self, offset: u64) -> u64 {
        let mut p = offset / PAGE;
        while self.pages.contains_key(&p) {
            p += 1;
        }
        (p * PAGE).max(offset).min(self.len)
    }

    /// Applies `op` as a power cut may have left it: writes and punches
    /// keep each atom (a sector unless `atom` says) or lose it at random.
    pub fn apply_torn(&mut self, op: &Op, r: &mut Rng) {
        let atom = if self.atom == 0 { SECTOR } else { self.atom };
        match op {
            Op::Write(off, data) => {
                let end = off + data.len() as u64;
                let mut at = *off;
                while at < end {
                    let piece_end = ((at / atom + 1) * atom).min(end);
                    if r.below(2) == 0 {
                        self.write(&data[(at - off) as usize..(piece_end - off) as usize], at);
                    }
                    at = piece_end;
                }
            }
            Op::Punch(off, len) => {
                let mut at = *off;
                while at < off + len {
                    let piece_end = ((at / atom + 1) * atom).min(off + len);
                    if r.below(2) == 0 {
                        self.zero(at, piece_end - at);
                    }
                    at = piece_end;
                }
            }
            op => {
                if r.below(2) == 0 {
                    self.apply(op)
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    /// Grow to a length that is durable at once (nothing else is synced).
    Extend(u64),
    Punch(u64, u64),
    Sync,
    /// Workload step `n` has returned.
    Mark(usize),
}

/// What the workload runner tells a recorder: step `n` has returned.
pub trait Marks {
    fn mark(&self, step: usize);
}

/// Storage that applies operations to a [`Mem`] and, once `recording`,
/// logs them.
#[derive(Default)]
pub struct Recorder {
    pub mem: Mutex<Mem>,
    pub log: Mutex<Vec<Op>>,
    pub recording: AtomicBool,
}

impl Recorder {
    pub fn new(mem: Mem) -> Arc<Recorder> {
        Arc::new(Recorder {
            mem: Mutex::new(mem),
            ..Default::default()
        })
    }

    /// Starts the log afresh from the current state, which it returns.
    pub fn start(&self) -> Mem {
        self.log.lock().clear();
        self.recording.store(true, Ordering::Relaxed);
        self.mem.lock().clone()
    }

    pub fn take_log(&self) -> Vec<Op> {
        self.recording.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.log.lock())
    }

    fn record(&self, op: Op) {
        if self.recording.load(Ordering::Relaxed) {
            self.log.lock().push(op.clone());
        }
        self.mem.lock().apply(&op);
    }
}

impl Marks for Recorder {
    fn mark(&self, step: usize) {
        if self.recording.load(Ordering::Relaxed) {
            self.log.lock().push(Op::Mark(step));
        }
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
        Ok(self.mem.lock().next_data(offset))
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let m = self.mem.lock();
        Ok(if offset >= m.len {
            offset
        } else {
            m.next_hole(offset)
        })
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.mem.lock().pages.len() as u64 * PAGE)
    }
}

/// The bytes sector `s` holds after the write tagged `tag` (0: zeros).
pub fn sector_pattern(tag: u32, s: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; SECTOR as usize];
    }
    let mut v = vec![(tag as u8) ^ (s as u8) | 1; SECTOR as usize];
    v[..4].copy_from_slice(&tag.to_le_bytes());
    v[4..12].copy_from_slice(&s.to_le_bytes());
    v
}

#[derive(Clone, Debug)]
pub enum Step {
    Write {
        sector: u64,
        count: u64,
        tag: u32,
    },
    Discard {
        sector: u64,
        count: u64,
    },
    Flush,
    /// Change the size (bytes); sectors past a shrink are not checked
    /// again unless written.
    Resize(u64),
}

/// Per sector: the tags it holds over the plan, as (step, tag).
pub struct Model {
    pub history: BTreeMap<u64, Vec<(usize, u32)>>,
}

impl Model {
    pub fn new(steps: &[Step]) -> Model {
        let mut history: BTreeMap<u64, Vec<(usize, u32)>> = BTreeMap::new();
        for (i, st) in steps.iter().enumerate() {
            let (sector, count, tag) = match *st {
                Step::Write { sector, count, tag } => (sector, count, tag),
                Step::Discard { sector, count } => (sector, count, 0),
                Step::Flush => continue,
                Step::Resize(size) => {
                    // A shrink drops what lies past it: zeros if it grows
                    // back, so the model treats it as a discard.
                    let first = size.div_ceil(SECTOR);
                    let past: Vec<u64> = history.range(first..).map(|(&s, _)| s).collect();
                    for s in past {
                        history.get_mut(&s).unwrap().push((i, 0));
                    }
                    continue;
                }
            };
            for s in sector..sector + count {
                history.entry(s).or_default().push((i, tag));
            }
        }
        Model { history }
    }

    /// Tags sector `s` may hold after a crash once steps `..started` have
    /// begun and every step before `durable` is covered by a flush: the
    /// last one set before `durable`, or any set after it.
    pub fn allowed(&self, s: u64, durable: usize, started: usize) -> Vec<u32> {
        let h = &self.history[&s];
        let mut v = vec![h.iter().rfind(|(i, _)| *i < durable).map_or(0, |x| x.1)];
        v.extend(
            h.iter()
                .filter(|(i, _)| *i >= durable && *i < started)
                .map(|x| x.1),
        );
        v
    }
}

/// Runs `steps[first..]` (the earlier ones describe the starting image),
/// marking each step's return in the recorder's log.
pub fn run_steps(marks: &dyn Marks, disk: &dyn Disk, steps: &[Step], first: usize) {
    for (i, st) in steps.iter().enumerate().skip(first) {
        match *st {
            Step::Write { sector, count, tag } => {
                let buf: Vec<u8> = (sector..sector + count)
                    .flat_map(|s| sector_pattern(tag, s))
                    .collect();
                disk.write_at(&buf, sector * SECTOR).unwrap();
            }
            Step::Discard { sector, count } => {
                disk.discard(sector * SECTOR, count * SECTOR).unwrap()
            }
            Step::Flush => disk.flush().unwrap(),
            Step::Resize(size) => disk.resize(size).unwrap(),
        }
        marks.mark(i);
    }
}

/// Every sector the model knows, read through `disk`, holds an allowed
/// tag. Sectors past the disk's end are skipped (a shrink may or may not
/// have happened).
pub fn check_sectors(disk: &dyn Disk, model: &Model, durable: usize, started: usize, ctx: &str) {
    let mut buf = vec![0u8; SECTOR as usize];
    for &s in model.history.keys() {
        if (s + 1) * SECTOR > disk.size() {
            continue;
        }
        disk.read_at(&mut buf, s * SECTOR)
            .unwrap_or_else(|e| panic!("{ctx}: reading sector {s}: {e}"));
        let allowed = model.allowed(s, durable, started);
        assert!(
            allowed.iter().any(|&t| sector_pattern(t, s) == buf),
            "{ctx}: sector {s} holds tag {}, allowed {allowed:?}",
            u32::from_le_bytes(buf[..4].try_into().unwrap())
        );
    }
}

/// Fisher-Yates, from the test's own generator so a failure names its seed.
pub fn shuffle<T>(v: &mut [T], r: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, r.below(i as u64 + 1) as usize);
    }
}

/// A crash state: the synced state plus some of the operations since.
/// Mode 0: none; 1: all; 2: each torn and kept at random, in order; 3:
/// the same, shuffled.
pub fn crash_state(synced: &Mem, pending: &[Op], r: &mut Rng, mode: u64) -> Mem {
    let mut m = synced.clone();
    let mut ops: Vec<&Op> = pending.iter().collect();
    if mode == 3 {
        shuffle(&mut ops, r);
    }
    for op in ops {
        match mode {
            0 => {}
            1 => m.apply(op),
            _ => m.apply_torn(op, r),
        }
    }
    m
}

/// Rebuilds every crash state of `log` applied to `base` (`modes` of
/// them per point, see [`crash_state`]) and hands each to `verify` with
/// the steps known durable and the steps begun. Steps before
/// `durable_from_start` count as flushed from the outset. Returns the
/// number of states checked.
pub fn sweep(
    seed: u64,
    base: Mem,
    log: &[Op],
    plan: &[Step],
    durable_from_start: usize,
    modes: u64,
    mut verify: impl FnMut(Mem, &Model, usize, usize, &str),
) -> usize {
    let model = Model::new(plan);
    let mut r = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut synced = base;
    let mut last_sync = 0;
    let mut durable = durable_from_start;
    let mut started = durable_from_start;
    let mut points = 0;
    for i in 0..=log.len() {
        for mode in 0..modes {
            let state = crash_state(&synced, &log[last_sync..i], &mut r, mode);
            let ctx = format!(
                "seed {seed}, crash before op {i} of {}, mode {mode}",
                log.len()
            );
            verify(state, &model, durable, started + 1, &ctx);
            points += 1;
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
                if matches!(plan[*n], Step::Flush | Step::Resize(_)) {
                    durable = n + 1;
                }
            }
            _ => {}
        }
    }
    points
}

/// Two writes, each followed by a flush, the second at `sector`: the plan
/// for [`assert_catches_lost_write`].
pub fn lost_write_plan(sector: u64) -> Vec<Step> {
    vec![
        Step::Write {
            sector: 0,
            count: 1,
            tag: 1,
        },
        Step::Flush,
        Step::Write {
            sector,
            count: 1,
            tag: 2,
        },
        Step::Flush,
    ]
}

/// The checker itself must object to a state that lacks a flushed write:
/// `state` holds only the first half of `plan`, and `verify` is told the
/// whole plan is durable.
pub fn assert_catches_lost_write<S: std::panic::UnwindSafe>(
    plan: &[Step],
    state: S,
    verify: impl FnOnce(S, &Model, usize, usize, &str) + std::panic::UnwindSafe,
) {
    let model = Model::new(plan);
    let n = plan.len();
    let outcome = std::panic::catch_unwind(|| verify(state, &model, n, n, "planted loss"));
    assert!(
        outcome.is_err(),
        "the checker accepted a state missing a flushed write"
    );
}

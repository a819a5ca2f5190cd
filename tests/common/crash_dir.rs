//! Crash-point replay for a sparse bundle: a directory of files, where a
//! file's changes become durable at its own sync and the entries of a
//! directory at that directory's sync. [`DirRecorder`] is a `BundleDir`
//! that keeps the bundle in memory and logs every operation; [`sweep`]
//! rebuilds, for every point in the log, the states a power cut could
//! leave: what was durable plus none, all, or a random subset of the
//! operations not yet durable (writes and punches torn at sector
//! granularity, in order or shuffled).

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use asiffs::host::dir::{BandFile, BandStat, BundleDir};
use asiffs::udsb::TEMP_SUFFIX;
use parking_lot::Mutex;

use super::crash::{shuffle, Marks, Mem, Model, Op, Step, PAGE};
use super::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    Root,
    Bands,
}

#[derive(Clone, Debug)]
pub enum DirOp {
    /// A change to file `ino`'s bytes or length.
    File(u64, Op),
    SyncFile(u64),
    Link(Dir, String, u64),
    Unlink(Dir, String),
    /// Within one directory, replacing the target.
    Rename(Dir, String, String),
    SyncDir(Dir),
    Mark(usize),
}

/// Files by inode and the two directories' entries.
#[derive(Clone, Default)]
pub struct Tree {
    pub files: BTreeMap<u64, Mem>,
    pub entries: BTreeMap<(Dir, String), u64>,
}

impl Tree {
    pub fn apply(&mut self, op: &DirOp) {
        match op {
            DirOp::File(ino, op) => self.files.entry(*ino).or_default().apply(op),
            DirOp::Link(d, name, ino) => {
                self.files.entry(*ino).or_default();
                self.entries.insert((*d, name.clone()), *ino);
            }
            DirOp::Unlink(d, name) => {
                self.entries.remove(&(*d, name.clone()));
            }
            DirOp::Rename(d, from, to) => {
                if let Some(ino) = self.entries.remove(&(*d, from.clone())) {
                    self.entries.insert((*d, to.clone()), ino);
                }
            }
            DirOp::SyncFile(_) | DirOp::SyncDir(_) | DirOp::Mark(_) => {}
        }
    }

    fn apply_torn(&mut self, op: &DirOp, r: &mut Rng) {
        match op {
            DirOp::File(ino, op) => self.files.entry(*ino).or_default().apply_torn(op, r),
            op => {
                if r.below(2) == 0 {
                    self.apply(op)
                }
            }
        }
    }

    fn lookup(&self, d: Dir, name: &str) -> Option<u64> {
        self.entries.get(&(d, name.to_string())).copied()
    }
}

struct Shared {
    tree: Tree,
    next_ino: u64,
    log: Vec<DirOp>,
}

/// A bundle in memory that logs what it is asked to do.
pub struct DirRecorder {
    shared: Mutex<Shared>,
    recording: AtomicBool,
}

impl DirRecorder {
    pub fn new(tree: Tree) -> Arc<DirRecorder> {
        let next_ino = tree.files.keys().next_back().map_or(1, |i| i + 1);
        Arc::new(DirRecorder {
            shared: Mutex::new(Shared {
                tree,
                next_ino,
                log: Vec::new(),
            }),
            recording: AtomicBool::new(false),
        })
    }

    /// A bundle read from the host directory at `path`.
    pub fn load(path: &std::path::Path) -> Tree {
        let mut t = Tree::default();
        let mut ino = 1;
        for (d, sub) in [
            (Dir::Root, path.to_path_buf()),
            (Dir::Bands, path.join("bands")),
        ] {
            for e in std::fs::read_dir(&sub).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_file() {
                    t.files.insert(ino, Mem::from_file(&e.path()));
                    t.entries
                        .insert((d, e.file_name().into_string().unwrap()), ino);
                    ino += 1;
                }
            }
        }
        t
    }

    /// The bundle as it is now.
    pub fn tree(&self) -> Tree {
        self.shared.lock().tree.clone()
    }

    /// Starts the log afresh from the current state, which it returns.
    pub fn start(&self) -> Tree {
        let mut s = self.shared.lock();
        s.log.clear();
        self.recording.store(true, Ordering::Relaxed);
        s.tree.clone()
    }

    pub fn take_log(&self) -> Vec<DirOp> {
        self.recording.store(false, Ordering::Relaxed);
        std::mem::take(&mut self.shared.lock().log)
    }

    fn record(&self, op: DirOp) {
        let mut s = self.shared.lock();
        s.tree.apply(&op);
        if self.recording.load(Ordering::Relaxed) {
            s.log.push(op);
        }
    }

    fn new_ino(&self) -> u64 {
        let mut s = self.shared.lock();
        s.next_ino += 1;
        s.next_ino - 1
    }

    fn file(self: &Arc<Self>, ino: u64) -> Arc<dyn BandFile> {
        Arc::new(MemFile {
            dir: self.clone(),
            ino,
        })
    }
}

impl Marks for DirRecorder {
    fn mark(&self, step: usize) {
        if self.recording.load(Ordering::Relaxed) {
            self.shared.lock().log.push(DirOp::Mark(step));
        }
    }
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

/// The store a bundle opens on: the recorder behind an `Arc`, so that
/// band files can reach it.
pub struct Store(pub Arc<DirRecorder>);

impl BundleDir for Store {
    fn read_small(&self, name: &str, limit: usize) -> io::Result<Vec<u8>> {
        let s = self.0.shared.lock();
        let ino = s.tree.lookup(Dir::Root, name).ok_or_else(enoent)?;
        let mut b = s.tree.files[&ino].bytes();
        b.truncate(limit + 1);
        Ok(b)
    }

    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = format!("{name}{TEMP_SUFFIX}");
        let existing = self.0.shared.lock().tree.lookup(Dir::Root, &tmp);
        let ino = match existing {
            Some(ino) => {
                self.0.record(DirOp::File(ino, Op::SetLen(0)));
                ino
            }
            None => {
                let ino = self.0.new_ino();
                self.0.record(DirOp::Link(Dir::Root, tmp.clone(), ino));
                ino
            }
        };
        self.0
            .record(DirOp::File(ino, Op::Write(0, bytes.to_vec())));
        self.0.record(DirOp::SyncFile(ino));
        self.0
            .record(DirOp::Rename(Dir::Root, tmp, name.to_string()));
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        if self.exists(name) {
            self.0.record(DirOp::Unlink(Dir::Root, name.to_string()));
        }
        Ok(())
    }

    fn exists(&self, name: &str) -> bool {
        self.0.shared.lock().tree.lookup(Dir::Root, name).is_some()
    }

    fn sync_root(&self) -> io::Result<()> {
        self.0.record(DirOp::SyncDir(Dir::Root));
        Ok(())
    }

    fn root_allocated(&self, name: &str) -> io::Result<u64> {
        let s = self.0.shared.lock();
        Ok(s.tree
            .lookup(Dir::Root, name)
            .map_or(0, |i| s.tree.files[&i].pages.len() as u64 * PAGE))
    }

    fn list_bands(&self) -> io::Result<Vec<Vec<u8>>> {
        let s = self.0.shared.lock();
        Ok(s.tree
            .entries
            .keys()
            .filter(|(d, _)| *d == Dir::Bands)
            .map(|(_, n)| n.as_bytes().to_vec())
            .collect())
    }

    fn stat_band(&self, name: &str) -> io::Result<BandStat> {
        let s = self.0.shared.lock();
        let ino = s.tree.lookup(Dir::Bands, name).ok_or_else(enoent)?;
        Ok(BandStat {
            regular: true,
            len: s.tree.files[&ino].len,
        })
    }

    fn open_band(
        &self,
        name: &str,
        create: bool,
        _writable: bool,
    ) -> io::Result<Option<Arc<dyn BandFile>>> {
        let found = self.0.shared.lock().tree.lookup(Dir::Bands, name);
        match found {
            Some(ino) => Ok(Some(self.0.file(ino))),
            None if !create => Ok(None),
            None => {
                let ino = self.0.new_ino();
                self.0
                    .record(DirOp::Link(Dir::Bands, name.to_string(), ino));
                Ok(Some(self.0.file(ino)))
            }
        }
    }

    fn remove_band(&self, name: &str) -> io::Result<()> {
        let found = self.0.shared.lock().tree.lookup(Dir::Bands, name);
        if found.is_some() {
            self.0.record(DirOp::Unlink(Dir::Bands, name.to_string()));
        }
        Ok(())
    }

    fn sync_bands(&self) -> io::Result<()> {
        self.0.record(DirOp::SyncDir(Dir::Bands));
        Ok(())
    }

    fn band_allocated(&self, name: &str) -> io::Result<u64> {
        let s = self.0.shared.lock();
        Ok(s.tree
            .lookup(Dir::Bands, name)
            .map_or(0, |i| s.tree.files[&i].pages.len() as u64 * PAGE))
    }
}

struct MemFile {
    dir: Arc<DirRecorder>,
    ino: u64,
}

impl MemFile {
    fn with<T>(&self, f: impl FnOnce(&Mem) -> T) -> T {
        f(&self.dir.shared.lock().tree.files[&self.ino])
    }
}

impl BandFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|m| {
            let got = m.len.saturating_sub(offset).min(buf.len() as u64) as usize;
            m.read(&mut buf[..got], offset);
            Ok(got)
        })
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.dir
            .record(DirOp::File(self.ino, Op::Write(offset, buf.to_vec())));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.with(|m| m.len))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.dir.record(DirOp::File(self.ino, Op::SetLen(len)));
        Ok(())
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        // Punching past the end changes nothing (KEEP_SIZE).
        let end = (offset + len).min(self.len()?);
        if offset < end {
            self.dir
                .record(DirOp::File(self.ino, Op::Punch(offset, end - offset)));
        }
        Ok(())
    }
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    fn sync(&self, _metadata: bool) -> io::Result<()> {
        self.dir.record(DirOp::SyncFile(self.ino));
        Ok(())
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(self.with(|m| m.next_data(offset)))
    }
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(self.with(|m| (offset < m.len).then(|| m.next_hole(offset))))
    }
}

/// A crash state: `durable` plus some of the operations not yet durable.
/// Mode 0: none; 1: all; 2: each torn and kept at random, in order; 3:
/// the same, shuffled.
pub fn crash_state(durable: &Tree, pending: &[DirOp], r: &mut Rng, mode: u64) -> Tree {
    let mut t = durable.clone();
    let mut ops: Vec<&DirOp> = pending.iter().collect();
    if mode == 3 {
        shuffle(&mut ops, r);
    }
    for op in ops {
        match mode {
            0 => {}
            1 => t.apply(op),
            _ => t.apply_torn(op, r),
        }
    }
    t
}

/// Whether `op` is made durable by `sync`.
fn covered_by(op: &DirOp, sync: &DirOp) -> bool {
    match (op, sync) {
        (DirOp::File(i, _), DirOp::SyncFile(j)) => i == j,
        (DirOp::Link(d, ..) | DirOp::Unlink(d, _) | DirOp::Rename(d, ..), DirOp::SyncDir(e)) => {
            d == e
        }
        _ => false,
    }
}

/// Rebuilds every crash state of `log` applied to `base` and hands each to
/// `verify` with the steps known durable and the steps begun (as
/// `crash::sweep` does). Returns the number of states checked.
pub fn sweep(
    seed: u64,
    base: Tree,
    log: &[DirOp],
    plan: &[Step],
    durable_from_start: usize,
    modes: u64,
    mut verify: impl FnMut(Tree, &Model, usize, usize, &str),
) -> usize {
    let model = Model::new(plan);
    let mut r = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut durable_tree = base;
    let mut pending: Vec<DirOp> = Vec::new();
    let mut durable = durable_from_start;
    let mut started = durable_from_start;
    let mut points = 0;
    for i in 0..=log.len() {
        for mode in 0..modes {
            let state = crash_state(&durable_tree, &pending, &mut r, mode);
            let ctx = format!(
                "seed {seed}, crash before op {i} of {}, mode {mode}",
                log.len()
            );
            verify(state, &model, durable, started + 1, &ctx);
            points += 1;
        }
        let Some(op) = log.get(i) else { break };
        match op {
            DirOp::SyncFile(_) | DirOp::SyncDir(_) => {
                // What the sync covers becomes durable, in order.
                let (now, rest): (Vec<DirOp>, Vec<DirOp>) =
                    pending.drain(..).partition(|p| covered_by(p, op));
                for p in &now {
                    durable_tree.apply(p);
                }
                pending = rest;
            }
            DirOp::Mark(n) => {
                started = n + 1;
                if matches!(plan[*n], Step::Flush | Step::Resize(_)) {
                    durable = n + 1;
                }
            }
            op => pending.push(op.clone()),
        }
    }
    points
}

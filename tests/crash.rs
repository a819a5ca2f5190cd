//! Crash-point replay of ASIF images (`common::crash`): every state a
//! power cut could leave during a workload, a compaction or writes into a
//! partially valid chunk must open, pass `check` without corruption, and
//! hold every write acknowledged by a completed flush.

mod common;

use std::path::Path;
use std::sync::Arc;

use asiffs::{CreateOptions, Image, LockMode, OpenOptions};
use common::crash::{
    assert_catches_lost_write, check_sectors, lost_write_plan, run_steps, sweep, Mem, Model, Op,
    Recorder, Step, SECTOR,
};
use common::Rng;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn open(store: Arc<Recorder>, writable: bool) -> asiffs::Result<Image> {
    let opts = OpenOptions {
        writable,
        cache_groups: 8,
        lock: LockMode::None,
        ..OpenOptions::default()
    };
    Image::from_storage(Path::new("crash.asif"), store, &opts)
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

fn run(store: &Arc<Recorder>, img: &Image, steps: &[Step]) {
    run_steps(&**store, img, steps, 0)
}

fn verify(state: Mem, model: &Model, durable: usize, started: usize, ctx: &str) {
    let store = Recorder::new(state);
    let img = open(store.clone(), false).unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    let report = img
        .check()
        .unwrap_or_else(|e| panic!("{ctx}: check failed: {e}"));
    assert!(
        report.corruptions.is_empty(),
        "{ctx}: corrupt: {:?}",
        report.corruptions
    );
    check_sectors(&img, model, durable, started, ctx);
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
    Mem::from_file(&path)
}

fn replay(seed: u64, steps: usize, variants: u64) {
    let store = Recorder::new(fresh_image());
    let base = store.start();
    let plan = workload(seed, steps);
    {
        let img = open(store.clone(), true).unwrap();
        run(&store, &img, &plan);
        // Dropping the image is a clean close: flush and trim.
    }
    let log = store.take_log();
    let points = sweep(seed, base, &log, &plan, 0, variants, verify);
    assert!(
        points > 10 * variants as usize,
        "too few crash points ({points}) to mean anything"
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

    let store = Recorder::new(fresh_image());
    {
        let img = open(store.clone(), true).unwrap();
        run(&store, &img, &plan);
    }
    let base = store.start();
    let moved = {
        let img = open(store.clone(), true).unwrap();
        img.compact(&mut |_, _| {}).unwrap().chunks_moved
    };
    assert!(
        moved >= 3,
        "seed {seed}: compaction moved {moved} chunks, expected the late ones"
    );
    let log = store.take_log();
    assert!(
        log.iter()
            .any(|op| matches!(op, Op::Write(off, _) if *off < MIB)),
        "no directory was rewritten"
    );
    sweep(seed, base, &log, &plan, plan.len(), 3, verify);
}

/// A chunk macOS left partially valid (state 11) holds stale bytes behind
/// its unwritten sectors. Writing into it and discarding part of it, at
/// every crash point, must never let those bytes show.
#[test]
fn partial_chunks_never_show_stale_bytes_after_a_crash() {
    let chunk = MIB / SECTOR;
    let c1 = chunk; // logical chunk 1, in sectors
    let stale_tag = 40;
    let store = Recorder::new(fresh_image());
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
    let base = store.start();
    {
        let img = open(store.clone(), true).unwrap();
        run_steps(&*store, &img, &plan, 2);
    }
    let log = store.take_log();
    sweep(5, base, &log, &plan, 2, 3, verify);
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
    let plan = lost_write_plan(8);
    let store = Recorder::new(fresh_image());
    run(&store, &open(store.clone(), true).unwrap(), &plan[..2]);
    let state = store.mem.lock().clone();
    assert_catches_lost_write(&plan, state, verify);
}

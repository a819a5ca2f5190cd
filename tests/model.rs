//! Property tests: random sequences of write, discard, read, flush, reopen,
//! resize and compact against a plain in-memory model of the disk, at
//! offsets and lengths that straddle chunk, chunk-group and table
//! boundaries.

use std::collections::BTreeMap;
use std::path::Path;

use asiffs::{CreateOptions, Image, OpenOptions};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Three tables' worth, so table boundaries are crossed.
const SIZE: u64 = 300 * GIB;

/// A sparse disk: pages absent read as zeros.
#[derive(Default)]
struct Model {
    pages: BTreeMap<u64, Vec<u8>>,
    size: u64,
}

impl Model {
    fn write(&mut self, off: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = off + i as u64;
            self.pages
                .entry(o / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize])[(o % PAGE) as usize] = b;
        }
    }

    fn zero(&mut self, off: u64, len: u64) {
        let keys: Vec<u64> = self
            .pages
            .range(off / PAGE..=(off + len - 1) / PAGE)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let page = self.pages.get_mut(&k).unwrap();
            for o in (k * PAGE).max(off)..((k + 1) * PAGE).min(off + len) {
                page[(o % PAGE) as usize] = 0;
            }
        }
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let o = off + i;
                self.pages
                    .get(&(o / PAGE))
                    .map_or(0, |p| p[(o % PAGE) as usize])
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: usize },
    Flush,
    Reopen,
    Resize { size: u64 },
    Compact,
}

/// Offsets near the places where the index changes shape.
fn offset() -> impl Strategy<Value = u64> {
    let anchors = prop_oneof![
        Just(0u64),
        Just(MIB),
        Just(2 * GIB),
        Just(126 * GIB),
        Just(252 * GIB),
        Just(SIZE - 4 * MIB)
    ];
    (anchors, -3i64 * MIB as i64..3 * MIB as i64)
        .prop_map(|(a, d)| (a as i64 + d).clamp(0, (SIZE - 4 * MIB) as i64) as u64)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (offset(), 1usize..(3 * MIB as usize), any::<u8>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        3 => (offset(), prop_oneof![1u64..4096, 1u64..(4 * MIB)]).prop_map(|(off, len)| Op::Discard { off, len }),
        4 => (offset(), 1usize..(2 * MIB as usize)).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => prop_oneof![Just(SIZE), Just(SIZE - 7 * MIB - 512), Just(SIZE - 2 * GIB)]
            .prop_map(|size| Op::Resize { size }),
        1 => Just(Op::Compact),
    ]
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn open(path: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            cache_groups: 4,
            ..OpenOptions::writable()
        },
    )
    .unwrap()
}

fn check_clean(img: &Image) {
    let r = img.check().unwrap();
    assert!(r.corruptions.is_empty(), "corrupt: {:?}", r.corruptions);
    assert_eq!(r.leaked_chunks, 0, "leaked chunks after a clean sequence");
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.asif");
    let mut img = Image::create(
        &path,
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = Model {
        size: SIZE,
        ..Default::default()
    };
    for op in ops {
        match op {
            Op::Write { off, len, seed } => {
                let len = len.min((model.size.saturating_sub(off)) as usize);
                if len == 0 {
                    continue;
                }
                let d = data(len, seed);
                img.write_at(&d, off).unwrap();
                model.write(off, &d);
            }
            Op::Discard { off, len } => {
                img.discard(off, len).unwrap();
                let end = (off + len).min(model.size);
                if off < end {
                    model.zero(off, end - off);
                }
            }
            Op::Read { off, len } => {
                let len = len.min((model.size.saturating_sub(off)) as usize);
                if len == 0 {
                    continue;
                }
                let mut buf = vec![0u8; len];
                img.read_at(&mut buf, off).unwrap();
                assert!(
                    buf == model.read(off, len),
                    "read at {off:#x}+{len:#x} differs"
                );
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => {
                drop(img);
                img = open(&path);
                check_clean(&img);
            }
            Op::Resize { size } => {
                img.resize(size).unwrap();
                if size < model.size {
                    model.zero(size, model.size - size);
                }
                model.size = size;
                assert_eq!(img.size(), size);
            }
            Op::Compact => {
                let before = std::fs::metadata(&path).unwrap().len();
                let r = img.compact(&mut |_, _| {}).unwrap();
                assert!(r.new_file_size <= before);
                assert_eq!(std::fs::metadata(&path).unwrap().len(), r.new_file_size);
                check_clean(&img);
            }
        }
    }
    // Whatever happened, the final state reads back from a fresh open.
    drop(img);
    let img = open(&path);
    check_clean(&img);
    assert_eq!(img.size(), model.size);
    let extents = img.extents().unwrap();
    for e in extents.iter().filter(|e| !e.data) {
        for probe in [e.start, e.start + e.length / 2, e.start + e.length - 1] {
            assert_eq!(
                model.read(probe, 1),
                [0],
                "hole at {probe:#x} holds data in the model"
            );
        }
    }
    for &page in model.pages.keys() {
        let off = page * PAGE;
        if off >= model.size {
            continue;
        }
        let len = PAGE.min(model.size - off) as usize;
        let mut buf = vec![0u8; len];
        img.read_at(&mut buf, off).unwrap();
        assert!(
            buf == model.read(off, len),
            "page at {off:#x} differs after reopen"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_a_plain_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn compaction_after_discards_shrinks_the_file_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.asif");
    let img = Image::create(
        &path,
        &CreateOptions {
            size: 4 * GIB,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = Model {
        size: 4 * GIB,
        ..Default::default()
    };
    for i in 0..64u64 {
        let d = data(MIB as usize, i as u8);
        img.write_at(&d, i * 3 * MIB).unwrap();
        model.write(i * 3 * MIB, &d);
    }
    img.flush().unwrap();
    for i in (0..64u64).filter(|i| i % 3 != 0) {
        img.discard(i * 3 * MIB, MIB).unwrap();
        model.zero(i * 3 * MIB, MIB);
    }
    // Two partial discards leaving a chunk all hole: compaction unmaps it.
    img.discard(0, MIB / 2).unwrap();
    img.discard(MIB / 2, MIB / 2).unwrap();
    model.zero(0, MIB);
    drop(img);
    let before = std::fs::metadata(&path).unwrap().len();
    let img = open(&path);
    let r = img.compact(&mut |_, _| {}).unwrap();
    check_clean(&img);
    // Header, metadata table, metadata, its bitmap, table 0, and the 21
    // data chunks left (every third, less chunk 0).
    assert_eq!(r.new_file_size, (5 + 21) * MIB, "{r:?}");
    assert!(r.new_file_size < before);
    for i in 0..64u64 {
        let mut buf = vec![0u8; MIB as usize];
        img.read_at(&mut buf, i * 3 * MIB).unwrap();
        assert!(
            buf == model.read(i * 3 * MIB, MIB as usize),
            "chunk {i} differs after compaction"
        );
    }
}

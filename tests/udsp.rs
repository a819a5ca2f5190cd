//! UDSP `.sparseimage`: the translator against an in-memory model, the
//! on-disk layout as `apple-formats.md` §2 describes it, chained index
//! nodes, concurrent writers, hole punching, hostile files, compaction,
//! and crash-point replay of the update protocol.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asiffs::disk::Format;
use asiffs::registry;
use asiffs::udsp::{self, SparseImage};
use asiffs::{Error, LockMode, OpenOptions};
use common::crash::{
    assert_catches_lost_write, check_sectors, lost_write_plan, run_steps, sweep, Mem, Model, Op,
    Recorder, Step,
};
use common::{assert_same_bytes, Rng};

const SECTOR: u64 = 512;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Spec §2: node size, slots per node, where the band ids start.
const NODE: u64 = 4096;
const HEADER_SLOTS: u64 = 1008;
const INDEX_SLOTS: u64 = 1010;
const HEADER_IDS: u64 = 0x40;
const INDEX_IDS: u64 = 0x38;

fn be32(b: &[u8], at: u64) -> u32 {
    u32::from_be_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn fresh(dir: &Path, name: &str, size: u64, band: u64) -> (PathBuf, SparseImage) {
    let p = dir.join(name);
    let img = SparseImage::create(&p, size, band).unwrap();
    (p, img)
}

fn reopen(p: &Path) -> SparseImage {
    SparseImage::open(p, &OpenOptions::writable()).unwrap()
}

fn read_all(img: &SparseImage) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

/// Band id -> file offset of its band, read from the file as the spec
/// says (independent of the crate's own map).
fn spec_map(file: &[u8]) -> BTreeMap<u32, u64> {
    let bs = u64::from(be32(file, 8)) * SECTOR;
    let mut m = BTreeMap::new();
    let mut node = 0u64;
    let (mut ids, mut slots) = (HEADER_IDS, HEADER_SLOTS);
    let mut next = be64(file, 0x14);
    loop {
        for k in 0..slots {
            let id = be32(file, node + ids + 4 * k);
            if id != 0 {
                assert!(
                    m.insert(id, node + NODE + k * bs).is_none(),
                    "id {id} twice"
                );
            }
        }
        if next == 0 {
            break;
        }
        node = next;
        assert_eq!(&file[node as usize..node as usize + 4], b"sprs");
        next = be64(file, node + 0x0C);
        (ids, slots) = (INDEX_IDS, INDEX_SLOTS);
    }
    m
}

#[test]
fn create_writes_the_header_node_alone() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.sparseimage");
    udsp::create(&p, 100 * MIB + 512, udsp::header::DEFAULT_BAND_SIZE).unwrap();
    let f = std::fs::read(&p).unwrap();
    assert_eq!(f.len(), 4096);
    let sectors = (100 * MIB + 512) / SECTOR;
    let mut want = vec![0u8; 4096];
    want[..4].copy_from_slice(b"sprs");
    want[4..8].copy_from_slice(&3u32.to_be_bytes());
    want[8..12].copy_from_slice(&2048u32.to_be_bytes());
    want[12..16].copy_from_slice(&1u32.to_be_bytes());
    want[0x10..0x14].copy_from_slice(&(sectors as u32).to_be_bytes());
    want[0x1C..0x24].copy_from_slice(&sectors.to_be_bytes());
    assert_same_bytes("fresh header", &f, &want);
    assert_eq!(registry::probe(&p).unwrap(), Some(Format::Udsp));
    let img = registry::open(&p, None, &OpenOptions::default()).unwrap();
    assert_eq!(img.format(), Format::Udsp);
    assert_eq!(img.format().name(), "udsp");
    assert_eq!(img.size(), 100 * MIB + 512);
    assert!(!img.is_writable());
    assert!(matches!(img.write_at(&[1], 0), Err(Error::ReadOnly)));
    // No temporary file left beside it.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn create_refuses_bad_arguments_and_existing_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.sparseimage");
    let err = |size, band| udsp::create(&p, size, band).unwrap_err().to_string();
    assert_eq!(
        err(MIB, 0),
        "band size 0 is not a positive multiple of 512 bytes"
    );
    assert_eq!(
        err(MIB, 1000),
        "band size 1000 is not a positive multiple of 512 bytes"
    );
    assert_eq!(
        err(MIB, 1 << 42),
        "band size 4398046511104 is too large (at most 2199023255040 bytes)"
    );
    assert_eq!(
        err(MIB + 1, 4096),
        "size 1048577 is not a multiple of 512 bytes"
    );
    assert_eq!(
        err(1 << 60, 512),
        "size 1152921504606846976 needs 2251799813685248 bands of 512 bytes, more than 32-bit band ids allow"
    );
    assert!(!p.exists());
    udsp::create(&p, MIB, 4096).unwrap();
    assert_eq!(
        err(MIB, 4096),
        format!("{}: file exists (use --force to replace it)", p.display())
    );
}

#[test]
fn writers_lock_the_file() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = fresh(d.path(), "a.sparseimage", 8 * MIB, MIB);
    let e = SparseImage::open(&p, &OpenOptions::writable())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: image is in use by another process (locked)",
            p.display()
        )
    );
    assert!(matches!(
        SparseImage::open(&p, &OpenOptions::default()),
        Err(Error::Locked { .. })
    ));
    drop(img);
    let r = SparseImage::open(&p, &OpenOptions::default()).unwrap();
    assert!(matches!(
        SparseImage::open(&p, &OpenOptions::writable()),
        Err(Error::Locked { .. })
    ));
    drop(r);
    reopen(&p);
}

/// Random unaligned writes, discards and zeroings against a byte model;
/// then a reopen must read the same disk and the file must match the spec.
fn model_run(seed: u64, size: u64, band: u64, steps: usize) {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = fresh(d.path(), "m.sparseimage", size, band);
    let mut model = vec![0u8; size as usize];
    let mut r = Rng(seed);
    let mut buf = Vec::new();
    for step in 0..steps {
        let len = match r.below(4) {
            0 => 1 + r.below(16),
            1 => 1 + r.below(8 * KIB),
            2 => 1 + r.below(3 * band),
            _ => SECTOR * (1 + r.below(64)),
        }
        .min(size);
        let off = r.below(size - len + 1);
        match r.below(10) {
            0..=5 => {
                let data = common::pattern(seed * 1000 + step as u64, len as usize);
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 => {
                // Clamped at the end of the disk.
                img.discard(off, len * 3).unwrap();
                let end = (off + len * 3).min(size);
                model[off as usize..end as usize].fill(0);
            }
            7 => {
                img.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => img.flush().unwrap(),
            _ => {
                buf.resize(len as usize, 0xAA);
                img.read_at(&mut buf, off).unwrap();
                assert_same_bytes(
                    &format!("seed {seed} step {step} read {off:#x}+{len:#x}"),
                    &buf,
                    &model[off as usize..(off + len) as usize],
                );
            }
        }
    }
    assert_same_bytes("before reopen", &read_all(&img), &model);
    assert_eq!(img.check().unwrap(), Vec::<String>::new());
    img.close().unwrap();
    let img = reopen(&p);
    assert_same_bytes("after reopen", &read_all(&img), &model);
    drop(img);
    // The file as the spec reads it holds the same disk.
    let file = std::fs::read(&p).unwrap();
    let mut disk = vec![0u8; size as usize];
    for (id, at) in spec_map(&file) {
        let start = (u64::from(id) - 1) * band;
        let n = band.min(size - start) as usize;
        let have = file.len().saturating_sub(at as usize).min(n);
        disk[start as usize..start as usize + have]
            .copy_from_slice(&file[at as usize..at as usize + have]);
    }
    assert_same_bytes("spec reading of the file", &disk, &model);
    assert_eq!(udsp::check(&p).unwrap(), Vec::<String>::new());
}

#[test]
fn random_io_matches_a_model_with_1_mib_bands() {
    model_run(1, 24 * MIB + 3 * SECTOR, MIB, 300);
}

#[test]
fn random_io_matches_a_model_with_small_bands() {
    for seed in [2, 3] {
        model_run(seed, 3 * MIB, 4 * KIB + SECTOR, 400);
    }
}

#[test]
fn bands_are_appended_in_write_order() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = fresh(d.path(), "o.sparseimage", 16 * MIB, MIB);
    img.write_at(&[5; 10], 9 * MIB + 3).unwrap();
    img.write_at(&[6; 10], 2 * MIB).unwrap();
    img.write_at(&[7; 2], 3 * MIB - 1).unwrap(); // ends band 2, starts band 3
    img.close().unwrap();
    let f = std::fs::read(&p).unwrap();
    assert_eq!(f.len() as u64, NODE + 3 * MIB);
    assert_eq!(
        (0..4)
            .map(|k| be32(&f, HEADER_IDS + 4 * k))
            .collect::<Vec<_>>(),
        [10, 3, 4, 0]
    );
    assert_eq!(&f[(NODE + 3) as usize..(NODE + 13) as usize], &[5; 10]);
    assert_eq!(
        &f[(NODE + MIB) as usize..(NODE + MIB + 10) as usize],
        &[6; 10]
    );
    assert_eq!(f[(NODE + 2 * MIB - 1) as usize], 7);
    assert_eq!(f[(NODE + 2 * MIB) as usize], 7);
}

#[test]
fn index_nodes_are_chained_when_the_header_is_full() {
    let d = tempfile::tempdir().unwrap();
    let band = 4 * KIB;
    let bands = 2500u64;
    let (p, img) = fresh(d.path(), "c.sparseimage", bands * band, band);
    let mut order: Vec<u64> = (0..bands).collect();
    let mut r = Rng(77);
    for i in (1..order.len()).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    for &b in &order {
        img.write_at(&common::pattern(b, 100), b * band + 7)
            .unwrap();
    }
    let n1 = NODE + HEADER_SLOTS * band;
    let n2 = n1 + NODE + INDEX_SLOTS * band;
    assert_eq!(img.index_nodes(), [n1, n2]);
    assert_eq!(img.stats().bands_used, bands);
    img.close().unwrap();

    let f = std::fs::read(&p).unwrap();
    assert_eq!(f.len() as u64, n2 + NODE + (bands - 2018) * band);
    assert_eq!(be64(&f, 0x14), n1);
    assert_eq!(
        &f[n1 as usize..n1 as usize + 12],
        b"sprs\0\0\0\x01\0\0\0\x01"
    );
    assert_eq!(be64(&f, n1 + 0x0C), n2);
    assert_eq!(&f[n2 as usize..n2 as usize + 8], b"sprs\0\0\0\x02");
    assert_eq!(be64(&f, n2 + 0x0C), 0);
    // Slot k of each node names the k-th band written after it.
    assert_eq!(u64::from(be32(&f, HEADER_IDS)), order[0] + 1);
    assert_eq!(u64::from(be32(&f, n1 + INDEX_IDS)), order[1008] + 1);
    assert_eq!(
        u64::from(be32(&f, n2 + INDEX_IDS + 4 * 481)),
        order[2499] + 1
    );
    let m = spec_map(&f);
    assert_eq!(m.len() as u64, bands);
    for b in 0..bands {
        let at = m[&(b as u32 + 1)] as usize + 7;
        assert_eq!(&f[at..at + 100], &common::pattern(b, 100)[..], "band {b}");
    }
    let img = reopen(&p);
    for b in [0, 1007, 1008, 2017, 2018, 2499] {
        let mut got = vec![0u8; 100];
        img.read_at(&mut got, b * band + 7).unwrap();
        assert_eq!(got, common::pattern(b, 100), "band {b} after reopen");
    }
    assert_eq!(img.check().unwrap(), Vec::<String>::new());
}

#[test]
fn eight_threads_writing_fresh_bands_never_share_one() {
    let d = tempfile::tempdir().unwrap();
    let band = 8 * KIB;
    let bands = 1200u64; // the header node fills up mid-run
    let (p, img) = fresh(d.path(), "t.sparseimage", bands * band, band);
    let img = Arc::new(img);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for b in (t..bands).step_by(8) {
                    img.write_at(&common::pattern(b, 512), b * band).unwrap();
                    // Each thread also writes its own sector of bands all
                    // the others write too, often before those have a slot.
                    let shared = b / 8;
                    img.write_at(
                        &common::pattern(10_000 + t, 512),
                        shared * band + SECTOR * (1 + t),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(img.stats().bands_used, bands);
    assert_eq!(img.stats().bands_allocated, bands);
    assert_eq!(img.index_nodes().len(), 1);
    assert_eq!(img.check().unwrap(), Vec::<String>::new());
    let verify = |img: &SparseImage| {
        for b in 0..bands {
            let mut got = vec![0u8; band as usize];
            img.read_at(&mut got, b * band).unwrap();
            for s in 0..band / SECTOR {
                let want = match s {
                    0 => common::pattern(b, 512),
                    1..=8 if b < bands / 8 => common::pattern(10_000 + s - 1, 512),
                    _ => vec![0; 512],
                };
                let at = (s * SECTOR) as usize;
                assert_eq!(&got[at..at + 512], &want[..], "band {b} sector {s}");
            }
        }
    };
    verify(&img);
    drop(img);
    let f = std::fs::read(&p).unwrap();
    assert_eq!(spec_map(&f).len() as u64, bands);
    verify(&reopen(&p));
}

#[test]
fn discard_punches_holes_and_compact_gives_the_file_back() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = fresh(d.path(), "h.sparseimage", 16 * MIB, MIB);
    let data = common::pattern(9, (8 * MIB) as usize);
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    let blocks = || std::fs::metadata(&p).unwrap().blocks() * 512;
    let before = blocks();
    assert!(before >= 8 * MIB, "{before}");
    assert_eq!(img.allocated_bytes().unwrap(), before);
    // Bands 1 and 2 whole, half of band 5, and a few unaligned bytes.
    img.discard(MIB, 2 * MIB).unwrap();
    img.discard(5 * MIB, MIB / 2).unwrap();
    img.write_zeroes(7 * MIB + 100, 5).unwrap();
    img.flush().unwrap();
    let after = blocks();
    // Less a block or two the host may take for its extent tree.
    assert!(
        before - after >= 2 * MIB + MIB / 2 - 16 * KIB,
        "discard freed only {} bytes",
        before - after
    );
    let mut model = data.clone();
    model[MIB as usize..3 * MIB as usize].fill(0);
    model[5 * MIB as usize..(5 * MIB + MIB / 2) as usize].fill(0);
    model[(7 * MIB + 100) as usize..(7 * MIB + 105) as usize].fill(0);
    model.resize(16 * MIB as usize, 0);
    assert_same_bytes("after discards", &read_all(&img), &model);
    // Slots stay until compaction; the file grew 16 MiB ahead.
    assert_eq!(img.stats().bands_used, 8);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), NODE + 16 * MIB);
    assert_eq!(img.seek_data(MIB).unwrap(), Some(MIB));

    let mut seen = Vec::new();
    let rep = img.compact(&mut |a, b| seen.push((a, b))).unwrap();
    assert_eq!(rep.bands_dropped, 2);
    assert_eq!(rep.bands_moved, 2);
    assert_eq!(seen, [(0, 2), (1, 2), (2, 2)]);
    assert_eq!(
        (rep.old_file_size, rep.new_file_size),
        (NODE + 16 * MIB, NODE + 6 * MIB)
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), NODE + 6 * MIB);
    assert_eq!(img.seek_data(MIB).unwrap(), Some(3 * MIB));
    assert_same_bytes("after compact", &read_all(&img), &model);
    assert_eq!(img.check().unwrap(), Vec::<String>::new());
    // The moved bands (6 and 7) took the freed slots 1 and 2; the header's
    // reserved bytes are zero again.
    let f = std::fs::read(&p).unwrap();
    assert_eq!(
        (0..7)
            .map(|k| be32(&f, HEADER_IDS + 4 * k))
            .collect::<Vec<_>>(),
        [1, 7, 8, 4, 5, 6, 0]
    );
    assert!(f[0x24..0x40].iter().all(|&b| b == 0));
    // New writes append after the compacted bands.
    img.write_at(&[3; 4], 12 * MIB).unwrap();
    model[12 * MIB as usize..12 * MIB as usize + 4].fill(3);
    img.close().unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), NODE + 7 * MIB);
    assert_same_bytes("after reopen", &read_all(&reopen(&p)), &model);
}

#[test]
fn compact_drops_index_nodes_no_longer_needed() {
    let d = tempfile::tempdir().unwrap();
    let band = 4 * KIB;
    let (p, img) = fresh(d.path(), "n.sparseimage", 3000 * band, band);
    for b in 0..2100u64 {
        img.write_at(&common::pattern(b, 16), b * band).unwrap();
    }
    assert_eq!(img.index_nodes().len(), 2);
    // Keep 600 bands: the first and last 300.
    img.discard(300 * band, 1500 * band).unwrap();
    let rep = img.compact(&mut |_, _| {}).unwrap();
    assert_eq!((rep.bands_dropped, rep.bands_moved), (1500, 300));
    assert_eq!(img.index_nodes(), Vec::<u64>::new());
    assert_eq!(rep.new_file_size, NODE + 600 * band);
    let f = std::fs::read(&p).unwrap();
    assert_eq!(be64(&f, 0x14), 0);
    img.close().unwrap();
    let img = reopen(&p);
    for b in (0..300).chain(1800..2100) {
        let mut got = vec![0u8; 16];
        img.read_at(&mut got, b * band).unwrap();
        assert_eq!(got, common::pattern(b, 16), "band {b}");
    }
    let mut got = vec![1u8; band as usize];
    img.read_at(&mut got, 1000 * band).unwrap();
    assert!(got.iter().all(|&b| b == 0));
}

#[test]
fn seek_and_extents_follow_the_band_map() {
    let d = tempfile::tempdir().unwrap();
    let (_p, img) = fresh(d.path(), "s.sparseimage", 10 * MIB - 4096, MIB);
    img.write_at(&[1], 2 * MIB + 5).unwrap();
    img.write_at(&[1], 3 * MIB).unwrap();
    img.write_at(&[1], 9 * MIB).unwrap();
    assert_eq!(img.seek_data(0).unwrap(), Some(2 * MIB));
    assert_eq!(img.seek_data(2 * MIB + 7).unwrap(), Some(2 * MIB + 7));
    assert_eq!(img.seek_data(4 * MIB).unwrap(), Some(9 * MIB));
    assert_eq!(img.seek_data(10 * MIB).unwrap(), None);
    assert_eq!(img.seek_hole(0).unwrap(), 0);
    assert_eq!(img.seek_hole(2 * MIB + 9).unwrap(), 4 * MIB);
    assert_eq!(img.seek_hole(9 * MIB).unwrap(), 10 * MIB - 4096);
    assert!(matches!(
        img.seek_hole(10 * MIB - 4096),
        Err(Error::OutOfRange { .. })
    ));
    let e: Vec<_> = img
        .extents()
        .unwrap()
        .iter()
        .map(|e| (e.start, e.length, e.data, e.offset))
        .collect();
    assert_eq!(
        e,
        [
            (0, 2 * MIB, false, None),
            (2 * MIB, 2 * MIB, true, Some(NODE)),
            (4 * MIB, 5 * MIB, false, None),
            (9 * MIB, MIB - 4096, true, Some(NODE + 2 * MIB)),
        ]
    );
}

#[test]
fn resize_grows_with_zeros_and_shrinks() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = fresh(d.path(), "r.sparseimage", 4 * MIB, MIB);
    img.write_at(&vec![9; (4 * MIB) as usize], 0).unwrap();
    img.resize(2 * MIB + 1024).unwrap();
    assert_eq!(img.size(), 2 * MIB + 1024);
    assert_eq!(img.stats().bands_used, 3);
    img.resize(6 * MIB).unwrap();
    let all = read_all(&img);
    assert!(all[..(2 * MIB + 1024) as usize].iter().all(|&b| b == 9));
    assert!(all[(2 * MIB + 1024) as usize..].iter().all(|&b| b == 0));
    assert_eq!(
        img.resize(MIB + 1).unwrap_err().to_string(),
        "size 1048577 is not a multiple of 512 bytes"
    );
    assert_eq!(img.max_size(), u64::from(u32::MAX) * MIB);
    assert_eq!(
        img.resize(img.max_size() + MIB).unwrap_err().to_string(),
        "size 4503599627370496 needs 4294967296 bands of 1048576 bytes, more than 32-bit band ids allow"
    );
    img.close().unwrap();
    let f = std::fs::read(&p).unwrap();
    assert_eq!(be32(&f, 0x10), (6 * MIB / SECTOR) as u32);
    assert_eq!(be64(&f, 0x1C), 6 * MIB / SECTOR);
    let img = reopen(&p);
    assert_eq!(img.size(), 6 * MIB);
    assert_eq!(read_all(&img), all);
    assert_eq!(img.check().unwrap(), Vec::<String>::new());
}

/// A valid image with bands in the header node and one index node, as
/// bytes, for the hostile-file tests: band size 4 KiB, 1010 bands written.
fn chained_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let (p, img) = fresh(dir, "base.sparseimage", 3000 * 4 * KIB, 4 * KIB);
    for b in 0..1010u64 {
        img.write_at(&[b as u8 | 1; 8], b * 4 * KIB).unwrap();
    }
    img.close().unwrap();
    let bytes = std::fs::read(&p).unwrap();
    (p, bytes)
}

#[test]
fn hostile_files_give_one_line_errors_and_stay_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let (_, base) = chained_image(d.path());
    let n1 = NODE + HEADER_SLOTS * 4 * KIB;
    assert_eq!(be64(&base, 0x14), n1);
    let put32 = |b: &mut Vec<u8>, at: u64, v: u32| {
        b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes())
    };
    let put64 = |b: &mut Vec<u8>, at: u64, v: u64| {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
    };
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch, String)> = vec![
        (
            "magic",
            Box::new(|b| b[..4].copy_from_slice(b"koly")),
            "not a UDSP sparse image (magic \"koly\", expected \"sprs\")".into(),
        ),
        (
            "version",
            Box::new(move |b| put32(b, 4, 4)),
            "corrupt image: unsupported UDSP version 4 (only version 3 is known)".into(),
        ),
        (
            "band size zero",
            Box::new(move |b| put32(b, 8, 0)),
            "corrupt image: band size is 0 sectors".into(),
        ),
        (
            "sector counts disagree",
            Box::new(move |b| put32(b, 0x10, 7)),
            "corrupt image: sector counts disagree: low 32 bits 0x7, 64-bit count 0x5dc0".into(),
        ),
        (
            "size overflows",
            Box::new(move |b| {
                put32(b, 0x10, u32::MAX);
                put64(b, 0x1C, u64::MAX);
            }),
            "corrupt image: sector count 0xffffffffffffffff overflows a 64-bit byte size".into(),
        ),
        (
            "band id out of range",
            Box::new(move |b| put32(b, HEADER_IDS + 4 * 5, 3001)),
            "corrupt image: node 0 slot 5 names band id 3001, past the last band id 3000".into(),
        ),
        (
            "two slots name one band",
            Box::new(move |b| put32(b, n1 + INDEX_IDS + 4, 17)),
            "corrupt image: band id 17 is named by two slots: node 0 slot 16 and node 1 slot 1"
                .into(),
        ),
        (
            "chain loops back",
            Box::new(move |b| put64(b, n1 + 0x0C, n1)),
            format!(
                "corrupt image: index node 2 at {n1:#x} lies inside the bands of the node before it (which end at {:#x})",
                n1 + NODE + INDEX_SLOTS * 4 * KIB
            ),
        ),
        (
            "chain points into the header's bands",
            Box::new(move |b| put64(b, 0x14, NODE)),
            format!(
                "corrupt image: index node 1 at 0x1000 lies inside the bands of the node before it (which end at {n1:#x})"
            ),
        ),
        (
            "chain points past the end",
            Box::new(move |b| put64(b, n1 + 0x0C, 1 << 40)),
            format!(
                "corrupt image: index node 2 at 0x10000000000 lies past the end of the file ({} bytes)",
                n1 + NODE + 2 * 4 * KIB
            ),
        ),
        (
            "index node without magic",
            Box::new(move |b| b[n1 as usize..n1 as usize + 4].fill(0)),
            format!("corrupt image: index node at {n1:#x} has magic 0x00000000, expected \"sprs\""),
        ),
        (
            "band past the end",
            Box::new(move |b| put32(b, n1 + INDEX_IDS + 4 * 9, 2000)),
            format!(
                "corrupt image: node 1 slot 9 (band id 2000) lies past the end of the file ({} bytes)",
                n1 + NODE + 2 * 4 * KIB
            ),
        ),
        (
            "truncated header",
            Box::new(|b| b.truncate(1000)),
            "corrupt image: header node is truncated (1000 bytes, need 4096)".into(),
        ),
    ];
    for (what, patch, want) in cases {
        let mut bytes = base.clone();
        patch(&mut bytes);
        let p = d.path().join("hostile.sparseimage");
        std::fs::write(&p, &bytes).unwrap();
        for opts in [OpenOptions::writable(), OpenOptions::default()] {
            let e = SparseImage::open(&p, &opts)
                .err()
                .unwrap_or_else(|| panic!("{what}: opens"));
            let e = e.to_string();
            assert_eq!(e, want, "{what}");
            assert_eq!(e.lines().count(), 1, "{what}");
            let e = registry::open(&p, None, &opts).err().unwrap().to_string();
            if what == "magic" {
                assert!(
                    e.contains(": not a disk image asiffs knows ("),
                    "{what}: {e}"
                );
            } else {
                assert_eq!(e, want, "{what} through disk::open");
            }
        }
        match udsp::check(&p) {
            Ok(lines) => assert_eq!(
                lines,
                [want.trim_start_matches("corrupt image: ")],
                "{what}: check"
            ),
            Err(e) => assert_eq!(e.to_string(), want, "{what}: check"),
        }
        assert!(
            std::fs::read(&p).unwrap() == bytes,
            "{what}: the file changed"
        );
    }
}

#[test]
fn check_lists_every_problem() {
    let d = tempfile::tempdir().unwrap();
    let (p, mut b) = chained_image(d.path());
    b[(HEADER_IDS + 8) as usize..(HEADER_IDS + 12) as usize]
        .copy_from_slice(&9999u32.to_be_bytes());
    b[(HEADER_IDS + 12) as usize..(HEADER_IDS + 16) as usize].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_eq!(
        udsp::check(&p).unwrap(),
        [
            "node 0 slot 2 names band id 9999, past the last band id 3000",
            "band id 1 is named by two slots: node 0 slot 0 and node 0 slot 3",
        ]
    );
}

// ---- crash-point replay (common::crash) ----------------------------------

fn open_mem(store: Arc<Recorder>, writable: bool) -> asiffs::Result<SparseImage> {
    let opts = OpenOptions {
        writable,
        lock: LockMode::None,
        ..OpenOptions::default()
    };
    SparseImage::from_storage(Path::new("crash.sparseimage"), store, &opts)
}

/// Crash images: 4 KiB bands, so that the header node's 1008 slots fill
/// and an index node is chained during the workload.
const CBAND: u64 = 4 * KIB;
const CBANDS: u64 = 3000;
const CDISK: u64 = CBANDS * CBAND;
const SPB: u64 = CBAND / SECTOR;

fn verify(state: Mem, model: &Model, durable: usize, started: usize, ctx: &str) {
    let store = Recorder::new(state);
    let img =
        open_mem(store.clone(), false).unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    check_sectors(&img, model, durable, started, ctx);
    drop(img);
    // The survivor takes new bands and stays consistent.
    let img = open_mem(store, true).unwrap_or_else(|e| panic!("{ctx}: no writable reopen: {e}"));
    img.write_at(&[0xEE; 3 * CBAND as usize], CDISK - 3 * CBAND)
        .unwrap();
    img.flush().unwrap();
    assert_eq!(img.check().unwrap(), Vec::<String>::new(), "{ctx}");
    let mut big = vec![0u8; 3 * CBAND as usize];
    img.read_at(&mut big, CDISK - 3 * CBAND).unwrap();
    assert!(big.iter().all(|&b| b == 0xEE), "{ctx}: recovery write lost");
}

fn fresh_mem() -> Mem {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("base.sparseimage");
    udsp::create(&p, CDISK, CBAND).unwrap();
    Mem::from_file(&p)
}

/// 1005 even bands written and flushed before the recording starts, so
/// the recorded workload fills the header node and chains an index node.
fn prefix() -> Vec<Step> {
    let mut plan: Vec<Step> = (0..1005u64)
        .map(|b| Step::Write {
            sector: b * 2 * SPB + b % SPB,
            count: 1,
            tag: 1000 + b as u32,
        })
        .collect();
    plan.push(Step::Flush);
    plan
}

fn workload(seed: u64, first_tag: u32, steps: usize) -> Vec<Step> {
    let mut r = Rng(seed);
    let mut tag = first_tag;
    (0..steps)
        .map(|_| {
            // Fresh bands mostly, some rewrites of the prefix's.
            let band = if r.below(3) == 0 {
                r.below(1005) * 2
            } else {
                r.below(CBANDS - 4)
            };
            let sector = band * SPB + r.below(SPB);
            match r.below(10) {
                0..=5 => {
                    tag += 1;
                    Step::Write {
                        sector,
                        count: 1 + r.below(2 * SPB),
                        tag,
                    }
                }
                6..=7 => Step::Discard {
                    sector,
                    count: 1 + r.below(2 * SPB),
                },
                _ => Step::Flush,
            }
        })
        .collect()
}

fn replay(seed: u64, steps: usize) {
    let store = Recorder::new(fresh_mem());
    let mut plan = prefix();
    let first = plan.len();
    {
        let img = open_mem(store.clone(), true).unwrap();
        run_steps(&*store, &img, &plan, 0);
    }
    plan.extend(workload(seed, 5000, steps));
    let base = store.start();
    {
        let img = open_mem(store.clone(), true).unwrap();
        run_steps(&*store, &img, &plan, first);
        assert_eq!(
            img.index_nodes().len(),
            1,
            "seed {seed}: the workload chains no node"
        );
    }
    let log = store.take_log();
    let points = sweep(seed, base, &log, &plan, first, 4, verify);
    assert!(points > 100, "seed {seed}: only {points} crash points");
}

#[test]
fn every_crash_point_opens_and_keeps_flushed_writes() {
    replay(1, 30);
}

#[test]
fn crash_points_with_other_seeds() {
    for seed in [7, 4242] {
        replay(seed, 20);
    }
}

#[test]
fn every_crash_point_during_compaction_keeps_all_data() {
    let store = Recorder::new(fresh_mem());
    let mut plan = prefix();
    // Bands 2500..2520 take slots 1005..1024, most in the index node;
    // discarding 40 early bands leaves room below for them.
    for b in 2500..2520u64 {
        plan.push(Step::Write {
            sector: b * SPB,
            count: SPB,
            tag: 3000 + b as u32,
        });
    }
    for b in 0..40u64 {
        let band = b * 2;
        plan.push(Step::Discard {
            sector: band * SPB,
            count: SPB,
        });
    }
    plan.push(Step::Flush);
    {
        let img = open_mem(store.clone(), true).unwrap();
        run_steps(&*store, &img, &plan, 0);
    }
    let base = store.start();
    {
        let img = open_mem(store.clone(), true).unwrap();
        let rep = img.compact(&mut |_, _| {}).unwrap();
        assert_eq!((rep.bands_dropped, rep.bands_moved), (40, 40));
        assert_eq!(img.index_nodes().len(), 0);
    }
    let log = store.take_log();
    assert!(
        log.iter().any(|op| matches!(op, Op::Write(0x24, _))),
        "no band move was recorded in the header"
    );
    let n = plan.len();
    sweep(11, base, &log, &plan, n, 4, verify);
}

#[test]
fn the_replay_detects_a_lost_flushed_write() {
    let plan = lost_write_plan(4 * SPB);
    let store = Recorder::new(fresh_mem());
    run_steps(
        &*store,
        &open_mem(store.clone(), true).unwrap(),
        &plan[..2],
        0,
    );
    let state = store.mem.lock().clone();
    assert_catches_lost_write(&plan, state, verify);
}

#[test]
fn an_interrupted_band_move_opens_and_a_writer_finishes_it() {
    // What a crash between naming the new slot and clearing the old one
    // leaves: band id 1 in slots 0 and 2 with the same bytes, the move
    // (2 -> 0) recorded in the header's reserved bytes.
    let d = tempfile::tempdir().unwrap();
    let (p, img) = fresh(d.path(), "i.sparseimage", 64 * KIB, 4 * KIB);
    img.write_at(&[0xAB; 100], 2 * 4 * KIB).unwrap(); // band 2, slot 0
    img.write_at(&[0xCD; 100], 4 * KIB).unwrap(); // band 1, slot 1
    img.write_at(&[0xEF; 100], 0).unwrap(); // band 0, slot 2
    img.close().unwrap();
    let mut f = std::fs::read(&p).unwrap();
    let band0 = f[(NODE + 2 * 4 * KIB) as usize..(NODE + 3 * 4 * KIB) as usize].to_vec();
    f[NODE as usize..(NODE + 4 * KIB) as usize].copy_from_slice(&band0);
    f[HEADER_IDS as usize..HEADER_IDS as usize + 4].copy_from_slice(&1u32.to_be_bytes());
    f[0x24..0x28].copy_from_slice(b"asmv");
    f[0x28..0x30].copy_from_slice(&2u64.to_be_bytes());
    f[0x30..0x38].copy_from_slice(&0u64.to_be_bytes());
    std::fs::write(&p, &f).unwrap();
    // Band 2 lost its slot to the move in this made-up state.
    let mut want = vec![0u8; 64 * KIB as usize];
    want[..100].fill(0xEF);
    want[4 * KIB as usize..4 * KIB as usize + 100].fill(0xCD);

    let r = SparseImage::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(r.band_offset(0), Some(NODE));
    assert_same_bytes("read-only", &read_all(&r), &want);
    drop(r);
    assert_eq!(std::fs::read(&p).unwrap(), f, "a reader changed the file");
    assert_eq!(udsp::check(&p).unwrap(), Vec::<String>::new());

    let w = reopen(&p);
    assert_same_bytes("writable", &read_all(&w), &want);
    drop(w);
    let g = std::fs::read(&p).unwrap();
    assert_eq!(
        (0..3)
            .map(|k| be32(&g, HEADER_IDS + 4 * k))
            .collect::<Vec<_>>(),
        [1, 2, 0]
    );
    assert!(g[0x24..0x40].iter().all(|&b| b == 0));

    // Without the record the same pair is corrupt.
    f[0x24..0x40].fill(0);
    std::fs::write(&p, &f).unwrap();
    assert_eq!(
        SparseImage::open(&p, &OpenOptions::writable())
            .err()
            .unwrap()
            .to_string(),
        "corrupt image: band id 1 is named by two slots: node 0 slot 0 and node 0 slot 2"
    );
}

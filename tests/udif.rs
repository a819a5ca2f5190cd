//! UDIF (`.dmg`) images through `registry::open`: Apple's vectors read
//! exactly, every codec, the run cache, UDRW images written in place
//! against an in-memory model (zero and free runs taking new space,
//! resizes), locks, refusals, hostile files, and every crash point.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asiffs::disk::{Disk, Format};
use asiffs::registry;
use asiffs::udif::blkx::{Mish, RunEntry, RunKind};
use asiffs::udif::create::{create_udrw, write_image};
use asiffs::udif::trailer::Checksum;
use asiffs::udif::{self, Udif};
use asiffs::{Error, LockMode, OpenOptions};
use common::crash::{
    assert_catches_lost_write, check_sectors, lost_write_plan, run_steps, sector_pattern, sweep,
    Mem, Model, Recorder, Step,
};
use common::{pattern, vectors_dir, Rng};
use md5::{Digest, Md5};

const ZLIB: &str = "hfsplus_zlib.dmg";
const BZIP2: &str = "hfsplus_bzip2.dmg";
/// vectors/README.md: 3836 sectors.
const VECTOR_SIZE: u64 = 1_964_032;
const MIB: u64 = 1 << 20;

fn vector(name: &str) -> PathBuf {
    let p = vectors_dir().join("udif").join(name);
    assert!(p.is_file(), "missing test vector {}", p.display());
    p
}

/// A writable copy of a vector in `dir`.
fn copy_vector(name: &str, dir: &Path) -> PathBuf {
    let dst = dir.join(name);
    std::fs::write(&dst, std::fs::read(vector(name)).unwrap()).unwrap();
    dst
}

fn read_all(d: &dyn Disk, step: usize) -> Vec<u8> {
    let mut out = vec![0u8; d.size() as usize];
    for (i, chunk) in out.chunks_mut(step).enumerate() {
        d.read_at(chunk, (i * step) as u64).unwrap();
    }
    out
}

fn md5_hex(b: &[u8]) -> String {
    Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn ro() -> OpenOptions {
    OpenOptions::default()
}

#[test]
fn vectors_read_exactly_through_disk_open() {
    for (name, md5, variant) in [
        (ZLIB, "399bfcc39637bde7e43eb86fcc8565ae", "UDZO"),
        (BZIP2, "7ec785450bbc17de417be373fd5d2159", "UDBZ"),
    ] {
        let p = vector(name);
        assert_eq!(registry::probe(&p).unwrap(), Some(Format::Udif), "{name}");
        let d = registry::open(&p, None, &ro()).unwrap();
        assert_eq!(d.format(), Format::Udif);
        assert_eq!(d.size(), VECTOR_SIZE);
        assert!(!d.is_writable());
        // Unaligned steps cross run boundaries mid-sector.
        for step in [VECTOR_SIZE as usize, 65536, 4093] {
            assert_eq!(
                md5_hex(&read_all(&*d, step)),
                md5,
                "{name} in steps of {step}"
            );
        }
        assert_eq!(d.stats()["variant"], variant);
    }
}

#[test]
fn sequential_read_decompresses_each_run_once() {
    let u = Udif::open(vector(ZLIB), &ro()).unwrap();
    let compressed = u
        .layout()
        .map
        .runs
        .iter()
        .filter(|r| r.kind.is_compressed())
        .count() as u64;
    assert_eq!(compressed, 8);
    assert_eq!(u.decompressions(), 0);
    let first = read_all(&u, 4096);
    assert_eq!(u.decompressions(), compressed);
    // Everything is cached now: a second pass decompresses nothing.
    assert_eq!(read_all(&u, 512), first);
    assert_eq!(u.decompressions(), compressed);
    let s = u.udif_stats();
    assert_eq!(s.cached_runs, compressed);
    assert!(s.cache_hits > 0);
}

/// A synthetic image of `runs` zlib runs of 1 MiB each (distinct bytes).
fn many_zlib_runs(path: &Path, runs: u64) -> Vec<u8> {
    let mut disk = Vec::new();
    let mut fork = Vec::new();
    let mut entries = Vec::new();
    for k in 0..runs {
        let plain = vec![k as u8 + 1; MIB as usize];
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&plain).unwrap();
        let z = z.finish().unwrap();
        entries.push(RunEntry::new(
            RunKind::Zlib,
            k * 2048,
            2048,
            fork.len() as u64,
            z.len() as u64,
        ));
        fork.extend_from_slice(&z);
        disk.extend_from_slice(&plain);
    }
    let t = table(0, runs * 2048, crc_of(&disk), entries);
    write_image(path, &fork, &[("disk".into(), t)], runs * 2048).unwrap();
    disk
}

#[test]
fn run_cache_is_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("many.dmg");
    let runs = (udif::CACHE_BYTES as u64 / MIB) + 8;
    let want = many_zlib_runs(&p, runs);
    let u = Udif::open(&p, &ro()).unwrap();
    assert_eq!(read_all(&u, 1 << 16), want);
    assert_eq!(u.decompressions(), runs);
    let s = u.udif_stats();
    assert_eq!(s.cached_bytes, udif::CACHE_BYTES as u64);
    assert_eq!(s.cached_runs, udif::CACHE_BYTES as u64 / MIB);
    // Sequentially again: the oldest runs were evicted first, so each is
    // decompressed once more, and memory stays bounded.
    assert_eq!(read_all(&u, 1 << 16), want);
    assert_eq!(u.decompressions(), 2 * runs);
    assert_eq!(u.udif_stats().cached_bytes, udif::CACHE_BYTES as u64);
}

fn table(first: u64, count: u64, crc: u32, mut runs: Vec<RunEntry>) -> Mish {
    runs.push(RunEntry::new(RunKind::End, count, 0, 0, 0));
    Mish {
        first_sector: first,
        sector_count: count,
        data_start: 0,
        buffers_needed: 2048,
        descriptor: 1,
        checksum: Checksum::crc32(crc),
        runs,
    }
}

fn crc_of(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// ADC of `b` as literals only (128 bytes at most per code).
fn adc_literals(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in b.chunks(128) {
        out.push(0x80 | (c.len() as u8 - 1));
        out.extend_from_slice(c);
    }
    out
}

/// An image using every run type, two tables with a gap between them.
/// Returns the disk it should read as.
fn every_codec(path: &Path) -> Vec<u8> {
    let chunk = |seed| pattern(seed, 8 * 512);
    let mut fork = Vec::new();
    let mut disk = Vec::new();
    let mut runs = Vec::new();
    let mut table_plain = Vec::new();
    let mut sector = 0;
    let mut add = |kind: RunKind, plain: Vec<u8>, stored: Vec<u8>, fork: &mut Vec<u8>| {
        let n = plain.len() as u64 / 512;
        runs.push(RunEntry::new(
            kind,
            sector,
            n,
            fork.len() as u64,
            stored.len() as u64,
        ));
        fork.extend_from_slice(&stored);
        if kind != RunKind::Free {
            table_plain.extend_from_slice(&plain);
        }
        disk.extend_from_slice(&plain);
        sector += n;
    };
    let p = chunk(1);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&p).unwrap();
    add(RunKind::Zlib, p, z.finish().unwrap(), &mut fork);
    let p = chunk(2);
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    bz.write_all(&p).unwrap();
    add(RunKind::Bzip2, p, bz.finish().unwrap(), &mut fork);
    let p = chunk(3);
    let mut lz = Vec::new();
    lzfse_rust::encode_bytes(&p, &mut lz).unwrap();
    add(RunKind::Lzfse, p, lz, &mut fork);
    let p = chunk(4);
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut &p[..], &mut xz).unwrap();
    add(RunKind::Lzma, p, xz, &mut fork);
    let p = chunk(5);
    let a = adc_literals(&p);
    add(RunKind::Adc, p, a, &mut fork);
    let p = chunk(6);
    add(RunKind::Raw, p.clone(), p, &mut fork);
    add(RunKind::Zero, vec![0; 4 * 512], vec![], &mut fork);
    add(RunKind::Free, vec![0; 3 * 512], vec![], &mut fork);
    let first_count = sector;
    let first = table(0, first_count, crc_of(&table_plain), runs);
    // A gap of 5 sectors no table covers, then a raw run and a zero run.
    disk.extend_from_slice(&[0; 5 * 512]);
    let p = chunk(7);
    let second_start = first_count + 5;
    let mut second_plain = p.clone();
    second_plain.extend_from_slice(&[0; 512]);
    let second = table(
        second_start,
        9,
        crc_of(&second_plain),
        vec![
            RunEntry::new(RunKind::Raw, 0, 8, fork.len() as u64, 8 * 512),
            RunEntry::new(RunKind::Zero, 8, 1, 0, 0),
        ],
    );
    fork.extend_from_slice(&p);
    disk.extend_from_slice(&second_plain);
    let sectors = second_start + 9;
    write_image(
        path,
        &fork,
        &[("first".into(), first), ("second".into(), second)],
        sectors,
    )
    .unwrap();
    assert_eq!(disk.len() as u64, sectors * 512);
    disk
}

#[test]
fn every_codec_reads_back_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("codecs.dmg");
    let want = every_codec(&p);
    let d = registry::open(&p, None, &ro()).unwrap();
    assert_eq!(d.size(), want.len() as u64);
    for step in [want.len(), 4096, 1000, 511] {
        assert_eq!(read_all(&*d, step), want, "steps of {step}");
    }
    // Holes: the zero and free runs and the gap; data elsewhere.
    let data_end = 48 * 512; // six 8-sector runs
    assert_eq!(d.seek_hole(0).unwrap(), data_end);
    assert_eq!(d.seek_data(data_end).unwrap(), Some(data_end + 12 * 512));
    assert_eq!(d.seek_data(data_end + 12 * 512 + 8 * 512).unwrap(), None);
    let ext = d.extents().unwrap();
    let spans: Vec<(u64, u64, bool)> = ext.iter().map(|e| (e.start, e.length, e.data)).collect();
    assert_eq!(
        spans,
        vec![
            (0, 40 * 512, true),       // compressed: no host offset
            (40 * 512, 8 * 512, true), // raw
            (48 * 512, 12 * 512, false),
            (60 * 512, 8 * 512, true),
            (68 * 512, 512, false),
        ]
    );
    // The raw run's place in the file: after the five compressed ones.
    let u = Udif::open(&p, &ro()).unwrap();
    let raw = u.layout().map.runs[5];
    assert_eq!(raw.kind, RunKind::Raw);
    let compressed: u64 = u.layout().map.runs[..5].iter().map(|r| r.length).sum();
    assert_eq!(raw.offset, compressed);
    assert_eq!(ext[1].offset, Some(compressed));
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
    // Data fork, both tables, master.
    assert_eq!(report.checksums_verified, 4);
    assert_eq!(report.variant, "UDZO");
}

#[test]
fn compressed_images_refuse_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let p = copy_vector(ZLIB, dir.path());
    let before = std::fs::read(&p).unwrap();
    let d = registry::open(&p, None, &OpenOptions::writable()).unwrap();
    assert!(!d.is_writable());
    assert_eq!(
        d.write_refusal().as_deref(),
        Some("compressed UDIF image (UDZO, zlib runs) is read-only")
    );
    let errs = [
        d.write_at(b"x", 0).unwrap_err(),
        d.discard(0, 4096).unwrap_err(),
        d.write_zeroes(0, 4096).unwrap_err(),
        d.allocate(0, 4096).unwrap_err(),
        d.resize(VECTOR_SIZE * 2).unwrap_err(),
    ];
    for e in errs {
        assert!(matches!(e, Error::ReadOnly), "{e}");
        assert_eq!(e.errno(), libc::EROFS);
    }
    d.flush().unwrap();
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // The read-only vector itself opens writable too: it is never written.
    let d = registry::open(&vector(BZIP2), None, &OpenOptions::writable()).unwrap();
    assert!(matches!(d.write_at(b"x", 0), Err(Error::ReadOnly)));
}

fn udrw_rw(p: &Path) -> Box<dyn Disk> {
    registry::open(p, Some(Format::Udif), &OpenOptions::writable()).unwrap()
}

#[test]
fn udrw_writes_and_discards_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rw.dmg");
    // Three whole 1 MiB runs and a partial one.
    let size = 3 * MIB + 7 * 512;
    create_udrw(&p, size).unwrap();
    let file_len = std::fs::metadata(&p).unwrap().len();
    let mut model = vec![0u8; size as usize];
    let d = udrw_rw(&p);
    assert!(d.is_writable());
    assert_eq!(d.write_refusal(), None);
    let mut rng = Rng(0x5eed_0dd5);
    for op in 0..400u64 {
        let len = 1 + rng.below(300_000).min(size - 1);
        let off = rng.below(size - len + 1);
        match rng.below(4) {
            0 | 1 => {
                let data = pattern(op, len as usize);
                d.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            2 => {
                d.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                d.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
        let (roff, rlen) = (rng.below(size), 1 + rng.below(70_000));
        let rlen = rlen.min(size - roff);
        let mut got = vec![0u8; rlen as usize];
        d.read_at(&mut got, roff).unwrap();
        assert!(
            got == model[roff as usize..(roff + rlen) as usize],
            "read {roff:#x}+{rlen:#x} after op {op}"
        );
        if op % 100 == 99 {
            d.flush().unwrap();
        }
    }
    // A discard reaching past the end is clamped; a write is refused.
    d.discard(size - 512, 4096).unwrap();
    model[(size - 512) as usize..].fill(0);
    assert!(matches!(
        d.write_at(b"xy", size - 1),
        Err(Error::OutOfRange { .. })
    ));
    // Sizes resize refuses, and the file stays as it is.
    assert_eq!(d.max_size(), udif::MAX_UDRW_SIZE);
    for (bad, why) in [
        (
            size + 1,
            format!(
                "a UDIF disk is a whole, nonzero number of 512-byte sectors, not {} bytes",
                size + 1
            ),
        ),
        (
            0,
            "a UDIF disk is a whole, nonzero number of 512-byte sectors, not 0 bytes".into(),
        ),
        (
            udif::MAX_UDRW_SIZE + 512,
            "1099511628288 bytes is larger than the 1099511627776 bytes this UDIF image grows to"
                .into(),
        ),
    ] {
        let e = d.resize(bad).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: {why}", p.display()));
        assert_eq!(e.errno(), libc::EINVAL);
    }
    d.flush().unwrap();
    assert!(read_all(&*d, 1 << 20) == model);
    drop(d);
    // The file only changed inside the data fork.
    assert_eq!(std::fs::metadata(&p).unwrap().len(), file_len);
    let d = registry::open(&p, None, &ro()).unwrap();
    assert!(read_all(&*d, 777_777) == model, "after reopening");
    drop(d);
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
    assert_eq!(report.checksums_verified, 0);
    assert_eq!(
        report.notes,
        vec![
            "data fork: no checksum",
            "blkx entry 0: no checksum",
            "master checksum: no checksum"
        ]
    );
}

#[test]
fn fresh_udrw_checksums_verify_and_catch_damage() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fresh.dmg");
    create_udrw(&p, 5 * MIB).unwrap();
    // Sparse: the data fork is a hole.
    assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 64 << 10);
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
    assert_eq!(report.checksums_verified, 3);
    assert_eq!(report.variant, "UDRW");
    assert_eq!((report.tables, report.runs), (1, 5));
    // Opening for writing without a change leaves the checksums.
    drop(udrw_rw(&p));
    assert_eq!(udif::check(&p).unwrap().checksums_verified, 3);
    // A byte changed behind the image's back.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\x01", 3 * MIB + 5).unwrap();
    let report = udif::check(&p).unwrap();
    let crc = crc32fast::hash(&{
        let mut v = vec![0u8; 5 * MIB as usize];
        v[3 * MIB as usize + 5] = 1;
        v
    });
    let zeros = crc32fast::hash(&vec![0u8; 5 * MIB as usize]);
    assert_eq!(
        report.problems,
        vec![
            format!(
                "{}: data fork: CRC32 is {crc:08x}, the image says {zeros:08x}",
                p.display()
            ),
            format!(
                "{}: blkx entry 0: CRC32 is {crc:08x}, the image says {zeros:08x}",
                p.display()
            ),
        ]
    );
    assert_eq!(report.checksums_verified, 1); // the master
    assert_eq!(report.lines().last().unwrap(), "corrupt");
}

#[test]
fn discard_punches_holes_in_the_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("punch.dmg");
    create_udrw(&p, 8 * MIB).unwrap();
    let d = udrw_rw(&p);
    d.write_at(&pattern(9, 8 * MIB as usize), 0).unwrap();
    d.flush().unwrap();
    let full = d.allocated_bytes().unwrap();
    assert!(full >= 8 * MIB, "{full}");
    assert_eq!(d.seek_hole(0).unwrap(), 8 * MIB);
    d.discard(MIB, 3 * MIB).unwrap();
    d.write_zeroes(5 * MIB, MIB).unwrap();
    d.flush().unwrap();
    let after = d.allocated_bytes().unwrap();
    assert!(after <= full - 4 * MIB, "{full} -> {after}");
    let mut b = vec![1u8; 3 * MIB as usize];
    d.read_at(&mut b, MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Whole runs punched read as holes.
    assert_eq!(d.seek_hole(0).unwrap(), MIB);
    assert_eq!(d.seek_data(MIB).unwrap(), Some(4 * MIB));
    assert_eq!(d.seek_hole(4 * MIB).unwrap(), 5 * MIB);
    let spans: Vec<(u64, u64, bool, Option<u64>)> = d
        .extents()
        .unwrap()
        .iter()
        .map(|e| (e.start, e.length, e.data, e.offset))
        .collect();
    assert_eq!(
        spans,
        vec![
            (0, MIB, true, Some(0)),
            (MIB, 3 * MIB, false, None),
            (4 * MIB, MIB, true, Some(4 * MIB)),
            (5 * MIB, MIB, false, None),
            (6 * MIB, 2 * MIB, true, Some(6 * MIB)),
        ]
    );
    // allocate reserves host space again; the range still reads zeros.
    d.allocate(MIB, MIB).unwrap();
    assert!(d.allocated_bytes().unwrap() >= after + MIB);
    d.read_at(&mut b[..MIB as usize], MIB).unwrap();
    assert!(b[..MIB as usize].iter().all(|&x| x == 0));
}

#[test]
fn readers_refuse_writes_and_locks_keep_writers_apart() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lock.dmg");
    create_udrw(&p, MIB).unwrap();
    let before = std::fs::read(&p).unwrap();
    let r1 = registry::open(&p, None, &ro()).unwrap();
    let r2 = registry::open(&p, None, &ro()).unwrap();
    for e in [
        r1.write_at(b"x", 0).unwrap_err(),
        r1.discard(0, 512).unwrap_err(),
        r1.write_zeroes(0, 512).unwrap_err(),
        r1.allocate(0, 512).unwrap_err(),
        r1.resize(2 * MIB).unwrap_err(),
    ] {
        assert!(matches!(e, Error::ReadOnly), "{e}");
        assert_eq!(e.errno(), libc::EROFS);
    }
    assert_eq!(r1.write_refusal(), None);
    let e = registry::open(&p, None, &OpenOptions::writable())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: image is in use by another process (locked)",
            p.display()
        )
    );
    drop((r1, r2));
    let w = udrw_rw(&p);
    let e = registry::open(&p, None, &ro()).err().unwrap();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    let unlocked = OpenOptions {
        lock: LockMode::None,
        ..ro()
    };
    assert!(registry::open(&p, None, &unlocked).is_ok());
    drop(w);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

/// CRC32 of a table's runs as `check` sums them: raw bytes from `fork`,
/// zeros for zero runs, nothing for free runs.
fn runs_crc(runs: &[RunEntry], fork: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for r in runs {
        match r.kind {
            RunKind::Raw => h.update(&fork[r.offset as usize..(r.offset + r.length) as usize]),
            RunKind::Zero => h.update(&vec![0; (r.sectors * 512) as usize]),
            _ => {}
        }
    }
    h.finalize()
}

/// Runs of `u`'s table `t` as (kind, sector, sectors, offset, length).
fn run_shape(u: &Udif, t: usize) -> Vec<(RunKind, u64, u64, u64, u64)> {
    u.layout().tables[t]
        .runs
        .iter()
        .map(|r| (r.kind, r.sector, r.sectors, r.offset, r.length))
        .collect()
}

#[test]
fn writes_into_zero_and_free_runs_get_new_space() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mixed.dmg");
    let fork = pattern(3, 4096);
    let runs = vec![
        RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
        RunEntry::new(RunKind::Zero, 8, 8, 0, 0),
        RunEntry::new(RunKind::Free, 16, 8, 0, 0),
    ];
    let t = table(0, 24, runs_crc(&runs, &fork), runs);
    write_image(&p, &fork, &[("d".into(), t)], 24).unwrap();
    let before = std::fs::read(&p).unwrap();
    let plist_at = before.len() as u64 - 512 - plist_bytes(&before).len() as u64;
    assert_eq!(plist_at, 4096);
    let d = udrw_rw(&p);
    assert!(d.is_writable());
    assert_eq!(d.write_refusal(), None);
    // Across the raw run's end into the zero run.
    let data = pattern(4, 3000);
    d.write_at(&data, 7 * 512 + 100).unwrap();
    d.flush().unwrap();
    let mut want = [fork.clone(), vec![0; 8192]].concat();
    want[7 * 512 + 100..7 * 512 + 100 + 3000].copy_from_slice(&data);
    assert!(read_all(&*d, 4096) == want);
    drop(d);
    let after = std::fs::read(&p).unwrap();
    // The zero run's piece took new space after the old end (4 KiB
    // aligned); the free run is untouched.
    let space = (before.len() as u64).next_multiple_of(4096);
    let u = Udif::open(&p, &ro()).unwrap();
    assert_eq!(
        run_shape(&u, 0),
        vec![
            (RunKind::Raw, 0, 8, 0, 4096),
            (RunKind::Raw, 8, 8, space, 4096),
            (RunKind::Free, 16, 8, 0, 0),
            (RunKind::End, 24, 0, 0, 0),
        ]
    );
    let k = &u.layout().koly;
    assert_eq!((k.data_fork_offset, k.data_fork_length), (0, space + 4096));
    assert_eq!(k.plist_offset, space + 4096);
    assert_eq!(k.sector_count, 24);
    // The trailer starts on a sector boundary.
    assert_eq!(
        after.len() as u64,
        (space + 4096 + k.plist_length).next_multiple_of(512) + 512
    );
    assert_eq!(u.layout().blkx[0].name, "d");
    assert!(read_all(&u, 777) == want, "after reopening");
    drop(u);
    // The raw run's bytes changed only where written; the old property
    // list and trailer were punched; the new data sits in the new space.
    assert_eq!(after[..7 * 512 + 100], before[..7 * 512 + 100]);
    assert_eq!(after[7 * 512 + 100..4096], data[..4096 - 7 * 512 - 100]);
    assert!(after[4096..space as usize].iter().all(|&b| b == 0));
    assert_eq!(
        after[space as usize..space as usize + 4096],
        want[4096..8192]
    );
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
    assert_eq!((report.tables, report.runs), (1, 3));
    // A write inside the same 1 MiB piece needs no new space; one into the
    // free run does.
    let d = udrw_rw(&p);
    d.write_at(b"zz", 15 * 512).unwrap();
    drop(d);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), after.len() as u64);
    let d = udrw_rw(&p);
    d.write_at(b"ff", 23 * 512 + 510).unwrap();
    drop(d);
    let u = Udif::open(&p, &ro()).unwrap();
    assert_eq!(run_shape(&u, 0)[2].0, RunKind::Raw);
    want[15 * 512..15 * 512 + 2].copy_from_slice(b"zz");
    want[23 * 512 + 510..].copy_from_slice(b"ff");
    assert!(read_all(&u, 4096) == want);
}

/// A writable image of 16384 sectors whose tables hold raw, zero and free
/// runs and leave sectors 6144..6200 to no table. Raw sectors hold
/// `sector_pattern(tag, s)`, with tags 1001.. per raw run; returns the
/// steps that describe them.
fn mixed_image(p: &Path) -> Vec<Step> {
    let raw = [(0u64, 64u64), (4000, 100), (6200 + 5000, 8)];
    let mut fork = Vec::new();
    let mut steps = Vec::new();
    for (k, &(sector, count)) in raw.iter().enumerate() {
        let tag = 1001 + k as u32;
        for s in sector..sector + count {
            fork.extend(sector_pattern(tag, s));
        }
        steps.push(Step::Write { sector, count, tag });
    }
    let a = vec![
        RunEntry::new(RunKind::Raw, 0, 64, 0, 64 * 512),
        RunEntry::new(RunKind::Zero, 64, 2036, 0, 0),
        RunEntry::new(RunKind::Free, 2100, 1900, 0, 0),
        RunEntry::new(RunKind::Raw, 4000, 100, 64 * 512, 100 * 512),
        RunEntry::new(RunKind::Zero, 4100, 2044, 0, 0),
    ];
    let b = vec![
        RunEntry::new(RunKind::Free, 0, 5000, 0, 0),
        RunEntry::new(RunKind::Raw, 5000, 8, 164 * 512, 8 * 512),
        RunEntry::new(RunKind::Zero, 5008, 5176, 0, 0),
    ];
    let tables = [
        ("a".to_string(), table(0, 6144, runs_crc(&a, &fork), a)),
        ("b".to_string(), table(6200, 10184, runs_crc(&b, &fork), b)),
    ];
    write_image(p, &fork, &tables, 16384).unwrap();
    steps
}

fn disk_of(steps: &[Step], size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for st in steps {
        if let Step::Write { sector, count, tag } = *st {
            for s in sector..sector + count {
                v[(s * 512) as usize..((s + 1) * 512) as usize]
                    .copy_from_slice(&sector_pattern(tag, s));
            }
        }
    }
    v
}

#[test]
fn writes_discards_and_resizes_over_mixed_runs_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.dmg");
    let steps = mixed_image(&p);
    let mut model = disk_of(&steps, 8 * MIB);
    let mut d = udrw_rw(&p);
    assert!(read_all(&*d, 1 << 16) == model, "the starting image");
    let mut rng = Rng(0xd15c_0dd5);
    for op in 0..300u64 {
        let size = model.len() as u64;
        let len = 1 + rng.below(200_000).min(size - 1);
        let off = rng.below(size - len + 1);
        match rng.below(12) {
            0..=4 => {
                let data = pattern(op, len as usize);
                d.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 | 6 => {
                d.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                d.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                let new = 512 * (2048 + rng.below(2 * 2048 * 12));
                d.resize(new).unwrap();
                model.resize(new as usize, 0);
                assert_eq!(d.size(), new);
            }
            9 => {
                drop(d);
                d = udrw_rw(&p);
                assert_eq!(d.size(), size, "size after reopening at op {op}");
            }
            _ => d.flush().unwrap(),
        }
        let (roff, rlen) = (rng.below(model.len() as u64), 1 + rng.below(100_000));
        let rlen = rlen.min(model.len() as u64 - roff);
        let mut got = vec![0u8; rlen as usize];
        d.read_at(&mut got, roff).unwrap();
        assert!(
            got == model[roff as usize..(roff + rlen) as usize],
            "read {roff:#x}+{rlen:#x} after op {op}"
        );
    }
    assert!(read_all(&*d, 1 << 20) == model);
    drop(d);
    let d = registry::open(&p, None, &ro()).unwrap();
    assert_eq!(d.size(), model.len() as u64);
    assert!(read_all(&*d, 777_777) == model, "after reopening");
    drop(d);
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
    // The tables agree with the trailer on the size, and cover the disk.
    let u = Udif::open(&p, &ro()).unwrap();
    let l = u.layout();
    assert_eq!(l.koly.sector_count * 512, model.len() as u64);
    let ends: Vec<u64> = l
        .tables
        .iter()
        .map(|t| t.first_sector + t.sector_count)
        .collect();
    assert_eq!(ends.iter().max(), Some(&l.koly.sector_count));
    assert_eq!(
        l.map.runs.iter().map(|r| r.sectors).sum::<u64>(),
        l.koly.sector_count
    );
}

#[test]
fn resize_grows_by_free_runs_and_shrinks_by_cutting_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("resize.dmg");
    create_udrw(&p, 2 * MIB + 512).unwrap();
    let d = udrw_rw(&p);
    d.write_at(&pattern(5, 2 * MIB as usize + 512), 0).unwrap();
    d.resize(100 * MIB).unwrap();
    assert_eq!(d.size(), 100 * MIB);
    drop(d);
    let u = Udif::open(&p, &ro()).unwrap();
    let free = 100 * 2048 - 4097;
    assert_eq!(
        run_shape(&u, 0),
        vec![
            (RunKind::Raw, 0, 2048, 0, MIB),
            (RunKind::Raw, 2048, 2048, MIB, MIB),
            (RunKind::Raw, 4096, 1, 2 * MIB, 512),
            (RunKind::Free, 4097, 131072, 0, 0),
            (RunKind::Free, 4097 + 131072, free - 131072, 0, 0),
            (RunKind::End, 100 * 2048, 0, 0, 0),
        ]
    );
    assert_eq!(u.layout().tables[0].sector_count, 100 * 2048);
    assert_eq!(u.layout().koly.sector_count, 100 * 2048);
    // Grown space costs nothing in the file until written.
    assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 3 * MIB);
    let mut b = vec![1u8; MIB as usize];
    u.read_at(&mut b, 99 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(u);
    // Shrink into the middle of a raw run: it is cut, its tail punched.
    let d = udrw_rw(&p);
    d.resize(MIB + 4096).unwrap();
    drop(d);
    let u = Udif::open(&p, &ro()).unwrap();
    assert_eq!(
        run_shape(&u, 0),
        vec![
            (RunKind::Raw, 0, 2048, 0, MIB),
            (RunKind::Raw, 2048, 8, MIB, 4096),
            (RunKind::End, 2056, 0, 0, 0),
        ]
    );
    assert_eq!(u.layout().koly.sector_count, 2056);
    assert!(read_all(&u, 4096) == pattern(5, 2 * MIB as usize + 512)[..(MIB + 4096) as usize]);
    let f = std::fs::read(&p).unwrap();
    assert!(f[(MIB + 4096) as usize..2 * MIB as usize]
        .iter()
        .all(|&x| x == 0));
    drop(u);
    // allocate gives grown space room in the file; it still reads zeros.
    let d = udrw_rw(&p);
    d.resize(8 * MIB).unwrap();
    let held = d.allocated_bytes().unwrap();
    d.allocate(5 * MIB + 4096, MIB).unwrap();
    assert!(d.allocated_bytes().unwrap() >= held + MIB);
    let mut b = vec![1u8; MIB as usize];
    d.read_at(&mut b, 5 * MIB + 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(d);
    let u = Udif::open(&p, &ro()).unwrap();
    let kinds: Vec<(RunKind, u64, u64)> =
        run_shape(&u, 0).iter().map(|r| (r.0, r.1, r.2)).collect();
    assert_eq!(
        kinds,
        vec![
            (RunKind::Raw, 0, 2048),
            (RunKind::Raw, 2048, 8),
            // The whole 64 MiB piece, cut to the free run it lies in.
            (RunKind::Raw, 2056, 16384 - 2056),
            (RunKind::End, 16384, 0),
        ]
    );
    drop(u);
    let d = udrw_rw(&p);
    d.resize(MIB + 4096).unwrap();
    drop(d);
    // Growing again reads zeros where the cut data was.
    let d = udrw_rw(&p);
    d.resize(2 * MIB).unwrap();
    let mut b = vec![1u8; MIB as usize - 4096];
    d.read_at(&mut b, MIB + 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(d);
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
}

#[test]
fn concurrent_writes_into_free_space_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("threads.dmg");
    create_udrw(&p, MIB).unwrap();
    let d: Arc<dyn Disk> = Arc::from(udrw_rw(&p));
    let piece = udif::edit::ALLOC_SECTORS * 512;
    d.resize(8 * piece).unwrap();
    // Four writers, 96 KiB blocks spread over the eight pieces of the
    // grown space: pieces take new space at once, and writers share them.
    let block = 96 * 1024;
    let at = move |k: u64| (k % 8) * piece + (k / 8) * block as u64 + 4096;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for k in (t..96).step_by(4) {
                    d.write_at(&pattern(k, block), at(k)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    d.flush().unwrap();
    let verify = |d: &dyn Disk, when: &str| {
        let mut b = vec![0u8; block];
        for k in 0..96u64 {
            d.read_at(&mut b, at(k)).unwrap();
            assert!(b == pattern(k, block), "block {k} {when}");
        }
        let mut z = vec![1u8; 4096];
        for n in 0..8 {
            d.read_at(&mut z, n * piece).unwrap();
            assert!(z.iter().all(|&x| x == 0), "piece {n} start {when}");
        }
    };
    verify(&*d, "after the writes");
    drop(d);
    let d = registry::open(&p, None, &ro()).unwrap();
    verify(&*d, "after reopening");
    let report = udif::check(&p).unwrap();
    assert!(report.is_clean(), "{:?}", report.lines());
}

#[test]
fn writes_that_still_cannot_land_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Raw runs sharing bytes of the data fork.
    let p = dir.path().join("shared.dmg");
    let fork = pattern(8, 4096);
    let runs = vec![
        RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
        RunEntry::new(RunKind::Raw, 8, 8, 0, 4096),
    ];
    let crc = runs_crc(&runs, &fork);
    write_image(&p, &fork, &[("d".into(), table(0, 16, crc, runs))], 16).unwrap();
    let before = std::fs::read(&p).unwrap();
    let d = udrw_rw(&p);
    let why = "raw runs share bytes of the data fork";
    assert_eq!(d.write_refusal().as_deref(), Some(why));
    for e in [d.write_at(b"x", 0).unwrap_err(), d.resize(MIB).unwrap_err()] {
        assert_eq!(
            e.to_string(),
            format!("{}: not writable: {why}", p.display())
        );
        assert_eq!(e.errno(), libc::EROFS);
    }
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // A disk so much larger than its tables that covering it would take
    // more runs than fit a property list asiffs reads.
    let p = dir.path().join("vast.dmg");
    let runs = vec![
        RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
        RunEntry::new(RunKind::Zero, 8, 8, 0, 0),
    ];
    let crc = runs_crc(&runs, &fork);
    write_image(&p, &fork, &[("d".into(), table(0, 16, crc, runs))], 1 << 40).unwrap();
    let before = std::fs::read(&p).unwrap();
    let d = udrw_rw(&p);
    let why = "runs covering the disk's 1099511627776 sectors would number 8388611, more than the 2097152 asiffs writes";
    assert_eq!(d.write_refusal().as_deref(), Some(why));
    assert_eq!(
        d.write_at(b"x", 0).unwrap_err().to_string(),
        format!("{}: not writable: {why}", p.display())
    );
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // A resource fork would end up inside a larger data fork: an image
    // that needs new space is refused; an all-raw one takes writes but
    // not a resize.
    let why = "the image has a resource fork, which a larger data fork would cover";
    let with_rsrc = |b: &[u8]| {
        with_trailer(b, |t| {
            t[0x28..0x30].copy_from_slice(&4096u64.to_be_bytes());
            t[0x30..0x38].copy_from_slice(&16u64.to_be_bytes());
        })
    };
    let p = dir.path().join("rsrc-zero.dmg");
    let runs = vec![
        RunEntry::new(RunKind::Raw, 0, 8, 0, 4096),
        RunEntry::new(RunKind::Zero, 8, 8, 0, 0),
    ];
    let crc = runs_crc(&runs, &fork);
    write_image(&p, &fork, &[("d".into(), table(0, 16, crc, runs))], 16).unwrap();
    let b = with_rsrc(&std::fs::read(&p).unwrap());
    std::fs::write(&p, &b).unwrap();
    let d = udrw_rw(&p);
    assert_eq!(d.write_refusal().as_deref(), Some(why));
    assert!(matches!(
        d.write_at(b"x", 0),
        Err(Error::WritesRefused { .. })
    ));
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), b);
    let p = dir.path().join("rsrc-raw.dmg");
    let runs = vec![RunEntry::new(RunKind::Raw, 0, 8, 0, 4096)];
    let crc = runs_crc(&runs, &fork);
    write_image(&p, &fork, &[("d".into(), table(0, 8, crc, runs))], 8).unwrap();
    let b = with_rsrc(&std::fs::read(&p).unwrap());
    std::fs::write(&p, &b).unwrap();
    let d = udrw_rw(&p);
    assert_eq!(d.write_refusal(), None);
    d.write_at(b"x", 0).unwrap();
    let e = d.resize(MIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: not writable: {why}", p.display())
    );
    assert_eq!(d.size(), 4096);
    drop(d);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after.len(), b.len());
    assert_eq!(after[0], b'x');
    assert_eq!(after[1..4096], b[1..4096]);
}

#[test]
fn encrypted_images_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2.dmg");
    let mut b = b"encrcdsa".to_vec();
    b.extend_from_slice(&[0x11; 4000]);
    std::fs::write(&v2, &b).unwrap();
    let v1 = dir.path().join("v1.dmg");
    let mut b = vec![0x22; 4000];
    b.extend_from_slice(b"cdsaencr");
    std::fs::write(&v1, &b).unwrap();
    for (p, magic) in [(&v2, "encrcdsa"), (&v1, "cdsaencr")] {
        // Probed as encrypted: without a password, the registry asks for it.
        assert_eq!(registry::probe(p).unwrap(), Some(Format::Encrypted));
        assert_eq!(
            registry::open(p, None, &ro()).err().unwrap().to_string(),
            format!(
                "{}: encrypted disk image: needs its password (--password-file FILE or --stdinpass)",
                p.display()
            )
        );
        // Forced to be read as a plain UDIF, it is refused by name.
        let want = format!(
            "{}: encrypted disk image ({magic}): unlock it with its password rather than read it as a plain UDIF",
            p.display()
        );
        assert_eq!(
            registry::open(p, Some(Format::Udif), &OpenOptions::writable())
                .err()
                .unwrap()
                .to_string(),
            want
        );
    }
    let plain = dir.path().join("plain.bin");
    std::fs::write(&plain, vec![0x33; 4000]).unwrap();
    assert_eq!(registry::probe(&plain).unwrap(), None);
}

/// The vector's bytes with `edit` applied to its trailer.
fn with_trailer(b: &[u8], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut b = b.to_vec();
    let n = b.len();
    edit(&mut b[n - 512..]);
    b
}

/// The vector's bytes with `edit` applied to each of its `mish` tables
/// (the property list keeps its length).
fn with_tables(b: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = b.to_vec();
    let n = b.len();
    let t = &b[n - 512..];
    let at = u64::from_be_bytes(t[0xD8..0xE0].try_into().unwrap()) as usize;
    let len = u64::from_be_bytes(t[0xE0..0xE8].try_into().unwrap()) as usize;
    let patches = udif::plist::patch_tables(&b[at..at + len], edit);
    assert!(!patches.is_empty());
    for (off, bytes) in patches {
        b[at + off..at + off + bytes.len()].copy_from_slice(&bytes);
    }
    b
}

fn be32_at(t: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(t[at..at + 4].try_into().unwrap())
}

fn be64_at(t: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(t[at..at + 8].try_into().unwrap())
}

/// Sets field `at` (u64) of run `run` of the table starting at `first`.
fn set_run(t: &mut [u8], first: u64, run: usize, at: usize, v: u64) {
    if be64_at(t, 0x08) == first {
        let o = 0xCC + run * 40 + at;
        t[o..o + 8].copy_from_slice(&v.to_be_bytes());
    }
}

#[test]
fn hostile_files_give_one_line_errors_and_stay_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let orig = std::fs::read(vector(ZLIB)).unwrap();
    let n = orig.len();
    let body = n - 512;
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("empty", vec![], "koly trailer is truncated (0 of 512 bytes)".into()),
        ("300 bytes", orig[..300].to_vec(), "koly trailer is truncated (300 of 512 bytes)".into()),
        (
            "last byte cut",
            orig[..n - 1].to_vec(),
            "no koly trailer in the last 512 bytes (not a UDIF image, or truncated)".into(),
        ),
        (
            "cut mid-plist",
            orig[..20000].to_vec(),
            "no koly trailer in the last 512 bytes (not a UDIF image, or truncated)".into(),
        ),
        (
            "plist offset past the end",
            with_trailer(&orig, |t| t[0xD8..0xE0].copy_from_slice(&0x401Au64.to_be_bytes())),
            format!("XML property list at 0x401a+0x2048 runs past the end of the file ({body} bytes before the trailer)"),
        ),
        (
            "plist length huge",
            with_trailer(&orig, |t| t[0xE0..0xE8].copy_from_slice(&u64::MAX.to_be_bytes())),
            format!("XML property list at 0x4019+0xffffffffffffffff runs past the end of the file ({body} bytes before the trailer)"),
        ),
        (
            "data fork past the end",
            with_trailer(&orig, |t| t[0x20..0x28].copy_from_slice(&(body as u64 + 1).to_be_bytes())),
            format!("data fork at 0x0+0x{:x} runs past the end of the file ({body} bytes before the trailer)", body + 1),
        ),
        (
            "data fork too short for its runs",
            with_trailer(&orig, |t| t[0x20..0x28].copy_from_slice(&256u64.to_be_bytes())),
            "blkx entry 0 run 0: data at 0x18f8+0x1f lies past the end of the data fork (256 bytes)".into(),
        ),
        (
            "disk sector count overflows",
            with_trailer(&orig, |t| t[0x1EC..0x1F4].copy_from_slice(&u64::MAX.to_be_bytes())),
            format!("sector count {} overflows a byte size", u64::MAX),
        ),
        (
            "disk smaller than its tables",
            with_trailer(&orig, |t| t[0x1EC..0x1F4].copy_from_slice(&100u64.to_be_bytes())),
            "blkx entry 4 (sectors 40..3800) runs past the end of the disk (100 sectors)".into(),
        ),
        (
            "trailer version",
            with_trailer(&orig, |t| t[4] = 9),
            "koly trailer version 150994948 (only 4 is known)".into(),
        ),
        (
            "plist damaged",
            {
                let mut b = orig.clone();
                b[0x4019 + 200..0x4019 + 206].copy_from_slice(b"<dicx>");
                b
            },
            "XML property list does not parse: UnknownXmlElement (offset 206)".into(),
        ),
        (
            "overlapping runs",
            with_tables(&orig, |t| set_run(t, 40, 1, 8, 2000)),
            "blkx entry 4 run 1: starts at sector 2000, before run 0 ends (sector 2010): runs overlap or are out of order".into(),
        ),
        (
            "runs out of order",
            with_tables(&orig, |t| set_run(t, 40, 2, 8, 0)),
            "blkx entry 4 run 2: starts at sector 0, before run 1 ends (sector 2048): runs overlap or are out of order".into(),
        ),
        (
            "huge run sector count",
            with_tables(&orig, |t| set_run(t, 40, 2, 16, u64::MAX)),
            format!("blkx entry 4 run 2: sector 2048 + count {} overflows", u64::MAX),
        ),
        (
            "run past its table",
            with_tables(&orig, |t| set_run(t, 40, 2, 16, 1713)),
            "blkx entry 4 run 2: ends at sector 3761, past the table's 3760 sectors".into(),
        ),
        (
            "huge table sector count",
            with_tables(&orig, |t| {
                if be64_at(t, 0x08) == 40 {
                    t[0x10..0x18].copy_from_slice(&u64::MAX.to_be_bytes());
                }
            }),
            format!("blkx entry 4: first sector 40 + sector count {} overflows", u64::MAX),
        ),
        (
            "overlapping tables",
            with_tables(&orig, |t| {
                if be64_at(t, 0x08) == 34 {
                    t[0x08..0x10].copy_from_slice(&30u64.to_be_bytes());
                }
            }),
            "blkx entry 3 (sectors 30..36) overlaps blkx entry 2 (sectors 2..34)".into(),
        ),
        (
            "unknown run type",
            with_tables(&orig, |t| {
                if be64_at(t, 0x08) == 0 {
                    t[0xCC..0xD0].copy_from_slice(&0x8000_0009u32.to_be_bytes());
                }
            }),
            "blkx entry 0: run 0 has unknown type 0x80000009".into(),
        ),
        (
            "run count past the table",
            with_tables(&orig, |t| {
                if be64_at(t, 0x08) == 0 {
                    t[0xC8..0xCC].copy_from_slice(&1000u32.to_be_bytes());
                }
            }),
            "blkx entry 0: mish table lists 1000 runs but holds only 2".into(),
        ),
    ];
    for (what, bytes, msg) in cases {
        let p = dir.path().join(format!("{}.dmg", what.replace(' ', "-")));
        std::fs::write(&p, &bytes).unwrap();
        for opts in [ro(), OpenOptions::writable()] {
            let e = registry::open(&p, Some(Format::Udif), &opts)
                .err()
                .unwrap_or_else(|| panic!("{what}: opened"));
            let text = e.to_string();
            let want = format!("corrupt image: {}: {msg}", p.display());
            assert_eq!(text, want, "{what}");
            assert!(!text.contains('\n'), "{what}: {text}");
            assert!(matches!(e, Error::Corrupt(_)));
        }
        // check reports the same line as its one problem.
        let report = udif::check(&p).unwrap();
        assert_eq!(
            report.problems,
            vec![format!("{}: {msg}", p.display())],
            "{what}"
        );
        assert_eq!(
            report.lines(),
            vec![
                format!("{}: not a readable UDIF image", p.display()),
                format!("corrupt: {}: {msg}", p.display()),
                "corrupt".to_string()
            ]
        );
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{what}: file changed");
    }
}

#[test]
fn damaged_compressed_data_fails_the_read_not_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.dmg");
    let mut b = std::fs::read(vector(ZLIB)).unwrap();
    // The HFS+ table's first run: zlib at 10251+6158. Damage its middle.
    for x in &mut b[10251 + 100..10251 + 400] {
        *x ^= 0x5A;
    }
    std::fs::write(&p, &b).unwrap();
    let d = registry::open(&p, None, &ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    d.read_at(&mut buf, 0).unwrap(); // other runs still read
    let e = d.read_at(&mut buf, 40 * 512).unwrap_err();
    let text = e.to_string();
    assert_eq!(
        text,
        format!(
            "corrupt image: {}: blkx entry 4 run 0: bad zlib data: corrupt deflate stream",
            p.display()
        )
    );
    assert_eq!(e.errno(), libc::EIO);
    let report = udif::check(&p).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(format!("corrupt image: {}", report.problems[0]), text);
    assert_eq!(std::fs::read(&p).unwrap(), b);
}

#[test]
fn vectors_check_clean() {
    for name in [ZLIB, BZIP2] {
        let r = udif::check(&vector(name)).unwrap();
        assert!(r.is_clean(), "{:?}", r.lines());
        // Eight tables and the master; hdiutil left the data fork unsummed.
        assert_eq!(r.checksums_verified, 9, "{name}");
        assert_eq!(r.notes, vec!["data fork: no checksum"]);
    }
}

#[test]
fn check_in_the_writing_session_sees_the_cleared_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("session.dmg");
    create_udrw(&p, 2 * MIB).unwrap();
    let plist_before = plist_bytes(&std::fs::read(&p).unwrap());
    let u = Udif::open(&p, &OpenOptions::writable()).unwrap();
    assert_eq!(u.check().unwrap().checksums_verified, 3);
    u.write_at(&pattern(4, 5000), MIB - 100).unwrap();
    let r = u.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.lines());
    assert_eq!(r.checksums_verified, 0);
    drop(u);
    // The property list kept its length and layout: only the table's
    // checksum changed, to type 0 with a zero value.
    let after = std::fs::read(&p).unwrap();
    let plist_after = plist_bytes(&after);
    assert_eq!(plist_after.len(), plist_before.len());
    let tables = |x: &[u8]| udif::plist::decode(x).unwrap();
    let (old, new) = (
        &tables(&plist_before)[0].data,
        &tables(&plist_after)[0].data,
    );
    assert_eq!(&old[..0x40], &new[..0x40]);
    assert_eq!(&new[0x40..0xC8], &[0u8; 0x88][..]);
    assert_eq!(&old[0xC8..], &new[0xC8..]);
    let t = &after[after.len() - 512..];
    assert_eq!(&t[0x50..0xD8], &[0u8; 0x88][..], "data fork checksum");
    assert_eq!(&t[0x160..0x1E8], &[0u8; 0x88][..], "master checksum");
}

fn plist_bytes(b: &[u8]) -> Vec<u8> {
    let t = &b[b.len() - 512..];
    let at = be64_at(t, 0xD8) as usize;
    b[at..at + be64_at(t, 0xE0) as usize].to_vec()
}

#[test]
fn a_data_fork_over_the_property_list_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("overlap.dmg");
    create_udrw(&p, MIB).unwrap();
    let b = std::fs::read(&p).unwrap();
    let body = (b.len() - 512) as u64;
    let b = with_trailer(&b, |t| t[0x20..0x28].copy_from_slice(&body.to_be_bytes()));
    std::fs::write(&p, &b).unwrap();
    let d = udrw_rw(&p);
    assert_eq!(
        d.write_refusal().as_deref(),
        Some("the data fork overlaps the property list")
    );
    assert!(matches!(
        d.write_at(b"x", 0),
        Err(Error::WritesRefused { .. })
    ));
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), b);
}

#[test]
fn created_udrw_layout() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("layout.dmg");
    let size = 3 * MIB + 512;
    create_udrw(&p, size).unwrap();
    let u = Udif::open(&p, &ro()).unwrap();
    let l = u.layout();
    assert_eq!(l.koly.sector_count, size / 512);
    assert_eq!(
        (l.koly.data_fork_offset, l.koly.data_fork_length),
        (0, size)
    );
    assert_eq!(l.koly.plist_offset, size);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        size + l.koly.plist_length + 512
    );
    assert_eq!(l.koly.data_checksum.kind, 2);
    assert_eq!(l.blkx.len(), 1);
    assert_eq!(l.blkx[0].name, "whole disk (unknown partition : 0)");
    let t = &l.tables[0];
    assert_eq!(
        (t.first_sector, t.sector_count, t.buffers_needed),
        (0, size / 512, 2048)
    );
    let runs: Vec<(RunKind, u64, u64, u64, u64)> = t
        .runs
        .iter()
        .map(|r| (r.kind, r.sector, r.sectors, r.offset, r.length))
        .collect();
    assert_eq!(
        runs,
        vec![
            (RunKind::Raw, 0, 2048, 0, MIB),
            (RunKind::Raw, 2048, 2048, MIB, MIB),
            (RunKind::Raw, 4096, 2048, 2 * MIB, MIB),
            (RunKind::Raw, 6144, 1, 3 * MIB, 512),
            (RunKind::End, 6145, 0, 0, 0),
        ]
    );
    assert_eq!(u.variant(), "UDRW");
}

// ---- crash-point replay (common::crash) ----------------------------------

/// Crash images: 8 MiB, so the workload crosses several 1 MiB tables.
const CDISK: u64 = 8 * MIB;

fn open_mem(store: Arc<Recorder>, writable: bool) -> asiffs::Result<Udif> {
    Udif::from_storage(Path::new("crash.dmg"), store, writable)
}

/// Writes, discards and flushes over the whole disk as it is at each
/// step; with `resizes`, also resizes between 4 and 12 MiB.
fn crash_workload(seed: u64, steps: usize, resizes: bool) -> Vec<Step> {
    let mut sectors = CDISK / 512;
    let mut r = Rng(seed);
    let mut tag = 0;
    let kinds = if resizes { 12 } else { 10 };
    (0..steps)
        .map(|_| {
            let sector = r.below(sectors - 64);
            match r.below(kinds) {
                0..=5 => {
                    tag += 1;
                    Step::Write {
                        sector,
                        count: 1 + r.below(40),
                        tag,
                    }
                }
                6 | 7 => Step::Discard {
                    sector,
                    count: 1 + r.below(64),
                },
                8 | 9 if resizes => {
                    sectors = 512 * (8 + r.below(17)) + r.below(512);
                    Step::Resize(sectors * 512)
                }
                _ => Step::Flush,
            }
        })
        .collect()
}

/// Replays a workload of `steps` (with resizes if asked) on the image at
/// `p`, whose content `plan` describes. The image carries checksums, so
/// the first change clears them.
fn replay(seed: u64, p: &Path, mut plan: Vec<Step>, steps: usize, resizes: bool) {
    let first = plan.len();
    let store = Recorder::new(Mem::from_file(p));
    assert!(
        open_mem(store.clone(), false)
            .unwrap()
            .check()
            .unwrap()
            .checksums_verified
            > 0,
        "the base image has no checksums to clear"
    );
    let base = store.start();
    plan.extend(crash_workload(seed, steps, resizes));
    {
        let img = open_mem(store.clone(), true).unwrap();
        run_steps(&*store, &img, &plan, first);
    }
    let log = store.take_log();
    if resizes {
        let syncs = log
            .iter()
            .filter(|o| matches!(o, common::crash::Op::Sync))
            .count();
        assert!(syncs > 10, "seed {seed}: only {syncs} syncs");
    }
    let points = sweep(seed, base, &log, &plan, first, 4, crash_verify);
    assert!(points > 100, "seed {seed}: only {points} crash points");
}

/// A UDRW image as `create` makes it: writes go in place and discards
/// punch the file.
fn udrw_replay(seed: u64, steps: usize) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("base.dmg");
    create_udrw(&p, CDISK).unwrap();
    replay(seed, &p, Vec::new(), steps, false);
}

#[test]
fn every_udrw_crash_point_opens_and_keeps_flushed_writes() {
    for seed in [1, 7, 4242] {
        udrw_replay(seed, 30);
    }
}

#[test]
fn the_udrw_replay_detects_a_lost_flushed_write() {
    let plan = lost_write_plan(8);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("base.dmg");
    create_udrw(&p, CDISK).unwrap();
    let store = Recorder::new(Mem::from_file(&p));
    run_steps(
        &*store,
        &open_mem(store.clone(), true).unwrap(),
        &plan[..2],
        0,
    );
    let state = store.mem.lock().clone();
    assert_catches_lost_write(&plan, state, crash_verify);
}

/// A crash state opens, checks clean, holds what the model allows, and
/// takes a recovery write in the last 12 KiB of whatever size it has.
fn crash_verify(state: Mem, model: &Model, durable: usize, started: usize, ctx: &str) {
    let store = Recorder::new(state);
    let img =
        open_mem(store.clone(), false).unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    let report = img.check().unwrap_or_else(|e| panic!("{ctx}: check: {e}"));
    assert_eq!(report.problems, Vec::<String>::new(), "{ctx}");
    check_sectors(&img, model, durable, started, ctx);
    drop(img);
    let img = open_mem(store, true).unwrap_or_else(|e| panic!("{ctx}: no writable reopen: {e}"));
    let at = img.size() - 3 * 4096;
    img.write_at(&[0xEE; 3 * 4096], at).unwrap();
    img.flush().unwrap();
    assert_eq!(img.check().unwrap().problems, Vec::<String>::new(), "{ctx}");
    let mut big = vec![0u8; 3 * 4096];
    img.read_at(&mut big, at).unwrap();
    assert!(big.iter().all(|&b| b == 0xEE), "{ctx}: recovery write lost");
}

/// An image with zero, free and raw runs and sectors no table covers:
/// writes give new space, resizes rewrite the tables.
fn mixed_replay(seed: u64, steps: usize) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mixed.dmg");
    let plan = mixed_image(&p);
    replay(seed, &p, plan, steps, true);
}

#[test]
fn every_crash_point_of_new_space_and_resize_opens_and_keeps_flushed_writes() {
    for seed in [3, 11, 2024] {
        mixed_replay(seed, 30);
    }
}

#[test]
fn extents_follow_the_host_files_holes_inside_raw_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("holes.dmg");
    create_udrw(&p, 8 * MIB).unwrap();
    let d = udrw_rw(&p);
    let at = 2 * MIB + 8192;
    d.write_at(&pattern(9, 4096), at).unwrap();
    d.flush().unwrap();
    let e: Vec<(u64, u64, bool)> = d
        .extents()
        .unwrap()
        .iter()
        .map(|e| (e.start, e.length, e.data))
        .collect();
    assert_eq!(
        e,
        vec![
            (0, at, false),
            (at, 4096, true),
            (at + 4096, 8 * MIB - at - 4096, false)
        ]
    );
    assert_eq!(d.seek_data(0).unwrap(), Some(at));
    assert_eq!(d.seek_data(at + 100).unwrap(), Some(at + 100));
    assert_eq!(d.seek_hole(at).unwrap(), at + 4096);
    assert_eq!(d.seek_data(at + 4096).unwrap(), None);
    d.discard(at, 4096).unwrap();
    assert_eq!(d.seek_data(0).unwrap(), None);
    assert_eq!(d.extents().unwrap().len(), 1);
}

// Layouts older hdiutil writes, built here byte by byte from the format
// (docs/formats.md) rather than by asiffs' writer, so that a misreading
// shared by reader and writer cannot hide.

const T_ZERO: u32 = 0;
const T_RAW: u32 = 1;
/// "Free" to some readers, "ignore" to others: zeros, no data.
const T_FREE: u32 = 2;
const T_ZLIB: u32 = 0x8000_0005;
const T_COMMENT: u32 = 0x7FFF_FFFE;
const T_END: u32 = 0xFFFF_FFFF;
/// Fill of bytes no run names, so that a read of them shows.
const JUNK: u8 = 0xA5;

/// What one run of a built table holds.
#[derive(Clone)]
enum Part {
    Raw(Vec<u8>),
    Zlib(Vec<u8>),
    Zero(u64),
    Free(u64),
    Comment,
}

/// A table: its name and ID as hdiutil gives them, its first sector, and
/// `gap` junk bytes between the previous table's data and its own.
struct Spec {
    name: String,
    id: i32,
    first: u64,
    gap: usize,
    parts: Vec<Part>,
}

fn spec(name: &str, id: i32, first: u64, gap: usize, parts: Vec<Part>) -> Spec {
    Spec {
        name: name.into(),
        id,
        first,
        gap,
        parts,
    }
}

/// How to lay the file out around the tables.
#[derive(Default)]
struct Shape {
    /// File bytes before the data fork (koly data fork offset).
    fork_offset: usize,
    /// Data-fork bytes before the first table's data.
    prefix: usize,
    /// The plist's blkx array, as indices into the specs.
    order: Vec<usize>,
    /// A classic resource fork after the data fork, holding the tables
    /// again.
    rsrc: bool,
}

struct Built {
    file: Vec<u8>,
    disk: Vec<u8>,
    /// Each spec's data start (data-fork relative).
    starts: Vec<u64>,
    /// Each spec's raw runs: (disk byte, data-fork offset of its bytes).
    raw_at: Vec<Vec<(u64, u64)>>,
    /// Each spec's `mish` table.
    tables: Vec<Vec<u8>>,
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}

/// A `mish` table: runs are (type, sector, sectors, offset, length).
fn mish_bytes(
    first: u64,
    count: u64,
    data_start: u64,
    id: i32,
    crc: u32,
    runs: &[(u32, u64, u64, u64, u64)],
) -> Vec<u8> {
    let mut b = b"mish".to_vec();
    put32(&mut b, 1);
    put64(&mut b, first);
    put64(&mut b, count);
    put64(&mut b, data_start);
    put32(&mut b, 2048);
    put32(&mut b, id as u32);
    b.resize(0x40, 0);
    put32(&mut b, 2);
    put32(&mut b, 32);
    put32(&mut b, crc);
    b.resize(0xC8, 0);
    put32(&mut b, runs.len() as u32);
    for &(kind, sector, sectors, offset, length) in runs {
        put32(&mut b, kind);
        put32(&mut b, 0);
        put64(&mut b, sector);
        put64(&mut b, sectors);
        put64(&mut b, offset);
        put64(&mut b, length);
    }
    b
}

/// The XML property list hdiutil writes around `(name, id, table)`s.
fn plist_xml(entries: &[(String, i32, Vec<u8>)]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
         \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\
         \t\t<key>blkx</key>\n\t\t<array>\n",
    );
    for (name, id, data) in entries {
        // hdiutil wraps the base64 at 52 characters a line.
        let text = b64.encode(data);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(52)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        x += &format!(
            "\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n\
             \t\t\t\t<key>CFName</key>\n\t\t\t\t<string>{name}</string>\n\
             \t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t\t{}\n\t\t\t\t</data>\n\
             \t\t\t\t<key>ID</key>\n\t\t\t\t<string>{id}</string>\n\
             \t\t\t\t<key>Name</key>\n\t\t\t\t<string>{name}</string>\n\t\t\t</dict>\n",
            lines.join("\n\t\t\t\t")
        );
    }
    x += "\t\t</array>\n\t</dict>\n</dict>\n</plist>\n";
    x.into_bytes()
}

/// A `koly` trailer: version 4, one segment, CRC32 checksums.
fn koly_bytes(
    fork: (u64, u64),
    rsrc: (u64, u64),
    plist: (u64, u64),
    data_crc: u32,
    master_crc: u32,
    sectors: u64,
) -> Vec<u8> {
    let mut b = b"koly".to_vec();
    put32(&mut b, 4);
    put32(&mut b, 512);
    put32(&mut b, 1);
    put64(&mut b, 0);
    put64(&mut b, fork.0);
    put64(&mut b, fork.1);
    put64(&mut b, rsrc.0);
    put64(&mut b, rsrc.1);
    put32(&mut b, 1);
    put32(&mut b, 1);
    b.extend_from_slice(&[0x42; 16]);
    put32(&mut b, 2);
    put32(&mut b, 32);
    put32(&mut b, data_crc);
    b.resize(0xD8, 0);
    put64(&mut b, plist.0);
    put64(&mut b, plist.1);
    b.resize(0x160, 0);
    put32(&mut b, 2);
    put32(&mut b, 32);
    put32(&mut b, master_crc);
    b.resize(0x1E8, 0);
    put32(&mut b, 1);
    put64(&mut b, sectors);
    b.resize(512, 0);
    b
}

fn zlib(b: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(b).unwrap();
    z.finish().unwrap()
}

/// Lays out `specs` as an image: each table's data after `gap` junk
/// bytes, its data start where its data begins and its runs' offsets
/// relative to it; comment runs point at junk, free runs at the table's
/// position, every table closed by an end run.
fn build(specs: &[Spec], shape: &Shape) -> Built {
    let mut fork = vec![JUNK; shape.prefix];
    let sectors = specs
        .iter()
        .map(|s| {
            s.first
                + s.parts
                    .iter()
                    .map(|p| match p {
                        Part::Raw(b) | Part::Zlib(b) => b.len() as u64 / 512,
                        Part::Zero(n) | Part::Free(n) => *n,
                        Part::Comment => 0,
                    })
                    .sum::<u64>()
        })
        .max()
        .unwrap();
    let mut disk = vec![0u8; (sectors * 512) as usize];
    let mut tables = Vec::new();
    let mut starts = Vec::new();
    let mut raw_at = Vec::new();
    for s in specs {
        fork.resize(fork.len() + s.gap, JUNK);
        let start = fork.len() as u64;
        let mut runs = Vec::new();
        let mut plain = Vec::new();
        let mut raws = Vec::new();
        let mut sector = 0;
        for p in &s.parts {
            let at = fork.len() as u64 - start;
            let disk_at = ((s.first + sector) * 512) as usize;
            match p {
                Part::Raw(b) | Part::Zlib(b) => {
                    let n = b.len() as u64 / 512;
                    let stored = match p {
                        Part::Zlib(_) => zlib(b),
                        _ => b.clone(),
                    };
                    let kind = if matches!(p, Part::Zlib(_)) {
                        T_ZLIB
                    } else {
                        raws.push((disk_at as u64, fork.len() as u64));
                        T_RAW
                    };
                    runs.push((kind, sector, n, at, stored.len() as u64));
                    fork.extend_from_slice(&stored);
                    disk[disk_at..disk_at + b.len()].copy_from_slice(b);
                    plain.extend_from_slice(b);
                    sector += n;
                }
                Part::Zero(n) => {
                    runs.push((T_ZERO, sector, *n, 0, 0));
                    plain.resize(plain.len() + (*n * 512) as usize, 0);
                    sector += n;
                }
                Part::Free(n) => {
                    runs.push((T_FREE, sector, *n, at, 0));
                    sector += n;
                }
                // Far outside the fork: a reader that took it for data
                // would fail.
                Part::Comment => runs.push((T_COMMENT, sector, 0, 0xFFFF_FFFF_0000, 0x10)),
            }
        }
        runs.push((T_END, sector, 0, 0, 0));
        let crc = crc32fast::hash(&plain);
        tables.push((
            s.name.clone(),
            s.id,
            mish_bytes(s.first, sector, start, s.id, crc, &runs),
            crc,
        ));
        starts.push(start);
        raw_at.push(raws);
    }
    let fork_off = shape.fork_offset as u64;
    let mut file = vec![0x5A; shape.fork_offset];
    file.extend_from_slice(&fork);
    let fork_end = file.len() as u64;
    let rsrc = if shape.rsrc {
        let ids = shape
            .order
            .iter()
            .map(|&i| (tables[i].1 as i16, tables[i].2.clone()));
        let r = resource_fork(&ids.collect::<Vec<_>>());
        file.extend_from_slice(&r);
        (fork_end, r.len() as u64)
    } else {
        (0, 0)
    };
    let listed: Vec<_> = shape
        .order
        .iter()
        .map(|&i| (tables[i].0.clone(), tables[i].1, tables[i].2.clone()))
        .collect();
    let mut master = Vec::new();
    for &i in &shape.order {
        master.extend_from_slice(&tables[i].3.to_be_bytes());
    }
    let xml = plist_xml(&listed);
    let plist_at = file.len() as u64;
    file.extend_from_slice(&xml);
    file.extend_from_slice(&koly_bytes(
        (fork_off, fork.len() as u64),
        rsrc,
        (plist_at, xml.len() as u64),
        crc32fast::hash(&fork),
        crc32fast::hash(&master),
        sectors,
    ));
    Built {
        file,
        disk,
        starts,
        raw_at,
        tables: tables.into_iter().map(|t| t.2).collect(),
    }
}

/// Writes `b` at `dir/name`, reads it whole and in steps that cross
/// runs mid-sector, checks it clean with every checksum verified, and
/// converts it to raw with the CLI: each must give exactly `b.disk`.
fn assert_reads_exactly(b: &Built, dir: &Path, name: &str, tables: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, &b.file).unwrap();
    let u = Udif::open(&p, &ro()).unwrap();
    assert_eq!(u.size(), b.disk.len() as u64, "{name}");
    for step in [b.disk.len(), 4096, 1000, 511] {
        assert!(read_all(&u, step) == b.disk, "{name} in steps of {step}");
    }
    let r = u.check().unwrap();
    assert_eq!(r.problems, Vec::<String>::new(), "{name}");
    assert_eq!(r.notes, Vec::<String>::new(), "{name}");
    assert_eq!((r.tables, r.checksums_verified), (tables, tables + 2));
    drop(u);
    let raw = dir.join(format!("{name}.raw"));
    let run = common::run(["convert", p.to_str().unwrap(), raw.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{name}: {}", run.stderr);
    assert!(std::fs::read(&raw).unwrap() == b.disk, "{name}: convert");
    p
}

#[test]
fn tables_with_data_starts_read_exactly_in_any_plist_order() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        spec(
            "disk image (Apple_HFS : 1)",
            0,
            0,
            0,
            vec![
                Part::Zlib(pattern(1, 8 * 512)),
                Part::Comment,
                Part::Raw(pattern(2, 4 * 512)),
                Part::Free(3),
                Part::Zlib(pattern(3, 6 * 512)),
            ],
        ),
        // Three sectors no table covers, then a second table.
        spec(
            "disk image (Apple_HFS : 2)",
            1,
            24,
            37,
            vec![
                Part::Raw(pattern(4, 2 * 512)),
                Part::Zero(5),
                Part::Comment,
                Part::Zlib(pattern(5, 8 * 512)),
                Part::Free(2),
            ],
        ),
    ];
    let b = build(
        &specs,
        &Shape {
            prefix: 1000,
            order: vec![1, 0],
            ..Default::default()
        },
    );
    let table0 = zlib(&pattern(1, 8 * 512)).len() + 4 * 512 + zlib(&pattern(3, 6 * 512)).len();
    assert_eq!(b.starts, vec![1000, (1000 + table0 + 37) as u64]);
    assert_eq!(b.disk.len(), (24 + 17) * 512);
    let p = assert_reads_exactly(&b, dir.path(), "two.dmg", 2);
    // Without its data start, table 0's first run would be the junk
    // prefix: the map holds the sums.
    let u = Udif::open(&p, &ro()).unwrap();
    let l = u.layout();
    assert_eq!(l.tables[0].data_start, b.starts[1]);
    assert_eq!(l.tables[1].data_start, b.starts[0]);
    let first = l.map.runs[0];
    assert_eq!((first.start, first.table, first.offset), (0, 1, 1000));
}

/// A driver descriptor map (sector 0 of an APM disk) for `sectors`.
fn ddm(sectors: u64) -> Vec<u8> {
    let mut b = b"ER".to_vec();
    b.extend_from_slice(&512u16.to_be_bytes());
    put32(&mut b, sectors as u32);
    b.resize(512, 0);
    b
}

/// Apple partition map entries `(name, type, start, sectors)`, one
/// sector each.
fn apm(entries: &[(&str, &str, u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(name, kind, start, n) in entries {
        let mut b = b"PM\0\0".to_vec();
        put32(&mut b, entries.len() as u32);
        put32(&mut b, start as u32);
        put32(&mut b, n as u32);
        let mut field = |s: &str| {
            let mut f = s.as_bytes().to_vec();
            f.resize(32, 0);
            b.extend_from_slice(&f);
        };
        field(name);
        field(kind);
        b.resize(512, 0);
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn apple_partition_map_layout_reads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // DDM, the map (63 sectors), a driver, the volume, free space: one
    // table each, as hdiutil writes an APM disk.
    let map = apm(&[
        ("Apple", "Apple_partition_map", 1, 63),
        ("Macintosh", "Apple_Driver_ATAPI", 64, 4),
        ("disk image", "Apple_HFS", 68, 40),
        ("", "Apple_Free", 108, 10),
    ]);
    let specs = [
        spec(
            "Driver Descriptor Map (DDM : 0)",
            -1,
            0,
            0,
            vec![Part::Raw(ddm(118))],
        ),
        spec(
            "Apple (Apple_partition_map : 1)",
            0,
            1,
            0,
            vec![Part::Zlib(map.clone()), Part::Zero(63 - 4)],
        ),
        spec(
            "Macintosh (Apple_Driver_ATAPI : 2)",
            1,
            64,
            0,
            vec![Part::Comment, Part::Raw(pattern(10, 4 * 512))],
        ),
        spec(
            "disk image (Apple_HFS : 3)",
            2,
            68,
            0,
            vec![
                Part::Zlib(pattern(11, 16 * 512)),
                Part::Zero(8),
                Part::Raw(pattern(12, 8 * 512)),
                Part::Zlib(vec![0x6B; 8 * 512]),
            ],
        ),
        spec(" (Apple_Free : 4)", 3, 108, 0, vec![Part::Free(10)]),
    ];
    let b = build(
        &specs,
        &Shape {
            order: vec![0, 1, 2, 3, 4],
            ..Default::default()
        },
    );
    // Every table after the first starts its data where the previous
    // one's ended.
    assert_eq!(b.starts[..2], [0, 512]);
    assert!(b.starts[2] > 512 && b.starts[3] > b.starts[2] && b.starts[4] > b.starts[3]);
    assert_eq!(b.disk[..2], *b"ER");
    assert_eq!(b.disk[512..514], *b"PM");
    assert_reads_exactly(&b, dir.path(), "apm.dmg", 5);
}

/// A classic resource fork holding each table as a `blkx` resource (the
/// form that came before the XML property list): a 16-byte header, the
/// resources (each a length and its bytes), then the map.
fn resource_fork(tables: &[(i16, Vec<u8>)]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut offsets = Vec::new();
    for (_, t) in tables {
        offsets.push(data.len() as u32);
        put32(&mut data, t.len() as u32);
        data.extend_from_slice(t);
    }
    let data_at = 256u32;
    let map_at = data_at + data.len() as u32;
    let mut map = vec![0u8; 16 + 4 + 2 + 2];
    let type_list = 28u16;
    map.extend_from_slice(&type_list.to_be_bytes());
    let refs_len = 12 * tables.len() as u16;
    let names = type_list + 2 + 8 + refs_len;
    map.extend_from_slice(&names.to_be_bytes());
    map.extend_from_slice(&0u16.to_be_bytes()); // one type, minus one
    map.extend_from_slice(b"blkx");
    map.extend_from_slice(&(tables.len() as u16 - 1).to_be_bytes());
    map.extend_from_slice(&10u16.to_be_bytes());
    for ((id, _), off) in tables.iter().zip(offsets) {
        map.extend_from_slice(&id.to_be_bytes());
        map.extend_from_slice(&0xFFFFu16.to_be_bytes());
        put32(&mut map, off); // attributes 0, then a 24-bit offset
        put32(&mut map, 0);
    }
    let mut head = Vec::new();
    for v in [data_at, map_at, data.len() as u32, map.len() as u32] {
        put32(&mut head, v);
    }
    map[..16].copy_from_slice(&head);
    let mut out = head;
    out.resize(data_at as usize, 0);
    out.extend_from_slice(&data);
    out.extend_from_slice(&map);
    out
}

#[test]
fn an_image_with_a_resource_fork_beside_its_plist_reads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        spec(
            "whole disk (Apple_HFS : 0)",
            0,
            0,
            0,
            vec![
                Part::Raw(pattern(20, 4 * 512)),
                Part::Zlib(pattern(21, 12 * 512)),
                Part::Free(4),
            ],
        ),
        spec(
            "second (Apple_HFS : 1)",
            1,
            20,
            16,
            vec![Part::Comment, Part::Zlib(pattern(22, 8 * 512))],
        ),
    ];
    let b = build(
        &specs,
        &Shape {
            order: vec![1, 0],
            rsrc: true,
            ..Default::default()
        },
    );
    // The resource fork lies right after the data fork.
    let k = &b.file[b.file.len() - 512..];
    let (fork_len, rsrc_at, rsrc_len) = (be64_at(k, 0x20), be64_at(k, 0x28), be64_at(k, 0x30));
    assert_eq!(rsrc_at, fork_len);
    let rsrc = &b.file[rsrc_at as usize..(rsrc_at + rsrc_len) as usize];
    assert_eq!(be32_at(rsrc, 0), 256);
    let map_at = be32_at(rsrc, 4) as usize;
    assert_eq!(&rsrc[map_at + 30..map_at + 34], b"blkx");
    let p = assert_reads_exactly(&b, dir.path(), "rsrc.dmg", 2);
    assert_eq!(
        Udif::open(&p, &OpenOptions::writable())
            .unwrap()
            .write_refusal()
            .unwrap(),
        "compressed UDIF image (UDZO, zlib runs) is read-only"
    );
}

#[test]
fn udrw_writes_land_at_fork_offset_plus_data_start_plus_run_offset() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        spec(
            "disk image (Apple_HFS : 1)",
            0,
            0,
            0,
            vec![
                Part::Raw(pattern(40, 16 * 512)),
                Part::Free(8),
                Part::Raw(pattern(41, 8 * 512)),
            ],
        ),
        spec(
            "disk image (Apple_HFS : 2)",
            1,
            32,
            100,
            vec![Part::Raw(pattern(42, 8 * 512)), Part::Zero(4)],
        ),
    ];
    let fork_at = 1024u64;
    let b = build(
        &specs,
        &Shape {
            fork_offset: fork_at as usize,
            prefix: 512,
            order: vec![1, 0],
            ..Default::default()
        },
    );
    assert_eq!(b.starts[0], 512);
    let p = dir.path().join("rw.dmg");
    std::fs::write(&p, &b.file).unwrap();
    let mut model = b.disk.clone();
    let file_at = |raw: (u64, u64), disk: u64| (fork_at + raw.1 + disk - raw.0) as usize;
    {
        let u = Udif::open(&p, &OpenOptions::writable()).unwrap();
        assert!(u.is_writable());
        // Into a raw run of each table, in place.
        let one = pattern(43, 3000);
        u.write_at(&one, 1000).unwrap();
        let two = pattern(44, 1024);
        u.write_at(&two, 32 * 512 + 100).unwrap();
        // Into the free run: new space, a raw run of table 0.
        let three = pattern(45, 512);
        u.write_at(&three, 18 * 512).unwrap();
        u.flush().unwrap();
        for (data, at) in [(&one, 1000), (&two, 32 * 512 + 100), (&three, 18 * 512)] {
            model[at..at + data.len()].copy_from_slice(data);
        }
        let f = std::fs::read(&p).unwrap();
        let at = file_at(b.raw_at[0][0], 1000);
        assert!(f[at..at + 3000] == one[..]);
        let at = file_at(b.raw_at[1][0], 32 * 512 + 100);
        assert!(f[at..at + 1024] == two[..]);
        // The edited table keeps its data start; its new run's offset is
        // relative to it.
        let l = u.layout();
        let t0 = &l.tables[1];
        assert_eq!(t0.data_start, 512);
        let new = t0.runs.iter().find(|r| r.sector == 16).copied().unwrap();
        assert_eq!((new.kind, new.sectors, new.length), (RunKind::Raw, 8, 4096));
        let at = (fork_at + 512 + new.offset + 2 * 512) as usize;
        assert!(f[at..at + 512] == three[..]);
        // The other table means what it meant (its checksum is cleared).
        let mut t1 = Mish::decode(&b.tables[1]).unwrap();
        t1.checksum = Checksum::NONE;
        assert_eq!(l.tables[0], t1);
        assert_eq!(l.koly.data_fork_offset, fork_at);
    }
    let u = Udif::open(&p, &ro()).unwrap();
    assert!(read_all(&u, 4096) == model);
    assert_eq!(u.check().unwrap().problems, Vec::<String>::new());
    drop(u);
    // Cutting table 1's raw run in half punches its second half: the
    // bytes after its data start, not the fork's prefix.
    let u = Udif::open(&p, &OpenOptions::writable()).unwrap();
    u.resize(36 * 512).unwrap();
    drop(u);
    let f = std::fs::read(&p).unwrap();
    let fork = fork_at as usize;
    let t1 = fork + b.starts[1] as usize;
    assert!(f[fork..fork + 512].iter().all(|&x| x == JUNK));
    assert!(f[t1 - 100..t1].iter().all(|&x| x == JUNK));
    assert!(f[t1..t1 + 100] == model[32 * 512..32 * 512 + 100]);
    assert!(f[t1 + 2048..t1 + 4096].iter().all(|&x| x == 0));
    let u = Udif::open(&p, &ro()).unwrap();
    assert!(read_all(&u, 4096) == model[..36 * 512]);
}

#[test]
fn hostile_data_starts_give_one_line_errors_naming_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        spec("a", 0, 0, 0, vec![Part::Raw(pattern(50, 8 * 512))]),
        spec(
            "b",
            1,
            8,
            0,
            vec![Part::Raw(pattern(51, 8 * 512)), Part::Zero(8)],
        ),
    ];
    let b = build(
        &specs,
        &Shape {
            prefix: 512,
            order: vec![0, 1],
            ..Default::default()
        },
    );
    let fork = be64_at(&b.file[b.file.len() - 512..], 0x20);
    assert_eq!(fork, 512 + 16 * 512);
    let data_start = |first: u64, v: u64| {
        with_tables(&b.file, move |t| {
            if be64_at(t, 0x08) == first {
                t[0x18..0x20].copy_from_slice(&v.to_be_bytes());
            }
        })
    };
    let cases = [
        (
            data_start(8, u64::MAX),
            format!("blkx entry 1: data start 0xffffffffffffffff lies past the end of the data fork ({fork} bytes)"),
        ),
        (
            data_start(8, fork + 1),
            format!("blkx entry 1: data start {:#x} lies past the end of the data fork ({fork} bytes)", fork + 1),
        ),
        (
            data_start(8, fork),
            format!("blkx entry 1 run 0: data at data start {fork:#x} + 0x0+0x1000 lies past the end of the data fork ({fork} bytes)"),
        ),
        (
            with_tables(&b.file, |t| set_run(t, 0, 0, 24, u64::MAX - 10)),
            format!("blkx entry 0 run 0: data at data start 0x200 + 0xfffffffffffffff5+0x1000 lies past the end of the data fork ({fork} bytes)"),
        ),
    ];
    for (i, (bytes, msg)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("hostile-{i}.dmg"));
        std::fs::write(&p, &bytes).unwrap();
        for opts in [ro(), OpenOptions::writable()] {
            let e = Udif::open(&p, &opts).err().unwrap();
            assert!(matches!(e, Error::Corrupt(_)));
            assert_eq!(
                e.to_string(),
                format!("corrupt image: {}: {msg}", p.display())
            );
        }
        assert_eq!(
            udif::check(&p).unwrap().problems,
            vec![format!("{}: {msg}", p.display())]
        );
        assert!(
            std::fs::read(&p).unwrap() == bytes,
            "case {i}: file changed"
        );
    }
}

/// vectors/real/README.md: an MBR disk with two FAT16 partitions, five
/// tables, made by hdiutil.
#[test]
fn real_multi_table_udzo_reads_exactly() {
    use sha2::{Digest as _, Sha256};
    let p = vectors_dir().join("real/udzo-mbr-two-fat16.dmg");
    let u = Udif::open(&p, &ro()).unwrap();
    assert_eq!(u.size(), 5_242_880);
    assert_eq!(u.layout().tables.len(), 5);
    for step in [5_242_880, 65536, 4093] {
        let sum: String = Sha256::digest(read_all(&u, step))
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        assert_eq!(
            sum, "0786ad1fdcba31a3f03ee80eb1d6e8c7ee2f4647a2b4b6f1855c9fe0719784de",
            "in steps of {step}"
        );
    }
    assert_eq!(u.check().unwrap().problems, Vec::<String>::new());
}

//! hdiutil's UDRW `.dmg`: a raw disk with no trailer. The real one from
//! `../shared/vectors/real/` reads exactly; writes, discards and resizes go
//! to the file in place; `create` and `convert` write the same kind.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use asiffs::disk::{Disk, Format};
use asiffs::raw::RawDisk;
use asiffs::{registry, Error, OpenOptions};
use common::*;

const VECTOR: &str = "real/udrw-hfsplus.dmg";
const VECTOR_SIZE: u64 = 655_360;
const VECTOR_SHA256: &str = "57d8a84dc9edf632f478ee0699ca91dd616de0139e7a87fc0d587eb6f5c6aab7";

fn vector(dir: &Path) -> std::path::PathBuf {
    fs::create_dir_all(dir.join("real")).unwrap();
    decompress(VECTOR, dir)
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut b = vec![0xEE; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn sha256_of_bytes(dir: &Path, bytes: &[u8]) -> String {
    let p = dir.join("bytes.sha");
    fs::write(&p, bytes).unwrap();
    sha256sum(&p)
}

#[test]
fn hdiutil_udrw_reads_exactly_through_the_library_and_the_cli() {
    let t = tempfile::tempdir().unwrap();
    let p = vector(t.path());
    let before = fs::read(&p).unwrap();
    assert_eq!(registry::probe(&p).unwrap(), Some(Format::Udrw));
    let d = registry::open(&p, None, &OpenOptions::default()).unwrap();
    assert_eq!(d.format(), Format::Udrw);
    assert_eq!(d.size(), VECTOR_SIZE);
    let bytes = read_all(&*d);
    assert_eq!(sha256_of_bytes(t.path(), &bytes), VECTOR_SHA256);
    // The HFS+ volume "TestData" holds test.txt = "hello hfs+\n".
    assert!(find(&bytes, b"hello hfs+\n").is_some());
    drop(d);

    let out = t.path().join("disk.raw");
    let r = run(["convert", s(&p), s(&out)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(sha256sum(&out), VECTOR_SHA256);
    let info = run(["info", "--json", s(&p)]);
    assert_eq!(info.code, 0, "{info:?}");
    let j = info.json();
    assert_eq!(j["format"], "udrw");
    assert_eq!(j["virtual_size"], VECTOR_SIZE);
    let c = run(["check", s(&p)]);
    assert_eq!(c.code, 0, "{c:?}");
    assert_eq!(
        c.stdout,
        format!(
            "{}: raw UDRW disk of {VECTOR_SIZE} bytes: no structure to check\nclean\n",
            p.display()
        )
    );
    let m = run(["map", "--json", s(&p)]);
    assert_eq!(m.code, 0, "{m:?}");
    let extents = m.json();
    let covered: u64 = extents
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(covered, VECTOR_SIZE);
    assert_eq!(fs::read(&p).unwrap(), before, "reading never writes");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn writes_discards_and_resizes_go_to_the_file_in_place() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("disk.dmg");
    let r = run(["create", s(&p), "--size", "8M"]);
    assert_eq!(r.code, 0, "{r:?}");
    let m = fs::metadata(&p).unwrap();
    assert_eq!(m.len(), 8 << 20, "the file is the disk");
    assert_eq!(m.blocks(), 0, "a new disk is one hole");

    let d = RawDisk::open(&p, &OpenOptions::writable()).unwrap();
    assert!(matches!(
        RawDisk::open(&p, &OpenOptions::writable()),
        Err(Error::Locked { .. })
    ));
    let data = pattern(7, 3 << 20);
    d.write_at(&data[..1000], 12_345).unwrap();
    d.write_at(&data, 2 << 20).unwrap();
    let mut want = vec![0u8; 8 << 20];
    want[12_345..13_345].copy_from_slice(&data[..1000]);
    want[2 << 20..5 << 20].copy_from_slice(&data);
    assert_same_bytes("after writes", &read_all(&d), &want);
    // SEEK_DATA follows the host's blocks: at or before the first byte.
    let first = d.seek_data(0).unwrap().unwrap();
    assert!(first <= 12_345 && want[..first as usize].iter().all(|&b| b == 0));
    assert_eq!(d.seek_data(1 << 20).unwrap(), Some(2 << 20));
    assert_eq!(d.seek_hole(2 << 20).unwrap(), 5 << 20);

    // A discard at any alignment reads back as zeros and frees whole blocks.
    let held = d.allocated_bytes().unwrap();
    d.discard((3 << 20) + 100, (1 << 20) + 7).unwrap();
    want[(3 << 20) + 100..(4 << 20) + 107].fill(0);
    assert_same_bytes("after a discard", &read_all(&d), &want);
    assert!(d.allocated_bytes().unwrap() <= held - (1 << 20) + 8192);
    d.write_zeroes(12_345, 10).unwrap();
    want[12_345..12_355].fill(0);
    // Past the end: clamped for discard, refused for writes.
    d.discard(7 << 20, 4 << 20).unwrap();
    assert!(matches!(
        d.write_at(&[1], 8 << 20),
        Err(Error::OutOfRange { .. })
    ));

    let map: Vec<(u64, u64, bool)> = d
        .extents()
        .unwrap()
        .iter()
        .map(|e| (e.start, e.length, e.data))
        .collect();
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 8 << 20);
    for (start, len, data) in &map {
        if !data {
            let (a, b) = (*start as usize, (*start + *len) as usize);
            assert!(want[a..b].iter().all(|&x| x == 0), "hole {start}+{len}");
        }
    }

    d.resize(12 << 20).unwrap();
    assert!(matches!(d.resize(1000), Err(Error::Invalid(_))));
    want.resize(12 << 20, 0);
    d.write_at(b"tail", (12 << 20) - 4).unwrap();
    want[(12 << 20) - 4..].copy_from_slice(b"tail");
    d.flush().unwrap();
    drop(d);

    let d = registry::open(&p, None, &OpenOptions::writable()).unwrap();
    assert_eq!(d.size(), 12 << 20);
    assert_same_bytes("after reopening", &read_all(&*d), &want);
    d.resize(4 << 20).unwrap();
    d.flush().unwrap();
    drop(d);
    assert_eq!(fs::metadata(&p).unwrap().len(), 4 << 20);
    assert_eq!(fs::read(&p).unwrap(), want[..4 << 20]);
}

#[test]
fn read_only_opens_refuse_changes_and_leave_the_file_alone() {
    let t = tempfile::tempdir().unwrap();
    let p = vector(t.path());
    let before = fs::read(&p).unwrap();
    let d = RawDisk::open(&p, &OpenOptions::default()).unwrap();
    assert!(matches!(d.write_at(b"x", 0), Err(Error::ReadOnly)));
    assert!(matches!(d.discard(0, 4096), Err(Error::ReadOnly)));
    assert!(matches!(d.resize(1 << 20), Err(Error::ReadOnly)));
    drop(d);
    assert_eq!(fs::read(&p).unwrap(), before);
}

#[test]
fn create_and_convert_write_trailerless_raw_and_udif_on_request() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src.raw");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[4096..8192].copy_from_slice(&pattern(3, 4096));
    fs::write(&src, &bytes).unwrap();

    let raw = t.path().join("out.dmg");
    let r = run(["convert", "-f", "raw", s(&src), s(&raw)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(fs::read(&raw).unwrap(), bytes, "the .dmg is the disk");
    // Copies go by whole MiB; the other three stay holes.
    assert!(
        fs::metadata(&raw).unwrap().blocks() * 512 <= 1 << 20,
        "sparse"
    );

    let udif = t.path().join("out-udif.dmg");
    let r = run(["convert", "-f", "raw", s(&src), s(&udif), "-O", "udif"]);
    assert_eq!(r.code, 0, "{r:?}");
    let file = fs::read(&udif).unwrap();
    assert_eq!(&file[file.len() - 512..][..4], b"koly");
    assert_eq!(registry::probe(&udif).unwrap(), Some(Format::Udif));

    let made = t.path().join("made.dmg");
    assert_eq!(
        run(["create", s(&made), "-s", "1M", "--format", "udif"]).code,
        0
    );
    assert_eq!(registry::probe(&made).unwrap(), Some(Format::Udif));
}

#[test]
fn a_dmg_that_is_neither_udif_nor_whole_sectors_is_refused_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("cut.dmg");
    fs::write(&p, pattern(1, 1000)).unwrap();
    let want = format!(
        "corrupt image: {}: neither a UDIF image (no koly trailer in the last 512 bytes) nor a raw UDRW disk (1000 bytes is not whole 512-byte sectors)",
        p.display()
    );
    assert_eq!(registry::probe(&p).unwrap_err().to_string(), want);
    let empty = t.path().join("empty.dmg");
    fs::write(&empty, b"").unwrap();
    assert!(registry::probe(&empty)
        .unwrap_err()
        .to_string()
        .ends_with("(0 bytes is not whole 512-byte sectors)"));
    // Not named .dmg, the same bytes are no image at all.
    let other = t.path().join("disk.img");
    fs::write(&other, vec![0u8; 4096]).unwrap();
    assert_eq!(registry::probe(&other).unwrap(), None);
}

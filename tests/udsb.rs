//! Sparse bundles (UDSB): the plist against the one hdiutil wrote, band
//! naming and sizes, random I/O against an in-memory model, TRIM, resize,
//! locking, hostile bundles and concurrent writers.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asiffs::disk::{Disk, Format};
use asiffs::registry;
use asiffs::udsb::{self, Info, SparseBundle, DEFAULT_BAND_SIZE};
use asiffs::{Error, LockMode, OpenOptions};
use common::crash::{self, check_sectors, run_steps, Step};
use common::crash_dir::{self, DirOp, DirRecorder, Store, Tree};
use common::{pattern, Rng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn new_bundle(dir: &Path, size: u64, band_size: u64) -> (PathBuf, SparseBundle) {
    let path = dir.join("disk.sparsebundle");
    let b = SparseBundle::create(&path, size, band_size).unwrap();
    (path, b)
}

fn reopen(path: &Path) -> SparseBundle {
    SparseBundle::open(path, &OpenOptions::writable()).unwrap()
}

fn read(b: &dyn Disk, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xAA; len];
    b.read_at(&mut v, off).unwrap();
    v
}

/// Names and lengths of the band files, in name order.
fn bands(path: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = fs::read_dir(path.join("bands"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

fn plist(path: &Path, name: &str) -> plist::Dictionary {
    plist::Value::from_file(path.join(name))
        .unwrap()
        .into_dictionary()
        .unwrap()
}

/// Every file and directory under `dir` with its contents, mode and mtime.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let md = fs::symlink_metadata(&d).unwrap();
        let content = if md.is_file() {
            fs::read(&d).unwrap()
        } else {
            Vec::new()
        };
        out.insert(d.clone(), (content, md.mode(), md.mtime(), md.mtime_nsec()));
        if md.is_dir() {
            for e in fs::read_dir(&d).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out
}

fn err_text(r: asiffs::Result<SparseBundle>) -> String {
    match r {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn info_plist_has_the_keys_and_types_hdiutil_writes() {
    let real_path = common::vectors_dir().join("sparsebundle/hdiutil-Info.plist");
    let real = plist::Value::from_file(&real_path)
        .unwrap()
        .into_dictionary()
        .unwrap();
    let t = tempfile::tempdir().unwrap();
    let (path, b) = new_bundle(t.path(), 4 * MIB, DEFAULT_BAND_SIZE);
    drop(b);
    let ours = plist(&path, "Info.plist");
    let shape = |d: &plist::Dictionary| -> Vec<(String, std::mem::Discriminant<plist::Value>)> {
        d.iter()
            .map(|(k, v)| (k.clone(), std::mem::discriminant(v)))
            .collect()
    };
    assert_eq!(shape(&ours), shape(&real));
    // Same size and band size as the real one: the same bytes.
    assert_eq!(
        fs::read(path.join("Info.plist")).unwrap(),
        fs::read(&real_path).unwrap()
    );
    assert_eq!(
        fs::read(path.join("Info.bckup")).unwrap(),
        fs::read(path.join("Info.plist")).unwrap()
    );
    assert_eq!(fs::read(path.join("token")).unwrap(), b"");
    assert!(bands(&path).is_empty());
    let mut top: Vec<String> = fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["Info.bckup", "Info.plist", "bands", "token"]);
    // Nothing left beside it.
    let beside: Vec<_> = fs::read_dir(t.path()).unwrap().collect();
    assert_eq!(beside.len(), 1);
    // hdiutil's default band is 8 MiB, as its plist says.
    assert_eq!(
        DEFAULT_BAND_SIZE,
        real["band-size"].as_unsigned_integer().unwrap()
    );
}

#[test]
fn create_refuses_an_existing_path_and_bad_geometry() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("x.sparsebundle");
    fs::create_dir(&p).unwrap();
    assert_eq!(
        err_text(SparseBundle::create(&p, MIB, MIB)),
        format!("{}: already exists", p.display())
    );
    let q = t.path().join("y.sparsebundle");
    assert_eq!(
        err_text(SparseBundle::create(&q, MIB, 1000)),
        "band-size 1000 is not a multiple of 512 from 512 to 4294967296"
    );
    assert_eq!(
        err_text(SparseBundle::create(&q, 1 << 61, MIB)),
        "size 2305843009213693952 is larger than the format allows (1152921504606846976 bytes)"
    );
    assert!(!q.exists());
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    // Sizes round up to a whole sector.
    let b = SparseBundle::create(&q, 1000, MIB).unwrap();
    assert_eq!(b.size(), 1024);
    assert_eq!(
        plist(&q, "Info.plist")["size"].as_unsigned_integer(),
        Some(1024)
    );
}

#[test]
fn bands_are_named_in_unpadded_lowercase_hex_and_sized_by_their_data() {
    let t = tempfile::tempdir().unwrap();
    let bs = 64 * KIB;
    let (path, b) = new_bundle(t.path(), 40 * bs, bs);
    b.write_at(&pattern(1, bs as usize), 0).unwrap();
    b.write_at(&pattern(2, 10), 0x1f * bs + 100).unwrap();
    // Straddles bands 9 and a.
    b.write_at(&pattern(3, 1000), 0xa * bs - 300).unwrap();
    assert_eq!(
        bands(&path),
        [
            ("0".into(), bs),
            ("1f".into(), 110),
            ("9".into(), bs),
            ("a".into(), 700)
        ]
    );
    assert_eq!(
        fs::read(path.join("bands/1f")).unwrap(),
        [vec![0; 100], pattern(2, 10)].concat()
    );
    assert_eq!(
        fs::read(path.join("bands/a")).unwrap(),
        pattern(3, 1000)[300..]
    );
    let nine = fs::read(path.join("bands/9")).unwrap();
    assert_eq!(&nine[(bs - 300) as usize..], &pattern(3, 1000)[..300]);
    assert!(nine[..(bs - 300) as usize].iter().all(|&x| x == 0));
}

/// The disk as plain bytes.
struct Model(Vec<u8>);

#[test]
fn random_unaligned_io_matches_a_model_across_reopens() {
    let t = tempfile::tempdir().unwrap();
    let bs = 16 * KIB;
    // 20 bands and a short one at the end.
    let size = 20 * bs + 3 * 512;
    let (path, b) = new_bundle(t.path(), size, bs);
    let mut b = b;
    let mut m = Model(vec![0; size as usize]);
    let mut rng = Rng(0x5eed_0001);
    for step in 0..3000u64 {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(3 * bs));
        match rng.below(10) {
            0..=4 => {
                let data = pattern(step, len as usize);
                b.write_at(&data, off).unwrap();
                m.0[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 | 6 => {
                b.discard(off, len).unwrap();
                m.0[off as usize..(off + len) as usize].fill(0);
            }
            7 => b.flush().unwrap(),
            8 => {
                let got = read(&b, off, len as usize);
                assert!(
                    got == m.0[off as usize..(off + len) as usize],
                    "step {step}: read {off:#x}+{len:#x} differs"
                );
            }
            _ => {
                if rng.below(10) == 0 {
                    b.close().unwrap();
                    b = reopen(&path);
                }
            }
        }
    }
    b.close().unwrap();
    let b = reopen(&path);
    assert!(read(&b, 0, size as usize) == m.0, "whole disk differs");
    // Every band file is within the band size and the disk.
    for (name, len) in bands(&path) {
        let n = u64::from_str_radix(&name, 16).unwrap();
        assert!(len <= bs.min(size - n * bs), "band {name} is {len} bytes");
    }
    check_map(&b, &m.0);
    drop(b);
    assert_eq!(udsb::check(&path).unwrap(), Vec::<String>::new());
}

/// Extents cover the disk in order, every nonzero byte is inside a data
/// extent, and seek_data / seek_hole agree with them.
fn check_map(b: &dyn Disk, disk: &[u8]) {
    let ext = b.extents().unwrap();
    let mut at = 0;
    for e in &ext {
        assert_eq!(e.start, at);
        assert!(e.length > 0);
        if !e.data {
            let r = &disk[e.start as usize..(e.start + e.length) as usize];
            assert!(
                r.iter().all(|&x| x == 0),
                "data in a hole at {:#x}",
                e.start
            );
        }
        at += e.length;
    }
    assert_eq!(at, b.size());
    for e in &ext {
        if e.data {
            assert_eq!(b.seek_data(e.start).unwrap(), Some(e.start));
            let end = e.start + e.length;
            if end < b.size() {
                assert_eq!(b.seek_hole(e.start).unwrap(), end);
            }
        } else {
            assert_eq!(b.seek_hole(e.start).unwrap(), e.start);
            let next = ext.iter().find(|x| x.data && x.start > e.start);
            assert_eq!(b.seek_data(e.start).unwrap(), next.map(|x| x.start));
        }
    }
}

#[test]
fn seek_and_extents_look_inside_band_files() {
    let t = tempfile::tempdir().unwrap();
    let bs = 64 * KIB;
    let (_path, b) = new_bundle(t.path(), 8 * bs, bs);
    // Band 2: data at 16..20 KiB only (a hole before it in the file).
    b.write_at(&pattern(1, 4096), 2 * bs + 16 * KIB).unwrap();
    // Band 5: whole, then a hole punched at 8..12 KiB.
    b.write_at(&pattern(2, bs as usize), 5 * bs).unwrap();
    b.discard(5 * bs + 8 * KIB, 4 * KIB).unwrap();
    let runs: Vec<(u64, u64, bool)> = b
        .extents()
        .unwrap()
        .iter()
        .map(|e| (e.start, e.length, e.data))
        .collect();
    assert_eq!(
        runs,
        [
            (0, 2 * bs + 16 * KIB, false),
            (2 * bs + 16 * KIB, 4 * KIB, true),
            (2 * bs + 20 * KIB, 3 * bs - 20 * KIB, false),
            (5 * bs, 8 * KIB, true),
            (5 * bs + 8 * KIB, 4 * KIB, false),
            (5 * bs + 12 * KIB, bs - 12 * KIB, true),
            (6 * bs, 2 * bs, false),
        ]
    );
    assert_eq!(b.seek_data(0).unwrap(), Some(2 * bs + 16 * KIB));
    assert_eq!(b.seek_data(2 * bs + 20 * KIB).unwrap(), Some(5 * bs));
    assert_eq!(
        b.seek_data(5 * bs + 9 * KIB).unwrap(),
        Some(5 * bs + 12 * KIB)
    );
    assert_eq!(b.seek_data(6 * bs).unwrap(), None);
    assert_eq!(b.seek_hole(2 * bs + 16 * KIB).unwrap(), 2 * bs + 20 * KIB);
    assert_eq!(b.seek_hole(5 * bs).unwrap(), 5 * bs + 8 * KIB);
    assert_eq!(b.seek_hole(5 * bs + 12 * KIB).unwrap(), 6 * bs);
    assert_eq!(
        b.seek_hole(8 * bs).unwrap_err().to_string(),
        format!(
            "range {:#x}+0x0 is outside the disk ({} bytes)",
            8 * bs,
            8 * bs
        )
    );
}

#[test]
fn whole_band_trim_removes_the_file_and_partial_trim_frees_space() {
    let t = tempfile::tempdir().unwrap();
    let bs = MIB;
    let (path, b) = new_bundle(t.path(), 4 * bs, bs);
    b.write_at(&pattern(1, 3 * bs as usize), 0).unwrap();
    b.flush().unwrap();
    assert_eq!(
        bands(&path),
        [("0".into(), bs), ("1".into(), bs), ("2".into(), bs)]
    );
    // Band 1 whole (a range that also clips the neighbours).
    b.discard(bs - 4096, bs + 8192).unwrap();
    assert_eq!(bands(&path), [("0".into(), bs), ("2".into(), bs)]);
    assert_eq!(
        read(&b, bs - 4096, 4096 + bs as usize + 4096),
        vec![0; bs as usize + 8192]
    );
    // Part of band 2: the file keeps its length, the host frees the blocks.
    let blocks = |p: &Path| fs::metadata(p).unwrap().blocks() * 512;
    let two = path.join("bands/2");
    // Its first 4 KiB went with the discard above.
    assert_eq!(blocks(&two), bs - 4 * KIB);
    b.discard(2 * bs + 256 * KIB, 512 * KIB).unwrap();
    assert_eq!(fs::metadata(&two).unwrap().len(), bs);
    assert_eq!(blocks(&two), bs - 4 * KIB - 512 * KIB);
    let want = [
        vec![0; 4 * KIB as usize],
        pattern(1, 3 * bs as usize)[(2 * bs + 4 * KIB) as usize..(2 * bs + 256 * KIB) as usize]
            .to_vec(),
        vec![0; 512 * KIB as usize],
        pattern(1, 3 * bs as usize)[(2 * bs + 768 * KIB) as usize..].to_vec(),
    ]
    .concat();
    assert!(read(&b, 2 * bs, bs as usize) == want);
    // write_zeroes is a discard too, but checks the range.
    b.write_zeroes(0, bs).unwrap();
    assert_eq!(bands(&path), [("2".into(), bs)]);
    assert_eq!(
        b.write_zeroes(3 * bs, 2 * bs).unwrap_err().to_string(),
        format!(
            "range {:#x}+{:#x} is outside the disk ({} bytes)",
            3 * bs,
            2 * bs,
            4 * bs
        )
    );
    // A discard past the end is clipped, not refused.
    b.discard(2 * bs, u64::MAX).unwrap();
    assert!(bands(&path).is_empty());
    b.close().unwrap();
    let b = reopen(&path);
    assert_eq!(read(&b, 0, 4 * bs as usize), vec![0; 4 * bs as usize]);
}

#[test]
fn resize_rewrites_both_plists_and_drops_what_lies_past_the_end() {
    let t = tempfile::tempdir().unwrap();
    let bs = 64 * KIB;
    let (path, b) = new_bundle(t.path(), 4 * bs, bs);
    let data = pattern(7, 4 * bs as usize);
    b.write_at(&data, 0).unwrap();
    let size_in = |name| plist(&path, name)["size"].as_unsigned_integer().unwrap();

    // Shrink to the middle of band 1: bands 2 and 3 go, band 1 is cut.
    let small = bs + 4096;
    b.resize(small).unwrap();
    assert_eq!(b.size(), small);
    assert_eq!(bands(&path), [("0".into(), bs), ("1".into(), 4096)]);
    assert_eq!(
        (size_in("Info.plist"), size_in("Info.bckup")),
        (small, small)
    );
    assert_eq!(
        fs::read(path.join("Info.plist")).unwrap(),
        Info::new(small, bs).unwrap().encode()
    );
    assert_eq!(
        fs::read(path.join("Info.bckup")).unwrap(),
        fs::read(path.join("Info.plist")).unwrap()
    );
    assert!(read(&b, 0, small as usize) == data[..small as usize]);

    // Grow back: what was cut off reads as zeros.
    let big = 6 * bs;
    b.resize(big).unwrap();
    assert_eq!((size_in("Info.plist"), size_in("Info.bckup")), (big, big));
    let got = read(&b, 0, big as usize);
    assert!(got[..small as usize] == data[..small as usize]);
    assert!(got[small as usize..].iter().all(|&x| x == 0));
    b.write_at(&pattern(8, 512), big - 512).unwrap();
    assert_eq!(bands(&path).last().unwrap(), &("5".to_string(), bs));

    // Unknown plist keys survive, and sizes must be whole sectors.
    assert_eq!(
        b.resize(1000).unwrap_err().to_string(),
        "size 1000 is not a multiple of 512 bytes"
    );
    assert_eq!(
        b.resize(1 << 61).unwrap_err().to_string(),
        "size 2305843009213693952 is larger than the format allows (1152921504606846976 bytes)"
    );
    b.close().unwrap();
    let b = reopen(&path);
    assert_eq!(b.size(), big);
    assert_eq!(read(&b, big - 512, 512), pattern(8, 512));
    drop(b);
    assert_eq!(udsb::check(&path).unwrap(), Vec::<String>::new());
}

#[test]
fn resize_keeps_unknown_plist_keys() {
    let t = tempfile::tempdir().unwrap();
    let (path, b) = new_bundle(t.path(), MIB, MIB);
    drop(b);
    let mut d = plist(&path, "Info.plist");
    d.insert("future-key".into(), plist::Value::String("kept".into()));
    plist::Value::Dictionary(d)
        .to_file_xml(path.join("Info.plist"))
        .unwrap();
    let b = reopen(&path);
    b.resize(2 * MIB).unwrap();
    for name in ["Info.plist", "Info.bckup"] {
        let d = plist(&path, name);
        assert_eq!(d["future-key"].as_string(), Some("kept"));
        assert_eq!(d["size"].as_unsigned_integer(), Some(2 * MIB));
    }
}

#[test]
fn the_token_lock_refuses_a_second_writer() {
    let t = tempfile::tempdir().unwrap();
    let (path, b) = new_bundle(t.path(), MIB, MIB);
    let locked = format!(
        "{}: image is in use by another process (locked)",
        path.display()
    );
    assert_eq!(
        err_text(SparseBundle::open(&path, &OpenOptions::writable())),
        locked
    );
    assert_eq!(
        err_text(SparseBundle::open(&path, &OpenOptions::default())),
        locked
    );
    assert_eq!(udsb::check(&path).unwrap_err().to_string(), locked);
    drop(b);
    // Readers share; a writer then waits its turn.
    let r1 = SparseBundle::open(&path, &OpenOptions::default()).unwrap();
    let r2 = SparseBundle::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(
        err_text(SparseBundle::open(&path, &OpenOptions::writable())),
        locked
    );
    assert_eq!(
        r1.write_at(b"x", 0).unwrap_err().to_string(),
        "image is open read-only"
    );
    assert!(matches!(r2.resize(2 * MIB), Err(Error::ReadOnly)));
    drop((r1, r2));
    let unlocked = OpenOptions {
        lock: LockMode::None,
        ..OpenOptions::default()
    };
    let w = reopen(&path);
    SparseBundle::open(&path, &unlocked).unwrap();
    drop(w);
}

/// A fresh bundle of 4 bands of 64 KiB with data in bands 0 and 3, closed.
fn sample(dir: &Path) -> PathBuf {
    let (path, b) = new_bundle(dir, 4 * 64 * KIB, 64 * KIB);
    b.write_at(&pattern(1, 100), 0).unwrap();
    b.write_at(&pattern(2, 100), 3 * 64 * KIB).unwrap();
    b.close().unwrap();
    path
}

fn set_key(path: &Path, key: &str, v: plist::Value) {
    let mut d = plist(path, "Info.plist");
    d.insert(key.into(), v);
    plist::Value::Dictionary(d)
        .to_file_xml(path.join("Info.plist"))
        .unwrap();
}

#[test]
fn hostile_bundles_are_refused_with_one_line_and_left_alone() {
    type Damage = Box<dyn Fn(&Path)>;
    let int = |n: i64| plist::Value::Integer(n.into());
    let cases: Vec<(Damage, &str)> = vec![
        (Box::new(move |p| set_key(p, "band-size", int(0))),
         "corrupt image: P/Info.plist: band-size 0 is not a multiple of 512 from 512 to 4294967296"),
        (Box::new(move |p| set_key(p, "band-size", int(1000))),
         "corrupt image: P/Info.plist: band-size 1000 is not a multiple of 512 from 512 to 4294967296"),
        (Box::new(move |p| set_key(p, "band-size", int(1 << 33))),
         "corrupt image: P/Info.plist: band-size 8589934592 is not a multiple of 512 from 512 to 4294967296"),
        (Box::new(move |p| set_key(p, "band-size", int(-512))),
         "corrupt image: P/Info.plist: band-size -512 is not a multiple of 512 from 512 to 4294967296"),
        (Box::new(|p| set_key(p, "band-size", plist::Value::String("8388608".into()))),
         "corrupt image: P/Info.plist: band-size is not an integer"),
        (Box::new(|p| set_key(p, "size", plist::Value::Integer(u64::MAX.into()))),
         "corrupt image: P/Info.plist: size 18446744073709551615 is larger than the format allows (1152921504606846976 bytes)"),
        (Box::new(move |p| set_key(p, "size", int(-1))),
         "corrupt image: P/Info.plist: size -1 is negative"),
        (Box::new(|p| {
            let mut d = plist(p, "Info.plist");
            d.remove("size");
            plist::Value::Dictionary(d).to_file_xml(p.join("Info.plist")).unwrap();
        }),
         "corrupt image: P/Info.plist: has no size"),
        (Box::new(move |p| set_key(p, "bundle-backingstore-version", int(2))),
         "P/Info.plist: bundle-backingstore-version 2 (the newer Time Machine layout) is not supported; only version 1 is"),
        (Box::new(move |p| set_key(p, "bundle-backingstore-version", int(7))),
         "P/Info.plist: bundle-backingstore-version 7 is not supported; only version 1 is"),
        (Box::new(|p| set_key(p, "diskimage-bundle-type", plist::Value::String("com.apple.diskimage.other".into()))),
         "P/Info.plist: diskimage-bundle-type \"com.apple.diskimage.other\" is not com.apple.diskimage.sparsebundle"),
        (Box::new(|p| set_key(p, "CFBundleInfoDictionaryVersion", plist::Value::String("7.0".into()))),
         "P/Info.plist: CFBundleInfoDictionaryVersion \"7.0\" is not 6.0"),
        (Box::new(|p| set_key(p, "encrypted", plist::Value::Boolean(true))),
         "P/Info.plist: key \"encrypted\" marks an encryption asiffs does not know (hdiutil's encrypted bundles keep an encrcdsa header in token)"),
        (Box::new(|p| fs::write(p.join("Info.plist"), b"<plist><dict><key>x</key>").unwrap()),
         "corrupt image: P/Info.plist: is not a property list (UnexpectedEndOfEventStream)"),
        (Box::new(|p| fs::write(p.join("Info.plist"), "<plist><array/></plist>").unwrap()),
         "corrupt image: P/Info.plist: is not a dictionary"),
        (Box::new(|p| fs::write(p.join("Info.plist"), vec![b' '; 70000]).unwrap()),
         "corrupt image: P/Info.plist: is 65537 bytes, more than the 65536 a bundle's plist may be"),
        (Box::new(|p| fs::remove_file(p.join("Info.plist")).unwrap()),
         "corrupt image: P/Info.plist: missing"),
        (Box::new(|p| {
            fs::remove_file(p.join("Info.plist")).unwrap();
            std::os::unix::fs::symlink(p.join("Info.bckup"), p.join("Info.plist")).unwrap();
        }),
         "corrupt image: P/Info.plist: is a symbolic link"),
        (Box::new(|p| fs::write(p.join("token"), b"encrcdsa\0\0\0\x02rest of the header").unwrap()),
         "corrupt image: P/token: encrcdsa header: 30 bytes, need 76"),
        (Box::new(|p| fs::write(p.join("token"), b"junk").unwrap()),
         "P: token is neither empty nor an encrcdsa header"),
        (Box::new(|p| fs::remove_file(p.join("token")).unwrap()),
         "corrupt image: P/token: missing"),
        (Box::new(|p| fs::remove_dir_all(p.join("bands")).unwrap()),
         "corrupt image: P/bands: missing"),
        (Box::new(|p| fs::write(p.join("bands/zz"), b"x").unwrap()),
         "corrupt image: P/bands/zz: not a band name (lowercase hex without leading zeros)"),
        (Box::new(|p| fs::write(p.join("bands/03"), b"x").unwrap()),
         "corrupt image: P/bands/03: not a band name (lowercase hex without leading zeros)"),
        (Box::new(|p| fs::write(p.join("bands/3F"), b"x").unwrap()),
         "corrupt image: P/bands/3F: not a band name (lowercase hex without leading zeros)"),
        (Box::new(|p| fs::write(p.join("bands/4"), b"x").unwrap()),
         "corrupt image: P/bands/4: band 4 lies past the end of the disk (262144 bytes, 4 bands)"),
        (Box::new(|p| fs::write(p.join("bands/ffffffffffffffff"), b"x").unwrap()),
         "corrupt image: P/bands/ffffffffffffffff: band 18446744073709551615 lies past the end of the disk (262144 bytes, 4 bands)"),
        (Box::new(|p| fs::File::options().write(true).open(p.join("bands/3")).unwrap().set_len(64 * KIB + 1).unwrap()),
         "corrupt image: P/bands/3: 65537 bytes, longer than the 65536-byte band size"),
        (Box::new(|p| fs::create_dir(p.join("bands/1")).unwrap()),
         "corrupt image: P/bands/1: not a regular file"),
        (Box::new(|p| std::os::unix::fs::symlink("/etc/passwd", p.join("bands/2")).unwrap()),
         "corrupt image: P/bands/2: not a regular file"),
    ];
    for (i, (damage, want)) in cases.iter().enumerate() {
        let t = tempfile::tempdir().unwrap();
        let path = sample(t.path());
        damage(&path);
        let before = snapshot(t.path());
        let want = want.replace('P', &path.display().to_string());
        for opts in [OpenOptions::writable(), OpenOptions::default()] {
            let got = err_text(SparseBundle::open(&path, &opts));
            assert_eq!(got, want, "case {i}");
            assert!(!got.contains('\n'));
            assert_eq!(
                registry::open(&path, None, &opts)
                    .err()
                    .unwrap()
                    .to_string(),
                want
            );
        }
        assert_eq!(udsb::check(&path).unwrap(), vec![want.clone()], "case {i}");
        assert!(snapshot(t.path()) == before, "case {i}: the bundle changed");
    }
}

#[test]
fn missing_short_and_extra_bands_and_a_leftover_plist_still_open() {
    let t = tempfile::tempdir().unwrap();
    let bs = 64 * KIB;
    let path = sample(t.path());
    // Band 3 lost, band 0 cut short, band 2 appears with 10 bytes.
    fs::remove_file(path.join("bands/3")).unwrap();
    fs::File::options()
        .write(true)
        .open(path.join("bands/0"))
        .unwrap()
        .set_len(40)
        .unwrap();
    fs::write(path.join("bands/2"), pattern(9, 10)).unwrap();
    // A resize cut short before its rename.
    fs::write(path.join("Info.plist.asiffs-tmp"), b"<plist><di").unwrap();
    let lines = udsb::check(&path).unwrap();
    assert_eq!(
        lines,
        [format!(
            "{}/Info.plist.asiffs-tmp: left by an interrupted resize (a writable open removes it)",
            path.display()
        )]
    );
    let r = SparseBundle::open(&path, &OpenOptions::default()).unwrap();
    let mut want = vec![0u8; 4 * bs as usize];
    want[..40].copy_from_slice(&pattern(1, 100)[..40]);
    want[2 * bs as usize..2 * bs as usize + 10].copy_from_slice(&pattern(9, 10));
    assert!(read(&r, 0, want.len()) == want);
    drop(r);
    assert!(path.join("Info.plist.asiffs-tmp").exists());
    let w = reopen(&path);
    assert!(!path.join("Info.plist.asiffs-tmp").exists());
    assert!(read(&w, 0, want.len()) == want);
    drop(w);
    assert_eq!(udsb::check(&path).unwrap(), Vec::<String>::new());
}

#[test]
fn check_lists_every_problem() {
    let t = tempfile::tempdir().unwrap();
    let path = sample(t.path());
    set_key(&path, "future-key", plist::Value::Boolean(true));
    fs::write(path.join("bands/zz"), b"").unwrap();
    fs::write(path.join("bands/9"), b"").unwrap();
    fs::write(path.join("bands/.DS_Store"), b"finder").unwrap();
    let p = path.display();
    assert_eq!(
        udsb::check(&path).unwrap(),
        [
            format!("{p}/Info.bckup: does not match Info.plist"),
            format!("corrupt image: {p}/bands/9: band 9 lies past the end of the disk (262144 bytes, 4 bands)"),
            format!("corrupt image: {p}/bands/zz: not a band name (lowercase hex without leading zeros)"),
        ]
    );
    fs::remove_file(path.join("Info.bckup")).unwrap();
    assert_eq!(
        udsb::check(&path).unwrap()[0],
        format!("corrupt image: {p}/Info.bckup: missing")
    );
}

#[test]
fn probe_and_open_know_bundles_by_name_or_by_plist() {
    let t = tempfile::tempdir().unwrap();
    let path = sample(t.path());
    assert_eq!(registry::probe(&path).unwrap(), Some(Format::Udsb));
    let other = t.path().join("renamed");
    fs::rename(&path, &other).unwrap();
    assert_eq!(registry::probe(&other).unwrap(), Some(Format::Udsb));
    let d = registry::open(&other, None, &OpenOptions::default()).unwrap();
    assert_eq!(
        (d.format(), d.size(), d.path()),
        (Format::Udsb, 4 * 64 * KIB, other.as_path())
    );
    assert_eq!(read(&*d, 0, 100), pattern(1, 100));
    assert_eq!(Format::Udsb.name(), "udsb");
    // A plain directory is no image; an empty one named like a bundle is
    // a bundle with a clear complaint.
    let plain = t.path().join("plain");
    fs::create_dir(&plain).unwrap();
    assert_eq!(registry::probe(&plain).unwrap(), None);
    let empty = t.path().join("empty.sparsebundle");
    fs::create_dir(&empty).unwrap();
    assert_eq!(registry::probe(&empty).unwrap(), Some(Format::Udsb));
    assert_eq!(
        registry::open(&empty, None, &OpenOptions::default())
            .err()
            .unwrap()
            .to_string(),
        format!("corrupt image: {}/token: missing", empty.display())
    );
}

#[test]
fn eight_threads_writing_into_the_same_new_bands_lose_nothing() {
    threads_writing_into_the_same_new_bands(false);
}

/// Encrypted, each sector write is a read-modify-write of a 4096-byte
/// block the eight threads share, and the first writes into a band grow
/// its file past gaps of encrypted zeros.
#[test]
fn eight_threads_writing_into_the_same_new_encrypted_bands_lose_nothing() {
    threads_writing_into_the_same_new_bands(true);
}

fn threads_writing_into_the_same_new_bands(encrypted: bool) {
    let t = tempfile::tempdir().unwrap();
    let bs = 64 * KIB;
    let bands_n = 96; // more than the open-file cache holds
    let (path, b) = if encrypted {
        let path = t.path().join("enc.sparsebundle");
        let b =
            SparseBundle::create_encrypted_with(&path, bands_n * bs, bs, b"pw", 128, 2).unwrap();
        (path, b)
    } else {
        new_bundle(t.path(), bands_n * bs, bs)
    };
    let b = Arc::new(b);
    // Thread k writes every 512-byte sector s with s % 8 == k, bands
    // visited in a thread-specific order, flushing now and then.
    let threads: Vec<_> = (0..8u64)
        .map(|k| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(k + 1);
                let mut order: Vec<u64> = (0..bands_n).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for (i, band) in order.into_iter().enumerate() {
                    for s in (k..bs / 512).step_by(8) {
                        let off = band * bs + s * 512;
                        b.write_at(&pattern(off, 512), off).unwrap();
                    }
                    if i % 17 == k as usize {
                        b.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    b.flush().unwrap();
    let check = |d: &dyn Disk| {
        for band in 0..bands_n {
            let got = read(d, band * bs, bs as usize);
            for s in 0..bs / 512 {
                let off = band * bs + s * 512;
                assert!(
                    got[(s * 512) as usize..((s + 1) * 512) as usize] == pattern(off, 512)[..],
                    "sector at {off:#x} lost"
                );
            }
        }
    };
    check(&*b);
    drop(b);
    assert_eq!(bands(&path).len(), bands_n as usize);
    let opts = OpenOptions {
        password: Some(asiffs::password::Password::first_line(b"pw")),
        ..OpenOptions::writable()
    };
    check(&SparseBundle::open(&path, &opts).unwrap());
}

/// One step of the kill workload, from the step number and the size now.
enum KillOp {
    Write(u64, Vec<u8>),
    Discard(u64, u64),
    Resize(u64),
}

const KILL_BAND: u64 = 16 * KIB;

fn kill_op(step: u64, size: u64) -> KillOp {
    let mut rng = Rng(0x9e37_79b9 ^ (step + 1).wrapping_mul(0x2545_f491));
    let off = rng.below(size);
    let len = 1 + rng.below((size - off).min(3 * KILL_BAND));
    match rng.below(20) {
        0..=11 => KillOp::Write(off, pattern(step, len as usize)),
        12..=16 => KillOp::Discard(off, len),
        _ => KillOp::Resize(512 * (KILL_BAND / 512) * (1 + rng.below(40)) + 512 * rng.below(32)),
    }
}

fn apply_to_model(m: &mut Vec<u8>, op: &KillOp) {
    match op {
        KillOp::Write(off, d) => m[*off as usize..*off as usize + d.len()].copy_from_slice(d),
        KillOp::Discard(off, len) => m[*off as usize..(off + len) as usize].fill(0),
        KillOp::Resize(n) => m.resize(*n as usize, 0),
    }
}

/// The child side of `a_process_killed_at_any_instant_leaves_a_bundle_that_opens`:
/// runs the workload, writing each step's number after its flush returned.
#[test]
#[ignore = "run as a child process by the kill test"]
fn kill_child() {
    use std::io::Write;
    let Some(dir) = std::env::var_os("UDSB_KILL_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let b = reopen(&dir.join("disk.sparsebundle"));
    let mut log = fs::File::options()
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    for step in 0.. {
        match kill_op(step, b.size()) {
            KillOp::Write(off, d) => b.write_at(&d, off).unwrap(),
            KillOp::Discard(off, len) => b.discard(off, len).unwrap(),
            KillOp::Resize(n) => b.resize(n).unwrap(),
        }
        b.flush().unwrap();
        writeln!(log, "{step}").unwrap();
    }
}

#[test]
fn a_process_killed_at_any_instant_leaves_a_bundle_that_opens() {
    for round in 0..12u64 {
        let t = tempfile::tempdir().unwrap();
        let start = 8 * KILL_BAND;
        let (path, b) = new_bundle(t.path(), start, KILL_BAND);
        drop(b);
        fs::write(t.path().join("log"), b"").unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "kill_child",
                "--exact",
                "--ignored",
                "--quiet",
                "--test-threads=1",
            ])
            .env("UDSB_KILL_DIR", t.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Let it get going (bounded), then kill it somewhere in a step.
        let t0 = std::time::Instant::now();
        while fs::metadata(t.path().join("log")).unwrap().len() < 40
            && t0.elapsed() < std::time::Duration::from_secs(20)
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_micros(
            Rng(round + 7).below(30_000),
        ));
        child.kill().unwrap();
        child.wait().unwrap();

        let log = fs::read_to_string(t.path().join("log")).unwrap();
        let done = log.lines().count() as u64 - u64::from(!log.ends_with('\n') && !log.is_empty());
        assert!(done > 0, "round {round}: the child did no step");
        // The disk after the steps that returned, and after the next one.
        let mut before = vec![0u8; start as usize];
        for step in 0..done {
            let op = kill_op(step, before.len() as u64);
            apply_to_model(&mut before, &op);
        }
        let mut after = before.clone();
        apply_to_model(&mut after, &kill_op(done, before.len() as u64));

        let b = reopen(&path);
        let size = b.size();
        assert!(
            size == before.len() as u64 || size == after.len() as u64,
            "round {round}: size {size}"
        );
        let got = read(&b, 0, size as usize);
        let at = |m: &Vec<u8>, i: usize| m.get(i).copied().unwrap_or(0);
        for (i, &x) in got.iter().enumerate() {
            assert!(
                x == at(&before, i) || x == at(&after, i),
                "round {round}, after step {done}: byte {i:#x} is {x:#x}"
            );
        }
        drop(b);
        let lines = udsb::check(&path).unwrap();
        let mismatch = format!("{}/Info.bckup: does not match Info.plist", path.display());
        assert!(
            lines.is_empty() || lines == [mismatch],
            "round {round}: {lines:?}"
        );
    }
}

#[test]
fn a_resize_cut_between_the_two_plists_opens_at_the_new_size() {
    let t = tempfile::tempdir().unwrap();
    let path = sample(t.path());
    // Info.plist renamed into place, Info.bckup not yet.
    let old = fs::read(path.join("Info.bckup")).unwrap();
    let b = reopen(&path);
    b.resize(2 * 64 * KIB).unwrap();
    drop(b);
    fs::write(path.join("Info.bckup"), &old).unwrap();
    let mismatch = format!("{}/Info.bckup: does not match Info.plist", path.display());
    // A reader serves the new size and leaves the copy alone.
    let r = SparseBundle::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(r.size(), 2 * 64 * KIB);
    assert_eq!(read(&r, 0, 100), pattern(1, 100));
    drop(r);
    assert_eq!(fs::read(path.join("Info.bckup")).unwrap(), old);
    assert_eq!(udsb::check(&path).unwrap(), [mismatch]);
    // A writer restores the copy from Info.plist.
    let b = reopen(&path);
    assert_eq!(b.size(), 2 * 64 * KIB);
    drop(b);
    assert_eq!(
        fs::read(path.join("Info.bckup")).unwrap(),
        fs::read(path.join("Info.plist")).unwrap()
    );
    assert_eq!(udsb::check(&path).unwrap(), Vec::<String>::new());
}

#[test]
fn create_replaces_a_build_directory_its_own_pid_left() {
    let t = tempfile::tempdir().unwrap();
    let left = t.path().join(format!(
        ".disk.sparsebundle.asiffs-tmp-{}",
        std::process::id()
    ));
    fs::create_dir_all(left.join("bands")).unwrap();
    fs::write(left.join("Info.plist"), b"half").unwrap();
    let (path, b) = new_bundle(t.path(), MIB, MIB);
    drop(b);
    assert!(!left.exists());
    assert_eq!(bands(&path), []);
    let names: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["disk.sparsebundle"]);
}

#[test]
fn a_bands_symlink_is_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let path = sample(t.path());
    let elsewhere = t.path().join("elsewhere");
    fs::rename(path.join("bands"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, path.join("bands")).unwrap();
    let before = snapshot(t.path());
    assert_eq!(
        err_text(SparseBundle::open(&path, &OpenOptions::writable())),
        format!("corrupt image: {}/bands: not a directory", path.display())
    );
    assert!(snapshot(t.path()) == before);
}

#[test]
fn create_names_the_bundle_when_its_folder_is_missing() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("no/such/x.sparsebundle");
    assert_eq!(
        err_text(SparseBundle::create(&p, MIB, MIB)),
        format!("{}: No such file or directory (os error 2)", p.display())
    );
}

/// Descriptors this process holds on files under `dir`.
fn open_fds_under(dir: &Path) -> usize {
    let dir = fs::canonicalize(dir).unwrap();
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .count()
}

#[test]
fn open_band_files_stay_bounded_without_a_flush() {
    let t = tempfile::tempdir().unwrap();
    let bs = 4 * KIB;
    let n = 1000;
    let (path, b) = new_bundle(t.path(), n * bs, bs);
    for band in 0..n {
        b.write_at(&pattern(band, 100), band * bs + 7).unwrap();
    }
    // 64 kept for reuse, 256 waiting for the flush, bands/ itself.
    let open = open_fds_under(&path.join("bands"));
    assert!(open <= 64 + 257 + 1, "{open} descriptors open");
    b.flush().unwrap();
    assert!(open_fds_under(&path.join("bands")) <= 64 + 1);
    for band in (0..n).step_by(37) {
        assert_eq!(read(&b, band * bs + 7, 100), pattern(band, 100));
    }
    drop(b);
    assert_eq!(bands(&path).len(), n as usize);
}

#[test]
fn allocate_reserves_band_space_that_reads_as_zeros() {
    let t = tempfile::tempdir().unwrap();
    let bs = 64 * KIB;
    let (path, b) = new_bundle(t.path(), 4 * bs, bs);
    b.write_at(&pattern(1, 512), bs + 512).unwrap();
    b.allocate(bs - 8 * KIB, 16 * KIB).unwrap();
    assert_eq!(bands(&path), [("0".into(), bs), ("1".into(), 8 * KIB)]);
    let blocks = |n: &str| fs::metadata(path.join("bands").join(n)).unwrap().blocks() * 512;
    assert_eq!((blocks("0"), blocks("1")), (8 * KIB, 8 * KIB));
    let mut want = vec![0u8; 16 * KIB as usize];
    want[8 * KIB as usize + 512..8 * KIB as usize + 1024].copy_from_slice(&pattern(1, 512));
    assert_eq!(read(&b, bs - 8 * KIB, 16 * KIB as usize), want);
    assert_eq!(
        b.allocate(3 * bs, bs + 1).unwrap_err().to_string(),
        format!(
            "range {:#x}+{:#x} is outside the disk ({} bytes)",
            3 * bs,
            bs + 1,
            4 * bs
        )
    );
    let s = b.stats();
    assert_eq!(
        (s["writes"].as_u64(), s["bands"].as_u64()),
        (Some(1), Some(2))
    );
    drop(b);
    let r = SparseBundle::open(&path, &OpenOptions::default()).unwrap();
    assert!(matches!(r.allocate(0, 512), Err(Error::ReadOnly)));
    assert!(matches!(r.discard(0, 512), Err(Error::ReadOnly)));
}

// ---- crash-point replay (common::crash_dir) -------------------------------

/// Crash bundles: 48 bands of 4 KiB, so that the workload makes, punches
/// and removes many band files.
const CBAND: u64 = 4 * KIB;
const CDISK: u64 = 48 * CBAND;
const SPB: u64 = CBAND / 512;

fn crash_path() -> &'static Path {
    Path::new("crash.sparsebundle")
}

/// The password of the encrypted crash bundles (a plain one ignores it).
const CPW: &[u8] = b"crash";

fn open_mem(rec: &Arc<DirRecorder>, writable: bool) -> asiffs::Result<SparseBundle> {
    let dir = Arc::new(Store(rec.clone()));
    SparseBundle::from_store_with_password(crash_path(), dir, None, writable, Some(CPW))
}

/// A fresh crash bundle; `encrypted`: its token a header with 512-byte
/// blocks, as the replay tears writes at sectors and a torn larger block
/// would decrypt to noise (on macOS too), and few PBKDF2 iterations.
fn fresh_tree(encrypted: bool) -> Tree {
    let t = tempfile::tempdir().unwrap();
    let (p, b) = new_bundle(t.path(), CDISK, CBAND);
    b.close().unwrap();
    if encrypted {
        let (header, _) = asiffs::host::crypt::new_header_v2_with(CPW, 128, 512, 0, 2).unwrap();
        fs::write(p.join("token"), header).unwrap();
    }
    DirRecorder::load(&p)
}

fn bundle_verify(state: Tree, model: &crash::Model, durable: usize, started: usize, ctx: &str) {
    let rec = DirRecorder::new(state);
    let b = open_mem(&rec, false).unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    check_sectors(&b, model, durable, started, ctx);
    drop(b);
    // A writer takes the survivor, repairs what a crash may leave, and
    // everything checks clean after.
    let b = open_mem(&rec, true).unwrap_or_else(|e| panic!("{ctx}: no writable reopen: {e}"));
    check_sectors(&b, model, durable, started, ctx);
    b.write_at(&[0xEE; 3 * CBAND as usize], CBAND + 512)
        .unwrap();
    b.flush().unwrap();
    let mut big = vec![0u8; 3 * CBAND as usize];
    b.read_at(&mut big, CBAND + 512).unwrap();
    assert!(big.iter().all(|&x| x == 0xEE), "{ctx}: recovery write lost");
    drop(b);
    assert_eq!(
        udsb::check_store(crash_path(), &Store(rec)),
        Vec::<String>::new(),
        "{ctx}"
    );
}

/// Writes, partial and whole-band discards, flushes, and now and then a
/// shrink followed later by a grow back (writes stay inside the size).
fn bundle_workload(seed: u64, steps: usize) -> Vec<Step> {
    let mut r = Rng(seed);
    let mut tag = 0;
    let mut size = CDISK;
    let mut plan = Vec::new();
    for _ in 0..steps {
        let sectors = size / 512;
        let sector = r.below(sectors - 2 * SPB);
        match r.below(12) {
            0..=5 => {
                tag += 1;
                plan.push(Step::Write {
                    sector,
                    count: 1 + r.below(2 * SPB),
                    tag,
                });
            }
            6 => plan.push(Step::Discard {
                sector,
                count: 1 + r.below(SPB),
            }),
            7 => {
                let band = sector / SPB;
                plan.push(Step::Discard {
                    sector: band * SPB,
                    count: SPB * (1 + r.below(2)),
                });
            }
            8..=9 if size == CDISK => {
                // Shrink to a size that cuts a band in two.
                size = CDISK / 2 + (1 + r.below(SPB - 1)) * 512;
                plan.push(Step::Resize(size));
            }
            8..=9 => {
                size = CDISK;
                plan.push(Step::Resize(size));
            }
            _ => plan.push(Step::Flush),
        }
    }
    plan
}

fn bundle_replay(seed: u64, steps: usize, encrypted: bool) {
    let rec = DirRecorder::new(fresh_tree(encrypted));
    assert_eq!(open_mem(&rec, false).unwrap().is_encrypted(), encrypted);
    let base = rec.start();
    let plan = bundle_workload(seed, steps);
    assert!(
        plan.iter().any(|s| matches!(s, Step::Resize(_))),
        "seed {seed}: the workload never resizes"
    );
    {
        let b = open_mem(&rec, true).unwrap();
        run_steps(&*rec, &b, &plan, 0);
    }
    let log = rec.take_log();
    assert!(
        log.iter().any(|op| matches!(op, DirOp::Unlink(..))),
        "seed {seed}: no band was removed"
    );
    let points = crash_dir::sweep(seed, base, &log, &plan, 0, 4, bundle_verify);
    assert!(points > 100, "seed {seed}: only {points} crash points");
}

#[test]
fn every_bundle_crash_point_opens_and_keeps_flushed_writes() {
    for seed in [1, 7, 4242] {
        bundle_replay(seed, 40, false);
    }
}

#[test]
fn every_encrypted_bundle_crash_point_opens_and_keeps_flushed_writes() {
    for seed in [1, 7, 4242] {
        bundle_replay(seed, 40, true);
    }
}

#[test]
fn the_bundle_replay_detects_a_lost_flushed_write() {
    let plan = crash::lost_write_plan(5 * SPB);
    for encrypted in [false, true] {
        let rec = DirRecorder::new(fresh_tree(encrypted));
        run_steps(&*rec, &open_mem(&rec, true).unwrap(), &plan[..2], 0);
        let state = rec.tree();
        crash::assert_catches_lost_write(&plan, state, bundle_verify);
    }
}

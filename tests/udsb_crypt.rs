//! Encrypted sparse bundles: the hdiutil vector, refusals without or with
//! a wrong password, plaintext round trips across band and block
//! boundaries, discards (encrypted zeros, truncation, band removal),
//! holes, resize, concurrent writers and the layout of created bundles.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asiffs::asif::engine::Extent;
use asiffs::disk::Disk;
use asiffs::host::crypt;
use asiffs::password::Password;
use asiffs::registry;
use asiffs::udsb::SparseBundle;
use asiffs::OpenOptions;
use common::pattern;
use sha2::{Digest, Sha256};

const KIB: u64 = 1 << 10;
const PW: &[u8] = b"correct horse";
const VECTOR_SHA: &str = "eb35ccf058905d535e4dbf3176ebd8d94b89fb282a4ccc7ae88f08bfc2b68b17";

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn opts(writable: bool, password: Option<&[u8]>) -> OpenOptions {
    OpenOptions {
        writable,
        password: password.map(Password::first_line),
        ..OpenOptions::default()
    }
}

/// The hdiutil bundle, unpacked into `dir`.
fn vector_bundle(dir: &Path) -> PathBuf {
    let src = common::vectors_dir()
        .join("real/encrypted/testimage.AES-256.64k.header_v2.sparsebundle.tar.gz");
    assert!(src.is_file(), "missing test vector {}", src.display());
    let st = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&src)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
    dir.join("testimage.AES-256.64k.header_v2.sparsebundle")
}

fn disk_bytes(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0xAAu8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Every file under `dir` with its contents, mode and mtime.
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

fn err_text<T>(r: asiffs::Result<T>) -> String {
    match r {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    }
}

/// A new encrypted bundle (few PBKDF2 iterations) and its path.
fn new_bundle(dir: &Path, size: u64, band: u64) -> (PathBuf, SparseBundle) {
    let path = dir.join("enc.sparsebundle");
    let b = SparseBundle::create_encrypted_with(&path, size, band, PW, 128, 3).unwrap();
    assert!(b.is_encrypted());
    (path, b)
}

fn reopen(path: &Path) -> SparseBundle {
    SparseBundle::open(path, &opts(true, Some(PW))).unwrap()
}

fn band_file(path: &Path, n: u64) -> Option<Vec<u8>> {
    fs::read(path.join("bands").join(format!("{n:x}"))).ok()
}

/// Offsets of 512-byte blocks of all-zero bytes in `file`.
fn zero_sectors(file: &[u8]) -> Vec<usize> {
    file.chunks(512)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == 0))
        .map(|(i, _)| i * 512)
        .collect()
}

/// Whether any 16-byte window of `plain` (step 16) appears in `file`.
fn leaks(file: &[u8], plain: &[u8]) -> bool {
    plain
        .chunks_exact(16)
        .any(|w| file.windows(16).any(|f| f == w))
}

#[test]
fn the_hdiutil_vector_reads_through_the_registry_and_open() {
    let t = tempfile::tempdir().unwrap();
    let path = vector_bundle(t.path());
    let before = snapshot(&path);
    let d = registry::open(&path, None, &opts(false, Some(b"vilefault"))).unwrap();
    assert_eq!(d.size(), 65536);
    assert_eq!(sha(&disk_bytes(&*d)), VECTOR_SHA);
    drop(d);
    let b = SparseBundle::open(&path, &opts(false, Some(b"vilefault"))).unwrap();
    assert!(b.is_encrypted());
    assert_eq!(sha(&disk_bytes(&b)), VECTOR_SHA);
    // The GPT header the README names, at byte 512.
    let mut gpt = [0u8; 8];
    b.read_at(&mut gpt, 512).unwrap();
    assert_eq!(&gpt, b"EFI PART");
    // A present band is data to its file's end.
    assert_eq!(
        b.extents().unwrap(),
        [Extent {
            start: 0,
            length: 65536,
            data: true,
            offset: None
        }]
    );
    drop(b);
    assert_eq!(snapshot(&path), before);
}

#[test]
fn no_password_and_a_wrong_one_are_refused_in_one_line_writing_nothing() {
    let t = tempfile::tempdir().unwrap();
    let path = vector_bundle(t.path());
    let before = snapshot(&path);
    let shown = path.display();
    for writable in [false, true] {
        assert_eq!(
            err_text(SparseBundle::open(&path, &opts(writable, None))),
            format!(
                "{shown}: encrypted sparse bundle: needs its password (--password-file FILE or --stdinpass)"
            )
        );
        assert_eq!(
            err_text(registry::open(&path, None, &opts(writable, None))),
            format!(
                "{shown}: encrypted sparse bundle: needs its password (--password-file FILE or --stdinpass)"
            )
        );
        assert_eq!(
            err_text(SparseBundle::open(
                &path,
                &opts(writable, Some(b"vilefaulT"))
            )),
            format!("{shown}: wrong password")
        );
        assert_eq!(
            err_text(registry::open(&path, None, &opts(writable, Some(b"")))),
            format!("{shown}: wrong password")
        );
    }
    assert_eq!(snapshot(&path), before);
    // A sound encrypted bundle checks clean without its password.
    assert_eq!(asiffs::udsb::check(&path).unwrap(), Vec::<String>::new());
}

#[test]
fn the_vector_is_writable_and_keeps_what_it_had() {
    let t = tempfile::tempdir().unwrap();
    let path = vector_bundle(t.path());
    let b = SparseBundle::open(&path, &opts(true, Some(b"vilefault"))).unwrap();
    let mut want = disk_bytes(&b);
    let pat = pattern(9, 5000);
    b.write_at(&pat, 30_001).unwrap();
    want[30_001..35_001].copy_from_slice(&pat);
    b.close().unwrap();
    let b = SparseBundle::open(&path, &opts(false, Some(b"vilefault"))).unwrap();
    assert_eq!(disk_bytes(&b), want);
    assert!(!leaks(&band_file(&path, 0).unwrap(), &pat));
}

#[test]
fn unaligned_writes_across_bands_and_blocks_read_back_after_reopening() {
    let t = tempfile::tempdir().unwrap();
    let band = 64 * KIB;
    // Not a whole number of blocks: the last block straddles the end.
    let size = 5 * band + 1536;
    let (path, b) = new_bundle(t.path(), size, band);
    assert_eq!(b.size(), size);
    let mut want = vec![0u8; size as usize];
    let mut all = Vec::new();
    let writes: [(u64, usize); 8] = [
        (1, 1),
        (4095, 2),
        (band - 100, 300),                // across a band boundary
        (2 * band + 4096 * 3 + 17, 9000), // a fresh band, past a gap
        (2 * band + 5, 4000),             // back into the gap
        (4 * band - 1, band as usize + 2),
        (size - 700, 700), // the disk's last bytes
        (3 * band + 4096, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let pat = pattern(100 + i as u64, len);
        b.write_at(&pat, off).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&pat);
        all.push(pat);
    }
    assert_eq!(disk_bytes(&b), want);
    b.close().unwrap();
    let b = reopen(&path);
    assert_eq!(disk_bytes(&b), want);
    // Odd reads: single bytes at block and band edges, a read over all.
    for off in [
        0,
        4095,
        4096,
        band - 1,
        band,
        2 * band + 4096 * 3 + 16,
        size - 1,
    ] {
        let mut one = [0xAAu8];
        b.read_at(&mut one, off).unwrap();
        assert_eq!(one[0], want[off as usize], "byte {off}");
    }
    drop(b);
    // Band files hold whole blocks of ciphertext: no plaintext, no holes.
    for n in 0..6 {
        let Some(f) = band_file(&path, n) else {
            continue;
        };
        assert_eq!(f.len() % 4096, 0, "band {n}");
        assert!(f.len() as u64 <= band, "band {n}");
        assert_eq!(zero_sectors(&f), Vec::<usize>::new(), "band {n}");
        for pat in &all {
            assert!(!leaks(&f, pat), "band {n} shows plaintext");
        }
    }
    // Band 1 was written only in its first 200 bytes: one block.
    assert_eq!(band_file(&path, 1).unwrap().len(), 4096);
    // Band 2 was first written past a gap, then the gap was filled.
    assert_eq!(
        band_file(&path, 2).unwrap().len() as u64,
        (4096 * 3 + 17 + 9000u64).div_ceil(4096) * 4096
    );
}

#[test]
fn a_partial_discard_writes_encrypted_zeros_and_a_tail_one_truncates() {
    let t = tempfile::tempdir().unwrap();
    let band = 64 * KIB;
    let (path, b) = new_bundle(t.path(), 4 * band, band);
    let pat = pattern(7, 3 * band as usize);
    b.write_at(&pat, 0).unwrap();
    let mut want = pat.clone();
    want.resize(4 * band as usize, 0);
    // Inside band 0, unaligned at both ends.
    b.discard(1000, 10_000).unwrap();
    want[1000..11_000].fill(0);
    // The tail of band 1 from an unaligned offset: truncated.
    b.discard(band + 50_000, band - 50_000).unwrap();
    want[(band + 50_000) as usize..2 * band as usize].fill(0);
    // All of band 2: its file goes.
    b.discard(2 * band, band).unwrap();
    want[2 * band as usize..3 * band as usize].fill(0);
    // Zeroing through write_zeroes is a discard too.
    b.write_zeroes(40_000, 512).unwrap();
    want[40_000..40_512].fill(0);
    assert_eq!(disk_bytes(&b), want);
    b.close().unwrap();
    let b = reopen(&path);
    assert_eq!(disk_bytes(&b), want);
    drop(b);
    let b0 = band_file(&path, 0).unwrap();
    assert_eq!(b0.len() as u64, band);
    assert_eq!(zero_sectors(&b0), Vec::<usize>::new());
    assert!(!leaks(&b0, &pat[..band as usize]));
    let b1 = band_file(&path, 1).unwrap();
    assert_eq!(b1.len() as u64, 50_000u64.div_ceil(4096) * 4096);
    assert_eq!(zero_sectors(&b1), Vec::<usize>::new());
    assert_eq!(band_file(&path, 2), None);
    // The cut block's tail reads as zeros once written again around it.
    let b = reopen(&path);
    b.write_at(&[0x5A], band + 60_000).unwrap();
    want[(band + 60_000) as usize] = 0x5A;
    assert_eq!(disk_bytes(&b), want);
    drop(b);
    assert_eq!(
        zero_sectors(&band_file(&path, 1).unwrap()),
        Vec::<usize>::new()
    );
}

#[test]
fn holes_are_absent_bands_and_the_ends_of_short_band_files() {
    let t = tempfile::tempdir().unwrap();
    let band = 64 * KIB;
    let (_path, b) = new_bundle(t.path(), 4 * band, band);
    b.write_at(&[1; 100], 10).unwrap();
    b.write_at(&[2; 100], 2 * band + 20_000).unwrap();
    // Zeros inside a present band are ciphertext, not holes.
    b.discard(0, 50).unwrap();
    let ext = |start, end, data| Extent {
        start,
        length: end - start,
        data,
        offset: None,
    };
    assert_eq!(
        b.extents().unwrap(),
        [
            ext(0, 4096, true),
            ext(4096, 2 * band, false),
            ext(2 * band, 2 * band + 20_480, true),
            ext(2 * band + 20_480, 4 * band, false),
        ]
    );
    assert_eq!(b.seek_data(0).unwrap(), Some(0));
    assert_eq!(b.seek_data(4096).unwrap(), Some(2 * band));
    assert_eq!(b.seek_data(2 * band + 20_480).unwrap(), None);
    assert_eq!(b.seek_hole(0).unwrap(), 4096);
    assert_eq!(b.seek_hole(2 * band + 7).unwrap(), 2 * band + 20_480);
    assert_eq!(b.seek_hole(band).unwrap(), band);
}

#[test]
fn a_shrink_that_cuts_a_block_then_a_grow_reads_zeros_past_it() {
    let t = tempfile::tempdir().unwrap();
    let band = 64 * KIB;
    let (path, b) = new_bundle(t.path(), 2 * band, band);
    let pat = pattern(3, 2 * band as usize);
    b.write_at(&pat, 0).unwrap();
    b.resize(band + 1536).unwrap();
    b.resize(2 * band).unwrap();
    let mut want = pat.clone();
    want[(band + 1536) as usize..].fill(0);
    assert_eq!(disk_bytes(&b), want);
    b.close().unwrap();
    assert_eq!(band_file(&path, 1).unwrap().len(), 4096);
    assert_eq!(disk_bytes(&reopen(&path)), want);
    // Past 2^32 blocks of 4096 bytes the IVs run out.
    let b = reopen(&path);
    assert_eq!(
        b.resize((1u64 << 44) + 4096).unwrap_err().to_string(),
        format!(
            "{}: 17592186048512 bytes is more than 2^32 encryption blocks of 4096 bytes",
            path.display()
        )
    );
}

#[test]
fn concurrent_writers_in_one_block_keep_each_others_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (path, b) = new_bundle(t.path(), 256 * KIB, 64 * KIB);
    let b = Arc::new(b);
    // Eight writers share block 0 and eight the block across bands 0/1.
    let threads: Vec<_> = (0..16u8)
        .map(|w| {
            let b = b.clone();
            std::thread::spawn(move || {
                let base = if w < 8 { 0 } else { 64 * KIB - 2048 };
                for round in 0..40u64 {
                    let at = base + (w % 8) as u64 * 512 + round;
                    b.write_at(&[w + 1], at).unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let check = |d: &dyn Disk| {
        let got = disk_bytes(d);
        for w in 0..16u8 {
            let base = if w < 8 { 0 } else { 64 * KIB - 2048 };
            let at = (base + (w % 8) as u64 * 512) as usize;
            assert_eq!(got[at..at + 40], [w + 1; 40], "writer {w}");
            assert!(got[at + 40..at + 512].iter().all(|&x| x == 0), "writer {w}");
        }
    };
    check(&*b);
    drop(b);
    check(&reopen(&path));
}

#[test]
fn a_created_bundle_is_laid_out_as_hdiutil_does_and_reopens() {
    let t = tempfile::tempdir().unwrap();
    let real = vector_bundle(t.path());
    let path = t.path().join("new.sparsebundle");
    // The vector's geometry, key size and (default) iteration count.
    let b = SparseBundle::create_encrypted(&path, 65536, 8 << 20, b"vilefault", 256).unwrap();
    b.write_at(b"hello", 512).unwrap();
    b.close().unwrap();
    // Same plist bytes and files as hdiutil's.
    for name in ["Info.plist", "Info.bckup"] {
        assert_eq!(
            fs::read(path.join(name)).unwrap(),
            fs::read(real.join(name)).unwrap()
        );
    }
    let names = |p: &Path| {
        let mut v: Vec<String> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&path), names(&real));
    let ours = fs::read(path.join("token")).unwrap();
    let theirs = fs::read(real.join("token")).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), 0x1e000);
    // Fixed fields but the UUID (36..52), and the key-pointer table.
    assert_eq!(ours[..36], theirs[..36]);
    assert_eq!(ours[52..96], theirs[52..96]);
    // Key blob fields but the random salt and IV and the count (1000 then).
    let blob = 0x60;
    assert_eq!(ours[blob..blob + 8], theirs[blob..blob + 8]);
    assert_eq!(
        u32::from_be_bytes(ours[blob + 8..blob + 12].try_into().unwrap()),
        crypt::CREATE_ITERATIONS
    );
    assert_eq!(ours[blob + 12..blob + 16], theirs[blob + 12..blob + 16]);
    assert_eq!(ours[blob + 48..blob + 52], theirs[blob + 48..blob + 52]);
    assert_eq!(ours[blob + 84..blob + 104], theirs[blob + 84..blob + 104]);
    // Zeros from the blob's end, as in hdiutil's.
    let end = blob + 0x268;
    assert!(ours[end..].iter().all(|&x| x == 0));
    assert!(theirs[end..].iter().all(|&x| x == 0));
    let (h, _) = crypt::unlock_header_v2(&ours, b"vilefault").unwrap();
    assert_eq!((h.data_size, h.block_size, h.key_bits), (0, 4096, 256));
    let b = SparseBundle::open(&path, &opts(false, Some(b"vilefault"))).unwrap();
    let mut got = [0u8; 7];
    b.read_at(&mut got, 511).unwrap();
    assert_eq!(&got, b"\0hello\0");
    drop(b);
    assert_eq!(
        err_text(SparseBundle::open(&path, &opts(false, Some(b"nope")))),
        format!("{}: wrong password", path.display())
    );
}

#[test]
fn create_refuses_bands_that_are_not_whole_blocks() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("x.sparsebundle");
    assert_eq!(
        err_text(SparseBundle::create_encrypted_with(
            &path,
            1 << 20,
            6144,
            PW,
            128,
            3
        )),
        format!(
            "{}: band size 6144 is not a multiple of the 4096-byte encryption block",
            path.display()
        )
    );
    assert!(!path.exists());
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

//! Life cycle through the CLI: resize (both ways), convert raw/qcow2/ASIF
//! round trips, and the refusals (locked image, missing --shrink, too big).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use asiffs::{Image, OpenOptions};

const BIN: &str = env!("CARGO_BIN_EXE_asiffs");
const MIB: u64 = 1 << 20;

fn asiffs(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running asiffs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// Deterministic non-zero bytes, different for every offset and seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Scattered data: odd sizes, unaligned, across chunk boundaries, and one
/// range at the very end. Returns the whole expected disk.
fn scattered(size: u64) -> (Vec<(u64, Vec<u8>)>, Vec<u8>) {
    let writes = vec![
        (0, pattern(4096, 1)),
        (MIB - 700, pattern(1500, 2)),
        (3 * MIB + 512, pattern(2 * MIB as usize + 77, 3)),
        (9 * MIB, pattern(MIB as usize, 4)),
        (size - 4096, pattern(4096, 5)),
    ];
    let mut disk = vec![0u8; size as usize];
    for (off, d) in &writes {
        disk[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    (writes, disk)
}

fn write_raw(path: &Path, size: u64) -> Vec<u8> {
    let (writes, disk) = scattered(size);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for (off, d) in writes {
        f.write_all_at(&d, off).unwrap();
    }
    disk
}

fn read_image(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let mut b = vec![0u8; img.size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

/// An ASIF image of `size` holding the scattered data; returns its content.
fn make_image(dir: &Path, name: &str, size: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    ok(&asiffs(&["create", "-s", &size.to_string(), s(&p)]));
    let (writes, disk) = scattered(size);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    for (off, d) in writes {
        img.write_at(&d, off).unwrap();
    }
    img.close().unwrap();
    (p, disk)
}

#[track_caller]
fn check_clean(p: &Path) {
    let o = asiffs(&["check", s(p)]);
    ok(&o);
    assert!(
        stdout(&o).contains("No errors were found on the image."),
        "{}",
        stdout(&o)
    );
}

#[track_caller]
fn same(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("first difference at byte {i:#x}");
    }
}

#[test]
fn resize_grow_keeps_content_and_reads_zeros_beyond() {
    let dir = tempfile::tempdir().unwrap();
    let (p, disk) = make_image(dir.path(), "a.asif", 12 * MIB);
    let o = asiffs(&["resize", s(&p), "+4M"]);
    ok(&o);
    assert_eq!(
        stdout(&o),
        "Image resized from 12 MiB (12582912 bytes) to 16 MiB (16777216 bytes).\n"
    );
    assert_eq!(stderr(&o), "");
    let got = read_image(&p);
    same(&got[..disk.len()], &disk);
    assert!(got[disk.len()..].iter().all(|&b| b == 0));
    assert_eq!(got.len() as u64, 16 * MIB);
    check_clean(&p);

    // Absolute form, JSON output.
    let o = asiffs(&["resize", s(&p), "20M", "--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "old_size": 16 * MIB, "new_size": 20 * MIB })
    );
    assert_eq!(read_image(&p).len() as u64, 20 * MIB);
    check_clean(&p);
}

#[test]
fn resize_shrink_needs_the_flag_and_the_regrown_tail_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (p, disk) = make_image(dir.path(), "a.asif", 12 * MIB);
    let before = std::fs::read(&p).unwrap();

    // Without --shrink: one line, exit 1, file untouched.
    for arg in ["-2M", "5M"] {
        let o = asiffs(&["resize", s(&p), arg]);
        assert_eq!(o.status.code(), Some(1), "{arg}");
        let want = if arg == "5M" { 5 * MIB } else { 10 * MIB };
        assert_eq!(
            stderr(&o),
            format!(
                "asiffs: shrinking {} from 12582912 to {want} bytes discards the data past the new end; use --shrink to do it\n",
                p.display()
            )
        );
        assert_eq!(stdout(&o), "");
        assert!(std::fs::read(&p).unwrap() == before, "file changed");
    }

    // -SIZE with --shrink, cutting through the 2 MiB write at 3.5 MiB.
    let cut = 4 * MIB + 512;
    let o = asiffs(&[
        "resize",
        s(&p),
        &format!("-{}", 12 * MIB - cut),
        "--shrink",
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "old_size": 12 * MIB, "new_size": cut })
    );
    let got = read_image(&p);
    same(&got, &disk[..cut as usize]);
    check_clean(&p);

    // Grow back: everything past the cut reads zeros, not the old data.
    let o = asiffs(&["resize", s(&p), "12M"]);
    ok(&o);
    let got = read_image(&p);
    assert_eq!(got.len() as u64, 12 * MIB);
    same(&got[..cut as usize], &disk[..cut as usize]);
    if let Some(i) = got[cut as usize..].iter().position(|&b| b != 0) {
        panic!("regrown tail not zero at {:#x}", cut as usize + i);
    }
    check_clean(&p);
}

#[test]
fn resize_rounds_up_to_the_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = make_image(dir.path(), "a.asif", 12 * MIB);
    let o = asiffs(&["resize", s(&p), "+1000"]);
    ok(&o);
    assert_eq!(
        stderr(&o),
        "asiffs: size 12583912 rounded up to 12583936, a whole number of 512-byte blocks\n"
    );
    assert_eq!(
        stdout(&o),
        "Image resized from 12 MiB (12582912 bytes) to 12.001 MiB (12583936 bytes).\n"
    );
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), 12583936);
    drop(img);
    check_clean(&p);
}

#[test]
fn resize_refuses_too_large_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = make_image(dir.path(), "a.asif", 12 * MIB);
    let max = Image::open(&p, &OpenOptions::default()).unwrap().max_size();
    assert_eq!(max, (4u64 << 50) - MIB);
    let before = std::fs::read(&p).unwrap();

    let o = asiffs(&["resize", s(&p), "4P"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "asiffs: size {} is larger than the maximum of this image ({max} bytes)\n",
            4u64 << 50
        )
    );
    let o = asiffs(&["resize", s(&p), "-13M", "--shrink"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "asiffs: cannot shrink by 13631488 bytes: the disk is only 12582912 bytes\n"
    );
    let o = asiffs(&["resize", s(&p), "12X"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "asiffs: invalid size \"12X\": unknown unit \"X\"\n"
    );
    assert!(std::fs::read(&p).unwrap() == before, "file changed");

    // Exactly the maximum is fine, and the image stays clean.
    let o = asiffs(&["resize", s(&p), &max.to_string(), "--json"]);
    ok(&o);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), max);
    drop(img);
    check_clean(&p);
}

#[test]
fn resize_refuses_a_locked_image() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = make_image(dir.path(), "a.asif", 12 * MIB);
    let holder = Image::open(&p, &OpenOptions::default()).unwrap(); // shared lock, like a read-only mount
    let o = asiffs(&["resize", s(&p), "+1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "asiffs: {}: image is in use by another process (locked)\n",
            p.display()
        )
    );
    drop(holder);
    assert_eq!(
        Image::open(&p, &OpenOptions::default()).unwrap().size(),
        12 * MIB
    );
}

#[test]
fn raw_to_asif_to_raw_is_identical_and_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let size = 14 * MIB + 4096; // not a whole number of chunks
    let disk = write_raw(&raw, size);
    let asif = dir.path().join("x.asif");
    let back = dir.path().join("back.raw");
    // -f raw: a probed raw source would be warned about.
    let o = asiffs(&["convert", "-f", "raw", s(&raw), s(&asif)]);
    ok(&o);
    assert_eq!((stdout(&o), stderr(&o)), (String::new(), String::new()));
    check_clean(&asif);
    same(&read_image(&asif), &disk);
    let o = asiffs(&["convert", s(&asif), s(&back)]);
    ok(&o);
    assert_eq!((stdout(&o), stderr(&o)), (String::new(), String::new()));
    same(&std::fs::read(&back).unwrap(), &disk);
    // Only chunks holding data were written: 0, 1, 3-5, 9, 14, plus the
    // metadata chunk that every image has.
    let info = Image::open(&asif, &OpenOptions::default())
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(info.data_chunks, 7 + 1);

    // An existing destination needs --force.
    let o = asiffs(&["convert", s(&raw), s(&asif)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "asiffs: {}: file exists (use --force to replace it)\n",
            asif.display()
        )
    );
}

/// ASIF -> ASIF with another chunk/block size, -> raw, -> ASIF with the
/// default geometry: the content never changes.
fn asif_to_asif_round_trip(chunk: &str, block: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (src, disk) = make_image(dir.path(), "a.asif", 14 * MIB + 4096);
    let dst = dir.path().join("b.asif");
    let o = asiffs(&[
        "convert",
        s(&src),
        s(&dst),
        "--chunk-size",
        chunk,
        "--block-size",
        block,
    ]);
    ok(&o);
    assert_eq!(
        stderr(&o),
        "asiffs: warning: macOS has only been seen to use 1 MiB chunks and 512-byte blocks\n"
    );
    let img = Image::open(&dst, &OpenOptions::default()).unwrap();
    assert_eq!(
        img.geometry().chunk_size,
        asiffs::cli::size::parse_size(chunk).unwrap()
    );
    assert_eq!(
        img.geometry().block_size,
        asiffs::cli::size::parse_size(block).unwrap()
    );
    drop(img);
    check_clean(&dst);
    same(&read_image(&dst), &disk);
    let back = dir.path().join("back.raw");
    ok(&asiffs(&["convert", s(&dst), s(&back)]));
    same(&std::fs::read(&back).unwrap(), &disk);

    let again = dir.path().join("c.asif");
    let o = asiffs(&["convert", s(&dst), s(&again)]);
    ok(&o);
    assert_eq!(stderr(&o), "");
    check_clean(&again);
    same(&read_image(&again), &disk);
}

#[test]
fn asif_to_asif_with_4m_chunks_is_identical() {
    asif_to_asif_round_trip("4M", "512");
}

#[test]
fn asif_to_asif_with_4m_chunks_and_4k_blocks_is_identical() {
    asif_to_asif_round_trip("4M", "4096");
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

#[test]
fn qcow2_to_asif_to_raw_is_identical() {
    if !have_qemu_img() {
        eprintln!("NOTICE: qemu-img is not installed; skipping qcow2_to_asif_to_raw_is_identical");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let size = 14 * MIB + 4096;
    let disk = write_raw(&raw, size);
    let qcow = dir.path().join("in.qcow2");
    let q = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", stderr(&q));
    let asif = dir.path().join("x.asif");
    let o = asiffs(&["convert", s(&qcow), s(&asif)]);
    ok(&o);
    assert_eq!((stdout(&o), stderr(&o)), (String::new(), String::new()));
    check_clean(&asif);
    let img = Image::open(&asif, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), size);
    // Holes stay holes: the same 7 chunks (+ metadata) as from the raw file.
    assert_eq!(img.info().unwrap().data_chunks, 7 + 1);
    drop(img);
    let back = dir.path().join("back.raw");
    ok(&asiffs(&["convert", s(&asif), s(&back)]));
    same(&std::fs::read(&back).unwrap(), &disk);
    // The qemu-nbd server that read the qcow2 has exited.
    let tag = s(&qcow).as_bytes().to_vec();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let is_nbd = cmd.windows(8).any(|w| w == b"qemu-nbd");
            let ours = cmd.windows(tag.len()).any(|w| w == &tag[..]);
            assert!(!(is_nbd && ours), "qemu-nbd still running: {:?}", e.path());
        }
    }
}

#[test]
fn foreign_format_without_qemu_img_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.qcow2");
    let mut b = vec![0u8; 4096];
    b[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&src, &b).unwrap();
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let dst = dir.path().join("x.asif");
    let o = Command::new(BIN)
        .args(["convert", s(&src), s(&dst)])
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "asiffs: {}: looks like a qcow2 image; converting it needs qemu-img (install qemu-utils)\n",
            src.display()
        )
    );
    assert!(!dst.exists());

    // A raw file is still converted without qemu-img.
    let raw = dir.path().join("in.raw");
    let disk = write_raw(&raw, 11 * MIB);
    let o = Command::new(BIN)
        .args(["convert", s(&raw), s(&dst)])
        .env("PATH", &empty)
        .output()
        .unwrap();
    ok(&o);
    same(&read_image(&dst), &disk);
}

fn check_json(p: &Path) -> serde_json::Value {
    let o = asiffs(&["check", "--json", s(p)]);
    ok(&o);
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn compact_after_discards_keeps_content_and_shrinks_the_container() {
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    let p = dir.path().join("c.asif");
    ok(&asiffs(&["create", "-s", &size.to_string(), s(&p)]));
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    let mut disk = pattern(size as usize, 42);
    img.write_at(&disk, 0).unwrap();
    // Deterministic "random" discards: whole chunks and pieces of chunks.
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for _ in 0..40 {
        let (off, len) = if next(2) == 0 {
            (next(48) * MIB, MIB * (1 + next(3)))
        } else {
            (next(size / 512) * 512, 512 * (1 + next(4096)))
        };
        let end = (off + len).min(size);
        img.discard(off, end - off).unwrap();
        disk[off as usize..end as usize].fill(0);
    }
    img.close().unwrap();
    let before = check_json(&p);
    assert_eq!(before["exit_code"], 0);
    let old_len = std::fs::metadata(&p).unwrap().len();
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let old_alloc = allocated(&p);
    assert!(before["free_chunks"].as_u64().unwrap() > 0, "{before}");

    let o = asiffs(&["compact", "--json", s(&p)]);
    ok(&o);
    assert_eq!(stderr(&o), "");
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let new_len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(r["old_file_size"], old_len);
    assert_eq!(r["new_file_size"], new_len);
    assert!(new_len < old_len, "{r}");
    // Host space, which the discards had mostly given back already.
    assert_eq!(
        r["bytes_reclaimed"],
        old_alloc.saturating_sub(allocated(&p)),
        "{r}"
    );
    assert!(r["chunks_moved"].as_u64().unwrap() > 0, "{r}");
    let after = check_json(&p);
    assert_eq!(after["exit_code"], 0, "{after}");
    assert_eq!(after["free_chunks"], 0, "{after}");
    assert_eq!(after["leaked_chunks"], 0, "{after}");
    assert_eq!(after["file_chunks"].as_u64().unwrap() * MIB, new_len);
    same(&read_image(&p), &disk);

    // Human output, on an already compact image.
    let o = asiffs(&["compact", s(&p)]);
    ok(&o);
    let r: serde_json::Value = {
        let o = asiffs(&["compact", "--json", s(&p)]);
        ok(&o);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    assert_eq!(r["chunks_moved"], 0);
    assert_eq!(r["old_file_size"], r["new_file_size"]);
    assert_eq!(
        stdout(&o),
        format!(
            "Reclaimed 0 bytes ({} -> {}).\n",
            asiffs::cli::size::human(new_len),
            asiffs::cli::size::human(new_len)
        )
    );
    same(&read_image(&p), &disk);
}

#[test]
fn compact_refuses_a_locked_image() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = make_image(dir.path(), "a.asif", 12 * MIB);
    let before = std::fs::read(&p).unwrap();
    let holder = Image::open(&p, &OpenOptions::default()).unwrap();
    let o = asiffs(&["compact", s(&p)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "asiffs: {}: image is in use by another process (locked)\n",
            p.display()
        )
    );
    drop(holder);
    assert!(std::fs::read(&p).unwrap() == before, "file changed");
}

//! `check`, `info` and the scan at a writable open use memory bounded
//! whatever the file's length: a valid image on a 15 TiB sparse file once
//! made `check` use 484 MiB. Its own test binary, so that the peak RSS it
//! reads belongs to this test alone.

use asiffs::{CreateOptions, Image, OpenOptions};

const MIB: u64 = 1 << 20;

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn a_15_tib_sparse_container_is_checked_in_bounded_memory() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("long.asif");
    let img = Image::create(
        &p,
        &CreateOptions {
            size: 20 << 40,
            ..Default::default()
        },
    )
    .unwrap();
    img.write_at(&[7u8; 4096], 3 << 40).unwrap();
    img.close().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(15 << 40).unwrap();
    drop(f);

    let before = peak_rss();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let r = img.check().unwrap();
    assert!(!r.is_corrupt(), "{:?}", r.corruptions);
    assert_eq!(r.file_chunks, (15 << 40) / MIB);
    assert_eq!(r.leaked_chunks, 0);
    assert_eq!(
        (r.data_chunks, r.partial_chunks),
        (2, 1),
        "ours and the metadata chunk"
    );
    assert_eq!(img.info().unwrap().data_chunks, 2);
    drop(img);

    // The scan of a writable open finds the 15 million free chunks and
    // hands out the lowest: chunk 6 for table 0, chunk 7 for its data
    // (0-3 are the header and metadata, 4-5 table 24 and its data).
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[8u8; 4096], 0).unwrap();
    assert_eq!(img.extents().unwrap()[0].offset, Some(7 * MIB));
    img.close().unwrap();
    let grown = peak_rss().saturating_sub(before);
    assert!(
        grown < 48 * MIB,
        "peak RSS grew by {} MiB for a 15 TiB container",
        grown / MIB
    );
}

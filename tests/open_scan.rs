//! The index scan of a writable open: chunks freed in an earlier session or
//! leaked by a crash are reused, and an image whose entries share a chunk
//! is served read-only, never written.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use asiffs::{Error, Image, OpenOptions};
use common::*;

/// Writable, with the scan inline or on its own thread.
fn open_rw(path: &Path, background: bool) -> Image {
    let opts = OpenOptions {
        scan_inline_tables: if background { 0 } else { usize::MAX },
        ..OpenOptions::writable()
    };
    Image::open(path, &opts).unwrap()
}

fn write_mib(img: &Image, from_mib: u64, count: u64, seed: u64) {
    for i in 0..count {
        img.write_at(&pattern(seed + i, MIB as usize), (from_mib + i) * MIB)
            .unwrap();
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Write 512 MiB, discard it, reopen, write 512 MiB elsewhere: the second
/// write reuses the chunks the first session freed.
#[test]
fn chunks_freed_in_an_earlier_session_are_reused() {
    for background in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let p = blank_image(d.path(), "reuse.asif", 4 << 30);
        let img = open_rw(&p, background);
        write_mib(&img, 0, 512, 1);
        img.flush().unwrap();
        img.discard(0, 512 * MIB).unwrap();
        img.close().unwrap();

        let img = open_rw(&p, background);
        write_mib(&img, 2048, 512, 7);
        img.close().unwrap();
        let len = file_len(&p);
        assert!(
            len <= 600 * MIB,
            "container grew to {} MiB (background scan: {background})",
            len / MIB
        );
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        for i in [0u64, 17, 511] {
            img.read_at(&mut buf, (2048 + i) * MIB).unwrap();
            assert!(buf == pattern(7 + i, MIB as usize), "chunk {i} differs");
            img.read_at(&mut buf, i * MIB).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "discarded chunk {i} reads data"
            );
        }
        let r = img.check().unwrap();
        assert!(!r.is_corrupt() && r.leaked_chunks == 0, "{r:?}");
    }
}

/// A chunk that holds bytes but that no entry names (a power cut after the
/// data, before the entry) is punched at the next writable open and then
/// handed out reading zeros.
#[test]
fn leaked_chunks_are_punched_and_reused() {
    let d = tempfile::tempdir().unwrap();
    let p = blank_image(d.path(), "leak.asif", 1 << 30);
    let img = open_rw(&p, false);
    write_mib(&img, 0, 1, 3);
    img.close().unwrap();
    // Two more chunks of junk past the last one used: leaked.
    let end = file_len(&p) / MIB;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0x5A; 4096], end * MIB + 8192).unwrap();
    f.write_all_at(&[0x5B; 512], (end + 1) * MIB).unwrap();
    f.set_len((end + 2) * MIB).unwrap();
    drop(f);
    let r = Image::open(&p, &OpenOptions::default())
        .unwrap()
        .check()
        .unwrap();
    assert_eq!(r.leaked_chunks, 2);

    let img = open_rw(&p, false);
    img.write_at(&[9u8; 512], 500 * MIB).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    img.read_at(&mut buf, 500 * MIB).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 9));
    assert!(buf[512..].iter().all(|&b| b == 0), "junk of a leaked chunk");
    img.close().unwrap();
    assert_eq!(file_len(&p), (end + 2) * MIB, "no chunk appended");
    let r = Image::open(&p, &OpenOptions::default())
        .unwrap()
        .check()
        .unwrap();
    assert!(!r.is_corrupt() && r.leaked_chunks == 0, "{r:?}");
}

/// Entry 2 of group 0 made to name entry 0's chunk.
fn shared_image(dir: &Path) -> PathBuf {
    let p = blank_image(dir, "shared.asif", 1 << 30);
    let img = open_rw(&p, false);
    write_mib(&img, 0, 2, 11);
    img.close().unwrap();
    let tc = read_u64(&p, dir_entry(active_dir(&p), 0));
    let e0 = read_u64(&p, data_entry(tc, 0, 0));
    write_u64(&p, data_entry(tc, 0, 2), e0);
    p
}

/// A write through one entry of a shared chunk would change what the other
/// reads: such an image is read but never written, and says why.
#[test]
fn an_image_whose_entries_share_a_chunk_is_served_read_only() {
    for background in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let p = shared_image(d.path());
        let before = sha256sum(&p);
        let img = open_rw(&p, background);
        let why = img.write_refusal().expect("writes must be refused");
        assert!(
            why.contains("table 0 group 0 entry 2 uses chunk")
                && why.contains("which another entry uses too"),
            "{why}"
        );
        assert!(!img.is_writable());
        let e = img.write_at(&[1u8; 512], 2 * MIB).unwrap_err();
        assert!(matches!(e, Error::WritesRefused { .. }), "{e}");
        assert_eq!(e.errno(), libc::EROFS);
        assert!(img.discard(0, MIB).is_err());
        assert!(img.resize(2 << 30).is_err());
        let mut buf = vec![0u8; 512];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, pattern(11, MIB as usize)[..512]);
        img.close().unwrap();
        assert_eq!(sha256sum(&p), before, "a refused image was written");
    }
}

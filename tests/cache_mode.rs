//! `CacheMode::None`: guest data goes to the container with O_DIRECT
//! (through aligned bounce buffers), unaligned requests through the page
//! cache, and both read back the same from either mode.

mod common;

use asiffs::{CacheMode, Image, OpenOptions};
use common::{blank_image, pattern, MIB};

fn open(path: &std::path::Path, cache: CacheMode, writable: bool) -> Image {
    let base = if writable {
        OpenOptions::writable()
    } else {
        OpenOptions::default()
    };
    Image::open(path, &OpenOptions { cache, ..base }).unwrap()
}

#[test]
fn direct_and_buffered_data_agree() {
    let d = tempfile::tempdir().unwrap();
    let p = blank_image(d.path(), "direct.asif", 1 << 30);

    // (offset, length): aligned, unaligned in memory and on disk, across a
    // chunk boundary, and a 512-byte sector inside an aligned block.
    let writes = [
        (0u64, 4096usize),
        (8192 + 512, 1000),
        (MIB - 4096, 3 * 4096 + 512),
        (5 * MIB, 2 * MIB as usize),
        (9 * MIB + 512, 512),
        (9 * MIB, 4096),
    ];
    let mut model = vec![0u8; 16 * MIB as usize];
    let img = open(&p, CacheMode::None, true);
    assert_eq!(img.stats().cache, "none");
    for (i, &(off, len)) in writes.iter().enumerate() {
        // Slice at an odd address, as a FUSE payload may be.
        let buf = pattern(i as u64, len + 1);
        img.write_at(&buf[1..], off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf[1..]);
    }
    let mut back = vec![0u8; model.len() + 1];
    img.read_at(&mut back[1..], 0).unwrap();
    assert!(back[1..] == model[..], "direct read differs");
    for &(off, len) in &writes {
        let mut b = vec![0u8; len];
        img.read_at(&mut b, off).unwrap();
        assert!(b[..] == model[off as usize..off as usize + len]);
    }
    img.close().unwrap();

    let img = open(&p, CacheMode::Writeback, false);
    assert_eq!(img.stats().cache, "writeback");
    let mut back = vec![0u8; model.len()];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == model, "buffered read after direct writes differs");
    let r = img.check().unwrap();
    assert!(!r.is_corrupt() && r.leaked_chunks == 0, "{r:?}");
}

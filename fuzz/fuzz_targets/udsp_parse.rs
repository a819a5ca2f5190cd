//! Arbitrary bytes as a whole `.sparseimage`. Opened read-only, the disk
//! is read (within a budget) and must match its extents; opened writable,
//! it takes a write, a discard, a flush and a compaction, and must read
//! back what was written and stay clean. Nothing may panic, hang or
//! allocate without bound.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use asiffs::asif::engine::memory::MemStorage;
use asiffs::udsp::SparseImage;
use asiffs::{LockMode, OpenOptions};
use libfuzzer_sys::fuzz_target;

mod common;
use common::Reads;

const DATA_BUDGET: u64 = 2 << 20;
const HOLE_BUDGET: u64 = 128 << 10;
/// Cap on the file's length, holes included.
const LIMIT: u64 = 64 << 20;

fn open(data: &[u8], writable: bool) -> Option<SparseImage> {
    let s = MemStorage::with_limit(data.to_vec(), LIMIT);
    let opts = OpenOptions {
        writable,
        lock: LockMode::None,
        ..OpenOptions::default()
    };
    SparseImage::from_storage(Path::new("fuzz.sparseimage"), Arc::new(s), &opts).ok()
}

fn read_all(img: &SparseImage) {
    assert_eq!(img.check().unwrap(), Vec::<String>::new(), "opened but not clean");
    let extents = img.extents().expect("extents of an open disk");
    common::read_extents(img, &extents, DATA_BUDGET, HOLE_BUDGET, Reads::MustSucceed);
    if img.size() > 0 {
        let hole = img.seek_hole(0).unwrap();
        assert!(hole <= img.size());
    }
    let _ = img.seek_data(0);
}

fn write_some(img: &SparseImage, pick: u64) {
    let size = img.size();
    if size == 0 {
        return;
    }
    let len = (1 + pick % 5000).min(size);
    let off = (pick >> 13) % (size - len + 1);
    let pattern: Vec<u8> = (0..len).map(|i| (i as u8 & 0x7F) | 0x80).collect();
    let discard_off = (pick >> 40) % size;
    // A hostile band size can ask for more than the store holds.
    if img.write_at(&pattern, off).is_err() || img.discard(discard_off, len / 2).is_err() {
        return;
    }
    img.flush().expect("flush");
    let zeroed = discard_off..discard_off.saturating_add(len / 2);
    let verify = |what: &str| {
        let mut back = vec![0u8; len as usize];
        img.read_at(&mut back, off).expect("reading back a write");
        for (i, (&b, &p)) in back.iter().zip(&pattern).enumerate() {
            let at = off + i as u64;
            let want = if zeroed.contains(&at) { 0 } else { p };
            assert_eq!(b, want, "byte {at:#x} {what}");
        }
        assert_eq!(img.check().unwrap(), Vec::<String>::new(), "unclean {what}");
    };
    verify("after a write and a discard");
    if img.compact(&mut |_, _| {}).is_ok() {
        verify("after compaction");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(img) = open(data, false) {
        read_all(&img);
    }
    let mut tail = [0u8; 8];
    let n = data.len().min(8);
    tail[..n].copy_from_slice(&data[data.len() - n..]);
    if let Some(img) = open(data, true) {
        write_some(&img, u64::from_be_bytes(tail));
    }
});

//! Arbitrary bytes as a container. Opened read-only as they are, the disk
//! is read (within a budget); zero-padded to whole chunks, it is also
//! opened writable for a small write, a discard, a flush and a check.
//! Nothing may panic, hang or allocate without bound, and an image that
//! checks clean must stay clean and read back what was written.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use asiffs::asif::engine::memory::MemStorage;
use asiffs::host::file::Storage;
use asiffs::asif::format::Header;
use asiffs::{Image, OpenOptions};
use libfuzzer_sys::fuzz_target;

mod common;
use common::Reads;

/// Virtual bytes read per open: a few chunks of data, a little of the holes.
const DATA_BUDGET: u64 = 4 << 20;
const HOLE_BUDGET: u64 = 256 << 10;
/// Cap on the container's length, holes included: growth asks for at
/// least 64 chunks at a time, and the tail costs nothing until written.
const LIMIT: u64 = 256 << 20;
/// Largest chunk size the padded opens are tried with; a write lands in
/// a new chunk and fills the store up to it.
const MAX_PAD_CHUNK: u64 = 1 << 20;

fn open(bytes: &[u8], len: u64, opts: &OpenOptions) -> Option<Image> {
    let s = MemStorage::with_limit(bytes.to_vec(), LIMIT);
    s.set_len(len).ok()?;
    Image::from_storage(Path::new("fuzz.asif"), Arc::new(s), opts).ok()
}

fn read_all(img: &Image) {
    let _ = img.info();
    let _ = img.metadata();
    let _ = img.check();
    let Ok(extents) = img.extents() else {
        // A bad entry somewhere: the start may still read.
        let mut b = vec![0u8; img.size().min(HOLE_BUDGET) as usize];
        let _ = img.read_at(&mut b, 0);
        return;
    };
    common::read_extents(img, &extents, DATA_BUDGET, HOLE_BUDGET, Reads::MayFail);
    let _ = img.seek_data(0);
    if img.size() > 0 {
        let _ = img.seek_hole(0);
    }
}

fn write_some(img: &Image, pick: u64) {
    let size = img.size();
    if size == 0 {
        return;
    }
    let clean = img.check().is_ok_and(|r| !r.is_corrupt());
    // Where, how much and what: from the input's tail. Never all zeros, so
    // that a write that went nowhere shows.
    let len = (1 + pick % 8192).min(size);
    let off = (pick >> 13) % (size - len + 1);
    let pattern: Vec<u8> = (0..len).map(|i| (i as u8 & 0x7F) | 0x80).collect();
    let wrote = img.write_at(&pattern, off).is_ok();
    let discard_off = (pick >> 40) % size;
    let discarded = img.discard(discard_off, len).is_ok();
    let flushed = img.flush().is_ok();
    let report = img.check();
    if !(clean && wrote && discarded && flushed) {
        return;
    }
    let report = report.expect("check after a clean write");
    assert!(
        !report.is_corrupt(),
        "a write made a clean image corrupt: {report:?}"
    );
    let mut back = vec![0u8; len as usize];
    img.read_at(&mut back, off).expect("reading back a write");
    let zeroed = discard_off..discard_off.saturating_add(len);
    for (i, (&b, &p)) in back.iter().zip(&pattern).enumerate() {
        let at = off + i as u64;
        let want = if zeroed.contains(&at) { 0 } else { p };
        assert_eq!(b, want, "byte {at:#x} after a write and a discard");
    }
}

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Some(img) = open(data, len, &OpenOptions::default()) {
        read_all(&img);
    }
    // Padding lets a seed leave out its trailing zeros, and a writable
    // open needs whole chunks.
    let Ok(h) = Header::decode(data) else {
        return;
    };
    let cs = u64::from(h.chunk_size);
    if cs == 0 || cs > MAX_PAD_CHUNK {
        return;
    }
    let padded = len.next_multiple_of(cs).max(cs);
    if padded != len {
        if let Some(img) = open(data, padded, &OpenOptions::default()) {
            read_all(&img);
        }
    }
    let mut tail = [0u8; 8];
    let n = data.len().min(8);
    tail[..n].copy_from_slice(&data[data.len() - n..]);
    if let Some(img) = open(data, padded, &OpenOptions::writable()) {
        write_some(&img, u64::from_be_bytes(tail));
        let _ = img.close();
    }
});

//! Arbitrary bytes as a whole `.dmg` in memory: parsed, and when it
//! parses, read (within a budget), walked, checked and, when it can be
//! written (no compressed runs), written. Nothing may panic, hang or allocate without bound;
//! holes must read as zeros and a write must read back.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use asiffs::disk::Disk;
use asiffs::asif::engine::memory::MemStorage;
use asiffs::udif::blkx::MAX_RUN_BYTES;
use asiffs::udif::Udif;
use libfuzzer_sys::fuzz_target;

mod common;
use common::Reads;

/// Virtual bytes read per open: some data, a little of the holes.
const DATA_BUDGET: u64 = 4 << 20;
const HOLE_BUDGET: u64 = 256 << 10;
/// `check` expands every compressed run: only when they add up to this.
const CHECK_BUDGET: u64 = 256 << 20;

/// Room for a write into a free run to take new space (a piece, a new
/// property list and trailer) beyond twice the input.
const GROWTH: u64 = 8 << 20;

fn open(data: &[u8], writable: bool) -> Option<Udif> {
    let limit = data.len() as u64 * 2 + GROWTH;
    let s = MemStorage::with_limit(data.to_vec(), limit);
    Udif::from_storage(Path::new("fuzz.dmg"), Arc::new(s), writable).ok()
}

fn read_all(u: &Udif) {
    let extents = u.extents().expect("extents of an open disk");
    common::read_extents(u, &extents, DATA_BUDGET, HOLE_BUDGET, Reads::MayFail);
    let _ = u.seek_data(0);
    if u.size() > 0 {
        let _ = u.seek_hole(0);
    }
    let expand: u64 = u
        .layout()
        .map
        .runs
        .iter()
        .filter(|r| r.kind.is_compressed())
        .map(|r| (r.sectors * 512).min(MAX_RUN_BYTES))
        .sum();
    if expand <= CHECK_BUDGET {
        let _ = u.check().map(|r| r.lines());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(u) = open(data, false) else {
        return;
    };
    read_all(&u);
    drop(u);
    let Some(w) = open(data, true) else {
        return;
    };
    let size = w.size();
    if !w.is_writable() || size == 0 {
        assert!(w.write_at(b"x", 0).is_err() || size == 0);
        return;
    }
    let len = 1 + (data.len() as u64 % 4096).min(size - 1);
    let off = (data.len() as u64 * 7919) % (size - len + 1);
    let pattern: Vec<u8> = (0..len).map(|i| (i as u8 & 0x7F) | 0x80).collect();
    match w.write_at(&pattern, off) {
        Ok(()) => {}
        // The tables of a hostile image may not fit the store's cap.
        Err(e) if e.errno() == libc::EFBIG => return,
        Err(e) => panic!("a write to a writable image: {e}"),
    }
    let mut back = vec![0u8; len as usize];
    w.read_at(&mut back, off).expect("reading back a write");
    assert_eq!(back, pattern, "a write did not read back");
    w.discard(off, len).expect("a discard");
    w.read_at(&mut back, off).expect("reading back a discard");
    assert!(back.iter().all(|&b| b == 0), "a discard left data");
    w.flush().expect("a flush");
});

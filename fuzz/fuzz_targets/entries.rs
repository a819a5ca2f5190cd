//! Table entries and bitmaps: every 8 bytes as a data entry and as a
//! bitmap entry, then the input as one chunk-group and its bitmap chunk.

#![no_main]

use asiffs::asif::format::{
    bitmap_span, BitmapEntry, ChunkEntry, ChunkState, SectorState, MAX_CHUNK_NUMBER,
};
use libfuzzer_sys::fuzz_target;

/// Data entries per group with 512-byte sectors (`N = 4 * bs`).
const N: usize = 2048;

fn entry_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(8 * i..8 * i + 8) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

fn one_entry(raw: u64) {
    let e = ChunkEntry(raw);
    match e.state() {
        Some(s) => {
            // A flush re-encodes entries it did not change.
            assert_eq!(ChunkEntry::encode(s), e);
            let n = match s {
                ChunkState::Full(n) | ChunkState::Partial(n) => Some(n),
                ChunkState::Unwritten | ChunkState::Unmapped => None,
            };
            assert_eq!(e.chunk(), n);
            assert!(n.is_none_or(|n| n > 0 && n <= MAX_CHUNK_NUMBER));
        }
        None => assert_eq!(e.chunk(), None),
    }
    match BitmapEntry(raw).chunk() {
        Ok(None) => assert_eq!(raw, 0),
        Ok(Some(n)) => assert!(n > 0 && n <= MAX_CHUNK_NUMBER),
        Err(_) => assert!(raw > MAX_CHUNK_NUMBER),
    }
}

fuzz_target!(|data: &[u8]| {
    for i in 0..data.len() / 8 {
        one_entry(entry_at(data, i));
    }
    let Some((&spc, group)) = data.split_first() else {
        return;
    };
    // Sectors per chunk: real chunks have 2048; a few keep inputs small.
    let spc = u64::from(spc % 64) + 1;
    let bitmap = group.get(8 * (N + 1)..).unwrap_or(&[]);
    // Sector states matter only for partial chunks of a group with a bitmap.
    if !matches!(BitmapEntry(entry_at(group, N)).chunk(), Ok(Some(_))) {
        return;
    }
    for k in 0..N {
        let entry = ChunkEntry(entry_at(group, k));
        if !matches!(entry.state(), Some(ChunkState::Partial(_))) {
            continue;
        }
        // The same walk as the engine: the bytes for this chunk's sectors.
        let first = k as u64 * spc;
        let span = bitmap_span(first, spc);
        assert!(span.end - span.start <= spc / 4 + 2);
        for s in first..first + spc {
            assert!(span.contains(&(s / 4)));
            let byte = bitmap.get((s / 4) as usize).copied().unwrap_or(0);
            match SectorState::from_byte(byte, s % 4) {
                SectorState::Unknown(v) => assert!(v == 2 || v == 3),
                SectorState::Unwritten | SectorState::Written => {}
            }
        }
    }
});

//! What the targets that open a whole container do with a disk that
//! opened; each such target takes it in with `mod common;`.

// Compiled into each target apart, and no target uses all of it.
#![allow(dead_code)]

use asiffs::disk::Disk;
use asiffs::asif::engine::Extent;

/// Whether a read inside the disk may fail (a corrupt compressed run) or
/// must succeed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    MayFail,
    MustSucceed,
}

/// Zeros to compare holes with, a slice at a time: comparing byte by
/// byte under coverage tracing made hole checks the slowest part of a run.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Checks that `extents` tile the disk, then reads up to `data` bytes of
/// its data and `holes` bytes of its holes, in extent order; a hole that
/// reads must read as zeros.
pub fn read_extents(d: &dyn Disk, extents: &[Extent], data: u64, holes: u64, reads: Reads) {
    let mut at = 0;
    for e in extents {
        assert_eq!(e.start, at, "extents leave a gap or overlap");
        at += e.length;
    }
    assert_eq!(at, d.size(), "extents do not cover the disk");
    let (mut data, mut holes) = (data, holes);
    let mut buf = Vec::new();
    for e in extents {
        let budget = if e.data { &mut data } else { &mut holes };
        let n = e.length.min(*budget);
        *budget -= n;
        if n == 0 {
            continue;
        }
        buf.clear();
        buf.resize(n as usize, 0xA5);
        let read = d.read_at(&mut buf, e.start);
        if reads == Reads::MustSucceed {
            read.expect("reading inside the disk");
        } else if read.is_err() {
            continue;
        }
        if !e.data {
            assert!(
                buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()]),
                "hole at {:#x} reads as data",
                e.start
            );
        }
    }
}

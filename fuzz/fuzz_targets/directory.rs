//! Directory decode and encode, and the choice of the active one.

#![no_main]

use asiffs::asif::format::Directory;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Two bytes pick the entry count, kept within what the rest holds:
    // decode relies on the geometry for that, as the engine does.
    let [a, b, rest @ ..] = data else {
        return;
    };
    let Some(room) = (rest.len() / 8).checked_sub(1) else {
        return;
    };
    let entries = usize::from(u16::from_be_bytes([*a, *b])).min(room);
    let d = Directory::decode(rest, entries as u64);
    assert_eq!(d.tables.len(), entries);
    // A flush writes back what was read: the bytes must not change.
    let len = 8 * (entries + 1);
    assert_eq!(d.encode(len), &rest[..len]);

    let other = d.tables.first().copied().unwrap_or(0);
    let active = Directory::active([d.version, other]);
    assert_eq!(active, usize::from(other > d.version));
});

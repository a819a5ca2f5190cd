//! A sparse bundle's Info.plist: decode, then what the translator builds on
//! a plist that passed (band arithmetic, the rewrite a resize does).

#![no_main]

use asiffs::udsb::info::{self, Info, MAX_BAND_SIZE, MAX_SIZE, SECTOR};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Band names come from directory listings: any short string.
    if let Some(n) = std::str::from_utf8(data).ok().and_then(info::parse_band_name) {
        assert_eq!(info::band_name(n).as_bytes(), data);
    }
    let Ok(i) = Info::decode(data) else {
        return;
    };
    assert!(i.band_size >= SECTOR && i.band_size <= MAX_BAND_SIZE);
    assert_eq!(i.band_size % SECTOR, 0);
    assert!(i.size <= MAX_SIZE);
    // The end of the last band, and of every offset in it, fits.
    let ends = i.band_count().checked_mul(i.band_size).expect("band end overflows");
    assert!(ends >= i.size && ends < i64::MAX as u64);
    // A resize rewrites the plist: it must read back the same.
    let again = Info::decode(&i.encode()).expect("our own plist decodes");
    assert_eq!((again.band_size, again.size), (i.band_size, i.size));
    assert_eq!(again.encode(), i.encode());
    let grown = i.with_size(MAX_SIZE).expect("any size up to the limit");
    assert_eq!(Info::decode(&grown.encode()).map(|g| g.size), Ok(MAX_SIZE));
});

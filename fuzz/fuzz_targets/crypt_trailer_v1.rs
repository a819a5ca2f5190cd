//! Arbitrary bytes as a `cdsaencr` trailer, then Apple's key unwrap of its
//! wrapped keys (iterations cut to one): keys of the declared sizes or
//! "wrong password", never a panic.

#![no_main]

use asiffs::host::crypt::keys;
use asiffs::host::crypt::trailer_v1::TrailerV1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = TrailerV1::decode(data) else {
        return;
    };
    assert!(t.block_size.is_power_of_two());
    let fast = TrailerV1 { iterations: 1, ..t };
    match keys::unwrap_v1(&fast, b"vilefault") {
        Ok(k) => assert_eq!(k.aes.len(), fast.key_bits as usize / 8),
        Err(e) => assert_eq!(e.to_string(), "wrong password"),
    }
});

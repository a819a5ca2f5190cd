//! Arbitrary bytes as a password key blob: decoded, re-encoded, and
//! unwrapped with a password (iterations cut to one so that a run stays
//! fast; the cap itself is tested in tests/crypt.rs). The unwrap must give
//! keys of the header's size or "wrong password", never panic.

#![no_main]

use asiffs::host::crypt::header_v2::PasswordBlob;
use asiffs::host::crypt::keys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(blob) = PasswordBlob::decode(data) else {
        return;
    };
    let mut buf = vec![0u8; data.len()];
    blob.encode_into(&mut buf);
    assert_eq!(PasswordBlob::decode(&buf).ok(), Some(blob.clone()));
    let fast = PasswordBlob {
        iterations: 1,
        ..blob
    };
    for bits in [128, 256] {
        match keys::unwrap_v2(&fast, bits, b"vilefault") {
            Ok(k) => assert_eq!(k.aes.len(), bits as usize / 8),
            Err(e) => assert_eq!(e.to_string(), "wrong password"),
        }
    }
});

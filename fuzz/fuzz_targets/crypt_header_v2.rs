//! Arbitrary bytes as the start of an `encrcdsa` file: the header, its
//! key-pointer table and the password key blob. What decodes must encode
//! back to what decodes the same, and every pointer must lie in the header.

#![no_main]

use asiffs::host::crypt::header_v2::HeaderV2;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = HeaderV2::decode(data) else {
        return;
    };
    let table_end = 76 + 20 * h.key_pointers.len() as u64;
    for p in &h.key_pointers {
        assert!(p.offset >= table_end && p.offset + p.size <= h.data_offset);
    }
    let mut buf = vec![0u8; table_end as usize];
    h.encode_into(&mut buf);
    assert_eq!(HeaderV2::decode(&buf).ok(), Some(h.clone()));
    if let Ok((h2, blob)) = HeaderV2::decode_with_blob(data) {
        assert_eq!(h2, h);
        assert!(blob.encrypted.len() % 8 == 0 && !blob.encrypted.is_empty());
    }
});

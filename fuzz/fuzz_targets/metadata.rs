//! The metadata chunk: `meta` header and XML property list.

#![no_main]

use asiffs::asif::format::{Metadata, META_HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

/// The decoder's cap on the property list (private to it).
const MAX_PLIST: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Metadata::decode(data) else {
        return;
    };
    // Changing user metadata rewrites the chunk: what we accepted must
    // read back, as long as it still fits under the decoder's cap.
    let b = m.encode(512);
    if b.len() - META_HEADER_SIZE < MAX_PLIST {
        let again = Metadata::decode(&b).expect("re-encoded metadata must decode");
        assert_eq!(again.stable_uuid, m.stable_uuid);
    }
});

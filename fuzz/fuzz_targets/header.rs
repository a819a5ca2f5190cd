//! Header decode and geometry validation, then the offset arithmetic the
//! engine builds on a geometry that passed.

#![no_main]

use asiffs::asif::format::{Geometry, Header, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::decode(data) else {
        return;
    };
    // A resize rewrites the header: what we read must survive that.
    assert_eq!(Header::decode(&h.encode()), Ok(h.clone()));
    let _ = h.size();
    let _ = Geometry::directory_bytes_for(&h);
    let Ok(g) = Geometry::new(&h) else {
        return;
    };

    // The engine reads directories and groups without further checks.
    for o in g.directory_offsets {
        assert!(o >= HEADER_SIZE as u64 && o + g.directory_bytes <= g.chunk_size);
    }
    assert!(8 * (g.directory_entries + 1) <= g.directory_bytes);
    assert!(g.groups_per_table * g.group_bytes <= g.chunk_size);
    assert!(g.size <= g.size_limit() && g.size_limit() <= g.max_size);

    // The ends of the disk, the metadata chunk, and an offset the input picks.
    let picked = data
        .get(HEADER_SIZE..HEADER_SIZE + 8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
    let probes = [
        0,
        g.size.saturating_sub(1),
        g.size_limit().saturating_sub(1),
        g.metadata_offset,
        g.max_size - 1,
        picked % g.max_size,
    ];
    for off in probes {
        let loc = g.locate(off);
        assert!(loc.table < g.directory_entries);
        assert!(loc.group < g.groups_per_table && loc.index < g.entries_per_group);
        assert!(loc.within < g.chunk_size);
        let n = g.group_number(&loc);
        assert_eq!(
            g.group_start(n) + loc.index * g.chunk_size + loc.within,
            off,
            "locate and group_start disagree"
        );
        let entry = g.group_offset_in_table(loc.group) + g.entry_offset_in_group(loc.index);
        assert!(entry + 8 <= g.chunk_size);
        assert!(
            g.group_offset_in_table(loc.group) + g.bitmap_entry_offset_in_group() + 8
                <= g.chunk_size
        );
    }
    let m = g.metadata_location();
    assert_eq!(m, g.locate(g.metadata_offset));
    assert_eq!(
        g.group_span(),
        g.sectors_per_chunk() * g.block_size * g.entries_per_group
    );
});

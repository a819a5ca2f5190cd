//! The library against the real images macOS made (`../shared/vectors`):
//! what they read as, what our fresh images look like next to them, and
//! writes into a real image and into a hand-made partially valid chunk.
//!
//! Offsets below come from `../shared/asif-spec.md` (sections in comments).

mod common;

use std::fs;
use std::path::Path;

use asiffs::{CreateOptions, Extent, Image, OpenOptions};
use common::*;

fn open_ro(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn open_rw(path: &Path) -> Image {
    Image::open(path, &OpenOptions::writable())
        .unwrap_or_else(|e| panic!("opening {} for writing: {e}", path.display()))
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xEEu8; len];
    img.read_at(&mut b, off)
        .unwrap_or_else(|e| panic!("read_at({off:#x}, {len:#x}): {e}"));
    b
}

#[track_caller]
fn assert_clean(img: &Image) -> asiffs::asif::engine::CheckReport {
    let r = img.check().expect("check runs");
    assert!(r.corruptions.is_empty(), "corruptions: {:?}", r.corruptions);
    assert_eq!(r.corruptions_not_listed, 0);
    assert_eq!(r.leaked_chunks, 0, "leaked chunks: {r:?}");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    r
}

// ---------------------------------------------------------------------------
// Blank images made by `diskutil image create blank --format ASIF`.

#[test]
fn blank_vectors_read_as_empty_disks() {
    let blanks = blank_vectors();
    assert_eq!(blanks.len(), 19, "the README lists 19 blank images");
    let tmp = tempfile::tempdir().unwrap();
    for (name, size) in blanks {
        let path = decompress(&name, tmp.path());
        let before = fs::read(&path).unwrap();
        assert_eq!(
            before.len() as u64,
            4 * MIB,
            "{name}: a fresh image is 4 chunks"
        );
        {
            let img = open_ro(&path);
            assert_eq!(img.size(), size, "{name}: size");
            // Spec §4: a fresh image has A = version 0, B = version 1.
            assert_eq!(img.active_directory(), (1, 1), "{name}");
            assert_eq!(
                img.extents().unwrap(),
                vec![Extent {
                    start: 0,
                    length: size,
                    data: false,
                    offset: None
                }],
                "{name}: extents"
            );
            assert_eq!(img.seek_data(0).unwrap(), None, "{name}: seek_data(0)");
            assert_eq!(img.seek_data(size / 2).unwrap(), None, "{name}");
            assert_eq!(img.seek_hole(0).unwrap(), 0, "{name}: seek_hole(0)");
            assert_eq!(img.seek_hole(size - 1).unwrap(), size - 1, "{name}");
            for (off, len) in [
                (0, 64 << 10),
                (size / 2 - 1000, 3 * MIB as usize),
                (size - 4096, 4096),
                (size - 1, 1),
            ] {
                assert!(
                    read(&img, off, len).iter().all(|&b| b == 0),
                    "{name}: {off:#x}+{len:#x} is not zeros"
                );
            }
            // One byte past the end is refused, not read.
            let mut one = [0u8; 1];
            assert!(
                img.read_at(&mut one, size).is_err(),
                "{name}: read past the end"
            );

            let r = assert_clean(&img);
            // Spec §4 table: chunk 0 header, 1 metadata table, 2 metadata
            // (partially valid data chunk), 3 its group's bitmap.
            assert_eq!(r.file_chunks, 4, "{name}");
            assert_eq!(r.tables, 1, "{name}");
            assert_eq!(r.bitmap_chunks, 1, "{name}");
            assert_eq!((r.data_chunks, r.partial_chunks), (1, 1), "{name}");
            assert_eq!(r.free_chunks, 0, "{name}");

            let info = img.info().unwrap();
            assert_eq!(info.virtual_size, size);
            assert_eq!((info.chunk_size, info.block_size), (MIB, SECTOR));
            assert_eq!(info.partial_chunks, 1, "{name}");

            // The stable uuid as the plist holds it (spec §5: plist at
            // chunk 2 + 0x200), compared with what the library decodes.
            let (_, want) = plist_stable_uuid(&before, 0x200200);
            let got = img.metadata().unwrap().stable_uuid;
            assert!(is_lower_uuid(&got), "{name}: stable uuid {got:?}");
            assert_eq!(got, want, "{name}");
        }
        assert!(
            fs::read(&path).unwrap() == before,
            "{name}: reading changed the file"
        );
        fs::remove_file(&path).unwrap();
    }
}

/// Our fresh image against macOS's: byte for byte except the header uuid
/// (0x20..0x30), the sector count (0x30..0x38) and the plist's stable uuid.
#[test]
fn fresh_images_match_apple_blank_images() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "apple-blank-10GB.asif",
        "apple-blank-15GB.asif",
        "apple-blank-1500GB.asif",
        "apple-blank-10000GB.asif",
    ] {
        let size = parse_gb(
            name.strip_prefix("apple-blank-")
                .and_then(|s| s.strip_suffix(".asif"))
                .unwrap(),
        );
        let apple = fs::read(decompress(name, tmp.path())).unwrap();
        let ours_path = tmp.path().join(format!("ours-{name}"));
        let img = Image::create(
            &ours_path,
            &CreateOptions {
                size,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(img.size(), size);
        let stable = img.metadata().unwrap().stable_uuid;
        drop(img);
        let ours = fs::read(&ours_path).unwrap();
        assert_eq!(ours.len(), apple.len(), "{name}: container length");
        assert_eq!(ours.len() as u64, 4 * MIB);

        // Sector count: size / 512 in both.
        assert_eq!(
            be_u64(&apple, 0x30),
            size / 512,
            "{name}: vector sector count"
        );
        assert_eq!(be_u64(&ours, 0x30), size / 512, "{name}: our sector count");
        // Header uuid: random, so only its presence is checked.
        assert_ne!(&ours[0x20..0x30], &[0u8; 16], "{name}: header uuid is zero");

        // Stable uuid: same place in both plists, ours matches metadata().
        let (at_a, uuid_a) = plist_stable_uuid(&apple, 0x200200);
        let (at_o, uuid_o) = plist_stable_uuid(&ours, 0x200200);
        assert_eq!(at_o, at_a, "{name}: stable uuid offset");
        assert!(is_lower_uuid(&uuid_o), "{name}: our stable uuid {uuid_o:?}");
        assert_eq!(uuid_o, stable);
        assert_ne!(uuid_o, uuid_a);
        let header_uuid = uuid::Uuid::from_slice(&ours[0x20..0x30]).unwrap();
        assert_ne!(
            header_uuid.hyphenated().to_string(),
            uuid_o,
            "{name}: header uuid must not be the stable uuid"
        );

        let mask = |b: &[u8]| {
            let mut b = b.to_vec();
            b[0x20..0x38].fill(0);
            b[at_a..at_a + 36].fill(0);
            b
        };
        assert_same_bytes(name, &mask(&ours), &mask(&apple));
    }
}

// ---------------------------------------------------------------------------
// apple-basic: logical chunk i (i < 255) is all byte i, the rest zeros.

const BASIC_SIZE: u64 = 512_000_000;
const BASIC_DATA: u64 = 255 * MIB;

/// Reads the whole disk in 1 MiB steps and compares every byte with
/// `expect(offset, buffer)`, which fills in what the disk should hold.
fn verify_disk(img: &Image, expect: impl Fn(u64, &mut [u8])) {
    let size = img.size();
    let mut got = vec![0u8; MIB as usize];
    let mut want = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size {
        let n = MIB.min(size - at) as usize;
        img.read_at(&mut got[..n], at).unwrap();
        expect(at, &mut want[..n]);
        if got[..n] != want[..n] {
            let i = first_difference(&got[..n], &want[..n]).unwrap();
            panic!(
                "disk byte {:#x}: got {:#04x}, want {:#04x}",
                at + i as u64,
                got[i],
                want[i]
            );
        }
        at += n as u64;
    }
}

/// The README's pattern for 1 MiB-aligned `at`.
fn basic_pattern(at: u64, buf: &mut [u8]) {
    let i = at / MIB;
    buf.fill(if i < 255 { i as u8 } else { 0 });
}

#[test]
fn apple_basic_reads_as_the_readme_says() {
    let tmp = tempfile::tempdir().unwrap();
    let path = decompress("apple-basic.asif", tmp.path());
    let img = open_ro(&path);
    assert_eq!(img.size(), BASIC_SIZE);
    assert_eq!(img.active_directory(), (0, 2), "active A, version 2");
    assert_eq!(
        img.metadata().unwrap().stable_uuid,
        "13db9632-b79f-4e95-aada-835d5ef97bba"
    );

    verify_disk(&img, basic_pattern);

    // Unaligned reads across chunk boundaries.
    let b = read(&img, 3 * MIB - 5, 10);
    assert_eq!(b, [2, 2, 2, 2, 2, 3, 3, 3, 3, 3]);
    let b = read(&img, BASIC_DATA - 2, 4);
    assert_eq!(b, [254, 254, 0, 0]);
    let b = read(&img, BASIC_SIZE - 3, 3);
    assert_eq!(b, [0, 0, 0]);

    // README layout: chunk 5 holds logical chunk 0, chunks 7-260 hold
    // logical chunks 1-254 (chunk 6 is group 0's bitmap).
    assert_eq!(
        img.extents().unwrap(),
        vec![
            Extent {
                start: 0,
                length: MIB,
                data: true,
                offset: Some(5 * MIB)
            },
            Extent {
                start: MIB,
                length: 254 * MIB,
                data: true,
                offset: Some(7 * MIB)
            },
            Extent {
                start: BASIC_DATA,
                length: BASIC_SIZE - BASIC_DATA,
                data: false,
                offset: None
            },
        ]
    );
    assert_eq!(img.seek_data(0).unwrap(), Some(0));
    assert_eq!(img.seek_data(100 * MIB + 5).unwrap(), Some(100 * MIB + 5));
    assert_eq!(img.seek_data(BASIC_DATA).unwrap(), None);
    assert_eq!(img.seek_hole(0).unwrap(), BASIC_DATA);
    assert_eq!(img.seek_hole(BASIC_DATA - 1).unwrap(), BASIC_DATA);
    assert_eq!(img.seek_hole(BASIC_SIZE - 1).unwrap(), BASIC_SIZE - 1);
    assert!(img.seek_hole(BASIC_SIZE).is_err());

    let info = img.info().unwrap();
    assert_eq!(info.partial_chunks, 1, "the metadata entry is partial (11)");
    // 255 data chunks plus the metadata chunk.
    assert_eq!(info.data_chunks, 256);
    assert_eq!(info.tables, 2);
    assert_eq!(info.active_directory, 'A');
    assert_eq!(info.directory_version, 2);
    assert_eq!(
        info.stable_uuid.as_deref(),
        Some("13db9632-b79f-4e95-aada-835d5ef97bba")
    );

    let r = assert_clean(&img);
    assert_eq!(r.file_chunks, 261);
    assert_eq!(r.tables, 2);
    assert_eq!((r.data_chunks, r.partial_chunks), (256, 1));
    assert_eq!(r.bitmap_chunks, 2);
    assert_eq!(r.free_chunks, 0);
}

/// Writes, a discard and a write into fresh space of a real image survive a
/// reopen, and every other byte keeps the README's pattern.
#[test]
fn writes_into_apple_basic_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let path = decompress("apple-basic.asif", tmp.path());

    // (offset, bytes) in the order written; later writes win.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        // Three whole sectors inside logical chunk 3.
        (3 * MIB + 10 * SECTOR, pattern(1, 3 * SECTOR as usize)),
        // Unaligned, inside chunk 3.
        (3 * MIB + 100_001, pattern(2, 777)),
        // Previously zero, across the boundary of chunks 299 and 300.
        (300 * MIB - 1000, pattern(3, 5000)),
        // The last bytes of the disk (chunk 488 is the short last chunk).
        (BASIC_SIZE - 100, pattern(4, 100)),
        // Straddling the end of the data (chunk 254 -> 255).
        (BASIC_DATA - 10, pattern(5, 20)),
    ];
    let discarded = 7 * MIB..8 * MIB;
    {
        let img = open_rw(&path);
        for (off, b) in &writes {
            img.write_at(b, *off).unwrap();
        }
        img.discard(discarded.start, discarded.end - discarded.start)
            .unwrap();
        // Out of range writes are refused and change nothing.
        assert!(img.write_at(&[1, 2], BASIC_SIZE - 1).is_err());
        img.flush().unwrap();
        img.close().unwrap();
    }
    let img = open_ro(&path);
    let expect = |at: u64, buf: &mut [u8]| {
        basic_pattern(at, buf);
        let end = at + buf.len() as u64;
        if at < discarded.end && discarded.start < end {
            buf.fill(0);
        }
        for (off, b) in &writes {
            let (s, e) = (*off, *off + b.len() as u64);
            if s < end && at < e {
                let from = s.max(at);
                let to = e.min(end);
                buf[(from - at) as usize..(to - at) as usize]
                    .copy_from_slice(&b[(from - s) as usize..(to - s) as usize]);
            }
        }
    };
    verify_disk(&img, expect);
    assert_eq!(
        img.metadata().unwrap().stable_uuid,
        "13db9632-b79f-4e95-aada-835d5ef97bba"
    );
    assert_eq!(img.size(), BASIC_SIZE);
    assert_clean(&img);

    // Data now: 0..7M, 8M..256M (chunk 255 got the straddling write),
    // 299M..301M, 488M..end.
    assert_eq!(img.seek_hole(0).unwrap(), 7 * MIB);
    assert_eq!(img.seek_data(7 * MIB).unwrap(), Some(8 * MIB));
    assert_eq!(img.seek_hole(8 * MIB).unwrap(), 256 * MIB);
    assert_eq!(img.seek_data(256 * MIB).unwrap(), Some(299 * MIB));
    assert_eq!(img.seek_hole(299 * MIB).unwrap(), 301 * MIB);
    assert_eq!(img.seek_data(301 * MIB).unwrap(), Some(488 * MIB));
    assert_eq!(img.seek_hole(488 * MIB).unwrap(), BASIC_SIZE);
}

// ---------------------------------------------------------------------------
// A partially valid (state 11) chunk holding stale bytes, made by hand.

/// Builds, inside a fresh 1 GiB image, logical chunk 5 as macOS can leave
/// it: entry `11` pointing at a chunk full of non-zero garbage whose bitmap
/// marks only sectors 0..3 written. Returns the garbage.
///
/// Raw edits (spec §2-§4), after growing the file from 4 to 7 chunks:
/// - chunk 4 = table 0: data entry g=0 k=5 at 4M + 8*5 = `C000000000000005`
///   (partial, chunk 5); group 0's bitmap entry at 4M + 8*2048 = 6;
/// - chunk 5 = the data: 1 MiB of non-zero garbage;
/// - chunk 6 = group 0's bitmap: sector s of the group is byte s/4, bits
///   (s%4)*2. Logical chunk 5 starts at group sector 5*2048, so byte 2560 =
///   0x55 marks its sectors 0..3 written. Bytes 2048..2560 (chunk 4, whose
///   entry is 00) are also 0x55: stale bits that must be ignored;
/// - the active directory (B, version 1, spec §4) entry 0 at 0x41408 = 4.
fn make_partial_chunk(path: &Path) -> Vec<u8> {
    let img = Image::create(
        path,
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )
    .unwrap();
    drop(img);
    assert_eq!(active_dir(path), DIR_B);
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(7 * MIB)
        .unwrap();
    write_u64(path, data_entry(4, 0, 5), PARTIAL | 5);
    write_u64(path, bitmap_entry(4, 0), 6);
    let garbage = pattern(99, MIB as usize);
    write_bytes(path, 5 * MIB, &garbage);
    write_bytes(path, 6 * MIB + 2048, &[0x55; 512]);
    write_bytes(path, 6 * MIB + 2560, &[0x55]);
    write_u64(path, dir_entry(DIR_B, 0), 4);
    garbage
}

const P: u64 = 5 * MIB; // logical start of the partial chunk

#[test]
fn partial_chunk_reads_only_written_sectors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("partial.asif");
    let garbage = make_partial_chunk(&path);
    let img = open_ro(&path);
    let got = read(&img, P, MIB as usize);
    let mut want = vec![0u8; MIB as usize];
    want[..2048].copy_from_slice(&garbage[..2048]);
    assert_same_bytes("partial chunk", &got, &want);
    // Unaligned read straddling the written/unwritten border.
    assert_eq!(read(&img, P + 2040, 16), {
        let mut w = garbage[2040..2048].to_vec();
        w.extend([0; 8]);
        w
    });
    // Chunk 4 has stale bitmap bits but entry 00: zeros.
    assert!(read(&img, 4 * MIB, MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(
        img.extents().unwrap(),
        vec![
            Extent {
                start: 0,
                length: P,
                data: false,
                offset: None
            },
            Extent {
                start: P,
                length: 2048,
                data: true,
                offset: Some(5 * MIB)
            },
            Extent {
                start: P + 2048,
                length: (1 << 30) - P - 2048,
                data: false,
                offset: None
            },
        ]
    );
    assert_eq!(img.seek_data(0).unwrap(), Some(P));
    assert_eq!(img.seek_hole(P).unwrap(), P + 2048);
    assert_eq!(img.seek_data(P + 2048).unwrap(), None);
    let r = assert_clean(&img);
    assert_eq!((r.tables, r.data_chunks, r.partial_chunks), (2, 2, 2));
    assert_eq!((r.bitmap_chunks, r.file_chunks, r.free_chunks), (2, 7, 0));
}

#[test]
fn writing_into_a_partial_chunk_never_resurfaces_stale_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("partial.asif");
    let garbage = make_partial_chunk(&path);
    let new = pattern(7, SECTOR as usize);
    let mut want = vec![0u8; MIB as usize];
    want[..2048].copy_from_slice(&garbage[..2048]);
    want[100 * 512..101 * 512].copy_from_slice(&new);
    {
        let img = open_rw(&path);
        img.write_at(&new, P + 100 * SECTOR).unwrap();
        let got = read(&img, P, MIB as usize);
        assert_same_bytes("before flush", &got, &want);
        img.close().unwrap();
    }
    let img = open_ro(&path);
    assert_same_bytes("after reopen", &read(&img, P, MIB as usize), &want);
    assert_clean(&img);
    drop(img);

    // What another reader (macOS) sees must agree: either the entry is
    // still 11 with an exact bitmap, or it is 01 and the stale bytes are
    // gone from the container.
    let tc = read_u64(&path, dir_entry(active_dir(&path), 0));
    let entry = read_u64(&path, data_entry(tc, 0, 5));
    let chunk = entry & CHUNK_MASK;
    let file = fs::read(&path).unwrap();
    let on_disk = &file[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize];
    match entry >> 62 {
        0b01 => assert_same_bytes("chunk behind a 01 entry", on_disk, &want),
        0b11 => {
            let bm = read_u64(&path, bitmap_entry(tc, 0));
            let bits = &file[(bm * MIB + 2560) as usize..(bm * MIB + 3072) as usize];
            for s in 0..2048usize {
                let st = (bits[s / 4] >> ((s % 4) * 2)) & 3;
                let written = s < 4 || s == 100;
                assert_eq!(st, written as u8, "bitmap state of sector {s}");
                if written {
                    assert_eq!(
                        &on_disk[s * 512..s * 512 + 512],
                        &want[s * 512..s * 512 + 512]
                    );
                }
            }
        }
        s => panic!("entry {entry:#018x} has state {s:#b}"),
    }
}

/// Discarding part of a partial chunk keeps the rest exact too.
#[test]
fn partial_discard_of_a_partial_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("partial.asif");
    let garbage = make_partial_chunk(&path);
    {
        let img = open_rw(&path);
        img.discard(P + 512, 1024).unwrap();
        img.close().unwrap();
    }
    let img = open_ro(&path);
    let mut want = vec![0u8; MIB as usize];
    want[..512].copy_from_slice(&garbage[..512]);
    want[1536..2048].copy_from_slice(&garbage[1536..2048]);
    assert_same_bytes("after discard", &read(&img, P, MIB as usize), &want);
    assert_clean(&img);
}

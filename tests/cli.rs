//! The `asiffs` binary: create, info, map, check and convert, on real
//! images, on our own, and on damaged ones built by patching bytes at
//! offsets taken from `../shared/asif-spec.md` (sections in comments).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

const BASIC_SHA256: &str = "fc6505543ff7fe23cd82f71378a79217cecff7cf3d3d67130dd5aa9f78efacb6";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `asiffs create FILE -s SIZE`, which must succeed.
fn create(path: &Path, size: &str) {
    let r = run(["create", s(path), "-s", size]);
    assert_eq!(r.code, 0, "create {size}: {r:?}");
}

#[track_caller]
fn assert_one_error_line(r: &Run, what: &str, needle: &str) {
    assert!(!r.stderr.contains("panicked"), "{what}: panic\n{r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: want one stderr line\n{r:?}");
    assert!(
        lines[0].starts_with("asiffs: "),
        "{what}: stderr must start with 'asiffs: '\n{r:?}"
    );
    assert!(
        lines[0].contains(needle),
        "{what}: stderr must mention {needle:?}\n{r:?}"
    );
}

// ---------------------------------------------------------------------------
// create

#[test]
fn create_refuses_an_existing_file_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.asif");
    fs::write(&path, b"precious").unwrap();
    let r = run(["create", s(&path), "-s", "1G"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_one_error_line(&r, "create over a file", "file exists");
    assert!(r.stderr.contains(s(&path)), "names the file: {r:?}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");

    let r = run(["create", s(&path), "-s", "1G", "--force"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(fs::metadata(&path).unwrap().len(), 4 * MIB);
    let r = run(["info", "--json", s(&path)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["virtual_size"], 1u64 << 30);
    // No temporary file is left beside it.
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["x.asif"], "directory holds {names:?}");

    // A directory is never replaced, even with --force.
    let d = tmp.path().join("d.asif");
    fs::create_dir(&d).unwrap();
    let r = run(["create", s(&d), "-s", "1G", "--force"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_one_error_line(&r, "create over a directory", "not a regular file");
    assert!(d.is_dir());
}

#[test]
fn create_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    for (arg, bytes) in [
        ("64G", 64u64 << 30),
        ("10GB", 10_000_000_000),
        ("1.5M", 1_572_864),
        ("4096", 4096),
        // The largest disk: it must end below the metadata chunk (4 PiB - 1 MiB).
        ("4503599626321920", MAX_VIRTUAL),
    ] {
        let p = tmp.path().join(format!("{arg}.asif"));
        create(&p, arg);
        let r = run(["info", "--json", s(&p)]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.json()["virtual_size"], bytes, "size {arg}");
        assert_eq!(read_u64(&p, 0x30), bytes / 512, "sector count for {arg}");
        assert_eq!(fs::metadata(&p).unwrap().len(), 4 * MIB);
    }
    // Both spellings of the option.
    let p = tmp.path().join("long.asif");
    let r = run(["create", s(&p), "--size=2M"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn create_rejects_bad_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.asif");
    // Usage errors from the size parser: clap exits 2, first line names it.
    for (arg, why) in [
        ("12X", "unknown unit"),
        ("-5", "expected a number"),
        ("99999999999P", "too large"),
        ("", "expected a number"),
        ("0.3B", "whole number"),
    ] {
        let r = run(["create", s(&p), &format!("--size={arg}")]);
        assert_eq!(r.code, 2, "size {arg:?}: {r:?}");
        assert!(!r.stderr.contains("panicked"), "{r:?}");
        let first = r.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: invalid value") && first.contains(why),
            "size {arg:?}: {r:?}"
        );
        assert!(!p.exists(), "size {arg:?} created a file");
    }
    // `-s -5` is refused as an unknown argument, also a usage error.
    let r = run(["create", s(&p), "-s", "-5"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(!p.exists());
    // Above 4 PiB - 1 MiB: refused, nothing created.
    for arg in ["4503599626321921", "4P", "5P"] {
        let r = run(["create", s(&p), "-s", arg]);
        assert_eq!(r.code, 1, "size {arg}: {r:?}");
        assert_one_error_line(&r, arg, "larger than the format allows");
        assert!(!p.exists(), "size {arg} created a file");
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "leftovers");
}

// ---------------------------------------------------------------------------
// info, map, check

/// `--output=json` / `--output json` print exactly what `--json` prints,
/// and `--output=human` exactly what no option prints, as qemu-img users
/// type them; a third format, or both spellings at odds, is a usage error.
#[test]
fn output_option_is_an_alias_of_json() {
    let tmp = tempfile::tempdir().unwrap();
    let p = fresh(tmp.path(), "o.asif");
    for cmd in ["info", "map", "check"] {
        let json = run([cmd, "--json", s(&p)]);
        let human = run([cmd, s(&p)]);
        assert_eq!(
            (json.code, human.code),
            (0, 0),
            "{cmd}: {json:?}\n{human:?}"
        );
        assert_ne!(json.stdout, human.stdout, "{cmd}");
        assert!(!json.json().is_null(), "{cmd}: --json prints JSON");
        for (args, want) in [
            (vec!["--output=json"], &json),
            (vec!["--output", "json"], &json),
            (vec!["--output=human"], &human),
        ] {
            let r = run([cmd].into_iter().chain(args.clone()).chain([s(&p)]));
            assert_eq!(r.code, 0, "{cmd} {args:?}: {r:?}");
            assert_eq!(r.stdout, want.stdout, "{cmd} {args:?}");
            assert_eq!(r.stderr, "", "{cmd} {args:?}");
        }
        for bad in [vec!["--output=xml"], vec!["--json", "--output=human"]] {
            let r = run([cmd].into_iter().chain(bad.clone()).chain([s(&p)]));
            assert_eq!(r.code, 2, "{cmd} {bad:?}: {r:?}");
            assert!(r.stderr.starts_with("error: "), "{cmd} {bad:?}: {r:?}");
            assert_eq!(r.stdout, "", "{cmd} {bad:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Damaged and foreign inputs.

/// Runs info, map, check and (for files named `.asif` or carrying the ASIF
/// magic, which convert otherwise reads as raw) convert on `path`; each must fail with
/// `code`, one `asiffs: ` stderr line mentioning `needle`, no panic, and
/// leave the file as it was.
fn refused_by_every_command(path: &Path, code: i32, needle: &str, convert: bool) {
    let before = if path.is_file() {
        Some(fs::read(path).unwrap())
    } else {
        None
    };
    let out = path.with_extension("out.raw");
    let mut cmds: Vec<Vec<&str>> = vec![
        vec!["info", s(path)],
        vec!["info", "--json", s(path)],
        vec!["map", s(path)],
        vec!["map", "--json", s(path)],
        vec!["check", s(path)],
        vec!["check", "--json", s(path)],
    ];
    if convert {
        cmds.push(vec!["convert", s(path), s(&out)]);
    }
    for c in cmds {
        let what = format!("{} on {}", c.join(" "), path.display());
        let r = run(&c);
        assert_eq!(r.code, code, "{what}: {r:?}");
        assert_one_error_line(&r, &what, needle);
        if c[..2] == ["check", "--json"] && code == 2 {
            // Corruption found at open is still reported as JSON.
            let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            assert_eq!(j["exit_code"], 2, "{what}");
            let first = j["corruptions"][0].as_str().unwrap_or_default();
            assert!(first.contains(needle), "{what}: corruptions {j}");
        } else {
            assert_eq!(r.stdout, "", "{what}: stdout");
        }
        if let Some(b) = &before {
            assert!(fs::read(path).unwrap() == *b, "{what} changed the file");
        }
        let _ = fs::remove_file(&out);
    }
}

#[test]
fn foreign_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let random = d.join("random.bin");
    fs::write(&random, pattern(5, 3 * MIB as usize)).unwrap();
    let unknown = "not a disk image asiffs knows (ASIF, UDIF .dmg, raw UDRW .dmg, .sparseimage or .sparsebundle)";
    refused_by_every_command(&random, 1, unknown, false);
    let zeros = d.join("zeros.bin");
    fs::write(&zeros, vec![0u8; 4 * MIB as usize]).unwrap();
    refused_by_every_command(&zeros, 1, unknown, false);
    let empty = d.join("empty.bin");
    fs::write(&empty, b"").unwrap();
    refused_by_every_command(&empty, 1, unknown, false);
    // Named as ASIF, the same bytes get the format's own reason.
    let named = d.join("random.asif");
    fs::write(&named, pattern(5, 3 * MIB as usize)).unwrap();
    refused_by_every_command(&named, 2, "not an ASIF image", false);
    let empty = d.join("empty.asif");
    fs::write(&empty, b"").unwrap();
    refused_by_every_command(&empty, 2, "header is truncated (0 bytes", false);
    // A .dmg that is neither UDIF nor whole sectors.
    let cut = d.join("cut.dmg");
    fs::write(&cut, pattern(5, 1000)).unwrap();
    refused_by_every_command(
        &cut,
        2,
        "nor a raw UDRW disk (1000 bytes is not whole 512-byte sectors)",
        false,
    );
    let dir = d.join("dir.asif");
    fs::create_dir(&dir).unwrap();
    refused_by_every_command(&dir, 1, "not a regular file", false);
    let r = run(["convert", s(&dir), s(&d.join("o.raw"))]);
    assert_ne!(r.code, 0, "{r:?}");
    assert_one_error_line(&r, "convert a directory", s(&dir));
    let missing = d.join("missing.asif");
    refused_by_every_command(&missing, 1, "No such file", true);
}

#[test]
fn truncated_vector_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let full = decompress("apple-blank-10GB.asif", tmp.path());
    let bytes = fs::read(&full).unwrap();
    let p = tmp.path().join("trunc.asif");
    fs::write(&p, &bytes[..100]).unwrap();
    refused_by_every_command(&p, 2, "header is truncated (100 bytes", true);
    // The header whole but the file shorter than one chunk.
    fs::write(&p, &bytes[..0x200]).unwrap();
    refused_by_every_command(&p, 2, "truncated", true);
}

/// A fresh image made by `asiffs create` (4 chunks; directory B active).
fn fresh(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    create(&p, "10G");
    p
}

#[test]
fn bad_headers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // (name, offset, bytes, message part); offsets from spec §1.
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        // 0x00 magic "shdw" -> "shdx": still not ours, and not raw either
        // for info/map/check.
        ("version2", 0x04, 2u32.to_be_bytes().to_vec(), "version 2"),
        (
            "hdrsize",
            0x08,
            0x400u32.to_be_bytes().to_vec(),
            "header size",
        ),
        (
            "segments",
            0x46,
            1u16.to_be_bytes().to_vec(),
            "segment count",
        ),
        (
            "chunk1000",
            0x40,
            1000u32.to_be_bytes().to_vec(),
            "chunk size",
        ),
        ("chunk0", 0x40, 0u32.to_be_bytes().to_vec(), "chunk size"),
        (
            "chunkhuge",
            0x40,
            0x8000_0000u32.to_be_bytes().to_vec(),
            "chunk size",
        ),
        (
            "block1000",
            0x44,
            1000u16.to_be_bytes().to_vec(),
            "block size",
        ),
        ("block0", 0x44, 0u16.to_be_bytes().to_vec(), "block size"),
        // 0x38 max sector count: overflowing, zero, and too large for the
        // directories to fit in chunk 0.
        (
            "maxsec-huge",
            0x38,
            u64::MAX.to_be_bytes().to_vec(),
            "max sector count",
        ),
        (
            "maxsec-zero",
            0x38,
            0u64.to_be_bytes().to_vec(),
            "max sector count",
        ),
        (
            "maxsec-2^50",
            0x38,
            (1u64 << 50).to_be_bytes().to_vec(),
            "max sector count",
        ),
        // 0x30 sector count above the max sector count (2^43).
        (
            "sectors",
            0x30,
            ((1u64 << 43) + 1).to_be_bytes().to_vec(),
            "sector count",
        ),
        // 0x10 / 0x18 directory offsets: unaligned, overlapping, outside chunk 0.
        (
            "dirA-unaligned",
            0x10,
            0x201u64.to_be_bytes().to_vec(),
            "directory A offset",
        ),
        (
            "dirB-overlap",
            0x18,
            0x400u64.to_be_bytes().to_vec(),
            "directory B offset",
        ),
        (
            "dirB-outside",
            0x18,
            (1u64 << 40).to_be_bytes().to_vec(),
            "directory B offset",
        ),
        // 0x48 metadata chunk beyond the directory's span.
        (
            "metachunk",
            0x48,
            u64::MAX.to_be_bytes().to_vec(),
            "metadata chunk",
        ),
    ];
    for (name, off, bytes, needle) in cases {
        let p = fresh(d, &format!("{name}.asif"));
        write_bytes(&p, off, &bytes);
        refused_by_every_command(&p, 2, needle, true);
        fs::remove_file(&p).unwrap();
    }
    let p = fresh(d, "magic.asif");
    write_bytes(&p, 0x03, b"x");
    refused_by_every_command(&p, 2, "not an ASIF image", true);
}

/// Header values that wrapped the unchecked geometry sums and products:
/// each is refused by every command with its exact one-line reason, exit 2,
/// no panic, the file unchanged.
#[test]
fn hostile_header_values_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let outside = "must be sector-aligned, after the header and inside chunk 0";
    // (name, [(offset, bytes)], exact message); offsets from spec §1.
    type Patches = Vec<(u64, Vec<u8>)>;
    let cases: Vec<(&str, Patches, String)> = vec![
        (
            "dirA-wraps",
            vec![(0x10, (!511u64).to_be_bytes().to_vec())],
            format!("invalid header field directory A offset: 0xfffffffffffffe00 ({outside})"),
        ),
        (
            "dirB-wraps",
            vec![(0x18, (!511u64).to_be_bytes().to_vec())],
            format!("invalid header field directory B offset: 0xfffffffffffffe00 ({outside})"),
        ),
        (
            "chunk-u32max",
            vec![(0x40, u32::MAX.to_be_bytes().to_vec())],
            "invalid header field chunk size: 0xffffffff (must be a non-zero multiple of the block size)".into(),
        ),
        (
            // 256 MiB chunks make the directories fit, but T * D passes 2^64.
            "span-wraps",
            vec![
                (0x40, (256u32 << 20).to_be_bytes().to_vec()),
                (0x38, (u64::MAX / 512).to_be_bytes().to_vec()),
            ],
            "invalid header field max sector count: 0x7fffffffffffff (geometry overflows 64 bits)".into(),
        ),
        (
            // metadata_chunk * cs fits in 64 bits, + cs does not.
            "metachunk-wraps",
            vec![(0x48, (u64::MAX >> 20).to_be_bytes().to_vec())],
            "invalid header field metadata chunk: 0xfffffffffff (outside the directory's span)".into(),
        ),
    ];
    for (name, patches, msg) in cases {
        let p = fresh(d, &format!("{name}.asif"));
        for (off, bytes) in &patches {
            write_bytes(&p, *off, bytes);
        }
        let r = run(["info", s(&p)]);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (2, format!("asiffs: {msg}\n").as_str()),
            "{name}"
        );
        refused_by_every_command(&p, 2, &msg, true);
        fs::remove_file(&p).unwrap();
    }
}

/// A bad magic reads as text when printable, else as hex.
#[test]
fn bad_magic_is_shown_as_text_or_hex() {
    let tmp = tempfile::tempdir().unwrap();
    let p = fresh(tmp.path(), "x.asif");
    write_bytes(&p, 0x03, b"x");
    let r = run(["info", s(&p)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        r.stderr,
        "asiffs: not an ASIF image (magic \"shdx\", expected \"shdw\")\n"
    );
    write_bytes(&p, 0, &[0, 0, 0, 0]);
    let r = run(["map", s(&p)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        r.stderr,
        "asiffs: not an ASIF image (magic 0x00000000, expected \"shdw\")\n"
    );
}

#[test]
fn bad_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Spec §4: in a fresh image B (0x41400, version 1) is active.
    let p = fresh(d, "past.asif");
    assert_eq!(active_dir(&p), DIR_B);
    write_u64(&p, dir_entry(DIR_B, 0), 100);
    refused_by_every_command(&p, 2, "directory entry 0 points at chunk 100", true);

    // Two directory entries naming one table chunk (the metadata table, 1).
    let p = fresh(d, "shared-table.asif");
    write_u64(&p, dir_entry(DIR_B, 5), 1);
    refused_by_every_command(&p, 2, "reuses table chunk 1", true);

    // Only the inactive directory (A, version 0) is damaged: a warning.
    let p = fresh(d, "inactive.asif");
    write_u64(&p, dir_entry(DIR_A, 0), 100);
    let before = fs::read(&p).unwrap();
    let r = run(["check", "--json", s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["corruptions"], serde_json::json!([]));
    let w = j["warnings"].as_array().unwrap();
    assert_eq!(w.len(), 1, "{r:?}");
    assert!(w[0]
        .as_str()
        .unwrap()
        .contains("inactive directory A entry 0"));
    let r = run(["info", s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(fs::read(&p).unwrap() == before);
}

/// An image with user data: raw data in logical chunks 0, 1 and 2, turned
/// into ASIF by `convert`. Returns the path and table 0's chunk, read from
/// the active directory (spec §2, §4).
fn image_with_data(dir: &Path, name: &str) -> (PathBuf, u64) {
    let raw = dir.join(format!("{name}.raw"));
    let mut b = vec![0u8; 8 * MIB as usize];
    b[..3 * MIB as usize].copy_from_slice(&pattern(11, 3 * MIB as usize));
    fs::write(&raw, b).unwrap();
    let p = dir.join(name);
    let r = run(["convert", s(&raw), s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    fs::remove_file(&raw).unwrap();
    let tc = read_u64(&p, dir_entry(active_dir(&p), 0));
    assert_ne!(tc, 0, "table 0 exists");
    for k in 0..3 {
        assert_eq!(read_u64(&p, data_entry(tc, 0, k)) >> 62, 0b01, "entry {k}");
    }
    (p, tc)
}

/// check on a damaged table: exit 2, the problem listed in the text and
/// JSON reports, the file untouched.
fn check_reports(p: &Path, needles: &[&str]) {
    let before = fs::read(p).unwrap();
    let r = run(["check", s(p)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    for n in needles {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with("ERROR ") && l.contains(n)),
            "check must report {n:?}\n{r:?}"
        );
    }
    let r = run(["check", "--json", s(p)]);
    assert_eq!(r.code, 2, "{r:?}");
    let j = r.json();
    assert_eq!(j["exit_code"], 2);
    let list: Vec<&str> = j["corruptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for n in needles {
        assert!(
            list.iter().any(|c| c.contains(n)),
            "JSON must list {n:?}: {list:?}"
        );
    }
    assert!(fs::read(p).unwrap() == before, "check changed the file");
}

/// info, map and convert on a damaged table: refused, one line, untouched.
fn readers_refuse(p: &Path, needle: &str) {
    let before = fs::read(p).unwrap();
    let out = p.with_extension("out.raw");
    for c in [
        vec!["info", s(p)],
        vec!["map", s(p)],
        vec!["map", "--json", s(p)],
        vec!["convert", s(p), s(&out)],
    ] {
        let what = format!("{} on {}", c.join(" "), p.display());
        let r = run(&c);
        assert_eq!(r.code, 2, "{what}: {r:?}");
        assert_one_error_line(&r, &what, needle);
        assert!(fs::read(p).unwrap() == before, "{what} changed the file");
        let _ = fs::remove_file(&out);
    }
}

#[test]
fn bad_table_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // Reserved bit 55 set on data entry 1 (spec §3).
    let (p, tc) = image_with_data(d, "reserved.asif");
    let e = read_u64(&p, data_entry(tc, 0, 1));
    let bad = e | (1 << 55);
    write_u64(&p, data_entry(tc, 0, 1), bad);
    readers_refuse(&p, "table 0 group 0 entry 1");
    check_reports(
        &p,
        &[&format!(
            "table 0 group 0 entry 1: entry {bad:#018x} is out of rule"
        )],
    );

    // State 00 with a chunk number.
    let (p, tc) = image_with_data(d, "zero-state.asif");
    let e = read_u64(&p, data_entry(tc, 0, 2));
    write_u64(&p, data_entry(tc, 0, 2), e & CHUNK_MASK);
    readers_refuse(&p, "table 0 group 0 entry 2");
    check_reports(&p, &["table 0 group 0 entry 2"]);

    // State 01 with chunk 0.
    let (p, tc) = image_with_data(d, "chunk0.asif");
    write_u64(&p, data_entry(tc, 0, 0), FULL);
    readers_refuse(&p, "table 0 group 0 entry 0");
    check_reports(&p, &["table 0 group 0 entry 0"]);

    // A data entry pointing at its own table chunk.
    let (p, tc) = image_with_data(d, "at-table.asif");
    write_u64(&p, data_entry(tc, 0, 0), FULL | tc);
    readers_refuse(&p, "table 0 group 0 entry 0");
    check_reports(
        &p,
        &[&format!(
            "table 0 group 0 entry 0 points at chunk {tc}, already used by table 0"
        )],
    );

    // A data entry pointing at the metadata table (directory entry T-1).
    let (p, tc) = image_with_data(d, "at-meta-table.asif");
    let mt = read_u64(&p, dir_entry(active_dir(&p), DIR_ENTRIES - 1));
    write_u64(&p, data_entry(tc, 0, 1), PARTIAL | mt);
    readers_refuse(&p, "table 0 group 0 entry 1");
    check_reports(
        &p,
        &[&format!(
            "points at chunk {mt}, already used by table 33288"
        )],
    );

    // A data entry pointing past the end of the file.
    let (p, tc) = image_with_data(d, "past-eof.asif");
    let chunks = fs::metadata(&p).unwrap().len() / MIB;
    write_u64(&p, data_entry(tc, 0, 2), FULL | chunks);
    readers_refuse(&p, "table 0 group 0 entry 2");
    check_reports(
        &p,
        &[&format!(
            "table 0 group 0 entry 2 points at chunk {chunks}, past the end of the file"
        )],
    );

    // Flag bits on a bitmap entry (group 0 has none yet: give it one).
    let (p, tc) = image_with_data(d, "bitmap-flags.asif");
    write_u64(&p, bitmap_entry(tc, 0), FULL | 3);
    check_reports(
        &p,
        &["table 0 group 0: bitmap entry 0x4000000000000003 has flag bits set"],
    );

    // Two data entries sharing one chunk (entry 2 := entry 0).
    let (p, tc) = image_with_data(d, "shared.asif");
    let e0 = read_u64(&p, data_entry(tc, 0, 0));
    write_u64(&p, data_entry(tc, 0, 2), e0);
    check_reports(
        &p,
        &[
            "table 0 group 0 entry 2 points at chunk",
            "already used by table 0 group 0 entry 0",
        ],
    );
}

/// Spec §3 lists sharing among the states that must never be guessed at:
/// every whole-disk reader refuses it (a mount cannot see it without a
/// full scan; `check` reports it).
#[test]
fn shared_chunk_is_refused_by_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, tc) = image_with_data(tmp.path(), "shared.asif");
    let e0 = read_u64(&p, data_entry(tc, 0, 0));
    write_u64(&p, data_entry(tc, 0, 2), e0);
    readers_refuse(&p, "chunk");
}

// ---------------------------------------------------------------------------
// Real images through the binary.

#[test]
fn apple_basic_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let p = decompress("apple-basic.asif", tmp.path());

    let r = run(["info", s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    for line in [
        "virtual size: 488.281 MiB (512000000 bytes)",
        "stable uuid: 13db9632-b79f-4e95-aada-835d5ef97bba",
        "active directory: A (version 2)",
        "chunk size: 1048576",
        "block size: 512",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == line),
            "info lacks {line:?}\n{r:?}"
        );
    }
    let j = run(["info", "--json", s(&p)]).json();
    assert_eq!(j["virtual_size"], 512_000_000u64);
    assert_eq!(j["file_size"], 261 * MIB);
    assert_eq!(j["stable_uuid"], "13db9632-b79f-4e95-aada-835d5ef97bba");
    assert_eq!(j["partial_chunks"], 1);

    // README layout: logical 0 in chunk 5, logical 1-254 in chunks 7-260.
    let r = run(["map", s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["0x0", "0x100000", "0x500000", s(&p)],
            ["0x100000", "0xfe00000", "0x700000", s(&p)]
        ]
    );
    let j = run(["map", "--json", s(&p)]).json();
    assert_eq!(
        j,
        serde_json::json!([
            {"start": 0, "length": MIB, "data": true, "zero": false, "offset": 5 * MIB},
            {"start": MIB, "length": 254 * MIB, "data": true, "zero": false, "offset": 7 * MIB},
            {"start": 255 * MIB, "length": 512_000_000u64 - 255 * MIB, "data": false, "zero": true, "offset": null},
        ])
    );

    let r = run(["check", s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("No errors were found on the image."),
        "{r:?}"
    );

    // To raw: the README's SHA-256, and holes where the disk is zero.
    let raw = tmp.path().join("basic.raw");
    let r = run(["convert", s(&p), s(&raw)]);
    assert_eq!(r.code, 0, "{r:?}");
    let m = fs::metadata(&raw).unwrap();
    assert_eq!(m.len(), 512_000_000);
    assert!(
        m.blocks() * 512 <= 256 * MIB,
        "raw output allocates {} bytes for 255 MiB of data",
        m.blocks() * 512
    );
    assert_eq!(sha256sum(&raw), BASIC_SHA256);
    // An existing destination needs --force.
    let r = run(["convert", s(&p), s(&raw)]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_one_error_line(&r, "convert over a file", "file exists");
    assert_eq!(fs::metadata(&raw).unwrap().len(), 512_000_000);
    // Source and destination the same file.
    let r = run(["convert", s(&p), s(&p), "--force"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert_one_error_line(&r, "convert onto itself", "same file");
    assert_eq!(fs::metadata(&p).unwrap().len(), 261 * MIB);
}

#[test]
fn blank_vectors_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["apple-blank-10GB.asif", "apple-blank-10000GB.asif"] {
        let size = parse_gb(&name[12..name.len() - 5]);
        let p = decompress(name, tmp.path());
        let j = run(["info", "--json", s(&p)]).json();
        assert_eq!(j["virtual_size"], size);
        assert_eq!(
            (j["tables"].clone(), j["active_directory"].clone()),
            (1.into(), "B".into())
        );
        let r = run(["map", "--json", s(&p)]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(
            r.json(),
            serde_json::json!([{"start": 0, "length": size, "data": false, "zero": true, "offset": null}])
        );
        let r = run(["check", "--json", s(&p)]);
        assert_eq!(r.code, 0, "{r:?}");
        let j = r.json();
        assert_eq!(j["exit_code"], 0);
        assert_eq!(j["corruptions"], serde_json::json!([]));
        assert_eq!(
            (j["file_chunks"].clone(), j["free_chunks"].clone()),
            (4.into(), 0.into())
        );
    }
}

// ---------------------------------------------------------------------------
// Round trips.

/// raw -> asif -> raw is byte-identical for scattered, unaligned data and a
/// size that is a whole number of sectors but not of chunks; the asif holds
/// exactly the chunks that have a non-zero byte.
#[test]
fn raw_asif_raw_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size: u64 = 37 * MIB + 3 * 512;
    let raw = d.join("in.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, vec![0x42]),
        (MIB - 3, pattern(1, 10)),            // across chunks 0/1
        (5 * MIB + 777, pattern(2, 100_000)), // unaligned, inside chunk 5
        (20 * MIB, pattern(3, MIB as usize)), // exactly chunk 20
        (31 * MIB, vec![0u8; MIB as usize]),  // allocated but zero: no chunk
        (33 * MIB + 4095, pattern(4, 8193)),  // unaligned, inside chunk 33
        (size - 1, vec![0x99]),               // last byte, short last chunk
    ];
    let mut model = vec![0u8; size as usize];
    {
        use std::os::unix::fs::FileExt;
        for (off, b) in &writes {
            f.write_all_at(b, *off).unwrap();
            model[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
    }
    drop(f);
    let img = d.join("mid.asif");
    let r = run(["convert", s(&raw), s(&img)]);
    assert_eq!(r.code, 0, "{r:?}");
    let back = d.join("out.raw");
    let r = run(["convert", s(&img), s(&back)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_bytes("round trip", &fs::read(&back).unwrap(), &model);
    assert_eq!(sha256sum(&back), sha256sum(&raw));

    let r = run(["check", s(&img)]);
    assert_eq!(r.code, 0, "{r:?}");

    // Chunks with a non-zero byte, as merged runs [start, end) in bytes.
    let chunks: Vec<u64> = (0..size.div_ceil(MIB))
        .filter(|&c| {
            let e = ((c + 1) * MIB).min(size);
            model[(c * MIB) as usize..e as usize]
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    assert_eq!(chunks, [0, 1, 5, 20, 33, 37]);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for c in &chunks {
        let (s0, e0) = (c * MIB, ((c + 1) * MIB).min(size));
        match runs.last_mut() {
            Some(l) if l.1 == s0 => l.1 = e0,
            _ => runs.push((s0, e0)),
        }
    }

    let j = run(["info", "--json", s(&img)]).json();
    assert_eq!(j["virtual_size"], size);
    assert_eq!(j["chunk_size"], 1_048_576);
    assert_eq!(j["block_size"], 512);
    // Table 0 and the metadata table; the metadata chunk counts as data.
    assert_eq!(j["tables"], 2);
    assert_eq!(j["data_chunks"], chunks.len() as u64 + 1);
    assert_eq!(j["partial_chunks"], 1);

    let j = run(["map", "--json", s(&img)]).json();
    let ext = j.as_array().unwrap();
    // Extents cover the disk in order, without gaps.
    let mut at = 0;
    for e in ext {
        assert_eq!(e["start"], at, "{j}");
        assert_eq!(e["zero"], !e["data"].as_bool().unwrap());
        at += e["length"].as_u64().unwrap();
    }
    assert_eq!(at, size);
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in ext.iter().filter(|e| e["data"] == true) {
        let (s0, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert!(
            e["offset"].as_u64().unwrap() % MIB == 0,
            "data at a chunk start: {e}"
        );
        match data.last_mut() {
            Some(x) if x.1 == s0 => x.1 += l,
            _ => data.push((s0, s0 + l)),
        }
    }
    assert_eq!(data, runs);
}

/// A raw file whose size is not a whole number of sectors: the image is
/// rounded up to the next sector and the extra bytes read as zeros.
#[test]
fn raw_size_not_a_whole_sector() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let raw = d.join("odd.raw");
    let data = pattern(8, 3 * MIB as usize + 1000);
    fs::write(&raw, &data).unwrap();
    let img = d.join("odd.asif");
    let r = run(["convert", s(&raw), s(&img)]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = run(["info", "--json", s(&img)]).json();
    assert_eq!(j["virtual_size"], 3 * MIB + 1024);
    let back = d.join("back.raw");
    let r = run(["convert", s(&img), s(&back)]);
    assert_eq!(r.code, 0, "{r:?}");
    let got = fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len() + 24);
    assert_same_bytes("odd size", &got[..data.len()], &data);
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------
// convert never harms an existing destination.

/// Names in `dir`, sorted: shows that no temporary file was left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A destination another process holds (a writable open takes an exclusive
/// lock, a reader a shared one) is refused with --force, in both output
/// formats, and left byte for byte as it was; once free it is replaced.
#[test]
fn convert_refuses_a_destination_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let raw = d.join("in.raw");
    let data = pattern(21, 2 * MIB as usize);
    fs::write(&raw, &data).unwrap();
    let dst = fresh(d, "held.asif");
    let held = asiffs::Image::open(&dst, &asiffs::OpenOptions::writable()).unwrap();
    let before = fs::read(&dst).unwrap();
    let locked = format!(
        "asiffs: {}: image is in use by another process (locked)\n",
        dst.display()
    );
    for out in ["asif", "raw"] {
        let r = run(["convert", "--force", "-O", out, s(&raw), s(&dst)]);
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (1, locked.as_str()),
            "-O {out}"
        );
        assert!(fs::read(&dst).unwrap() == before, "-O {out} changed DST");
        assert_eq!(names(d), ["held.asif", "in.raw"]);
    }
    drop(held);

    // A raw destination under a reader's shared lock.
    let out = d.join("held.raw");
    fs::write(&out, b"precious").unwrap();
    let f = fs::File::open(&out).unwrap();
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_SH) };
    assert_eq!(rc, 0);
    let r = run(["convert", "--force", s(&raw), s(&out)]);
    let locked = format!(
        "asiffs: {}: image is in use by another process (locked)\n",
        out.display()
    );
    assert_eq!((r.code, r.stderr.as_str()), (1, locked.as_str()));
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    drop(f);
    // Once free it is replaced, keeping its permissions, in both formats.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&out, fs::Permissions::from_mode(0o640)).unwrap();
    let r = run(["convert", "--force", s(&raw), s(&out)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_bytes("replaced raw", &fs::read(&out).unwrap(), &data);
    assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o640);
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o600)).unwrap();
    let r = run(["convert", "--force", s(&raw), s(&dst)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(fs::metadata(&dst).unwrap().mode() & 0o777, 0o600);
    let r = run(["convert", s(&dst), s(&d.join("back.raw"))]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_bytes("via asif", &fs::read(d.join("back.raw")).unwrap(), &data);
    fs::remove_file(d.join("back.raw")).unwrap();
    assert_eq!(names(d), ["held.asif", "held.raw", "in.raw"]);
}

/// A `.asif` file without the magic is a damaged image, not a raw disk:
/// convert refuses it unless told `-f raw`; `-f asif` insists on ASIF; a
/// source probed as raw is read as raw with a warning.
#[test]
fn convert_source_format() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("out.raw");
    let p = fresh(d, "damaged.asif");
    write_bytes(&p, 0x03, b"x");
    let r = run(["convert", s(&p), s(&out)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        r.stderr,
        "asiffs: not an ASIF image (magic \"shdx\", expected \"shdw\")\n"
    );
    assert_eq!(names(d), ["damaged.asif"]);
    let zeros = d.join("zeros.asif");
    fs::write(&zeros, vec![0u8; MIB as usize]).unwrap();
    let r = run(["convert", s(&zeros), s(&out)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        r.stderr,
        "asiffs: not an ASIF image (magic 0x00000000, expected \"shdw\")\n"
    );
    assert_eq!(names(d), ["damaged.asif", "zeros.asif"]);

    // -f raw: the bytes as they are, without a word.
    let r = run(["convert", "-f", "raw", s(&p), s(&out)]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    assert!(fs::read(&out).unwrap() == fs::read(&p).unwrap());
    fs::remove_file(&out).unwrap();

    // -f asif on something else fails, naming the magic.
    let bin = d.join("zeros.bin");
    fs::write(&bin, vec![0u8; MIB as usize]).unwrap();
    let r = run(["convert", "--source-format=asif", s(&bin), s(&out)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        r.stderr,
        "asiffs: not an ASIF image (magic 0x00000000, expected \"shdw\")\n"
    );
    assert!(!out.exists());

    // Probed as raw: converted, with a one-line warning.
    let r = run(["convert", s(&bin), s(&out)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "asiffs: warning: {}: no source format given and none recognised; \
             reading it as raw (-f raw says so, -f FMT picks another)\n",
            bin.display()
        )
    );
    assert!(fs::read(&out).unwrap() == fs::read(&bin).unwrap());

    // A format name is all -f takes.
    let r = run([
        "convert",
        "--force",
        "-f",
        "qcow2,file.x=y",
        s(&bin),
        s(&out),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        "asiffs: unknown source format \"qcow2,file.x=y\": expected raw, asif or a qemu-img format name\n"
    );
    assert_eq!(
        names(d),
        ["damaged.asif", "out.raw", "zeros.asif", "zeros.bin"]
    );
}

/// A convert that fails midway (a corrupt table entry in the source, found
/// only while copying) leaves an existing DST as it was and no temporary
/// file, whatever the output format.
#[test]
fn failed_convert_leaves_the_destination_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (src, tc) = image_with_data(d, "bad.asif");
    let chunks = fs::metadata(&src).unwrap().len() / MIB;
    write_u64(&src, data_entry(tc, 0, 2), FULL | chunks);
    let old_raw = d.join("old.raw");
    fs::write(&old_raw, b"old raw disk").unwrap();
    let old_asif = fresh(d, "old.asif");
    for dst in [&old_raw, &old_asif] {
        let before = fs::read(dst).unwrap();
        let r = run(["convert", "--force", s(&src), s(dst)]);
        assert_eq!(r.code, 2, "{r:?}");
        assert_one_error_line(&r, "convert a corrupt source", "table 0 group 0 entry 2");
        assert!(
            fs::read(dst).unwrap() == before,
            "{} changed",
            dst.display()
        );
        assert_eq!(names(d), ["bad.asif", "old.asif", "old.raw"]);
    }
    // A missing output directory is reported against DST, not the
    // temporary name beside it.
    for name in ["x.raw", "x.asif"] {
        let dst = d.join("missing").join(name);
        let r = run(["convert", "-f", "raw", s(&old_raw), s(&dst)]);
        assert_eq!(r.code, 1, "{r:?}");
        assert_eq!(
            r.stderr,
            format!(
                "asiffs: {}: No such file or directory (os error 2)\n",
                dst.display()
            )
        );
    }
}

fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscall with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Killed by SIGINT or SIGTERM in the middle of a copy, convert removes its
/// temporary output and leaves DST as it was. The copy is held up, with no
/// timing guesses, by a stand-in `qemu-img` whose `map` tells the test it
/// has started and then waits until released.
#[test]
fn interrupted_convert_leaves_nothing_behind() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let have = |t: &str| Command::new(t).arg("--version").output().is_ok();
    if !have("qemu-img") || !have("qemu-nbd") {
        eprintln!("NOTICE: qemu-utils are not installed; skipping");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let qcow = d.join("in.qcow2");
    let q = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", s(&qcow), "16M"])
        .output()
        .unwrap();
    assert!(q.status.success(), "{q:?}");
    let dst = fresh(d, "old.asif");
    let before = fs::read(&dst).unwrap();
    let bin = d.join("bin");
    let nbd_tmp = d.join("nbd");
    fs::create_dir(&bin).unwrap();
    fs::create_dir(&nbd_tmp).unwrap();
    let (ready, release) = (d.join("ready"), d.join("release"));
    mkfifo(&ready);
    mkfifo(&release);
    let fake = bin.join("qemu-img");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho > '{}'\nread x < '{}'\nexit 1\n",
            ready.display(),
            release.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let want: Vec<String> = ["bin", "in.qcow2", "nbd", "old.asif", "ready", "release"]
        .map(String::from)
        .to_vec();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let child = asiffs()
            .args(["convert", "--force", "-f", "qcow2", s(&qcow), s(&dst)])
            .env("PATH", &path)
            .env("TMPDIR", &nbd_tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait for the stand-in; the timeout only keeps a broken run from
        // hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        let r = ready.clone();
        std::thread::spawn(move || tx.send(fs::read(&r).is_ok()));
        let started = rx.recv_timeout(std::time::Duration::from_secs(120));
        let mut during = names(d);
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
        let out = child.wait_with_output().unwrap();
        match started {
            // Lets the stand-in exit.
            Ok(_) => fs::write(&release, b"\n").unwrap(),
            // Frees the waiting thread.
            Err(_) => fs::write(&ready, b"").unwrap(),
        }
        assert_eq!(started, Ok(true), "convert never reached the copy: {out:?}");
        assert_eq!(out.status.signal(), Some(sig), "{out:?}");
        // The copy had begun: its output existed under the temporary name.
        during.retain(|n| !want.contains(n));
        assert_eq!(during, [format!(".old.asif.asiffs-tmp-{pid}")]);
        assert_eq!(names(d), want, "signal {sig}");
        assert!(
            fs::read(&dst).unwrap() == before,
            "signal {sig} changed DST"
        );
    }
}

// ---------------------------------------------------------------------------
// Leaks and free space.

#[test]
fn appended_chunk_is_a_leak_and_a_hole_is_free() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let p = fresh(d, "leak.asif");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&vec![0xAB; MIB as usize]).unwrap();
    }
    let r = run(["check", s(&p)]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.contains("1 leaked chunks"), "{r:?}");
    let j = run(["check", "--json", s(&p)]).json();
    assert_eq!(j["exit_code"], 3);
    assert_eq!(j["corruptions"], serde_json::json!([]));
    assert_eq!(j["leaked_chunks"], 1);
    assert_eq!(j["free_chunks"], 0);
    assert_eq!(j["file_chunks"], 5);
    // The leak holds no disk data: the disk still reads as zeros.
    let j = run(["map", "--json", s(&p)]).json();
    assert_eq!(j.as_array().unwrap().len(), 1);
    assert_eq!(j[0]["data"], false);

    let p = fresh(d, "hole.asif");
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(5 * MIB)
        .unwrap();
    let r = run(["check", "--json", s(&p)]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["leaked_chunks"], 0);
    assert_eq!(j["free_chunks"], 1);
    assert_eq!(j["file_chunks"], 5);

    // A length that is not a whole number of chunks is corruption.
    let p = fresh(d, "ragged.asif");
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4 * MIB + 100)
        .unwrap();
    let r = run(["check", "--json", s(&p)]);
    assert_eq!(r.code, 2, "{r:?}");
    let c = r.json()["corruptions"].clone();
    assert!(c[0].as_str().unwrap().contains("not a whole number"), "{c}");
}

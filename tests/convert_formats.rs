//! `asiffs create/check/resize/compact/convert` across formats: ASIF, raw,
//! UDRW (.dmg), sparse bundles, and qcow2/vmdk/vhdx written by qemu-img
//! from an in-process NBD export.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use md5::{Digest, Md5};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const SIZE: u64 = 64 << 20;

/// Data at three places (one straddling a bundle band boundary), the rest
/// a hole: 1.5 MiB of 64 MiB.
fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut want = vec![0u8; SIZE as usize];
    let mut x = 0x1234_5678u32;
    for (at, len) in [
        (0u64, 4096u64),
        (5 << 20, 1 << 20),
        ((8 << 20) - 65536, 131072 + 512),
    ] {
        for b in &mut want[at as usize..(at + len) as usize] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8 | 1;
        }
    }
    let p = dir.join("src.raw");
    let f = fs::File::create(&p).unwrap();
    f.set_len(SIZE).unwrap();
    for (at, len) in [
        (0u64, 4096u64),
        (5 << 20, 1 << 20),
        ((8 << 20) - 65536, 131072 + 512),
    ] {
        f.write_all_at(&want[at as usize..(at + len) as usize], at)
            .unwrap();
    }
    (p, want)
}

/// Host bytes of a file, or of every file of a bundle.
fn allocated(p: &Path) -> u64 {
    let m = fs::symlink_metadata(p).unwrap();
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    fs::read_dir(p)
        .unwrap()
        .map(|e| allocated(&e.unwrap().path()))
        .sum::<u64>()
}

#[track_caller]
fn ok(args: &[&str]) -> Run {
    let r = run(args);
    assert_eq!(r.code, 0, "{args:?}: {r:?}");
    r
}

#[track_caller]
fn one_error(args: &[&str], needle: &str) {
    let r = run(args);
    assert_eq!(r.code, 1, "{args:?}: {r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line\n{r:?}");
    assert!(
        lines[0].starts_with("asiffs: ") && lines[0].contains(needle),
        "{args:?}: want {needle:?}\n{r:?}"
    );
}

/// Each format asiffs writes: its name for `-f`/`-O` and its extension
/// (a `.dmg` is hdiutil's trailerless UDRW or a UDIF with a trailer).
const NATIVE: [(&str, &str); 6] = [
    ("raw", "raw"),
    ("asif", "asif"),
    ("udrw", "dmg"),
    ("udif", "dmg"),
    ("udsb", "sparsebundle"),
    ("udsp", "sparseimage"),
];
const QEMU: [(&str, &str); 3] = [("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vhdx", "vhdx")];

/// Every pair of raw, ASIF, UDRW, bundle and sparse image, and each of them into qcow2,
/// vmdk and vhdx: same bytes, holes left holes.
#[test]
fn round_trips_between_every_pair() {
    let t = tempfile::tempdir().unwrap();
    let (raw, want) = source(t.path());
    // The sources in each native format, made from the raw one.
    let mut sources = vec![("raw", raw.clone())];
    for (fmt, ext) in &NATIVE[1..] {
        let p = t.path().join(format!("src-{fmt}.{ext}"));
        ok(&["convert", "-f", "raw", s(&raw), s(&p), "-O", fmt]);
        sources.push((fmt, p));
    }
    let outputs = NATIVE.iter().copied().chain(QEMU);
    for (stem, src) in &sources {
        for (out_fmt, ext) in outputs.clone() {
            let out = t.path().join(format!("{stem}-to-{out_fmt}.{ext}"));
            ok(&["convert", "-f", stem, s(src), s(&out), "-O", out_fmt]);
            assert!(
                // Data lies in 4 of the 64 MiB; copies go by whole MiB.
                allocated(&out) <= 6 << 20,
                "{stem} -> {out_fmt}: {} bytes allocated for 1.5 MiB of data in 4 MiB",
                allocated(&out)
            );
            let back = t.path().join(format!("{stem}-to-{out_fmt}-back.raw"));
            ok(&["convert", s(&out), s(&back), "-O", "raw"]);
            let got = fs::read(&back).unwrap();
            assert_same_bytes(&format!("{stem} -> {out_fmt}"), &got, &want);
            if let Some((_, fmt)) = QEMU.iter().find(|q| q.0 == out_fmt) {
                let c = std::process::Command::new("qemu-img")
                    .args(["compare", "-f", "raw", "-F", fmt, s(&raw), s(&out)])
                    .output()
                    .unwrap();
                assert!(
                    c.status.success(),
                    "qemu-img compare {stem} -> {out_fmt}: {c:?}"
                );
            }
        }
    }
}

fn md5_of(p: &Path) -> String {
    Md5::digest(fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The real compressed UDIF images convert to the disks macOS made.
#[test]
fn udif_vectors_convert_to_raw() {
    let t = tempfile::tempdir().unwrap();
    for (name, md5) in [
        ("hfsplus_zlib.dmg", "399bfcc39637bde7e43eb86fcc8565ae"),
        ("hfsplus_bzip2.dmg", "7ec785450bbc17de417be373fd5d2159"),
    ] {
        let src = vectors_dir().join("udif").join(name);
        let out = t.path().join(format!("{name}.raw"));
        ok(&["convert", s(&src), s(&out)]);
        assert_eq!(md5_of(&out), md5, "{name}");
        // And on through a bundle and a UDRW image, unchanged.
        let b = t.path().join(format!("{name}.sparsebundle"));
        let d = t.path().join(format!("{name}.rw.dmg"));
        let back = t.path().join(format!("{name}.back.raw"));
        ok(&["convert", s(&src), s(&b)]);
        ok(&["convert", s(&b), s(&d)]);
        ok(&["convert", s(&d), s(&back)]);
        assert_eq!(md5_of(&back), md5, "{name} via bundle and UDRW");
    }
}

/// `create` takes the format from the name or --format; info and check
/// know each.
#[test]
fn create_info_check_each_format() {
    let t = tempfile::tempdir().unwrap();
    for (name, flag, format) in [
        ("a.asif", None, "asif"),
        ("b.dmg", None, "udrw"),
        ("h.dmg", Some("udif"), "udif"),
        ("c.sparsebundle", None, "udsb"),
        ("f.sparseimage", None, "udsp"),
        ("g.img", Some("udsp"), "udsp"),
        ("d.img", Some("udif"), "udif"),
        ("e.bundle", Some("udsb"), "udsb"),
    ] {
        let p = t.path().join(name);
        let mut args = vec!["create", s(&p), "-s", "16M"];
        if let Some(f) = flag {
            args.extend(["--format", f]);
        }
        ok(&args);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["info", "--json", s(&p)]).stdout).unwrap();
        assert_eq!(info["format"], format, "{name}");
        assert_eq!(info["virtual_size"], 16 << 20, "{name}");
        let c = ok(&["check", s(&p)]);
        let last = c.stdout.lines().last().unwrap();
        let want = if format == "asif" { "tables" } else { "clean" };
        assert!(last.contains(want), "{name}: {c:?}");
        let j: serde_json::Value =
            serde_json::from_str(&ok(&["check", "--json", s(&p)]).stdout).unwrap();
        assert_eq!(j["exit_code"], 0, "{name}");
    }
    // A UDRW image grows and shrinks too.
    let dmg = t.path().join("b.dmg");
    ok(&["resize", s(&dmg), "+6M"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--json", s(&dmg)]).stdout).unwrap();
    assert_eq!(info["virtual_size"], 22 << 20);
    ok(&["resize", s(&dmg), "16M", "--shrink"]);
    assert!(ok(&["check", s(&dmg)]).stdout.ends_with(
        "clean
"
    ));
    // A sparse image grows and shrinks like a bundle.
    let sp = t.path().join("f.sparseimage");
    ok(&["resize", s(&sp), "+6M"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--json", s(&sp)]).stdout).unwrap();
    assert_eq!(info["virtual_size"], 22 << 20);
    ok(&["resize", s(&sp), "16M", "--shrink"]);
    assert!(ok(&["check", s(&sp)]).stdout.ends_with("clean\n"));
    // hdiutil's band size for bundles: 8 MiB.
    let plist = fs::read_to_string(t.path().join("c.sparsebundle/Info.plist")).unwrap();
    assert!(plist.contains("<integer>8388608</integer>"), "{plist}");
}

/// A damaged bundle is corrupt (exit 2), its problem named.
#[test]
fn check_corrupt_bundle() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("q.sparsebundle");
    ok(&["create", s(&p), "-s", "10M"]);
    fs::write(p.join("Info.bckup"), "junk").unwrap();
    let r = run(["check", s(&p)]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stdout.contains("Info.bckup") && r.stdout.ends_with("corrupt\n"),
        "{r:?}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&run(["check", "--json", s(&p)]).stdout).unwrap();
    assert_eq!(j["exit_code"], 2);
    assert_eq!(j["format"], "udsb");
}

/// Bundles resize; an existing bundle is replaced only with --force.
#[test]
fn resize_bundle_and_replace_it() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("r.sparsebundle");
    ok(&["create", s(&p), "-s", "10M"]);
    ok(&["resize", s(&p), "+6M"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--json", s(&p)]).stdout).unwrap();
    assert_eq!(info["virtual_size"], 16 << 20);
    one_error(&["resize", s(&p), "1M"], "use --shrink");
    let (raw, want) = source(t.path());
    one_error(&["convert", "-f", "raw", s(&raw), s(&p)], "file exists");
    ok(&["convert", "-f", "raw", s(&raw), s(&p), "--force"]);
    let back = t.path().join("back.raw");
    ok(&["convert", s(&p), s(&back)]);
    assert_same_bytes("replaced bundle", &fs::read(&back).unwrap(), &want);
    let left: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "no temporary left behind: {left:?}");
}

/// What is refused, is refused in one line, and nothing is written.
#[test]
fn refusals_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let dmg = d.join("x.dmg");
    let bundle = d.join("x.sparsebundle");
    ok(&["create", s(&dmg), "-s", "4M"]);
    ok(&["create", s(&bundle), "-s", "4M"]);
    one_error(
        &["create", s(&d.join("x.img")), "-s", "4M"],
        "cannot tell the format from the name",
    );
    one_error(
        &["create", s(&d.join("x.dmg")), "-s", "4M"],
        "file exists (use --force to replace it)",
    );
    one_error(
        &["create", s(&d.join("y.dmg")), "-s", "1000"],
        "512-byte sectors",
    );
    one_error(
        &["check", "-r", "leaks", s(&dmg)],
        "check -r (repair) is not supported for udrw",
    );
    one_error(
        &["check", "-r", "all", s(&bundle)],
        "not supported for udsb",
    );
    let other = tempfile::tempdir().unwrap();
    let zlib = other.path().join("zlib.dmg");
    fs::copy(vectors_dir().join("udif/hfsplus_zlib.dmg"), &zlib).unwrap();
    let before = fs::read(&zlib).unwrap();
    one_error(
        &["resize", s(&zlib), "8M"],
        "cannot resize: compressed UDIF image (UDZO, zlib runs) is read-only",
    );
    assert_eq!(fs::read(&zlib).unwrap(), before);
    one_error(&["compact", s(&dmg)], "compact (ASIF and UDSP images only)");
    one_error(
        &["compact", s(&bundle)],
        "compact (ASIF and UDSP images only)",
    );
    let other = d.join("dir");
    fs::create_dir(&other).unwrap();
    one_error(
        &["convert", s(&dmg), s(&other), "--force", "-O", "udsb"],
        "not a regular file",
    );
    let r = run(["convert", s(&dmg), s(&d.join("x.qcow2"))]);
    assert_eq!(r.code, 0, "{r:?}");
    let out = asiffs()
        .args(["convert", s(&bundle), s(&d.join("y.vmdk"))])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "asiffs: writing vmdk needs qemu-img, which is not installed (install qemu-utils)\n"
    );
    assert!(!d.join("y.vmdk").exists());
    let names: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "nothing else written: {names:?}");
}

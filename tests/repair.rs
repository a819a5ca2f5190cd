//! `asiffs check -r leaks|all`: repairs in place and says what it changed.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use asiffs::{CreateOptions, Image, OpenOptions};
use common::*;

const FULL: u64 = 0x4000_0000_0000_0000;

/// An image with two chunks of data at logical chunks 0 and 1.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let img = Image::create(
        &p,
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )
    .unwrap();
    img.write_at(&pattern(1, 2 * MIB as usize), 0).unwrap();
    img.close().unwrap();
    p
}

fn read(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let img = Image::open(p, &OpenOptions::default()).unwrap();
    let mut b = vec![0u8; len];
    img.read_at(&mut b, off).unwrap();
    b
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn table0(p: &Path) -> u64 {
    read_u64(p, dir_entry(active_dir(p), 0))
}

#[test]
fn leaks_are_freed_and_the_tail_cut() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "leaky.asif");
    let len = file_len(&p);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0xEE; 8192], len + 4096).unwrap();
    f.write_all_at(&[0xEF; 512], len + 2 * MIB).unwrap();
    f.set_len(len + 3 * MIB).unwrap();
    drop(f);
    let r = run(["check".as_ref(), p.as_os_str()]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.contains("2 leaked chunks"), "{r:?}");

    let r = run([
        "check".as_ref(),
        "-r".as_ref(),
        "leaks".as_ref(),
        p.as_os_str(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "Repaired 2 leaked chunks and 0 entries; file {} -> {len} bytes",
            len + 3 * MIB
        )),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("No errors were found on the image."),
        "{r:?}"
    );
    assert_eq!(file_len(&p), len);
    assert_eq!(run(["check".as_ref(), p.as_os_str()]).code, 0);
    assert_eq!(read(&p, 0, 2 * MIB as usize), pattern(1, 2 * MIB as usize));
}

#[test]
fn shared_chunks_need_r_all_and_get_a_copy_each() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "shared.asif");
    let tc = table0(&p);
    let e0 = read_u64(&p, data_entry(tc, 0, 0));
    write_u64(&p, data_entry(tc, 0, 5), e0);
    let before = sha256sum(&p);

    let r = run([
        "check".as_ref(),
        "-r".as_ref(),
        "leaks".as_ref(),
        p.as_os_str(),
    ]);
    assert_ne!(r.code, 0);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "asiffs: {}: the image is corrupt, and -r leaks repairs only leaks (-r all repairs entries too)",
            p.display()
        )
    );
    assert_eq!(sha256sum(&p), before, "-r leaks changed a corrupt image");

    let r = run([
        "check".as_ref(),
        "-r".as_ref(),
        "all".as_ref(),
        p.as_os_str(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let c = e0 & !FULL;
    assert!(
        r.stdout.contains(&format!(
            "Repaired: table 0 group 0 entry 5: shared chunk {c}, now its own copy in chunk"
        )),
        "{r:?}"
    );
    // Both entries read what they read before, and are now independent.
    let first = pattern(1, MIB as usize);
    assert_eq!(read(&p, 5 * MIB, MIB as usize), first);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[3u8; 4096], 5 * MIB).unwrap();
    img.close().unwrap();
    assert_eq!(read(&p, 0, MIB as usize), first);
    assert_eq!(run(["check".as_ref(), p.as_os_str()]).code, 0);
}

#[test]
fn entries_out_of_rule_or_past_the_end_read_zeros_after_r_all() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "bad-entries.asif");
    let tc = table0(&p);
    write_u64(&p, data_entry(tc, 0, 0), 0x0000_0000_0000_0063); // state 00 with a chunk
    write_u64(&p, data_entry(tc, 0, 1), FULL | 100_000); // past the end
    let r = run(["check".as_ref(), p.as_os_str()]);
    assert_eq!(r.code, 2, "{r:?}");

    let r = run([
        "check".as_ref(),
        "-r".as_ref(),
        "all".as_ref(),
        "--json".as_ref(),
        p.as_os_str(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let repaired: Vec<&str> = v["repair"]["entries_repaired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        repaired,
        [
            "table 0 group 0 entry 0: entry 0x0000000000000063 was out of rule; now reads zeros",
            "table 0 group 0 entry 1: named chunk 100000, past the end of the file; now reads zeros",
        ]
    );
    // The two chunks they named are now unreferenced data: freed too.
    assert_eq!(v["repair"]["leaked_chunks_freed"], 2);
    assert_eq!(v["check"]["corruptions"].as_array().unwrap().len(), 0);
    assert!(read(&p, 0, 2 * MIB as usize).iter().all(|&b| b == 0));
}

#[test]
fn an_image_in_use_is_not_repaired() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "busy.asif");
    let before = sha256sum(&p);
    let holder = Image::open(&p, &OpenOptions::writable()).unwrap();
    let r = run([
        "check".as_ref(),
        "-r".as_ref(),
        "leaks".as_ref(),
        p.as_os_str(),
    ]);
    assert_ne!(r.code, 0);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "asiffs: {}: image is in use by another process (locked)",
            p.display()
        )
    );
    drop(holder);
    assert_eq!(sha256sum(&p), before);
}

//! Encrypted images through the registry, the CLI and crash replay: the
//! real encrypted vectors read with their stated SHA-256; wrong and
//! missing passwords are refused in one line with nothing written; writes
//! to encrypted UDRW, UDSP and ASIF containers survive a reopen and leave
//! no plaintext in the container; images we create are read by an
//! independent reader; and every crash point of an encrypted workload
//! opens and keeps what was flushed.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use asiffs::disk::{Disk, Format};
use asiffs::host::crypt::{self, CryptStorage};
use asiffs::host::file::Storage;
use asiffs::password::Password;
use asiffs::raw::RawDisk;
use asiffs::{registry, Error, LockMode, OpenOptions};
use common::crash::assert_catches_lost_write;
use common::crash::{
    check_sectors, lost_write_plan, run_steps, sweep, Mem, Model, Recorder, Step, SECTOR,
};
use common::{asiffs, assert_same_bytes, find, run, vectors_dir, Rng, Run};
use sha2::{Digest, Sha256};

const VILEFAULT: &[u8] = b"vilefault";

fn enc(name: &str) -> PathBuf {
    vectors_dir().join("real/encrypted").join(name)
}

/// A writable copy of an encrypted vector.
fn copy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::copy(enc(name), &p).unwrap();
    // The vectors are read-only; the copy is the test's to write.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn with_password(pw: &[u8], writable: bool) -> OpenOptions {
    let base = if writable {
        OpenOptions::writable()
    } else {
        OpenOptions::default()
    };
    OpenOptions {
        password: Some(Password::first_line(pw)),
        ..base
    }
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut b = vec![0xEE; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (file, password, format inside, disk size, disk SHA-256) from the
/// vectors' README.
const VECTORS: [(&str, &[u8], Format, u64, &str); 5] = [
    (
        "testimage.AES-128.64k.header_v2.dmg",
        VILEFAULT,
        Format::Udrw,
        65_536,
        "6fd3ed173450459fb2e838a846e9bee88c9b9e9c6a97fe554aa0a65a54ce7f12",
    ),
    (
        "testimage.AES-256.64k.header_v2.dmg",
        VILEFAULT,
        Format::Udrw,
        65_536,
        "f39489c4e64812e9030a917c0fecafb0c32f8398385f8f91ef9db807e26eb68c",
    ),
    (
        "testimage.AES-128.64k.header_v2.sparseimage",
        VILEFAULT,
        Format::Udsp,
        65_536,
        "a8a346f9f0e44ec12bcfb6a23dcda5ddf3e3331c182896a1f99da2329f6678c5",
    ),
    (
        "testimage.AES-256.64k.header_v2.sparseimage",
        VILEFAULT,
        Format::Udsp,
        65_536,
        "9d429673a0eb8602bcf2a30af390eb14555acae3d85997e4619123096bfa1c2e",
    ),
    (
        "HFS+-UDZO-password-data.dmg",
        b"password",
        Format::Udif,
        1_115_136,
        "00311aa2925675a23e914ddc46ff6bda16575c63515bb82e785371253ae6e905",
    ),
];

#[test]
fn encrypted_vectors_read_with_their_stated_sha256() {
    for (name, pw, format, size, want) in VECTORS {
        let p = enc(name);
        assert_eq!(
            registry::probe(&p).unwrap(),
            Some(Format::Encrypted),
            "{name}"
        );
        let d = registry::open(&p, None, &with_password(pw, false)).unwrap();
        assert_eq!((d.format(), d.size()), (format, size), "{name}");
        assert_eq!(sha256(&read_all(&*d)), want, "{name}");
    }
}

#[test]
fn the_cli_reads_them_with_a_password_file_or_stdin() {
    let t = tempfile::tempdir().unwrap();
    let pwf = t.path().join("pw");
    fs::write(&pwf, "vilefault\n").unwrap();
    for (i, (name, pw, _, _, want)) in VECTORS.iter().enumerate() {
        let out = t.path().join(format!("{i}.raw"));
        let r = if *pw == VILEFAULT {
            run([
                "convert",
                "--password-file",
                s(&pwf),
                s(&enc(name)),
                s(&out),
            ])
        } else {
            let o = asiffs()
                .args(["convert", "--stdinpass", s(&enc(name)), s(&out)])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(b"password\0")?;
                    c.wait_with_output()
                })
                .unwrap();
            Run::from(o)
        };
        assert_eq!(r.code, 0, "{name}: {r:?}");
        assert_eq!(sha256(&fs::read(&out).unwrap()), *want, "{name}");
    }
    let info = run([
        "info",
        "--json",
        "--password-file",
        s(&pwf),
        s(&enc(VECTORS[2].0)),
    ]);
    assert_eq!(info.code, 0, "{info:?}");
    let j = info.json();
    assert_eq!(j["format"], "udsp");
    assert_eq!(j["encryption"], "encrcdsa version 2 header");
    assert_eq!(j["virtual_size"], 65_536);
}

#[test]
fn version_1_images_decrypt_to_a_gpt_and_are_served_read_only() {
    for name in [
        "testimage.AES-256.64k.header_v1.dmg",
        "testimage.AES-256.64k.header_v1.sparseimage",
    ] {
        let t = tempfile::tempdir().unwrap();
        let p = copy(t.path(), name);
        let before = fs::read(&p).unwrap();
        let d = registry::open(&p, None, &with_password(VILEFAULT, true)).unwrap();
        assert_eq!(d.size(), 65_536, "{name}");
        let disk = read_all(&*d);
        assert_eq!(&disk[512..520], b"EFI PART", "{name}");
        // The first GPT entry (LBA 2) names its partition in UTF-16LE.
        let label: Vec<u8> = "disk image"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(
            &disk[1024 + 56..1024 + 56 + label.len()],
            &label[..],
            "{name}"
        );
        assert!(!d.is_writable(), "{name}");
        assert!(
            matches!(d.write_at(b"x", 0), Err(Error::ReadOnly)),
            "{name}"
        );
        drop(d);
        assert_eq!(fs::read(&p).unwrap(), before, "{name}");
    }
}

#[test]
fn wrong_and_missing_passwords_are_one_line_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    for (name, ..) in VECTORS {
        let p = copy(t.path(), name);
        let before = fs::read(&p).unwrap();
        let e = registry::open(&p, None, &with_password(b"not it", true))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), format!("{}: wrong password", p.display()));
        let e = registry::open(&p, None, &OpenOptions::writable())
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: encrypted disk image: needs its password (--password-file FILE or --stdinpass)",
                p.display()
            )
        );
        assert_eq!(fs::read(&p).unwrap(), before, "{name}");
        // The CLI, with no terminal to prompt on: one line, exit 1.
        let r = asiffs()
            .args(["info", s(&p)])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let r = Run::from(r);
        assert_eq!(r.code, 1, "{r:?}");
        assert_eq!(
            r.stderr,
            format!(
                "asiffs: {}: encrypted disk image: needs its password (--password-file FILE or --stdinpass)\n",
                p.display()
            )
        );
    }
}

/// Text that must never appear in a container: each copy is unique by
/// its offset, so finding one means plaintext leaked.
fn secret_text(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"PLAINTEXT-SECRET-"[i % 17])
        .collect::<Vec<u8>>()
}

/// Every byte of a container: a file, or each file of a bundle.
fn container_bytes(p: &Path) -> Vec<u8> {
    if !p.is_dir() {
        return fs::read(p).unwrap();
    }
    let mut all = Vec::new();
    for e in fs::read_dir(p).unwrap().flatten() {
        all.extend(container_bytes(&e.path()));
    }
    all
}

/// Writes unaligned secrets, discards a range, flushes; reopens and
/// checks the bytes; no secret in the container.
fn write_reopen_and_look_for_plaintext(p: &Path, pw: &[u8]) {
    let d = registry::open(p, None, &with_password(pw, true)).unwrap();
    assert!(d.is_writable(), "{}", p.display());
    let mut want = read_all(&*d);
    let size = d.size() as usize;
    let secret = secret_text(9_000);
    for at in [1usize, 4095, 20_000, size - 9_000] {
        d.write_at(&secret, at as u64).unwrap();
        want[at..at + secret.len()].copy_from_slice(&secret);
    }
    d.discard(5_000, 10_000).unwrap();
    want[5_000..15_000].fill(0);
    d.flush().unwrap();
    assert_same_bytes("before reopening", &read_all(&*d), &want);
    drop(d);
    let d = registry::open(p, None, &with_password(pw, false)).unwrap();
    assert_same_bytes("after reopening", &read_all(&*d), &want);
    let container = container_bytes(p);
    assert!(
        find(&container, b"PLAINTEXT-SECRET").is_none(),
        "{}: plaintext in the container",
        p.display()
    );
}

#[test]
fn writes_to_encrypted_udrw_and_sparse_images_survive_with_no_plaintext() {
    let t = tempfile::tempdir().unwrap();
    for name in [
        "testimage.AES-128.64k.header_v2.dmg",
        "testimage.AES-256.64k.header_v2.dmg",
        "testimage.AES-128.64k.header_v2.sparseimage",
        "testimage.AES-256.64k.header_v2.sparseimage",
    ] {
        let p = copy(t.path(), name);
        write_reopen_and_look_for_plaintext(&p, VILEFAULT);
    }
}

#[test]
fn a_compressed_udif_inside_encryption_is_read_only() {
    let t = tempfile::tempdir().unwrap();
    let p = copy(t.path(), "HFS+-UDZO-password-data.dmg");
    let before = fs::read(&p).unwrap();
    let d = registry::open(&p, None, &with_password(b"password", true)).unwrap();
    assert!(!d.is_writable());
    assert!(matches!(d.write_at(b"x", 0), Err(Error::ReadOnly)));
    drop(d);
    assert_eq!(fs::read(&p).unwrap(), before);
}

/// The plaintext of a v2 container, as the independent Python reader
/// decrypts it: (SHA-256, length).
fn python_plaintext(image: &Path, pw: &str, out: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    assert!(py.is_file(), "no {} (run `make deps`)", py.display());
    let o = std::process::Command::new(&py)
        .arg(root.join("tests/interop/crypt_read.py"))
        .arg(image)
        .arg(pw)
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn created_encrypted_images_read_back_here_and_in_the_independent_reader() {
    let t = tempfile::tempdir().unwrap();
    let pwf = t.path().join("pw");
    fs::write(&pwf, "correct horse\n").unwrap();
    for (name, enc, format) in [
        ("a.dmg", "aes-128", Format::Udrw),
        ("b.dmg", "aes-256", Format::Udrw),
        ("c.sparseimage", "aes-128", Format::Udsp),
        ("d.sparseimage", "aes-256", Format::Udsp),
        ("e.sparsebundle", "aes-128", Format::Udsb),
    ] {
        let p = t.path().join(name);
        let r = run([
            "create",
            s(&p),
            "--size",
            "3M",
            "--encryption",
            enc,
            "--password-file",
            s(&pwf),
        ]);
        assert_eq!(r.code, 0, "{name}: {r:?}");
        let header = if format == Format::Udsb {
            p.join("token")
        } else {
            p.clone()
        };
        assert_eq!(&fs::read(&header).unwrap()[..8], b"encrcdsa", "{name}");
        let d = registry::open(&p, None, &with_password(b"correct horse", false)).unwrap();
        assert_eq!((d.format(), d.size()), (format, 3 << 20), "{name}");
        assert!(
            read_all(&*d).iter().all(|&b| b == 0),
            "{name}: a new disk reads zeros"
        );
        drop(d);
        write_reopen_and_look_for_plaintext(&p, b"correct horse");

        let r = run(["check", "--password-file", s(&pwf), s(&p)]);
        assert_eq!(r.code, 0, "{name}: {r:?}");
        assert!(r.stdout.ends_with("clean\n"), "{name}: {r:?}");
        if format == Format::Udsb {
            // Its bands are read back by tests/udsb_crypt.rs.
            continue;
        }
        let d = registry::open(&p, None, &with_password(b"correct horse", false)).unwrap();
        let disk = read_all(&*d);
        drop(d);
        let plain = t.path().join(format!("{name}.plain"));
        let said = python_plaintext(&p, "correct horse", &plain);
        let plain = fs::read(&plain).unwrap();
        assert_eq!(said, format!("{} {}\n", sha256(&plain), plain.len()));
        match format {
            // The plaintext of a UDRW is the disk itself.
            Format::Udrw => assert_same_bytes(name, &plain, &disk),
            // Of a sparse image, a sprs file asiffs reads as the same disk.
            _ => {
                assert_eq!(&plain[..4], b"sprs", "{name}");
                let f = t.path().join(format!("{name}.plain.sparseimage"));
                fs::write(&f, &plain).unwrap();
                let d = registry::open(&f, None, &OpenOptions::default()).unwrap();
                assert_same_bytes(name, &read_all(&*d), &disk);
            }
        }
    }
    let r = run([
        "create",
        s(&t.path().join("x.asif")),
        "-s",
        "1M",
        "--encryption",
        "aes-128",
        "--password-file",
        s(&pwf),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("--encryption makes udrw, udsp and udsb images, not asif"),
        "{r:?}"
    );
}

#[test]
fn an_asif_image_inside_encryption_is_served_as_asif() {
    let t = tempfile::tempdir().unwrap();
    let plain = t.path().join("plain.asif");
    let opts = asiffs::CreateOptions {
        size: 64 << 20,
        force: false,
        chunk_size: 1 << 20,
        block_size: 512,
    };
    asiffs::Image::create(&plain, &opts)
        .unwrap()
        .close()
        .unwrap();
    let bytes = fs::read(&plain).unwrap();
    let p = t.path().join("vm.asif");
    crypt::create_file(
        &p,
        false,
        b"pw",
        crypt::Encryption::Aes256,
        bytes.len() as u64,
        |s| {
            s.write_at(&bytes, 0)
                .map_err(|e| Error::io("writing the ASIF image", e))
        },
    )
    .unwrap();
    assert_eq!(registry::probe(&p).unwrap(), Some(Format::Encrypted));
    let d = registry::open(&p, None, &with_password(b"pw", true)).unwrap();
    assert_eq!((d.format(), d.size()), (Format::Asif, 64 << 20));
    let secret = secret_text(3 << 20);
    d.write_at(&secret, (10 << 20) + 7).unwrap();
    d.flush().unwrap();
    drop(d);
    let d = registry::open(&p, None, &with_password(b"pw", false)).unwrap();
    let mut got = vec![0u8; secret.len()];
    d.read_at(&mut got, (10 << 20) + 7).unwrap();
    assert!(got == secret, "the write reads back");
    let report = d.check_report().unwrap().unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
    drop(d);
    assert!(find(&fs::read(&p).unwrap(), b"PLAINTEXT-SECRET").is_none());
}

// ---------------------------------------------------------------------------
// Crash replay. Writes to an encrypted container are whole 4 KiB blocks of
// ciphertext, so the crash model tears them at block, not sector, grain
// (a torn block decrypts to noise on any reader, macOS's included).

const BLOCK: u64 = 4096;
const CDISK: u64 = 2 << 20;

fn crash_opts(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        lock: LockMode::None,
        ..OpenOptions::default()
    }
}

/// An encrypted container in memory, created with few iterations, and
/// its keys.
fn fresh(data_size: u64) -> (Arc<Recorder>, crypt::Unlocked) {
    let store = Recorder::new(Mem {
        atom: BLOCK,
        ..Mem::default()
    });
    let keys = crypt::create_v2_with(&*store, b"pw", 128, 4096, data_size, 1000).unwrap();
    (store, keys)
}

fn unlocked(store: Arc<Recorder>, keys: &crypt::Unlocked) -> Arc<dyn Storage> {
    Arc::new(CryptStorage::with_keys(store, keys.clone()).unwrap())
}

fn open_raw(store: Arc<Recorder>, keys: &crypt::Unlocked, writable: bool) -> RawDisk {
    RawDisk::from_storage(
        Path::new("crash.dmg"),
        Format::Udrw,
        unlocked(store, keys),
        writable,
    )
    .unwrap()
}

fn open_udsp(
    store: Arc<Recorder>,
    keys: &crypt::Unlocked,
    writable: bool,
) -> asiffs::Result<asiffs::udsp::SparseImage> {
    asiffs::udsp::SparseImage::from_storage(
        Path::new("crash.sparseimage"),
        unlocked(store, keys),
        &crash_opts(writable),
    )
}

fn workload(seed: u64, sectors: u64, resizes: bool) -> Vec<Step> {
    let mut r = Rng(seed);
    let mut tag = 0;
    let mut size = sectors;
    (0..40)
        .map(|_| {
            let sector = r.below(size - 20);
            match r.below(12) {
                0..=6 => {
                    tag += 1;
                    Step::Write {
                        sector,
                        count: 1 + r.below(19),
                        tag,
                    }
                }
                7..=8 => Step::Discard {
                    sector,
                    count: 1 + r.below(19),
                },
                9 if resizes => {
                    size = sectors - r.below(sectors / 4);
                    Step::Resize(size * SECTOR)
                }
                _ => Step::Flush,
            }
        })
        .collect()
}

#[test]
fn every_crash_point_of_an_encrypted_udrw_opens_and_keeps_flushed_writes() {
    for seed in [3, 17] {
        let (store, keys) = fresh(CDISK);
        let plan = workload(seed, CDISK / SECTOR, true);
        let base = store.start();
        {
            let d = open_raw(store.clone(), &keys, true);
            run_steps(&*store, &d, &plan, 0);
        }
        let log = store.take_log();
        let verify = |state: Mem, model: &Model, durable: usize, started: usize, ctx: &str| {
            let st = Recorder::new(state);
            let d = open_raw(st, &keys, false);
            check_sectors(&d, model, durable, started, ctx);
        };
        let points = sweep(seed, base, &log, &plan, 0, 4, verify);
        assert!(points > 100, "seed {seed}: only {points} crash points");
    }
}

#[test]
fn every_crash_point_of_an_encrypted_sparse_image_opens_and_keeps_flushed_writes() {
    const BAND: u64 = 64 << 10;
    for seed in [5, 23] {
        let (store, keys) = fresh(0);
        {
            let header = asiffs::udsp::create::new_header(&asiffs::udsp::CreateOptions {
                size: CDISK,
                band_size: BAND,
                force: false,
            })
            .unwrap();
            let s = unlocked(store.clone(), &keys);
            s.write_at(&header.encode(), 0).unwrap();
            s.sync().unwrap();
        }
        let plan = workload(seed, CDISK / SECTOR, false);
        let base = store.start();
        {
            let d = open_udsp(store.clone(), &keys, true).unwrap();
            run_steps(&*store, &d, &plan, 0);
        }
        let log = store.take_log();
        let verify = |state: Mem, model: &Model, durable: usize, started: usize, ctx: &str| {
            let st = Recorder::new(state);
            let d = open_udsp(st.clone(), &keys, false)
                .unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
            check_sectors(&d, model, durable, started, ctx);
            drop(d);
            // The survivor takes new bands and checks clean.
            let d = open_udsp(st, &keys, true)
                .unwrap_or_else(|e| panic!("{ctx}: no writable reopen: {e}"));
            d.write_at(&[0xEE; BAND as usize], CDISK - BAND).unwrap();
            d.flush().unwrap();
            assert_eq!(d.check().unwrap(), Vec::<String>::new(), "{ctx}");
        };
        let points = sweep(seed, base, &log, &plan, 0, 4, verify);
        assert!(points > 100, "seed {seed}: only {points} crash points");
    }
}

#[test]
fn the_encrypted_replay_detects_a_lost_flushed_write() {
    let plan = lost_write_plan(40);
    let (store, keys) = fresh(CDISK);
    run_steps(
        &*store,
        &open_raw(store.clone(), &keys, true),
        &plan[..2],
        0,
    );
    let state = store.mem.lock().clone();
    assert_catches_lost_write(&plan, state, |state, model, durable, started, ctx| {
        let d = open_raw(Recorder::new(state), &keys, false);
        check_sectors(&d, model, durable, started, ctx);
    });
}

#[test]
fn a_udif_inside_encryption_takes_writes_into_new_space() {
    let t = tempfile::tempdir().unwrap();
    let plain = t.path().join("plain.dmg");
    asiffs::udif::create_udrw(&plain, 4 << 20).unwrap();
    let bytes = fs::read(&plain).unwrap();
    let p = t.path().join("enc.dmg");
    crypt::create_file(
        &p,
        false,
        b"pw",
        crypt::Encryption::Aes128,
        bytes.len() as u64,
        |s| {
            s.write_at(&bytes, 0)
                .map_err(|e| Error::io("writing the UDIF image", e))
        },
    )
    .unwrap();
    let d = registry::open(&p, None, &with_password(b"pw", true)).unwrap();
    assert_eq!((d.format(), d.size()), (Format::Udif, 4 << 20));
    assert!(d.is_writable());
    let secret = secret_text(100_000);
    d.write_at(&secret, 1_000_001).unwrap();
    d.flush().unwrap();
    drop(d);
    let d = registry::open(&p, None, &with_password(b"pw", false)).unwrap();
    let mut want = vec![0u8; 4 << 20];
    want[1_000_001..1_100_001].copy_from_slice(&secret);
    assert_same_bytes("after reopening", &read_all(&*d), &want);
    drop(d);
    assert!(find(&fs::read(&p).unwrap(), b"PLAINTEXT-SECRET").is_none());
}

/// An encrypted container in memory holding the plain image bytes `plain`
/// (made by the format's own create), and its keys.
fn fresh_holding(plain: &[u8]) -> (Arc<Recorder>, crypt::Unlocked) {
    let (store, keys) = fresh(0);
    let s = unlocked(store.clone(), &keys);
    s.write_at(plain, 0).unwrap();
    s.sync().unwrap();
    (store, keys)
}

/// Replays every crash point of a random workload on a disk that `open`
/// makes over the decrypted store; `verify_more` runs on each survivor.
fn replay_inside_encryption<D: Disk>(
    seed: u64,
    plain: &[u8],
    open: impl Fn(Arc<dyn Storage>, bool) -> asiffs::Result<D>,
    verify_more: impl Fn(&D, &str),
) {
    let (store, keys) = fresh_holding(plain);
    let size = open(unlocked(store.clone(), &keys), false).unwrap().size();
    let plan = workload(seed, size / SECTOR, false);
    let base = store.start();
    {
        let d = open(unlocked(store.clone(), &keys), true).unwrap();
        run_steps(&*store, &d, &plan, 0);
    }
    let log = store.take_log();
    let verify = |state: Mem, model: &Model, durable: usize, started: usize, ctx: &str| {
        let st = Recorder::new(state);
        let d = open(unlocked(st, &keys), false)
            .unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
        check_sectors(&d, model, durable, started, ctx);
        verify_more(&d, ctx);
    };
    let points = sweep(seed, base, &log, &plan, 0, 4, verify);
    assert!(points > 100, "seed {seed}: only {points} crash points");
}

#[test]
fn every_crash_point_of_an_encrypted_asif_image_opens_checks_and_keeps_flushed_writes() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("plain.asif");
    let opts = asiffs::CreateOptions {
        size: 8 << 20,
        force: false,
        chunk_size: 1 << 20,
        block_size: 512,
    };
    asiffs::Image::create(&p, &opts).unwrap().close().unwrap();
    let plain = fs::read(&p).unwrap();
    replay_inside_encryption(
        9,
        &plain,
        |s, writable| {
            asiffs::Image::from_storage(Path::new("crash.asif"), s, &crash_opts(writable))
        },
        |img, ctx| {
            let r = img.check().unwrap();
            assert!(r.corruptions.is_empty(), "{ctx}: {r:?}");
        },
    );
}

#[test]
fn every_crash_point_of_an_encrypted_udif_opens_and_keeps_flushed_writes() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("plain.dmg");
    asiffs::udif::create_udrw(&p, 2 << 20).unwrap();
    let plain = fs::read(&p).unwrap();
    replay_inside_encryption(
        13,
        &plain,
        |s, writable| asiffs::udif::Udif::from_storage(Path::new("crash.dmg"), s, writable),
        |_, _| {},
    );
}

#[test]
fn resize_and_check_reach_the_format_inside_the_encryption() {
    let t = tempfile::tempdir().unwrap();
    let pwf = t.path().join("pw");
    fs::write(&pwf, "vilefault\n").unwrap();
    // A version-2 UDRW grows and shrinks through its password.
    let p = copy(t.path(), "testimage.AES-128.64k.header_v2.dmg");
    let r = run(["resize", "--password-file", s(&pwf), s(&p), "128K"]);
    assert_eq!(r.code, 0, "{r:?}");
    let d = registry::open(&p, None, &with_password(VILEFAULT, false)).unwrap();
    assert_eq!(d.size(), 128 << 10);
    let disk = read_all(&*d);
    drop(d);
    assert_eq!(
        sha256(&disk[..65_536]),
        "6fd3ed173450459fb2e838a846e9bee88c9b9e9c6a97fe554aa0a65a54ce7f12"
    );
    assert!(
        disk[65_536..].iter().all(|&b| b == 0),
        "the grown part reads zeros"
    );
    // Version 1 is read-only: refused in one line, the file untouched.
    let v1 = copy(t.path(), "testimage.AES-256.64k.header_v1.dmg");
    let before = fs::read(&v1).unwrap();
    let r = run(["resize", "--password-file", s(&pwf), s(&v1), "128K"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "asiffs: {}: cannot resize: version-1 encrypted images (cdsaencr trailer) are read-only\n",
            v1.display()
        )
    );
    assert_eq!(fs::read(&v1).unwrap(), before);
    // check of an ASIF image inside encryption is ASIF's full check.
    let plain = t.path().join("plain.asif");
    let opts = asiffs::CreateOptions {
        size: 16 << 20,
        force: false,
        chunk_size: 1 << 20,
        block_size: 512,
    };
    asiffs::Image::create(&plain, &opts)
        .unwrap()
        .close()
        .unwrap();
    let bytes = fs::read(&plain).unwrap();
    let e = t.path().join("e.asif");
    crypt::create_file(
        &e,
        false,
        VILEFAULT,
        crypt::Encryption::Aes128,
        bytes.len() as u64,
        |s| {
            s.write_at(&bytes, 0)
                .map_err(|e| Error::io("writing the ASIF image", e))
        },
    )
    .unwrap();
    let r = run(["check", "--password-file", s(&pwf), s(&e)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("No errors were found on the image."),
        "{r:?}"
    );
}

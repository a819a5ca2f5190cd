//! Encrypted images (`src/host/crypt`): the hdiutil vectors through
//! `CryptStorage` and the format readers, wrong passwords, hostile headers,
//! and round trips through `create_v2`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asiffs::asif::engine::memory::MemStorage;
use asiffs::disk::Disk;
use asiffs::host::crypt::{self, CryptStorage, Scheme};
use asiffs::host::file::{FileStorage, Storage};
use asiffs::udif::Udif;
use asiffs::udsp::SparseImage;
use asiffs::OpenOptions;
use sha2::{Digest, Sha256};

fn vector(name: &str) -> PathBuf {
    let p = common::vectors_dir().join("real/encrypted").join(name);
    assert!(p.is_file(), "missing test vector {}", p.display());
    p
}

/// A read-only vector as storage (the file itself is never written).
fn open_vector(name: &str) -> Arc<dyn Storage> {
    Arc::new(FileStorage::new(std::fs::File::open(vector(name)).unwrap()))
}

fn mem_of(name: &str) -> Vec<u8> {
    std::fs::read(vector(name)).unwrap()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn read_all(s: &dyn Storage) -> Vec<u8> {
    let mut v = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut v, 0).unwrap();
    v
}

fn disk_bytes(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn read_only() -> OpenOptions {
    OpenOptions {
        writable: false,
        ..OpenOptions::writable()
    }
}

#[test]
fn v2_raw_disks_decrypt_to_the_expected_sha() {
    for (name, want) in [
        (
            "testimage.AES-128.64k.header_v2.dmg",
            "6fd3ed173450459fb2e838a846e9bee88c9b9e9c6a97fe554aa0a65a54ce7f12",
        ),
        (
            "testimage.AES-256.64k.header_v2.dmg",
            "f39489c4e64812e9030a917c0fecafb0c32f8398385f8f91ef9db807e26eb68c",
        ),
    ] {
        let inner = open_vector(name);
        assert_eq!(crypt::detect(&*inner).unwrap(), Some(Scheme::HeaderV2));
        let s = CryptStorage::unlock(inner, b"vilefault").unwrap();
        assert_eq!(s.len().unwrap(), 65536, "{name}");
        let disk = read_all(&s);
        assert_eq!(sha(&disk), want, "{name}");
        assert_eq!(&disk[512..520], b"EFI PART");
    }
}

#[test]
fn v2_sparse_images_decrypt_to_sprs_with_the_expected_disk() {
    for (name, want) in [
        (
            "testimage.AES-128.64k.header_v2.sparseimage",
            "a8a346f9f0e44ec12bcfb6a23dcda5ddf3e3331c182896a1f99da2329f6678c5",
        ),
        (
            "testimage.AES-256.64k.header_v2.sparseimage",
            "9d429673a0eb8602bcf2a30af390eb14555acae3d85997e4619123096bfa1c2e",
        ),
    ] {
        let s = CryptStorage::unlock(open_vector(name), b"vilefault").unwrap();
        let mut magic = [0u8; 4];
        s.read_at(&mut magic, 0).unwrap();
        assert_eq!(&magic, b"sprs");
        let img = SparseImage::from_storage(Path::new(name), Arc::new(s), &read_only()).unwrap();
        assert_eq!(img.size(), 65536);
        assert_eq!(sha(&disk_bytes(&img)), want, "{name}");
    }
}

#[test]
fn v2_udzo_decrypts_to_a_whole_udif_file() {
    let name = "HFS+-UDZO-password-data.dmg";
    let s = CryptStorage::unlock(open_vector(name), b"password").unwrap();
    // The data size is not a whole number of blocks.
    assert_eq!(s.len().unwrap(), 10297);
    let mut koly = [0u8; 4];
    s.read_at(&mut koly, 10297 - 512).unwrap();
    assert_eq!(&koly, b"koly");
    let udif = Udif::from_storage(Path::new(name), Arc::new(s), false).unwrap();
    assert_eq!(udif.size(), 1_115_136);
    assert_eq!(
        sha(&disk_bytes(&udif)),
        "00311aa2925675a23e914ddc46ff6bda16575c63515bb82e785371253ae6e905"
    );
}

/// The bundle's `token` is the header (data size 0, data offset = its
/// length); `bands/0` holds blocks numbered from 0.
#[test]
fn v2_bundle_band_decrypts_with_the_token_keys() {
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .arg("xzf")
        .arg(vector(
            "testimage.AES-256.64k.header_v2.sparsebundle.tar.gz",
        ))
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let b = dir
        .path()
        .join("testimage.AES-256.64k.header_v2.sparsebundle");
    let token = std::fs::read(b.join("token")).unwrap();
    let (h, keys) = crypt::unlock_header_v2(&token, b"vilefault").unwrap();
    assert_eq!((h.data_size, h.data_offset), (0, token.len() as u64));
    assert_eq!((keys.key_bits(), keys.block_size()), (256, 4096));
    let mut band = std::fs::read(b.join("bands/0")).unwrap();
    assert_eq!(band.len(), 65536);
    keys.decrypt_blocks(0, &mut band).unwrap();
    assert_eq!(
        sha(&band),
        "eb35ccf058905d535e4dbf3176ebd8d94b89fb282a4ccc7ae88f08bfc2b68b17"
    );
    assert_eq!(
        crypt::unlock_header_v2(&token, b"vilefaulT")
            .unwrap_err()
            .to_string(),
        "wrong password"
    );
}

#[test]
fn v1_images_decrypt_to_a_gpt_disk_and_refuse_changes() {
    let name = "testimage.AES-256.64k.header_v1.dmg";
    let inner = open_vector(name);
    assert_eq!(crypt::detect(&*inner).unwrap(), Some(Scheme::TrailerV1));
    let s = CryptStorage::unlock(inner, b"vilefault").unwrap();
    assert_eq!(s.len().unwrap(), 66812 - 1276);
    let disk = read_all(&s);
    assert_eq!(&disk[512..520], b"EFI PART");
    let name16: Vec<u8> = "disk image"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert_eq!(disk[1024 + 56..1024 + 56 + 20], name16[..]);
    for e in [
        s.write_at(&[1], 0).unwrap_err(),
        s.set_len(4096).unwrap_err(),
        s.punch(0, 512).unwrap_err(),
        s.extend(1 << 20).unwrap_err(),
    ] {
        assert_eq!(e.to_string(), "version-1 encrypted images are read-only");
    }

    let name = "testimage.AES-256.64k.header_v1.sparseimage";
    let s = CryptStorage::unlock(open_vector(name), b"vilefault").unwrap();
    assert_eq!(s.len().unwrap(), 1_053_948 - 1276);
    let img = SparseImage::from_storage(Path::new(name), Arc::new(s), &read_only()).unwrap();
    let disk = disk_bytes(&img);
    assert_eq!(disk.len(), 65536);
    assert_eq!(&disk[512..520], b"EFI PART");
    assert_eq!(disk[1024 + 56..1024 + 56 + 20], name16[..]);
}

#[test]
fn wrong_passwords_are_refused_with_one_message() {
    for (name, pw) in [
        ("testimage.AES-128.64k.header_v2.dmg", &b"vilefaul"[..]),
        ("testimage.AES-256.64k.header_v2.dmg", b"password"),
        ("HFS+-UDZO-password-data.dmg", b"vilefault"),
        ("testimage.AES-256.64k.header_v1.dmg", b""),
        ("testimage.AES-256.64k.header_v1.sparseimage", b"Vilefault"),
    ] {
        let e = CryptStorage::unlock(open_vector(name), pw).unwrap_err();
        assert_eq!(e.to_string(), "wrong password", "{name}");
        assert!(crypt::is_wrong_password(&e));
    }
}

/// Bytes to patch in at an offset.
type Edit<'a> = (usize, &'a [u8]);

/// Patches `edits` into a copy of the AES-128 v2 image and
/// returns the unlock error, which must come quickly.
fn hostile_v2(edits: &[Edit]) -> String {
    let mut bytes = mem_of("testimage.AES-128.64k.header_v2.dmg");
    for (at, b) in edits {
        bytes[*at..*at + b.len()].copy_from_slice(b);
    }
    let start = Instant::now();
    let e = CryptStorage::unlock(Arc::new(MemStorage::new(bytes)), b"vilefault").unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2), "{e}");
    e.to_string()
}

#[test]
fn hostile_v2_headers_are_refused_in_one_line() {
    let cases: &[(&[Edit], &str)] = &[
        (
            &[(0x68, &4_000_000_000u32.to_be_bytes())],
            "corrupt image: encrypted image: PBKDF2 iteration count 4000000000 is outside 1..=10000000",
        ),
        (
            &[(0xc4, &0x1000u32.to_be_bytes())],
            "corrupt image: password key blob: encrypted key blob of 4096 bytes does not fit the 512 bytes after the fields in whole 8-byte blocks",
        ),
        (
            &[(52, &4097u32.to_be_bytes())],
            "corrupt image: encrypted image: block size 4097 is not a power of two in 512..=1048576",
        ),
        (
            &[(52, &(2u32 << 20).to_be_bytes())],
            "corrupt image: encrypted image: block size 2097152 is not a power of two in 512..=1048576",
        ),
        (
            &[(8, &3u32.to_be_bytes())],
            "corrupt image: encrcdsa header: unknown version 3 (only 2 is known)",
        ),
        (
            &[(64, &u64::MAX.to_be_bytes())],
            "corrupt image: encrcdsa header: data at 18446744073709551615+65536 is past the end of the file (188416 bytes)",
        ),
        (
            &[(56, &(1u64 << 40).to_be_bytes())],
            "corrupt image: encrcdsa header: data at 122880+1099511627776 is past the end of the file (188416 bytes)",
        ),
        (
            &[(88, &u64::MAX.to_be_bytes())],
            "corrupt image: encrcdsa header: key blob 0 at 96+18446744073709551615 lies outside the header (data at 122880)",
        ),
        (
            &[(72, &0xffff_ffffu32.to_be_bytes())],
            "corrupt image: encrcdsa header: 4294967295 key pointers (1..=256 expected)",
        ),
        (
            &[(24, &192u32.to_be_bytes())],
            "corrupt image: encrcdsa header: unsupported cipher 0x80000001 with 192-bit keys (AES-128 or AES-256 expected)",
        ),
    ];
    for (edits, want) in cases {
        assert_eq!(hostile_v2(edits), *want);
    }
}

#[test]
fn hostile_v1_trailers_are_refused_in_one_line() {
    let clean = mem_of("testimage.AES-256.64k.header_v1.dmg");
    let t = clean.len() - 1276;
    let cases: &[(usize, &[u8], &str)] = &[
        (
            t + 48,
            &u32::MAX.to_be_bytes(),
            "corrupt image: encrypted image: PBKDF2 iteration count 4294967295 is outside 1..=10000000",
        ),
        (
            t + 96 + 40,
            &4096u32.to_be_bytes(),
            "corrupt image: cdsaencr trailer: wrapped AES key of 4096 bytes (16..=256 in 8-byte blocks expected)",
        ),
        (
            t + 16,
            &3000u32.to_be_bytes(),
            "corrupt image: encrypted image: block size 3000 is not a power of two in 512..=1048576",
        ),
        (
            t + 1256,
            &u64::MAX.to_be_bytes(),
            "corrupt image: cdsaencr trailer: data size 18446744073709551615 is past the 65536 bytes before the trailer",
        ),
        (
            t + 1264,
            &2u32.to_be_bytes(),
            "corrupt image: cdsaencr trailer: unknown version 2 (only 1 is known)",
        ),
    ];
    for (at, b, want) in cases {
        let mut bytes = clean.clone();
        bytes[*at..*at + b.len()].copy_from_slice(b);
        let start = Instant::now();
        let e = CryptStorage::unlock(Arc::new(MemStorage::new(bytes)), b"vilefault").unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(e.to_string(), *want);
    }
    let plain = MemStorage::new(vec![0u8; 4096]);
    assert_eq!(crypt::detect(&plain).unwrap(), None);
    assert_eq!(
        CryptStorage::unlock(Arc::new(plain), b"x")
            .unwrap_err()
            .to_string(),
        "not an encrypted image: no encrcdsa header or cdsaencr trailer"
    );
}

/// A pattern no encryption would leave in the container by chance.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(31) ^ 0x5a)
        .collect()
}

#[test]
fn create_v2_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.dmg");
    for (bits, bs) in [(128u32, 512u32), (256, 4096)] {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let inner: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        crypt::create_v2(&*inner, b"s3cret", bits, bs, 100_000).unwrap();
        assert_eq!(
            inner.len().unwrap(),
            0x1e000 + 100_000u64.div_ceil(bs as u64) * bs as u64
        );
        let s = CryptStorage::unlock(inner.clone(), b"s3cret").unwrap();
        let mut model = vec![0u8; 100_000];
        let writes = [
            (1usize, 1usize),
            (511, 3),
            (4095, 4098),
            (50_001, 777),
            (99_990, 10),
        ];
        for (i, (at, n)) in writes.iter().enumerate() {
            let p = pattern(i as u8, *n);
            s.write_at(&p, *at as u64).unwrap();
            model[*at..at + n].copy_from_slice(&p);
        }
        s.punch(4100, 3000).unwrap();
        model[4100..7100].fill(0);
        // Growth by a write past the end, then sync to make it durable.
        let tail = pattern(9, 1000);
        s.write_at(&tail, 120_000).unwrap();
        model.resize(121_000, 0);
        model[120_000..].copy_from_slice(&tail);
        s.sync().unwrap();
        drop(s);

        let s = CryptStorage::unlock(inner.clone(), b"s3cret").unwrap();
        assert_eq!(s.len().unwrap(), 121_000);
        assert_eq!(read_all(&s), model, "AES-{bits}, {bs}-byte blocks");
        let mut z = vec![1u8; 3000];
        s.read_at(&mut z, 4100).unwrap();
        assert_eq!(z, vec![0u8; 3000]);

        let container = std::fs::read(&path).unwrap();
        assert_eq!(&container[..8], b"encrcdsa");
        // The writes long enough to recognise: 16 bytes of each.
        for (i, (_, n)) in writes.iter().enumerate().filter(|(_, (_, n))| *n >= 16) {
            let p = pattern(i as u8, *n);
            assert!(
                !container.windows(16).any(|w| w == &p[..16]),
                "plaintext of write {i} is in the container"
            );
        }
        assert!(!container.windows(16).any(|w| w == &tail[..16]));
        assert_eq!(
            CryptStorage::unlock(inner, b"s3cre")
                .unwrap_err()
                .to_string(),
            "wrong password"
        );
    }
}

/// hdiutil's layout: the header bytes match the vectors' field for field
/// except the random ones.
#[test]
fn new_header_is_laid_out_as_hdiutil_lays_it_out() {
    let (h, keys) = crypt::new_header_v2(b"pw", 256, 4096, 65536).unwrap();
    let theirs = mem_of("testimage.AES-256.64k.header_v2.dmg");
    assert_eq!(h.len(), 0x1e000);
    // Random: UUID 36..52, salt 0x70..0x84, IV 0x94..0x9c, blob 0xc8..0x108;
    // iterations at 0x68 (ours is higher).
    let random = [
        (36, 52),
        (0x68, 0x6c),
        (0x70, 0x84),
        (0x94, 0x9c),
        (0xc8, 0x108),
    ];
    for (i, (a, b)) in h.iter().zip(&theirs[..0x1e000]).enumerate() {
        if !random.iter().any(|(s, e)| (*s..*e).contains(&i)) {
            assert_eq!(a, b, "byte {i:#x}");
        }
    }
    assert_eq!(h[0x68..0x6c], crypt::CREATE_ITERATIONS.to_be_bytes());
    let (_, again) = crypt::unlock_header_v2(&h, b"pw").unwrap();
    let mut a = vec![7u8; 4096];
    let mut b = a.clone();
    keys.encrypt_blocks(3, &mut a).unwrap();
    again.encrypt_blocks(3, &mut b).unwrap();
    assert_eq!(a, b);
}

/// The independent Python reader (tests/interop/crypt_read.py) agrees with
/// the vector SHA and with a container we wrote. Needs `make deps`.
#[test]
fn python_reader_agrees() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    assert!(py.is_file(), "no {} (run `make deps`)", py.display());
    let run = |image: &Path, pw: &str| {
        let out = std::process::Command::new(&py)
            .arg(root.join("tests/interop/crypt_read.py"))
            .arg(image)
            .arg(pw)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        run(&vector("testimage.AES-256.64k.header_v2.dmg"), "vilefault"),
        "f39489c4e64812e9030a917c0fecafb0c32f8398385f8f91ef9db807e26eb68c 65536\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.dmg");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let inner: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    let keys = crypt::create_v2_with(&*inner, b"py", 128, 512, 5000, 1000).unwrap();
    let s = CryptStorage::with_keys(inner, keys).unwrap();
    let p = pattern(3, 4321);
    s.write_at(&p, 333).unwrap();
    s.sync().unwrap();
    let mut model = vec![0u8; 5000];
    model[333..333 + 4321].copy_from_slice(&p);
    assert_eq!(run(&path, "py"), format!("{} 5000\n", sha(&model)));
}

//! Helpers shared by `tests/vectors.rs` and `tests/cli.rs`: locating and
//! decompressing the real macOS images, byte patching at offsets taken from
//! `asif-spec.md`, and running the `asiffs` binary.
//!
//! Nothing here knows how the crate lays images out beyond what the spec
//! says; where a test needs a structure's position (a table chunk), it reads
//! it from the directory as the spec describes.

#![allow(dead_code)]

pub mod crash;
pub mod crash_dir;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `cs` of every real image.
pub const MIB: u64 = 1 << 20;
/// `bs` of every real image.
pub const SECTOR: u64 = 512;
/// Spec §1: directory A starts at 0x200, directory B at 0x41400.
pub const DIR_A: u64 = 0x200;
pub const DIR_B: u64 = 0x41400;
/// Spec §2: T = 33289 directory entries for 1 MiB chunks / 512-byte sectors.
pub const DIR_ENTRIES: u64 = 33289;
/// Spec §2: N = 2048 data entries per chunk-group, S = 16392 bytes per group.
pub const ENTRIES_PER_GROUP: u64 = 2048;
pub const GROUP_BYTES: u64 = 16392;
/// Spec §5: the metadata chunk's logical address, 4 PiB - 1 MiB.
pub const METADATA_LOGICAL: u64 = (4 << 50) - MIB;
/// Largest virtual size: the disk must stay below the metadata chunk.
pub const MAX_VIRTUAL: u64 = METADATA_LOGICAL;

/// Where the real images live: `$ASIFFS_VECTORS`, else `../shared/vectors`
/// next to the crate.
pub fn vectors_dir() -> PathBuf {
    match std::env::var_os("ASIFFS_VECTORS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors"),
    }
}

/// Decompresses `vectors/<name>.gz` into `dir/<name>` with the system
/// `gzip -dc` and returns the path. The original is never touched.
pub fn decompress(name: &str, dir: &Path) -> PathBuf {
    let src = vectors_dir().join(format!("{name}.gz"));
    assert!(src.is_file(), "missing test vector {}", src.display());
    let dst = dir.join(name);
    let out = fs::File::create(&dst).expect("creating the decompressed vector");
    let status = Command::new("gzip")
        .arg("-dc")
        .arg(&src)
        .stdout(out)
        .status()
        .expect("running gzip -dc");
    assert!(status.success(), "gzip -dc {} failed", src.display());
    dst
}

/// Parses the decimal size in a blank vector's name: `10GB` -> 10^10 bytes.
pub fn parse_gb(s: &str) -> u64 {
    let n = s.strip_suffix("GB").unwrap_or_else(|| panic!("size {s:?}"));
    n.parse::<u64>().expect("a number of GB") * 1_000_000_000
}

/// Every `apple-blank-<SIZE>.asif` vector as (file name, virtual size).
pub fn blank_vectors() -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = fs::read_dir(vectors_dir())
        .expect("reading the vectors directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let base = name.strip_suffix(".gz")?;
            let size = base.strip_prefix("apple-blank-")?.strip_suffix(".asif")?;
            Some((base.to_string(), parse_gb(size)))
        })
        .collect();
    v.sort_by_key(|(_, s)| *s);
    v
}

pub fn be_u64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

pub fn read_u64(path: &Path, at: u64) -> u64 {
    let f = fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

pub fn write_bytes(path: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

pub fn write_u64(path: &Path, at: u64, v: u64) {
    write_bytes(path, at, &v.to_be_bytes());
}

pub fn write_u32(path: &Path, at: u64, v: u32) {
    write_bytes(path, at, &v.to_be_bytes());
}

pub fn write_u16(path: &Path, at: u64, v: u16) {
    write_bytes(path, at, &v.to_be_bytes());
}

/// Spec §2: byte offset of directory entry `t` in the directory at `dir`.
pub fn dir_entry(dir: u64, t: u64) -> u64 {
    dir + 8 + 8 * t
}

/// Spec §4: the active directory's offset (higher version, A on a tie).
pub fn active_dir(path: &Path) -> u64 {
    if read_u64(path, DIR_B) > read_u64(path, DIR_A) {
        DIR_B
    } else {
        DIR_A
    }
}

/// Spec §2: byte offset of data entry `k` of group `g` in table chunk `tc`.
pub fn data_entry(tc: u64, g: u64, k: u64) -> u64 {
    tc * MIB + g * GROUP_BYTES + 8 * k
}

/// Spec §2: byte offset of the bitmap entry of group `g` in table chunk `tc`.
pub fn bitmap_entry(tc: u64, g: u64) -> u64 {
    tc * MIB + g * GROUP_BYTES + 8 * ENTRIES_PER_GROUP
}

/// Spec §3 entry encodings.
pub const FULL: u64 = 0b01 << 62;
pub const PARTIAL: u64 = 0b11 << 62;
pub const UNMAPPED: u64 = 0b10 << 62;
pub const CHUNK_MASK: u64 = (1 << 55) - 1;

/// True when `s` is a lowercase hyphenated uuid (8-4-4-4-12 hex digits).
pub fn is_lower_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

/// The stable uuid as it sits in the metadata chunk's plist bytes (chunk 2
/// of a fresh image, plist at +0x200): the `<string>` after the
/// `stable uuid` key. Returns (file offset of the uuid text, the text).
pub fn plist_stable_uuid(image: &[u8], plist_at: usize) -> (usize, String) {
    let area = &image[plist_at..plist_at + 4096];
    let key = find(area, b"<key>stable uuid</key>").expect("stable uuid key in the plist");
    let s = key + find(&area[key..], b"<string>").expect("<string> after the key") + 8;
    let e = s + find(&area[s..], b"</string>").expect("</string>");
    (
        plist_at + s,
        String::from_utf8(area[s..e].to_vec()).expect("utf-8 uuid"),
    )
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Index of the first differing byte, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[track_caller]
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: first difference at {i:#x} (lengths {:#x} vs {:#x}): got {:02x?}, want {:02x?}",
            got.len(),
            want.len(),
            &got[i..got.len().min(i + 16)],
            &want[i..want.len().min(i + 16)],
        );
    }
}

/// `sha256sum` of a file, lowercase hex.
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Deterministic non-zero filler (a small LCG), so no test depends on a
/// random seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as u8) | 1
        })
        .collect()
}

/// The `asiffs` binary built for this test run.
pub fn asiffs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_asiffs"));
    c.env_remove("ASIFFS_LOG").stdin(Stdio::null());
    c
}

/// Result of one run of the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().expect("exited, not killed by a signal"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `asiffs` with `args` and captures everything.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Run::from(asiffs().args(args).output().expect("running asiffs"))
}

/// A new, empty image of `size` bytes at `dir/name`, closed again.
pub fn blank_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    asiffs::Image::create(
        &path,
        &asiffs::CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    path
}

/// Deterministic xorshift, so a failure names its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

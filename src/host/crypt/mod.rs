//! Apple disk-image encryption, as a layer under the formats: the file
//! holds ciphertext; [`CryptStorage`] presents the plaintext (a raw disk, a
//! `sprs` sparse image or a whole UDIF file) to the format readers.
//!
//! Written from the public descriptions of the scheme and checked field by
//! field against the hdiutil images in `vectors/real/encrypted/`. All
//! integers are big-endian. Algorithm numbers are CSSM's.
//!
//! # Version 2: `encrcdsa` header at offset 0 ([`header_v2`])
//!
//! | offset | size | field | seen |
//! |---:|---:|---|---|
//! | 0 | 8 | signature | `encrcdsa` |
//! | 8 | 4 | version | 2 |
//! | 12 | 4 | data IV size | 16 |
//! | 16 | 4 | data cipher mode | 5 |
//! | 20 | 4 | data cipher | `0x80000001` (AES) |
//! | 24 | 4 | AES key bits | 128 or 256 |
//! | 28 | 4 | IV key algorithm | `0x5b` (HMAC-SHA1) |
//! | 32 | 4 | IV key bits | 160 |
//! | 36 | 16 | image UUID | random |
//! | 52 | 4 | block size | 4096 |
//! | 56 | 8 | data size: plaintext length | 65536; 10297 (UDZO, not block aligned); 1052672 (`sprs`); 0 (bundle `token`) |
//! | 64 | 8 | data offset: first encrypted block | `0x1e000` |
//! | 72 | 4 | key-pointer count | 1 |
//! | 76 | 20 each | key pointers: type u32, offset u64, size u64 | 1 (password), `0x60`, `0x268` |
//!
//! The password key blob (at its pointer's offset, relative offsets):
//!
//! | offset | size | field | seen |
//! |---:|---:|---|---|
//! | 0 | 4 | key derivation | 103 (PBKDF2-HMAC-SHA1) |
//! | 4 | 4 | its PRNG | 0 |
//! | 8 | 4 | iteration count | 1000 |
//! | 12 | 4 | salt length | 20 |
//! | 16 | 32 | salt (first *length* bytes) | random |
//! | 48 | 4 | key blob IV length | 8 |
//! | 52 | 32 | key blob IV (first 8 bytes) | random |
//! | 84 | 4 | key blob key bits | 192 |
//! | 88 | 4 | key blob cipher | 17 (3DES-EDE) |
//! | 92 | 4 | key blob padding | 7 (PKCS#7) |
//! | 96 | 4 | key blob mode | 6 (CBC) |
//! | 100 | 4 | encrypted key blob length | 48 (AES-128), 64 (AES-256) |
//! | 104 | rest | encrypted key blob | |
//!
//! The encrypted key blob, decrypted with the 24-byte PBKDF2 output and
//! stripped of its padding, is the AES key, the 20-byte HMAC-SHA1 key and
//! `CKIE\0`. The rest of the header up to the data offset is zeros.
//!
//! # Version 1: `cdsaencr` trailer, last 1276 bytes ([`trailer_v1`])
//!
//! | offset | size | field | seen |
//! |---:|---:|---|---|
//! | 0 | 16 | image UUID | random |
//! | 16 | 4 | block size | 4096 |
//! | 20 | 4 | key wrap cipher | 17 (3DES-EDE) |
//! | 24 | 4 | key wrap padding | 7 |
//! | 28 | 4 | key wrap mode | 6 |
//! | 32 | 4 | key wrap key bits | 192 |
//! | 36 | 4 | key wrap IV size | 8 |
//! | 40 | 4 | key derivation | 103 (PBKDF2) |
//! | 44 | 4 | its PRNG | 0 |
//! | 48 | 4 | iteration count | 1000 |
//! | 52 | 4 | salt length | 20 |
//! | 56 | 32 | salt | random |
//! | 88 | 4 | data IV size | 16 |
//! | 92 | 4 | data cipher mode | 5 |
//! | 96 | 300 | AES key record | |
//! | 396 | 300 | HMAC key record | |
//! | 696 | 300 | third key record (not needed to read) | HMAC-SHA1, 160 bits |
//! | 996 | 4 + 256 | length and bytes of a 20-byte value (not needed to read) | |
//! | 1256 | 8 | data size | 65536; 1052672 (`sprs`): the file minus the trailer |
//! | 1264 | 4 | version | 1 |
//! | 1268 | 8 | signature | `cdsaencr` |
//!
//! A key record: algorithm u32 (`0x80000001` / `0x5b`), key bits u32 (256 /
//! 160), a 32-byte field holding 8 random bytes (not used to unwrap),
//! wrapped length u32 (56 / 48), 256 bytes of wrapped key. Unwrapped (see
//! [`keys::apple_unwrap`]) it is 8 bytes, 4 zero bytes, then the key.
//!
//! # Data
//!
//! Block *n* of the data (v2: at `data offset + n * block size`; v1: at
//! `n * block size`) is AES-CBC with IV = HMAC-SHA1(HMAC key, *n* as
//! big-endian u32)[..16] ([`cipher`]). The file always holds whole blocks;
//! bytes past the data size in the last block are not plaintext.
//!
//! In a sparse bundle the header is the `token` file (data size 0: the
//! size is in `Info.plist`) and the bands hold the blocks. The one bundle
//! vector has a single band, so it cannot tell whether block numbers
//! restart in each band or count from the start of the disk: both read
//! `bands/0` as blocks 0, 1, ... (checked in `tests/crypt.rs`). asiffs
//! counts them from the start of the disk, so that `token` followed by the
//! bands is laid out as a version-2 `.dmg` (`src/udsb/crypt.rs`).

pub mod cipher;
pub mod header_v2;
pub mod keys;
mod locks;
mod storage;
pub mod trailer_v1;

pub use cipher::Unlocked;
pub(crate) use locks::BlockLocks;
pub use storage::CryptStorage;

use crate::error::{Error, Result};
use crate::host::file::Storage;
use header_v2::{HeaderV2, KeyPointer, PasswordBlob};
use keys::Keys;

/// PBKDF2 iteration counts above this are refused before deriving: ten
/// million SHA-1 pairs is already seconds; hdiutil wrote 1000 in the
/// vectors and recent versions a few hundred thousand.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Iteration count of images we create.
pub const CREATE_ITERATIONS: u32 = 200_000;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// The message of a password that does not unlock the image.
pub const WRONG_PASSWORD: &str = "wrong password";
/// How much of the file's start is read to find the v2 key blob.
pub const HEADER_READ_MAX: u64 = 64 << 10;

/// Which encryption scheme a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `encrcdsa` version 2 header at offset 0.
    HeaderV2,
    /// `cdsaencr` version 1 trailer in the last 1276 bytes.
    TrailerV1,
}

/// Whether the container is encrypted, by its signatures only (nothing is
/// validated: [`CryptStorage::unlock`] does that).
pub fn detect(inner: &dyn Storage) -> Result<Option<Scheme>> {
    let mut magic = [0u8; 8];
    inner
        .read_at(&mut magic, 0)
        .map_err(|e| Error::io("reading the encryption header", e))?;
    if &magic == header_v2::MAGIC {
        return Ok(Some(Scheme::HeaderV2));
    }
    let len = inner
        .len()
        .map_err(|e| Error::io("stat of the encrypted image", e))?;
    if len >= trailer_v1::SIZE as u64 {
        inner
            .read_at(&mut magic, len - 8)
            .map_err(|e| Error::io("reading the encryption trailer", e))?;
        if &magic == trailer_v1::MAGIC {
            return Ok(Some(Scheme::TrailerV1));
        }
    }
    Ok(None)
}

/// Whether `e` is the error of a password that does not unlock the image.
pub fn is_wrong_password(e: &Error) -> bool {
    matches!(e, Error::Invalid(m) if m == WRONG_PASSWORD)
}

/// Unlocks a v2 header given as bytes (a file's start, or a sparse
/// bundle's `token`): the parsed header and the keys.
pub fn unlock_header_v2(header: &[u8], password: &[u8]) -> Result<(HeaderV2, Unlocked)> {
    let (h, blob) = HeaderV2::decode_with_blob(header)?;
    let keys = keys::unwrap_v2(&blob, h.key_bits, password)?;
    let u = Unlocked::new(&keys, h.block_size)?;
    Ok((h, u))
}

/// A new v2 header, `data offset` bytes long as hdiutil writes it (one
/// password key blob at 0x60, data at 0x1e000), with fresh random keys,
/// UUID, salt and IV. Also the keys, to encrypt the data with.
pub fn new_header_v2(
    password: &[u8],
    key_bits: u32,
    block_size: u32,
    data_size: u64,
) -> Result<(Vec<u8>, Unlocked)> {
    new_header_v2_with(password, key_bits, block_size, data_size, CREATE_ITERATIONS)
}

/// [`new_header_v2`] with a chosen iteration count (tests use few).
pub fn new_header_v2_with(
    password: &[u8],
    key_bits: u32,
    block_size: u32,
    data_size: u64,
    iterations: u32,
) -> Result<(Vec<u8>, Unlocked)> {
    if !matches!(key_bits, 128 | 256) {
        return Err(Error::Invalid(format!(
            "encrypted image: AES key of {key_bits} bits (128 or 256)"
        )));
    }
    header_v2::check_block_size(block_size)?;
    header_v2::check_iterations(iterations)?;
    let keys = Keys::random(key_bits)?;
    let mut uuid = [0u8; 16];
    keys::fill_random(&mut uuid)?;
    let mut salt = vec![0u8; 20];
    keys::fill_random(&mut salt)?;
    let mut iv = [0u8; 8];
    keys::fill_random(&mut iv)?;
    let h = HeaderV2 {
        iv_size: 16,
        mode: header_v2::DATA_MODE,
        algorithm: header_v2::ALG_AES,
        key_bits,
        hmac_algorithm: header_v2::ALG_HMAC_SHA1,
        hmac_key_bits: 160,
        uuid,
        block_size,
        data_size,
        data_offset: header_v2::DATA_OFFSET,
        key_pointers: vec![KeyPointer {
            kind: header_v2::KEY_TYPE_PASSWORD,
            offset: header_v2::BLOB_OFFSET,
            size: header_v2::BLOB_SIZE,
        }],
    };
    let blob = PasswordBlob {
        kdf_algorithm: header_v2::ALG_PBKDF2,
        kdf_prng_algorithm: 0,
        iterations,
        encrypted: keys::wrap_v2(&keys, password, &salt, &iv, iterations),
        salt,
        iv: iv.to_vec(),
        blob_key_bits: 192,
        blob_algorithm: header_v2::ALG_3DES,
        blob_padding: header_v2::BLOB_PADDING_PKCS7,
        blob_mode: header_v2::BLOB_MODE_CBC,
    };
    let mut buf = vec![0u8; header_v2::DATA_OFFSET as usize];
    h.encode_into(&mut buf);
    let at = header_v2::BLOB_OFFSET as usize;
    blob.encode_into(&mut buf[at..at + header_v2::BLOB_SIZE as usize]);
    Ok((buf, Unlocked::new(&keys, block_size)?))
}

/// Makes `inner` a new v2 encrypted image of `data_size` plaintext zeros:
/// encrypted zero blocks, synced, then the header, synced (a crash leaves
/// no header or a complete image). Open it with [`CryptStorage::unlock`]
/// or [`CryptStorage::with_keys`] and the returned keys.
pub fn create_v2(
    inner: &dyn Storage,
    password: &[u8],
    key_bits: u32,
    block_size: u32,
    data_size: u64,
) -> Result<Unlocked> {
    create_v2_with(
        inner,
        password,
        key_bits,
        block_size,
        data_size,
        CREATE_ITERATIONS,
    )
}

/// [`create_v2`] with a chosen iteration count.
pub fn create_v2_with(
    inner: &dyn Storage,
    password: &[u8],
    key_bits: u32,
    block_size: u32,
    data_size: u64,
    iterations: u32,
) -> Result<Unlocked> {
    let (header, keys) = new_header_v2_with(password, key_bits, block_size, data_size, iterations)?;
    fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
        move |e| Error::io(format!("creating the encrypted image: {what}"), e)
    }
    inner.set_len(0).map_err(io("truncating"))?;
    let blocks = data_size.div_ceil(block_size as u64);
    storage::write_zero_blocks(inner, &keys, header_v2::DATA_OFFSET, 0, blocks)
        .map_err(io("writing encrypted zeros"))?;
    inner.sync().map_err(io("sync"))?;
    inner
        .write_at(&header, 0)
        .map_err(io("writing the header"))?;
    inner.sync().map_err(io("sync"))?;
    Ok(keys)
}

/// AES key size of a new encrypted image.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    #[value(name = "aes-128")]
    Aes128,
    #[value(name = "aes-256")]
    Aes256,
}

impl Encryption {
    pub fn key_bits(self) -> u32 {
        match self {
            Encryption::Aes128 => 128,
            Encryption::Aes256 => 256,
        }
    }
}

/// Block size of images we encrypt, as hdiutil writes them.
pub const CREATE_BLOCK_SIZE: u32 = 4096;

/// Makes a new encrypted file at `path` (refusing an existing one unless
/// `force`), whose plaintext `fill` writes through the unlocked storage.
/// Written under a temporary name and moved into place when complete, as
/// every image we create.
pub fn create_file(
    path: &std::path::Path,
    force: bool,
    password: &[u8],
    encryption: Encryption,
    data_size: u64,
    fill: impl FnOnce(&dyn Storage) -> Result<()>,
) -> Result<()> {
    use crate::atomic_file::{check_replaceable, temp_path, write_new, Place, NEW_TAG};
    use crate::host::file::FileStorage;
    check_replaceable(path, force)?;
    let _ = std::fs::remove_file(temp_path(path, NEW_TAG));
    let place = if force { Place::Rename } else { Place::Link };
    let mut failure = None;
    let placed = write_new(path, NEW_TAG, place, |file| {
        let run = || -> Result<()> {
            let file = file
                .try_clone()
                .map_err(|e| Error::io("creating the encrypted image", e))?;
            let inner: std::sync::Arc<dyn Storage> = std::sync::Arc::new(FileStorage::new(file));
            let keys = create_v2(
                &*inner,
                password,
                encryption.key_bits(),
                CREATE_BLOCK_SIZE,
                data_size,
            )?;
            let plain = CryptStorage::with_keys(inner, keys)?;
            fill(&plain)?;
            plain
                .sync()
                .map_err(|e| Error::io("syncing the encrypted image", e))
        };
        run().map_err(|e| {
            failure = Some(e);
            std::io::Error::other("encrypting")
        })
    });
    match (placed, failure) {
        (_, Some(e)) => Err(e),
        (Err(f), None) => Err(Error::io(
            format!("{}: {}", path.display(), f.step),
            f.error,
        )),
        (Ok(()), None) => Ok(()),
    }
}

pub(crate) fn corrupt(msg: String) -> Error {
    Error::Corrupt(msg)
}

pub(crate) fn wrong_password() -> Error {
    Error::Invalid(WRONG_PASSWORD.into())
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

//! The `encrcdsa` version 2 header at the start of an encrypted image, its
//! key-pointer table and the password key blob it points at. Pure codec:
//! bytes in, bytes out. Field layout and the values seen in the vectors are
//! in the [module docs](super).

use super::{be32, be64, corrupt, put32, put64, MAX_BLOCK_SIZE, MAX_ITERATIONS, MIN_BLOCK_SIZE};
use crate::error::Result;

pub const MAGIC: &[u8; 8] = b"encrcdsa";
pub const VERSION: u32 = 2;
/// Fixed fields before the key-pointer table.
pub const FIXED_SIZE: usize = 76;
/// One key-pointer table entry: type u32, offset u64, size u64.
pub const KEY_POINTER_SIZE: usize = 20;
/// Key-pointer type of a password key blob.
pub const KEY_TYPE_PASSWORD: u32 = 1;
/// More entries than this is hostile: hdiutil writes one per password or
/// certificate.
pub const MAX_KEY_POINTERS: u32 = 256;
/// Where the data area starts in every hdiutil image seen (120 KiB).
pub const DATA_OFFSET: u64 = 0x1e000;
/// Where hdiutil puts the password key blob, and its size.
pub const BLOB_OFFSET: u64 = 0x60;
pub const BLOB_SIZE: u64 = 0x268;

/// CSSM algorithm numbers as they appear in the fields.
pub const ALG_AES: u32 = 0x8000_0001;
pub const ALG_HMAC_SHA1: u32 = 0x5b;
pub const ALG_3DES: u32 = 17;
pub const ALG_PBKDF2: u32 = 103;
/// Mode number of the data cipher (AES-CBC, IV from the HMAC), seen as 5.
pub const DATA_MODE: u32 = 5;
/// Padding and mode numbers of the key blob cipher (PKCS#7, CBC).
pub const BLOB_PADDING_PKCS7: u32 = 7;
pub const BLOB_MODE_CBC: u32 = 6;

/// The fixed fields of the header (everything but the key blobs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderV2 {
    pub iv_size: u32,
    pub mode: u32,
    pub algorithm: u32,
    /// AES key size in bits: 128 or 256.
    pub key_bits: u32,
    pub hmac_algorithm: u32,
    /// HMAC-SHA1 key size in bits: 160.
    pub hmac_key_bits: u32,
    pub uuid: [u8; 16],
    /// Bytes per encrypted block: a power of two in 512..=1 MiB.
    pub block_size: u32,
    /// Plaintext length (0 in a sparse bundle's `token`).
    pub data_size: u64,
    /// Where the first encrypted block starts in the file.
    pub data_offset: u64,
    pub key_pointers: Vec<KeyPointer>,
}

/// One entry of the key-pointer table: where a key blob lies in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPointer {
    pub kind: u32,
    pub offset: u64,
    pub size: u64,
}

/// Offset of the data-size field, rewritten in place when the image grows.
pub const DATA_SIZE_AT: u64 = 56;

impl HeaderV2 {
    /// Decodes the header from the first bytes of the file. `buf` must hold
    /// at least the fixed fields and the key-pointer table.
    pub fn decode(buf: &[u8]) -> Result<HeaderV2> {
        if buf.len() < FIXED_SIZE {
            return Err(corrupt(format!(
                "encrcdsa header: {} bytes, need {FIXED_SIZE}",
                buf.len()
            )));
        }
        if &buf[..8] != MAGIC {
            return Err(corrupt("encrcdsa header: bad signature".into()));
        }
        let version = be32(buf, 8);
        if version != VERSION {
            return Err(corrupt(format!(
                "encrcdsa header: unknown version {version} (only 2 is known)"
            )));
        }
        let h = HeaderV2 {
            iv_size: be32(buf, 12),
            mode: be32(buf, 16),
            algorithm: be32(buf, 20),
            key_bits: be32(buf, 24),
            hmac_algorithm: be32(buf, 28),
            hmac_key_bits: be32(buf, 32),
            uuid: buf[36..52].try_into().unwrap(),
            block_size: be32(buf, 52),
            data_size: be64(buf, 56),
            data_offset: be64(buf, 64),
            key_pointers: Vec::new(),
        };
        if h.algorithm != ALG_AES || !matches!(h.key_bits, 128 | 256) {
            return Err(corrupt(format!(
                "encrcdsa header: unsupported cipher {:#x} with {}-bit keys (AES-128 or AES-256 expected)",
                h.algorithm, h.key_bits
            )));
        }
        if h.hmac_algorithm != ALG_HMAC_SHA1 || h.hmac_key_bits != 160 {
            return Err(corrupt(format!(
                "encrcdsa header: unsupported IV key {:#x} of {} bits (HMAC-SHA1, 160 expected)",
                h.hmac_algorithm, h.hmac_key_bits
            )));
        }
        check_block_size(h.block_size)?;
        let count = be32(buf, 72);
        if count == 0 || count > MAX_KEY_POINTERS {
            return Err(corrupt(format!(
                "encrcdsa header: {count} key pointers (1..={MAX_KEY_POINTERS} expected)"
            )));
        }
        let table_end = FIXED_SIZE + count as usize * KEY_POINTER_SIZE;
        if buf.len() < table_end {
            return Err(corrupt(format!(
                "encrcdsa header: key-pointer table ends at {table_end}, past the {} bytes read",
                buf.len()
            )));
        }
        let mut h = h;
        for i in 0..count as usize {
            let at = FIXED_SIZE + i * KEY_POINTER_SIZE;
            let p = KeyPointer {
                kind: be32(buf, at),
                offset: be64(buf, at + 4),
                size: be64(buf, at + 12),
            };
            match p.offset.checked_add(p.size) {
                Some(end) if p.offset >= table_end as u64 && end <= h.data_offset => {}
                _ => {
                    return Err(corrupt(format!(
                    "encrcdsa header: key blob {i} at {}+{} lies outside the header (data at {})",
                    p.offset, p.size, h.data_offset
                )))
                }
            }
            h.key_pointers.push(p);
        }
        Ok(h)
    }

    /// The first password key blob's pointer.
    pub fn password_pointer(&self) -> Result<KeyPointer> {
        self.key_pointers
            .iter()
            .copied()
            .find(|p| p.kind == KEY_TYPE_PASSWORD)
            .ok_or_else(|| corrupt("encrcdsa header: no password key blob".into()))
    }

    /// Decodes the header and the password key blob from `buf`, which must
    /// reach the end of that blob.
    pub fn decode_with_blob(buf: &[u8]) -> Result<(HeaderV2, PasswordBlob)> {
        let h = HeaderV2::decode(buf)?;
        let p = h.password_pointer()?;
        // decode() bounded offset+size by the data offset; the caller may
        // have read less than that.
        let end = (p.offset + p.size) as usize;
        if buf.len() < end {
            return Err(corrupt(format!(
                "encrcdsa header: password key blob ends at {end}, past the {} bytes read",
                buf.len()
            )));
        }
        let blob = PasswordBlob::decode(&buf[p.offset as usize..end])?;
        Ok((h, blob))
    }

    /// Encodes the fixed fields and the key-pointer table into the start of
    /// `buf` (which must be long enough).
    pub fn encode_into(&self, buf: &mut [u8]) {
        buf[..8].copy_from_slice(MAGIC);
        put32(buf, 8, VERSION);
        put32(buf, 12, self.iv_size);
        put32(buf, 16, self.mode);
        put32(buf, 20, self.algorithm);
        put32(buf, 24, self.key_bits);
        put32(buf, 28, self.hmac_algorithm);
        put32(buf, 32, self.hmac_key_bits);
        buf[36..52].copy_from_slice(&self.uuid);
        put32(buf, 52, self.block_size);
        put64(buf, 56, self.data_size);
        put64(buf, 64, self.data_offset);
        put32(buf, 72, self.key_pointers.len() as u32);
        for (i, p) in self.key_pointers.iter().enumerate() {
            let at = FIXED_SIZE + i * KEY_POINTER_SIZE;
            put32(buf, at, p.kind);
            put64(buf, at + 4, p.offset);
            put64(buf, at + 12, p.size);
        }
    }
}

/// Block sizes the scheme can use: a power of two in 512..=1 MiB.
pub fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(corrupt(format!(
            "encrypted image: block size {bs} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// Fixed part of the password key blob before the encrypted key blob.
pub const BLOB_FIXED_SIZE: usize = 104;
/// Salt and IV fields are 32-byte buffers, partly used.
pub const SALT_MAX: usize = 32;
pub const BLOB_IV_MAX: usize = 32;

/// The password key blob: how to derive the 3DES key from the password
/// and the encrypted key blob holding the AES and HMAC keys.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordBlob {
    pub kdf_algorithm: u32,
    pub kdf_prng_algorithm: u32,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub iv: Vec<u8>,
    pub blob_key_bits: u32,
    pub blob_algorithm: u32,
    pub blob_padding: u32,
    pub blob_mode: u32,
    /// The encrypted key blob (3DES-EDE-CBC, PKCS#7).
    pub encrypted: Vec<u8>,
}

// Nothing secret here (the blob is ciphertext), but keep Debug short.
impl std::fmt::Debug for PasswordBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordBlob")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .field("encrypted_len", &self.encrypted.len())
            .finish()
    }
}

impl PasswordBlob {
    /// Decodes a password key blob (`buf` is exactly the pointed-at bytes).
    pub fn decode(buf: &[u8]) -> Result<PasswordBlob> {
        if buf.len() < BLOB_FIXED_SIZE {
            return Err(corrupt(format!(
                "password key blob: {} bytes, need {BLOB_FIXED_SIZE}",
                buf.len()
            )));
        }
        let kdf_algorithm = be32(buf, 0);
        let iterations = be32(buf, 8);
        let salt_len = be32(buf, 12);
        let iv_len = be32(buf, 48);
        let enc_len = be32(buf, 100);
        if kdf_algorithm != ALG_PBKDF2 {
            return Err(corrupt(format!(
                "password key blob: key derivation {kdf_algorithm} is not PBKDF2 (103)"
            )));
        }
        check_iterations(iterations)?;
        if salt_len == 0 || salt_len as usize > SALT_MAX {
            return Err(corrupt(format!(
                "password key blob: salt of {salt_len} bytes (1..={SALT_MAX} expected)"
            )));
        }
        if iv_len != 8 {
            return Err(corrupt(format!(
                "password key blob: IV of {iv_len} bytes (8 expected)"
            )));
        }
        let b = PasswordBlob {
            kdf_algorithm,
            kdf_prng_algorithm: be32(buf, 4),
            iterations,
            salt: buf[16..16 + salt_len as usize].to_vec(),
            iv: buf[52..52 + iv_len as usize].to_vec(),
            blob_key_bits: be32(buf, 84),
            blob_algorithm: be32(buf, 88),
            blob_padding: be32(buf, 92),
            blob_mode: be32(buf, 96),
            encrypted: Vec::new(),
        };
        if b.blob_algorithm != ALG_3DES || b.blob_key_bits != 192 {
            return Err(corrupt(format!(
                "password key blob: cipher {} with {}-bit key (3DES, 192 expected)",
                b.blob_algorithm, b.blob_key_bits
            )));
        }
        if b.blob_padding != BLOB_PADDING_PKCS7 || b.blob_mode != BLOB_MODE_CBC {
            return Err(corrupt(format!(
                "password key blob: padding {} mode {} (7 and 6 expected)",
                b.blob_padding, b.blob_mode
            )));
        }
        let room = buf.len() - BLOB_FIXED_SIZE;
        if enc_len as usize > room || enc_len == 0 || enc_len % 8 != 0 {
            return Err(corrupt(format!(
                "password key blob: encrypted key blob of {enc_len} bytes does not fit the {room} bytes after the fields in whole 8-byte blocks"
            )));
        }
        Ok(PasswordBlob {
            encrypted: buf[BLOB_FIXED_SIZE..BLOB_FIXED_SIZE + enc_len as usize].to_vec(),
            ..b
        })
    }

    /// Encodes into `buf`, the blob's space in the header (zeros elsewhere).
    pub fn encode_into(&self, buf: &mut [u8]) {
        put32(buf, 0, self.kdf_algorithm);
        put32(buf, 4, self.kdf_prng_algorithm);
        put32(buf, 8, self.iterations);
        put32(buf, 12, self.salt.len() as u32);
        buf[16..16 + self.salt.len()].copy_from_slice(&self.salt);
        put32(buf, 48, self.iv.len() as u32);
        buf[52..52 + self.iv.len()].copy_from_slice(&self.iv);
        put32(buf, 84, self.blob_key_bits);
        put32(buf, 88, self.blob_algorithm);
        put32(buf, 92, self.blob_padding);
        put32(buf, 96, self.blob_mode);
        put32(buf, 100, self.encrypted.len() as u32);
        buf[BLOB_FIXED_SIZE..BLOB_FIXED_SIZE + self.encrypted.len()]
            .copy_from_slice(&self.encrypted);
    }
}

/// PBKDF2 cost is linear in the count: refuse counts that would take
/// minutes before the password is even checked.
pub fn check_iterations(n: u32) -> Result<()> {
    if n == 0 || n > MAX_ITERATIONS {
        return Err(corrupt(format!(
            "encrypted image: PBKDF2 iteration count {n} is outside 1..={MAX_ITERATIONS}"
        )));
    }
    Ok(())
}

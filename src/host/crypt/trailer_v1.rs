//! The `cdsaencr` version 1 trailer: the last 1276 bytes of an old-style
//! encrypted image. Pure codec; field layout in the [module docs](super).

use super::header_v2::{
    check_block_size, check_iterations, ALG_3DES, ALG_AES, ALG_HMAC_SHA1, ALG_PBKDF2,
};
use super::{be32, be64, corrupt};
use crate::error::Result;

pub const SIZE: usize = 1276;
pub const MAGIC: &[u8; 8] = b"cdsaencr";
pub const VERSION: u32 = 1;
/// One wrapped-key record: algorithm, key bits, 32-byte IV field (not used
/// to unwrap), length, 256-byte wrapped key.
const RECORD_SIZE: usize = 300;
const WRAPPED_MAX: usize = 256;
const AES_RECORD_AT: usize = 96;
const HMAC_RECORD_AT: usize = AES_RECORD_AT + RECORD_SIZE;

#[derive(Clone, PartialEq, Eq)]
pub struct TrailerV1 {
    pub uuid: [u8; 16],
    /// Bytes per encrypted block (4096 in every image seen).
    pub block_size: u32,
    pub iterations: u32,
    pub salt: Vec<u8>,
    /// AES key size in bits: 128 or 256.
    pub key_bits: u32,
    /// Wrapped AES key and wrapped HMAC-SHA1 key (Apple's 3DES key wrap).
    pub wrapped_aes_key: Vec<u8>,
    pub wrapped_hmac_key: Vec<u8>,
    /// Plaintext length: the file minus this trailer in every image seen.
    pub data_size: u64,
}

impl std::fmt::Debug for TrailerV1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrailerV1")
            .field("block_size", &self.block_size)
            .field("iterations", &self.iterations)
            .field("key_bits", &self.key_bits)
            .field("data_size", &self.data_size)
            .finish()
    }
}

/// Whether the last bytes of a file end like a version 1 trailer.
pub fn has_magic(tail: &[u8]) -> bool {
    tail.ends_with(MAGIC)
}

impl TrailerV1 {
    /// Decodes the trailer: `buf` is the last [`SIZE`] bytes of the file.
    pub fn decode(buf: &[u8]) -> Result<TrailerV1> {
        if buf.len() != SIZE {
            return Err(corrupt(format!(
                "cdsaencr trailer: {} bytes, need {SIZE}",
                buf.len()
            )));
        }
        if &buf[1268..1276] != MAGIC {
            return Err(corrupt("cdsaencr trailer: bad signature".into()));
        }
        let version = be32(buf, 1264);
        if version != VERSION {
            return Err(corrupt(format!(
                "cdsaencr trailer: unknown version {version} (only 1 is known)"
            )));
        }
        let block_size = be32(buf, 16);
        check_block_size(block_size)?;
        let (wrap_alg, wrap_bits) = (be32(buf, 20), be32(buf, 32));
        if wrap_alg != ALG_3DES || wrap_bits != 192 {
            return Err(corrupt(format!(
                "cdsaencr trailer: key wrap cipher {wrap_alg} with {wrap_bits}-bit key (3DES, 192 expected)"
            )));
        }
        let kdf = be32(buf, 40);
        if kdf != ALG_PBKDF2 {
            return Err(corrupt(format!(
                "cdsaencr trailer: key derivation {kdf} is not PBKDF2 (103)"
            )));
        }
        let iterations = be32(buf, 48);
        check_iterations(iterations)?;
        let salt_len = be32(buf, 52);
        if salt_len == 0 || salt_len > 32 {
            return Err(corrupt(format!(
                "cdsaencr trailer: salt of {salt_len} bytes (1..=32 expected)"
            )));
        }
        let (aes_alg, key_bits, wrapped_aes_key) = record(buf, AES_RECORD_AT, "AES key")?;
        if aes_alg != ALG_AES || !matches!(key_bits, 128 | 256) {
            return Err(corrupt(format!(
                "cdsaencr trailer: unsupported cipher {aes_alg:#x} with {key_bits}-bit keys (AES-128 or AES-256 expected)"
            )));
        }
        let (hmac_alg, hmac_bits, wrapped_hmac_key) = record(buf, HMAC_RECORD_AT, "HMAC key")?;
        if hmac_alg != ALG_HMAC_SHA1 || hmac_bits != 160 {
            return Err(corrupt(format!(
                "cdsaencr trailer: unsupported IV key {hmac_alg:#x} of {hmac_bits} bits (HMAC-SHA1, 160 expected)"
            )));
        }
        Ok(TrailerV1 {
            uuid: buf[..16].try_into().unwrap(),
            block_size,
            iterations,
            salt: buf[56..56 + salt_len as usize].to_vec(),
            key_bits,
            wrapped_aes_key,
            wrapped_hmac_key,
            data_size: be64(buf, 1256),
        })
    }
}

/// One wrapped-key record: (algorithm, key bits, wrapped key).
fn record(buf: &[u8], at: usize, what: &str) -> Result<(u32, u32, Vec<u8>)> {
    let len = be32(buf, at + 40) as usize;
    // The unwrap needs an IV block and at least one key block.
    if !(16..=WRAPPED_MAX).contains(&len) || len % 8 != 0 {
        return Err(corrupt(format!(
            "cdsaencr trailer: wrapped {what} of {len} bytes (16..={WRAPPED_MAX} in 8-byte blocks expected)"
        )));
    }
    Ok((
        be32(buf, at),
        be32(buf, at + 4),
        buf[at + 44..at + 44 + len].to_vec(),
    ))
}

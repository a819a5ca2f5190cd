//! The data cipher: AES-CBC over each block of `block_size` bytes, with
//! the block's IV = first 16 bytes of HMAC-SHA1(hmac key, block number as
//! big-endian u32). Blocks are independent, so any one can be rewritten.

use aes::{Aes128, Aes256};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use zeroize::Zeroizing;

use super::header_v2::check_block_size;
use super::keys::{Keys, HMAC_KEY_LEN};
use super::{corrupt, wrong_password};
use crate::error::{Error, Result};

/// Expanded AES key; the `aes` crate zeroes it on drop. Unboxed: it is
/// cloned for every block, and a box would allocate each time.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Aes {
    K128(Aes128),
    K256(Aes256),
}

/// An unlocked image: what reading and writing its blocks needs. Built
/// from a header (see [`super::unlock_header_v2`]) or from fresh keys.
/// Secrets are zeroed on drop and left out of Debug.
#[derive(Clone)]
pub struct Unlocked {
    aes: Aes,
    hmac: Zeroizing<[u8; HMAC_KEY_LEN]>,
    block_size: u32,
}

impl std::fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unlocked(AES-{}, block size {}, keys redacted)",
            self.key_bits(),
            self.block_size
        )
    }
}

impl Unlocked {
    pub fn new(keys: &Keys, block_size: u32) -> Result<Unlocked> {
        check_block_size(block_size)?;
        let aes = match keys.aes.len() {
            16 => Aes::K128(Aes128::new_from_slice(&keys.aes).map_err(|_| wrong_password())?),
            32 => Aes::K256(Aes256::new_from_slice(&keys.aes).map_err(|_| wrong_password())?),
            n => return Err(corrupt(format!("encrypted image: AES key of {n} bytes"))),
        };
        Ok(Unlocked {
            aes,
            hmac: keys.hmac.clone(),
            block_size,
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn key_bits(&self) -> u32 {
        match self.aes {
            Aes::K128(_) => 128,
            Aes::K256(_) => 256,
        }
    }

    /// The IV of block `block_no`: the scheme numbers blocks with 32 bits.
    pub fn block_iv(&self, block_no: u64) -> Result<[u8; 16]> {
        let n = u32::try_from(block_no).map_err(|_| {
            Error::Invalid(format!(
                "encrypted image: block {block_no} is past the 32-bit block numbers"
            ))
        })?;
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&self.hmac[..]).expect("any key length");
        mac.update(&n.to_be_bytes());
        let tag = mac.finalize().into_bytes();
        Ok(tag[..16].try_into().unwrap())
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len % self.block_size as usize != 0 {
            return Err(Error::Invalid(format!(
                "encrypted image: {len} bytes is not a whole number of {}-byte blocks",
                self.block_size
            )));
        }
        Ok(())
    }

    /// Decrypts whole blocks in place; `buf[0..block_size]` is block
    /// `first_block`. A block of all zero bytes (a host hole: no real
    /// ciphertext is) decrypts to zeros.
    pub fn decrypt_blocks(&self, first_block: u64, buf: &mut [u8]) -> Result<()> {
        self.check_len(buf.len())?;
        for (i, block) in buf.chunks_exact_mut(self.block_size as usize).enumerate() {
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            let iv = self.block_iv(first_block + i as u64)?.into();
            let len = block.len();
            let r = match &self.aes {
                Aes::K128(k) => cbc::Decryptor::<Aes128>::inner_iv_init(k.clone(), &iv)
                    .decrypt_padded_mut::<NoPadding>(block)
                    .map(|p| p.len()),
                Aes::K256(k) => cbc::Decryptor::<Aes256>::inner_iv_init(k.clone(), &iv)
                    .decrypt_padded_mut::<NoPadding>(block)
                    .map(|p| p.len()),
            };
            debug_assert_eq!(r.ok(), Some(len));
        }
        Ok(())
    }

    /// Encrypts whole blocks in place; see [`Unlocked::decrypt_blocks`].
    pub fn encrypt_blocks(&self, first_block: u64, buf: &mut [u8]) -> Result<()> {
        self.check_len(buf.len())?;
        for (i, block) in buf.chunks_exact_mut(self.block_size as usize).enumerate() {
            let iv = self.block_iv(first_block + i as u64)?.into();
            let len = block.len();
            let r = match &self.aes {
                Aes::K128(k) => cbc::Encryptor::<Aes128>::inner_iv_init(k.clone(), &iv)
                    .encrypt_padded_mut::<NoPadding>(block, len)
                    .map(|c| c.len()),
                Aes::K256(k) => cbc::Encryptor::<Aes256>::inner_iv_init(k.clone(), &iv)
                    .encrypt_padded_mut::<NoPadding>(block, len)
                    .map(|c| c.len()),
            };
            debug_assert_eq!(r.ok(), Some(len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unlocked(bits: u32, bs: u32) -> Unlocked {
        let keys = Keys {
            aes: Zeroizing::new((0..(bits / 8) as u8).collect()),
            hmac: Zeroizing::new([0x11; 20]),
        };
        Unlocked::new(&keys, bs).unwrap()
    }

    #[test]
    fn blocks_round_trip_and_depend_on_the_block_number() {
        for bits in [128, 256] {
            let u = unlocked(bits, 512);
            let plain: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
            let mut a = plain.clone();
            u.encrypt_blocks(5, &mut a).unwrap();
            assert_ne!(a, plain);
            let mut b = plain[512..].to_vec();
            u.encrypt_blocks(6, &mut b).unwrap();
            assert_eq!(a[512..], b[..], "block 6 alone encrypts the same");
            let mut c = plain[..512].to_vec();
            u.encrypt_blocks(6, &mut c).unwrap();
            assert_ne!(a[..512], c[..], "another number, another ciphertext");
            u.decrypt_blocks(5, &mut a).unwrap();
            assert_eq!(a, plain);
        }
    }

    #[test]
    fn zero_ciphertext_reads_as_zeros_and_partial_blocks_are_refused() {
        let u = unlocked(128, 4096);
        let mut z = vec![0u8; 4096];
        u.decrypt_blocks(3, &mut z).unwrap();
        assert_eq!(z, vec![0u8; 4096]);
        assert_eq!(
            u.decrypt_blocks(0, &mut [1u8; 100])
                .unwrap_err()
                .to_string(),
            "encrypted image: 100 bytes is not a whole number of 4096-byte blocks"
        );
        assert_eq!(
            u.block_iv(1 << 32).unwrap_err().to_string(),
            "encrypted image: block 4294967296 is past the 32-bit block numbers"
        );
    }

    #[test]
    fn debug_never_shows_keys() {
        assert_eq!(
            format!("{:?}", unlocked(256, 512)),
            "Unlocked(AES-256, block size 512, keys redacted)"
        );
    }
}

//! Turning a password into the image keys and back: PBKDF2-HMAC-SHA1 gives
//! a 3DES key; v2 decrypts the key blob with it, v1 unwraps two keys with
//! Apple's RFC 3217-style 3DES key wrap. Pure: no I/O.

use cbc::cipher::block_padding::{NoPadding, Pkcs7};
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use des::TdesEde3;
use sha1::Sha1;
use zeroize::Zeroizing;

use super::header_v2::PasswordBlob;
use super::trailer_v1::TrailerV1;
use super::wrong_password;
use crate::error::Result;

type TdesDec = cbc::Decryptor<TdesEde3>;
type TdesEnc = cbc::Encryptor<TdesEde3>;

pub const HMAC_KEY_LEN: usize = 20;
/// What hdiutil appends to the two keys inside a v2 key blob.
pub const BLOB_SUFFIX: &[u8; 5] = b"CKIE\0";
/// The fixed IV of the outer pass of Apple's key wrap (RFC 3217's).
pub const WRAP_IV: [u8; 8] = [0x4a, 0xdd, 0xa2, 0x2c, 0x79, 0xe8, 0x21, 0x05];
/// Bytes before the key in a v1 unwrapped key: 8 not interpreted, then
/// 4 zero bytes.
const V1_KEY_PREFIX: usize = 12;

/// The two secrets of an image; zeroed on drop, never printed.
pub struct Keys {
    /// AES key, 16 or 32 bytes.
    pub aes: Zeroizing<Vec<u8>>,
    /// HMAC-SHA1 key giving each block's IV.
    pub hmac: Zeroizing<[u8; HMAC_KEY_LEN]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(AES-{}, redacted)", self.aes.len() * 8)
    }
}

impl Keys {
    /// Fresh random keys for a new image.
    pub fn random(key_bits: u32) -> Result<Keys> {
        let mut aes = Zeroizing::new(vec![0u8; key_bits as usize / 8]);
        let mut hmac = Zeroizing::new([0u8; HMAC_KEY_LEN]);
        fill_random(&mut aes)?;
        fill_random(&mut hmac[..])?;
        Ok(Keys { aes, hmac })
    }
}

pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| {
        crate::error::Error::io(
            "random bytes for the image keys",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// PBKDF2-HMAC-SHA1 of the password: the 24-byte 3DES key-encryption key.
/// The caller has bounded `iterations`.
pub fn derive_kek(password: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<[u8; 24]> {
    let mut kek = Zeroizing::new([0u8; 24]);
    pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut kek[..]);
    kek
}

/// v2: decrypts the key blob with the password. Its plaintext is the AES
/// key, the HMAC key, then `CKIE\0` (PKCS#7 padded); anything else means
/// the password is wrong.
pub fn unwrap_v2(blob: &PasswordBlob, key_bits: u32, password: &[u8]) -> Result<Keys> {
    let kek = derive_kek(password, &blob.salt, blob.iterations);
    let mut buf = Zeroizing::new(blob.encrypted.clone());
    let plain = TdesDec::new_from_slices(&kek[..], &blob.iv)
        .map_err(|_| wrong_password())?
        .decrypt_padded_mut::<Pkcs7>(&mut buf)
        .map_err(|_| wrong_password())?;
    let klen = key_bits as usize / 8;
    let ok = plain.len() == klen + HMAC_KEY_LEN
        || (plain.len() == klen + HMAC_KEY_LEN + BLOB_SUFFIX.len() && plain.ends_with(BLOB_SUFFIX));
    if !ok {
        return Err(wrong_password());
    }
    Ok(split_keys(
        &plain[..klen],
        &plain[klen..klen + HMAC_KEY_LEN],
    ))
}

/// v2, the inverse: the encrypted key blob for `keys` (as hdiutil lays it
/// out, with the `CKIE\0` suffix).
pub fn wrap_v2(
    keys: &Keys,
    password: &[u8],
    salt: &[u8],
    iv: &[u8; 8],
    iterations: u32,
) -> Vec<u8> {
    let kek = derive_kek(password, salt, iterations);
    let mut plain = Zeroizing::new(Vec::with_capacity(keys.aes.len() + 32));
    plain.extend_from_slice(&keys.aes);
    plain.extend_from_slice(&keys.hmac[..]);
    plain.extend_from_slice(BLOB_SUFFIX);
    let n = plain.len();
    plain.resize(n + 8 - n % 8, 0);
    let out = TdesEnc::new_from_slices(&kek[..], iv)
        .expect("24-byte key and 8-byte IV")
        .encrypt_padded_mut::<Pkcs7>(&mut plain, n)
        .expect("room for the padding")
        .to_vec();
    out
}

/// v1: unwraps the AES and HMAC keys of the trailer.
pub fn unwrap_v1(t: &TrailerV1, password: &[u8]) -> Result<Keys> {
    let kek = derive_kek(password, &t.salt, t.iterations);
    let aes = apple_unwrap(&kek, &t.wrapped_aes_key, t.key_bits as usize / 8)?;
    let hmac = apple_unwrap(&kek, &t.wrapped_hmac_key, HMAC_KEY_LEN)?;
    Ok(split_keys(&aes, &hmac))
}

/// Apple's 3DES key wrap, undone: decrypt CBC with [`WRAP_IV`], reverse
/// the bytes, the first 8 are the IV of a second CBC decryption (PKCS#7).
/// The result is [`V1_KEY_PREFIX`] bytes then the key of `key_len` bytes.
pub fn apple_unwrap(kek: &[u8; 24], wrapped: &[u8], key_len: usize) -> Result<Zeroizing<Vec<u8>>> {
    if wrapped.len() < 16 || wrapped.len() % 8 != 0 {
        return Err(wrong_password());
    }
    let mut temp = Zeroizing::new(wrapped.to_vec());
    TdesDec::new_from_slices(kek, &WRAP_IV)
        .expect("24-byte key and 8-byte IV")
        .decrypt_padded_mut::<NoPadding>(&mut temp)
        .expect("whole blocks");
    temp.reverse();
    let (iv, rest) = temp.split_at_mut(8);
    let plain = TdesDec::new_from_slices(kek, iv)
        .expect("24-byte key and 8-byte IV")
        .decrypt_padded_mut::<Pkcs7>(rest)
        .map_err(|_| wrong_password())?;
    if plain.len() != V1_KEY_PREFIX + key_len || plain[8..12] != [0; 4] {
        return Err(wrong_password());
    }
    Ok(Zeroizing::new(plain[V1_KEY_PREFIX..].to_vec()))
}

fn split_keys(aes: &[u8], hmac: &[u8]) -> Keys {
    let mut h = Zeroizing::new([0u8; HMAC_KEY_LEN]);
    h.copy_from_slice(hmac);
    Keys {
        aes: Zeroizing::new(aes.to_vec()),
        hmac: h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6070 test 2 (PBKDF2-HMAC-SHA1, 2 iterations), first 20 bytes.
    #[test]
    fn pbkdf2_matches_rfc6070() {
        let k = derive_kek(b"password", b"salt", 2);
        assert_eq!(
            k[..20],
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }

    #[test]
    fn v2_wrap_round_trips_and_refuses_other_passwords() {
        let keys = Keys::random(256).unwrap();
        let salt = [7u8; 20];
        let iv = [9u8; 8];
        let enc = wrap_v2(&keys, b"right", &salt, &iv, 3);
        assert_eq!(enc.len(), 64, "32 + 20 + 5 padded to 8");
        let blob = PasswordBlob {
            kdf_algorithm: 103,
            kdf_prng_algorithm: 0,
            iterations: 3,
            salt: salt.to_vec(),
            iv: iv.to_vec(),
            blob_key_bits: 192,
            blob_algorithm: 17,
            blob_padding: 7,
            blob_mode: 6,
            encrypted: enc,
        };
        let back = unwrap_v2(&blob, 256, b"right").unwrap();
        assert_eq!(*back.aes, *keys.aes);
        assert_eq!(*back.hmac, *keys.hmac);
        for pw in [&b"wrong"[..], b"", b"righ", b"right "] {
            assert_eq!(
                unwrap_v2(&blob, 256, pw).unwrap_err().to_string(),
                "wrong password"
            );
        }
        // The right password with the other key size: the length check.
        assert_eq!(
            unwrap_v2(&blob, 128, b"right").unwrap_err().to_string(),
            "wrong password"
        );
    }

    #[test]
    fn debug_never_shows_keys() {
        let keys = Keys {
            aes: Zeroizing::new(vec![0xab; 16]),
            hmac: Zeroizing::new([0xcd; 20]),
        };
        assert_eq!(format!("{keys:?}"), "Keys(AES-128, redacted)");
    }
}

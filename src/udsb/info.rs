//! A sparse bundle's `Info.plist` (and its copy `Info.bckup`): pure
//! encode/decode, no I/O.
//!
//! Invariants of every [`Info`] this module hands out: `band_size` is a
//! multiple of 512 in `512..=MAX_BAND_SIZE` and `size <= MAX_SIZE`, so the
//! end of every band of the disk, `(n + 1) * band_size`, fits in a `u64`
//! and in an `off_t`.

use plist::{Dictionary, Value};

pub const BUNDLE_TYPE: &str = "com.apple.diskimage.sparsebundle";
pub const DICTIONARY_VERSION: &str = "6.0";
/// The only layout that is documented; 2 is Time Machine's newer one.
pub const BACKINGSTORE_VERSION: u64 = 1;
/// What `hdiutil` uses for new bundles (and what its real plist says).
pub const DEFAULT_BAND_SIZE: u64 = 8 << 20;
pub const SECTOR: u64 = 512;
/// Far above any band hdiutil makes (8 MiB by default); a band is one file.
pub const MAX_BAND_SIZE: u64 = 1 << 32;
/// Far above any real disk; keeps every offset and band end inside `off_t`.
pub const MAX_SIZE: u64 = 1 << 60;
/// Real ones are under 1 KiB.
pub const MAX_INFO_LEN: usize = 64 << 10;

pub const KEY_DICTIONARY_VERSION: &str = "CFBundleInfoDictionaryVersion";
pub const KEY_BAND_SIZE: &str = "band-size";
pub const KEY_BACKINGSTORE_VERSION: &str = "bundle-backingstore-version";
pub const KEY_BUNDLE_TYPE: &str = "diskimage-bundle-type";
pub const KEY_SIZE: &str = "size";

/// Why a property list is not one asiffs serves. The messages are one line
/// and name the key; the caller adds the file's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// Broken: not a plist, a key missing or of the wrong type, a value out
    /// of range.
    #[error("{0}")]
    Corrupt(String),
    /// Well formed, but a variant asiffs does not serve (v2, encrypted).
    #[error("{0}")]
    Unsupported(String),
}

/// The decoded plist. The whole dictionary is kept so that keys asiffs does
/// not know survive a rewrite.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub band_size: u64,
    pub size: u64,
    pub dict: Dictionary,
}

impl Info {
    /// The plist of a new bundle, keys in the order hdiutil writes them.
    pub fn new(size: u64, band_size: u64) -> Result<Info, InfoError> {
        check_band_size(&Value::from(band_size))?;
        check_size(&Value::from(size))?;
        let mut d = Dictionary::new();
        d.insert(KEY_DICTIONARY_VERSION.into(), DICTIONARY_VERSION.into());
        d.insert(KEY_BAND_SIZE.into(), band_size.into());
        d.insert(KEY_BACKINGSTORE_VERSION.into(), BACKINGSTORE_VERSION.into());
        d.insert(KEY_BUNDLE_TYPE.into(), BUNDLE_TYPE.into());
        d.insert(KEY_SIZE.into(), size.into());
        Ok(Info {
            band_size,
            size,
            dict: d,
        })
    }

    /// Decodes and validates an XML or binary plist.
    pub fn decode(bytes: &[u8]) -> Result<Info, InfoError> {
        if bytes.len() > MAX_INFO_LEN {
            return Err(corrupt(format!(
                "is {} bytes, more than the {MAX_INFO_LEN} a bundle's plist may be",
                bytes.len()
            )));
        }
        let value = Value::from_reader(std::io::Cursor::new(bytes)).map_err(|e| {
            corrupt(format!(
                "is not a property list ({})",
                one_line(&e.to_string())
            ))
        })?;
        let Value::Dictionary(dict) = value else {
            return Err(corrupt("is not a dictionary".into()));
        };
        if let Some(k) = dict.keys().find(|k| k.to_lowercase().contains("encrypt")) {
            return Err(InfoError::Unsupported(format!(
                "key {:?} marks an encryption asiffs does not know (hdiutil's encrypted bundles keep an encrcdsa header in token)",
                one_line(k)
            )));
        }
        let version = string(&dict, KEY_DICTIONARY_VERSION)?;
        if version != DICTIONARY_VERSION {
            return Err(InfoError::Unsupported(format!(
                "{KEY_DICTIONARY_VERSION} {:?} is not {DICTIONARY_VERSION}",
                one_line(version)
            )));
        }
        let kind = string(&dict, KEY_BUNDLE_TYPE)?;
        if kind != BUNDLE_TYPE {
            return Err(InfoError::Unsupported(format!(
                "{KEY_BUNDLE_TYPE} {:?} is not {BUNDLE_TYPE}",
                one_line(kind)
            )));
        }
        let store = integer(&dict, KEY_BACKINGSTORE_VERSION)?;
        match store.as_unsigned() {
            Some(BACKINGSTORE_VERSION) => {}
            Some(2) => {
                return Err(InfoError::Unsupported(format!(
                    "{KEY_BACKINGSTORE_VERSION} 2 (the newer Time Machine layout) is not \
                     supported; only version 1 is"
                )))
            }
            _ => {
                return Err(InfoError::Unsupported(format!(
                    "{KEY_BACKINGSTORE_VERSION} {store} is not supported; only version 1 is"
                )))
            }
        }
        let band_size = check_band_size(field(&dict, KEY_BAND_SIZE)?)?;
        let size = check_size(field(&dict, KEY_SIZE)?)?;
        // A resize writes the dictionary back as XML, which cannot carry
        // every binary plist value (a UID): refuse those now.
        if let Err(e) = Value::Dictionary(dict.clone()).to_writer_xml(std::io::sink()) {
            return Err(corrupt(format!(
                "holds a value an XML plist cannot carry ({})",
                one_line(&e.to_string())
            )));
        }
        Ok(Info {
            band_size,
            size,
            dict,
        })
    }

    /// The XML plist, as hdiutil lays it out.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        Value::Dictionary(self.dict.clone())
            .to_writer_xml(&mut b)
            .expect("decode and new only make dictionaries XML can carry");
        b.push(b'\n');
        b
    }

    /// The same plist with another size.
    pub fn with_size(&self, size: u64) -> Result<Info, InfoError> {
        check_size(&Value::from(size))?;
        let mut i = self.clone();
        i.size = size;
        i.dict.insert(KEY_SIZE.into(), size.into());
        Ok(i)
    }

    /// Bands that cover the disk; the last may reach past its end.
    pub fn band_count(&self) -> u64 {
        self.size.div_ceil(self.band_size)
    }
}

/// The file name of band `n`: lowercase hex without padding, as hdiutil
/// names them.
pub fn band_name(n: u64) -> String {
    format!("{n:x}")
}

/// The band a file name stands for; `None` for anything hdiutil would not
/// have written (upper case, leading zeros, not hex, too long).
pub fn parse_band_name(name: &str) -> Option<u64> {
    let ok = !name.is_empty()
        && name.len() <= 16
        && (name == "0" || !name.starts_with('0'))
        && name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| u64::from_str_radix(name, 16).ok()).flatten()
}

fn corrupt(msg: String) -> InfoError {
    InfoError::Corrupt(msg)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn field<'a>(d: &'a Dictionary, key: &str) -> Result<&'a Value, InfoError> {
    d.get(key).ok_or_else(|| corrupt(format!("has no {key}")))
}

fn string<'a>(d: &'a Dictionary, key: &str) -> Result<&'a str, InfoError> {
    field(d, key)?
        .as_string()
        .ok_or_else(|| corrupt(format!("{key} is not a string")))
}

fn integer(d: &Dictionary, key: &str) -> Result<plist::Integer, InfoError> {
    match field(d, key)? {
        Value::Integer(i) => Ok(*i),
        _ => Err(corrupt(format!("{key} is not an integer"))),
    }
}

fn check_band_size(v: &Value) -> Result<u64, InfoError> {
    let Value::Integer(i) = v else {
        return Err(corrupt(format!("{KEY_BAND_SIZE} is not an integer")));
    };
    match i.as_unsigned() {
        Some(n) if n != 0 && n % SECTOR == 0 && n <= MAX_BAND_SIZE => Ok(n),
        _ => Err(corrupt(format!(
            "{KEY_BAND_SIZE} {i} is not a multiple of {SECTOR} from {SECTOR} to {MAX_BAND_SIZE}"
        ))),
    }
}

fn check_size(v: &Value) -> Result<u64, InfoError> {
    let Value::Integer(i) = v else {
        return Err(corrupt(format!("{KEY_SIZE} is not an integer")));
    };
    match i.as_unsigned() {
        None => Err(corrupt(format!("{KEY_SIZE} {i} is negative"))),
        Some(n) if n > MAX_SIZE => Err(corrupt(format!(
            "{KEY_SIZE} {n} is larger than the format allows ({MAX_SIZE} bytes)"
        ))),
        Some(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_names_round_trip() {
        for n in [0u64, 1, 9, 10, 0x1f, 0x100, u64::MAX] {
            assert_eq!(parse_band_name(&band_name(n)), Some(n));
        }
        assert_eq!(band_name(0x1f), "1f");
        for bad in [
            "",
            "00",
            "01",
            "1F",
            "g",
            "-1",
            "+1",
            " 1",
            "10000000000000000",
        ] {
            assert_eq!(parse_band_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn refuses_what_xml_cannot_carry() {
        let mut d = Info::new(1 << 20, DEFAULT_BAND_SIZE).unwrap().dict;
        d.insert("uid".into(), Value::Uid(plist::Uid::new(7)));
        let mut bin = Vec::new();
        Value::Dictionary(d).to_writer_binary(&mut bin).unwrap();
        let e = Info::decode(&bin).unwrap_err().to_string();
        assert_eq!(
            e,
            "holds a value an XML plist cannot carry (UidNotSupportedInXmlPlist)"
        );
    }

    #[test]
    fn round_trip_keeps_unknown_keys() {
        let mut i = Info::new(1 << 20, DEFAULT_BAND_SIZE).unwrap();
        i.dict.insert("later-key".into(), Value::Boolean(true));
        let back = Info::decode(&i.encode()).unwrap();
        assert_eq!(back, i);
        let grown = back.with_size(2 << 20).unwrap();
        assert_eq!(grown.dict.get("later-key"), Some(&Value::Boolean(true)));
        assert_eq!(Info::decode(&grown.encode()).unwrap().size, 2 << 20);
    }
}

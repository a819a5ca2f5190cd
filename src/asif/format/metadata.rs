//! The metadata chunk: a 0x200-byte `meta` header followed by an XML
//! property list holding the image's stable uuid and user metadata.

use super::{be_u32, put_u32, put_u64, FormatError};

pub const META_MAGIC: [u8; 4] = *b"meta";
pub const META_HEADER_SIZE: usize = 0x200;
/// Largest property list we accept; real ones are under 512 bytes.
const MAX_PLIST: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// `internal metadata` / `stable uuid`, lowercase as macOS writes it.
    pub stable_uuid: String,
    /// The whole property list, so unknown keys survive a rewrite.
    pub plist: plist::Dictionary,
}

impl Metadata {
    pub fn new(stable_uuid: &str) -> Metadata {
        let mut internal = plist::Dictionary::new();
        internal.insert(
            "stable uuid".into(),
            plist::Value::String(stable_uuid.into()),
        );
        let mut d = plist::Dictionary::new();
        d.insert(
            "internal metadata".into(),
            plist::Value::Dictionary(internal),
        );
        d.insert(
            "user metadata".into(),
            plist::Value::Dictionary(plist::Dictionary::new()),
        );
        Metadata {
            stable_uuid: stable_uuid.into(),
            plist: d,
        }
    }

    /// Decodes the metadata chunk's leading bytes (header + property list).
    pub fn decode(b: &[u8]) -> Result<Metadata, FormatError> {
        let bad = |s: &str| FormatError::BadMetadata(s.to_string());
        if b.len() < META_HEADER_SIZE || b[..4] != META_MAGIC {
            return Err(bad("missing \"meta\" header"));
        }
        if be_u32(b, 4) != 1 {
            return Err(bad("unknown metadata version"));
        }
        // The offset of the property list is a u64 at 0x0C, not 8-aligned.
        let at = u64::from_be_bytes(b[0x0C..0x14].try_into().unwrap());
        let at = usize::try_from(at)
            .ok()
            .filter(|&a| a >= META_HEADER_SIZE && a < b.len())
            .ok_or_else(|| bad("property list offset out of range"))?;
        let rest = &b[at..b.len().min(at + MAX_PLIST)];
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let value = plist::Value::from_reader_xml(&rest[..end])
            .map_err(|e| FormatError::BadMetadata(format!("property list: {e}")))?;
        let plist = value
            .into_dictionary()
            .ok_or_else(|| bad("property list is not a dict"))?;
        let stable_uuid = plist
            .get("internal metadata")
            .and_then(|v| v.as_dictionary())
            .and_then(|d| d.get("stable uuid"))
            .and_then(|v| v.as_string())
            .ok_or_else(|| bad("no stable uuid"))?
            .to_string();
        Ok(Metadata { stable_uuid, plist })
    }

    /// Encodes header and property list, NUL-padded to a whole number of
    /// `block_size` sectors.
    pub fn encode(&self, block_size: usize) -> Vec<u8> {
        let mut b = vec![0u8; META_HEADER_SIZE];
        b[..4].copy_from_slice(&META_MAGIC);
        put_u32(&mut b, 4, 1);
        put_u32(&mut b, 8, META_HEADER_SIZE as u32);
        put_u64(&mut b, 0x0C, META_HEADER_SIZE as u64);
        plist::Value::Dictionary(self.plist.clone())
            .to_writer_xml(&mut b)
            .expect("writing XML into a Vec cannot fail");
        b.push(b'\n');
        b.push(0);
        b.resize(b.len().next_multiple_of(block_size), 0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Metadata::new("13db9632-b79f-4e95-aada-835d5ef97bba");
        let b = m.encode(512);
        assert_eq!(b.len() % 512, 0);
        assert_eq!(Metadata::decode(&b).unwrap(), m);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Metadata::decode(&[0u8; 1024]).is_err());
        let mut b = Metadata::new("x").encode(512);
        b[0x200..0x210].copy_from_slice(b"<not a plist!!!>");
        assert!(matches!(
            Metadata::decode(&b),
            Err(FormatError::BadMetadata(_))
        ));
    }
}

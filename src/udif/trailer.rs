//! The 512-byte `koly` trailer at the end of every UDIF image.
//!
//! Decoding checks only what the trailer says about itself; where its
//! ranges lie against the file is checked by [`Koly::validate`].

use super::Malformed;

pub const TRAILER_SIZE: usize = 512;
pub const KOLY_MAGIC: &[u8; 4] = b"koly";
/// The only trailer version hdiutil has written since UDIF began.
pub const KOLY_VERSION: u32 = 4;
/// Checksum types: none, and CRC32 (the only one asiffs verifies).
pub const CHECKSUM_NONE: u32 = 0;
pub const CHECKSUM_CRC32: u32 = 2;

/// A checksum field: type, size in bits and up to 128 bytes of value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub kind: u32,
    pub bits: u32,
    pub value: [u8; 128],
}

impl Checksum {
    pub const NONE: Checksum = Checksum {
        kind: CHECKSUM_NONE,
        bits: 0,
        value: [0; 128],
    };

    pub fn crc32(crc: u32) -> Checksum {
        let mut value = [0u8; 128];
        value[..4].copy_from_slice(&crc.to_be_bytes());
        Checksum {
            kind: CHECKSUM_CRC32,
            bits: 32,
            value,
        }
    }

    /// The stored CRC32, when this is one.
    pub fn as_crc32(&self) -> Option<u32> {
        (self.kind == CHECKSUM_CRC32).then(|| be32(&self.value, 0))
    }

    pub(crate) fn decode(b: &[u8]) -> Checksum {
        let mut value = [0u8; 128];
        value.copy_from_slice(&b[8..136]);
        Checksum {
            kind: be32(b, 0),
            bits: be32(b, 4),
            value,
        }
    }

    pub(crate) fn encode(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.kind.to_be_bytes());
        b[4..8].copy_from_slice(&self.bits.to_be_bytes());
        b[8..136].copy_from_slice(&self.value);
    }
}

/// The trailer's fields (all big-endian on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Koly {
    pub version: u32,
    pub header_size: u32,
    pub flags: u32,
    pub running_data_fork_offset: u64,
    pub data_fork_offset: u64,
    pub data_fork_length: u64,
    pub rsrc_fork_offset: u64,
    pub rsrc_fork_length: u64,
    pub segment_number: u32,
    pub segment_count: u32,
    pub segment_id: [u8; 16],
    pub data_checksum: Checksum,
    pub plist_offset: u64,
    pub plist_length: u64,
    pub master_checksum: Checksum,
    pub image_variant: u32,
    pub sector_count: u64,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Koly {
    /// Decodes the last 512 bytes of an image.
    pub fn decode(b: &[u8]) -> Result<Koly, Malformed> {
        if b.len() < TRAILER_SIZE {
            return Err(Malformed(format!(
                "koly trailer is truncated ({} of {TRAILER_SIZE} bytes)",
                b.len()
            )));
        }
        if &b[0..4] != KOLY_MAGIC {
            return Err(Malformed(
                "no koly trailer in the last 512 bytes (not a UDIF image, or truncated)".into(),
            ));
        }
        let k = Koly {
            version: be32(b, 0x04),
            header_size: be32(b, 0x08),
            flags: be32(b, 0x0C),
            running_data_fork_offset: be64(b, 0x10),
            data_fork_offset: be64(b, 0x18),
            data_fork_length: be64(b, 0x20),
            rsrc_fork_offset: be64(b, 0x28),
            rsrc_fork_length: be64(b, 0x30),
            segment_number: be32(b, 0x38),
            segment_count: be32(b, 0x3C),
            segment_id: b[0x40..0x50].try_into().expect("16 bytes"),
            data_checksum: Checksum::decode(&b[0x50..0xD8]),
            plist_offset: be64(b, 0xD8),
            plist_length: be64(b, 0xE0),
            master_checksum: Checksum::decode(&b[0x160..0x1E8]),
            image_variant: be32(b, 0x1E8),
            sector_count: be64(b, 0x1EC),
        };
        if k.version != KOLY_VERSION {
            return Err(Malformed(format!(
                "koly trailer version {} (only {KOLY_VERSION} is known)",
                k.version
            )));
        }
        if k.header_size != TRAILER_SIZE as u32 {
            return Err(Malformed(format!(
                "koly trailer says it is {} bytes long, not {TRAILER_SIZE}",
                k.header_size
            )));
        }
        Ok(k)
    }

    pub fn encode(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..4].copy_from_slice(KOLY_MAGIC);
        b[0x04..0x08].copy_from_slice(&self.version.to_be_bytes());
        b[0x08..0x0C].copy_from_slice(&self.header_size.to_be_bytes());
        b[0x0C..0x10].copy_from_slice(&self.flags.to_be_bytes());
        b[0x10..0x18].copy_from_slice(&self.running_data_fork_offset.to_be_bytes());
        b[0x18..0x20].copy_from_slice(&self.data_fork_offset.to_be_bytes());
        b[0x20..0x28].copy_from_slice(&self.data_fork_length.to_be_bytes());
        b[0x28..0x30].copy_from_slice(&self.rsrc_fork_offset.to_be_bytes());
        b[0x30..0x38].copy_from_slice(&self.rsrc_fork_length.to_be_bytes());
        b[0x38..0x3C].copy_from_slice(&self.segment_number.to_be_bytes());
        b[0x3C..0x40].copy_from_slice(&self.segment_count.to_be_bytes());
        b[0x40..0x50].copy_from_slice(&self.segment_id);
        self.data_checksum.encode(&mut b[0x50..0xD8]);
        b[0xD8..0xE0].copy_from_slice(&self.plist_offset.to_be_bytes());
        b[0xE0..0xE8].copy_from_slice(&self.plist_length.to_be_bytes());
        self.master_checksum.encode(&mut b[0x160..0x1E8]);
        b[0x1E8..0x1EC].copy_from_slice(&self.image_variant.to_be_bytes());
        b[0x1EC..0x1F4].copy_from_slice(&self.sector_count.to_be_bytes());
        b
    }

    /// Checks the trailer's ranges against an image file of `file_len`
    /// bytes (trailer included): the data fork and the plist must lie
    /// before the trailer. Segmented and plist-less images are refused.
    pub fn validate(&self, file_len: u64) -> Result<(), Malformed> {
        let body = file_len.checked_sub(TRAILER_SIZE as u64).ok_or_else(|| {
            Malformed(format!(
                "file of {file_len} bytes has no room for a trailer"
            ))
        })?;
        if self.segment_count > 1 {
            return Err(Malformed(format!(
                "segmented image (segment {} of {}) is not supported",
                self.segment_number, self.segment_count
            )));
        }
        if self.plist_length == 0 {
            return Err(Malformed(
                "image has no XML property list (resource-fork-only images are not supported)"
                    .into(),
            ));
        }
        inside(
            "XML property list",
            self.plist_offset,
            self.plist_length,
            body,
        )?;
        inside(
            "data fork",
            self.data_fork_offset,
            self.data_fork_length,
            body,
        )?;
        if self.sector_count.checked_mul(512).is_none() {
            return Err(Malformed(format!(
                "sector count {} overflows a byte size",
                self.sector_count
            )));
        }
        Ok(())
    }
}

fn inside(what: &str, offset: u64, len: u64, body: u64) -> Result<(), Malformed> {
    match offset.checked_add(len) {
        Some(end) if end <= body => Ok(()),
        _ => Err(Malformed(format!(
            "{what} at {offset:#x}+{len:#x} runs past the end of the file ({body} bytes before the trailer)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Koly {
        Koly {
            version: 4,
            header_size: 512,
            flags: 1,
            running_data_fork_offset: 0,
            data_fork_offset: 0,
            data_fork_length: 0x4019,
            rsrc_fork_offset: 0,
            rsrc_fork_length: 0,
            segment_number: 0,
            segment_count: 0,
            segment_id: [7; 16],
            data_checksum: Checksum::NONE,
            plist_offset: 0x4019,
            plist_length: 0x2048,
            master_checksum: Checksum::crc32(0x0dc0_386c),
            image_variant: 1,
            sector_count: 3836,
        }
    }

    #[test]
    fn round_trip_and_field_offsets() {
        let k = sample();
        let b = k.encode();
        assert_eq!(&b[0..4], b"koly");
        assert_eq!(be64(&b, 0xD8), 0x4019);
        assert_eq!(be32(&b, 0x160), 2);
        assert_eq!(be32(&b, 0x168), 0x0dc0_386c);
        assert_eq!(be64(&b, 0x1EC), 3836);
        assert_eq!(Koly::decode(&b).unwrap(), k);
    }

    #[test]
    fn refuses_bad_trailers() {
        let mut b = sample().encode();
        assert_eq!(
            Koly::decode(&b[..100]).unwrap_err().0,
            "koly trailer is truncated (100 of 512 bytes)"
        );
        b[0x04..0x08].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(
            Koly::decode(&b).unwrap_err().0,
            "koly trailer version 5 (only 4 is known)"
        );
        b[0] = b'x';
        assert_eq!(
            Koly::decode(&b).unwrap_err().0,
            "no koly trailer in the last 512 bytes (not a UDIF image, or truncated)"
        );
    }

    #[test]
    fn validate_ranges() {
        let k = sample();
        assert!(k.validate(0x4019 + 0x2048 + 512).is_ok());
        assert_eq!(
            k.validate(0x4019 + 0x2047 + 512).unwrap_err().0,
            "XML property list at 0x4019+0x2048 runs past the end of the file (24672 bytes before the trailer)"
        );
        let mut k2 = k.clone();
        k2.plist_offset = u64::MAX;
        assert!(k2
            .validate(1 << 20)
            .unwrap_err()
            .0
            .starts_with("XML property list at 0xffffffffffffffff+0x2048 runs past"));
        let mut k3 = k.clone();
        k3.segment_count = 3;
        k3.segment_number = 1;
        assert_eq!(
            k3.validate(1 << 20).unwrap_err().0,
            "segmented image (segment 1 of 3) is not supported"
        );
        let mut k4 = k;
        k4.sector_count = u64::MAX / 2;
        assert_eq!(
            k4.validate(1 << 20).unwrap_err().0,
            format!("sector count {} overflows a byte size", u64::MAX / 2)
        );
    }
}

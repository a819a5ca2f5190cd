//! The 0x200-byte header at file offset 0.

use super::{be_u16, be_u32, be_u64, put_u16, put_u32, put_u64, FormatError};

pub const MAGIC: [u8; 4] = *b"shdw";
pub const VERSION: u32 = 1;
/// Size of the header area; everything after the known fields is zero.
pub const HEADER_SIZE: usize = 0x200;

/// Byte offsets of the header fields.
pub(crate) mod off {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x04;
    pub const HEADER_SIZE: usize = 0x08;
    pub const FLAGS: usize = 0x0C;
    pub const DIR_A: usize = 0x10;
    pub const DIR_B: usize = 0x18;
    pub const UUID: usize = 0x20;
    pub const SECTOR_COUNT: usize = 0x30;
    pub const MAX_SECTOR_COUNT: usize = 0x38;
    pub const CHUNK_SIZE: usize = 0x40;
    pub const BLOCK_SIZE: usize = 0x44;
    pub const SEGMENT_COUNT: usize = 0x46;
    pub const METADATA_CHUNK: usize = 0x48;
    pub const UNKNOWN: usize = 0x50;
    pub const READ_ONLY_FLAGS: usize = 0x60;
    pub const METADATA_FLAGS: usize = 0x64;
    pub const METADATA_READ_ONLY_FLAGS: usize = 0x68;
    pub const END: usize = 0x6C;
}

/// Decoded header. Fields whose meaning is unknown are kept so that a
/// rewrite (resize) preserves them exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub directory_offsets: [u64; 2],
    pub uuid: [u8; 16],
    pub sector_count: u64,
    pub max_sector_count: u64,
    pub chunk_size: u32,
    pub block_size: u16,
    pub segment_count: u16,
    pub metadata_chunk: u64,
    pub unknown: [u8; 16],
    pub read_only_flags: u32,
    pub metadata_flags: u32,
    pub metadata_read_only_flags: u32,
}

impl Header {
    /// Decodes the header and checks the fields that do not depend on
    /// geometry; [`super::Geometry::new`] checks the rest.
    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < off::END {
            return Err(FormatError::Truncated(b.len(), HEADER_SIZE));
        }
        let magic: [u8; 4] = b[off::MAGIC..off::MAGIC + 4].try_into().unwrap();
        if magic != MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let version = be_u32(b, off::VERSION);
        if version != VERSION {
            return Err(FormatError::BadVersion(version));
        }
        let header_size = be_u32(b, off::HEADER_SIZE);
        if header_size as usize != HEADER_SIZE {
            return Err(FormatError::field(
                "header size",
                header_size.into(),
                "expected 0x200",
            ));
        }
        let h = Header {
            flags: be_u32(b, off::FLAGS),
            directory_offsets: [be_u64(b, off::DIR_A), be_u64(b, off::DIR_B)],
            uuid: b[off::UUID..off::UUID + 16].try_into().unwrap(),
            sector_count: be_u64(b, off::SECTOR_COUNT),
            max_sector_count: be_u64(b, off::MAX_SECTOR_COUNT),
            chunk_size: be_u32(b, off::CHUNK_SIZE),
            block_size: be_u16(b, off::BLOCK_SIZE),
            segment_count: be_u16(b, off::SEGMENT_COUNT),
            metadata_chunk: be_u64(b, off::METADATA_CHUNK),
            unknown: b[off::UNKNOWN..off::UNKNOWN + 16].try_into().unwrap(),
            read_only_flags: be_u32(b, off::READ_ONLY_FLAGS),
            metadata_flags: be_u32(b, off::METADATA_FLAGS),
            metadata_read_only_flags: be_u32(b, off::METADATA_READ_ONLY_FLAGS),
        };
        if h.segment_count != 0 {
            return Err(FormatError::field(
                "segment count",
                h.segment_count.into(),
                "segmented images are not supported (macOS refuses them too)",
            ));
        }
        Ok(h)
    }

    /// Encodes the full 0x200-byte header area.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[off::MAGIC..off::MAGIC + 4].copy_from_slice(&MAGIC);
        put_u32(&mut b, off::VERSION, VERSION);
        put_u32(&mut b, off::HEADER_SIZE, HEADER_SIZE as u32);
        put_u32(&mut b, off::FLAGS, self.flags);
        put_u64(&mut b, off::DIR_A, self.directory_offsets[0]);
        put_u64(&mut b, off::DIR_B, self.directory_offsets[1]);
        b[off::UUID..off::UUID + 16].copy_from_slice(&self.uuid);
        put_u64(&mut b, off::SECTOR_COUNT, self.sector_count);
        put_u64(&mut b, off::MAX_SECTOR_COUNT, self.max_sector_count);
        put_u32(&mut b, off::CHUNK_SIZE, self.chunk_size);
        put_u16(&mut b, off::BLOCK_SIZE, self.block_size);
        put_u16(&mut b, off::SEGMENT_COUNT, self.segment_count);
        put_u64(&mut b, off::METADATA_CHUNK, self.metadata_chunk);
        b[off::UNKNOWN..off::UNKNOWN + 16].copy_from_slice(&self.unknown);
        put_u32(&mut b, off::READ_ONLY_FLAGS, self.read_only_flags);
        put_u32(&mut b, off::METADATA_FLAGS, self.metadata_flags);
        put_u32(
            &mut b,
            off::METADATA_READ_ONLY_FLAGS,
            self.metadata_read_only_flags,
        );
        b
    }

    /// Virtual disk size in bytes (saturating: geometry validation rejects
    /// the overflow with a clear error).
    pub fn size(&self) -> u64 {
        self.sector_count.saturating_mul(self.block_size.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            flags: 0,
            directory_offsets: [0x200, 0x41400],
            uuid: [7; 16],
            sector_count: 1_000_000,
            max_sector_count: 1 << 43,
            chunk_size: 1 << 20,
            block_size: 512,
            segment_count: 0,
            metadata_chunk: 0xFFFF_FFFF,
            unknown: [0; 16],
            read_only_flags: 0,
            metadata_flags: 0,
            metadata_read_only_flags: 0,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[..4], b"shdw");
        assert_eq!(&b[0x30..0x38], &1_000_000u64.to_be_bytes());
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn rejects_bad_magic_version_size_segments() {
        let mut b = sample().encode();
        b[0] = b'x';
        assert_eq!(Header::decode(&b), Err(FormatError::BadMagic(*b"xhdw")));
        let mut b = sample().encode();
        b[7] = 2;
        assert_eq!(Header::decode(&b), Err(FormatError::BadVersion(2)));
        let mut b = sample().encode();
        b[0x0A] = 4;
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadField {
                field: "header size",
                ..
            })
        ));
        let mut b = sample().encode();
        b[0x47] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadField {
                field: "segment count",
                ..
            })
        ));
        assert_eq!(
            Header::decode(&b[..16]),
            Err(FormatError::Truncated(16, 0x200))
        );
    }
}

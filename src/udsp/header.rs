//! The 4096-byte header node at file offset 0 (pure encode/decode).
//!
//! Every value taken from the file is checked before use: the sector
//! counts must agree, the band count must fit 32-bit band ids, and the
//! byte size must fit 64 bits.

use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"sprs";
pub const VERSION: u32 = 3;
pub const SECTOR: u64 = 512;
/// Size of every node, header or index.
pub const NODE_SIZE: u64 = 4096;
/// Band ids the header node holds.
pub const HEADER_SLOTS: usize = 1008;
/// Band size `hdiutil` uses unless told otherwise: 2048 sectors.
pub const DEFAULT_BAND_SIZE: u64 = 1 << 20;

/// Byte offsets of the header node's fields.
pub(crate) mod off {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x04;
    pub const SECTORS_PER_BAND: usize = 0x08;
    pub const FLAGS: usize = 0x0C;
    pub const SECTOR_COUNT_LOW: usize = 0x10;
    pub const NEXT_NODE: usize = 0x14;
    pub const SECTOR_COUNT: usize = 0x1C;
    pub const RESERVED: usize = 0x24;
    pub const SLOTS: usize = 0x40;
}

/// Where asiffs records a band move in progress (see `compact.rs`): a tag
/// and two global slot numbers inside the header's reserved bytes, in the
/// header's first sector so that it lands whole or not at all.
pub(crate) mod intent {
    pub const AT: usize = super::off::RESERVED;
    pub const TAG: [u8; 4] = *b"asmv";
    pub const LEN: usize = 20;
}

/// The decoded header node. The reserved bytes are kept as read so that a
/// rewrite of the first sector preserves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub sectors_per_band: u32,
    pub flags: u32,
    /// Offset of the first index node; 0 when there is none.
    pub next_node: u64,
    pub sector_count: u64,
    pub reserved: [u8; 28],
    /// Band id per slot (logical band + 1; 0 = empty).
    pub slots: Vec<u32>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A magic as a user reads it: quoted when printable ASCII, else hex.
pub(crate) fn show_magic(m: &[u8]) -> String {
    let plain = |b: &u8| (b.is_ascii_graphic() || *b == b' ') && !matches!(b, b'"' | b'\\');
    if m.iter().all(plain) {
        format!("\"{}\"", String::from_utf8_lossy(m))
    } else {
        let mut s = String::from("0x");
        for b in m {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl Header {
    /// A fresh header for a disk of `sector_count` sectors.
    pub fn new(sector_count: u64, sectors_per_band: u32) -> Result<Header> {
        let h = Header {
            version: VERSION,
            sectors_per_band,
            flags: 1,
            next_node: 0,
            sector_count,
            reserved: [0; 28],
            slots: vec![0; HEADER_SLOTS],
        };
        h.validate()?;
        Ok(h)
    }

    pub fn decode(b: &[u8]) -> Result<Header> {
        let magic = &b[..b.len().min(4)];
        if magic != MAGIC {
            return Err(Error::Invalid(format!(
                "not a UDSP sparse image (magic {}, expected \"sprs\")",
                show_magic(magic)
            )));
        }
        if b.len() < NODE_SIZE as usize {
            return Err(Error::Corrupt(format!(
                "header node is truncated ({} bytes, need {NODE_SIZE})",
                b.len()
            )));
        }
        let low = be32(b, off::SECTOR_COUNT_LOW);
        let wide = be64(b, off::SECTOR_COUNT);
        if wide != 0 && wide as u32 != low {
            return Err(Error::Corrupt(format!(
                "sector counts disagree: low 32 bits {low:#x}, 64-bit count {wide:#x}"
            )));
        }
        let h = Header {
            version: be32(b, off::VERSION),
            sectors_per_band: be32(b, off::SECTORS_PER_BAND),
            flags: be32(b, off::FLAGS),
            next_node: be64(b, off::NEXT_NODE),
            // Writers that keep only the low field leave the wide one zero.
            sector_count: if wide == 0 { u64::from(low) } else { wide },
            reserved: b[off::RESERVED..off::SLOTS].try_into().expect("28 bytes"),
            slots: (0..HEADER_SLOTS)
                .map(|k| be32(b, off::SLOTS + 4 * k))
                .collect(),
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<()> {
        if self.version != VERSION {
            return Err(Error::Corrupt(format!(
                "unsupported UDSP version {} (only version {VERSION} is known)",
                self.version
            )));
        }
        if self.sectors_per_band == 0 {
            return Err(Error::Corrupt("band size is 0 sectors".into()));
        }
        if self.sector_count.checked_mul(SECTOR).is_none() {
            return Err(Error::Corrupt(format!(
                "sector count {:#x} overflows a 64-bit byte size",
                self.sector_count
            )));
        }
        let bands = self.bands();
        if bands > u64::from(u32::MAX) {
            return Err(Error::Corrupt(format!(
                "{bands} bands do not fit 32-bit band ids"
            )));
        }
        Ok(())
    }

    /// Bytes per band.
    pub fn band_size(&self) -> u64 {
        u64::from(self.sectors_per_band) * SECTOR
    }

    /// Virtual disk size in bytes (checked at decode).
    pub fn size(&self) -> u64 {
        self.sector_count * SECTOR
    }

    /// Logical bands covering the disk; the last may be partial.
    pub fn bands(&self) -> u64 {
        self.sector_count
            .div_ceil(u64::from(self.sectors_per_band.max(1)))
    }

    /// The band move recorded by an interrupted compaction, as global
    /// slot numbers (from, to).
    pub fn move_intent(&self) -> Option<(u64, u64)> {
        let r = &self.reserved;
        (r[..4] == intent::TAG).then(|| (be64(r, 4), be64(r, 12)))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; NODE_SIZE as usize];
        b[..off::SLOTS].copy_from_slice(&self.encode_fields());
        for (k, id) in self.slots.iter().enumerate().take(HEADER_SLOTS) {
            b[off::SLOTS + 4 * k..off::SLOTS + 4 * k + 4].copy_from_slice(&id.to_be_bytes());
        }
        b
    }

    /// The 64 bytes before the band ids: one write inside the first sector.
    pub fn encode_fields(&self) -> [u8; off::SLOTS] {
        let mut b = [0u8; off::SLOTS];
        b[off::MAGIC..off::MAGIC + 4].copy_from_slice(&MAGIC);
        b[off::VERSION..off::VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        b[off::SECTORS_PER_BAND..off::SECTORS_PER_BAND + 4]
            .copy_from_slice(&self.sectors_per_band.to_be_bytes());
        b[off::FLAGS..off::FLAGS + 4].copy_from_slice(&self.flags.to_be_bytes());
        b[off::SECTOR_COUNT_LOW..off::SECTOR_COUNT_LOW + 4]
            .copy_from_slice(&(self.sector_count as u32).to_be_bytes());
        b[off::NEXT_NODE..off::NEXT_NODE + 8].copy_from_slice(&self.next_node.to_be_bytes());
        b[off::SECTOR_COUNT..off::SECTOR_COUNT + 8]
            .copy_from_slice(&self.sector_count.to_be_bytes());
        b[off::RESERVED..off::SLOTS].copy_from_slice(&self.reserved);
        b
    }
}

/// The reserved bytes recording a move from global slot `from` to `to`
/// (`None`: no move, all zeros).
pub(crate) fn encode_intent(m: Option<(u64, u64)>) -> [u8; intent::LEN] {
    let mut b = [0u8; intent::LEN];
    if let Some((from, to)) = m {
        b[..4].copy_from_slice(&intent::TAG);
        b[4..12].copy_from_slice(&from.to_be_bytes());
        b[12..20].copy_from_slice(&to.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Vec<u8> {
        Header::new(4096, 2048).unwrap().encode()
    }

    #[test]
    fn round_trip_and_layout() {
        let mut h = Header::new((5u64 << 32) + 7, 2048).unwrap();
        h.slots[0] = 3;
        h.slots[HEADER_SLOTS - 1] = 9;
        h.next_node = 0x1234_5678_9abc;
        let b = h.encode();
        assert_eq!(&b[..16], b"sprs\0\0\0\x03\0\0\x08\0\0\0\0\x01");
        assert_eq!(&b[0x10..0x14], &7u32.to_be_bytes());
        assert_eq!(&b[0x14..0x1C], &0x1234_5678_9abcu64.to_be_bytes());
        assert_eq!(&b[0x1C..0x24], &((5u64 << 32) + 7).to_be_bytes());
        assert_eq!(&b[0x40..0x44], &3u32.to_be_bytes());
        assert_eq!(&b[4092..], &9u32.to_be_bytes());
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert_eq!(h.band_size(), 1 << 20);
        assert_eq!(h.bands(), ((5u64 << 32) + 7).div_ceil(2048));
    }

    #[test]
    fn hostile_fields_are_one_line_errors() {
        let err = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = fresh();
            f(&mut b);
            Header::decode(&b).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|b| b[0] = b'x'),
            "not a UDSP sparse image (magic \"xprs\", expected \"sprs\")"
        );
        assert_eq!(
            err(&|b| b[..4].fill(0)),
            "not a UDSP sparse image (magic 0x00000000, expected \"sprs\")"
        );
        assert_eq!(
            err(&|b| b[7] = 2),
            "corrupt image: unsupported UDSP version 2 (only version 3 is known)"
        );
        assert_eq!(
            err(&|b| b[8..12].fill(0)),
            "corrupt image: band size is 0 sectors"
        );
        assert_eq!(
            err(&|b| b[0x13] = 1),
            "corrupt image: sector counts disagree: low 32 bits 0x1001, 64-bit count 0x1000"
        );
        assert_eq!(
            err(&|b| {
                b[0x10..0x14].fill(0xff);
                b[0x1C..0x24].fill(0xff);
            }),
            "corrupt image: sector count 0xffffffffffffffff overflows a 64-bit byte size"
        );
        assert_eq!(
            err(&|b| {
                b[8..12].copy_from_slice(&1u32.to_be_bytes());
                b[0x10..0x14].fill(0xff);
                b[0x1C..0x24].copy_from_slice(&(1u64 << 40 | 0xffff_ffff).to_be_bytes());
            }),
            "corrupt image: 1103806595071 bands do not fit 32-bit band ids"
        );
        assert_eq!(
            Header::decode(&fresh()[..100]).unwrap_err().to_string(),
            "corrupt image: header node is truncated (100 bytes, need 4096)"
        );
    }

    #[test]
    fn only_the_low_count_is_accepted() {
        let mut b = fresh();
        b[0x1C..0x24].fill(0);
        assert_eq!(Header::decode(&b).unwrap().sector_count, 4096);
    }

    #[test]
    fn intent_round_trip() {
        let mut h = Header::new(4096, 8).unwrap();
        assert_eq!(h.move_intent(), None);
        h.reserved[..20].copy_from_slice(&encode_intent(Some((1011, 5))));
        let back = Header::decode(&h.encode()).unwrap();
        assert_eq!(back.move_intent(), Some((1011, 5)));
        assert_eq!(encode_intent(None), [0; 20]);
    }
}

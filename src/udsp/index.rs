//! An index node (pure encode/decode): 4096 bytes appended after the bands
//! of a full node, holding the band ids of the next 1010 slots.

use super::header::{show_magic, MAGIC, NODE_SIZE};
use crate::error::{Error, Result};

/// Band ids an index node holds.
pub const INDEX_SLOTS: usize = 1010;

pub(crate) mod off {
    pub const MAGIC: usize = 0x00;
    pub const NUMBER: usize = 0x04;
    pub const FLAGS: usize = 0x08;
    pub const NEXT_NODE: usize = 0x0C;
    pub const SLOTS: usize = 0x38;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexNode {
    /// Position in the chain as the writer numbered it (1 for the first).
    pub number: u32,
    pub flags: u32,
    /// Offset of the next index node; 0 when this is the last.
    pub next_node: u64,
    /// Band id per slot (logical band + 1; 0 = empty).
    pub slots: Vec<u32>,
}

impl IndexNode {
    pub fn new(number: u32) -> IndexNode {
        IndexNode {
            number,
            flags: 1,
            next_node: 0,
            slots: vec![0; INDEX_SLOTS],
        }
    }

    /// Decodes the node read at `at` (named in errors).
    pub fn decode(b: &[u8], at: u64) -> Result<IndexNode> {
        if b.len() < NODE_SIZE as usize {
            return Err(Error::Corrupt(format!(
                "index node at {at:#x} is truncated ({} bytes, need {NODE_SIZE})",
                b.len()
            )));
        }
        let magic = &b[off::MAGIC..off::MAGIC + 4];
        if magic != MAGIC {
            return Err(Error::Corrupt(format!(
                "index node at {at:#x} has magic {}, expected \"sprs\"",
                show_magic(magic)
            )));
        }
        let be32 = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(IndexNode {
            number: be32(off::NUMBER),
            flags: be32(off::FLAGS),
            next_node: u64::from_be_bytes(
                b[off::NEXT_NODE..off::NEXT_NODE + 8]
                    .try_into()
                    .expect("8 bytes"),
            ),
            slots: (0..INDEX_SLOTS).map(|k| be32(off::SLOTS + 4 * k)).collect(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; NODE_SIZE as usize];
        b[off::MAGIC..off::MAGIC + 4].copy_from_slice(&MAGIC);
        b[off::NUMBER..off::NUMBER + 4].copy_from_slice(&self.number.to_be_bytes());
        b[off::FLAGS..off::FLAGS + 4].copy_from_slice(&self.flags.to_be_bytes());
        b[off::NEXT_NODE..off::NEXT_NODE + 8].copy_from_slice(&self.next_node.to_be_bytes());
        for (k, id) in self.slots.iter().enumerate().take(INDEX_SLOTS) {
            b[off::SLOTS + 4 * k..off::SLOTS + 4 * k + 4].copy_from_slice(&id.to_be_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let mut n = IndexNode::new(2);
        n.next_node = 0xABCD_0000;
        n.slots[0] = 7;
        n.slots[INDEX_SLOTS - 1] = 1;
        let b = n.encode();
        assert_eq!(&b[..12], b"sprs\0\0\0\x02\0\0\0\x01");
        assert_eq!(&b[0x0C..0x14], &0xABCD_0000u64.to_be_bytes());
        assert!(b[0x14..0x38].iter().all(|&x| x == 0));
        assert_eq!(&b[0x38..0x3C], &7u32.to_be_bytes());
        assert_eq!(&b[4092..], &1u32.to_be_bytes());
        assert_eq!(IndexNode::decode(&b, 0).unwrap(), n);
    }

    #[test]
    fn bad_magic_and_truncation() {
        let mut b = IndexNode::new(1).encode();
        b[..4].fill(0);
        assert_eq!(
            IndexNode::decode(&b, 0x5000).unwrap_err().to_string(),
            "corrupt image: index node at 0x5000 has magic 0x00000000, expected \"sprs\""
        );
        assert_eq!(
            IndexNode::decode(&b[..10], 0x5000).unwrap_err().to_string(),
            "corrupt image: index node at 0x5000 is truncated (10 bytes, need 4096)"
        );
    }
}

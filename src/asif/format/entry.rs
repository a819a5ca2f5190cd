//! Data-chunk and bitmap-chunk entries of a chunk-group.

/// Bits 0-54: physical chunk number.
const CHUNK_MASK: u64 = (1 << 55) - 1;
/// Bits 55-61: reserved. Always zero in real images; preserved on rewrite.
const RESERVED_MASK: u64 = ((1 << 62) - 1) & !CHUNK_MASK;
const STATE_SHIFT: u32 = 62;

/// The meaning of a data-chunk entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// `00`, chunk 0: never written, reads as zeros.
    Unwritten,
    /// `01`, chunk n: every sector of chunk n is valid.
    Full(u64),
    /// `11`, chunk n: per-sector state lives in the group's bitmap chunk.
    Partial(u64),
    /// `10`, chunk 0: discarded, reads as zeros.
    Unmapped,
}

/// A raw data-chunk entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkEntry(pub u64);

impl ChunkEntry {
    /// Decodes the entry, or `None` if it breaks the rules (a chunk number
    /// with a zeros state, a missing one with a data state, reserved bits).
    pub fn state(self) -> Option<ChunkState> {
        if self.0 & RESERVED_MASK != 0 {
            return None;
        }
        let n = self.0 & CHUNK_MASK;
        match (self.0 >> STATE_SHIFT, n) {
            (0b00, 0) => Some(ChunkState::Unwritten),
            (0b01, n) if n > 0 => Some(ChunkState::Full(n)),
            (0b11, n) if n > 0 => Some(ChunkState::Partial(n)),
            (0b10, 0) => Some(ChunkState::Unmapped),
            _ => None,
        }
    }

    pub fn encode(state: ChunkState) -> ChunkEntry {
        let (bits, n) = match state {
            ChunkState::Unwritten => (0b00, 0),
            ChunkState::Full(n) => (0b01, n),
            ChunkState::Partial(n) => (0b11, n),
            ChunkState::Unmapped => (0b10, 0),
        };
        debug_assert!(n <= CHUNK_MASK);
        ChunkEntry((bits << STATE_SHIFT) | (n & CHUNK_MASK))
    }

    /// The physical chunk this entry points at, if any.
    pub fn chunk(self) -> Option<u64> {
        match self.state()? {
            ChunkState::Full(n) | ChunkState::Partial(n) => Some(n),
            _ => None,
        }
    }
}

/// A bitmap-chunk entry: a plain chunk number, 0 when the group has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapEntry(pub u64);

/// A bitmap entry with flag or reserved bits set: out of rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagBits;

impl BitmapEntry {
    /// `Ok(None)` when absent, `Err` when flag or reserved bits are set.
    pub fn chunk(self) -> Result<Option<u64>, FlagBits> {
        match self.0 {
            0 => Ok(None),
            n if n & !CHUNK_MASK != 0 => Err(FlagBits),
            n => Ok(Some(n)),
        }
    }
}

/// The largest physical chunk number an entry can hold.
pub const MAX_CHUNK_NUMBER: u64 = CHUNK_MASK;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_decode_as_the_spec_says() {
        assert_eq!(ChunkEntry(0).state(), Some(ChunkState::Unwritten));
        assert_eq!(
            ChunkEntry(0x4000_0000_0000_0005).state(),
            Some(ChunkState::Full(5))
        );
        assert_eq!(
            ChunkEntry(0xC000_0000_0000_0002).state(),
            Some(ChunkState::Partial(2))
        );
        assert_eq!(
            ChunkEntry(0x8000_0000_0000_0000).state(),
            Some(ChunkState::Unmapped)
        );
        // Illegal combinations.
        assert_eq!(ChunkEntry(5).state(), None);
        assert_eq!(ChunkEntry(0x8000_0000_0000_0005).state(), None);
        assert_eq!(ChunkEntry(0x4000_0000_0000_0000).state(), None);
        assert_eq!(ChunkEntry(0xC000_0000_0000_0000).state(), None);
        assert_eq!(ChunkEntry(0x4080_0000_0000_0005).state(), None);
    }

    #[test]
    fn encode_round_trips() {
        for s in [
            ChunkState::Unwritten,
            ChunkState::Full(1),
            ChunkState::Full(MAX_CHUNK_NUMBER),
            ChunkState::Partial(77),
            ChunkState::Unmapped,
        ] {
            assert_eq!(ChunkEntry::encode(s).state(), Some(s));
        }
        assert_eq!(
            ChunkEntry::encode(ChunkState::Full(5)).0,
            0x4000_0000_0000_0005
        );
    }

    #[test]
    fn bitmap_entries() {
        assert_eq!(BitmapEntry(0).chunk(), Ok(None));
        assert_eq!(BitmapEntry(3).chunk(), Ok(Some(3)));
        assert_eq!(BitmapEntry(0x4000_0000_0000_0003).chunk(), Err(FlagBits));
    }
}

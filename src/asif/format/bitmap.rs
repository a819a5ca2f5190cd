//! The bitmap chunk of a chunk-group: two bits per sector of the group's
//! `N * cs` bytes, low bits first within each byte.

/// State of one sector of a partially valid chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorState {
    /// `00`: never written, reads as zeros whatever the chunk holds.
    Unwritten,
    /// `01`: written.
    Written,
    /// `10` or `11`: never seen in a real image; treated as corruption.
    Unknown(u8),
}

impl SectorState {
    /// State of sector `sector_in_byte` (0..4) given its bitmap byte.
    pub fn from_byte(byte: u8, sector_in_byte: u64) -> SectorState {
        match (byte >> ((sector_in_byte % 4) * 2)) & 0b11 {
            0b00 => SectorState::Unwritten,
            0b01 => SectorState::Written,
            other => SectorState::Unknown(other),
        }
    }
}

/// For the sectors `first..first+count` of a group (numbered from the
/// group's start), the byte range of the bitmap chunk that holds them.
pub fn bitmap_span(first: u64, count: u64) -> std::ops::Range<u64> {
    first / 4..(first + count).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_bits_first() {
        // 0x05: sectors 0 and 1 written, 2 and 3 not (the fresh metadata chunk).
        let s: Vec<_> = (0..4).map(|i| SectorState::from_byte(0x05, i)).collect();
        assert_eq!(
            s,
            [
                SectorState::Written,
                SectorState::Written,
                SectorState::Unwritten,
                SectorState::Unwritten
            ]
        );
        assert_eq!(
            SectorState::from_byte(0b1000_0000, 3),
            SectorState::Unknown(2)
        );
    }

    #[test]
    fn spans() {
        assert_eq!(bitmap_span(0, 1), 0..1);
        assert_eq!(bitmap_span(3, 2), 0..2);
        assert_eq!(bitmap_span(4, 4), 1..2);
    }
}

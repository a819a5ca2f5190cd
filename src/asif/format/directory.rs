//! A directory: a version word then one table chunk number per entry.

use super::{be_u64, put_u64};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub version: u64,
    /// Physical chunk of each table, 0 where the table is absent.
    pub tables: Vec<u64>,
}

impl Directory {
    /// Decodes `entries` tables from `b`, which must hold `8 * (entries + 1)`
    /// bytes (the geometry guarantees it).
    pub fn decode(b: &[u8], entries: u64) -> Directory {
        let tables = (0..entries as usize)
            .map(|i| be_u64(b, 8 + 8 * i))
            .collect();
        Directory {
            version: be_u64(b, 0),
            tables,
        }
    }

    /// Encodes into `len` bytes (the sector-rounded directory size).
    pub fn encode(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        put_u64(&mut b, 0, self.version);
        for (i, t) in self.tables.iter().enumerate() {
            put_u64(&mut b, 8 + 8 * i, *t);
        }
        b
    }

    /// Index (0 = A, 1 = B) of the active directory: the higher version,
    /// A on a tie.
    pub fn active(versions: [u64; 2]) -> usize {
        usize::from(versions[1] > versions[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_active() {
        let d = Directory {
            version: 9,
            tables: vec![0, 4, 0, 1],
        };
        let b = d.encode(512);
        assert_eq!(b.len(), 512);
        assert_eq!(&b[..8], &9u64.to_be_bytes());
        assert_eq!(&b[16..24], &4u64.to_be_bytes());
        assert_eq!(Directory::decode(&b, 4), d);
        assert_eq!(Directory::active([2, 1]), 0);
        assert_eq!(Directory::active([0, 1]), 1);
        assert_eq!(Directory::active([3, 3]), 0);
    }
}

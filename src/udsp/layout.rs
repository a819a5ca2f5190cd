//! The band map: which slot holds each logical band, built from the chain
//! of nodes without I/O of its own (nodes come through a closure).
//!
//! Slots are numbered globally along the chain: the header node's 1008
//! first, then 1010 per index node. The band of slot `k` of a node lives at
//! `node offset + 4096 + k * band size`, so a node's bands follow it and
//! the next node follows the last of them.
//!
//! Rules checked (each breach is one line naming it):
//! - every index node lies inside the file and starts at or after the end
//!   of the band area of the node before it, so the chain cannot loop;
//! - every band id is at most the number of bands;
//! - no two slots name the same band, except the pair an interrupted
//!   compaction recorded in the header (both hold the same bytes);
//! - every used slot's band starts inside the file.

use std::collections::BTreeMap;

use super::header::{Header, HEADER_SLOTS, NODE_SIZE};
use super::index::{IndexNode, INDEX_SLOTS};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub offset: u64,
    /// Index nodes' number field (0 for the header node).
    pub number: u32,
    pub slots: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub band_size: u64,
    /// Logical bands of the disk.
    pub bands: u64,
    pub nodes: Vec<NodeInfo>,
    /// Logical band -> global slot.
    pub map: BTreeMap<u32, u64>,
    /// The global slot the next new band takes.
    pub next_slot: u64,
    /// A move an interrupted compaction left: (from, to) global slots that
    /// both name the same band; the map uses `to`.
    pub interrupted_move: Option<(u64, u64)>,
}

/// Slots of node `i` of the chain.
pub fn capacity(i: usize) -> u64 {
    if i == 0 {
        HEADER_SLOTS as u64
    } else {
        INDEX_SLOTS as u64
    }
}

/// Global number of the first slot of node `i`.
pub fn first_slot(i: usize) -> u64 {
    if i == 0 {
        0
    } else {
        HEADER_SLOTS as u64 + (i as u64 - 1) * INDEX_SLOTS as u64
    }
}

/// The node and the slot within it of global slot `g`.
pub fn locate(g: u64) -> (usize, u64) {
    let h = HEADER_SLOTS as u64;
    if g < h {
        (0, g)
    } else {
        let i = (g - h) / INDEX_SLOTS as u64;
        (i as usize + 1, (g - h) % INDEX_SLOTS as u64)
    }
}

/// File offset of the 4-byte slot field `k` of the node at `node`.
pub fn slot_field(node_index: usize, node: u64, k: u64) -> u64 {
    let table = if node_index == 0 {
        super::header::off::SLOTS
    } else {
        super::index::off::SLOTS
    };
    node + table as u64 + 4 * k
}

/// End of the band area of a node at `offset` holding `cap` slots.
fn area_end(offset: u64, cap: u64, band_size: u64) -> Option<u64> {
    offset
        .checked_add(NODE_SIZE)?
        .checked_add(cap.checked_mul(band_size)?)
}

/// A chain walk that records every problem it can see.
pub struct Survey {
    pub layout: Layout,
    pub problems: Vec<String>,
}

impl Layout {
    /// Walks the chain from `header` in a file of `file_len` bytes, reading
    /// index nodes with `read_node(offset)`. Problems are collected; the
    /// walk stops at a node it cannot trust.
    pub fn survey(
        header: &Header,
        file_len: u64,
        mut read_node: impl FnMut(u64) -> Result<Vec<u8>>,
    ) -> Result<Survey> {
        let bs = header.band_size();
        let mut problems = Vec::new();
        let mut nodes = vec![NodeInfo {
            offset: 0,
            number: 0,
            slots: header.slots.clone(),
        }];
        let mut next = header.next_node;
        while next != 0 {
            let i = nodes.len();
            let prev = &nodes[i - 1];
            let Some(prev_end) = area_end(prev.offset, capacity(i - 1), bs) else {
                problems.push(format!(
                    "the bands of node {} at {:#x} end past 2^64",
                    i - 1,
                    prev.offset
                ));
                break;
            };
            if next < prev_end {
                problems.push(format!(
                    "index node {i} at {next:#x} lies inside the bands of the node before it (which end at {prev_end:#x})"
                ));
                break;
            }
            if next.checked_add(NODE_SIZE).map_or(true, |e| e > file_len) {
                problems.push(format!(
                    "index node {i} at {next:#x} lies past the end of the file ({file_len} bytes)"
                ));
                break;
            }
            let node = match IndexNode::decode(&read_node(next)?, next) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(e.to_string().trim_start_matches("corrupt image: ").into());
                    break;
                }
            };
            nodes.push(NodeInfo {
                offset: next,
                number: node.number,
                slots: node.slots,
            });
            next = node.next_node;
        }
        let bands = header.bands();
        let intent = header.move_intent();
        let mut map = BTreeMap::new();
        let mut interrupted_move = None;
        let mut last_used = None;
        for (i, n) in nodes.iter().enumerate() {
            for (k, &id) in n.slots.iter().enumerate() {
                if id == 0 {
                    continue;
                }
                let g = first_slot(i) + k as u64;
                let k = k as u64;
                if u64::from(id) > bands {
                    problems.push(format!(
                        "node {i} slot {k} names band id {id}, past the last band id {bands}"
                    ));
                    continue;
                }
                // In range: the node's own area was checked to fit 64 bits.
                let start = n.offset + NODE_SIZE + k * bs;
                if start >= file_len {
                    problems.push(format!(
                        "node {i} slot {k} (band id {id}) lies past the end of the file ({file_len} bytes)"
                    ));
                    continue;
                }
                if i + 1 == nodes.len() {
                    last_used = Some(k);
                }
                match map.insert(id - 1, g) {
                    None => {}
                    Some(other) if intent == Some((other, g)) => {
                        interrupted_move = Some((other, g));
                    }
                    Some(other) if intent == Some((g, other)) => {
                        map.insert(id - 1, other);
                        interrupted_move = Some((g, other));
                    }
                    Some(other) => {
                        let (oi, ok) = locate(other);
                        problems.push(format!(
                            "band id {id} is named by two slots: node {oi} slot {ok} and node {i} slot {k}"
                        ));
                    }
                }
            }
        }
        let last = nodes.len() - 1;
        let next_slot = first_slot(last) + last_used.map_or(0, |k| k + 1);
        Ok(Survey {
            layout: Layout {
                band_size: bs,
                bands,
                nodes,
                map,
                next_slot,
                interrupted_move,
            },
            problems,
        })
    }

    /// File offset of the band in global slot `g`, when its node exists.
    pub fn slot_offset(&self, g: u64) -> Option<u64> {
        let (i, k) = locate(g);
        let n = self.nodes.get(i)?;
        n.offset
            .checked_add(NODE_SIZE)?
            .checked_add(k.checked_mul(self.band_size)?)
    }

    /// File offset of the 4-byte field of global slot `g`.
    pub fn slot_field(&self, g: u64) -> Option<u64> {
        let (i, k) = locate(g);
        Some(slot_field(i, self.nodes.get(i)?.offset, k))
    }

    /// The band id slot `g` holds (0 when empty or past the chain).
    pub fn slot_id(&self, g: u64) -> u32 {
        let (i, k) = locate(g);
        self.nodes
            .get(i)
            .and_then(|n| n.slots.get(k as usize))
            .copied()
            .unwrap_or(0)
    }

    pub fn set_slot(&mut self, g: u64, id: u32) {
        let (i, k) = locate(g);
        self.nodes[i].slots[k as usize] = id;
    }

    /// Where the next index node goes: right after the last node's bands.
    pub fn next_node_offset(&self) -> Option<u64> {
        let last = self.nodes.len() - 1;
        area_end(self.nodes[last].offset, capacity(last), self.band_size)
    }

    /// End of the last band in use of the last node (of the last node
    /// itself when it has none): where the file may end.
    pub fn used_end(&self) -> u64 {
        let last = self.nodes.len() - 1;
        let node = self.nodes[last].offset.saturating_add(NODE_SIZE);
        match self.next_slot.checked_sub(first_slot(last)) {
            Some(k) if k > 0 => node.saturating_add(k.saturating_mul(self.band_size)),
            _ => node,
        }
    }

    /// Slots in use.
    pub fn used(&self) -> u64 {
        self.map.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    const BS: u64 = 4096;

    fn header(sectors: u64) -> Header {
        Header::new(sectors, (BS / 512) as u32).unwrap()
    }

    fn survey(h: &Header, len: u64, nodes: &[(u64, IndexNode)]) -> Survey {
        Layout::survey(h, len, |at| {
            nodes
                .iter()
                .find(|(o, _)| *o == at)
                .map(|(_, n)| n.encode())
                .ok_or_else(|| Error::Corrupt(format!("no node at {at:#x}")))
        })
        .unwrap()
    }

    #[test]
    fn slot_numbering() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(1007), (0, 1007));
        assert_eq!(locate(1008), (1, 0));
        assert_eq!(locate(2017), (1, 1009));
        assert_eq!(locate(2018), (2, 0));
        assert_eq!(first_slot(2), 2018);
        assert_eq!(slot_field(0, 0, 2), 0x48);
        assert_eq!(slot_field(1, 0x10000, 2), 0x10040);
    }

    #[test]
    fn chained_map() {
        let mut h = header(3000 * 8);
        let n1 = NODE_SIZE + 1008 * BS;
        h.next_node = n1;
        h.slots[0] = 5;
        h.slots[1007] = 1;
        let mut node = IndexNode::new(1);
        node.slots[0] = 2000;
        let s = survey(&h, n1 + NODE_SIZE + BS, &[(n1, node)]);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let l = s.layout;
        assert_eq!(l.map.get(&4), Some(&0));
        assert_eq!(l.map.get(&0), Some(&1007));
        assert_eq!(l.map.get(&1999), Some(&1008));
        assert_eq!(l.next_slot, 1009);
        assert_eq!(l.slot_offset(1008), Some(n1 + NODE_SIZE));
        assert_eq!(l.slot_offset(1007), Some(NODE_SIZE + 1007 * BS));
        assert_eq!(l.next_node_offset(), Some(n1 + NODE_SIZE + 1010 * BS));
    }

    #[test]
    fn hostile_chains_and_slots() {
        let n1 = NODE_SIZE + 1008 * BS;
        let problems = |f: &dyn Fn(&mut Header, &mut IndexNode), len: u64| {
            let mut h = header(3000 * 8);
            let mut node = IndexNode::new(1);
            f(&mut h, &mut node);
            survey(&h, len, &[(n1, node)]).problems
        };
        let big = n1 + NODE_SIZE + 4 * BS;
        assert_eq!(
            problems(&|h, _| h.next_node = 8192, big),
            ["index node 1 at 0x2000 lies inside the bands of the node before it (which end at 0x3f1000)"]
        );
        assert_eq!(
            problems(&|h, _| h.next_node = n1, n1 + 100),
            ["index node 1 at 0x3f1000 lies past the end of the file (4132964 bytes)"]
        );
        assert_eq!(
            problems(&|h, _| h.next_node = u64::MAX - 10, big),
            ["index node 1 at 0xfffffffffffffff5 lies past the end of the file (4153344 bytes)"]
        );
        // A node pointing back at itself.
        assert_eq!(
            problems(
                &|h, n| {
                    h.next_node = n1;
                    n.next_node = n1;
                },
                big
            ),
            ["index node 2 at 0x3f1000 lies inside the bands of the node before it (which end at 0x7e4000)"]
        );
        assert_eq!(
            problems(&|h, _| h.slots[3] = 3001, big),
            ["node 0 slot 3 names band id 3001, past the last band id 3000"]
        );
        assert_eq!(
            problems(
                &|h, _| {
                    h.slots[3] = 7;
                    h.slots[9] = 7;
                },
                big
            ),
            ["band id 7 is named by two slots: node 0 slot 3 and node 0 slot 9"]
        );
        assert_eq!(
            problems(&|h, _| h.slots[5] = 1, NODE_SIZE + 5 * BS),
            ["node 0 slot 5 (band id 1) lies past the end of the file (24576 bytes)"]
        );
    }

    #[test]
    fn recorded_move_allows_its_pair_only() {
        let mut h = header(3000 * 8);
        h.slots[2] = 7;
        h.slots[9] = 7;
        h.reserved[..20].copy_from_slice(&super::super::header::encode_intent(Some((9, 2))));
        let s = survey(&h, NODE_SIZE + 10 * BS, &[]);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.layout.map.get(&6), Some(&2));
        assert_eq!(s.layout.interrupted_move, Some((9, 2)));
        h.reserved[..20].copy_from_slice(&super::super::header::encode_intent(Some((9, 3))));
        assert_eq!(
            survey(&h, NODE_SIZE + 10 * BS, &[]).problems,
            ["band id 7 is named by two slots: node 0 slot 2 and node 0 slot 9"]
        );
    }
}

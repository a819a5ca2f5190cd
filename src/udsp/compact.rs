//! Compaction: bands holding only zeros lose their slots, the bands in
//! the highest slots move down into the free ones, index nodes no longer
//! needed are unlinked, and the file is truncated after the last band.
//!
//! A move from slot `from` to slot `to` never leaves a state that fails
//! to open: the band is copied and synced; the move is recorded in the
//! header's reserved bytes and synced; `to` is named and synced; `from`
//! is cleared and synced. A crash between the last two leaves both slots
//! naming the band with the same bytes, which the recorded move allows
//! (and a writable open finishes). The record is cleared at the end.

use serde::Serialize;

use super::header::{encode_intent, intent, NODE_SIZE};
use super::layout::locate;
use super::{index, SparseImage};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactReport {
    pub old_file_size: u64,
    pub new_file_size: u64,
    /// Bands that held only zeros and lost their slots.
    pub bands_dropped: u64,
    pub bands_moved: u64,
}

/// Bytes read or copied at a time.
const STEP: u64 = 1 << 20;

impl SparseImage {
    /// Packs the file. `progress` gets (bands moved, bands to move).
    pub fn compact(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CompactReport> {
        let _only = self.begin_exclusive()?;
        // Everything written so far is durable before anything moves.
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        self.flush()?;
        let mut report = CompactReport {
            old_file_size: self.file_len()?,
            ..Default::default()
        };

        let used: Vec<(u32, u64)> = self
            .layout
            .read()
            .map
            .iter()
            .map(|(&b, &g)| (b, g))
            .collect();
        let mut dropped = Vec::new();
        for &(band, g) in &used {
            if self.band_is_zero(g)? {
                self.write_slot(g, 0)?;
                let mut l = self.layout.write();
                l.set_slot(g, 0);
                l.map.remove(&band);
                dropped.push(g);
            }
        }
        if !dropped.is_empty() {
            self.sync()?;
            for &g in &dropped {
                self.punch_slot(g)?;
            }
        }
        report.bands_dropped = dropped.len() as u64;

        let (u, moves) = {
            let l = self.layout.read();
            let u = l.used();
            let free = (0..u).filter(|&g| l.slot_id(g) == 0);
            let mut high: Vec<u64> = l.map.values().copied().filter(|&g| g >= u).collect();
            high.sort_unstable();
            (u, high.into_iter().zip(free).collect::<Vec<_>>())
        };
        let total = moves.len() as u64;
        progress(0, total);
        for (i, &(from, to)) in moves.iter().enumerate() {
            self.move_band(from, to)?;
            progress(i as u64 + 1, total);
        }
        report.bands_moved = total;
        if total > 0 {
            self.write_intent(None)?;
            self.sync()?;
        }

        // Index nodes past the one holding the last slot in use.
        let keep = if u == 0 { 1 } else { locate(u - 1).0 + 1 };
        if self.layout.read().nodes.len() > keep {
            self.unlink_after(keep - 1)?;
            self.sync()?;
            self.layout.write().nodes.truncate(keep);
        }
        let new_len = if u == 0 {
            NODE_SIZE
        } else {
            let l = self.layout.read();
            l.slot_offset(u - 1)
                .and_then(|o| o.checked_add(self.band_size))
                .ok_or_else(|| Error::Corrupt("a band lies past 2^64".into()))?
        };
        if report.old_file_size > new_len {
            self.storage
                .set_len(new_len)
                .map_err(|e| self.io_err("truncating the file", e))?;
            self.sync()?;
        }
        self.layout.write().next_slot = u;
        // Nothing past the new end is prepared any more.
        *self.alloc.lock() = 0;
        report.new_file_size = self.file_len()?;
        Ok(report)
    }

    fn file_len(&self) -> Result<u64> {
        self.storage.len().map_err(|e| self.io_err("stat", e))
    }

    fn slot_area(&self, g: u64) -> Result<u64> {
        self.layout
            .read()
            .slot_offset(g)
            .ok_or_else(|| Error::Corrupt(format!("slot {g} has no node")))
    }

    fn punch_slot(&self, g: u64) -> Result<()> {
        let host = self.slot_area(g)?;
        self.storage
            .punch(host, self.band_size)
            .map_err(|e| self.io_err("punching a band", e))
    }

    /// Whether the band in slot `g` reads as zeros throughout.
    fn band_is_zero(&self, g: u64) -> Result<bool> {
        let host = self.slot_area(g)?;
        let end = host + self.band_size;
        let mut buf = vec![0u8; STEP.min(self.band_size) as usize];
        let mut at = host;
        while at < end {
            match self
                .storage
                .next_data(at)
                .map_err(|e| self.io_err("seeking data", e))?
            {
                Some(d) if d < end => at = d,
                _ => return Ok(true),
            }
            let n = (end - at).min(buf.len() as u64) as usize;
            self.storage
                .read_at(&mut buf[..n], at)
                .map_err(|e| self.io_err("reading a band", e))?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }

    /// Copies the band in slot `from` over the free slot `to`, leaving
    /// holes where the source reads as zeros.
    fn copy_band(&self, from: u64, to: u64) -> Result<()> {
        let (src, dst) = (self.slot_area(from)?, self.slot_area(to)?);
        let bs = self.band_size;
        self.storage
            .punch(dst, bs)
            .map_err(|e| self.io_err("punching a band", e))?;
        let mut buf = vec![0u8; STEP.min(bs) as usize];
        let mut done = 0;
        while done < bs {
            match self
                .storage
                .next_data(src + done)
                .map_err(|e| self.io_err("seeking data", e))?
            {
                Some(d) if d < src + bs => done = d - src,
                _ => break,
            }
            let n = (bs - done).min(buf.len() as u64) as usize;
            self.storage
                .read_at(&mut buf[..n], src + done)
                .map_err(|e| self.io_err("reading a band", e))?;
            if buf[..n].iter().any(|&b| b != 0) {
                self.write_raw(&buf[..n], dst + done, "copying a band")?;
            }
            done += n as u64;
        }
        Ok(())
    }

    fn write_intent(&self, m: Option<(u64, u64)>) -> Result<()> {
        let mut h = self.header.lock();
        let bytes = encode_intent(m);
        h.reserved[..intent::LEN].copy_from_slice(&bytes);
        self.write_raw(&bytes, intent::AT as u64, "recording a band move")
    }

    fn move_band(&self, from: u64, to: u64) -> Result<()> {
        let id = self.layout.read().slot_id(from);
        self.copy_band(from, to)?;
        self.sync()?;
        self.write_intent(Some((from, to)))?;
        self.sync()?;
        self.write_slot(to, id)?;
        self.sync()?;
        self.write_slot(from, 0)?;
        self.sync()?;
        {
            let mut l = self.layout.write();
            l.set_slot(to, id);
            l.set_slot(from, 0);
            l.map.insert(id - 1, to);
        }
        self.punch_slot(from)
    }

    /// Makes node `i` the last of the chain.
    fn unlink_after(&self, i: usize) -> Result<()> {
        if i == 0 {
            let mut h = self.header.lock();
            h.next_node = 0;
            self.write_header_fields(&h)
        } else {
            let at = self.layout.read().nodes[i].offset + index::off::NEXT_NODE as u64;
            self.write_raw(&0u64.to_be_bytes(), at, "unlinking an index node")
        }
    }
}

//! `check` for UDIF images: the trailer, the tables, every compressed run
//! and the CRC32 checksums (data fork, per table, master).

use std::path::Path;

use serde::Serialize;

use super::blkx::{RunKind, SECTOR};
use super::create::{crc32_of_zeros, master_checksum};
use super::trailer::{Checksum, CHECKSUM_NONE};
use super::Udif;
use crate::asif::engine::OpenOptions;
use crate::disk::Disk;
use crate::error::{Error, Result};

/// What `check` found. Problems make the image corrupt; notes do not.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub path: String,
    /// "UDZO", "UDRW", ... (empty when the image did not parse).
    pub variant: String,
    pub size: u64,
    pub tables: usize,
    pub runs: usize,
    pub checksums_verified: usize,
    /// Broken rules and checksums that do not match, one line each.
    pub problems: Vec<String>,
    /// Checksums absent or of a type asiffs does not verify.
    pub notes: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as lines for the CLI.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![if self.variant.is_empty() {
            format!("{}: not a readable UDIF image", self.path)
        } else {
            format!(
                "{}: UDIF {} image, {} bytes, {} tables, {} runs, {} checksums verified",
                self.path, self.variant, self.size, self.tables, self.runs, self.checksums_verified
            )
        }];
        out.extend(self.notes.iter().map(|n| format!("note: {n}")));
        out.extend(self.problems.iter().map(|p| format!("corrupt: {p}")));
        out.push(if self.is_clean() { "clean" } else { "corrupt" }.to_string());
        out
    }
}

/// Checks the image at `path` (opened read-only, shared lock). An image
/// that does not parse gives a report with that one problem; only I/O
/// failures and refusals (encrypted, locked) are errors.
pub fn check(path: &Path) -> Result<CheckReport> {
    match Udif::open(path, &OpenOptions::default()) {
        Ok(u) => u.check(),
        Err(Error::Corrupt(m)) => Ok(CheckReport {
            path: path.display().to_string(),
            problems: vec![m],
            ..Default::default()
        }),
        Err(e) => Err(e),
    }
}

impl Udif {
    /// Decompresses every compressed run and verifies every CRC32.
    pub fn check(&self) -> Result<CheckReport> {
        let layout = self.layout();
        let l = &*layout;
        let mut r = CheckReport {
            path: self.path.display().to_string(),
            variant: self.variant().to_string(),
            size: self.size(),
            tables: l.tables.len(),
            runs: l.map.runs.len(),
            ..Default::default()
        };
        // After a change the stored checksums are "none", in the file if
        // not in `layout`.
        let cleared = *self.checksums_cleared.lock();
        let stored = |c: &Checksum| if cleared { Checksum::NONE } else { *c };
        let mut by_table: Vec<Vec<usize>> = vec![Vec::new(); l.tables.len()];
        for (i, run) in l.map.runs.iter().enumerate() {
            by_table[run.table].push(i);
        }
        self.crc_checksum("data fork", &stored(&l.koly.data_checksum), &mut r, || {
            Ok(self
                .feed(l.koly.data_fork_offset, l.koly.data_fork_length)?
                .finalize())
        })?;
        for (t, (table, runs)) in l.tables.iter().zip(&by_table).enumerate() {
            let what = format!("blkx entry {t}");
            // Every compressed run is expanded once, checksum or not.
            let mut h = crc32fast::Hasher::new();
            let mut bad = false;
            for &i in runs {
                let run = l.map.runs[i];
                match run.kind {
                    RunKind::Free => {}
                    RunKind::Zero => h.combine(&crc32_of_zeros(run.sectors * SECTOR)),
                    RunKind::Raw => h.combine(&self.feed(Self::host(l, i, 0), run.length)?),
                    _ => match self.decompress_run(l, i) {
                        Ok(b) => h.update(&b),
                        Err(Error::Corrupt(m)) => {
                            r.problems.push(m);
                            bad = true;
                        }
                        Err(e) => return Err(e),
                    },
                }
            }
            if !bad {
                self.crc_checksum(&what, &stored(&table.checksum), &mut r, || Ok(h.finalize()))?;
            }
        }
        let master = master_checksum(&l.tables);
        self.crc_checksum(
            "master checksum",
            &stored(&l.koly.master_checksum),
            &mut r,
            || Ok(master),
        )?;
        Ok(r)
    }

    /// Compares a stored checksum with the CRC32 `compute` gives, when the
    /// stored one is a CRC32.
    fn crc_checksum(
        &self,
        what: &str,
        stored: &Checksum,
        r: &mut CheckReport,
        compute: impl FnOnce() -> Result<u32>,
    ) -> Result<()> {
        match stored.as_crc32() {
            Some(want) => {
                let got = compute()?;
                if got == want {
                    r.checksums_verified += 1;
                } else {
                    r.problems.push(format!(
                        "{}: {what}: CRC32 is {got:08x}, the image says {want:08x}",
                        self.path.display()
                    ));
                }
            }
            None if stored.kind == CHECKSUM_NONE => r.notes.push(format!("{what}: no checksum")),
            None => r.notes.push(format!(
                "{what}: checksum of type {} is not verified",
                stored.kind
            )),
        }
        Ok(())
    }

    /// CRC32 of `len` bytes of the file at `start`; holes are not read.
    fn feed(&self, start: u64, len: u64) -> Result<crc32fast::Hasher> {
        const BLOCK: u64 = 1 << 20;
        let io = |e| Error::io(self.ctx("reading for a checksum"), e);
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; BLOCK.min(len) as usize];
        let end = start + len;
        let mut at = start;
        while at < end {
            let data = self
                .storage
                .next_data(at)
                .map_err(io)?
                .map_or(end, |d| d.clamp(at, end));
            if data > at {
                h.combine(&crc32_of_zeros(data - at));
                at = data;
                continue;
            }
            let n = BLOCK.min(end - at) as usize;
            self.storage.read_at(&mut buf[..n], at).map_err(io)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h)
    }
}

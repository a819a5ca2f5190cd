//! Counters for `asiffs stats`, kept alike by every format: the requests a
//! disk served ([`IoCounters`]), plus whatever [`Counter`]s a format adds
//! of its own. They are relaxed atomics: they count, and order nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// One count that only grows.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn bump(&self, by: u64) {
        self.0.fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The requests a disk served; each format counts them where a request
/// has succeeded.
#[derive(Debug, Default)]
pub(crate) struct IoCounters {
    reads: Counter,
    writes: Counter,
    bytes_read: Counter,
    bytes_written: Counter,
    discards: Counter,
    bytes_discarded: Counter,
    flushes: Counter,
}

impl IoCounters {
    pub(crate) fn read(&self, bytes: u64) {
        self.reads.bump(1);
        self.bytes_read.bump(bytes);
    }

    pub(crate) fn write(&self, bytes: u64) {
        self.writes.bump(1);
        self.bytes_written.bump(bytes);
    }

    pub(crate) fn discard(&self, bytes: u64) {
        self.discards.bump(1);
        self.bytes_discarded.bump(bytes);
    }

    /// Counts a read or write the ring carried out, if it succeeded.
    pub(crate) fn done(&self, write: bool, len: u64, ok: bool) {
        match (ok, write) {
            (true, true) => self.write(len),
            (true, false) => self.read(len),
            _ => {}
        }
    }

    pub(crate) fn flush(&self) {
        self.flushes.bump(1);
    }

    pub(crate) fn snapshot(&self) -> IoStats {
        IoStats {
            reads: self.reads.get(),
            writes: self.writes.get(),
            bytes_read: self.bytes_read.get(),
            bytes_written: self.bytes_written.get(),
            discards: self.discards.get(),
            bytes_discarded: self.bytes_discarded.get(),
            flushes: self.flushes.get(),
        }
    }
}

/// [`IoCounters`] as read at one moment; flattened into each format's
/// stats, so its keys lead every format's `asiffs stats` output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IoStats {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub discards: u64,
    pub bytes_discarded: u64,
    pub flushes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_counts_once_with_its_bytes() {
        let c = IoCounters::default();
        c.read(512);
        c.read(4096);
        c.write(7);
        c.discard(1 << 20);
        c.flush();
        c.flush();
        assert_eq!(
            c.snapshot(),
            IoStats {
                reads: 2,
                writes: 1,
                bytes_read: 4608,
                bytes_written: 7,
                discards: 1,
                bytes_discarded: 1 << 20,
                flushes: 2,
            }
        );
        assert_eq!(
            serde_json::to_value(c.snapshot()).unwrap(),
            serde_json::json!({
                "reads": 2, "writes": 1, "bytes_read": 4608, "bytes_written": 7,
                "discards": 1, "bytes_discarded": 1048576, "flushes": 2,
            })
        );
    }

    /// Every format's stats: the same I/O keys with the same counts, then
    /// its own keys, exactly these.
    #[test]
    fn every_format_reports_its_keys() {
        use crate::registry::open;
        use std::path::Path;
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        /// A file name, how to create it, and the format's own keys.
        type Made = (&'static str, fn(&Path, u64), &'static [&'static str]);
        let made: [Made; 4] = [
            (
                "a.asif",
                |p, size| {
                    let opts = crate::CreateOptions {
                        size,
                        ..Default::default()
                    };
                    drop(crate::Image::create(p, &opts).unwrap())
                },
                &[
                    "cache",
                    "cache_hits",
                    "cache_misses",
                    "chunks_allocated",
                    "chunks_freed",
                    "dirty_groups",
                    "free_chunks",
                    "resident_groups",
                ],
            ),
            (
                "a.dmg",
                |p, size| crate::udif::create::create_udrw(p, size).unwrap(),
                &[
                    "cache_hits",
                    "cached_bytes",
                    "cached_runs",
                    "decompressions",
                    "variant",
                ],
            ),
            (
                "a.sparseimage",
                |p, size| crate::udsp::create(p, size, 1 << 20).unwrap(),
                &["band_size", "bands_allocated", "bands_used", "index_nodes"],
            ),
            (
                "a.sparsebundle",
                |p, size| drop(crate::udsb::SparseBundle::create(p, size, 1 << 20).unwrap()),
                &["bands", "bands_created", "bands_removed", "open_bands"],
            ),
        ];
        for (name, create, own) in made {
            let path = dir.path().join(name);
            create(&path, size);
            let d = open(&path, None, &crate::OpenOptions::writable()).unwrap();
            d.write_at(&[0xA5; 4096], 0).unwrap();
            d.read_at(&mut [0; 512], 0).unwrap();
            d.discard(0, 1 << 20).unwrap();
            d.flush().unwrap();
            let v = d.stats();
            let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            keys.sort_unstable();
            let mut want = vec![
                "bytes_discarded",
                "bytes_read",
                "bytes_written",
                "discards",
                "flushes",
                "reads",
                "writes",
            ];
            want.extend_from_slice(own);
            want.sort_unstable();
            assert_eq!(keys, want, "{name}");
            let io = ["reads", "writes", "bytes_read", "bytes_written", "discards"]
                .map(|k| v[k].as_u64());
            assert_eq!(io, [1, 1, 512, 4096, 1].map(Some), "{name}");
            assert_eq!(v["bytes_discarded"].as_u64(), Some(1 << 20), "{name}");
            assert_eq!(v["flushes"].as_u64(), Some(1), "{name}");
        }
    }
}

//! What a flush costs: one `fdatasync` when no mapping changed since the
//! last flush, two (data, then the index) when one did, none when nothing
//! changed at all.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod common;

use asiffs::host::file::{FileStorage, Storage};
use asiffs::{Image, OpenOptions};
use common::blank_image;

/// Counts syncs of a file container.
struct Counting(FileStorage, Arc<AtomicU64>);

impl Storage for Counting {
    fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<()> {
        self.0.read_at(b, o)
    }
    fn write_at(&self, b: &[u8], o: u64) -> io::Result<()> {
        self.0.write_at(b, o)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, l: u64) -> io::Result<()> {
        self.0.set_len(l)
    }
    fn extend(&self, l: u64) -> io::Result<()> {
        self.0.extend(l)
    }
    fn punch(&self, o: u64, l: u64) -> io::Result<()> {
        self.0.punch(o, l)
    }
    fn reserve(&self, o: u64, l: u64) -> io::Result<()> {
        self.0.reserve(o, l)
    }
    fn sync(&self) -> io::Result<()> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.sync()
    }
    fn next_data(&self, o: u64) -> io::Result<Option<u64>> {
        self.0.next_data(o)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.0.allocated_bytes()
    }
}

#[test]
fn a_flush_syncs_once_unless_a_mapping_changed() {
    let d = tempfile::tempdir().unwrap();
    let p = blank_image(d.path(), "f.asif", 1 << 30);
    let syncs = Arc::new(AtomicU64::new(0));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let img = Image::from_storage(
        &p,
        Arc::new(Counting(FileStorage::new(f), syncs.clone())),
        &OpenOptions::writable(),
    )
    .unwrap();
    let count = |what: &str, want: u64, f: &dyn Fn()| {
        let before = syncs.load(Ordering::SeqCst);
        f();
        assert_eq!(syncs.load(Ordering::SeqCst) - before, want, "{what}");
    };
    // A new chunk (and a new table) is mapped; its growth is made durable
    // by the container itself, so only the flush is counted here.
    img.write_at(&[1u8; 4096], 0).unwrap();
    count("flush after a new mapping", 2, &|| img.flush().unwrap());
    img.write_at(&[2u8; 4096], 8192).unwrap();
    count("flush after an overwrite", 1, &|| img.flush().unwrap());
    count("flush with nothing to do", 0, &|| img.flush().unwrap());
}

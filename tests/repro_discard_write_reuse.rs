// Reproduction against the engine API of main on 2026-11-23. Copy to tests/ and run: cargo test --release --test discard_write_reuse -- --nocapture (fails: 3584 stale bytes reach the next owner of a freed chunk).
use asiffs::engine::storage::{FileStorage, Storage};
use asiffs::{CreateOptions, Image, OpenOptions};
use std::io;
use std::sync::Arc;
use std::time::Duration;
struct LateWrites(FileStorage);
impl Storage for LateWrites {
    fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<()> {
        self.0.read_at(b, o)
    }
    fn write_at(&self, b: &[u8], o: u64) -> io::Result<()> {
        if b.len() == 4096 {
            std::thread::sleep(Duration::from_millis(200));
        }
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
fn a_write_racing_a_discard_leaks_into_the_next_owner_of_the_chunk() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.asif");
    Image::create(
        &path,
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let img = Arc::new(
        Image::from_storage(
            &path,
            Arc::new(LateWrites(FileStorage::new(f))),
            &OpenOptions::writable(),
        )
        .unwrap(),
    );
    img.write_at(&[1u8; 512], 0).unwrap();
    img.flush().unwrap();
    let w = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[0xAB; 4096], 0).unwrap())
    };
    std::thread::sleep(Duration::from_millis(50));
    img.discard(0, MIB).unwrap();
    img.flush().unwrap();
    w.join().unwrap();
    img.write_at(&[2u8; 512], 100 * MIB).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 100 * MIB).unwrap();
    let stale = b[512..].iter().filter(|&&x| x == 0xAB).count();
    println!("stale bytes in logical chunk 100: {stale}");
    assert_eq!(stale, 0);
}

//! The ring (`host::uring`) serves every format that translates: raw UDRW
//! disks, UDSP sparse images and UDIF raw runs go through io_uring, with
//! the bytes the synchronous path reads; what needs allocation falls back
//! and still lands; a request in flight holds off a resize.

mod common;

use std::path::Path;
use std::sync::Arc;

use asiffs::disk::Disk;
use asiffs::host::uring::Ring;
use asiffs::raw::RawDisk;
use asiffs::udif::Udif;
use asiffs::udsp::SparseImage;
use asiffs::{CacheMode, OpenOptions};
use common::MIB;
use crossbeam_channel::bounded;

fn opts(cache: CacheMode) -> OpenOptions {
    OpenOptions {
        cache,
        ..OpenOptions::writable()
    }
}

fn read(disk: &Arc<dyn Disk>, ring: &Ring, off: u64, len: usize) -> Vec<u8> {
    let (tx, rx) = bounded(1);
    ring.read(
        disk.clone(),
        off,
        len,
        Box::new(move |r| tx.send(r.map(|b| b.as_slice().to_vec())).unwrap()),
    );
    rx.recv().unwrap().unwrap()
}

fn write(disk: &Arc<dyn Disk>, ring: &Ring, data: &[u8], off: u64) {
    let (tx, rx) = bounded(1);
    ring.write(
        disk.clone(),
        data,
        off,
        Box::new(move |r| tx.send(r).unwrap()),
    );
    rx.recv().unwrap().unwrap();
}

/// Host I/Os `f` submitted to the ring.
fn through(ring: &Ring, f: impl FnOnce()) -> u64 {
    let before = ring.submitted();
    f();
    ring.submitted() - before
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn sync_read(disk: &dyn Disk, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    disk.read_at(&mut b, off).unwrap();
    b
}

fn open_raw(p: &Path, cache: CacheMode) -> Arc<dyn Disk> {
    Arc::new(RawDisk::open(p, &opts(cache)).unwrap())
}

#[test]
fn raw_disks_go_through_the_ring_in_both_cache_modes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.dmg");
    asiffs::raw::create(&p, 8 * MIB, false).unwrap();
    let ring = Ring::new().unwrap();
    for (n, cache) in [CacheMode::Writeback, CacheMode::None]
        .into_iter()
        .enumerate()
    {
        let disk = open_raw(&p, cache);
        assert!(disk.may_translate());
        let data = pattern(3 * 4096, n as u8);
        assert_eq!(through(&ring, || write(&disk, &ring, &data, MIB)), 1);
        let odd = pattern(100, 7);
        assert_eq!(through(&ring, || write(&disk, &ring, &odd, MIB + 5000)), 1);
        let mut want = data.clone();
        want[5000..5100].copy_from_slice(&odd);
        let mut back = Vec::new();
        assert_eq!(
            through(&ring, || back = read(&disk, &ring, MIB, 3 * 4096)),
            1
        );
        assert!(back == want, "{cache:?}: ring read differs");
        assert!(
            sync_read(&*disk, MIB, 3 * 4096) == want,
            "{cache:?}: sync read differs"
        );
        // O_DIRECT serves aligned pieces when the page cache is bypassed,
        // the buffered descriptor the rest.
        let fd =
            |off: u64, len: u64| disk.translate(off, len, false).unwrap().unwrap().pieces[0].fd;
        match cache {
            CacheMode::None => assert_ne!(fd(MIB, 4096), fd(MIB + 1, 4096)),
            _ => assert_eq!(fd(MIB, 4096), fd(MIB + 1, 4096)),
        }
        // Out of range: the error, not a panic or a hang.
        let (tx, rx) = bounded(1);
        ring.read(
            disk.clone(),
            8 * MIB - 512,
            1024,
            Box::new(move |r| tx.send(r.is_err()).unwrap()),
        );
        assert!(rx.recv().unwrap());
        disk.flush().unwrap();
        let s = disk.stats();
        assert_eq!(s["bytes_written"], 3 * 4096 + 100, "{s}");
    }
}

#[test]
fn udsp_bands_go_through_the_ring_and_new_bands_fall_back() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.sparseimage");
    asiffs::udsp::create(&p, 16 * MIB, MIB).unwrap();
    let ring = Ring::new().unwrap();
    for (n, cache) in [CacheMode::Writeback, CacheMode::None]
        .into_iter()
        .enumerate()
    {
        let disk: Arc<dyn Disk> = Arc::new(SparseImage::open(&p, &opts(cache)).unwrap());
        let band = 2 * MIB * (n as u64 + 1);
        // A band without a slot is taken on the caller's path, and lands.
        let first = pattern(8192, 3 + n as u8);
        assert_eq!(through(&ring, || write(&disk, &ring, &first, band)), 0);
        assert!(sync_read(&*disk, band, 8192) == first);
        // Now it has one: the ring carries rewrites and reads.
        let second = pattern(4096, 9);
        assert_eq!(
            through(&ring, || write(&disk, &ring, &second, band + 4096)),
            1
        );
        let mut want = first.clone();
        want[4096..].copy_from_slice(&second);
        // Across into the next band, which has no slot: one host read,
        // zeros after.
        let mut back = Vec::new();
        assert_eq!(
            through(&ring, || back = read(&disk, &ring, band + MIB - 4096, 8192)),
            1
        );
        assert!(back == [vec![0; 4096], vec![0; 4096]].concat());
        assert_eq!(through(&ring, || back = read(&disk, &ring, band, 8192)), 1);
        assert!(back == want, "{cache:?}: ring read differs");
        // No band at all: no host I/O, zeros.
        assert_eq!(
            through(&ring, || back = read(&disk, &ring, 15 * MIB, 4096)),
            0
        );
        assert!(back == vec![0; 4096]);
        // A write spanning a mapped band and a new one falls back whole.
        let span = pattern(8192, 11);
        assert_eq!(
            through(&ring, || write(&disk, &ring, &span, band + MIB - 4096)),
            0
        );
        assert!(sync_read(&*disk, band + MIB - 4096, 8192) == span);
        disk.flush().unwrap();
    }
    // What the ring wrote is in the file, as a fresh open reads it.
    let disk = SparseImage::open(&p, &OpenOptions::default()).unwrap();
    let mut want = pattern(8192, 3);
    want[4096..].copy_from_slice(&pattern(4096, 9));
    assert!(sync_read(&disk, 2 * MIB, 8192) == want);
}

#[test]
fn udif_raw_runs_go_through_the_ring() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("u.dmg");
    asiffs::udif::create_udrw(&p, 16 * MIB).unwrap();
    let ring = Ring::new().unwrap();
    let disk: Arc<dyn Disk> = Arc::new(Udif::open(&p, &OpenOptions::writable()).unwrap());
    assert!(disk.may_translate());
    let data = pattern(64 * 1024, 5);
    // Whatever a fresh image's runs are, a second write finds raw ones.
    write(&disk, &ring, &data, 3 * MIB + 512);
    assert_eq!(
        through(&ring, || write(&disk, &ring, &data, 3 * MIB + 512)),
        1
    );
    let mut back = Vec::new();
    assert_eq!(
        through(&ring, || back =
            read(&disk, &ring, 3 * MIB + 512, data.len())),
        1
    );
    assert!(back == data);
    disk.flush().unwrap();
    drop(disk);
    let disk = Udif::open(&p, &OpenOptions::default()).unwrap();
    assert!(sync_read(&disk, 3 * MIB + 512, data.len()) == data);
}

/// A raw read translated before a shrink must read the bytes that were
/// there: the resize waits for it. The read is held between translation
/// and submission; the resize gets 300 ms to finish first (which it can
/// only do if it ignores the read), then the read goes on.
#[test]
fn a_raw_resize_waits_for_a_ring_read_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.dmg");
    asiffs::raw::create(&p, 8 * MIB, false).unwrap();
    let disk = open_raw(&p, CacheMode::None);
    let tail = pattern(MIB as usize, 1);
    disk.write_at(&tail, 7 * MIB).unwrap();
    let ring = Arc::new(Ring::new().unwrap());
    let (translated_tx, translated) = bounded::<()>(1);
    let (go, go_rx) = bounded::<()>(1);
    ring.set_before_submit(Some(Arc::new(move || {
        translated_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    })));
    let reader = {
        let (disk, ring) = (disk.clone(), ring.clone());
        std::thread::spawn(move || read(&disk, &ring, 7 * MIB, MIB as usize))
    };
    translated.recv().unwrap();
    ring.set_before_submit(None);
    let (resized_tx, resized) = bounded(1);
    let resizer = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            disk.resize(4 * MIB).unwrap();
            resized_tx.send(()).unwrap();
        })
    };
    let finished_first = resized
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_ok();
    go.send(()).unwrap();
    let back = reader.join().unwrap();
    resizer.join().unwrap();
    assert!(
        !finished_first,
        "the resize finished while a read was in flight"
    );
    assert!(back == tail, "the read saw the shrink");
    assert_eq!(disk.size(), 4 * MIB);
}

//! The ring (`host::uring`) serves every format that translates: raw UDRW
//! disks, UDSP sparse images, UDIF raw runs and sparse bundles' existing
//! band files go through io_uring, with the bytes the synchronous path
//! reads; what needs allocation falls back and still lands; a request in
//! flight holds off a resize (and, in a bundle, the removal of its band).

mod common;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use asiffs::disk::Disk;
use asiffs::host::dir::{BandFile, BandStat, BundleDir, HostDir};
use asiffs::host::file::AsyncFds;
use asiffs::host::uring::Ring;
use asiffs::raw::RawDisk;
use asiffs::udif::Udif;
use asiffs::udsb::{band_name, SparseBundle};
use asiffs::udsp::SparseImage;
use asiffs::{CacheMode, OpenOptions};
use common::{Rng, MIB};
use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

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

fn new_udsb(dir: &Path, size: u64, band: u64) -> (std::path::PathBuf, Arc<dyn Disk>) {
    let p = dir.join("b.sparsebundle");
    let b = SparseBundle::create(&p, size, band).unwrap();
    (p, Arc::new(b))
}

fn band_len(p: &Path, n: u64) -> Option<u64> {
    std::fs::metadata(p.join("bands").join(band_name(n)))
        .ok()
        .map(|m| m.len())
}

#[test]
fn udsb_band_files_go_through_the_ring_and_new_or_growing_ones_fall_back() {
    let d = tempfile::tempdir().unwrap();
    let (p, disk) = new_udsb(d.path(), 16 * MIB, MIB);
    assert!(disk.may_translate());
    let ring = Ring::new().unwrap();
    // A missing band is made on the caller's path, and lands.
    let first = pattern(8192, 3);
    assert_eq!(through(&ring, || write(&disk, &ring, &first, 2 * MIB)), 0);
    assert_eq!(band_len(&p, 2), Some(8192));
    // Inside the file: the ring carries it, aligned or not.
    let second = pattern(4096, 9);
    assert_eq!(
        through(&ring, || write(&disk, &ring, &second, 2 * MIB + 4096)),
        1
    );
    let odd = pattern(100, 4);
    assert_eq!(
        through(&ring, || write(&disk, &ring, &odd, 2 * MIB + 5001)),
        1
    );
    let mut want = first.clone();
    want[4096..].copy_from_slice(&second);
    want[5001..5101].copy_from_slice(&odd);
    // Past the file's end (the file would grow): the caller's path.
    let tail = pattern(4096, 5);
    assert_eq!(
        through(&ring, || write(&disk, &ring, &tail, 2 * MIB + 6144)),
        0
    );
    assert_eq!(band_len(&p, 2), Some(10240));
    want.resize(10240, 0);
    want[6144..].copy_from_slice(&tail);
    let mut back = Vec::new();
    assert_eq!(
        through(&ring, || back = read(&disk, &ring, 2 * MIB, 10240)),
        1
    );
    assert!(back == want, "ring read differs");
    assert!(sync_read(&*disk, 2 * MIB, 10240) == want);
    // Past the file's end, and on into a missing band: one host read for
    // what the file holds, zeros for the rest.
    let len = MIB as usize + 4096;
    assert_eq!(
        through(&ring, || back = read(&disk, &ring, 2 * MIB, len)),
        1
    );
    let mut long = want.clone();
    long.resize(len, 0);
    assert!(back == long);
    assert!(sync_read(&*disk, 2 * MIB, len) == long);
    // No band at all, or only past a file's end: no host I/O, zeros.
    assert_eq!(
        through(&ring, || back = read(&disk, &ring, 9 * MIB, 4096)),
        0
    );
    assert!(back == vec![0; 4096]);
    assert_eq!(
        through(&ring, || back = read(&disk, &ring, 2 * MIB + 65536, 4096)),
        0
    );
    assert!(back == vec![0; 4096]);
    // A write over an existing band and a missing one falls back whole.
    let span = pattern(8192, 11);
    assert_eq!(
        through(&ring, || write(&disk, &ring, &span, 3 * MIB - 4096)),
        0
    );
    assert!(sync_read(&*disk, 3 * MIB - 4096, 8192) == span);
    // Two full band files: one write, two host pieces.
    let both = pattern(2 * 4096, 12);
    assert_eq!(
        through(&ring, || write(&disk, &ring, &both, 3 * MIB - 4096)),
        2
    );
    assert!(sync_read(&*disk, 3 * MIB - 4096, 8192) == both);
    // Out of range: the error, not a panic or a hang.
    let (tx, rx) = bounded(1);
    ring.read(
        disk.clone(),
        16 * MIB - 512,
        1024,
        Box::new(move |r| tx.send(r.is_err()).unwrap()),
    );
    assert!(rx.recv().unwrap());
    disk.flush().unwrap();
    let s = disk.stats();
    assert_eq!(
        s["bytes_written"],
        8192 + 4096 + 100 + 4096 + 2 * 8192,
        "{s}"
    );
    drop(disk);
    // What the ring wrote is in the band files, as a fresh open reads it.
    let disk = SparseBundle::open(&p, &OpenOptions::default()).unwrap();
    assert!(sync_read(&disk, 2 * MIB, 10240) == want);
    assert!(sync_read(&disk, 3 * MIB - 4096, 8192) == both);
}

/// Random reads and writes, half through the ring and half through
/// `read_at`/`write_at`, against a model of the disk.
#[test]
fn udsb_ring_and_synchronous_requests_agree_with_a_model() {
    let d = tempfile::tempdir().unwrap();
    let size = 8 * 65536;
    let (p, disk) = new_udsb(d.path(), size, 65536);
    let ring = Ring::new().unwrap();
    let mut model = vec![0u8; size as usize];
    let mut r = Rng(0x00DD_BA11);
    let mut translated = 0;
    for i in 0..600 {
        let off = r.below(size - 1);
        let len = 1 + r.below((size - off).min(3 * 65536)) as usize;
        let by_ring = r.below(2) == 0;
        match r.below(5) {
            0 | 1 => {
                let data = pattern(len, i as u8);
                if by_ring {
                    translated += through(&ring, || write(&disk, &ring, &data, off));
                } else {
                    disk.write_at(&data, off).unwrap();
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            2 => {
                let len = len.min(2 * 65536) as u64;
                disk.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let back = if by_ring {
                    read(&disk, &ring, off, len)
                } else {
                    sync_read(&*disk, off, len)
                };
                assert!(
                    back == model[off as usize..off as usize + len],
                    "step {i}: {len} bytes at {off} (ring: {by_ring}) differ"
                );
            }
        }
    }
    assert!(translated > 0, "no write went through the ring");
    disk.flush().unwrap();
    drop(disk);
    let disk = SparseBundle::open(&p, &OpenOptions::default()).unwrap();
    assert!(sync_read(&disk, 0, size as usize) == model);
}

#[test]
fn encrypted_bundles_never_translate() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("e.sparsebundle");
    let b = SparseBundle::create_encrypted_with(&p, 4 * MIB, MIB, b"pw", 128, 2).unwrap();
    let disk: Arc<dyn Disk> = Arc::new(b);
    assert!(!disk.may_translate());
    disk.write_at(&pattern(MIB as usize, 1), 0).unwrap();
    assert!(disk.translate(0, 4096, false).unwrap().is_none());
    assert!(disk.translate(0, 4096, true).unwrap().is_none());
    let ring = Ring::new().unwrap();
    let data = pattern(4096, 2);
    assert_eq!(through(&ring, || write(&disk, &ring, &data, 4096)), 0);
    let mut back = Vec::new();
    assert_eq!(through(&ring, || back = read(&disk, &ring, 4096, 4096)), 0);
    assert!(back == data);
}

/// A translation's descriptors stay its band files' while it is held,
/// even when the open-file cache lets them go.
#[test]
fn a_udsb_translation_keeps_its_band_files_open() {
    let d = tempfile::tempdir().unwrap();
    let bands = 100;
    let (p, disk) = new_udsb(d.path(), bands * 65536, 65536);
    for n in 0..bands {
        disk.write_at(&[n as u8 + 1; 512], n * 65536).unwrap();
    }
    // Nothing is dirty any more: only the cache keeps files open.
    disk.flush().unwrap();
    let t = disk.translate(0, 512, true).unwrap().unwrap();
    let fd = t.pieces[0].fd;
    // Opens every other band, so the cache drops band 0's file.
    for n in 1..bands {
        assert_eq!(sync_read(&*disk, n * 65536, 1), [n as u8 + 1]);
    }
    let want = std::fs::metadata(p.join("bands/0")).unwrap().ino();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    let got = std::fs::metadata(&link).unwrap().ino();
    assert_eq!(got, want, "descriptor {fd} is {}", link.display());
    drop(t);
}

/// Pauses the ring between translating a request and submitting it:
/// returns a receiver that hears when one is translated and a sender that
/// lets it go on.
fn pause_before_submit(ring: &Ring) -> (Receiver<()>, Sender<()>) {
    let (translated_tx, translated) = bounded::<()>(1);
    let (go, go_rx) = bounded::<()>(1);
    ring.set_before_submit(Some(Arc::new(move || {
        translated_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    })));
    (translated, go)
}

/// A ring write into band 1 is held between translation and submission;
/// `race` runs on another thread meanwhile and gets 300 ms to finish
/// first (which it must not: it has to wait for the write). Returns
/// whether it did.
fn race_a_udsb_ring_write(disk: &Arc<dyn Disk>, race: impl FnOnce() + Send + 'static) -> bool {
    let ring = Arc::new(Ring::new().unwrap());
    let (translated, go) = pause_before_submit(&ring);
    let writer = {
        let (disk, ring) = (disk.clone(), ring.clone());
        std::thread::spawn(move || {
            let before = ring.submitted();
            write(&disk, &ring, &pattern(4096, 7), MIB + 4096);
            ring.submitted() - before
        })
    };
    translated.recv().unwrap();
    ring.set_before_submit(None);
    let (raced_tx, raced) = bounded(1);
    let racer = std::thread::spawn(move || {
        race();
        raced_tx.send(()).unwrap();
    });
    let finished_first = raced.recv_timeout(Duration::from_millis(300)).is_ok();
    go.send(()).unwrap();
    assert_eq!(writer.join().unwrap(), 1, "the write was not translated");
    racer.join().unwrap();
    finished_first
}

#[test]
fn a_udsb_discard_removing_a_band_waits_for_a_ring_write_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let (p, disk) = new_udsb(d.path(), 4 * MIB, MIB);
    disk.write_at(&pattern(MIB as usize, 1), MIB).unwrap();
    disk.write_at(&pattern(4096, 2), 3 * MIB).unwrap();
    // Removing another band does not wait for band 1.
    let other = {
        let disk = disk.clone();
        move || disk.discard(3 * MIB, MIB).unwrap()
    };
    let ring = Arc::new(Ring::new().unwrap());
    let (translated, go) = pause_before_submit(&ring);
    let writer = {
        let (disk, ring) = (disk.clone(), ring.clone());
        std::thread::spawn(move || write(&disk, &ring, &pattern(4096, 7), MIB + 4096))
    };
    translated.recv().unwrap();
    other();
    assert_eq!(band_len(&p, 3), None);
    go.send(()).unwrap();
    writer.join().unwrap();
    // Removing band 1 itself does.
    let d2 = disk.clone();
    let finished_first = race_a_udsb_ring_write(&disk, move || d2.discard(MIB, MIB).unwrap());
    assert!(
        !finished_first,
        "the discard removed the band while a write was in flight"
    );
    // The write landed before the removal, so the band is gone and reads
    // as zeros.
    assert_eq!(band_len(&p, 1), None);
    assert!(sync_read(&*disk, MIB, MIB as usize) == vec![0; MIB as usize]);
}

#[test]
fn a_udsb_resize_waits_for_a_ring_write_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let (p, disk) = new_udsb(d.path(), 4 * MIB, MIB);
    disk.write_at(&pattern(MIB as usize, 1), MIB).unwrap();
    let d2 = disk.clone();
    let finished_first = race_a_udsb_ring_write(&disk, move || d2.resize(MIB).unwrap());
    assert!(
        !finished_first,
        "the resize finished while a write was in flight"
    );
    assert_eq!(disk.size(), MIB);
    assert_eq!(band_len(&p, 1), None);
}

/// What each band file held at its last sync: what a power cut leaves.
type Durable = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// A bundle on the host whose band files remember their last sync.
struct DurableDir {
    inner: HostDir,
    durable: Durable,
}

struct DurableBand {
    inner: Arc<dyn BandFile>,
    name: String,
    durable: Durable,
}

impl BandFile for DurableBand {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.reserve(offset, len)
    }
    fn sync(&self, metadata: bool) -> io::Result<()> {
        self.inner.sync(metadata)?;
        let mut b = vec![0; self.inner.len()? as usize];
        let got = self.inner.read_at(&mut b, 0)?;
        b.truncate(got);
        self.durable.lock().insert(self.name.clone(), b);
        Ok(())
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_hole(offset)
    }
    fn async_fds(&self) -> Option<AsyncFds> {
        self.inner.async_fds()
    }
}

impl BundleDir for DurableDir {
    fn read_small(&self, name: &str, limit: usize) -> io::Result<Vec<u8>> {
        self.inner.read_small(name, limit)
    }
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.inner.replace(name, bytes)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn exists(&self, name: &str) -> bool {
        self.inner.exists(name)
    }
    fn sync_root(&self) -> io::Result<()> {
        self.inner.sync_root()
    }
    fn root_allocated(&self, name: &str) -> io::Result<u64> {
        self.inner.root_allocated(name)
    }
    fn list_bands(&self) -> io::Result<Vec<Vec<u8>>> {
        self.inner.list_bands()
    }
    fn stat_band(&self, name: &str) -> io::Result<BandStat> {
        self.inner.stat_band(name)
    }
    fn open_band(
        &self,
        name: &str,
        create: bool,
        writable: bool,
    ) -> io::Result<Option<Arc<dyn BandFile>>> {
        Ok(self.inner.open_band(name, create, writable)?.map(|inner| {
            Arc::new(DurableBand {
                inner,
                name: name.to_string(),
                durable: self.durable.clone(),
            }) as Arc<dyn BandFile>
        }))
    }
    fn remove_band(&self, name: &str) -> io::Result<()> {
        self.inner.remove_band(name)
    }
    fn sync_bands(&self) -> io::Result<()> {
        self.inner.sync_bands()
    }
    fn band_allocated(&self, name: &str) -> io::Result<u64> {
        self.inner.band_allocated(name)
    }
    fn band_fds(&self) -> bool {
        self.inner.band_fds()
    }
}

/// The crash rule for translated writes: once a ring write has been
/// answered, the next flush makes it durable, even when a flush ran while
/// it was in flight (that one may miss it; the next one must not).
#[test]
fn a_udsb_ring_write_survives_the_next_flush() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("b.sparsebundle");
    SparseBundle::create(&p, 4 * MIB, MIB)
        .unwrap()
        .close()
        .unwrap();
    let durable = Durable::default();
    let store = DurableDir {
        inner: HostDir::new(std::fs::File::open(&p).unwrap()),
        durable: durable.clone(),
    };
    let disk: Arc<dyn Disk> =
        Arc::new(SparseBundle::from_store(&p, Arc::new(store), None, true).unwrap());
    assert!(disk.may_translate());
    let on_disk = || durable.lock().get("1").cloned().unwrap_or_default();
    let mut want = pattern(8192, 1);
    disk.write_at(&want, MIB).unwrap();
    disk.flush().unwrap();
    assert!(on_disk() == want);

    let ring = Arc::new(Ring::new().unwrap());
    let first = pattern(4096, 2);
    assert_eq!(through(&ring, || write(&disk, &ring, &first, MIB)), 1);
    want[..4096].copy_from_slice(&first);
    assert!(
        on_disk() != want,
        "durable before any flush: the test shows nothing"
    );
    disk.flush().unwrap();
    assert!(on_disk() == want, "a flush after a ring write left it out");

    // A flush while the next write is translated but not yet landed.
    let (translated, go) = pause_before_submit(&ring);
    let second = pattern(4096, 3);
    let writer = {
        let (disk, ring, second) = (disk.clone(), ring.clone(), second.clone());
        std::thread::spawn(move || through(&ring, || write(&disk, &ring, &second, MIB + 4096)))
    };
    translated.recv().unwrap();
    ring.set_before_submit(None);
    disk.flush().unwrap();
    go.send(()).unwrap();
    assert_eq!(writer.join().unwrap(), 1);
    want[4096..].copy_from_slice(&second);
    disk.flush().unwrap();
    assert!(
        on_disk() == want,
        "a write that landed after a flush began was left out of the next one"
    );
    drop(disk);
    let disk = SparseBundle::open(&p, &OpenOptions::default()).unwrap();
    assert!(sync_read(&disk, MIB, 8192) == want);
}

/// Writers through the ring, each owning a 4 KiB slot in every band,
/// while another thread removes whole bands: nothing hangs, and every
/// slot ends holding its writer's last write or, if a removal came after
/// it, zeros (never an older write, never another slot's bytes).
#[test]
fn udsb_ring_writers_racing_band_removals_keep_their_last_write_or_zeros() {
    const BANDS: u64 = 6;
    const WRITERS: u64 = 3;
    const BAND: u64 = 64 * 1024;
    let d = tempfile::tempdir().unwrap();
    let (_p, disk) = new_udsb(d.path(), BANDS * BAND, BAND);
    let ring = Arc::new(Ring::new().unwrap());
    let slot = |t: u64, n: u64| n * BAND + t * 8192;
    // Every band file reaches every slot's end, so rewrites translate.
    for n in 0..BANDS {
        disk.write_at(&[0xee; 1], n * BAND + WRITERS * 8192)
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let remover = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut r = Rng(77);
            let mut removed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = r.below(BANDS);
                disk.discard(n * BAND, BAND).unwrap();
                // Back at full length, so writes into it translate again.
                disk.write_at(&[0xee; 1], n * BAND + WRITERS * 8192)
                    .unwrap();
                removed += 1;
                // Flushes racing the ring writes, which also keep the
                // removed files from piling up in the dirty set.
                if removed % 16 == 0 {
                    disk.flush().unwrap();
                }
                std::thread::yield_now();
            }
            removed
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (disk, ring) = (disk.clone(), ring.clone());
            std::thread::spawn(move || {
                let mut r = Rng(1000 + t);
                let mut last = vec![None; BANDS as usize];
                let mut translated = 0;
                for i in 0..2000u32 {
                    let n = r.below(BANDS);
                    let data = pattern(4096, (i as u8) ^ ((t as u8) << 6));
                    translated += through(&ring, || write(&disk, &ring, &data, slot(t, n)));
                    last[n as usize] = Some(data);
                }
                (last, translated)
            })
        })
        .collect();
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let removed = remover.join().unwrap();
    assert!(removed > 0);
    let translated: u64 = results.iter().map(|r| r.1).sum();
    assert!(translated > 0, "no write went through the ring");
    for (t, (last, _)) in results.iter().enumerate() {
        for n in 0..BANDS {
            let got = sync_read(&*disk, slot(t as u64, n), 4096);
            let zeros = got.iter().all(|&b| b == 0);
            let ok = zeros || last[n as usize].as_ref() == Some(&got);
            assert!(ok, "writer {t}, band {n}: neither its last write nor zeros");
        }
    }
}

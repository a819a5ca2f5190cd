//! The asynchronous data path (`host::uring`) on ASIF: requests over mapped chunks
//! go through io_uring and finish on the ring's thread; everything else
//! takes the synchronous path. Both must read and write exactly what the
//! synchronous engine does, in both cache modes, with the smallest cache
//! and while compact moves chunks.

mod common;

use std::sync::Arc;

use asiffs::host::uring::Ring;
use asiffs::{CacheMode, Image, OpenOptions};
use common::{blank_image, Rng, MIB};
use crossbeam_channel::bounded;

fn open(path: &std::path::Path, cache: CacheMode, groups: usize) -> Arc<Image> {
    let opts = OpenOptions {
        cache,
        cache_groups: groups,
        ..OpenOptions::writable()
    };
    Arc::new(Image::open(path, &opts).unwrap())
}

fn read(img: &Arc<Image>, ring: &Ring, off: u64, len: usize) -> Vec<u8> {
    let (tx, rx) = bounded(1);
    ring.read(
        img.clone(),
        off,
        len,
        Box::new(move |r| tx.send(r.map(|b| b.as_slice().to_vec())).unwrap()),
    );
    rx.recv().unwrap().unwrap()
}

fn write(img: &Arc<Image>, ring: &Ring, data: &[u8], off: u64) {
    let (tx, rx) = bounded(1);
    ring.write(
        img.clone(),
        data,
        off,
        Box::new(move |r| tx.send(r).unwrap()),
    );
    rx.recv().unwrap().unwrap();
}

#[test]
fn mapped_chunks_go_through_the_ring_and_the_rest_does_not() {
    let d = tempfile::tempdir().unwrap();
    let p = blank_image(d.path(), "a.asif", 64 * MIB);
    let ring = Ring::new().unwrap();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = open(&p, cache, 512);
        let through_ring = |f: &mut dyn FnMut()| {
            let before = ring.submitted();
            f();
            ring.submitted() - before
        };
        // A fresh chunk is allocated on the caller's path...
        let fresh = vec![0x5a; 8192];
        assert_eq!(through_ring(&mut || write(&img, &ring, &fresh, 3 * MIB)), 0);
        // ...a mapped one is rewritten through the ring, aligned or not.
        assert_eq!(
            through_ring(&mut || write(&img, &ring, &[0xa5; 4096], 3 * MIB)),
            1
        );
        assert_eq!(
            through_ring(&mut || write(&img, &ring, &[0x11; 100], 3 * MIB + 4097)),
            1
        );
        let mut back = Vec::new();
        assert_eq!(
            through_ring(&mut || back = read(&img, &ring, 3 * MIB, 8192)),
            1
        );
        let mut want = vec![0x5a; 8192];
        want[..4096].fill(0xa5);
        want[4097..4197].fill(0x11);
        assert!(back == want, "{cache:?}: read back differs");
        // Across a chunk boundary with the second chunk a hole: one host
        // read, the rest zeros.
        let mut both = Vec::new();
        assert_eq!(
            through_ring(&mut || both = read(&img, &ring, 4 * MIB - 4096, 8192)),
            1
        );
        assert!(both.iter().all(|&b| b == 0x5a || b == 0) && both[4096..].iter().all(|&b| b == 0));
        // All holes: no host I/O, still an answer.
        let mut zeros = Vec::new();
        assert_eq!(
            through_ring(&mut || zeros = read(&img, &ring, 40 * MIB, 3 * 4096)),
            0
        );
        assert!(zeros == vec![0; 3 * 4096]);
        // Out of range: the error, not a panic or a hang.
        let (tx, rx) = bounded(1);
        ring.read(
            img.clone(),
            64 * MIB - 512,
            1024,
            Box::new(move |r| tx.send(r.err().map(|e| e.to_string())).unwrap()),
        );
        assert_eq!(
            rx.recv().unwrap().as_deref(),
            Some("range 0x3fffe00+0x400 is outside the disk (67108864 bytes)")
        );
        discard_all(&img);
    }
}

fn discard_all(img: &Arc<Image>) {
    img.discard(0, img.size()).unwrap();
    img.flush().unwrap();
}

/// Threads own disjoint regions; each mixes async writes (fresh, mapped,
/// unaligned), async reads checked against its model, and discards. One
/// chunk-group of cache forces loads and evictions under every request.
fn random_load(cache: CacheMode, with_compact: bool) {
    let d = tempfile::tempdir().unwrap();
    let p = blank_image(d.path(), "r.asif", 256 * MIB);
    let img = open(&p, cache, 1);
    let ring = Arc::new(Ring::new().unwrap());
    if with_compact {
        // Requests sit translated but unsubmitted while compact runs.
        ring.set_before_submit(Some(Arc::new(|| {
            std::thread::sleep(std::time::Duration::from_millis(2))
        })));
    }
    let region = 24 * MIB;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = with_compact.then(|| {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut moved = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                moved += img.compact(&mut |_, _| {}).unwrap().chunks_moved;
            }
            moved
        })
    });
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let (img, ring) = (img.clone(), ring.clone());
            std::thread::spawn(move || {
                let base = t * region;
                let mut model = vec![0u8; region as usize];
                let mut rng = Rng(0x9e37_79b9 ^ (t + 1));
                for i in 0..400u64 {
                    let off = rng.below(region - 70_000);
                    let (off, len) = match rng.below(3) {
                        0 => (off & !4095, 4096 * (1 + rng.below(16) as usize)),
                        1 => (off, 1 + rng.below(65_536) as usize),
                        _ => (
                            off & !(MIB - 1),
                            MIB.min(region - (off & !(MIB - 1))) as usize,
                        ),
                    };
                    match rng.below(8) {
                        0..=3 => {
                            let data: Vec<u8> =
                                (0..len).map(|k| (i as usize * 7 + k) as u8 | 1).collect();
                            write(&img, &ring, &data, base + off);
                            model[off as usize..off as usize + len].copy_from_slice(&data);
                        }
                        4 => {
                            img.discard(base + off, len as u64).unwrap();
                            model[off as usize..off as usize + len].fill(0);
                        }
                        _ => {
                            let back = read(&img, &ring, base + off, len);
                            assert!(
                                back[..] == model[off as usize..off as usize + len],
                                "thread {t} op {i}: read {off}+{len} differs"
                            );
                        }
                    }
                }
                let all = read(&img, &ring, base, region as usize);
                assert!(all == model, "thread {t}: region differs at the end");
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(c) = compactor {
        let moved = c.join().unwrap();
        assert!(moved > 0, "compact never moved a chunk");
    }
    img.flush().unwrap();
    assert_eq!(ring.in_flight(), 0);
    drop(ring);
    let img = Arc::try_unwrap(img).ok().unwrap();
    img.close().unwrap();

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    for (t, model) in models.iter().enumerate() {
        let mut back = vec![0u8; region as usize];
        img.read_at(&mut back, t as u64 * region).unwrap();
        assert!(back == *model, "thread {t}: differs after reopening");
    }
    let r = img.check().unwrap();
    assert!(!r.is_corrupt() && r.leaked_chunks == 0, "{r:?}");
}

#[test]
fn random_load_matches_the_model_writeback() {
    random_load(CacheMode::Writeback, false);
}

#[test]
fn random_load_matches_the_model_direct() {
    random_load(CacheMode::None, false);
}

#[test]
fn random_load_with_compact_matches_the_model() {
    random_load(CacheMode::None, true);
}

/// A read translated before compact moves its chunk must still read that
/// chunk's bytes: compact waits for it. The read is held between
/// translation and submission; compact gets 300 ms to finish first (which
/// it can only do if it ignores the read), then the read goes on.
#[test]
fn compact_cannot_move_a_chunk_under_a_read_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let p = blank_image(d.path(), "c.asif", 64 * MIB);
    let img = open(&p, CacheMode::None, 512);
    let ring = Arc::new(Ring::new().unwrap());
    for i in 0..8u8 {
        img.write_at(&vec![i + 1; MIB as usize], u64::from(i) * MIB)
            .unwrap();
    }
    // Free the low chunks so that compact moves the high ones down.
    img.discard(0, 4 * MIB).unwrap();
    img.flush().unwrap();

    let (translated_tx, translated) = bounded::<()>(1);
    let (go, go_rx) = bounded::<()>(1);
    ring.set_before_submit(Some(Arc::new(move || {
        translated_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    })));
    let reader = {
        let (img, ring) = (img.clone(), ring.clone());
        std::thread::spawn(move || read(&img, &ring, 7 * MIB, MIB as usize))
    };
    translated.recv().unwrap();
    ring.set_before_submit(None);
    let (compacted_tx, compacted) = bounded(1);
    let compactor = {
        let img = img.clone();
        std::thread::spawn(move || {
            let r = img.compact(&mut |_, _| {}).unwrap();
            compacted_tx.send(()).unwrap();
            r
        })
    };
    let finished_first = compacted
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_ok();
    go.send(()).unwrap();
    let back = reader.join().unwrap();
    let report = compactor.join().unwrap();
    assert!(
        !finished_first,
        "compact finished while a read was in flight"
    );
    assert!(report.chunks_moved > 0, "{report:?}");
    assert!(
        back == vec![8u8; MIB as usize],
        "the read saw a moved chunk"
    );
    assert!(read(&img, &ring, 7 * MIB, MIB as usize) == vec![8u8; MIB as usize]);
}

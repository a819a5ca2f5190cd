//! Races between writers, discarders, readers and flushes, run with the
//! smallest cache (one chunk-group) and a container that injects delays,
//! where they hide at default sizes. Each writer owns some chunks and keeps
//! a model of them; every read, the final state, a reopen and `check` must
//! agree with the models.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use asiffs::host::file::{FileStorage, Storage};
use asiffs::{Image, OpenOptions};
use common::{blank_image, Rng};

const MIB: u64 = 1 << 20;
/// Virtual bytes one chunk-group covers (2048 entries of 1 MiB).
const GROUP: u64 = 2048 * MIB;
/// Virtual bytes one table covers (63 groups).
const TABLE: u64 = 63 * GROUP;

/// Which container calls sleep, and for how long.
#[derive(Clone, Copy, Default)]
struct Delays {
    /// Every `write_at` of this many bytes (a data write of the test).
    write_of_len: Option<(usize, Duration)>,
    extend: Option<Duration>,
    /// A pseudo-random 0..=N microseconds on reads, writes and punches.
    jitter_us: u64,
}

/// A file container that sleeps where told, to widen race windows.
struct Slow {
    inner: FileStorage,
    delays: Delays,
    tick: AtomicU64,
}

impl Slow {
    fn open(path: &Path, delays: Delays) -> Arc<Slow> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Arc::new(Slow {
            inner: FileStorage::new(f),
            delays,
            tick: AtomicU64::new(1),
        })
    }

    fn jitter(&self) {
        if self.delays.jitter_us > 0 {
            let t = self.tick.fetch_add(0x9E37_79B9, Ordering::Relaxed);
            let us = (t ^ (t >> 13)) % (self.delays.jitter_us + 1);
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

impl Storage for Slow {
    fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<()> {
        self.jitter();
        self.inner.read_at(b, o)
    }
    fn write_at(&self, b: &[u8], o: u64) -> io::Result<()> {
        match self.delays.write_of_len {
            Some((len, d)) if b.len() == len => std::thread::sleep(d),
            _ => self.jitter(),
        }
        self.inner.write_at(b, o)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, l: u64) -> io::Result<()> {
        self.inner.set_len(l)
    }
    fn extend(&self, l: u64) -> io::Result<()> {
        if let Some(d) = self.delays.extend {
            std::thread::sleep(d);
        }
        self.inner.extend(l)
    }
    fn punch(&self, o: u64, l: u64) -> io::Result<()> {
        self.jitter();
        self.inner.punch(o, l)
    }
    fn reserve(&self, o: u64, l: u64) -> io::Result<()> {
        self.inner.reserve(o, l)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn next_data(&self, o: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(o)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

fn open_slow(path: &Path, delays: Delays, cache_groups: usize) -> Arc<Image> {
    Arc::new(
        Image::from_storage(
            path,
            Slow::open(path, delays),
            &OpenOptions {
                cache_groups,
                ..OpenOptions::writable()
            },
        )
        .unwrap(),
    )
}

/// Flushes in a loop until told to stop.
fn flusher(img: &Arc<Image>, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (img, stop) = (img.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            img.flush().unwrap();
            n += 1;
        }
        n
    })
}

/// A group evicted while a writer held it used to be loaded a second time,
/// and one copy's changes were lost: writes read back as zeros and chunks
/// leaked. Eight writers over three groups, a one-group cache, a flusher
/// and a slow growth of the file.
#[test]
fn no_write_is_lost_when_the_cache_evicts_a_held_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = blank_image(dir.path(), "r.asif", 64 << 30);
    let delays = Delays {
        extend: Some(Duration::from_millis(20)),
        ..Default::default()
    };
    let img = open_slow(&path, delays, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let fl = flusher(&img, &stop);
    let (threads, per) = (8u64, 400u64);
    let at = move |t: u64, i: u64| (i % 3) * GROUP + ((i * threads + t) % 2048) * MIB;
    let stamp = |t: u64| (t as u8 + 1) | 0x80;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    img.write_at(&[stamp(t); 4096], at(t, i)).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    fl.join().unwrap();
    let lost = |img: &Image| {
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        for t in 0..threads {
            for i in 0..per {
                img.read_at(&mut buf, at(t, i)).unwrap();
                n += usize::from(buf.iter().any(|&b| b != stamp(t)));
            }
        }
        n
    };
    assert_eq!(lost(&img), 0, "writes lost in the session");
    close_and_check(img, &path, |img| {
        assert_eq!(lost(img), 0, "writes lost after reopening")
    });
}

/// A write that translated its chunk before a discard lands after the
/// punch; the chunk must not reach its next owner holding those bytes.
#[test]
fn a_write_racing_a_discard_never_reaches_the_next_owner_of_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = blank_image(dir.path(), "r.asif", 1 << 30);
    let delays = Delays {
        write_of_len: Some((4096, Duration::from_millis(200))),
        ..Default::default()
    };
    let img = open_slow(&path, delays, 512);
    img.write_at(&[1u8; 512], 0).unwrap();
    img.flush().unwrap();
    let w = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[0xAB; 4096], 0).unwrap())
    };
    // The write is inside its 200 ms delay, holding chunk 0's translation.
    std::thread::sleep(Duration::from_millis(50));
    img.discard(0, MIB).unwrap();
    img.flush().unwrap();
    w.join().unwrap();
    // Chunk 0's old chunk is the only free one: logical chunk 100 gets it.
    img.write_at(&[2u8; 512], 100 * MIB).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 100 * MIB).unwrap();
    assert_eq!(&b[..512], &[2u8; 512][..]);
    assert!(
        b[512..].iter().all(|&x| x == 0),
        "stale bytes from another region"
    );
}

/// One worker's share: the chunks `t, t + THREADS, ...` of three regions,
/// one per table, each straddling a chunk-group boundary. Returns the model
/// (logical chunk -> content; absent = zeros).
fn worker(img: &Image, t: u64, threads: u64, rounds: usize) -> HashMap<u64, Vec<u8>> {
    let mut r = Rng(0x5EED_0000 + t);
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    let regions = [GROUP - 4 * MIB, TABLE + GROUP - 4 * MIB, 2 * TABLE];
    for round in 0..rounds {
        let region = regions[r.below(3) as usize];
        let chunk_off = region + (t + threads * r.below(8 / threads.min(8))) * MIB;
        let key = chunk_off / MIB;
        match r.below(8) {
            0..=3 => {
                let off = r.below(MIB - 8192);
                let len = 1 + r.below(8191) as usize;
                let fill = ((round as u8) ^ (t as u8)) | 1;
                img.write_at(&vec![fill; len], chunk_off + off).unwrap();
                let m = model.entry(key).or_insert_with(|| vec![0; MIB as usize]);
                m[off as usize..off as usize + len].fill(fill);
            }
            4 => {
                img.discard(chunk_off, MIB).unwrap();
                model.remove(&key);
            }
            5 => {
                // Part of a chunk: the chunk stays mapped, the part reads zeros.
                let off = r.below(MIB / 2);
                let len = 1 + r.below(MIB / 2);
                img.discard(chunk_off + off, len).unwrap();
                if let Some(m) = model.get_mut(&key) {
                    m[off as usize..(off + len) as usize].fill(0);
                }
            }
            _ => {
                let mut buf = vec![0u8; MIB as usize];
                img.read_at(&mut buf, chunk_off).unwrap();
                let want = model.get(&key);
                let ok = match want {
                    Some(w) => &buf == w,
                    None => buf.iter().all(|&b| b == 0),
                };
                assert!(
                    ok,
                    "thread {t} round {round}: chunk at {chunk_off:#x} differs"
                );
            }
        }
    }
    model
}

/// Runs `threads` workers of `rounds` each on `img`; returns their models.
fn run_workers(img: &Arc<Image>, threads: u64, rounds: usize) -> Vec<HashMap<u64, Vec<u8>>> {
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || worker(&img, t, threads, rounds))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Closes `img`, reopens it read-only, runs `data` on it and checks it:
/// no corruption, no leaked chunk.
fn close_and_check(img: Arc<Image>, path: &Path, data: impl Fn(&Image)) {
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    data(&img);
    let r = img.check().unwrap();
    assert!(!r.is_corrupt(), "{:?}", r.corruptions);
    assert_eq!(r.leaked_chunks, 0);
}

fn verify(img: &Image, models: &[HashMap<u64, Vec<u8>>]) {
    let mut buf = vec![0u8; MIB as usize];
    for m in models {
        for (&key, want) in m {
            img.read_at(&mut buf, key * MIB).unwrap();
            assert!(&buf == want, "chunk {key} differs from its model");
        }
    }
}

/// Writers, partial and whole discards and readers on chunks of three
/// tables, a one-group cache, jittery I/O, and a flusher: every read
/// matches the model, and so does the image after a reopen; `check` finds
/// no corruption and no leak.
#[test]
fn stress_with_a_one_group_cache_and_delays_matches_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = blank_image(dir.path(), "r.asif", 3 * TABLE);
    let delays = Delays {
        jitter_us: 200,
        extend: Some(Duration::from_millis(5)),
        ..Default::default()
    };
    let img = open_slow(&path, delays, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let fl = flusher(&img, &stop);
    let models = run_workers(&img, 4, 300);
    stop.store(true, Ordering::Relaxed);
    assert!(fl.join().unwrap() > 0);
    verify(&img, &models);
    assert!(
        img.stats().resident_groups <= 8,
        "the cache stays near its size once nobody holds a group"
    );
    close_and_check(img, &path, |img| verify(img, &models));
}

/// Compaction and resize move chunks and tables; the engine keeps them
/// apart from I/O itself. Writers and readers run while another thread
/// compacts and grows the disk again and again: every read matches the
/// model, and the image checks clean afterwards.
#[test]
fn compact_and_resize_wait_for_io_and_io_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = blank_image(dir.path(), "r.asif", 3 * TABLE);
    let delays = Delays {
        jitter_us: 100,
        ..Default::default()
    };
    let img = open_slow(&path, delays, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                img.compact(&mut |_, _| {}).unwrap();
                let size = img.size();
                img.resize(size + MIB).unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    let models = run_workers(&img, 4, 150);
    stop.store(true, Ordering::Relaxed);
    assert!(mover.join().unwrap() > 0);
    verify(&img, &models);
    close_and_check(img, &path, |img| verify(img, &models));
}

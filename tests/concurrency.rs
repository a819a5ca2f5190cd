//! Many threads on one image: each owns every fourth chunk and writes,
//! discards and re-reads it while others allocate and free chunks in the
//! same groups and a flusher runs. At the end every byte must match each
//! owner's model and `check` must find nothing wrong.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use asiffs::{CreateOptions, Image, OpenOptions};
use common::Rng;

const MIB: u64 = 1 << 20;
const THREADS: u64 = 4;
const CHUNKS: u64 = 48;

/// One worker: its chunks are `t, t + THREADS, ...`; returns its model
/// (chunk -> content, absent = zeros).
fn worker(img: &Image, t: u64, rounds: usize) -> HashMap<u64, Vec<u8>> {
    let mut r = Rng(0x1234_5678 + t);
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    for round in 0..rounds {
        let chunk = t + THREADS * r.below(CHUNKS / THREADS);
        // A range straddling the next group boundary now and then.
        let base = if r.below(8) == 0 { 2048 * MIB - MIB } else { 0 };
        let chunk_off = base + chunk * MIB;
        let key = chunk_off / MIB;
        match r.below(6) {
            0..=3 => {
                let off = r.below(MIB - 8192);
                let len = 1 + r.below(8191) as usize;
                let fill = (round as u8) ^ (t as u8) | 1;
                img.write_at(&vec![fill; len], chunk_off + off).unwrap();
                let m = model.entry(key).or_insert_with(|| vec![0; MIB as usize]);
                m[off as usize..off as usize + len].fill(fill);
            }
            4 => {
                img.discard(chunk_off, MIB).unwrap();
                model.remove(&key);
            }
            _ => {
                let mut buf = vec![0u8; MIB as usize];
                img.read_at(&mut buf, chunk_off).unwrap();
                let want = model
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| vec![0; MIB as usize]);
                assert!(
                    buf == want,
                    "thread {t}: chunk at {chunk_off:#x} differs mid-run"
                );
            }
        }
    }
    model
}

#[test]
fn threads_share_an_image_safely() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.asif");
    let opts = CreateOptions {
        size: 8 << 30,
        ..Default::default()
    };
    Image::create(&path, &opts).unwrap().close().unwrap();
    let img = Arc::new(
        Image::open(
            &path,
            &OpenOptions {
                cache_groups: 2,
                ..OpenOptions::writable()
            },
        )
        .unwrap(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                img.flush().unwrap();
                n += 1;
                std::thread::yield_now();
            }
            n
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || worker(&img, t, 400))
        })
        .collect();
    let models: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    assert!(
        flusher.join().unwrap() > 0,
        "the flusher never ran alongside the workers"
    );
    let stats = img.stats();
    assert!(
        stats.chunks_freed > 0 && stats.chunks_allocated > stats.chunks_freed,
        "{stats:?}"
    );

    drop(Arc::try_unwrap(img).ok().expect("all threads joined"));
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    let r = img.check().unwrap();
    assert!(r.corruptions.is_empty(), "{:?}", r.corruptions);
    assert_eq!(r.leaked_chunks, 0);
    let mut buf = vec![0u8; MIB as usize];
    for (t, model) in models.iter().enumerate() {
        for c in 0..CHUNKS / THREADS {
            for base in [0, 2047] {
                let key = base + t as u64 + THREADS * c;
                img.read_at(&mut buf, key * MIB).unwrap();
                let ok = match model.get(&key) {
                    Some(m) => buf == *m,
                    None => buf.iter().all(|&b| b == 0),
                };
                assert!(ok, "chunk {key} (thread {t}) differs after reopen");
            }
        }
    }
}

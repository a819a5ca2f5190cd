//! Raw <-> UDSP `.sparseimage` through the library, for the interop test
//! (`integration/udsp_interop.sh`) until the CLI serves the format.
//!
//!     udsp_tool from-raw RAW OUT BAND_SIZE SEED
//!     udsp_tool to-raw IMG OUT
//!
//! `from-raw` copies RAW's non-zero pieces in an order shuffled by SEED,
//! cut at odd lengths and at 4 KiB boundaries, so bands land in the file out of logical order
//! and many writes are unaligned.

use std::os::unix::fs::FileExt;

use asiffs::udsp::SparseImage;
use asiffs::OpenOptions;

fn fail(msg: String) -> ! {
    eprintln!("udsp_tool: {msg}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["from-raw", raw, out, band, seed] => {
            let band = band
                .parse()
                .unwrap_or_else(|e| fail(format!("band size: {e}")));
            let seed = seed.parse().unwrap_or_else(|e| fail(format!("seed: {e}")));
            from_raw(raw, out, band, seed)
        }
        ["to-raw", img, out] => to_raw(img, out),
        _ => fail("usage: from-raw RAW OUT BAND_SIZE SEED | to-raw IMG OUT".into()),
    };
    if let Err(e) = r {
        fail(e.to_string());
    }
}

fn from_raw(raw: &str, out: &str, band: u64, mut seed: u64) -> asiffs::Result<()> {
    let io = |e| asiffs::Error::io(raw, e);
    let src = std::fs::File::open(raw).map_err(io)?;
    let size = src.metadata().map_err(io)?.len();
    let img = SparseImage::create(out, size, band)?;
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Pieces of 1 byte to 300 KiB covering the disk.
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < size {
        let n = (1 + rng() % (300 << 10)).min(size - at);
        pieces.push((at, n));
        at += n;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, (rng() % (i as u64 + 1)) as usize);
    }
    let mut buf = Vec::new();
    for (at, n) in pieces {
        buf.resize(n as usize, 0);
        src.read_exact_at(&mut buf, at).map_err(io)?;
        // Cut again at 4 KiB boundaries, leaving out the pieces of zeros.
        let mut i = 0;
        while i < buf.len() {
            let pos = at + i as u64;
            let n = ((4096 - pos % 4096) as usize).min(buf.len() - i);
            if buf[i..i + n].iter().any(|&b| b != 0) {
                img.write_at(&buf[i..i + n], pos)?;
            }
            i += n;
        }
    }
    img.close()
}

fn to_raw(path: &str, out: &str) -> asiffs::Result<()> {
    let img = SparseImage::open(path, &OpenOptions::default())?;
    let io = |e| asiffs::Error::io(out, e);
    let dst = std::fs::File::create(out).map_err(io)?;
    dst.set_len(img.size()).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    for e in img.extents()?.iter().filter(|e| e.data) {
        let mut at = e.start;
        while at < e.start + e.length {
            let n = (e.start + e.length - at).min(buf.len() as u64) as usize;
            img.read_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at).map_err(io)?;
            at += n as u64;
        }
    }
    dst.sync_all().map_err(io)
}

//! Decompression of one run. Every decoder writes into a sink that refuses
//! to grow past the run's size, so a hostile stream cannot make asiffs
//! allocate more than [`super::blkx::MAX_RUN_BYTES`].

use std::io::{self, Read, Write};

use super::blkx::RunKind;

/// A `Write` that holds at most `limit` bytes and fails past it.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(io::Error::other(TOO_LONG));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const TOO_LONG: &str = "stream expands past the run's size";

/// Expands `src` (a run of `kind`) into exactly `len` bytes.
pub fn decompress(kind: RunKind, src: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut sink = Bounded {
        out: Vec::with_capacity(len),
        limit: len,
    };
    let done: io::Result<()> = match kind {
        RunKind::Zlib => copy(flate2::read::ZlibDecoder::new(src), &mut sink),
        RunKind::Bzip2 => copy(bzip2::read::BzDecoder::new(src), &mut sink),
        RunKind::Lzfse => lzfse_rust::LzfseRingDecoder::default()
            .decode(&mut &src[..], &mut sink)
            .map(|_| ())
            .map_err(io::Error::other),
        RunKind::Lzma => lzma(src, &mut sink),
        RunKind::Adc => adc(src, &mut sink),
        other => return Err(format!("{} runs are not compressed", other.name())),
    };
    if let Err(e) = done {
        let msg = e.to_string().replace('\n', " ");
        return Err(format!("bad {} data: {msg}", kind.name()));
    }
    if sink.out.len() != len {
        return Err(format!(
            "{} data expands to {} bytes, not the run's {len}",
            kind.name(),
            sink.out.len()
        ));
    }
    Ok(sink.out)
}

fn copy(mut r: impl Read, w: &mut Bounded) -> io::Result<()> {
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n])?;
    }
}

/// ULMO runs: an xz stream; a bare `.lzma` stream is taken too.
fn lzma(src: &[u8], w: &mut Bounded) -> io::Result<()> {
    const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0];
    let mut input = io::BufReader::new(src);
    let r = if src.starts_with(XZ_MAGIC) {
        lzma_rs::xz_decompress(&mut input, w)
    } else {
        lzma_rs::lzma_decompress(&mut input, w)
    };
    r.map_err(|e| match e {
        lzma_rs::error::Error::IoError(io) => io,
        other => io::Error::other(other.to_string()),
    })
}

/// Apple Data Compression: a byte stream of three codes. `1LLLLLLL`: a
/// literal of L+1 bytes follows. `01LLLLLL DDDDDDDD DDDDDDDD`: copy L+4
/// bytes from D+1 back. `00LLLLDD DDDDDDDD`: copy L+3 bytes from D+1 back.
fn adc(src: &[u8], w: &mut Bounded) -> io::Result<()> {
    let bad = |what: &str| io::Error::other(what.to_string());
    let mut i = 0;
    while i < src.len() {
        let b = src[i];
        let (len, dist, step) = if b & 0x80 != 0 {
            let n = usize::from(b & 0x7F) + 1;
            let lit = src
                .get(i + 1..i + 1 + n)
                .ok_or_else(|| bad("literal runs past the end of the input"))?;
            w.write_all(lit)?;
            i += 1 + n;
            continue;
        } else if b & 0x40 != 0 {
            let d = src
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("copy code runs past the end of the input"))?;
            (
                usize::from(b & 0x3F) + 4,
                usize::from(u16::from_be_bytes([d[0], d[1]])),
                3,
            )
        } else {
            let d = *src
                .get(i + 1)
                .ok_or_else(|| bad("copy code runs past the end of the input"))?;
            (
                usize::from((b >> 2) & 0x0F) + 3,
                (usize::from(b & 0x03) << 8) | usize::from(d),
                2,
            )
        };
        let have = w.out.len();
        if dist >= have {
            return Err(bad("copy reaches before the start of the output"));
        }
        if have + len > w.limit {
            return Err(io::Error::other(TOO_LONG));
        }
        let from = have - dist - 1;
        // Byte by byte: the source may overlap what this copy writes.
        for k in 0..len {
            let c = w.out[from + k];
            w.out.push(c);
        }
        i += step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..20000u32)
            .map(|i| (i % 251) as u8 ^ (i / 1000) as u8)
            .collect()
    }

    #[test]
    fn zlib_bzip2_lzfse_lzma_round_trip() {
        let data = sample();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        let z = z.finish().unwrap();
        assert_eq!(decompress(RunKind::Zlib, &z, data.len()).unwrap(), data);

        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(&data).unwrap();
        let bz = bz.finish().unwrap();
        assert_eq!(decompress(RunKind::Bzip2, &bz, data.len()).unwrap(), data);

        let mut lz = Vec::new();
        lzfse_rust::encode_bytes(&data, &mut lz).unwrap();
        assert_eq!(decompress(RunKind::Lzfse, &lz, data.len()).unwrap(), data);

        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &data[..], &mut xz).unwrap();
        assert_eq!(decompress(RunKind::Lzma, &xz, data.len()).unwrap(), data);

        // Expanding to more, or to less, than the run is refused.
        assert_eq!(
            decompress(RunKind::Zlib, &z, data.len() - 1).unwrap_err(),
            "bad zlib data: stream expands past the run's size"
        );
        assert_eq!(
            decompress(RunKind::Lzma, &xz, 100).unwrap_err(),
            "bad LZMA data: stream expands past the run's size"
        );
        assert_eq!(
            decompress(RunKind::Bzip2, &bz, data.len() + 1).unwrap_err(),
            "bzip2 data expands to 20000 bytes, not the run's 20001"
        );
        assert!(decompress(RunKind::Zlib, &z[..z.len() / 2], data.len())
            .unwrap_err()
            .starts_with("bad zlib data: "));
        assert_eq!(
            decompress(RunKind::Raw, &z, 1).unwrap_err(),
            "raw runs are not compressed"
        );
    }

    #[test]
    fn adc_codes() {
        // "abc", then 3 bytes from 3 back, then 6 bytes from 6 back.
        let src = [0x82, b'a', b'b', b'c', 0x00, 0x02, 0x42, 0x00, 0x05];
        assert_eq!(decompress(RunKind::Adc, &src, 12).unwrap(), b"abcabcabcabc");
        // An overlapping copy repeats the last byte.
        let run = [0x80, b'x', 0x1C, 0x00];
        assert_eq!(decompress(RunKind::Adc, &run, 11).unwrap(), b"xxxxxxxxxxx");
        assert_eq!(
            decompress(RunKind::Adc, &[0x00, 0x00], 3).unwrap_err(),
            "bad ADC data: copy reaches before the start of the output"
        );
        assert_eq!(
            decompress(RunKind::Adc, &[0x85, b'a'], 6).unwrap_err(),
            "bad ADC data: literal runs past the end of the input"
        );
        assert_eq!(
            decompress(RunKind::Adc, &[0x80, b'a', 0x40], 6).unwrap_err(),
            "bad ADC data: copy code runs past the end of the input"
        );
        assert_eq!(
            decompress(RunKind::Adc, &run, 10).unwrap_err(),
            "bad ADC data: stream expands past the run's size"
        );
    }
}

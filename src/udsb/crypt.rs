//! Encrypted sparse bundles: `token` holds an `encrcdsa` version 2 header
//! (see [`crate::host::crypt`]) and every band file holds ciphertext in blocks of
//! the header's block size, encrypted with its keys.
//!
//! # Block numbers and the header's fields
//!
//! What the hdiutil vector (`testimage.AES-256.64k.header_v2.sparsebundle`)
//! shows:
//! - `token` is exactly the header's data offset long (`0x1e000`, 122,880
//!   bytes: fields, one password key blob at `0x60`, zeros), and its data
//!   size field is 0: the disk size is the plist's `size`.
//! - `bands/0` is whole blocks of ciphertext from its first byte.
//!
//! So `token` followed by the bands, end to end, is laid out exactly like a
//! version 2 `.dmg` whose data starts at the data offset; block *n* of that
//! data is disk bytes `n * block size ..`, and its IV is HMAC-SHA1 of *n*.
//! The vector has a single band, where "block numbers restart in each band"
//! and "block number = disk offset / block size" agree, so it cannot tell
//! them apart. We number blocks by disk offset: it follows from the token's
//! length matching the data offset, and it is how an independent public
//! reader (jief666/hdimount) reads bundles (token and bands as one
//! encrypted file). Consequences: the band size must be a multiple of the
//! block size, and the disk may hold at most 2^32 blocks (IVs number blocks
//! with 32 bits).
//!
//! # Band files
//!
//! [`EncBand`] wraps a [`BandFile`] and speaks plaintext. A band file only
//! ever holds whole blocks of real ciphertext: a write past the file's end
//! first fills the gap with encrypted zeros, a discard inside the file
//! writes encrypted zeros, and a discard reaching the file's end truncates
//! (at a block boundary, re-encrypting the tail of a cut block as zeros).
//! A hole inside the file would decrypt to noise on macOS. The part past a
//! file's end reads as zeros, as in a plain bundle; a block of all-zero
//! ciphertext (never written by us) reads as zeros too.
//!
//! Locks, in this order: a band's lock (shared by writes inside the file,
//! exclusive for anything that changes its length), then stripes of block
//! locks by global block number (shared by reads, exclusive by the
//! read-modify-write of a block). Both live in [`BandCrypt`], one per open
//! bundle, so two wrappers of one band file (the open-file cache may reopen
//! it) still exclude each other.
//!
//! A torn write of one block (a power cut mid-block) leaves a block that
//! decrypts to noise, as on macOS; only whole blocks written and synced
//! before a flush are kept across a crash.

use std::io;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::Error;
use crate::host::crypt::{BlockLocks, Unlocked};
use crate::host::dir::BandFile;

/// Stripes of band locks.
const STRIPES: usize = 64;
/// Bytes encrypted or decrypted per pass (whole blocks, at least one).
const CHUNK: u64 = 1 << 20;
/// Block numbers are 32 bits wide in the IV.
pub const MAX_BLOCKS: u64 = 1 << 32;

/// The keys of an open encrypted bundle and the locks shared by its bands.
pub struct BandCrypt {
    keys: Unlocked,
    bs: u64,
    blocks_per_band: u64,
    blocks: BlockLocks,
    bands: Box<[RwLock<()>]>,
}

impl std::fmt::Debug for BandCrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BandCrypt({:?})", self.keys)
    }
}

impl BandCrypt {
    /// `band_size` must be a multiple of the keys' block size.
    pub fn new(keys: Unlocked, band_size: u64) -> BandCrypt {
        let bs = keys.block_size() as u64;
        debug_assert_eq!(band_size % bs, 0);
        BandCrypt {
            keys,
            bs,
            blocks_per_band: band_size / bs,
            blocks: BlockLocks::new(),
            bands: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// Wraps band `n`'s file.
    pub fn wrap(self: &Arc<Self>, inner: Arc<dyn BandFile>, n: u64) -> Arc<dyn BandFile> {
        Arc::new(EncBand {
            inner,
            first: n * self.blocks_per_band,
            band: n,
            crypt: self.clone(),
        })
    }

    fn band_lock(&self, n: u64) -> &RwLock<()> {
        &self.bands[(n % STRIPES as u64) as usize]
    }
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        e => io::Error::other(e.to_string()),
    }
}

/// One band file of an encrypted bundle, in plaintext. Offsets are within
/// the band; block numbers given to the cipher are the disk's.
struct EncBand {
    inner: Arc<dyn BandFile>,
    /// Global number of the band's first block.
    first: u64,
    band: u64,
    crypt: Arc<BandCrypt>,
}

impl EncBand {
    fn bs(&self) -> u64 {
        self.crypt.bs
    }

    /// Reads and decrypts the band's blocks from `b0` into `buf` (whole
    /// blocks); a block the file does not hold whole reads as zeros.
    /// Returns the whole blocks the file held, in bytes. The caller holds
    /// their stripes.
    fn load(&self, b0: u64, buf: &mut [u8]) -> io::Result<usize> {
        let bs = self.bs() as usize;
        let got = self.inner.read_at(buf, b0 * bs as u64)?;
        let whole = got / bs * bs;
        buf[whole..].fill(0);
        self.crypt
            .keys
            .decrypt_blocks(self.first + b0, &mut buf[..whole])
            .map_err(to_io)?;
        Ok(whole)
    }

    /// Encrypts `buf` as the band's blocks from `b0` and writes it.
    fn store(&self, b0: u64, buf: &mut [u8]) -> io::Result<()> {
        self.crypt
            .keys
            .encrypt_blocks(self.first + b0, buf)
            .map_err(to_io)?;
        self.inner.write_all_at(buf, b0 * self.bs())
    }

    /// Writes `data` at `offset` within one chunk: partial blocks at either
    /// end are read, patched and written back whole under their stripes.
    fn write_chunk(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let bs = self.bs();
        let end = offset + data.len() as u64;
        let (b0, b1) = (offset / bs, end.div_ceil(bs));
        let mut buf = vec![0u8; ((b1 - b0) * bs) as usize];
        let _g = self.crypt.blocks.write(self.first + b0, self.first + b1);
        let head = (offset - b0 * bs) as usize;
        if head != 0 {
            self.load(b0, &mut buf[..bs as usize])?;
        }
        let last = buf.len() - bs as usize;
        if end % bs != 0 && (b1 - 1 > b0 || head == 0) {
            self.load(b1 - 1, &mut buf[last..])?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        self.store(b0, &mut buf)
    }

    /// Writes `data` at `offset` in chunks aligned to [`CHUNK`].
    fn write_plain(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let step = CHUNK.max(self.bs());
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let n = ((step - at % step) as usize).min(data.len() - done);
            self.write_chunk(&data[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    /// Writes encrypted zeros over `offset..end`.
    fn write_zeros(&self, offset: u64, end: u64) -> io::Result<()> {
        let step = CHUNK.max(self.bs());
        let zeros = vec![0u8; step.min(end.saturating_sub(offset)) as usize];
        let mut at = offset;
        while at < end {
            let n = (step - at % step).min(end - at);
            self.write_chunk(&zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    /// Whole blocks the file holds, in bytes (a torn last block is not).
    fn whole_len(&self) -> io::Result<u64> {
        let bs = self.bs();
        Ok(self.inner.len()? / bs * bs)
    }

    /// Makes the file end at `len` rounded up to a block, the cut block's
    /// bytes from `len` on encrypted zeros; the caller holds the band
    /// exclusively.
    fn cut(&self, len: u64) -> io::Result<()> {
        let bs = self.bs();
        let file = self.inner.len()?;
        let keep = len.div_ceil(bs) * bs;
        if len % bs != 0 && keep <= file {
            let b = len / bs;
            let mut buf = vec![0u8; bs as usize];
            let _g = self.crypt.blocks.write(self.first + b, self.first + b + 1);
            self.load(b, &mut buf)?;
            buf[(len % bs) as usize..].fill(0);
            self.store(b, &mut buf)?;
        }
        if keep < file {
            self.inner.set_len(keep)?;
        }
        Ok(())
    }

    /// Fills `from..to` (whole blocks past the file's old end) with
    /// encrypted zeros; the caller holds the band exclusively.
    fn fill(&self, from: u64, to: u64) -> io::Result<()> {
        if from < to {
            self.write_zeros(from, to)?;
        }
        Ok(())
    }
}

impl BandFile for EncBand {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let _band = self.crypt.band_lock(self.band).read();
        let bs = self.bs();
        let end = offset + buf.len() as u64;
        let step = CHUNK.max(bs);
        let mut tmp = Vec::new();
        let mut at = offset;
        while at < end {
            let stop = (at - at % step + step).min(end);
            let (b0, b1) = (at / bs, stop.div_ceil(bs));
            tmp.resize(((b1 - b0) * bs) as usize, 0);
            let whole = {
                let _g = self.crypt.blocks.read(self.first + b0, self.first + b1);
                self.load(b0, &mut tmp)?
            };
            let from = (at - b0 * bs) as usize;
            let avail = (b0 * bs + whole as u64).min(stop);
            if avail <= at {
                break;
            }
            let n = (avail - at) as usize;
            let to = (at - offset) as usize;
            buf[to..to + n].copy_from_slice(&tmp[from..from + n]);
            at += n as u64;
            if avail < stop {
                break;
            }
        }
        Ok((at - offset) as usize)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.bs();
        let lock = self.crypt.band_lock(self.band);
        let end = (offset + buf.len() as u64).div_ceil(bs) * bs;
        {
            let _band = lock.read();
            // Inside the file's whole blocks: only the blocks written change.
            if end <= self.whole_len()? {
                return self.write_plain(buf, offset);
            }
        }
        // Growing: alone in the band, so the gap filled is not raced.
        let _band = lock.write();
        let whole = self.whole_len()?;
        self.fill(whole, offset / bs * bs)?;
        self.write_plain(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _band = self.crypt.band_lock(self.band).write();
        let whole = self.whole_len()?;
        if len > whole {
            return self.fill(whole, len.div_ceil(self.bs()) * self.bs());
        }
        self.cut(len)
    }

    /// Encrypted zeros inside the file; a range reaching the file's end
    /// cuts the file there instead.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let _band = self.crypt.band_lock(self.band).write();
        let file = self.inner.len()?;
        let end = offset.saturating_add(len);
        if offset >= file {
            return Ok(());
        }
        if end >= file {
            return self.cut(offset);
        }
        self.write_zeros(offset, end)
    }

    /// Encrypted zeros up to the range's end where the file is shorter; a
    /// reserved hole would be noise to macOS.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<bool> {
        let bs = self.bs();
        let _band = self.crypt.band_lock(self.band).write();
        let whole = self.whole_len()?;
        let end = offset.saturating_add(len).div_ceil(bs) * bs;
        self.fill(whole, end)?;
        Ok(end > whole)
    }

    fn sync(&self, metadata: bool) -> io::Result<()> {
        self.inner.sync(metadata)
    }

    /// The whole file is data: zeros inside it are ciphertext of zeros.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.inner.len()?).then_some(offset))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        let len = self.inner.len()?;
        Ok((offset < len).then_some(len))
    }
}

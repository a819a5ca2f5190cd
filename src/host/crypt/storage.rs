//! [`CryptStorage`]: the plaintext of an encrypted container, as a
//! [`Storage`] the format readers open like a file.
//!
//! Writes re-encrypt whole blocks: a partial block is read, decrypted,
//! patched and encrypted again under that block's stripe lock, so writers
//! of neighbouring bytes in one block never lose each other's bytes, and a
//! reader never decrypts a half-written block.
//!
//! Growing (v2) keeps this order, so that a crash never leaves the header
//! claiming blocks that are not yet encrypted zeros (a hole in ciphertext
//! would decrypt to noise on macOS):
//! 1. the tail of the old last block past the old size is re-encrypted as
//!    zeros, and every new block is written as encrypted zeros;
//! 2. the container is synced;
//! 3. only then is the header's data-size field rewritten in place (and,
//!    for `extend`, synced).
//!
//! A write past the end follows the same order lazily: its blocks are
//! written at once, the data-size field on the next `sync` (after the
//! container's sync). Shrinking writes the smaller size and syncs it,
//! then truncates the container.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::header_v2::{HeaderV2, DATA_SIZE_AT};
use super::{detect, keys, trailer_v1, BlockLocks, Scheme, Unlocked, HEADER_READ_MAX};
use crate::error::{Error, Result};
use crate::host::file::Storage;

/// Bytes encrypted or decrypted per pass (whole blocks, at least one).
const CHUNK: u64 = 1 << 20;

pub const READ_ONLY_V1: &str = "version-1 encrypted images are read-only";

pub struct CryptStorage {
    inner: Arc<dyn Storage>,
    keys: Unlocked,
    scheme: Scheme,
    /// Where block 0 starts in the container.
    data_offset: u64,
    bs: u64,
    /// Plaintext length as presented.
    size: AtomicU64,
    /// The header's data-size field as last written; held while the size
    /// changes, which serializes growth and shrinking.
    header_size: Mutex<u64>,
    blocks: BlockLocks,
}

impl std::fmt::Debug for CryptStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptStorage")
            .field("scheme", &self.scheme)
            .field("keys", &self.keys)
            .field("data_offset", &self.data_offset)
            .field("size", &self.size.load(Ordering::Relaxed))
            .finish()
    }
}

fn read_header_bytes(inner: &dyn Storage, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len.min(HEADER_READ_MAX) as usize];
    inner
        .read_at(&mut buf, 0)
        .map_err(|e| Error::io("reading the encrcdsa header", e))?;
    Ok(buf)
}

fn file_len(inner: &dyn Storage) -> Result<u64> {
    inner
        .len()
        .map_err(|e| Error::io("stat of the encrypted image", e))
}

impl CryptStorage {
    /// Opens an encrypted container with its password. Refuses a container
    /// that is not encrypted, a malformed header or trailer, and a wrong
    /// password (error "wrong password", see [`super::is_wrong_password`]).
    pub fn unlock(inner: Arc<dyn Storage>, password: &[u8]) -> Result<CryptStorage> {
        let len = file_len(&*inner)?;
        match detect(&*inner)? {
            Some(Scheme::HeaderV2) => {
                let buf = read_header_bytes(&*inner, len)?;
                let (h, keys) = super::unlock_header_v2(&buf, password)?;
                CryptStorage::v2(inner, h, keys, len)
            }
            Some(Scheme::TrailerV1) => {
                let mut buf = vec![0u8; trailer_v1::SIZE];
                inner
                    .read_at(&mut buf, len - trailer_v1::SIZE as u64)
                    .map_err(|e| Error::io("reading the cdsaencr trailer", e))?;
                let t = trailer_v1::TrailerV1::decode(&buf)?;
                let room = len - trailer_v1::SIZE as u64;
                if t.data_size > room {
                    return Err(Error::Corrupt(format!(
                        "cdsaencr trailer: data size {} is past the {room} bytes before the trailer",
                        t.data_size
                    )));
                }
                let keys = Unlocked::new(&keys::unwrap_v1(&t, password)?, t.block_size)?;
                Ok(CryptStorage::build(
                    inner,
                    keys,
                    Scheme::TrailerV1,
                    0,
                    t.data_size,
                ))
            }
            None => Err(Error::Invalid(
                "not an encrypted image: no encrcdsa header or cdsaencr trailer".into(),
            )),
        }
    }

    /// Opens a v2 container with keys already unlocked (from
    /// [`super::create_v2`]), without deriving them again.
    pub fn with_keys(inner: Arc<dyn Storage>, keys: Unlocked) -> Result<CryptStorage> {
        let len = file_len(&*inner)?;
        let buf = read_header_bytes(&*inner, len)?;
        let h = HeaderV2::decode(&buf)?;
        if h.block_size != keys.block_size() || h.key_bits != keys.key_bits() {
            return Err(Error::Invalid(format!(
                "encrypted image: keys for AES-{} with {}-byte blocks do not fit a header for AES-{} with {}-byte blocks",
                keys.key_bits(),
                keys.block_size(),
                h.key_bits,
                h.block_size
            )));
        }
        CryptStorage::v2(inner, h, keys, len)
    }

    fn v2(inner: Arc<dyn Storage>, h: HeaderV2, keys: Unlocked, len: u64) -> Result<CryptStorage> {
        match h.data_offset.checked_add(h.data_size) {
            Some(end) if end <= len => {}
            _ => {
                return Err(Error::Corrupt(format!(
                    "encrcdsa header: data at {}+{} is past the end of the file ({len} bytes)",
                    h.data_offset, h.data_size
                )))
            }
        }
        Ok(CryptStorage::build(
            inner,
            keys,
            Scheme::HeaderV2,
            h.data_offset,
            h.data_size,
        ))
    }

    fn build(
        inner: Arc<dyn Storage>,
        keys: Unlocked,
        scheme: Scheme,
        data_offset: u64,
        size: u64,
    ) -> CryptStorage {
        CryptStorage {
            inner,
            bs: keys.block_size() as u64,
            keys,
            scheme,
            data_offset,
            size: AtomicU64::new(size),
            header_size: Mutex::new(size),
            blocks: BlockLocks::new(),
        }
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The keys, for wrapping other files of the same image.
    pub fn keys(&self) -> &Unlocked {
        &self.keys
    }

    fn check_writable(&self) -> io::Result<()> {
        match self.scheme {
            Scheme::HeaderV2 => Ok(()),
            Scheme::TrailerV1 => Err(io::Error::other(READ_ONLY_V1)),
        }
    }

    fn block_at(&self, block: u64) -> io::Result<u64> {
        block
            .checked_mul(self.bs)
            .and_then(|o| o.checked_add(self.data_offset))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
    }

    /// Reads and decrypts blocks `b0..` into `buf` (whole blocks); the
    /// caller holds their stripes.
    fn load(&self, b0: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(buf, self.block_at(b0)?)?;
        self.keys.decrypt_blocks(b0, buf).map_err(to_io)
    }

    /// Encrypts `buf` as blocks `b0..` and writes them; the caller holds
    /// their stripes.
    fn store(&self, b0: u64, buf: &mut [u8]) -> io::Result<()> {
        self.keys.encrypt_blocks(b0, buf).map_err(to_io)?;
        self.inner.write_at(buf, self.block_at(b0)?)
    }

    /// Writes `data` at plaintext `offset`, within one chunk. Blocks at or
    /// past `fresh` hold nothing yet and are taken as zeros, not read.
    fn write_chunk(&self, data: &[u8], offset: u64, fresh: u64) -> io::Result<()> {
        let bs = self.bs;
        let end = offset + data.len() as u64;
        let (b0, b1) = (offset / bs, end.div_ceil(bs));
        let mut buf = vec![0u8; ((b1 - b0) * bs) as usize];
        let _g = self.blocks.write(b0, b1);
        let head = (offset - b0 * bs) as usize;
        if head != 0 && b0 < fresh {
            self.load(b0, &mut buf[..bs as usize])?;
        }
        let last_start = buf.len() - bs as usize;
        if end % bs != 0 && b1 - 1 < fresh && (b1 - 1 > b0 || head == 0) {
            self.load(b1 - 1, &mut buf[last_start..])?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        self.store(b0, &mut buf)
    }

    /// Writes `data` in chunks that start and end on block boundaries
    /// where they can.
    fn write_plain(&self, data: &[u8], offset: u64, fresh: u64) -> io::Result<()> {
        let step = CHUNK.max(self.bs);
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let room = step - at % step;
            let n = room.min((data.len() - done) as u64) as usize;
            self.write_chunk(&data[done..done + n], at, fresh)?;
            done += n;
        }
        Ok(())
    }

    /// Makes `old..new` read as zeros as the first step of a growth (see
    /// the module docs); the caller holds `header_size`. Blocks from
    /// `zero_until` on are left to the caller's write.
    fn grow_blocks(&self, old: u64, new: u64, zero_until: u64) -> io::Result<()> {
        let bs = self.bs;
        if old % bs != 0 {
            // The tail past the old size may hold anything (hdiutil's).
            let b = old / bs;
            let keep = (old % bs) as usize;
            let mut buf = vec![0u8; bs as usize];
            let _g = self.blocks.write(b, b + 1);
            self.load(b, &mut buf)?;
            buf[keep..].fill(0);
            self.store(b, &mut buf)?;
        }
        let first = old.div_ceil(bs);
        let last = new.div_ceil(bs).min(zero_until.max(first));
        if last > first {
            let _g = self.blocks.write(first, last);
            write_zero_blocks(
                &*self.inner,
                &self.keys,
                self.data_offset,
                first,
                last - first,
            )?;
        }
        Ok(())
    }

    fn write_header_size(&self, size: u64) -> io::Result<()> {
        self.inner.write_at(&size.to_be_bytes(), DATA_SIZE_AT)
    }
}

/// Writes `count` encrypted zero blocks from block `first`.
pub(crate) fn write_zero_blocks(
    inner: &dyn Storage,
    keys: &Unlocked,
    data_offset: u64,
    first: u64,
    count: u64,
) -> io::Result<()> {
    let bs = keys.block_size() as u64;
    let per = (CHUNK / bs).max(1);
    let mut buf = vec![0u8; (per.min(count) * bs) as usize];
    let mut b = first;
    while b < first + count {
        let n = per.min(first + count - b);
        let part = &mut buf[..(n * bs) as usize];
        part.fill(0);
        keys.encrypt_blocks(b, part).map_err(to_io)?;
        let at = b
            .checked_mul(bs)
            .and_then(|o| o.checked_add(data_offset))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        inner.write_at(part, at)?;
        b += n;
    }
    Ok(())
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        e => io::Error::other(e.to_string()),
    }
}

impl Storage for CryptStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.size.load(Ordering::Acquire);
        let end = offset.saturating_add(buf.len() as u64).min(size);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        let bs = self.bs;
        let step = CHUNK.max(bs);
        let mut at = offset;
        let mut tmp = Vec::new();
        while at < end {
            let stop = (at - at % step + step).min(end);
            let (b0, b1) = (at / bs, stop.div_ceil(bs));
            tmp.resize(((b1 - b0) * bs) as usize, 0);
            {
                let _g = self.blocks.read(b0, b1);
                self.load(b0, &mut tmp)?;
            }
            let from = (at - b0 * bs) as usize;
            let n = (stop - at) as usize;
            let to = (at - offset) as usize;
            buf[to..to + n].copy_from_slice(&tmp[from..from + n]);
            at = stop;
        }
        buf[(end - offset) as usize..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if end <= self.size.load(Ordering::Acquire) {
            return self.write_plain(buf, offset, u64::MAX);
        }
        let _resize = self.header_size.lock();
        let old = self.size.load(Ordering::Acquire);
        if end <= old {
            return self.write_plain(buf, offset, u64::MAX);
        }
        // Zero the gap before the write; its own blocks past the old end
        // start from zeros. The header follows at the next sync.
        self.grow_blocks(old, end, offset / self.bs)?;
        self.write_plain(buf, offset, old.div_ceil(self.bs))?;
        self.size.store(end, Ordering::Release);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Acquire))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut header = self.header_size.lock();
        let old = self.size.load(Ordering::Acquire);
        if len > old {
            self.grow_blocks(old, len, u64::MAX)?;
            self.inner.sync()?;
            self.write_header_size(len)?;
            *header = len;
            self.size.store(len, Ordering::Release);
        } else if len < old {
            // The smaller size durable before the blocks go: a header
            // never claims blocks a crash has cut off.
            self.write_header_size(len)?;
            self.inner.sync()?;
            *header = len;
            self.size.store(len, Ordering::Release);
            let keep = self.block_at(len.div_ceil(self.bs))?;
            self.inner.set_len(keep)?;
        }
        Ok(())
    }

    fn extend(&self, len: u64) -> io::Result<()> {
        self.set_len(len.max(self.size.load(Ordering::Acquire)))?;
        self.sync()
    }

    /// Encrypted zeros, not a hole: a hole in ciphertext reads as noise on
    /// macOS.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let end = offset
            .saturating_add(len)
            .min(self.size.load(Ordering::Acquire));
        let step = CHUNK.max(self.bs);
        let zeros = vec![0u8; step.min(end.saturating_sub(offset)) as usize];
        let mut at = offset;
        while at < end {
            let n = (step - at % step).min(end - at);
            self.write_plain(&zeros[..n as usize], at, u64::MAX)?;
            at += n;
        }
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let b0 = offset / self.bs;
        let b1 = offset.saturating_add(len).div_ceil(self.bs);
        let at = self.block_at(b0)?;
        self.inner.reserve(at, self.block_at(b1)? - at)
    }

    /// The container's sync, then (v2) the data-size field if writes past
    /// the end grew the plaintext since, and another sync.
    fn sync(&self) -> io::Result<()> {
        let size = self.size.load(Ordering::Acquire);
        self.inner.sync()?;
        if self.scheme != Scheme::HeaderV2 {
            return Ok(());
        }
        let mut header = self.header_size.lock();
        // Only a size whose blocks the sync above covered; a shrink since
        // wrote its own field.
        if *header < size && size <= self.size.load(Ordering::Acquire) {
            self.write_header_size(size)?;
            self.inner.sync()?;
            *header = size;
        }
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.size.load(Ordering::Acquire)).then_some(offset))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asif::engine::memory::MemStorage;
    use crate::host::crypt::header_v2;

    fn new_image(size: u64, bs: u32) -> (Arc<MemStorage>, CryptStorage) {
        let mem = Arc::new(MemStorage::new(Vec::new()));
        let keys = super::super::create_v2_with(&*mem, b"pw", 128, bs, size, 2).unwrap();
        let s = CryptStorage::with_keys(mem.clone(), keys).unwrap();
        (mem, s)
    }

    #[test]
    fn unaligned_writes_read_back_and_growth_reads_zeros() {
        let (mem, s) = new_image(10_000, 512);
        assert_eq!(mem.len().unwrap(), header_v2::DATA_OFFSET + 20 * 512);
        let mut expect = vec![0u8; 10_000];
        let pat: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8 + 1).collect();
        s.write_at(&pat, 777).unwrap();
        expect[777..2277].copy_from_slice(&pat);
        let mut got = vec![0xeeu8; 10_100];
        s.read_at(&mut got, 0).unwrap();
        assert_eq!(got[..10_000], expect[..]);
        assert_eq!(got[10_000..], [0u8; 100]);
        // Past the end: the gap and the tail of the old last block read zeros.
        s.write_at(&[9, 9, 9], 20_000).unwrap();
        assert_eq!(s.len().unwrap(), 20_003);
        expect.resize(20_003, 0);
        expect[20_000..].copy_from_slice(&[9, 9, 9]);
        let mut got = vec![0xeeu8; 20_003];
        s.read_at(&mut got, 0).unwrap();
        assert_eq!(got, expect);
        // The header's size follows at sync.
        let mut f = [0u8; 8];
        mem.read_at(&mut f, DATA_SIZE_AT).unwrap();
        assert_eq!(u64::from_be_bytes(f), 10_000);
        s.sync().unwrap();
        mem.read_at(&mut f, DATA_SIZE_AT).unwrap();
        assert_eq!(u64::from_be_bytes(f), 20_003);
    }

    #[test]
    fn shrink_then_grow_reads_zeros_past_the_old_size() {
        let (mem, s) = new_image(4096, 4096);
        s.write_at(&[0xab; 4096], 0).unwrap();
        s.set_len(100).unwrap();
        assert_eq!(mem.len().unwrap(), header_v2::DATA_OFFSET + 4096);
        s.set_len(8192).unwrap();
        let mut got = vec![0u8; 8192];
        s.read_at(&mut got, 0).unwrap();
        assert_eq!(got[..100], [0xab; 100]);
        assert!(got[100..].iter().all(|&b| b == 0));
        let mut f = [0u8; 8];
        mem.read_at(&mut f, DATA_SIZE_AT).unwrap();
        assert_eq!(u64::from_be_bytes(f), 8192);
    }

    #[test]
    fn concurrent_writers_in_one_block_keep_each_others_bytes() {
        let (_mem, s) = new_image(4096, 4096);
        let s = Arc::new(s);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        let at = t as u64 * 512 + round;
                        s.write_at(&[t + 1], at).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut got = vec![0u8; 4096];
        s.read_at(&mut got, 0).unwrap();
        for t in 0..8u8 {
            let at = t as usize * 512;
            assert_eq!(got[at..at + 50], [t + 1; 50], "writer {t}");
            assert!(got[at + 50..at + 512].iter().all(|&b| b == 0));
        }
    }
}

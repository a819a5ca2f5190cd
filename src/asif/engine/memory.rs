//! A container held in memory, for tests and fuzzing: an image can be
//! opened from bytes with [`crate::Image::from_storage`] without a file.
//!
//! It is sparse at the tail: the length is kept apart from the bytes, so
//! growing the container (as the allocator does, many chunks at a time)
//! costs nothing until something is written there. Bytes past what was
//! written read as zeros, as a host hole would.

use std::io;

use parking_lot::Mutex;

use crate::host::file::Storage;

/// Default cap on the container's length. A hostile header can ask for
/// huge offsets; past the cap every call fails instead of allocating.
pub const DEFAULT_LIMIT: u64 = 1 << 30;

pub struct MemStorage {
    inner: Mutex<Inner>,
    limit: u64,
}

struct Inner {
    /// Bytes up to the last one written; everything after reads as zeros.
    data: Vec<u8>,
    /// The container's length, at least `data.len()`.
    len: u64,
}

/// The error a file system gives for a file past its maximum size.
fn too_large() -> io::Error {
    io::Error::from_raw_os_error(libc::EFBIG)
}

impl MemStorage {
    /// A container holding `bytes`, capped at [`DEFAULT_LIMIT`].
    pub fn new(bytes: Vec<u8>) -> MemStorage {
        MemStorage::with_limit(bytes, DEFAULT_LIMIT)
    }

    /// A container holding `bytes` whose length may never pass `limit`
    /// (writes, `set_len` and `extend` beyond it fail with `EFBIG`).
    pub fn with_limit(bytes: Vec<u8>, limit: u64) -> MemStorage {
        let len = bytes.len() as u64;
        MemStorage {
            inner: Mutex::new(Inner { data: bytes, len }),
            limit: limit.max(len),
        }
    }

    /// The whole container, holes filled with zeros.
    pub fn to_vec(&self) -> Vec<u8> {
        let g = self.inner.lock();
        let mut v = g.data.clone();
        v.resize(g.len as usize, 0);
        v
    }

    /// `offset + len` as a length this store may hold.
    fn end_within_limit(&self, offset: u64, len: u64) -> io::Result<u64> {
        offset
            .checked_add(len)
            .filter(|&end| end <= self.limit)
            .ok_or_else(too_large)
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.inner.lock();
        // Past the written bytes (or an offset no usize can hold): zeros.
        let stored = usize::try_from(offset)
            .ok()
            .and_then(|o| g.data.get(o..))
            .unwrap_or(&[]);
        let n = stored.len().min(buf.len());
        buf[..n].copy_from_slice(&stored[..n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.end_within_limit(offset, buf.len() as u64)?;
        let mut g = self.inner.lock();
        // Within the limit, so both fit in usize on a 64-bit host.
        let (start, end_us) = (offset as usize, end as usize);
        if g.data.len() < end_us {
            g.data.resize(end_us, 0);
        }
        g.data[start..end_us].copy_from_slice(buf);
        g.len = g.len.max(end);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.inner.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.end_within_limit(0, len)?;
        let mut g = self.inner.lock();
        g.data.truncate(len as usize);
        g.len = len;
        Ok(())
    }

    /// Nothing to make durable: only the length changes.
    fn extend(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.inner.lock();
        let stored = g.data.len() as u64;
        let start = offset.min(stored);
        let end = offset.saturating_add(len).min(stored);
        if end == stored {
            // A hole up to the end of what is stored: drop the bytes.
            g.data.truncate(start as usize);
        } else {
            g.data[start as usize..end as usize].fill(0);
        }
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.end_within_limit(offset, len).map(|_| ())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    /// Conservative: any stored byte may be data, the tail is a hole.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let g = self.inner.lock();
        Ok((offset < g.data.len() as u64).then_some(offset))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.inner.lock().data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_tail_reads_zeros_and_grows_free() {
        let s = MemStorage::with_limit(vec![1, 2, 3, 4], 1 << 20);
        let mut b = [9u8; 6];
        s.read_at(&mut b, 2).unwrap();
        assert_eq!(b, [3, 4, 0, 0, 0, 0]);
        s.extend(1 << 20).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 20);
        assert_eq!(s.allocated_bytes().unwrap(), 4);
        assert_eq!(s.next_data(4).unwrap(), None);
        s.write_at(&[7], 10).unwrap();
        s.read_at(&mut b, 8).unwrap();
        assert_eq!(b, [0, 0, 7, 0, 0, 0]);
        assert_eq!(s.next_data(3).unwrap(), Some(3));
    }

    #[test]
    fn punch_zeros_and_trims() {
        let s = MemStorage::new(vec![5; 8]);
        s.punch(2, 2).unwrap();
        assert_eq!(s.to_vec(), [5, 5, 0, 0, 5, 5, 5, 5]);
        s.punch(6, u64::MAX).unwrap();
        assert_eq!(s.allocated_bytes().unwrap(), 6);
        assert_eq!(s.to_vec(), [5, 5, 0, 0, 5, 5, 0, 0]);
    }

    #[test]
    fn refuses_to_pass_the_limit() {
        let s = MemStorage::with_limit(Vec::new(), 100);
        let efbig = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EFBIG);
        assert!(efbig(s.write_at(&[0; 2], 99)));
        assert!(efbig(s.write_at(&[0], u64::MAX)));
        assert!(efbig(s.set_len(101)));
        assert!(efbig(s.reserve(u64::MAX, 2)));
        s.write_at(&[1], 99).unwrap();
        assert_eq!(s.len().unwrap(), 100);
    }
}

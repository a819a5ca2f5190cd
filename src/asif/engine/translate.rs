//! Where a request over fully mapped chunks lies in the container, for the
//! ring ([`crate::host::uring`]).
//!
//! A translated request holds the image shared (`exclusive`) and inside
//! the I/O gate until its last host I/O completes, as the synchronous path
//! does: compact and resize wait for it, and no chunk it touches is handed
//! out again under it. Requests that allocate, or touch partially valid
//! chunks, are not translated.

use parking_lot::lock_api::ArcRwLockReadGuard;
use parking_lot::RawRwLock;

use super::alloc::OwnedGateGuard;
use super::Image;
use crate::asif::format::ChunkState;
use crate::disk::{HostPiece, Translation};
use crate::error::Result;
use crate::host::file::AsyncFds;

/// The image held shared and the I/O gate entered, for one request.
/// Only dropping it matters.
struct Held {
    _shared: ArcRwLockReadGuard<RawRwLock, ()>,
    _gate: OwnedGateGuard,
}

impl Image {
    /// Where each fully mapped piece of `offset..offset+len` lies in the
    /// container; `None` when some piece needs the synchronous path (not
    /// mapped, or partially valid). Unmapped pieces of a read are left to
    /// the zeroed buffer when `zeros_ok`.
    fn segments(
        &self,
        fds: AsyncFds,
        offset: u64,
        len: u64,
        zeros_ok: bool,
    ) -> Result<Option<Vec<HostPiece>>> {
        let cs = self.geo.chunk_size;
        let mut segs = Vec::new();
        for p in self.pieces(offset, len) {
            let state = match self.group(&p.loc, false)? {
                None => None,
                Some(g) => match g.state(p.loc.index as usize) {
                    None => return Err(self.corrupt_entry(&p.loc)),
                    Some(s) => Some(s),
                },
            };
            match state {
                Some(ChunkState::Full(n)) => {
                    segs.push(HostPiece::on(fds, p.at, n * cs + p.loc.within, p.len))
                }
                None | Some(ChunkState::Unwritten | ChunkState::Unmapped) if zeros_ok => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(segs))
    }

    pub(crate) fn translate_data(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Option<Translation>> {
        let Some(mut fds) = self.storage.async_fds() else {
            return Ok(None);
        };
        if !self.direct_data {
            fds.direct = None;
        }
        if write && !self.writable {
            return Ok(None);
        }
        let shared = self.exclusive.read_arc();
        if write {
            self.open_scan.wait(&self.alloc)?;
        }
        self.check_range(offset, len)?;
        let gate = self.gate.enter_owned();
        let Some(pieces) = self.segments(fds, offset, len, !write)? else {
            return Ok(None);
        };
        Ok(Some(Translation {
            pieces,
            hold: Box::new(Held {
                _shared: shared,
                _gate: gate,
            }),
        }))
    }

    pub(crate) fn has_async_fds(&self) -> bool {
        self.storage.async_fds().is_some()
    }

    /// See [`crate::disk::Disk::io_done`].
    pub(crate) fn translated_done(&self, write: bool, len: u64, ok: bool) {
        if write {
            // Before the reply: a flush that follows it must sync this data.
            self.note_data_change();
        }
        self.counters.io.done(write, len, ok);
    }
}

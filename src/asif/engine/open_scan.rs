//! The index scan of a writable open.
//!
//! Before the first change, a writable image walks its index once
//! ([`usage::scan`]): chunks nothing names become free for reuse (chunks
//! freed in an earlier session or leaked by a crash), after any bytes they
//! still hold are punched durably; an image whose entries share a chunk,
//! point past the end of the file or break the rules is refused for
//! writing, with the reason logged, and served read-only. Small images are
//! scanned inside `open`; large ones on a thread of their own, while reads
//! go on. No change can happen before the scan's result is applied, so the
//! scan sees exactly the index as it was at open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::alloc::{Allocator, FreeRanges};
use super::usage::{self, Usage};
use super::OpenOptions;
use crate::asif::format::Geometry;
use crate::error::{Error, Result};
use crate::host::file::Storage;

/// What the scan found, waiting to be handed to the allocator.
struct Found {
    free: FreeRanges,
    /// Unused chunks that held data and were punched.
    punched: u64,
}

enum State {
    /// Read-only open: nothing to scan.
    Off,
    Running,
    Ready(Found),
    Applied {
        punched: u64,
    },
    Refused(String),
}

struct Slot {
    state: Mutex<State>,
    done: Condvar,
}

pub(super) struct OpenScan {
    slot: Arc<Slot>,
    path: PathBuf,
}

impl OpenScan {
    pub fn none() -> OpenScan {
        OpenScan {
            slot: Arc::new(Slot {
                state: Mutex::new(State::Off),
                done: Condvar::new(),
            }),
            path: PathBuf::new(),
        }
    }

    pub fn start(
        path: &Path,
        storage: &Arc<dyn Storage>,
        geo: &Geometry,
        tables: &[u64],
        end: u64,
        opts: &OpenOptions,
    ) -> OpenScan {
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Running),
            done: Condvar::new(),
        });
        let s = OpenScan {
            slot: slot.clone(),
            path: path.to_path_buf(),
        };
        let background = tables.iter().filter(|&&t| t != 0).count() > opts.scan_inline_tables;
        let job = {
            let (path, storage, geo, tables) = (
                path.to_path_buf(),
                storage.clone(),
                geo.clone(),
                tables.to_vec(),
            );
            move || {
                let state = match run(&*storage, &geo, &tables, end) {
                    Ok(found) => State::Ready(found),
                    Err(reason) => {
                        // Inline, the caller sees the refusal and says it
                        // its own way; from a thread, nobody else can.
                        if background {
                            tracing::warn!("{}: serving read-only: {reason}", path.display());
                        }
                        State::Refused(reason)
                    }
                };
                *slot.state.lock() = state;
                slot.done.notify_all();
            }
        };
        if !background {
            job();
        } else {
            let failed = s.slot.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("asiffs-scan".into())
                .spawn(job)
            {
                *failed.state.lock() = State::Refused(format!("starting the index scan: {e}"));
            }
        }
        s
    }

    /// Waits for the scan, hands its free chunks to the allocator the first
    /// time, and fails if writes are refused.
    pub fn wait(&self, alloc: &Allocator) -> Result<()> {
        let mut st = self.slot.state.lock();
        while matches!(*st, State::Running) {
            self.slot.done.wait(&mut st);
        }
        match &*st {
            State::Off | State::Applied { .. } => Ok(()),
            State::Running => unreachable!("waited above"),
            State::Refused(reason) => Err(Error::WritesRefused {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            State::Ready(_) => {
                let State::Ready(found) = std::mem::replace(&mut *st, State::Off) else {
                    unreachable!()
                };
                alloc.add_scanned(&found.free);
                *st = State::Applied {
                    punched: found.punched,
                };
                Ok(())
            }
        }
    }

    /// Why writes are refused, if the scan has finished and refused them.
    pub fn refusal(&self) -> Option<String> {
        match &*self.slot.state.lock() {
            State::Refused(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Leaked chunks the scan punched (after [`OpenScan::wait`]).
    pub fn punched(&self) -> u64 {
        match &*self.slot.state.lock() {
            State::Applied { punched } => *punched,
            _ => 0,
        }
    }
}

/// Why an index with these findings must not be written.
fn refusal(u: &Usage) -> Option<String> {
    if let Some((c, who)) = u.shared.first() {
        return Some(format!(
            "{who} uses {c}, which another entry uses too ({} shared); run asiffs check",
            u.shared_count
        ));
    }
    if let Some((c, who)) = u.past_end.first() {
        return Some(format!(
            "{who} points at {c}, past the end of the file; run asiffs check"
        ));
    }
    u.out_of_rule
        .map(|who| format!("{who} is out of rule; run asiffs check"))
}

fn run(storage: &dyn Storage, geo: &Geometry, tables: &[u64], end: u64) -> Result<Found, String> {
    let u =
        usage::scan(storage, geo, tables, end).map_err(|e| format!("reading the index: {e}"))?;
    if let Some(r) = refusal(&u) {
        return Err(r);
    }
    // Unused chunks that hold bytes (a crash between a chunk's data and
    // its entry) are punched before reuse: a new chunk must read zeros.
    let cs = geo.chunk_size;
    let mut punched = 0;
    for (a, b) in u.free.iter() {
        usage::chunks_holding_data(storage, cs, a, b, |c| {
            punched += 1;
            storage.punch(c * cs, cs)
        })
        .map_err(|e| format!("freeing leaked chunks: {e}"))?;
    }
    if punched > 0 {
        storage
            .sync()
            .map_err(|e| format!("freeing leaked chunks: {e}"))?;
    }
    Ok(Found {
        free: u.free,
        punched,
    })
}

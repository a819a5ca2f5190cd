//! A crossbeam-channel worker pool: one fuser thread reads requests, the
//! workers do the I/O and reply. Kept as the `--dispatch pool` alternative.

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::{Mutex, RwLock};

pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Pool {
    tx: RwLock<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    pub fn new(workers: usize) -> std::io::Result<Pool> {
        // Bounded: a full queue stalls the reader, which is the back-pressure we want.
        let (tx, rx) = bounded::<Job>(workers * 8);
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let rx: Receiver<Job> = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("asiffs-io-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })?,
            );
        }
        Ok(Pool {
            tx: RwLock::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    pub fn submit(&self, job: Job) {
        let job = match &*self.tx.read() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => job,
        };
        job();
    }

    /// Lets queued jobs finish, then joins the workers.
    pub fn shutdown(&self) {
        self.tx.write().take();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

//! asiffs: read, write and mount Apple Sparse Image Format (ASIF) disk images.
//!
//! Layers, with data flowing one way:
//! - [`format`]: pure encode/decode of the on-disk structures (no I/O);
//! - [`engine`]: the sparse block translator ([`Image`]);
//! - [`disk`]: the [`Disk`](disk::Disk) trait every format implements;
//! - [`udif`]: Apple UDIF (`.dmg`) images behind the same trait;
//! - [`fs`]: a thin FUSE adapter over the engine;
//! - [`nbd`]: an NBD server over the [`Disk`](disk::Disk) trait;
//! - [`cli`]: the `asiffs` command line.

#![deny(clippy::undocumented_unsafe_blocks)]

mod atomic_file;
pub mod cli;
pub mod crypt;
pub mod disk;
pub mod engine;
pub mod error;
pub mod format;
pub mod fs;
pub mod nbd;
pub mod password;
pub mod raw;
pub mod registry;
pub mod stats;
pub mod udif;
pub mod udsb;
pub mod udsp;

pub use engine::{CacheMode, CreateOptions, Extent, Image, LockMode, OpenOptions, Stats};
pub use error::{Error, Result};

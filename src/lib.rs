//! asiffs: read, write and mount Apple Sparse Image Format (ASIF) disk images.
//!
//! Layers, with data flowing one way:
//! - [`format`]: pure encode/decode of the on-disk structures (no I/O);
//! - [`engine`]: the sparse block translator ([`Image`]);
//! - [`disk`]: the [`Disk`](disk::Disk) trait every format implements;
//! - [`fs`]: a thin FUSE adapter over the engine;
//! - [`cli`]: the `asiffs` command line.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod disk;
pub mod engine;
pub mod error;
pub mod format;
pub mod fs;
pub mod udsp;

pub use engine::{CacheMode, CreateOptions, Extent, Image, LockMode, OpenOptions, Stats};
pub use error::{Error, Result};

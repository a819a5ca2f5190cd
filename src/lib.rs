//! asiffs: Apple disk images (ASIF, UDIF, UDSP, sparse bundles) on Linux.
//!
//! Layers, with data flowing one way:
//! - [`host`]: where a container's bytes live: a file ([`host::file`]), a
//!   bundle directory, and the decrypting layer over either
//!   ([`host::crypt`]);
//! - one folder per format, each with its pure codecs (no I/O) and its
//!   translator: [`asif`] (`format` and `engine`), [`udif`], [`udsp`],
//!   [`udsb`], [`raw`];
//! - [`disk`]: the [`Disk`](disk::Disk) trait every format implements, and
//!   [`registry`], which probes a container and opens it as one;
//! - the transports, which translate requests and know no format: [`fs`]
//!   (FUSE) and [`nbd`];
//! - [`cli`]: the `asiffs` command line.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod asif;
mod atomic_file;
pub mod cli;
pub mod disk;
pub mod error;
pub mod fs;
pub mod host;
pub mod nbd;
pub mod password;
pub mod raw;
pub mod registry;
pub mod stats;
pub mod udif;
pub mod udsb;
pub mod udsp;

pub use asif::engine::{CacheMode, CreateOptions, Extent, Image, LockMode, OpenOptions, Stats};
pub use error::{Error, Result};

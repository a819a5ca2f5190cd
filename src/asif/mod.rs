//! ASIF (Apple Sparse Image Format, macOS 26): [`format`] holds the pure
//! codecs of its on-disk structures, [`engine`] the sparse block
//! translator over a [`Storage`](crate::host::file::Storage).

pub mod engine;
pub mod format;

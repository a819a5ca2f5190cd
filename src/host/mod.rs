//! Where a container's bytes live, behind the traits the formats read and
//! write through: a regular file ([`file`], the [`Storage`](file::Storage)
//! trait), and the decrypting layer ([`crypt`]) that presents the
//! plaintext of an encrypted file as another `Storage`. A sparse bundle's
//! directory is reached through `udsb::store`.

pub mod crypt;
pub mod file;
pub mod uring;

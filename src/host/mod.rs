//! Where a container's bytes live, behind the traits the formats read and
//! write through: a regular file ([`file`], the [`Storage`](file::Storage)
//! trait), a sparse bundle's directory ([`dir`], `BundleDir` and
//! `BandFile`), and the decrypting layer ([`crypt`]) that presents the
//! plaintext of an encrypted file as another `Storage` (a bundle's bands
//! are decrypted by `udsb::crypt` with the same keys), and the io_uring
//! ring that runs translated requests on files ([`uring`]).

pub mod crypt;
pub mod dir;
pub mod file;
pub mod uring;

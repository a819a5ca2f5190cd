//! TLS for `asiffs serve` (rustls with the ring provider): the server
//! configuration from PEM files, and the stream a session switches to
//! after `NBD_OPT_STARTTLS`.
//!
//! With `--tls-ca`, every client must present a certificate that chains
//! to that CA; without it, any client that completes the handshake is
//! served (the certificate proves the server, not the client).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Invalid(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The server side of TLS: `cert` (chain, PEM), `key` (PEM, PKCS#8, PKCS#1
/// or SEC1), and with `ca` client certificates required.
pub fn server_config(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<Arc<ServerConfig>> {
    let chain = load_certs(cert, "--tls-cert")?;
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".into(),
            e => e.to_string(),
        };
        Error::Invalid(format!("--tls-key {}: {why}", key.display()))
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
    let builder = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca, "--tls-ca")? {
                roots
                    .add(c)
                    .map_err(|e| Error::Invalid(format!("--tls-ca {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| Error::Invalid(format!("--tls-ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => Error::Invalid(format!(
            "--tls-key {} is not the key of --tls-cert {}",
            key_path.display(),
            cert.display()
        )),
        e => Error::Invalid(format!("--tls-cert/--tls-key: {e}")),
    })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nbd-tls")
            .join(name)
    }

    #[test]
    fn pem_files() {
        let (cert, key, ca) = (
            data("server-cert.pem"),
            data("server-key.pem"),
            data("ca-cert.pem"),
        );
        assert!(server_config(&cert, &key, None).is_ok());
        assert!(server_config(&cert, &key, Some(&ca)).is_ok());
        let err = |c: &Path, k: &Path| server_config(c, k, None).unwrap_err().to_string();
        assert_eq!(
            err(&key, &key),
            format!("--tls-cert {}: no PEM certificate in it", key.display())
        );
        assert_eq!(
            err(&cert, &cert),
            format!("--tls-key {}: no PEM private key in it", cert.display())
        );
        assert_eq!(
            err(&ca, &key),
            format!(
                "--tls-key {} is not the key of --tls-cert {}",
                key.display(),
                ca.display()
            )
        );
    }
}

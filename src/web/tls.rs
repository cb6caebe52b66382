//! The master's HTTPS: `[master] tls_cert` and `tls_key`, read once at start into a rustls
//! server configuration on the aws-lc-rs provider (the one the rest of Paddock uses).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{Error, InconsistentKeys, ServerConfig};

use crate::config::TlsFiles;

/// Why the master cannot serve HTTPS with the configured files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds no usable PEM block.
    #[error("[master] `{key}` {path}: {why}")]
    File { key: &'static str, path: String, why: String },
    /// The files are readable but do not make a server identity (the key is not the
    /// certificate's, or the certificate is unusable).
    #[error("[master] `tls_cert` {cert} and `tls_key` {key}: {why}")]
    Pair { cert: String, key: String, why: String },
}

/// Reads the certificate chain and key of `files` and checks that they belong together.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let pair_error = |why: String| TlsError::Pair {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        why,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_error(e.to_string()))?
        .with_no_client_auth()
        // Checks that the key is the certificate's (rustls compares their public keys).
        .with_single_cert(certs, key)
        .map_err(|e| {
            pair_error(match e {
                Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                    "the private key is not the certificate's (their public keys differ)".into()
                }
                other => format!("they do not make a server identity: {other}"),
            })
        })?;
    // The listener speaks HTTP/1.1 only (WebSocket upgrades need it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks the configured TLS files as `paddock run` would read them (for `check-config`).
pub fn check(config: &crate::config::Config) -> Result<(), TlsError> {
    match &config.master.tls {
        Some(files) => server_config(files).map(|_| ()),
        None => Ok(()),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |why: String| TlsError::File { key: "tls_cert", path: path.display().to_string(), why };
    let pem = std::fs::read(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(error("no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks)".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let error = |why: String| TlsError::File { key: "tls_key", path: path.display().to_string(), why };
    let pem = std::fs::read(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| error(format!("no private key in it (expected a PEM `-----BEGIN PRIVATE KEY-----` block): {e}")))
}

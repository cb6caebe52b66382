//! TLS for the connections Paddock opens (the CLI to its master, the webhook, GitHub, IRC and
//! email notifiers): rustls on the aws-lc-rs provider, trusting the system's CA store (which
//! honours `SSL_CERT_FILE` and `SSL_CERT_DIR`) or, where a `ca_file` is configured, only the
//! certificates in that file. Host names are always checked.
//!
//! reqwest is built without a crypto provider of its own, so every HTTP client must come from
//! here: `reqwest::Client::new()` would panic for want of one. One provider in the process also
//! keeps the agent's WebSocket client (which takes the process default) working.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// Why a TLS client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot set up TLS: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

/// Reads a PEM file of CA certificates: at least one, and every one usable as a trust anchor
/// (checked here, so a bad file stops the master at start rather than failing each send).
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks)".into());
    }
    let (_, unusable) = rustls::RootCertStore::empty().add_parsable_certificates(certs.iter().cloned());
    if unusable > 0 {
        return Err(format!("{unusable} of its {} certificates cannot be used as a CA", certs.len()));
    }
    Ok(certs)
}

/// The CAs a client trusts: exactly `ca` when given (a `ca_file`, read by [`read_ca_file`]),
/// else the system's store.
pub fn root_store(ca: Option<&[CertificateDer<'static>]>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            roots.add_parsable_certificates(certs.iter().cloned());
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            // An empty store refuses every server; say why once, where the operator looks.
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                tracing::warn!(
                    errors = %why.join("; "),
                    "no CA certificates in the system's store: every TLS server will be refused \
                     (install ca-certificates, or point SSL_CERT_FILE at a PEM bundle)"
                );
            }
        }
    }
    roots
}

/// A rustls client configuration on the aws-lc-rs provider trusting [`root_store`]`(ca)`.
pub fn client_config(ca: Option<&[CertificateDer<'static>]>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca))
        .with_no_client_auth())
}

/// A reqwest client builder whose https:// connections use [`client_config`]`(ca)`; callers
/// add their timeouts and build it.
pub fn http_builder(ca: Option<&[CertificateDer<'static>]>) -> Result<reqwest::ClientBuilder, TlsError> {
    Ok(reqwest::Client::builder().use_preconfigured_tls(client_config(ca)?))
}

/// A reqwest client with default settings trusting `ca` (or the system's CAs).
pub fn http_client(ca: Option<&[CertificateDer<'static>]>) -> Result<reqwest::Client, TlsError> {
    http_builder(ca)?.build().map_err(|e| TlsError::Client(error_chain(&e)))
}

/// `e` and its causes, `: `-separated. reqwest's own message stops at "error sending
/// request"; the reason (a refused certificate: "invalid peer certificate: UnknownIssuer")
/// is further down the chain. A cause already spelled out by the one above is not repeated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct E(&'static str, #[source] Option<Box<E>>);

    #[test]
    fn the_chain_names_each_cause_once() {
        let inner = E("invalid peer certificate: UnknownIssuer", None);
        let repeats = E("client error (Connect): invalid peer certificate: UnknownIssuer", Some(Box::new(inner)));
        let outer = E("error sending request", Some(Box::new(repeats)));
        assert_eq!(
            error_chain(&outer),
            "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(error_chain(&E("alone", None)), "alone");
    }

    #[test]
    fn a_ca_file_must_hold_usable_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = read_ca_file(&dir.path().join("nope.pem")).expect_err("missing");
        assert!(missing.starts_with("cannot read it"), "{missing}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "hello\n").expect("write");
        assert!(read_ca_file(&empty).expect_err("empty").starts_with("no certificate in it"));
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        assert_eq!(read_ca_file(&garbled).expect_err("garbled"), "1 of its 1 certificates cannot be used as a CA");
    }

    #[test]
    fn clients_build_without_a_process_default_provider() {
        // Only the aws-lc-rs provider is compiled in and none is installed as the default:
        // the clients name theirs.
        assert!(http_client(None).is_ok());
        assert!(http_client(Some(&[])).is_ok());
    }
}

//! A throwaway certificate authority for TLS tests, made with the openssl CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A test CA (`ca.pem`) and a server certificate it signed for `localhost` and 127.0.0.1
/// (`cert.pem`, `key.pem`). Certificate checks refuse a CA certificate used as a server's,
/// hence the two levels.
pub struct TestCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI must be installed to run this test (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    /// Makes the files in `dir`.
    pub fn make(dir: &Path) -> TestCa {
        TestCa::make_named(dir, "Paddock test CA")
    }

    /// Like [`TestCa::make`], for a CA called `name`: another CA must have another name, or a
    /// client takes it for an impostor of the first (a bad signature, not an unknown issuer).
    pub fn make_named(dir: &Path, name: &str) -> TestCa {
        let subject = format!("/CN={name}");
        #[rustfmt::skip]
        openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &subject,
            "-keyout", "ca-key.pem", "-out", "ca.pem"]);
        let mut ca = TestCa { ca: dir.join("ca.pem"), cert: PathBuf::new(), key: PathBuf::new(), dir: dir.into() };
        (ca.cert, ca.key) = ca.issue("server", "DNS:localhost,IP:127.0.0.1");
        ca
    }

    /// Another server certificate and key (`{name}-cert.pem`, `{name}-key.pem`) for the
    /// subject alternative names `san` (openssl syntax: `DNS:a.test,IP:127.0.0.1`).
    pub fn issue(&self, name: &str, san: &str) -> (PathBuf, PathBuf) {
        let (cert, key, req, ext) =
            (format!("{name}-cert.pem"), format!("{name}-key.pem"), format!("{name}-req.pem"), format!("{name}.cnf"));
        #[rustfmt::skip]
        openssl(&self.dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=paddock test server",
            "-keyout", &key, "-out", &req]);
        std::fs::write(self.dir.join(&ext), format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n")).expect("ext");
        #[rustfmt::skip]
        openssl(&self.dir, &["x509", "-req", "-in", &req, "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-days", "1", "-extfile", &ext, "-out", &cert]);
        (self.dir.join(cert), self.dir.join(key))
    }
}

/// One request an [`HttpsRecorder`] got.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

impl Recorded {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }

    /// A header's value, if it was sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// An HTTPS server on 127.0.0.1 presenting `cert`/`key` that records every request it gets
/// and answers each `200 {"builds": []}` (enough for a webhook, GitHub's statuses API and the
/// CLI's `builds`). A client that refuses the certificate leaves no record.
pub struct HttpsRecorder {
    pub port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    _rt: tokio::runtime::Runtime,
}

/// TLS on a TCP listener for `axum::serve`: a failed handshake (a refused certificate) is
/// dropped and the next connection taken.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), self.acceptor.accept(tcp));
            if let Ok(Ok(tls)) = handshake.await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl HttpsRecorder {
    /// Starts the server on a free port.
    pub fn start(cert: &Path, key: &Path) -> HttpsRecorder {
        use rustls_pki_types::pem::PemObject;
        use std::sync::{Arc, Mutex};
        use tokio_rustls::rustls;
        let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::CertificateDer::pem_file_iter(cert)
                .expect("cert file")
                .collect::<Result<_, _>>()
                .expect("certs");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server config");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let tcp = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        let listener = TlsListener { tcp, acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) };
        let got: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let g = got.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method, uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let g = g.clone();
                async move {
                    let headers = headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                        .collect();
                    g.lock().expect("lock").push(Recorded {
                        method: method.to_string(),
                        path: uri.path().to_string(),
                        headers,
                        body,
                    });
                    axum::Json(serde_json::json!({"builds": []}))
                }
            },
        );
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HttpsRecorder { port, got, _rt: rt }
    }

    /// Every request so far, in the order they came.
    pub fn requests(&self) -> Vec<Recorded> {
        self.got.lock().expect("lock").clone()
    }
}

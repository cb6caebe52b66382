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
        #[rustfmt::skip]
        openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Paddock test CA",
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

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
}

impl TestCa {
    /// Makes the files in `dir`.
    pub fn make(dir: &Path) -> TestCa {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("the openssl CLI must be installed to run this test (apt-get install openssl)");
            assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        };
        #[rustfmt::skip]
        openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Paddock test CA",
            "-keyout", "ca-key.pem", "-out", "ca.pem"]);
        #[rustfmt::skip]
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "key.pem",
            "-out", "req.pem"]);
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
            .expect("ext");
        #[rustfmt::skip]
        openssl(&["x509", "-req", "-in", "req.pem", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-days", "1", "-extfile", "ext.cnf", "-out", "cert.pem"]);
        TestCa { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }
    }
}

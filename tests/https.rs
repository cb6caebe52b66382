//! The master serving HTTPS itself (`[master] tls_cert`/`tls_key`), with a private CA made by
//! the openssl CLI: agents of a local pool connect over wss and build; plain HTTP, clients that
//! trust another CA and silent connections get nothing; a key that is not the certificate's
//! stops both `check-config` and `run`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::TestCa;
use common::tls_client::{body, https_get};
use common::{paddock_bin, Bed, DEADLINE};

const ONE_BUILDER: &str = "[pool.local]\nmax_instances = 1\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
    [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"echo built over tls\"]\n\n\
    [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n";

fn tls_lines(cert: &Path, key: &Path) -> String {
    format!("tls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display())
}

/// Reads until the master closes the connection; what came before the close.
fn read_until_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the master did not close the connection within {DEADLINE:?}")
            }
            Err(_) => return got,
        }
    }
}

#[test]
fn an_https_master_builds_with_agents_over_wss_and_serves_nothing_but_tls() {
    let mut bed = Bed::new(&[]);
    let pki = bed.path().join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let ca = TestCa::make(&pki);
    bed.serve_https(&ca.ca);
    bed.config_with_master(&tls_lines(&ca.cert, &ca.key), "", ONE_BUILDER);
    let ca_file = ca.ca.display().to_string();
    // Local machines inherit SSL_CERT_FILE: their agents trust the private CA.
    bed.start_with_env(&["main"], &[("SSL_CERT_FILE", &ca_file), ("PADDOCK_TLS_HANDSHAKE_TIMEOUT_MS", "1000")]);

    let rev = bed.commit("main", "a.txt", "x\n", "a change");
    let build = bed.wait("the build over wss", || {
        let resp = https_get(bed.port, &ca.ca, "/api/builds", Some(bed.token())).ok()?;
        let builds: serde_json::Value = serde_json::from_str(&body(&resp)).ok()?;
        builds["builds"]
            .as_array()?
            .iter()
            .find(|b| b["revision"] == rev.as_str() && b["finished_at"].is_string())
            .cloned()
    });
    assert_eq!(build["state"], "success", "{build}");
    let log = https_get(bed.port, &ca.ca, &format!("/api/builds/{}/log", build["id"]), Some(bed.token())).expect("log");
    assert!(body(&log).contains("built over tls"), "{log}");

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let mut plain = TcpStream::connect(("127.0.0.1", bed.port)).expect("connect");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: paddock\r\n\r\n").expect("write");
    let answer = read_until_closed(&mut plain, "plain HTTP on the TLS port");
    assert!(!answer.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&answer));

    // A client that trusts another CA refuses the master's certificate.
    let other_dir = bed.path().join("other-pki");
    std::fs::create_dir_all(&other_dir).expect("mkdir");
    let other = TestCa::make(&other_dir);
    let refused = https_get(bed.port, &other.ca, "/healthz", None).expect_err("a certificate of an unknown CA");
    assert!(refused.contains("certificate") || refused.contains("UnknownIssuer"), "{refused}");

    // A connection that never starts its handshake is closed after the handshake timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", bed.port)).expect("connect");
    assert!(read_until_closed(&mut silent, "a silent TLS connection").is_empty());

    // And the master still serves HTTPS.
    let health = https_get(bed.port, &ca.ca, "/healthz", None).expect("healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// Runs `paddock ARGS` in `dir`; its exit status and stderr, killing it past [`DEADLINE`].
fn paddock(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(paddock_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run paddock");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("paddock {args:?} did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
    (status.success(), stderr)
}

#[test]
fn a_key_that_is_not_the_certificates_or_a_missing_file_stops_check_config_and_run() {
    let bed = Bed::new(&[]);
    let pki = bed.path().join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let ca = TestCa::make(&pki);
    let (_, other_key) = ca.issue("other", "DNS:localhost");
    let config = bed.path().join("paddock.toml");
    let url = format!("https://127.0.0.1:{}", bed.port);
    let write = |cert: &Path, key: &Path| {
        std::fs::write(&config, format!("[master]\nurl = \"{url}\"\n{}\n", tls_lines(cert, key))).expect("config");
    };

    write(&ca.cert, &ca.key);
    let (ok, stderr) = paddock(bed.path(), &["check-config", "paddock.toml"]);
    assert!(ok, "the matching pair passes: {stderr}");

    write(&ca.cert, &other_key);
    for args in [&["check-config", "paddock.toml"][..], &["run", "paddock.toml"][..]] {
        let (ok, stderr) = paddock(bed.path(), args);
        assert!(!ok, "paddock {args:?} accepted a key that is not the certificate's");
        assert!(
            stderr.contains("`tls_cert`") && stderr.contains("the private key is not the certificate's"),
            "{stderr}"
        );
    }

    write(&ca.cert, &pki.join("missing-key.pem"));
    for args in [&["check-config", "paddock.toml"][..], &["run", "paddock.toml"][..]] {
        let (ok, stderr) = paddock(bed.path(), args);
        assert!(!ok, "paddock {args:?} accepted a missing key file");
        assert!(stderr.contains("`tls_key`") && stderr.contains("missing-key.pem: cannot read it"), "{stderr}");
    }
}

//! The master serving HTTPS itself (`[master] tls_cert`/`tls_key`), with a private CA made by
//! the openssl CLI: agents of a local pool connect over wss and build; the CLI reads it with
//! the CA in `SSL_CERT_FILE`; plain HTTP, clients that trust another CA and silent connections
//! get nothing; a key that is not the certificate's stops both `check-config` and `run`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::tls::TestCa;
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

/// A bed whose master serves HTTPS with a certificate of a fresh test CA, its local agents
/// trusting that CA, and one finished build of builder `b` (which echoes "built over tls").
fn an_https_master_with_a_build() -> (Bed, TestCa, Value) {
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
        bed.builds().into_iter().find(|b| b["revision"] == rev.as_str() && b["finished_at"].is_string())
    });
    (bed, ca, build)
}

/// Another CA, by another name (a same-named one would be taken for an impostor of the first:
/// a bad signature rather than an unknown issuer).
fn another_ca(bed: &Bed) -> TestCa {
    let dir = bed.path().join("other-pki");
    std::fs::create_dir_all(&dir).expect("mkdir");
    TestCa::make_named(&dir, "Another test CA")
}

#[test]
fn an_https_master_builds_with_agents_over_wss_and_serves_nothing_but_tls() {
    let (bed, _, build) = an_https_master_with_a_build();
    assert!(bed.url().starts_with("https://"), "{}", bed.url());
    assert_eq!(build["state"], "success", "{build}");
    let log = bed
        .http
        .get(format!("{}/api/builds/{}/log", bed.url(), build["id"]))
        .send()
        .expect("log")
        .error_for_status()
        .expect("log")
        .text()
        .expect("log");
    assert!(log.contains("built over tls"), "{log}");

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let mut plain = TcpStream::connect(("127.0.0.1", bed.port)).expect("connect");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: paddock\r\n\r\n").expect("write");
    let answer = read_until_closed(&mut plain, "plain HTTP on the TLS port");
    assert!(!answer.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&answer));

    // A client that trusts another CA refuses the master's certificate.
    let other = another_ca(&bed);
    let refused = Bed::client_trusting(None, Some(&other.ca))
        .get(format!("{}/healthz", bed.url()))
        .send()
        .expect_err("a certificate of an unknown CA");
    let refused = paddock::tls::error_chain(&refused);
    assert!(refused.contains("invalid peer certificate") && refused.contains("UnknownIssuer"), "{refused}");

    // A connection that never starts its handshake is closed after the handshake timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", bed.port)).expect("connect");
    assert!(read_until_closed(&mut silent, "a silent TLS connection").is_empty());

    // And the master still serves HTTPS.
    let health = bed.http.get(format!("{}/healthz", bed.url())).send().expect("healthz");
    assert!(health.status().is_success(), "{}", health.status());
}

#[test]
fn the_cli_reads_an_https_master_whose_ca_is_in_ssl_cert_file_and_refuses_another() {
    let (bed, ca, build) = an_https_master_with_a_build();
    assert_eq!(build["state"], "success", "{build}");
    let url = bed.url();
    let id = build["id"].to_string();
    let cli = |args: &[&str], ca: &Path| {
        let ca = ca.display().to_string();
        paddock_with(bed.path(), args, &[("PADDOCK_TOKEN", bed.token()), ("SSL_CERT_FILE", &ca)])
    };

    let (ok, out, err) = cli(&["builds", "--master", &url], &ca.ca);
    assert!(ok, "paddock builds: {err}");
    let revision: String = build["revision"].as_str().expect("revision").chars().take(10).collect();
    let listed = out.lines().any(|line| {
        let cells: Vec<&str> = line.split_whitespace().collect();
        cells.get(..5) == Some(&[id.as_str(), "b", "main", revision.as_str(), "success"][..])
    });
    assert!(listed, "build {id} of b, a success, is not in:\n{out}");

    let (ok, out, err) = cli(&["log", &id, "--master", &url], &ca.ca);
    assert!(ok, "paddock log: {err}");
    assert!(out.contains("built over tls"), "{out}");

    let other = another_ca(&bed);
    let (ok, out, err) = cli(&["builds", "--master", &url], &other.ca);
    assert!(!ok, "paddock builds trusted a master whose CA it does not know: {out}");
    assert!(err.contains(&format!("cannot reach the master at {url}")), "{err}");
    assert!(err.contains("invalid peer certificate") && err.contains("UnknownIssuer"), "{err}");
}

/// Runs `paddock ARGS` in `dir` with `env` added (and no `SSL_CERT_DIR`, `PADDOCK_MASTER` or
/// `PADDOCK_TOKEN` of the test's own); whether it succeeded, its stdout and its stderr,
/// killing it past [`DEADLINE`].
fn paddock_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(paddock_bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("SSL_CERT_DIR")
        .env_remove("PADDOCK_MASTER")
        .env_remove("PADDOCK_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run paddock");
    // Both pipes are read while it runs: a full pipe would stall it.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                p.read_to_string(&mut text).expect("read output");
            }
            text
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
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
    (status.success(), stdout.join().expect("stdout"), stderr.join().expect("stderr"))
}

/// Runs `paddock ARGS` in `dir`; its exit status and stderr.
fn paddock(dir: &Path, args: &[&str]) -> (bool, String) {
    let (ok, _, stderr) = paddock_with(dir, args, &[]);
    (ok, stderr)
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

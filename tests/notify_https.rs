//! Outbound HTTPS through the real binary against local HTTPS recorders with certificates from
//! a private CA made by the openssl CLI: webhook and GitHub notifiers deliver to a server whose
//! CA is their `ca_file` or, without one, in the system's store (`SSL_CERT_FILE`); a server
//! from another CA or with a certificate for another name gets nothing, and the delivery says
//! why. The CLI trusts the system's store the same way. A `ca_file` that cannot be used stops
//! the master at start.

mod common;

use common::tls::{HttpsRecorder, TestCa};
use common::Bed;
use serde_json::Value;

const SECRET: &str = "https-webhook-secret";

/// A CA called `name` in `dir` (made), with its server certificate for localhost and 127.0.0.1.
fn ca_in(dir: &std::path::Path, name: &str) -> TestCa {
    std::fs::create_dir_all(dir).expect("CA folder");
    TestCa::make_named(dir, name)
}

/// The bed's deliveries by notifier, once `ready` holds for all of them.
fn deliveries_when(bed: &Bed, what: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    bed.wait(what, || {
        let all = bed.get("/api/deliveries")["deliveries"].as_array().cloned().unwrap_or_default();
        ready(&all).then_some(all)
    })
}

fn of<'a>(deliveries: &'a [Value], notifier: &str) -> Option<&'a Value> {
    deliveries.iter().find(|d| d["notifier"] == notifier)
}

#[test]
fn webhook_and_github_statuses_go_over_https_to_a_server_of_the_ca_file() {
    let mut bed = Bed::new(&[]);
    let ca = ca_in(&bed.path().join("pki"), "Paddock test CA");
    let server = HttpsRecorder::start(&ca.cert, &ca.key);
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    // `ca_file` is relative to the config file; the API by name, the webhook by address.
    bed.config(
        "",
        &format!(
            "{preamble}\
             [[notifier]]\nkind = \"webhook\"\nname = \"hook\"\nurl = \"https://127.0.0.1:{port}/hook\"\n\
             secret_env = \"HOOK_SECRET\"\nca_file = \"pki/ca.pem\"\n\n\
             [[notifier]]\nkind = \"github\"\napi_url = \"https://localhost:{port}/api/v3\"\ntoken_env = \"GH_TOKEN\"\n\
             repository = \"acme/app\"\nca_file = \"pki/ca.pem\"\n",
            port = server.port
        ),
    );
    bed.start_with_env(&["main"], &[("HOOK_SECRET", SECRET), ("GH_TOKEN", "ghp_https_token")]);
    let ok = bed.build_file("fine\n", "first");
    let rev = ok["revision"].as_str().expect("revision").to_string();
    let got = bed.wait("the webhook and both statuses", || {
        Some(server.requests()).filter(|r| r.len() >= 3 && r.iter().any(|r| r.path == "/hook"))
    });

    let hook: Vec<_> = got.iter().filter(|r| r.path == "/hook").collect();
    assert_eq!(hook.len(), 1, "{got:?}");
    let signature = paddock::notify::webhook::signature(SECRET.as_bytes(), hook[0].body.as_bytes());
    assert_eq!(hook[0].header("x-paddock-signature-256"), Some(signature.as_str()), "signed");
    assert_eq!(hook[0].header("x-paddock-event"), Some("finished"));
    assert_eq!(hook[0].json()["build"]["id"], ok["id"]);

    let statuses: Vec<_> = got.iter().filter(|r| r.path.starts_with("/api/v3/")).collect();
    let states: Vec<String> = statuses.iter().map(|r| r.json()["state"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(states, ["pending", "success"]);
    for s in &statuses {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, format!("/api/v3/repos/acme/app/statuses/{rev}"));
        assert_eq!(s.header("authorization"), Some("Bearer ghp_https_token"));
    }
    assert!(!bed.log().contains(SECRET) && !bed.log().contains("ghp_https_token"), "no secret is logged");
}

#[test]
fn a_certificate_that_is_not_trusted_gets_nothing_and_the_delivery_says_why() {
    let mut bed = Bed::new(&[]);
    let ca = ca_in(&bed.path().join("pki"), "Paddock test CA");
    let other_ca = ca_in(&bed.path().join("other-pki"), "Another test CA");
    let trusted = HttpsRecorder::start(&ca.cert, &ca.key);
    let stranger = HttpsRecorder::start(&other_ca.cert, &other_ca.key);
    let (cert, key) = ca.issue("elsewhere", "DNS:elsewhere.test");
    let misnamed = HttpsRecorder::start(&cert, &key);
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    let hook = |name: &str, port: u16, ca_file: &str| {
        let ca_file = if ca_file.is_empty() { String::new() } else { format!("ca_file = \"{ca_file}\"\n") };
        format!("[[notifier]]\nkind = \"webhook\"\nname = \"{name}\"\nurl = \"https://127.0.0.1:{port}/{name}\"\n{ca_file}\n")
    };
    bed.config(
        "",
        &format!(
            "{preamble}{}{}{}{}",
            // No `ca_file`: the system's store, which SSL_CERT_FILE points at the CA.
            hook("system", trusted.port, ""),
            hook("stranger", stranger.port, "pki/ca.pem"),
            hook("misnamed", misnamed.port, "pki/ca.pem"),
            // A `ca_file` replaces the system's store: the CA SSL_CERT_FILE trusts is not enough.
            hook("pinned", trusted.port, "other-pki/ca.pem"),
        ),
    );
    let ca_path = ca.ca.display().to_string();
    bed.start_with_env(&["main"], &[("SSL_CERT_FILE", &ca_path), ("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    bed.build_file("fine\n", "first");

    let refused = ["stranger", "misnamed", "pinned"];
    let all = deliveries_when(&bed, "the trusted delivery sent and the others tried", |all| {
        of(all, "system").is_some_and(|d| d["state"] == "sent")
            && refused.iter().all(|n| {
                of(all, n).is_some_and(|d| d["attempts"].as_i64().unwrap_or(0) >= 1 && d["last_error"].is_string())
            })
    });
    let why = |n: &str| of(&all, n).and_then(|d| d["last_error"].as_str()).unwrap_or("").to_string();
    for n in ["stranger", "pinned"] {
        let e = why(n);
        assert!(e.contains("invalid peer certificate") && e.contains("UnknownIssuer"), "{n}: {e}");
        assert!(e.starts_with("cannot reach the receiver"), "{n}: {e}");
    }
    let e = why("misnamed");
    assert!(e.contains("invalid peer certificate") && e.contains("not valid for name \"127.0.0.1\""), "{e}");
    assert!(e.contains("elsewhere.test"), "the name it is valid for: {e}");

    assert!(stranger.requests().is_empty() && misnamed.requests().is_empty(), "nothing reached them");
    let paths: Vec<String> = trusted.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/system"], "the pinned notifier never got through");
    let log = bed.log();
    assert!(log.contains("notification failed") && log.contains("UnknownIssuer"), "the master log says why");
}

/// `paddock builds --master https://…` with the CA in `SSL_CERT_FILE`.
fn cli_builds(port: u16, ca: &std::path::Path) -> std::process::Output {
    std::process::Command::new(common::paddock_bin())
        .args(["builds", "--master", &format!("https://localhost:{port}"), "--token", "tok-cli"])
        .env("SSL_CERT_FILE", ca)
        .env_remove("SSL_CERT_DIR")
        .env_remove("PADDOCK_MASTER")
        .env_remove("PADDOCK_TOKEN")
        .output()
        .expect("paddock builds")
}

#[test]
fn the_cli_talks_to_an_https_master_of_a_ca_in_the_system_store_and_refuses_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_in(&dir.path().join("pki"), "Paddock test CA");
    let other_ca = ca_in(&dir.path().join("other-pki"), "Another test CA");
    let server = HttpsRecorder::start(&ca.cert, &ca.key);

    let out = cli_builds(server.port, &ca.ca);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(no builds)"), "{}", String::from_utf8_lossy(&out.stdout));
    // The builds, then the pools (for why queued builds wait).
    let got = server.requests();
    let asked: Vec<(&str, &str)> = got.iter().map(|r| (r.method.as_str(), r.path.as_str())).collect();
    assert_eq!(asked, [("GET", "/api/builds"), ("GET", "/api/pools")]);
    assert!(got.iter().all(|r| r.header("authorization") == Some("Bearer tok-cli")), "{got:?}");

    let out = cli_builds(server.port, &other_ca.ca);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot reach the master at https://localhost:{}", server.port)), "{err}");
    assert!(err.contains("invalid peer certificate") && err.contains("UnknownIssuer"), "{err}");
    assert_eq!(server.requests().len(), 2, "the refused one sent nothing");
}

#[test]
fn a_bad_ca_file_on_a_webhook_or_github_notifier_stops_the_master_at_start() {
    let bed = Bed::new(&[]);
    std::fs::write(bed.path().join("not-a-ca.pem"), "hello\n").expect("write");
    let notifiers = [
        ("hook", "kind = \"webhook\"\nurl = \"https://hooks.internal/p\"\n"),
        ("statuses", "kind = \"github\"\ntoken_env = \"GH_TOKEN\"\nrepository = \"acme/app\"\n"),
    ];
    for (name, kind) in notifiers {
        for (file, why) in [("missing.pem", "cannot read it"), ("not-a-ca.pem", "no certificate in it")] {
            bed.config(
                "",
                &format!(
                    "{}[[notifier]]\nname = \"{name}\"\n{kind}ca_file = \"{file}\"\n",
                    common::ONE_BUILDER_FAILING_ON_BROKEN
                ),
            );
            for command in ["run", "check-config"] {
                let out = std::process::Command::new(common::paddock_bin())
                    .args([command, "paddock.toml"])
                    .current_dir(bed.path())
                    .env("GH_TOKEN", "ghp_unused")
                    .output()
                    .expect("paddock");
                assert!(!out.status.success(), "{command} {name} with {file}");
                let err = String::from_utf8_lossy(&out.stderr);
                let path = bed.path().join(file);
                assert!(
                    err.contains(&format!("notifier {name}: `ca_file` {}: {why}", path.display())),
                    "{command} {name}: {err}"
                );
            }
        }
    }
}

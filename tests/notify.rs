//! Notifications through the real binary, real agents and a local HTTP server that records
//! what it is sent: a webhook hears every start and end, signed; a transitions-only notifier
//! hears passing → failing and back, once each; a receiver that is down holds no build up, and
//! a master killed before delivering sends each message exactly once after its restart.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::Bed;
use serde_json::{json, Value};

const SECRET: &str = "webhook-secret-for-tests";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    event: String,
    delivery: String,
    signature: Option<String>,
    authorization: Option<String>,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// An HTTP server on loopback that records POSTs, or answers 503 while `down`.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    down: Arc<AtomicBool>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Receiver {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let (g, d) = (got.clone(), down.clone());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app =
            axum::Router::new().fallback(move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let (g, d) = (g.clone(), d.clone());
                async move {
                    if d.load(Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                    g.lock().expect("lock").push(Received {
                        path: uri.path().to_string(),
                        event: h("x-paddock-event").unwrap_or_default(),
                        delivery: h("x-paddock-delivery").unwrap_or_default(),
                        signature: h("x-paddock-signature-256"),
                        authorization: h("authorization"),
                        body,
                    });
                    axum::http::StatusCode::NO_CONTENT
                }
            });
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { port, got, down, _rt: rt }
    }

    fn all_under(&self, prefix: &str) -> Vec<Received> {
        self.got.lock().expect("lock").iter().filter(|r| r.path.starts_with(prefix)).cloned().collect()
    }

    fn all(&self, path: &str) -> Vec<Received> {
        self.got.lock().expect("lock").iter().filter(|r| r.path == path).cloned().collect()
    }
}

fn config(port: u16) -> String {
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    format!(
        "{preamble}\
         [[notifier]]\nkind = \"webhook\"\nname = \"everything\"\nurl = \"http://127.0.0.1:{port}/all\"\n\
         secret_env = \"HOOK_SECRET\"\nevents = [\"started\", \"finished\", \"transition\"]\n\n\
         [[notifier]]\nkind = \"webhook\"\nname = \"news\"\nurl = \"http://127.0.0.1:{port}/news\"\n\
         events = [\"transition\"]\nbranches = [\"main\"]\n\
         template = \"{{builder}} on {{branch}}: {{previous}} -> {{result}} by {{committer}} ({{url}})\"\n"
    )
}

fn hmac(body: &str) -> String {
    paddock::notify::webhook::signature(SECRET.as_bytes(), body.as_bytes())
}

#[test]
fn transitions_are_told_once_and_every_build_is_signed_and_in_order() {
    let receiver = Receiver::start();
    let mut bed = Bed::new(&[]);
    bed.config("", &config(receiver.port));
    bed.start_with_env(&["main"], &[("HOOK_SECRET", SECRET), ("PADDOCK_NOTIFY_RETRY_MS", "200")]);

    let ok = bed.build_file("fine\n", "first");
    let broken = bed.build_file("broken\n", "break it");
    let still = bed.build_file("still broken\n", "still broken");
    let fixed = bed.build_file("all good\n", "fix it");
    let states: Vec<&str> = [&ok, &broken, &still, &fixed].iter().map(|b| b["state"].as_str().unwrap_or("")).collect();
    assert_eq!(states, ["success", "failure", "failure", "success"]);
    let ids: Vec<i64> = [&ok, &broken, &still, &fixed].iter().map(|b| b["id"].as_i64().expect("id")).collect();

    // Everything planned and sent before counting, so a late extra would be seen.
    bed.wait("two transitions told", || Some(receiver.all("/news")).filter(|n| n.len() >= 2));
    bed.notifications_settled();
    // The transitions notifier: passing → failing, then failing → passing; nothing else.
    let news = receiver.all("/news");
    let texts: Vec<String> = news.iter().map(|r| r.json()["text"].as_str().unwrap_or("").to_string()).collect();
    let url = |id: i64| format!("{}/builds/{id}", bed.url());
    assert_eq!(
        texts,
        [
            format!("b on main: success -> failure by Ada Tester <ada@example.com> ({})", url(ids[1])),
            format!("b on main: failure -> success by Ada Tester <ada@example.com> ({})", url(ids[3])),
        ]
    );
    assert!(news.iter().all(|r| r.signature.is_none() && r.event == "transition"), "no secret: unsigned");

    // The webhook: started then finished for every build, plus the two transitions, signed.
    let all = receiver.all("/all");
    assert_eq!(all.len(), 10, "started and finished for four builds, and two transitions");
    for r in &all {
        assert_eq!(r.signature.as_deref(), Some(hmac(&r.body).as_str()), "signed: {}", r.body);
        assert_eq!(r.json()["event"], r.event.as_str());
    }
    let mut seen = std::collections::HashSet::new();
    assert!(all.iter().all(|r| seen.insert(r.delivery.clone())), "one delivery id per message");
    for (i, id) in ids.iter().enumerate() {
        let mine: Vec<&Received> = all.iter().filter(|r| r.json()["build"]["id"] == *id).collect();
        let events: Vec<&str> = mine.iter().map(|r| r.event.as_str()).collect();
        let expected: &[&str] =
            if i == 1 || i == 3 { &["started", "finished", "transition"] } else { &["started", "finished"] };
        assert_eq!(events, expected, "build {id}");
        let finished = mine[1].json();
        assert_eq!(finished["build"]["url"], url(*id));
        assert_eq!(finished["committers"][0], "Ada Tester <ada@example.com>");
    }
    let broken_finished = all.iter().find(|r| r.event == "finished" && r.json()["build"]["id"] == ids[1]).expect("it");
    let j = broken_finished.json();
    assert_eq!(j["transition"], serde_json::json!({"from": "success", "to": "failure"}));
    assert_eq!(j["failing_step"], "! grep -q broken a.txt");
    assert!(!bed.log().contains(SECRET), "the secret is never logged");
}

#[test]
fn a_receiver_down_holds_nothing_up_and_a_restart_sends_each_message_once() {
    let receiver = Receiver::start();
    let mut bed = Bed::new(&[]);
    bed.config("", &config(receiver.port));
    bed.start_with_env(&["main"], &[("HOOK_SECRET", SECRET), ("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    bed.build_file("fine\n", "first");
    bed.wait("the first build told", || Some(receiver.all("/all")).filter(|a| a.len() >= 2));

    // Down: the next build still runs and ends; its messages wait, retried.
    receiver.down.store(true, Ordering::SeqCst);
    let broken = bed.build_file("broken\n", "break it");
    assert_eq!(broken["state"], "failure");
    let id = broken["id"].as_i64().expect("id");
    bed.wait("a failed try of the transition's message", || {
        bed.db_scalar(&format!(
            "SELECT COUNT(*) FROM deliveries WHERE build_id = {id} AND notifier = 'news' AND attempts > 0"
        ))
        .filter(|n| *n > 0)
    });
    // Killed before any of them went out; the receiver comes back; the master too.
    bed.kill_master();
    receiver.down.store(false, Ordering::SeqCst);
    bed.start_with_env(&["main"], &[("HOOK_SECRET", SECRET), ("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    let news = bed.wait("the transition told after the restart", || {
        Some(receiver.all("/news")).filter(|n| n.iter().any(|r| r.json()["build"]["id"] == id))
    });
    let all = bed.wait("all of the build's messages", || {
        Some(receiver.all("/all")).filter(|a| a.iter().filter(|r| r.json()["build"]["id"] == id).count() >= 3)
    });
    // Give any duplicate every chance to show: wait until nothing is pending any more.
    bed.wait("no delivery pending", || {
        bed.db_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").filter(|n| *n == 0)
    });
    let events: Vec<String> =
        receiver.all("/all").iter().filter(|r| r.json()["build"]["id"] == id).map(|r| r.event.clone()).collect();
    assert_eq!(events, ["started", "finished", "transition"], "exactly once each, in order");
    assert_eq!(news.iter().filter(|r| r.json()["build"]["id"] == id).count(), 1);
    assert!(all.len() >= 5);
    let failed: Option<i64> = bed.db_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 'failed'");
    assert_eq!(failed, Some(0));
    // The admin API shows how each went: the build's transition took more than one try.
    let api = bed.get("/api/deliveries");
    let d = api["deliveries"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["build"] == id && d["notifier"] == "news")
        .cloned()
        .expect("the delivery");
    assert_eq!(d["state"], "sent");
    assert!(d["attempts"].as_i64().unwrap_or(0) >= 2, "{d}");
    assert!(d.get("payload").is_none(), "payloads stay in the store");
}

/// Two machines: an older change that breaks the build finishes after a newer one that
/// passes. The newer result stands, so nobody is told the branch broke.
#[test]
fn an_older_change_finishing_after_a_newer_one_is_no_transition() {
    let receiver = Receiver::start();
    let mut bed = Bed::new(&[]);
    let go = bed.flag("go");
    std::fs::create_dir_all(go.join("base")).expect("go/base");
    // Each build waits for go/<its change's gate word>; the "older" change fails.
    bed.config(
        "",
        &format!(
            "[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
             [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
             steps = [\"f=$(tail -n1 gate.txt 2>/dev/null || echo base); while [ ! -e {go}/$f ]; do sleep 0.1; done; [ $f != older ]\"]\n\n\
             [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n\n\
             [[notifier]]\nkind = \"webhook\"\nname = \"news\"\nurl = \"http://127.0.0.1:{port}/news\"\nevents = [\"transition\"]\n\n\
             [[notifier]]\nkind = \"webhook\"\nname = \"all\"\nurl = \"http://127.0.0.1:{port}/all\"\nevents = [\"finished\"]\n",
            go = go.display(),
            port = receiver.port
        ),
    );
    bed.start_with_env(&["main"], &[("PADDOCK_NOTIFY_RETRY_MS", "200")]);
    let build_of = |rev: &str, state: &str| {
        bed.wait(&format!("{rev} to be {state}"), || {
            bed.builds().into_iter().find(|b| b["revision"] == rev && b["state"] == state)
        })
    };
    let base = bed.commit("main", "gate.txt", "base\n", "base");
    build_of(&base, "success");
    let older = bed.commit("main", "gate.txt", "older\n", "break it");
    build_of(&older, "running");
    let newer = bed.commit("main", "gate.txt", "newer\n", "fix it");
    build_of(&newer, "running");
    std::fs::create_dir(go.join("newer")).expect("go/newer");
    let newer = build_of(&newer, "success");
    std::fs::create_dir(go.join("older")).expect("go/older");
    let older = build_of(&older, "failure");
    bed.notifications_settled();

    assert!(
        receiver.all("/news").is_empty(),
        "{:?}",
        receiver.all("/news").iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    let finished = |b: &Value| {
        receiver.all("/all").into_iter().map(|r| r.json()).find(|j| j["build"]["id"] == b["id"]).expect("finished")
    };
    let (n, o) = (finished(&newer), finished(&older));
    assert_eq!(
        (n["previous"].clone(), n["superseded"].clone(), n["transition"].clone()),
        (json!("success"), json!(false), Value::Null)
    );
    assert_eq!(
        (o["previous"].clone(), o["superseded"].clone(), o["transition"].clone()),
        (json!("success"), json!(true), Value::Null)
    );
    assert_ne!(newer["machine"], older["machine"], "they ran side by side");
}

#[test]
fn a_signing_notifier_without_its_secret_stops_the_master_at_start_with_the_reason() {
    let bed = Bed::new(&[]);
    bed.config("", &config(1));
    let out = std::process::Command::new(common::paddock_bin())
        .args(["run", "paddock.toml"])
        .current_dir(bed.path())
        .env_remove("HOOK_SECRET")
        .output()
        .expect("paddock run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("notifier everything: environment variable HOOK_SECRET (its `secret_env`) is not set"),
        "{err}"
    );
}

#[test]
fn a_ca_file_that_is_missing_or_holds_no_certificate_stops_the_master_at_start() {
    let bed = Bed::new(&[]);
    std::fs::write(bed.path().join("not-a-ca.pem"), "hello\n").expect("write");
    std::fs::write(bed.path().join("garbled.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .expect("write");
    for (file, why) in [
        ("missing.pem", "cannot read it"),
        ("not-a-ca.pem", "no certificate in it"),
        ("garbled.pem", "1 of its 1 certificates cannot be used as a CA"),
    ] {
        bed.config(
            "",
            &format!(
                "[pool.local]\nmax_instances = 1\n\n\
                 [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n\n\
                 [[notifier]]\nname = \"chat\"\nkind = \"irc\"\nserver = \"irc.internal\"\nchannel = \"#ci\"\n\
                 ca_file = \"{file}\"\n"
            ),
        );
        // `check-config` says so too, before anything is deployed.
        for command in ["run", "check-config"] {
            let out = std::process::Command::new(common::paddock_bin())
                .args([command, "paddock.toml"])
                .current_dir(bed.path())
                .output()
                .expect("paddock");
            assert!(!out.status.success(), "{command} with {file}");
            let err = String::from_utf8_lossy(&out.stderr);
            let path = bed.path().join(file);
            assert!(err.contains(&format!("notifier chat: `ca_file` {}: {why}", path.display())), "{command}: {err}");
        }
    }
}

#[test]
fn github_commit_statuses_go_pending_then_success_or_failure() {
    let receiver = Receiver::start();
    let mut bed = Bed::new(&[]);
    let preamble = common::ONE_BUILDER_FAILING_ON_BROKEN;
    bed.config(
        "",
        &format!(
            "{preamble}\
             [[notifier]]\nkind = \"github\"\napi_url = \"http://127.0.0.1:{}/api/v3\"\ntoken_env = \"GH_TOKEN\"\n\
             repository = \"acme/app\"\n",
            receiver.port
        ),
    );
    bed.start_with_env(&["main"], &[("GH_TOKEN", "ghp_test_token")]);
    let ok = bed.build_file("fine\n", "first");
    let broken = bed.build_file("broken\n", "break it");
    let statuses = bed.wait("four statuses", || {
        Some(receiver.all_under("/api/v3/repos/acme/app/statuses/")).filter(|s| s.len() >= 4)
    });
    let mut seen = Vec::new();
    for r in &statuses {
        assert_eq!(r.authorization.as_deref(), Some("Bearer ghp_test_token"));
        let sha = r.path.rsplit('/').next().unwrap_or("").to_string();
        let j = r.json();
        seen.push((
            sha,
            j["state"].as_str().unwrap_or("").to_string(),
            j["description"].as_str().unwrap_or("").to_string(),
        ));
        assert_eq!(j["context"], "paddock/b");
        assert!(j["target_url"].as_str().unwrap_or("").starts_with(&format!("{}/builds/", bed.url())), "{j}");
    }
    let (ok_rev, broken_rev) =
        (ok["revision"].as_str().unwrap_or("").to_string(), broken["revision"].as_str().unwrap_or("").to_string());
    assert_eq!(
        seen,
        [
            (ok_rev.clone(), "pending".to_string(), "Build started".to_string()),
            (ok_rev, "success".to_string(), "Build succeeded".to_string()),
            (broken_rev.clone(), "pending".to_string(), "Build started".to_string()),
            (broken_rev, "failure".to_string(), "Failed at step: ! grep -q broken a.txt".to_string()),
        ]
    );
    assert!(!bed.log().contains("ghp_test_token"), "the token is never logged");
}

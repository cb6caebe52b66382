//! Accounts and roles through the real binary: users and tokens made with `paddock user add` and
//! `paddock token create`, then every API route asked by nobody, by too small a role, and by
//! the role it needs, with `[web] access` set to "login" and then to "public".

mod common;

use common::Bed;
use reqwest::blocking::Client;

const CONFIG: &str = "[pool.local]\nmax_instances = 2\nidle_timeout = \"30s\"\nboot_timeout = \"60s\"\n\n\
[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n";

#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
enum Need {
    Viewer,
    Committer,
    Admin,
}

/// Every route of the API (and /metrics), with the least role it needs.
fn routes() -> Vec<(&'static str, &'static str, Option<serde_json::Value>, Need)> {
    use serde_json::json;
    vec![
        ("GET", "/api/builds", None, Need::Viewer),
        ("GET", "/api/builds/1", None, Need::Viewer),
        ("GET", "/api/builds/1/log", None, Need::Viewer),
        ("GET", "/api/builders", None, Need::Viewer),
        ("GET", "/api/machines", None, Need::Viewer),
        ("GET", "/api/pools", None, Need::Viewer),
        ("GET", "/api/changes", None, Need::Viewer),
        ("POST", "/api/builds", Some(json!({"builder": "b", "branch": "main"})), Need::Committer),
        ("POST", "/api/builds/1/rebuild", None, Need::Committer),
        ("POST", "/api/builds/1/cancel", None, Need::Committer),
        ("POST", "/api/changes", Some(json!({"repo": "app", "branch": "main", "revision": "0000"})), Need::Committer),
        ("GET", "/api/cost", None, Need::Admin),
        ("GET", "/api/deliveries", None, Need::Admin),
        ("GET", "/metrics", None, Need::Admin),
        ("POST", "/api/machines/1/terminate", None, Need::Admin),
        ("POST", "/api/pools/local/pause", None, Need::Admin),
        ("POST", "/api/pools/local/resume", None, Need::Admin),
    ]
}

fn call(client: &Client, bed: &Bed, method: &str, path: &str, body: &Option<serde_json::Value>) -> (u16, String) {
    let url = format!("{}{path}", bed.url());
    let req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    let req = match body {
        Some(b) => req.json(b),
        None => req,
    };
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_string());
    let text = resp.text().unwrap_or_default();
    if status == 401 {
        assert_eq!(www.as_deref(), Some("Bearer realm=\"paddock\""), "{method} {path}: 401 names the scheme");
    }
    (status, text)
}

#[test]
fn every_api_route_refuses_nobody_and_too_small_a_role() {
    let mut bed = Bed::new(&[]);
    bed.config("", &format!("[web]\naccess = \"login\"\n\n{CONFIG}"));
    bed.start(&["main"]);
    // A build to act on, so the committer's calls reach their handlers.
    let admin = Bed::client(Some(bed.token()));
    let viewer = Bed::client(Some(&bed.add_user("vera", "viewer", "vera-password")));
    let committer = Bed::client(Some(&bed.add_user("carl", "committer", "carl-password")));
    let nobody = Bed::client(None);
    let users = [(Need::Viewer, &viewer), (Need::Committer, &committer), (Need::Admin, &admin)];

    for (method, path, body, need) in routes() {
        let (status, text) = call(&nobody, &bed, method, path, &body);
        assert_eq!(status, 401, "{method} {path} without credentials: {text}");
        assert!(text.contains("\"error\""), "{method} {path}: a JSON reason: {text}");
        for (role, client) in &users {
            let (status, text) = call(client, &bed, method, path, &body);
            if *role < need {
                assert_eq!(status, 403, "{method} {path} as {role:?}: {text}");
                assert!(text.contains(&format!("needs the {}", format!("{need:?}").to_lowercase())), "{text}");
            } else {
                assert!(status != 401 && status != 403, "{method} {path} as {role:?} is allowed: {status} {text}");
            }
        }
    }

    // Wrong credentials are refused, never taken as anonymous.
    for header in ["Bearer pdk_not-a-token", "Basic YWRtaW46YWRtaW4=", "Bearer "] {
        let resp =
            nobody.get(format!("{}/api/builds", bed.url())).header("authorization", header).send().expect("request");
        assert_eq!(resp.status().as_u16(), 401, "{header}");
    }

    // A revoked token stops working; the list shows tokens without their values.
    let list = bed.host_cli(&["token", "list"], "");
    assert!(list.contains("vera") && list.contains("carl") && !list.contains("pdk_"), "{list}");
    let vera_id = list
        .lines()
        .find(|l| l.contains("vera"))
        .and_then(|l| l.split_whitespace().next())
        .expect("vera's token id")
        .to_string();
    bed.host_cli(&["token", "revoke", &vera_id], "");
    assert_eq!(call(&viewer, &bed, "GET", "/api/builds", &None).0, 401);

    // A demoted user's token acts with the new role at once.
    bed.host_cli(&["user", "role", "carl", "viewer"], "");
    let (status, _) = call(&committer, &bed, "POST", "/api/builds/1/cancel", &None);
    assert_eq!(status, 403);
    let users = bed.host_cli(&["user", "list"], "");
    assert!(users.contains("carl") && users.contains("viewer") && users.contains("bed-admin"), "{users}");
    assert!(!users.contains("argon2"), "no hashes printed: {users}");

    // The CLI says how to authenticate when it gets a 401.
    let out = std::process::Command::new(common::paddock_bin())
        .args(["builds", "--master", &bed.url()])
        .env_remove("PADDOCK_TOKEN")
        .output()
        .expect("paddock builds");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("paddock token create"), "{err}");

    // Public: anyone reads; writing and costs still need their roles.
    bed.stop_master();
    bed.config("", &format!("[web]\naccess = \"public\"\n\n{CONFIG}"));
    bed.start(&["main"]);
    for (method, path, body, need) in routes() {
        let (status, text) = call(&nobody, &bed, method, path, &body);
        match need {
            Need::Viewer => assert!(status == 200 || status == 404, "{method} {path} is public: {status} {text}"),
            _ => assert_eq!(status, 401, "{method} {path} without credentials: {text}"),
        }
    }
    // Another scheme (a proxy's Basic auth) is not ours: the request is read as anonymous.
    let resp = nobody
        .get(format!("{}/api/builds", bed.url()))
        .header("authorization", "Basic YWRtaW46YWRtaW4=")
        .send()
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    // But a bearer token, however the scheme is spelled, must work: a bad one is a 401 even
    // where anonymous reading is allowed.
    for header in ["BEARER pdk_nope", "bearer\tpdk_nope", "Bearer"] {
        let resp =
            nobody.get(format!("{}/api/builds", bed.url())).header("authorization", header).send().expect("request");
        assert_eq!(resp.status().as_u16(), 401, "{header:?}");
    }
    let resp = nobody
        .get(format!("{}/api/builds", bed.url()))
        .header("authorization", format!("bEaReR {}", bed.token()))
        .send()
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    // Prices are for admins only, even where machines are public.
    let forced = admin
        .post(format!("{}/api/builds", bed.url()))
        .json(&serde_json::json!({"builder": "b", "branch": "main"}))
        .send()
        .expect("force");
    assert_eq!(forced.status().as_u16(), 201);
    let id = forced.json::<serde_json::Value>().expect("json")["builds"][0]["id"].as_i64().expect("id");
    bed.wait("the forced build to finish", || {
        let b = bed.get(&format!("/api/builds/{id}"));
        (b["state"] == "success").then_some(())
    });
    let public: serde_json::Value =
        nobody.get(format!("{}/api/machines", bed.url())).send().expect("GET").json().expect("json");
    let as_admin = bed.get("/api/machines");
    assert!(as_admin["machines"][0]["price_source"].is_string(), "{as_admin}");
    assert!(public["machines"][0]["price_source"].is_null(), "{public}");
    assert_eq!(public["machines"][0]["id"], as_admin["machines"][0]["id"]);
}

#[test]
fn user_and_token_commands_refuse_bad_input_with_a_reason() {
    let mut bed = Bed::new(&[]);
    bed.config("", CONFIG);
    bed.start(&["main"]);
    let run = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(common::paddock_bin())
            .args(args)
            .arg("--config")
            .arg(bed.path().join("paddock.toml"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("paddock");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("wait");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    for (args, stdin, expect) in [
        (&["user", "add", "x y", "--role", "viewer"][..], "long-enough\n", "user names are"),
        (&["user", "add", "dora", "--role", "root"][..], "long-enough\n", "unknown role \"root\""),
        (&["user", "add", "dora", "--role", "viewer"][..], "short\n", "at least 8 characters"),
        (&["user", "add", "bed-admin", "--role", "viewer"][..], "long-enough\n", "exists already"),
        (&["user", "remove", "nobody"][..], "", "no user \"nobody\""),
        (&["token", "create", "nobody"][..], "", "no user \"nobody\""),
        (&["token", "revoke", "999"][..], "", "no token 999"),
    ] {
        let (ok, err) = run(args, stdin);
        assert!(!ok, "{args:?} must fail");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // Nothing half-made: dora does not exist.
    assert!(!bed.host_cli(&["user", "list"], "").contains("dora"));
    // Removing a user ends their tokens.
    let token = bed.add_user("dora", "committer", "dora-password");
    let dora = Bed::client(Some(&token));
    assert_eq!(dora.get(format!("{}/api/builds", bed.url())).send().expect("GET").status().as_u16(), 200);
    bed.host_cli(&["user", "remove", "dora"], "");
    assert_eq!(dora.get(format!("{}/api/builds", bed.url())).send().expect("GET").status().as_u16(), 401);
}

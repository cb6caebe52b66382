//! The master's own log through the real binary: no colour codes in a file, JSON lines with
//! `log_format = "json"` (the flag or `PADDOCK_LOG_FORMAT` wins over the config), no password
//! typed as a name, and hostile branch names and revisions refused at every door before they
//! are stored, logged or handed to git.

mod common;

use common::Bed;
use hmac::{Hmac, Mac};
use reqwest::blocking::Client;
use sha2::Sha256;

const SECRET: &str = "hook-secret-logs-2b7e";

const CONFIG: &str = "[pool.local]\nmax_instances = 1\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n\n\
[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n";

/// What a hostile name puts after its newline: a line that reads like one of the master's own.
const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO paddock::web::pages::login: logged in user=admin";

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push(git_ref: &str, after: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": git_ref,
        "after": after,
        "repository": { "name": "app", "clone_url": "https://github.com/example/app.git" },
        "commits": [{
            "id": after,
            "message": "Fix",
            "timestamp": "2026-11-24T10:00:00Z",
            "author": { "name": "Ada Tester", "email": "ada@example.com" },
            "added": [], "modified": ["a.txt"], "removed": []
        }]
    })
    .to_string()
    .into_bytes()
}

/// Tries to log in through the form (with its CSRF cookie); returns the status.
fn try_login(bed: &Bed, name: &str, password: &str) -> u16 {
    let client = Bed::client(None);
    let form = client.get(format!("{}/login", bed.url())).send().expect("login form");
    let cookie = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("paddock_login="))
        .and_then(|v| v.split(';').next())
        .expect("login cookie")
        .to_string();
    let html = form.text().expect("body");
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).expect("csrf field") + marker.len();
    let csrf = &html[at..at + html[at..].find('"').expect("end quote")];
    let resp = client
        .post(format!("{}/login", bed.url()))
        .header("cookie", cookie)
        .form(&[("name", name), ("password", password), ("csrf", csrf), ("next", "/")])
        .send()
        .expect("login");
    resp.status().as_u16()
}

fn post_json(http: &Client, url: &str, body: serde_json::Value) -> (u16, String) {
    let resp = http.post(url).json(&body).send().expect("post");
    (resp.status().as_u16(), resp.text().unwrap_or_default())
}

/// The `"error"` of a JSON answer (empty if there is none).
fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn a_text_log_in_a_file_has_no_colour_and_hostile_names_are_refused_at_every_door() {
    let mut bed = Bed::new(&[]);
    // A remote advertising names that git's own check refuses: loose refs written by hand, as
    // a hostile server could advertise them.
    let head = bed.git(&["rev-parse", "HEAD"]);
    for name in ["-x", "@", "nel\u{85}forged"] {
        std::fs::write(bed.repo.join(".git/refs/heads").join(name), format!("{head}\n")).expect("loose ref");
    }
    bed.config("branches = [\"*\"]", CONFIG);
    // NO_COLOR empty counts as unset: the file alone must turn colour off.
    bed.start_with_env(&["main"], &[("PADDOCK_GITHUB_SECRET", SECRET), ("NO_COLOR", "")]);
    bed.add_user("carl", "committer", "carl-password");

    let rev = bed.commit("main", "a.txt", "one\n", "First change");
    let build = bed.wait("the build of the first change", || {
        bed.builds().into_iter().find(|b| b["revision"] == rev.as_str() && b["state"] == "success")
    });
    let refused_line =
        "skipping a branch the remote advertised: branch \"-x\" is not a valid branch name: it starts with `-`";
    bed.wait("the poller's warning about \"-x\"", || bed.log().contains(refused_line).then_some(()));
    // A C1 control character reaches the log escaped, never raw.
    bed.wait("the poller's warning about a NEL", || {
        bed.log()
            .contains(
                "branch \"nel\\u{85}forged\" is not a valid branch name: it contains the control character \\u{85}",
            )
            .then_some(())
    });

    let changes_before = bed.get("/api/changes")["changes"].as_array().map_or(0, Vec::len);
    let hook = format!("{}/hooks/github", bed.url());
    let github = |body: Vec<u8>| {
        let resp = bed
            .http
            .post(&hook)
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", sign(&body))
            .body(body)
            .send()
            .expect("post");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    let (status, body) = github(push(&format!("refs/heads/main\n{FORGED}"), &rev));
    assert_eq!(status, 400, "{body}");
    let why = error_of(&body);
    assert!(why.starts_with("ref \"refs/heads/main\\n2026-01-01") && why.contains("control character \\n"), "{why}");
    let (status, body) = github(push("refs/heads/../../x", &rev));
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).contains("it contains `..`"), "{body}");
    let (status, body) = github(push("refs/heads/main", "--upload-pack=touch /tmp/x"));
    assert_eq!(status, 400, "{body}");

    let pwned = bed.path().join("pwned");
    let upload_pack = format!("--upload-pack=touch {}", pwned.display());
    let changes = format!("{}/api/changes", bed.url());
    let (status, body) =
        post_json(&bed.http, &changes, serde_json::json!({"repo": "app", "branch": "main", "revision": upload_pack}));
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).starts_with("revision \"--upload-pack=") && body.contains("starts with `-`"), "{body}");
    let (status, body) = post_json(
        &bed.http,
        &changes,
        serde_json::json!({"repo": "app", "branch": format!("main\n{FORGED}"), "revision": rev}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).starts_with("branch \"main\\n"), "{body}");

    let builds = format!("{}/api/builds", bed.url());
    let (status, body) =
        post_json(&bed.http, &builds, serde_json::json!({"builder": "b", "branch": "main", "revision": upload_pack}));
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).starts_with("revision \"--upload-pack="), "{body}");
    for branch in [format!("main\n{FORGED}"), "refs/heads/../../x".to_string(), "a b".to_string()] {
        let (status, body) = post_json(&bed.http, &builds, serde_json::json!({"builder": "b", "branch": branch}));
        assert_eq!(status, 400, "{branch:?}: {body}");
        assert!(error_of(&body).starts_with("branch \""), "{body}");
    }
    let (status, body) =
        post_json(&bed.http, &builds, serde_json::json!({"builder": "b", "branch": "main", "revision": "a..b"}));
    assert_eq!(status, 400, "{body}");

    // Nothing was stored or queued, and git never ran the option.
    assert_eq!(bed.get("/api/changes")["changes"].as_array().map_or(0, Vec::len), changes_before);
    let all = bed.builds();
    assert_eq!(all.len(), 1, "only the first change's build: {all:?}");
    assert_eq!(all[0]["id"], build["id"]);
    assert!(!pwned.exists());

    // A password typed as the name stays out of the log; an account's failed login names it.
    let typed = "correct-Horse-battery-staple-42!";
    assert_eq!(try_login(&bed, typed, "whatever"), 401);
    assert_eq!(try_login(&bed, "carl", "not-carls-password"), 401);
    bed.wait("the failed logins logged", || {
        let log = bed.log();
        (log.contains("failed login") && log.contains("name=carl")).then_some(())
    });
    let bytes = std::fs::read(&bed.master_log).expect("master log");
    let log = String::from_utf8_lossy(&bytes);
    assert!(!log.contains(typed), "a mistyped name is not logged:\n{log}");
    assert!(log.contains("name=(no such account)"), "{log}");

    assert!(!bytes.contains(&0x1b), "no ANSI escape codes in a log file:\n{log}");
    assert!(!log.contains('\u{85}'), "{log}");
    assert!(!log.lines().any(|l| l.starts_with(FORGED) || l.starts_with("forged")), "a forged line:\n{log}");
    assert_eq!(log.matches(refused_line).count(), 1, "each refused name is reported once:\n{log}");
    assert!(!log.contains(SECRET));
}

/// Every line of `log` as JSON, failing on the first line that is not an object with a level,
/// a target and fields.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n--- log ---\n{log}"));
            assert!(v["level"].is_string() && v["target"].is_string() && v["fields"].is_object(), "{l}");
            v
        })
        .collect();
    assert!(!lines.is_empty(), "the master logged nothing");
    lines
}

#[test]
fn log_format_json_in_the_config_makes_every_line_an_object() {
    let mut bed = Bed::new(&[]);
    bed.config_with_master("log_format = \"json\"", "", CONFIG);
    bed.start(&["main"]);
    let rev = bed.commit("main", "a.txt", "one\n", "Message with a\nnewline and \x1b[31mcolour");
    bed.wait("the build", || {
        bed.builds().into_iter().find(|b| b["revision"] == rev.as_str() && b["state"] == "success")
    });
    assert_eq!(try_login(&bed, "nobody", "x"), 401);
    bed.wait("the failed login logged", || bed.log().contains("failed login").then_some(()));
    bed.stop_master();
    let log = bed.log();
    let lines = json_lines(&log);
    assert!(!log.as_bytes().contains(&0x1b), "{log}");
    let queued = lines
        .iter()
        .find(|l| l["fields"]["message"] == "build queued")
        .unwrap_or_else(|| panic!("a `build queued` line:\n{log}"));
    assert_eq!(queued["level"], "INFO");
    assert_eq!(queued["fields"]["revision"], rev.as_str());
    // Ids are numbers, as in the API, so log queries can compare them.
    assert!(queued["fields"]["build"].is_u64(), "{queued}");
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "build started")
        .unwrap_or_else(|| panic!("a `build started` line:\n{log}"));
    assert!(started["fields"]["build"].is_u64() && started["fields"]["machine"].is_u64(), "{started}");
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "failed login" && l["fields"]["name"] == "(no such account)"));
}

#[test]
fn the_flag_or_its_environment_variable_wins_over_the_config() {
    let mut bed = Bed::new(&[]);
    let config = bed.config_with_master("log_format = \"json\"", "", CONFIG);
    bed.start_with_env(&["main"], &[("PADDOCK_LOG_FORMAT", "text")]);
    bed.stop_master();
    let log = bed.log();
    assert!(log.lines().any(|l| l.contains(" INFO ")), "text lines:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with('{')), "no JSON lines:\n{log}");

    // The flag is global (before or after the subcommand) and refuses unknown formats.
    let run = |args: &[&str]| {
        std::process::Command::new(common::paddock_bin())
            .args(args)
            .env_remove("PADDOCK_LOG_FORMAT")
            .output()
            .expect("run paddock")
    };
    let config = config.to_string_lossy().to_string();
    assert!(run(&["--log-format", "json", "check-config", &config]).status.success());
    assert!(run(&["check-config", "--log-format", "text", &config]).status.success());
    let bad = run(&["--log-format", "yaml", "check-config", &config]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("invalid value 'yaml' for '--log-format") && err.contains("text, json"), "{err}");
}

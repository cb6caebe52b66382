//! Change hooks end to end: the GitHub push webhook and `POST /api/changes` against the real
//! master. Bad input gets a 4xx and stores nothing; good input builds.

mod common;

use common::Bed;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "hook-secret-7f3a9c";

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push(repo_name: &str, after: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "deleted": false,
        "repository": {
            "name": repo_name,
            "full_name": format!("example/{repo_name}"),
            "clone_url": format!("https://github.com/example/{repo_name}.git"),
        },
        "head_commit": { "id": after },
        "commits": [{
            "id": after,
            "message": "Fix the frobnicator",
            "timestamp": "2026-11-24T10:00:00Z",
            "author": { "name": "Ada Tester", "email": "ada@example.com" },
            "added": ["src/new.txt"], "modified": [], "removed": []
        }]
    })
    .to_string()
    .into_bytes()
}

#[test]
fn bad_webhooks_get_a_4xx_and_store_nothing_good_ones_build() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "poll = \"0s\"",
        "[pool.local]\n\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"cat src/new.txt\"]\n\n[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
    );
    bed.start_with_env(&[], &[("PADDOCK_GITHUB_SECRET", SECRET)]);
    let rev = bed.commit("main", "src/new.txt", "new file\n", "Fix the frobnicator");
    let url = format!("{}/hooks/github", bed.url());
    let post = |body: &[u8], sig: Option<&str>| {
        let mut req = bed.http.post(&url).header("X-GitHub-Event", "push").body(body.to_vec());
        if let Some(sig) = sig {
            req = req.header("X-Hub-Signature-256", sig);
        }
        let resp = req.send().expect("post");
        let status = resp.status().as_u16();
        (status, resp.text().unwrap_or_default())
    };
    let good = push("app", &rev);

    let (status, _) = post(&good, Some("sha256=00ff"));
    assert_eq!(status, 401, "bad signature");
    let (status, _) = post(&good, None);
    assert_eq!(status, 401, "missing signature");
    let (status, _) = post(&good, Some(&sign(b"another body")));
    assert_eq!(status, 401, "signature of another body");
    let malformed = b"{\"ref\": \"refs/heads/main\", ".to_vec();
    let (status, body) = post(&malformed, Some(&sign(&malformed)));
    assert_eq!(status, 400, "malformed JSON: {body}");
    let unknown = push("somebody-elses-repo", &rev);
    let (status, body) = post(&unknown, Some(&sign(&unknown)));
    assert_eq!(status, 400, "unknown repository: {body}");
    assert!(body.contains("unknown repository"), "{body}");

    let api = format!("{}/api/changes", bed.url());
    let post_json = |body: &str| {
        let resp =
            bed.http.post(&api).header("content-type", "application/json").body(body.to_string()).send().expect("post");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    assert_eq!(post_json("{not json").0, 400);
    assert_eq!(post_json("{\"repo\": \"app\"}").0, 400, "missing fields");
    let (status, body) = post_json(&format!("{{\"repo\": \"nope\", \"branch\": \"main\", \"revision\": \"{rev}\"}}"));
    assert_eq!(status, 400);
    assert!(body.contains("unknown repository"), "{body}");

    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM changes"), Some(0), "nothing stored");
    assert_eq!(bed.builds().len(), 0);
    assert!(!bed.log().contains(SECRET), "the webhook secret is never logged");

    let (status, body) = post(&good, Some(&sign(&good)));
    assert_eq!(status, 200, "{body}");
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["revision"], rev.as_str());
    assert_eq!(builds[0]["state"], "success");
    let changes = bed.get("/api/changes")["changes"].as_array().cloned().unwrap_or_default();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["author"], "Ada Tester <ada@example.com>");
    assert_eq!(changes[0]["files"], serde_json::json!(["src/new.txt"]));

    // The same push delivered again (GitHub redelivers) and the same commit through the
    // generic hook are the same change: nothing new is stored or built.
    let (status, body) = post(&good, Some(&sign(&good)));
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_json(&format!("{{\"repo\": \"app\", \"branch\": \"main\", \"revision\": \"{rev}\"}}"));
    assert_eq!(status, 201, "{body}");
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM changes"), Some(1));
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM build_requests"), Some(1));

    // The generic hook records a second change for a new commit, read from the repository.
    let rev2 = bed.commit("main", "src/new.txt", "more\n", "Second change");
    let (status, body) = post_json(&format!("{{\"repo\": \"app\", \"branch\": \"main\", \"revision\": \"{rev2}\"}}"));
    assert_eq!(status, 201, "{body}");
    let builds = bed.wait_builds_done(2);
    assert_eq!(builds[0]["revision"], rev2.as_str());
    let changes = bed.get("/api/changes")["changes"].as_array().cloned().unwrap_or_default();
    assert_eq!(changes[0]["author"], "Ada Tester <ada@example.com>", "details read from git: {changes:?}");
    assert!(!bed.log().contains(SECRET));
}

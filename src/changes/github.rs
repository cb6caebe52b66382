//! GitHub push webhooks: signature check (HMAC-SHA256) and payload parsing.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::git::CommitInfo;
use super::refname::{self, RefError};

/// Why a webhook delivery was refused. Display never includes the secret or the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No `X-Hub-Signature-256` header.
    #[error("missing signature header")]
    MissingSignature,
    /// The header is not `sha256=<64 hex digits>`.
    #[error("malformed signature header: {0}")]
    MalformedSignature(&'static str),
    /// The signature does not match the body.
    #[error("signature mismatch")]
    BadSignature,
    /// No secret is configured; an empty HMAC key would let anyone sign.
    #[error("no webhook secret configured")]
    NoSecret,
    /// The body is not a push payload we understand.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The pushed branch's name is one git would refuse (a newline, `..`, a leading `-`, …).
    #[error("{0}")]
    BadRef(#[from] RefError),
}

/// Check GitHub's `X-Hub-Signature-256` header (`sha256=<hex>`) against `body`, in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::NoSecret);
    }
    let header = header.ok_or(WebhookError::MissingSignature)?.trim();
    let hex_sig =
        header.strip_prefix("sha256=").ok_or(WebhookError::MalformedSignature("expected a sha256= prefix"))?;
    let sig = hex::decode(hex_sig).map_err(|_| WebhookError::MalformedSignature("not hex"))?;
    if sig.len() != 32 {
        return Err(WebhookError::MalformedSignature("wrong length"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| WebhookError::NoSecret)?;
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| WebhookError::BadSignature)
}

/// A push, as much of it as Paddock uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PushEvent {
    /// The branch pushed to; `None` for tags and other refs.
    pub branch: Option<String>,
    /// The new head (all zeros when the ref was deleted).
    pub after: String,
    /// The ref was deleted.
    pub deleted: bool,
    /// The ref was created by this push.
    pub created: bool,
    /// The push was a force-push.
    pub forced: bool,
    /// Names and URLs of the repository: clone_url, html_url, ssh_url, git_url, full_name, name
    /// (those present, in that order).
    pub repo_names: Vec<String>,
    /// The pushed commits, oldest first. If GitHub lists none on an existing branch that moved
    /// (e.g. a force-push back to an older commit), this is the head commit alone, matching the
    /// poller's behaviour; a new branch with no new commits yields none (recorded, not built).
    pub commits: Vec<CommitInfo>,
}

#[derive(Deserialize)]
struct RawPush {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    #[serde(default)]
    deleted: Option<bool>,
    #[serde(default)]
    created: Option<bool>,
    #[serde(default)]
    forced: Option<bool>,
    repository: Option<RawRepo>,
    #[serde(default)]
    commits: Option<Vec<RawCommit>>,
    #[serde(default)]
    head_commit: Option<RawCommit>,
}

#[derive(Deserialize)]
struct RawRepo {
    name: Option<String>,
    full_name: Option<String>,
    clone_url: Option<String>,
    html_url: Option<String>,
    ssh_url: Option<String>,
    git_url: Option<String>,
}

#[derive(Deserialize)]
struct RawCommit {
    id: Option<String>,
    message: Option<String>,
    timestamp: Option<String>,
    author: Option<RawPerson>,
    added: Option<Vec<String>>,
    modified: Option<Vec<String>>,
    removed: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawPerson {
    name: Option<String>,
    email: Option<String>,
}

/// A null/empty-safe string: `Some` only if present and non-empty.
fn nonempty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

impl RawCommit {
    fn into_commit(self) -> Result<CommitInfo, WebhookError> {
        let revision = nonempty(self.id).ok_or_else(|| WebhookError::Malformed("commit without id".into()))?;
        // GitHub sends full object ids; anything else must not reach git as a revision.
        if !refname::is_full_hex_id(&revision) {
            return Err(WebhookError::Malformed(format!(
                "commit id {} is not a hex object id",
                refname::shown(&revision)
            )));
        }
        let ts = self.timestamp.unwrap_or_default();
        let committed_at = DateTime::parse_from_rfc3339(&ts)
            .map_err(|_| WebhookError::Malformed(format!("commit {revision}: bad timestamp")))?
            .with_timezone(&Utc);
        let (name, email) = match self.author {
            Some(p) => (p.name.unwrap_or_default(), p.email.unwrap_or_default()),
            None => (String::new(), String::new()),
        };
        let author = if email.is_empty() { name } else { format!("{name} <{email}>") };
        let mut seen = HashSet::new();
        let files = [self.added, self.modified, self.removed]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|f| seen.insert(f.clone()))
            .collect();
        Ok(CommitInfo { revision, author, committed_at, message: self.message.unwrap_or_default(), files })
    }
}

/// Parse a GitHub `push` event body.
pub fn parse_push(body: &[u8]) -> Result<PushEvent, WebhookError> {
    let raw: RawPush = serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    let git_ref = raw.git_ref.ok_or_else(|| WebhookError::Malformed("missing ref".into()))?;
    let after = raw.after.ok_or_else(|| WebhookError::Malformed("missing after".into()))?;
    let repo = raw.repository.ok_or_else(|| WebhookError::Malformed("missing repository".into()))?;
    if !refname::is_full_hex_id(&after) {
        return Err(WebhookError::Malformed(format!("`after` {} is not a hex object id", refname::shown(&after))));
    }
    // Tags and other refs are not built (the handler ignores them); a branch must be one git
    // would accept, so no name forges a log line or reaches git as an option or a path.
    let branch = match git_ref.strip_prefix("refs/heads/") {
        Some(b) => {
            refname::check_branch("ref", b).map_err(|e| RefError { shown: refname::shown(&git_ref), ..e })?;
            Some(b.to_string())
        }
        None => None,
    };
    let deleted = raw.deleted.unwrap_or(false) || (!after.is_empty() && after.bytes().all(|b| b == b'0'));
    let created = raw.created.unwrap_or(false);
    let repo_names = [repo.clone_url, repo.html_url, repo.ssh_url, repo.git_url, repo.full_name, repo.name]
        .into_iter()
        .filter_map(nonempty)
        .collect();
    let mut commits = Vec::new();
    if !deleted {
        for c in raw.commits.unwrap_or_default() {
            commits.push(c.into_commit()?);
        }
        if commits.is_empty() && !created {
            if let Some(head) = raw.head_commit {
                commits.push(head.into_commit()?);
            }
        }
    }
    Ok(PushEvent { branch, after, deleted, created, forced: raw.forced.unwrap_or(false), repo_names, commits })
}

/// A URL reduced to `(host, path)` for comparison; plain names and paths have an empty host.
fn normalise_url(url: &str) -> (String, String) {
    let mut s = url.trim();
    // Strip trailing '/' and '.git' in any combination ("x.git/", "x/").
    loop {
        let before = s.len();
        s = s.trim_end_matches('/');
        if let Some(t) = s.strip_suffix(".git") {
            s = t;
        }
        if s.len() == before {
            break;
        }
    }
    let (host, path) = if let Some((_scheme, rest)) = s.split_once("://") {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        // Ports differ between ssh and https for the same repository; ignore them.
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        (host.to_string(), path.to_string())
    } else if let Some((authority, path)) = scp_like(s) {
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        (host.to_string(), path.to_string())
    } else {
        (String::new(), s.to_string())
    };
    let host = host.to_ascii_lowercase();
    let mut path = path.trim_start_matches('/').to_string();
    // GitHub owner and repository names are case-insensitive.
    if host == "github.com" {
        path = path.to_ascii_lowercase();
    }
    (host, path)
}

/// Split scp-like `[user@]host:path` syntax (no scheme; a ':' before any '/').
fn scp_like(s: &str) -> Option<(&str, &str)> {
    let colon = s.find(':')?;
    let slash = s.find('/').unwrap_or(usize::MAX);
    if colon < slash && colon > 0 {
        Some((&s[..colon], &s[colon + 1..]))
    } else {
        None
    }
}

/// True if the configured repository (`config_url`, `config_name`) is the one pushed to.
pub fn repo_matches(config_url: &str, config_name: &str, ev: &PushEvent) -> bool {
    if !config_name.is_empty() && ev.repo_names.iter().any(|n| n == config_name) {
        return true;
    }
    let want = normalise_url(config_url);
    if want.1.is_empty() {
        return false;
    }
    // Only URL-like entries are compared as URLs; a bare `name` must not match a local path.
    ev.repo_names.iter().filter(|n| n.contains("://") || scp_like(n).is_some()).any(|n| normalise_url(n) == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn github_documented_example() {
        // The example from GitHub's "Validating webhook deliveries" documentation.
        let body = b"Hello, World!";
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(verify_signature(SECRET, body, Some(header)), Ok(()));
    }

    #[test]
    fn good_signature() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let h = sign(SECRET, body);
        assert_eq!(verify_signature(SECRET, body, Some(&h)), Ok(()));
        // Uppercase hex is still hex.
        let upper = format!("sha256={}", h["sha256=".len()..].to_uppercase());
        assert_eq!(verify_signature(SECRET, body, Some(&upper)), Ok(()));
    }

    #[test]
    fn bad_signature() {
        let body = b"payload";
        let h = sign(b"other secret", body);
        assert_eq!(verify_signature(SECRET, body, Some(&h)), Err(WebhookError::BadSignature));
        // Tampered body.
        let h = sign(SECRET, body);
        assert_eq!(verify_signature(SECRET, b"payload!", Some(&h)), Err(WebhookError::BadSignature));
    }

    #[test]
    fn missing_header() {
        assert_eq!(verify_signature(SECRET, b"x", None), Err(WebhookError::MissingSignature));
    }

    #[test]
    fn wrong_prefix_and_malformed() {
        let body = b"x";
        let h = sign(SECRET, body);
        let sha1 = h.replacen("sha256=", "sha1=", 1);
        for bad in [sha1.as_str(), "sha256=zz", "sha256=abcd", "", "sha256="] {
            let err = verify_signature(SECRET, body, Some(bad)).unwrap_err();
            assert!(matches!(err, WebhookError::MalformedSignature(_)), "{bad}: {err:?}");
            assert!(!err.to_string().contains("Secret"));
        }
        assert_eq!(verify_signature(b"", body, Some(&h)), Err(WebhookError::NoSecret));
    }

    fn push_payload() -> String {
        r#"{
          "ref": "refs/heads/stable/5.2.x",
          "before": "1111111111111111111111111111111111111111",
          "after": "3333333333333333333333333333333333333333",
          "created": false, "deleted": false, "forced": false,
          "base_ref": null,
          "compare": "https://github.com/django/django/compare/111111111111...333333333333",
          "commits": [
            {
              "id": "2222222222222222222222222222222222222222",
              "tree_id": "aaaa", "distinct": true,
              "message": "Fixed #1 -- Ünïcode | pipes\n\nBody line.",
              "timestamp": "2024-05-01T10:00:00+02:00",
              "url": "https://github.com/django/django/commit/2222",
              "author": {"name": "Ada Lovelace", "email": "ada@example.com", "username": "ada"},
              "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
              "added": ["docs/new.txt"],
              "removed": ["old.py"],
              "modified": ["django/core.py", "docs/new.txt"]
            },
            {
              "id": "3333333333333333333333333333333333333333",
              "message": "Second",
              "timestamp": "2024-05-01T09:30:00Z",
              "author": {"name": "Bob", "email": "bob@example.com"},
              "added": [], "removed": [], "modified": ["README.rst"]
            }
          ],
          "head_commit": {
              "id": "3333333333333333333333333333333333333333",
              "message": "Second",
              "timestamp": "2024-05-01T09:30:00Z",
              "author": {"name": "Bob", "email": "bob@example.com"},
              "added": [], "removed": [], "modified": ["README.rst"]
          },
          "repository": {
            "id": 4164482, "name": "django", "full_name": "django/django",
            "private": false,
            "owner": {"name": "django", "login": "django"},
            "html_url": "https://github.com/django/django",
            "clone_url": "https://github.com/django/django.git",
            "git_url": "git://github.com/django/django.git",
            "ssh_url": "git@github.com:django/django.git",
            "default_branch": "main"
          },
          "pusher": {"name": "ada", "email": "ada@example.com"},
          "sender": {"login": "ada", "id": 1}
        }"#
        .to_string()
    }

    #[test]
    fn parses_realistic_push() {
        let ev = parse_push(push_payload().as_bytes()).unwrap();
        assert_eq!(ev.branch.as_deref(), Some("stable/5.2.x"));
        assert_eq!(ev.after, "3".repeat(40));
        assert!(!ev.deleted && !ev.created && !ev.forced);
        assert_eq!(
            ev.repo_names,
            vec![
                "https://github.com/django/django.git",
                "https://github.com/django/django",
                "git@github.com:django/django.git",
                "git://github.com/django/django.git",
                "django/django",
                "django",
            ]
        );
        assert_eq!(ev.commits.len(), 2);
        let c = &ev.commits[0];
        assert_eq!(c.revision, "2".repeat(40));
        assert_eq!(c.author, "Ada Lovelace <ada@example.com>");
        assert_eq!(c.message, "Fixed #1 -- Ünïcode | pipes\n\nBody line.");
        assert_eq!(c.committed_at.to_rfc3339(), "2024-05-01T08:00:00+00:00");
        assert_eq!(c.files, vec!["docs/new.txt", "django/core.py", "old.py"]);
        assert_eq!(ev.commits[1].files, vec!["README.rst"]);
        assert_eq!(ev.commits[1].author, "Bob <bob@example.com>");
    }

    #[test]
    fn tag_push_has_no_branch() {
        let body = push_payload().replace("refs/heads/stable/5.2.x", "refs/tags/5.2.1");
        let ev = parse_push(body.as_bytes()).unwrap();
        assert_eq!(ev.branch, None);
    }

    #[test]
    fn deleted_branch() {
        let body = r#"{"ref":"refs/heads/x","after":"0000000000000000000000000000000000000000",
            "deleted":true,"commits":[],"head_commit":null,
            "repository":{"name":"r","full_name":"o/r"}}"#;
        let ev = parse_push(body.as_bytes()).unwrap();
        assert!(ev.deleted);
        assert!(ev.commits.is_empty());
        assert_eq!(ev.repo_names, vec!["o/r", "r"]);
    }

    #[test]
    fn force_push_to_old_commit_uses_head() {
        let body = push_payload().replace(r#""forced": false"#, r#""forced": true"#).replacen(
            r#""commits": ["#,
            r#""commits": [], "unused": ["#,
            1,
        );
        let ev = parse_push(body.as_bytes()).unwrap();
        assert!(ev.forced);
        assert_eq!(ev.commits.len(), 1);
        assert_eq!(ev.commits[0].revision, "3".repeat(40));
        // A new branch with no new commits is recorded, not built.
        let created = body.replace(r#""created": false"#, r#""created": true"#);
        assert!(parse_push(created.as_bytes()).unwrap().commits.is_empty());
    }

    #[test]
    fn hostile_branch_names_and_ids_are_refused() {
        for git_ref in
            ["refs/heads/main\nINFO forged", "refs/heads/../../x", "refs/heads/-x", "refs/heads/", "refs/heads/a b"]
        {
            let body = push_payload().replace("refs/heads/stable/5.2.x", &git_ref.replace('\n', "\\n"));
            let err = parse_push(body.as_bytes()).expect_err(git_ref);
            assert!(matches!(err, WebhookError::BadRef(_)), "{git_ref:?}: {err:?}");
            let text = err.to_string();
            assert!(text.starts_with("ref \"refs/heads/") && !text.contains('\n'), "{text}");
        }
        let id = "2".repeat(40);
        for bad in ["--upload-pack=touch /tmp/pwned", "2222", "main"] {
            let body = push_payload().replace(&id, bad);
            assert!(matches!(parse_push(body.as_bytes()), Err(WebhookError::Malformed(_))), "{bad}");
        }
        let body = push_payload().replace(&"3".repeat(40), "HEAD");
        assert!(matches!(parse_push(body.as_bytes()), Err(WebhookError::Malformed(_))));
        // Other refs are not branches: ignored, not refused.
        let body = push_payload().replace("refs/heads/stable/5.2.x", "refs/pull/1/head");
        assert_eq!(parse_push(body.as_bytes()).expect("parsed").branch, None);
    }

    #[test]
    fn malformed_payloads() {
        for body in [
            &b"not json"[..],
            b"",
            b"[]",
            b"null",
            br#"{"after":"x","repository":{}}"#,
            br#"{"ref":"refs/heads/main","repository":{}}"#,
            br#"{"ref":"refs/heads/main","after":"x"}"#,
            br#"{"ref":5,"after":"x","repository":{}}"#,
            br#"{"ref":"refs/heads/main","after":"x","repository":{},"commits":[{"id":"a"}]}"#,
            br#"{"ref":"refs/heads/main","after":"x","repository":{},"commits":"no"}"#,
        ] {
            let r = parse_push(body);
            assert!(matches!(r, Err(WebhookError::Malformed(_))), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn repo_matching() {
        let ev = parse_push(push_payload().as_bytes()).unwrap();
        // By configured name.
        assert!(repo_matches("https://example.com/whatever", "django", &ev));
        assert!(repo_matches("", "django/django", &ev));
        // By URL, in its many spellings.
        for url in [
            "https://github.com/django/django.git",
            "https://github.com/django/django",
            "https://github.com/django/django/",
            "https://GitHub.com/Django/Django.git",
            "git@github.com:django/django.git",
            "git@github.com:django/django",
            "ssh://git@github.com/django/django.git",
            "ssh://git@github.com:22/django/django",
            "git://github.com/django/django",
            "https://user:token@github.com/django/django.git",
        ] {
            assert!(repo_matches(url, "mine", &ev), "{url}");
        }
        for url in [
            "https://github.com/django/django-docs.git",
            "https://github.com/other/django.git",
            "https://gitlab.com/django/django.git",
            "/srv/git/django",
            "",
        ] {
            assert!(!repo_matches(url, "mine", &ev), "{url}");
        }
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalise_url("git@github.com:o/r.git"), ("github.com".into(), "o/r".into()));
        assert_eq!(normalise_url("https://Example.COM/O/R.git/"), ("example.com".into(), "O/R".into()));
        assert_eq!(normalise_url("/srv/r.git"), (String::new(), "srv/r".into()));
        assert_eq!(normalise_url("file:///srv/r"), (String::new(), "srv/r".into()));
    }
}

//! The generic change hook: `POST /api/changes` with `{"repo", "branch", "revision"}`.

use serde::Deserialize;

/// Body of the generic change hook. Extra fields are ignored so senders may add their own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChangeHook {
    /// Configured repository name (or URL) the change belongs to.
    pub repo: String,
    /// Branch the revision is on.
    pub branch: String,
    /// Commit id or ref name to build.
    pub revision: String,
    /// Optional `Name <email>`.
    #[serde(default)]
    pub author: Option<String>,
    /// Optional commit message.
    #[serde(default)]
    pub message: Option<String>,
    /// Optional files touched, for schedulers' file filters.
    #[serde(default)]
    pub files: Option<Vec<String>>,
}

/// Longest repo, branch or revision we accept; longer is surely not a real name.
const MAX_LEN: usize = 1024;

impl ChangeHook {
    /// Parse and validate a hook body.
    pub fn parse(body: &[u8]) -> Result<ChangeHook, String> {
        let hook: ChangeHook = serde_json::from_slice(body).map_err(|e| format!("malformed change: {e}"))?;
        hook.validate()?;
        Ok(hook)
    }

    /// Check the fields: non-empty, branch a valid ref name, revision a hex sha or ref name.
    pub fn validate(&self) -> Result<(), String> {
        let repo = self.repo.trim();
        if repo.is_empty() {
            return Err("repo is empty".into());
        }
        if self.repo.len() > MAX_LEN || self.repo.chars().any(char::is_control) {
            return Err("repo is not a plausible name".into());
        }
        if !is_valid_ref_name(&self.branch) {
            return Err(format!("branch {:?} is not a valid branch name", self.branch));
        }
        if !is_hex_sha(&self.revision) && !is_valid_ref_name(&self.revision) {
            return Err(format!("revision {:?} is neither a commit id nor a ref name", self.revision));
        }
        Ok(())
    }
}

/// True if `s` is a (possibly abbreviated, ≥ 4 digits) hexadecimal commit id.
pub fn is_hex_sha(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// True if `s` is acceptable as a branch or ref name: a conservative subset of
/// `git check-ref-format` (no whitespace, control characters, `..`, `@{`, `~^:?*[\`, no leading
/// `-` or `/`, no trailing `/`, `.` or `.lock`), so it can be passed to git as an argument.
pub fn is_valid_ref_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LEN
        && !s.starts_with('-')
        && !s.starts_with('/')
        && !s.ends_with('/')
        && !s.ends_with('.')
        && !s.ends_with(".lock")
        && !s.contains("..")
        && !s.contains("@{")
        && !s.contains("//")
        && s != "@"
        && !s.chars().any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
        && s.split('/').all(|part| !part.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(repo: &str, branch: &str, revision: &str) -> ChangeHook {
        ChangeHook {
            repo: repo.into(),
            branch: branch.into(),
            revision: revision.into(),
            author: None,
            message: None,
            files: None,
        }
    }

    #[test]
    fn accepts_good_changes() {
        assert!(hook("django", "main", &"a".repeat(40)).validate().is_ok());
        assert!(hook("django", "stable/5.2.x", "v5.2.1").validate().is_ok());
        assert!(hook("django", "main", "abc1234").validate().is_ok());
    }

    #[test]
    fn rejects_bad_changes() {
        for (r, b, v) in [
            ("", "main", "abc1234"),
            ("  ", "main", "abc1234"),
            ("django", "", "abc1234"),
            ("django", "main", ""),
            ("django", "ma in", "abc1234"),
            ("django", "main", "abc 1234"),
            ("django", "-main", "abc1234"),
            ("django", "main", "--upload-pack=x"),
            ("django", "a..b", "abc1234"),
            ("django", "main", "HEAD~1"),
            ("django", "main\n", "abc1234"),
            ("django", "main", "x.lock"),
        ] {
            assert!(hook(r, b, v).validate().is_err(), "{r:?} {b:?} {v:?}");
        }
    }

    #[test]
    fn parses_with_extra_fields() {
        let h = ChangeHook::parse(
            br#"{"repo":"django","branch":"main","revision":"abc1234",
                 "author":"A <a@x>","files":["a.py"],"extra":1}"#,
        )
        .unwrap();
        assert_eq!(h.author.as_deref(), Some("A <a@x>"));
        assert_eq!(h.files, Some(vec!["a.py".to_string()]));
        assert!(ChangeHook::parse(b"{}").is_err());
        assert!(ChangeHook::parse(b"nope").is_err());
        assert!(ChangeHook::parse(br#"{"repo":1,"branch":"main","revision":"a"}"#).is_err());
    }
}

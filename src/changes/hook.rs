//! The generic change hook: `POST /api/changes` with `{"repo", "branch", "revision"}`.

use serde::Deserialize;

use super::refname;

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

/// Longest repository name we accept; longer is surely not a real one.
const MAX_LEN: usize = 1024;

impl ChangeHook {
    /// Parse and validate a hook body.
    pub fn parse(body: &[u8]) -> Result<ChangeHook, String> {
        let hook: ChangeHook = serde_json::from_slice(body).map_err(|e| format!("malformed change: {e}"))?;
        hook.validate()?;
        Ok(hook)
    }

    /// Check the fields: `repo` non-empty, `branch` a valid branch name and `revision` a hex
    /// object id or ref name (see [`super::refname`]).
    pub fn validate(&self) -> Result<(), String> {
        let repo = self.repo.trim();
        if repo.is_empty() {
            return Err("repo is empty".into());
        }
        if self.repo.len() > MAX_LEN || self.repo.chars().any(char::is_control) {
            return Err("repo is not a plausible name".into());
        }
        refname::check_branch("branch", &self.branch).map_err(|e| e.to_string())?;
        refname::check_revision("revision", &self.revision).map_err(|e| e.to_string())?;
        Ok(())
    }
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

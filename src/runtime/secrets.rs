//! Secrets for build steps: `{secret:NAME}` resolves from the secrets file, then the environment.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why the secrets file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read secrets file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("secrets file {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("secrets file {path} is not valid TOML (NAME = \"value\" lines): {message}")]
    Parse { path: PathBuf, message: String },
}

/// Secret values by name. Its `Debug` never shows a value.
#[derive(Clone, Default)]
pub struct Secrets {
    file: BTreeMap<String, String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("names", &self.file.keys().collect::<Vec<_>>()).finish()
    }
}

impl Secrets {
    /// Loads the secrets file, refusing one that group or others can read.
    pub fn load(path: Option<&Path>) -> Result<Secrets, SecretsError> {
        let Some(path) = path else {
            return Ok(Secrets::default());
        };
        let meta = std::fs::metadata(path).map_err(|source| SecretsError::Read { path: path.into(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions { path: path.into(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read { path: path.into(), source })?;
        // The parser's message may quote the offending line, which could hold a value: keep
        // only its position.
        let file: BTreeMap<String, String> = toml::from_str(&text).map_err(|e| SecretsError::Parse {
            path: path.into(),
            message: match e.span() {
                Some(span) => format!("error at byte {}", span.start),
                None => "syntax error".into(),
            },
        })?;
        Ok(Secrets { file })
    }

    /// The value of secret `name`: the secrets file first, then the environment.
    pub fn get(&self, name: &str) -> Option<String> {
        self.file.get(name).cloned().or_else(|| std::env::var(name).ok())
    }
}

/// The secret names referenced as `{secret:NAME}` in `text`, in order of appearance.
pub fn references(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{secret:") {
        let after = &rest[start + "{secret:".len()..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if !name.is_empty() && !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_references() {
        assert_eq!(references("a {secret:X} b {secret:Y_2} {secret:X} {secret:}"), vec!["X", "Y_2"]);
        assert!(references("no refs {secret:unterminated").is_empty());
    }

    #[test]
    fn refuses_world_readable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "TOKEN = \"hunter2\"\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Secrets::load(Some(&path)).expect_err("must refuse");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let secrets = Secrets::load(Some(&path)).expect("loads");
        assert_eq!(secrets.get("TOKEN").as_deref(), Some("hunter2"));
        assert!(!format!("{secrets:?}").contains("hunter2"));
    }
}

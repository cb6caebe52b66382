//! Accounts: who may do what. Roles, password hashing (argon2id) and the random secrets behind
//! sessions and API tokens. The store keeps only hashes of those secrets.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// What a user may do. Ordered: each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads builds, logs, changes, builders, pools and machines.
    Viewer,
    /// Also forces, rebuilds and cancels builds, and posts changes.
    Committer,
    /// Also sees costs and metrics, terminates machines, pauses and resumes pools.
    Admin,
}

impl Role {
    /// The name stored and shown (`viewer`, `committer`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Committer => "committer",
            Role::Admin => "admin",
        }
    }

    /// Reads a role name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "committer" => Some(Role::Committer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("user names are 1 to 64 letters, digits, '.', '_', '-' or '@'; got {0:?}")]
    BadName(String),
    #[error("unknown role {0:?}; expected viewer, committer or admin")]
    BadRole(String),
    #[error("the password must be at least {MIN_PASSWORD} characters")]
    ShortPassword,
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;

/// Checks a user name: short, printable, no spaces (it appears in logs and the UI).
pub fn check_name(name: &str) -> Result<(), AccountError> {
    // Dots alone (`.`, `..`) would read as path segments in the pages' URLs.
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        && !name.chars().all(|c| c == '.');
    if ok {
        Ok(())
    } else {
        Err(AccountError::BadName(name.to_string()))
    }
}

/// Hashes a password for storage: argon2id with a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(AccountError::ShortPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Whether `password` matches a stored PHC hash. A malformed hash matches nothing.
pub fn verify_password(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A hash that no password matches, verified against when the user does not exist, so a login
/// takes as long for an unknown name as for a wrong password.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut pw = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut pw);
        hash_password(&hex::encode(pw)).unwrap_or_default()
    })
}

/// Prefix of API tokens, so a leaked one is recognisable (and greppable by secret scanners).
pub const TOKEN_PREFIX: &str = "pdk_";

/// A new random secret: 32 bytes, hex; `prefix` in front.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// How the store keeps a session or token secret: SHA-256, hex. The secrets are random and
/// long, so a plain hash suffices (no salt, no stretching) and lookups stay one index probe.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two strings in time independent of where they differ (CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(Role::Viewer < Role::Committer && Role::Committer < Role::Admin);
        for r in [Role::Viewer, Role::Committer, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsf", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        assert!(!verify_password("", dummy_hash()));
        assert!(matches!(hash_password("short"), Err(AccountError::ShortPassword)));
    }

    #[test]
    fn names_and_secrets() {
        assert!(check_name("alice.b-c_d@example").is_ok());
        assert!(check_name("a.").is_ok() && check_name(".b").is_ok());
        for bad in ["", "a b", "<script>", &"x".repeat(65), ".", "..", "..."] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let t = new_secret(TOKEN_PREFIX);
        assert!(t.starts_with("pdk_") && t.len() == 68);
        assert_ne!(t, new_secret(TOKEN_PREFIX));
        assert_eq!(secret_hash(&t).len(), 64);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }
}

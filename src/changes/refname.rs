//! Branch names and revisions from outside (webhooks, the change API, force builds, a remote's
//! ref advertisement) checked before anything stores, logs or passes them to git.
//!
//! Branch names follow `git check-ref-format --branch`, plus two rules of ours: no C1 control
//! characters (git allows them; some log viewers read U+0085 as a line break) and at most
//! [`MAX_LEN`] bytes. A revision is a hex object id or a name valid by the same rules, so it can
//! never be read by git as an option (`--upload-pack=…`) or a range (`a..b`).

use std::fmt;

/// Longest branch name or revision accepted, in bytes (git has no limit; file systems do).
pub const MAX_LEN: usize = 255;

/// Which rule a name breaks; its `Display` is the reason shown to whoever sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The name is empty.
    Empty,
    /// Longer than [`MAX_LEN`] bytes.
    TooLong,
    /// Starts with `-` (git would read it as an option).
    LeadingDash,
    /// A control character (C0, DEL or C1), e.g. a newline.
    Control(char),
    /// A space or one of `~^:?*[\`.
    Forbidden(char),
    /// Contains `..`.
    DoubleDot,
    /// Contains `@{`.
    AtBrace,
    /// Is `@` alone.
    At,
    /// Is `HEAD` (a branch of that name would shadow the symbolic ref).
    Head,
    /// Starts or ends with `/`.
    EdgeSlash,
    /// Contains `//`.
    DoubleSlash,
    /// A `/`-separated component starts with `.`.
    DotComponent,
    /// A component ends with `.lock`.
    LockComponent,
    /// Ends with `.`.
    TrailingDot,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Empty => write!(f, "it is empty"),
            Rule::TooLong => write!(f, "it is longer than {MAX_LEN} bytes"),
            Rule::LeadingDash => write!(f, "it starts with `-`"),
            Rule::Control(c) => write!(f, "it contains the control character {}", c.escape_default()),
            Rule::Forbidden(' ') => write!(f, "it contains a space"),
            Rule::Forbidden(c) => write!(f, "it contains `{c}`"),
            Rule::DoubleDot => write!(f, "it contains `..`"),
            Rule::AtBrace => write!(f, "it contains `@{{`"),
            Rule::At => write!(f, "it is `@`"),
            Rule::Head => write!(f, "it is `HEAD`"),
            Rule::EdgeSlash => write!(f, "it starts or ends with `/`"),
            Rule::DoubleSlash => write!(f, "it contains `//`"),
            Rule::DotComponent => write!(f, "a `/`-separated part starts with `.`"),
            Rule::LockComponent => write!(f, "a `/`-separated part ends with `.lock`"),
            Rule::TrailingDot => write!(f, "it ends with `.`"),
        }
    }
}

/// A refused branch name or revision: which field, its value (escaped and shortened, so the
/// message never carries a raw control character) and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {shown} is not a valid {kind}: {rule}")]
pub struct RefError {
    /// The field the value came in (`branch`, `revision`, `ref`, …).
    pub field: &'static str,
    /// The value as shown: quoted, escaped, at most [`SHOWN_CHARS`] characters.
    pub shown: String,
    /// `branch name` or `revision`.
    pub kind: &'static str,
    /// The rule broken.
    pub rule: Rule,
}

/// At most this many characters of a refused value are shown in the error.
pub const SHOWN_CHARS: usize = 80;

/// `value` quoted with every control and non-printable character escaped, shortened to
/// [`SHOWN_CHARS`] characters: safe to put in a log line or an error message.
pub fn shown(value: &str) -> String {
    let mut cut: String = value.chars().take(SHOWN_CHARS).collect();
    if cut.len() < value.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// Checks a branch name (without `refs/heads/`) like `git check-ref-format --branch`, plus our
/// length cap and C1 rule; `field` names where it came from, for the error.
pub fn check_branch(field: &'static str, name: &str) -> Result<(), RefError> {
    let refuse = |rule| RefError { field, shown: shown(name), kind: "branch name", rule };
    if name == "HEAD" {
        return Err(refuse(Rule::Head));
    }
    ref_rule(name).map_or(Ok(()), |rule| Err(refuse(rule)))
}

/// Checks a revision: a hex object id of 4 to 64 digits, or a name valid by the branch rules
/// (a tag, a branch, `HEAD`); never anything starting with `-`.
pub fn check_revision(field: &'static str, rev: &str) -> Result<(), RefError> {
    if is_hex_id(rev) {
        return Ok(());
    }
    ref_rule(rev).map_or(Ok(()), |rule| Err(RefError { field, shown: shown(rev), kind: "revision", rule }))
}

/// Whether `s` is a (possibly abbreviated, at least 4 digits) hex object id, SHA-1 or SHA-256.
pub fn is_hex_id(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` is a full SHA-1 or SHA-256 object id, as git and GitHub print them.
pub fn is_full_hex_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The first rule of `check-ref-format` (for `refs/heads/<name>`) that `name` breaks, if any.
fn ref_rule(name: &str) -> Option<Rule> {
    if name.is_empty() {
        return Some(Rule::Empty);
    }
    if name.len() > MAX_LEN {
        return Some(Rule::TooLong);
    }
    if name.starts_with('-') {
        return Some(Rule::LeadingDash);
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Some(Rule::Control(c));
    }
    if let Some(c) = name.chars().find(|c| matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')) {
        return Some(Rule::Forbidden(c));
    }
    if name.contains("..") {
        return Some(Rule::DoubleDot);
    }
    if name.contains("@{") {
        return Some(Rule::AtBrace);
    }
    if name == "@" {
        return Some(Rule::At);
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Some(Rule::EdgeSlash);
    }
    if name.contains("//") {
        return Some(Rule::DoubleSlash);
    }
    for part in name.split('/') {
        if part.starts_with('.') {
            return Some(Rule::DotComponent);
        }
        if part.ends_with(".lock") {
            return Some(Rule::LockComponent);
        }
    }
    if name.ends_with('.') {
        return Some(Rule::TrailingDot);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names git refuses or accepts for reasons that are easy to get wrong.
    const TRICKY: &[&str] = &[
        "main",
        "stable/5.2.x",
        "feature/x-y_z",
        "v1.0",
        "a.b/c.d",
        "ünïcødé",
        "fix#12",
        "a@b",
        "@@",
        "a@{b",
        "a@{",
        "@{-1}",
        "{a}",
        "a{b}",
        "",
        "-x",
        "x-",
        "a-",
        "--upload-pack=touch /tmp/pwned",
        "a b",
        "a\tb",
        "a\nb",
        "main\n",
        "a\rb",
        "a\x1b[31mred",
        "a\x7fb",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[b",
        "a]b",
        "a\\b",
        "a..b",
        "..",
        ".",
        "a.",
        "a./b",
        "a/.b",
        ".a",
        "a/.",
        "a.lock",
        "a.lock/b",
        "a/b.lock",
        "a.lockx",
        ".lock",
        "lock",
        "a/",
        "/a",
        "a//b",
        "refs/heads/../../x",
        "../../x",
        "a/./b",
        "a/../b",
        "a...b",
        "a.b.",
        "!",
        "a%b",
        "a'b\"c",
        "a;rm -rf",
        "a$b",
        "a|b",
        "a,b",
        "a=b",
        "+a",
        "a+",
        "HEAD~1",
        "refs/tags/v1",
    ];

    /// git's verdict on `name` as a branch: `git check-ref-format --branch NAME`, outside any
    /// repository so `@{-1}` is not looked up.
    fn git_accepts_branch(name: &str, outside: &std::path::Path) -> bool {
        let out = std::process::Command::new("git")
            .args(["check-ref-format", "--branch", name])
            .current_dir(outside)
            .env("GIT_CEILING_DIRECTORIES", outside.parent().unwrap_or(outside))
            .env_remove("GIT_DIR")
            .output()
            .expect("git must be installed to run these tests (apt-get install git)");
        out.status.success()
    }

    #[test]
    fn branch_names_get_gits_own_verdict() {
        let outside = tempfile::tempdir().expect("tempdir");
        let disagree: Vec<String> = TRICKY
            .iter()
            .filter_map(|name| {
                let git = git_accepts_branch(name, outside.path());
                let ours = check_branch("branch", name);
                (ours.is_ok() != git).then(|| format!("{name:?}: git accepts: {git}, we say {ours:?}"))
            })
            .collect();
        assert!(disagree.is_empty(), "{disagree:#?}");
    }

    #[test]
    fn stricter_than_git_where_it_matters() {
        let outside = tempfile::tempdir().expect("tempdir");
        // git takes these; we do not (a NEL can break a log line; names past 255 bytes are
        // not real branch names; `@` is HEAD inside a repository; `HEAD` depends on git's
        // version).
        let long = "a".repeat(MAX_LEN + 1);
        for name in ["a\u{85}b", "a\u{9b}31mb", long.as_str(), "@"] {
            assert!(git_accepts_branch(name, outside.path()), "{name:?}");
            assert!(check_branch("branch", name).is_err(), "{name:?}");
        }
        assert!(check_branch("branch", &"a".repeat(MAX_LEN)).is_ok());
        assert_eq!(check_branch("branch", "HEAD").map_err(|e| e.rule), Err(Rule::Head));
    }

    #[test]
    fn revisions_are_ids_or_names_never_options() {
        for ok in ["abcd", "0123456789abcdef0123456789abcdef01234567", &"f".repeat(64), "v5.2.1", "main", "HEAD"] {
            assert!(check_revision("revision", ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "--upload-pack=touch /tmp/pwned", "-x", "HEAD~1", "a..b", "main\n", "a b", "@", "x.lock"] {
            assert!(check_revision("revision", bad).is_err(), "{bad:?}");
        }
        // Not hex and not a valid name either.
        assert!(check_revision("revision", &"g".repeat(300)).is_err());
    }

    #[test]
    fn errors_name_the_field_and_rule_and_never_carry_raw_control_characters() {
        let e = check_branch("branch", "main\nINFO forged line\x1b[0m").expect_err("refused");
        let text = e.to_string();
        assert!(text.starts_with("branch \"main\\nINFO forged line\\u{1b}[0m\""), "{text}");
        assert!(text.contains("control character \\n"), "{text}");
        assert!(!text.chars().any(char::is_control), "{text:?}");
        let e = check_revision("revision", "--upload-pack=touch /tmp/pwned").expect_err("refused");
        assert_eq!(
            e.to_string(),
            "revision \"--upload-pack=touch /tmp/pwned\" is not a valid revision: it starts with `-`"
        );
        let e = check_branch("ref", &"x".repeat(1000)).expect_err("refused");
        assert!(e.to_string().len() < 200, "a long value is shortened: {e}");
    }
}

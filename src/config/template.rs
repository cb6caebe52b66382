//! `{axis}` placeholders: finding, checking and substituting them.
//!
//! A placeholder is `{name}` where `name` looks like an identifier. Everything else with braces
//! is left alone on purpose so shell syntax keeps working: `${HOME}` (shell parameter),
//! `{a,b}` and `{1..3}` (brace expansion), `{ cmd; }` (command group). `{secret:NAME}` is
//! resolved later, at build time, and is never touched here.

use std::collections::BTreeMap;
use std::ops::Range;

use super::error::Diag;
use super::tree::{closest, Sp};

/// The placeholders a message template may use.
pub const FIELDS: &[&str] = &[
    "event",
    "id",
    "builder",
    "repo",
    "branch",
    "revision",
    "short_revision",
    "result",
    "previous",
    "committer",
    "committers",
    "reason",
    "failing_step",
    "log_tail",
    "url",
];

/// True for names usable as a matrix axis and as a placeholder.
pub(crate) fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Axis placeholders in `s`: (byte range of `{name}`, name). Secrets and shell braces excluded.
fn placeholders(s: &str) -> Vec<(Range<usize>, &str)> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'{' && (i == 0 || bytes[i - 1] != b'$') {
            if let Some(len) = s[i + 1..].find('}') {
                let inner = &s[i + 1..i + 1 + len];
                let is_secret = inner.strip_prefix("secret:").is_some_and(|n| !n.is_empty());
                if !is_secret && is_ident(inner) {
                    out.push((i..i + len + 2, inner));
                    i += len + 2;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

/// Check that every placeholder in `s` names one of `axes`; `src` is the file text, used to
/// point at the placeholder itself rather than the start of the string.
pub(crate) fn check(s: &Sp<String>, axes: &[&str], src: &str) -> Result<(), Diag> {
    for (range, name) in placeholders(&s.v) {
        if axes.contains(&name) {
            continue;
        }
        let span = precise_span(s, &range, src);
        let mut hint = String::new();
        if let Some(best) = closest(name, axes) {
            hint.push_str(&format!("did you mean `{{{best}}}`? "));
        }
        if axes.is_empty() {
            hint.push_str("this builder has no matrix");
        } else {
            hint.push_str(&format!("matrix axes here: {}", axes.join(", ")));
        }
        hint.push_str("; secrets are written {secret:NAME}");
        return Err(Diag::new(span, format!("unknown placeholder `{{{name}}}`: it is not a matrix axis")).hint(hint));
    }
    Ok(())
}

/// Check that every placeholder in a message template names one of `fields`.
pub(crate) fn check_fields(s: &Sp<String>, fields: &[&str], src: &str) -> Result<(), Diag> {
    for (range, name) in placeholders(&s.v) {
        if fields.contains(&name) {
            continue;
        }
        let span = precise_span(s, &range, src);
        let mut hint = String::new();
        if let Some(best) = closest(name, fields) {
            hint.push_str(&format!("did you mean `{{{best}}}`? "));
        }
        let all: Vec<String> = fields.iter().map(|f| format!("{{{f}}}")).collect();
        hint.push_str(&format!("a template may use: {}", all.join(" ")));
        return Err(Diag::new(span, format!("unknown placeholder `{{{name}}}` in the template")).hint(hint));
    }
    Ok(())
}

/// Point inside the string literal when it has no escapes (the common case), else at its start.
fn precise_span(s: &Sp<String>, inner: &Range<usize>, src: &str) -> Range<usize> {
    let literal = src.get(s.span.clone()).unwrap_or("");
    for quote in ["\"\"\"", "'''", "\"", "'"] {
        if literal.len() >= 2 * quote.len()
            && literal.starts_with(quote)
            && literal.ends_with(quote)
            && &literal[quote.len()..literal.len() - quote.len()] == s.v.as_str()
        {
            let start = s.span.start + quote.len();
            return start + inner.start..start + inner.end;
        }
    }
    s.span.clone()
}

/// Replace every axis placeholder with its value in `cell`; unknown ones stay as written.
pub fn substitute(s: &str, cell: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (range, name) in placeholders(s) {
        if let Some(value) = cell.get(name) {
            out.push_str(&s[last..range.start]);
            out.push_str(value);
            last = range.end;
        }
    }
    out.push_str(&s[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_axis_placeholders() {
        let s = "a {x} ${HOME} {secret:T} {a,b} {1..3} { echo; } {y_2}";
        let names: Vec<&str> = placeholders(s).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["x", "y_2"]);
    }

    #[test]
    fn substitutes() {
        let cell = BTreeMap::from([("x".to_string(), "1".to_string())]);
        assert_eq!(substitute("a{x}b{x}{secret:x}", &cell), "a1b1{secret:x}");
        assert_eq!(substitute("é{x}é", &cell), "é1é");
    }
}

//! Configuration errors that point at `file:line:column`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A configuration error located in the file, rendered as `file:line:col: error: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file the error is in.
    pub file: PathBuf,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when we can tell.
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: error: {}", self.file.display(), self.line, self.column, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// An error before it is located: a byte span in the source plus the message.
///
/// Kept separate from `ConfigError` so the parsing code never has to carry the file name and
/// text around; errors are located once, at the end.
#[derive(Debug, Clone)]
pub(crate) struct Diag {
    pub span: Range<usize>,
    pub message: String,
    pub hint: Option<String>,
}

impl Diag {
    /// An error at `span` without a hint.
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        Diag { span, message: message.into(), hint: None }
    }

    /// Attach a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The same error `by` bytes later in the text.
    pub fn shift(mut self, by: usize) -> Self {
        self.span = self.span.start + by..self.span.end + by;
        self
    }

    /// Locate the error in `text` (the contents of `file`).
    pub fn locate(self, file: &Path, text: &str) -> ConfigError {
        let (line, column) = line_col(text, self.span.start);
        ConfigError { file: file.to_path_buf(), line, column, message: self.message, hint: self.hint }
    }
}

/// The earliest error in file order, so users fix problems top to bottom.
pub(crate) fn earliest(mut diags: Vec<Diag>) -> Option<Diag> {
    diags.sort_by_key(|d| d.span.start);
    diags.into_iter().next()
}

/// 1-based line and character column of byte `offset` in `text` (clamped, never panics).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "ab\ncdé\nx";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 5), (2, 3));
        assert_eq!(line_col(t, 8), (3, 1));
        assert_eq!(line_col(t, 999), (3, 2));
    }

    #[test]
    fn display_has_hint_on_second_line() {
        let e = Diag::new(0..1, "bad").hint("fix it").locate(Path::new("p.toml"), "x");
        assert_eq!(e.to_string(), "p.toml:1:1: error: bad\n  hint: fix it");
    }
}

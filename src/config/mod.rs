//! Configuration: the TOML model, matrix expansion and validation with file:line:column errors.

mod duration;
mod error;
mod model;
mod overrides;
mod parse;
mod render;
mod specs;
pub mod template;
mod tree;

use std::path::Path;

pub use duration::parse_duration;
pub use error::ConfigError;
pub use model::*;
pub use overrides::{parse_with, OVERRIDE_FILE};
pub use render::render_builders;

/// Read, validate and expand the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    match std::fs::read_to_string(path) {
        // Relative paths inside resolve against an absolute folder, so that the state
        // directory (and the machine keys derived from it) never depends on the current
        // directory; errors still name the file as the user gave it.
        Ok(text) => parse(&text, &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())).map_err(|mut e| {
            e.file = path.to_path_buf();
            e
        }),
        Err(e) => Err(ConfigError {
            file: path.to_path_buf(),
            line: 1,
            column: 1,
            message: format!("cannot read the configuration file: {e}"),
            hint: Some("pass the path of an existing TOML file, e.g. paddock check-config paddock.toml".into()),
        }),
    }
}

/// Read the configuration file at `path` with `--set` overrides applied (see [`parse_with`]).
pub fn load_with(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
        message: format!("cannot read the configuration file: {e}"),
        hint: None,
    })?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    parse_with(&text, &abs, overrides).map_err(|mut e| {
        if e.file == abs {
            e.file = path.to_path_buf();
        }
        e
    })
}

/// Validate and expand configuration `text`; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse::parse_config(text, path).map_err(|d| d.locate(path, text))
}

/// The address in `Name <address>` or a bare address, if it looks like one.
pub fn address_of(s: &str) -> Option<String> {
    let addr = match s.rsplit_once('<') {
        Some((_, rest)) => rest.strip_suffix('>')?,
        None => s,
    }
    .trim();
    let (user, domain) = addr.split_once('@')?;
    let ok = !user.is_empty()
        && !domain.is_empty()
        && !domain.starts_with('.')
        && !addr.contains(char::is_whitespace)
        && !domain.contains('@');
    ok.then(|| addr.to_string())
}

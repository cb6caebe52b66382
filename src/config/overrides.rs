//! `--set KEY.PATH=VALUE`: one setting of the config changed from the command line, checked by
//! the same parser as the file, with errors that name the override.

use std::path::Path;

use super::error::{ConfigError, Diag};
use super::parse::parse_root;
use super::tree::{parse_tree, Entry, Kind};

/// Where an override's errors say they are (instead of the file).
pub const OVERRIDE_FILE: &str = "--set";

/// Validate and expand `text` (read from `path`) with each `KEY.PATH=VALUE` of `overrides`
/// replacing (or adding) that setting. A VALUE that is not TOML is taken as a string, so
/// `pool.small.idle_timeout=5m` works unquoted.
pub fn parse_with(text: &str, path: &Path, overrides: &[String]) -> Result<super::Config, ConfigError> {
    let located = |d: Diag, all: &str| locate(d, path, text, all);
    let mut root = parse_tree(text).map_err(|d| d.locate(path, text))?;
    // Every override is one line after the file's text, so its spans point into that line.
    let mut all = text.to_string();
    for (i, o) in overrides.iter().enumerate() {
        let line = override_line(o).map_err(|message| ConfigError {
            file: OVERRIDE_FILE.into(),
            line: i + 1,
            column: 1,
            message: format!("{o:?}: {message}"),
            hint: Some("write KEY.PATH=VALUE, e.g. --set pool.small.idle_timeout=5m".into()),
        })?;
        let offset = all.len() + 1;
        all.push('\n');
        all.push_str(&line);
        let tree = parse_tree(&line).map_err(|d| located(d.shift(offset), &all))?;
        let tree: Vec<Entry> = tree.into_iter().map(|e| e.shifted(offset)).collect();
        merge(&mut root, tree, o).map_err(|message| ConfigError {
            file: OVERRIDE_FILE.into(),
            line: i + 1,
            column: 1,
            message,
            hint: None,
        })?;
    }
    parse_root(&root, &all, path).map_err(|d| located(d, &all))
}

/// `a.b.c=VALUE` as a TOML line `a.b.c = VALUE` (VALUE quoted when it is not TOML already).
fn override_line(o: &str) -> Result<String, String> {
    let (key, value) = o.split_once('=').ok_or("no `=` in it")?;
    let key = key.trim();
    if key.split('.').count() < 2 || key.split('.').any(|k| k.trim().is_empty()) {
        return Err("the key must be a dotted path to a setting, e.g. pool.NAME.KEY".into());
    }
    let value = value.trim();
    let quoted = if value.parse::<toml_edit::Value>().is_ok() {
        value.to_string()
    } else {
        toml_edit::Value::from(value).to_string().trim().to_string()
    };
    Ok(format!("{key} = {quoted}"))
}

/// Puts the override's leaf into `base`; the tables on its way must exist already.
fn merge(base: &mut Vec<Entry>, over: Vec<Entry>, what: &str) -> Result<(), String> {
    for e in over {
        let Some(slot) = base.iter_mut().find(|b| b.key == e.key) else {
            if matches!(e.value.kind, Kind::Table(_)) {
                return Err(format!("{what:?}: the config has no table `{}` to change", e.key));
            }
            base.push(e);
            continue;
        };
        match (&mut slot.value.kind, e.value.kind) {
            (Kind::Table(inner), Kind::Table(more)) => merge(inner, more, what)?,
            (Kind::Table(_), _) => {
                return Err(format!("{what:?}: `{}` is a table of settings, not one setting", e.key));
            }
            (Kind::Array(_), Kind::Table(_)) => {
                return Err(format!(
                    "{what:?}: `{}` is a list of tables; only settings of named tables (pool.NAME.KEY, master.KEY, …) can be set",
                    e.key
                ));
            }
            (_, kind) => {
                slot.value.kind = kind;
                slot.value.span = e.value.span;
            }
        }
    }
    Ok(())
}

/// An error in the file is located there; one in an override names the override.
fn locate(d: Diag, path: &Path, text: &str, all: &str) -> ConfigError {
    if d.span.start <= text.len() {
        return d.locate(path, text);
    }
    let mut e = d.locate(Path::new(OVERRIDE_FILE), all);
    e.line -= text.matches('\n').count() + 1;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[pool.small]\nmax_instances = 2\n";

    fn parse(overrides: &[&str]) -> Result<super::super::Config, ConfigError> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_with(BASE, Path::new("/x/paddock.toml"), &o)
    }

    #[test]
    fn an_override_replaces_or_adds_a_setting() {
        let c = parse(&["pool.small.max_instances=5", "pool.small.idle_timeout=90s"]).expect("valid");
        assert_eq!(c.pools[0].max_instances, 5);
        assert_eq!(c.pools[0].idle_timeout, std::time::Duration::from_secs(90));
        let c = parse(&["pool.small.idle_timeout=\"2m\""]).expect("quoted too");
        assert_eq!(c.pools[0].idle_timeout, std::time::Duration::from_secs(120));
    }

    #[test]
    fn a_bad_override_says_which_and_what() {
        let e = parse(&["pool.small.max_instances=0"]).expect_err("zero");
        assert_eq!(e.file, Path::new(OVERRIDE_FILE));
        assert_eq!(e.line, 1);
        assert!(e.message.contains("`max_instances` must be at least 1"), "{e}");
        let e = parse(&["pool.small.max_instances=3", "pool.small.colour=2"]).expect_err("unknown key");
        assert_eq!((e.file.as_path(), e.line), (Path::new(OVERRIDE_FILE), 2), "{e}");
        assert!(e.message.contains("colour"), "{e}");
        let e = parse(&["pool.big.max_instances=3"]).expect_err("no such pool");
        assert!(e.message.contains("no table `big`"), "{e}");
        let e = parse(&["max_instances"]).expect_err("no value");
        assert!(e.message.contains("no `=`"), "{e}");
        // The file's own errors still point into the file.
        let o = vec!["pool.small.max_instances=3".to_string()];
        let e = parse_with("[pool.small]\nmin_idle = 9\n", Path::new("p.toml"), &o).expect_err("min_idle");
        assert_eq!((e.file.as_path(), e.line), (Path::new("p.toml"), 2), "{e}");
    }
}

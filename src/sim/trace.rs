//! Commit histories to replay: a CSV file, a local git repository's first-parent history, or
//! the installation's own stored changes.

use std::path::Path;

use crate::core::Ts;

/// One pushed commit.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceChange {
    /// When it was pushed (or committed).
    pub at: Ts,
    /// The branch it landed on.
    pub branch: String,
    /// Its commit id.
    pub sha: String,
    /// The files it touched.
    pub files: Files,
}

/// The files a change touched: their paths, or only how many there were.
#[derive(Debug, Clone, PartialEq)]
pub enum Files {
    /// Paths (empty: unknown, which every file filter lets through).
    Listed(Vec<String>),
    /// Only the count: file filters treat them as matching nothing.
    Count(u32),
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read the trace {file}")]
    Read {
        /// The trace file.
        file: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `unix_time,branch,sha,files`.
    #[error("{file}:{line}: {message}")]
    Line {
        /// The trace file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// git failed or is missing.
    #[error("git: {0}")]
    Git(String),
    /// The database could not be read.
    #[error("the config's database: {0}")]
    Store(String),
}

/// The CSV header a trace starts with.
pub const HEADER: &str = "unix_time,branch,sha,files";

/// Parses a CSV trace (`unix_time,branch,sha,files`, files `;`-separated or a count), sorted
/// by time (stable: lines of one second keep their order).
pub fn parse_csv(text: &str, file: &str) -> Result<Vec<TraceChange>, TraceError> {
    let err = |line: usize, message: String| TraceError::Line { file: file.to_string(), line, message };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim().trim_start_matches('\u{feff}') == HEADER => {}
        Some((_, h)) => return Err(err(1, format!("the header must be `{HEADER}`, not `{}`", h.trim()))),
        None => return Err(err(1, format!("empty file: a trace starts with the header `{HEADER}`"))),
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_csv(line).map_err(|m| err(n, m))?;
        let [time, branch, sha, files] = fields.as_slice() else {
            return Err(err(n, format!("expected 4 fields (unix_time,branch,sha,files), found {}", fields.len())));
        };
        let files = files.trim();
        let secs: i64 =
            time.trim().parse().map_err(|_| err(n, format!("unix_time {time:?} is not a number of seconds")))?;
        if !(0..=LAST_SECOND).contains(&secs) {
            return Err(err(n, format!("unix_time {secs} is not between 1970 and the end of 9999")));
        }
        let at = Ts(secs * 1000);
        let branch = branch.trim();
        if branch.is_empty() {
            return Err(err(n, "the branch is empty".into()));
        }
        let files = if !files.is_empty() && files.bytes().all(|b| b.is_ascii_digit()) {
            Files::Count(files.parse().map_err(|_| err(n, format!("file count {files} is too large")))?)
        } else {
            Files::Listed(files.split(';').map(str::trim).filter(|f| !f.is_empty()).map(str::to_string).collect())
        };
        out.push(TraceChange { at, branch: branch.to_string(), sha: sha.trim().to_string(), files });
    }
    out.sort_by_key(|c| c.at);
    Ok(out)
}

/// Reads a CSV trace file.
pub fn read_csv(path: &Path) -> Result<Vec<TraceChange>, TraceError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read { file: file.clone(), source })?;
    parse_csv(&text, &file)
}

/// The last second a trace may name (9999-12-31T23:59:59Z): later times would overflow the
/// clock's milliseconds somewhere in a year-long simulation.
pub const LAST_SECOND: i64 = 253_402_300_799;

/// One CSV line's fields (RFC 4180: a field in double quotes may hold commas, and `""` is a
/// quote inside it).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(format!("field {} opens a quote it never closes", fields.len() + 1)),
                }
            }
            match chars.peek() {
                None | Some(',') => {}
                Some(_) => return Err(format!("field {} has text after its closing quote", fields.len() + 1)),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                field.push(c);
                chars.next();
            }
        }
        fields.push(field);
        match chars.next() {
            Some(',') => continue,
            _ => return Ok(fields),
        }
    }
}

/// The first-parent history of every local branch of `repo` that matches `branches` (all
/// branches when empty), commit times as push times, within `since`/`until` (git's date
/// syntax). A commit on several branches (the history a release branch shares with main) is
/// one change, on the first branch that has it in `branches`' order: a new branch's old
/// history is not built again, as the master does not build it.
pub fn read_git(
    repo: &Path,
    branches: &[String],
    since: Option<&str>,
    until: Option<&str>,
) -> Result<Vec<TraceChange>, TraceError> {
    let heads = git(repo, &["for-each-ref", "--format=%(refname:short)", "refs/heads"])?;
    let heads: Vec<&str> = heads.lines().map(str::trim).filter(|b| !b.is_empty()).collect();
    let mut ordered: Vec<&str> = Vec::new();
    if branches.is_empty() {
        ordered = heads.clone();
    }
    for pattern in branches {
        for h in &heads {
            if !ordered.contains(h) && crate::changes::git::branch_matches(std::slice::from_ref(pattern), h) {
                ordered.push(h);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for branch in ordered {
        let mut args = vec!["log", "--first-parent", "--no-renames", "--format=%x00%ct %H", "--name-only"];
        let since = since.map(|s| format!("--since={s}"));
        let until = until.map(|u| format!("--until={u}"));
        args.extend(since.as_deref());
        args.extend(until.as_deref());
        args.push(branch);
        args.push("--");
        let log = git(repo, &args)?;
        for record in log.split('\0').filter(|r| !r.trim().is_empty()) {
            let mut lines = record.lines();
            let head = lines.next().unwrap_or("");
            let Some((time, sha)) = head.split_once(' ') else { continue };
            let Ok(secs) = time.parse::<i64>() else { continue };
            if !(0..=LAST_SECOND).contains(&secs) {
                return Err(TraceError::Git(format!(
                    "commit {} has the time {secs}, not between 1970 and 9999",
                    sha.trim()
                )));
            }
            if !seen.insert(sha.trim().to_string()) {
                continue;
            }
            let files = lines.map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
            out.push(TraceChange {
                at: Ts(secs.saturating_mul(1000)),
                branch: branch.to_string(),
                sha: sha.trim().to_string(),
                files: Files::Listed(files),
            });
        }
    }
    // Oldest first; one instant's commits in a stable order.
    out.sort_by(|a, b| (a.at, &a.branch, &a.sha).cmp(&(b.at, &b.branch, &b.sha)));
    Ok(out)
}

/// The installation's own changes of `repo`, oldest first, at the times the master recorded
/// them (a push's time as the master saw it).
pub async fn from_store(store: &crate::store::Store, repo: &str) -> Result<Vec<TraceChange>, TraceError> {
    let rows = store.list_changes(Some(repo), None, i64::MAX).await.map_err(|e| TraceError::Store(e.to_string()))?;
    let mut out: Vec<TraceChange> = rows
        .into_iter()
        .rev()
        .filter_map(|c| {
            Some(TraceChange {
                at: crate::cost::parse_ts(&c.created_at)?,
                branch: c.branch,
                sha: c.revision,
                files: Files::Listed(c.files),
            })
        })
        .collect();
    out.sort_by_key(|c| c.at);
    Ok(out)
}

/// How long the machines in the store took from launch to their agent's connection.
pub async fn boot_times(store: &crate::store::Store) -> Result<Vec<std::time::Duration>, TraceError> {
    let rows = store.list_machines(None, None).await.map_err(|e| TraceError::Store(e.to_string()))?;
    Ok(rows
        .iter()
        .filter_map(|m| {
            let from = crate::cost::parse_ts(m.launched_at.as_deref()?)?;
            let to = crate::cost::parse_ts(m.connected_at.as_deref()?)?;
            Some(to.since(from))
        })
        .collect())
}

/// Per builder, how long its finished builds ran (start to end).
pub async fn build_durations(
    store: &crate::store::Store,
) -> Result<std::collections::HashMap<String, Vec<std::time::Duration>>, TraceError> {
    let filter = crate::store::BuildFilter { limit: Some(i64::MAX), ..Default::default() };
    let rows = store.list_builds(&filter).await.map_err(|e| TraceError::Store(e.to_string()))?;
    let mut out: std::collections::HashMap<String, Vec<std::time::Duration>> = Default::default();
    for b in rows.iter().filter(|b| matches!(b.state.as_str(), "success" | "failure")) {
        let (Some(s), Some(f)) = (b.started_at.as_deref(), b.finished_at.as_deref()) else { continue };
        if let (Some(s), Some(f)) = (crate::cost::parse_ts(s), crate::cost::parse_ts(f)) {
            out.entry(b.builder.clone()).or_default().push(f.since(s));
        }
    }
    // Oldest first, so a seed draws the same from the same history.
    for v in out.values_mut() {
        v.reverse();
    }
    Ok(out)
}

fn git(repo: &Path, args: &[&str]) -> Result<String, TraceError> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| TraceError::Git(format!("cannot run git ({e}); install it (apt-get install git)")))?;
    if !out.status.success() {
        return Err(TraceError::Git(format!(
            "git {} in {}: {}",
            args.first().unwrap_or(&""),
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_trace_parses_paths_counts_and_sorts_by_time() {
        let t = parse_csv("unix_time,branch,sha,files\n20,main,b,3\n10,\"8.0.x\",a,src/x.py;doc/a.md\n\n", "t.csv")
            .expect("valid");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].branch, "8.0.x");
        assert_eq!(t[0].files, Files::Listed(vec!["src/x.py".into(), "doc/a.md".into()]));
        assert_eq!(t[1].files, Files::Count(3));
        assert_eq!(t[1].at, Ts(20_000));
    }

    #[test]
    fn quoted_fields_may_hold_commas_and_quotes() {
        let t = parse_csv("unix_time,branch,sha,files\n10,\"ma\"\"in\",\"abc,def\",\"doc/a,b.md;x\"\n", "t.csv")
            .expect("valid");
        assert_eq!((t[0].branch.as_str(), t[0].sha.as_str()), ("ma\"in", "abc,def"));
        assert_eq!(t[0].files, Files::Listed(vec!["doc/a,b.md".into(), "x".into()]));
        for (line, want) in [
            ("10,main,\"abc,x", "t.csv:2: field 3 opens a quote it never closes"),
            ("10,main,\"abc\"d,x", "t.csv:2: field 3 has text after its closing quote"),
            ("10,main,aaa,x,extra", "t.csv:2: expected 4 fields (unix_time,branch,sha,files), found 5"),
            ("10,main,aaa", "t.csv:2: expected 4 fields (unix_time,branch,sha,files), found 3"),
            (
                "9223372036854775,main,a,x",
                "t.csv:2: unix_time 9223372036854775 is not between 1970 and the end of 9999",
            ),
            ("-1,main,a,x", "t.csv:2: unix_time -1 is not between 1970 and the end of 9999"),
        ] {
            let e = parse_csv(&format!("unix_time,branch,sha,files\n{line}\n"), "t.csv").expect_err(line);
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn a_bad_csv_line_says_where() {
        let e = parse_csv("unix_time,branch,sha,files\n10,main,a,x\nsoon,main,b,y\n", "t.csv").expect_err("bad time");
        assert_eq!(e.to_string(), "t.csv:3: unix_time \"soon\" is not a number of seconds");
        let e = parse_csv("time,branch\n", "t.csv").expect_err("bad header");
        assert!(e.to_string().starts_with("t.csv:1: the header must be"), "{e}");
        let e = parse_csv("unix_time,branch,sha,files\n10,main\n", "t.csv").expect_err("short");
        assert!(e.to_string().contains("t.csv:2: expected 4 fields"), "{e}");
    }
}

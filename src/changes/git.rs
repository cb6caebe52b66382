//! Git through the `git` command line, in a bare mirror owned by the master.
//!
//! Every call is `Command::new("git").args(..)`: no shell ever sees a URL, branch or revision.
//! Output is requested in NUL-separated formats so that commit messages containing any
//! characters (newlines, `|`, unicode, control characters) parse unambiguously.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use globset::{GlobBuilder, GlobSetBuilder};
use serde::Serialize;
use tokio::process::Command;

use super::refname::{self, RefError};

/// How long `git ls-remote` may take before we give up (a remote that hangs must not stall polls).
pub const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long any other git command may take; generous because a first fetch clones everything.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(3600);
/// At most this much of git's stderr is kept in an error, so a chatty failure stays loggable.
const MAX_STDERR: usize = 4000;

/// One commit, as a change source sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommitInfo {
    /// Full commit id (hex).
    pub revision: String,
    /// `Name <email>`.
    pub author: String,
    /// Committer date, in UTC.
    pub committed_at: DateTime<Utc>,
    /// Full commit message, trailing newlines removed.
    pub message: String,
    /// Paths touched (vs the first parent for merges; everything for a root commit).
    pub files: Vec<String>,
}

/// A git command that could not run, failed, timed out or printed something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The `git` executable could not be started.
    #[error("`{command}` could not start: {source}")]
    Spawn {
        /// The command line (credentials in URLs redacted).
        command: String,
        /// Why the process could not be spawned.
        #[source]
        source: std::io::Error,
    },
    /// git exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line (credentials in URLs redacted).
        command: String,
        /// Exit status, as printed by the OS.
        status: String,
        /// git's stderr, trimmed (credentials in URLs redacted).
        stderr: String,
    },
    /// git ran longer than allowed and was killed.
    #[error("`{command}` timed out after {secs}s")]
    Timeout {
        /// The command line (credentials in URLs redacted).
        command: String,
        /// The limit that was exceeded.
        secs: u64,
    },
    /// git succeeded but its output did not have the expected shape.
    #[error("`{command}`: unexpected output: {reason}")]
    Parse {
        /// The command line (credentials in URLs redacted).
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// An argument was refused before running git (e.g. it would be read as an option).
    #[error("invalid {what}: {value:?}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Its value (credentials in URLs redacted).
        value: String,
    },
    /// A branch name git's own rules refuse (see [`refname`]).
    #[error(transparent)]
    BadRef(#[from] RefError),
}

/// Replace the user-info part of URLs (`https://user:token@host/..`) so errors and logs never
/// show credentials.
fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote.
        let end = tail.find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"').unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Refuse values git would parse as options (a URL or ref starting with `-`).
fn check_arg(what: &'static str, value: &str) -> Result<(), GitError> {
    if value.is_empty() || value.starts_with('-') || value.contains('\0') {
        return Err(GitError::InvalidArgument { what, value: redact(value) });
    }
    Ok(())
}

/// Run git with `args`; return stdout on success. `ok_codes` lists extra exit codes that count
/// as success (their code is returned too), for commands like `merge-base --is-ancestor`.
async fn run_git_status(args: &[OsString], timeout: Duration, ok_codes: &[i32]) -> Result<(i32, Vec<u8>), GitError> {
    let command = redact(&format!("git {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")));
    let mut cmd = Command::new("git");
    cmd.args(args)
        // A bad URL or missing credentials must fail, not wait for a human at a terminal.
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("SSH_ASKPASS", "")
        // Keep git's messages in a stable language for logs.
        .env("LC_ALL", "C")
        // A master started from inside a git hook must not operate on that hook's repository.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .env_remove("GIT_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the future on timeout must not leave git running.
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| GitError::Spawn { command: command.clone(), source })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => return Err(GitError::Spawn { command, source }),
        Err(_) => return Err(GitError::Timeout { command, secs: timeout.as_secs() }),
    };
    let code = output.status.code();
    if output.status.success() {
        return Ok((0, output.stdout));
    }
    if let Some(c) = code {
        if ok_codes.contains(&c) {
            return Ok((c, output.stdout));
        }
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push('…');
    }
    Err(GitError::Failed { command, status: output.status.to_string(), stderr: redact(&stderr) })
}

/// Run git and return stdout, failing on any non-zero exit.
async fn run_git(args: &[OsString], timeout: Duration) -> Result<Vec<u8>, GitError> {
    run_git_status(args, timeout, &[]).await.map(|(_, out)| out)
}

/// Build an argument vector from string-ish pieces.
fn argv<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    items.into_iter().map(|s| s.as_ref().to_owned()).collect()
}

/// Current branch heads of a remote: `refs/heads/<branch>` → commit id.
pub async fn ls_remote(url: &str) -> Result<BTreeMap<String, String>, GitError> {
    check_arg("repository URL", url)?;
    let args = argv(["ls-remote", "--heads", "--", url]);
    let out = run_git(&args, LS_REMOTE_TIMEOUT).await?;
    let text = String::from_utf8_lossy(&out);
    let mut heads = BTreeMap::new();
    for line in text.lines() {
        let Some((sha, name)) = line.split_once('\t') else {
            continue;
        };
        // Only plain branches; `--heads` already filters, this guards against odd servers.
        // A null id is what git advertises for a ref it cannot read (a broken loose ref): not
        // a head anyone can fetch.
        if let Some(branch) = name.strip_prefix("refs/heads/") {
            if is_hex_sha(sha) && !sha.bytes().all(|b| b == b'0') {
                heads.insert(branch.to_string(), sha.to_string());
            }
        }
    }
    Ok(heads)
}

/// True if `s` looks like a full SHA-1 or SHA-256 object id.
fn is_hex_sha(s: &str) -> bool {
    refname::is_full_hex_id(s)
}

/// True if any of `patterns` matches `branch`; `*` does not cross `/` (`stable/*` matches
/// `stable/5.2.x`, `*` matches `main` but not `feature/x`). Invalid patterns match nothing.
pub fn branch_matches(patterns: &[String], branch: &str) -> bool {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        // An exact name always matches itself, even if it contains glob metacharacters.
        if p == branch {
            return true;
        }
        if let Ok(glob) = GlobBuilder::new(p).literal_separator(true).build() {
            builder.add(glob);
        }
    }
    builder.build().map(|set| set.is_match(branch)).unwrap_or(false)
}

/// A bare mirror of one remote repository, in a directory the master owns.
#[derive(Debug)]
pub struct Mirror {
    dir: PathBuf,
    url: String,
    /// Serialises fetches: two concurrent fetches into one repository fight over ref locks.
    lock: tokio::sync::Mutex<()>,
    /// Whether this process has set the mirror's remote URL: once is enough, and a git command
    /// per poll is most of what an idle master does.
    configured: std::sync::atomic::AtomicBool,
}

/// The NUL-separated fields requested from `git log` for each commit; the message comes last
/// and messages cannot contain NUL, so each record splits into exactly `LOG_FIELDS` fields.
const LOG_FORMAT: &str = "--format=%H%x00%an%x00%ae%x00%cI%x00%P%x00%B";
/// Number of fields in [`LOG_FORMAT`].
const LOG_FIELDS: usize = 6;

impl Mirror {
    /// A mirror of `url` kept in `dir` (created by [`Mirror::ensure`]).
    pub fn new(dir: PathBuf, url: String) -> Self {
        Mirror { dir, url, lock: tokio::sync::Mutex::new(()), configured: Default::default() }
    }

    /// The mirror's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The remote URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `--git-dir=<dir>` as a single argument, so a directory name can never look like an option.
    fn git_dir_arg(&self) -> OsString {
        let mut a = OsString::from("--git-dir=");
        a.push(self.dir.as_os_str());
        a
    }

    /// Arguments for a git command run inside the mirror.
    fn args<I, S>(&self, rest: I) -> Vec<OsString>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut v = vec![
            self.git_dir_arg(),
            // Signature verification output would corrupt parsed `git log` output.
            OsString::from("-c"),
            OsString::from("log.showSignature=false"),
        ];
        v.extend(rest.into_iter().map(|s| s.as_ref().to_owned()));
        v
    }

    /// Create the bare repository if absent and point `origin` at the URL.
    pub async fn ensure(&self) -> Result<(), GitError> {
        check_arg("repository URL", &self.url)?;
        use std::sync::atomic::Ordering;
        let exists = self.dir.join("HEAD").exists();
        if exists && self.configured.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !exists {
            tokio::fs::create_dir_all(&self.dir)
                .await
                .map_err(|source| GitError::Spawn { command: format!("mkdir -p {}", self.dir.display()), source })?;
            let mut args = argv(["init", "--quiet", "--bare"]);
            // The directory is a positional argument: make sure it cannot start with '-'.
            args.push(self.safe_dir_path());
            run_git(&args, GIT_TIMEOUT).await?;
        }
        // `config` takes the value positionally; check_arg above ensures it is not an option.
        let args = self.args(["config", "remote.origin.url", self.url.as_str()]);
        run_git(&args, GIT_TIMEOUT).await?;
        self.configured.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The mirror directory in a form that cannot start with `-`.
    fn safe_dir_path(&self) -> OsString {
        if self.dir.is_absolute() || self.dir.starts_with(".") {
            self.dir.clone().into_os_string()
        } else {
            Path::new(".").join(&self.dir).into_os_string()
        }
    }

    /// Fetch the given branches (force-updating `refs/heads/X`), or every branch if `branches`
    /// is empty (then branches deleted upstream are pruned locally).
    pub async fn fetch(&self, branches: &[String]) -> Result<(), GitError> {
        let _guard = self.lock.lock().await;
        let mut args = self.args(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"]);
        if branches.is_empty() {
            args.push("--prune".into());
            args.push("origin".into());
            args.push("+refs/heads/*:refs/heads/*".into());
        } else {
            args.push("origin".into());
            for b in branches {
                check_branch(b)?;
                args.push(format!("+refs/heads/{b}:refs/heads/{b}").into());
            }
        }
        run_git(&args, GIT_TIMEOUT).await?;
        Ok(())
    }

    /// The commit id a local branch of the mirror points at.
    pub async fn branch_head(&self, branch: &str) -> Result<String, GitError> {
        check_branch(branch)?;
        let full = format!("refs/heads/{branch}^{{commit}}");
        let args = self.args(["rev-parse", "--verify", "--quiet", "--end-of-options", &full]);
        let out = run_git(&args, GIT_TIMEOUT).await?;
        let sha = String::from_utf8_lossy(&out).trim().to_string();
        if !is_hex_sha(&sha) {
            return Err(GitError::Parse {
                command: format!("git rev-parse {full}"),
                reason: format!("not a commit id: {sha:?}"),
            });
        }
        Ok(sha)
    }

    /// Details of one commit (which must be present in the mirror).
    pub async fn commit(&self, rev: &str) -> Result<CommitInfo, GitError> {
        check_arg("revision", rev)?;
        let spec = format!("{rev}^{{commit}}");
        let mut list = self.log(&["-1", "--end-of-options", &spec, "--"]).await?;
        match list.pop() {
            Some(c) => Ok(c),
            None => Err(GitError::Parse { command: format!("git log -1 {spec}"), reason: "no commit printed".into() }),
        }
    }

    /// Commits in `old..new`, oldest first, capped to the newest `limit` (at least 1).
    ///
    /// If `old` is `None`, unknown to the mirror, or not an ancestor of `new` (a force-push),
    /// only `new`'s own commit is returned: we cannot tell which commits are new, and building
    /// the head is what matters. `old == new` yields nothing.
    pub async fn new_commits(&self, old: Option<&str>, new: &str, limit: usize) -> Result<Vec<CommitInfo>, GitError> {
        check_arg("revision", new)?;
        let limit = limit.max(1);
        let Some(old) = old else {
            return Ok(vec![self.commit(new).await?]);
        };
        check_arg("revision", old)?;
        if old == new {
            return Ok(Vec::new());
        }
        if !self.has_commit(old).await? || !self.is_ancestor(old, new).await? {
            return Ok(vec![self.commit(new).await?]);
        }
        let range = format!("{old}..{new}");
        let max = format!("--max-count={limit}");
        let mut list = self.log(&[max.as_str(), "--end-of-options", &range, "--"]).await?;
        // git lists newest first; callers want history order.
        list.reverse();
        Ok(list)
    }

    /// True if `rev` names a commit present in the mirror.
    async fn has_commit(&self, rev: &str) -> Result<bool, GitError> {
        let spec = format!("{rev}^{{commit}}");
        let args = self.args(["cat-file", "-e", "--end-of-options", &spec]);
        // Exit 1/128: missing or not a commit. Both mean "unknown here".
        let (code, _) = run_git_status(&args, GIT_TIMEOUT, &[1, 128]).await?;
        Ok(code == 0)
    }

    /// True if `old` is an ancestor of (or equal to) `new`.
    async fn is_ancestor(&self, old: &str, new: &str) -> Result<bool, GitError> {
        let args = self.args(["merge-base", "--is-ancestor", "--end-of-options", old, new]);
        let (code, _) = run_git_status(&args, GIT_TIMEOUT, &[1]).await?;
        Ok(code == 0)
    }

    /// Run `git log` with our format plus `extra`, newest first, and fill in files.
    async fn log(&self, extra: &[&str]) -> Result<Vec<CommitInfo>, GitError> {
        let mut args = self.args(["log", "-z", "--no-color", "--encoding=UTF-8", LOG_FORMAT]);
        args.extend(extra.iter().map(OsString::from));
        let out = run_git(&args, GIT_TIMEOUT).await?;
        let command = format!("git log {}", extra.join(" "));
        let mut commits = Vec::new();
        for (commit, parents) in
            parse_log(&out).map_err(|reason| GitError::Parse { command: command.clone(), reason })?
        {
            let first_parent = parents.split_whitespace().next().map(str::to_string);
            let files = self.files(&commit.revision, first_parent.as_deref()).await?;
            commits.push(CommitInfo { files, ..commit });
        }
        Ok(commits)
    }

    /// Paths changed by `rev` relative to `first_parent` (or all paths for a root commit).
    async fn files(&self, rev: &str, first_parent: Option<&str>) -> Result<Vec<String>, GitError> {
        let mut args = self.args(["diff-tree", "-r", "-z", "--name-only", "--no-commit-id", "--no-renames"]);
        match first_parent {
            Some(p) => {
                args.push(p.into());
                args.push(rev.into());
            }
            None => {
                args.push("--root".into());
                args.push(rev.into());
            }
        }
        let out = run_git(&args, GIT_TIMEOUT).await?;
        let mut seen = HashSet::new();
        Ok(out
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .filter(|s| seen.insert(s.clone()))
            .collect())
    }
}

/// Refuse branch names git would refuse, so none changes the meaning of a refspec, looks like
/// an option or escapes `refs/heads/`.
fn check_branch(branch: &str) -> Result<(), GitError> {
    Ok(refname::check_branch("branch", branch)?)
}

/// Parse `git log -z` output in [`LOG_FORMAT`] into commits (files empty) and parent lists.
fn parse_log(out: &[u8]) -> Result<Vec<(CommitInfo, String)>, String> {
    let mut fields: Vec<&[u8]> = out.split(|b| *b == 0).collect();
    // Each record is NUL-terminated, so a well-formed output ends with an empty piece.
    if fields.last().is_some_and(|f| f.is_empty()) {
        fields.pop();
    }
    if !fields.len().is_multiple_of(LOG_FIELDS) {
        return Err(format!("{} NUL-separated fields, not a multiple of {LOG_FIELDS}", fields.len()));
    }
    let mut commits = Vec::new();
    for rec in fields.chunks(LOG_FIELDS) {
        let text = |i: usize| String::from_utf8_lossy(rec[i]).into_owned();
        let revision = text(0);
        if !is_hex_sha(&revision) {
            return Err(format!("not a commit id: {revision:?}"));
        }
        let date = text(3);
        let committed_at = DateTime::parse_from_rfc3339(date.trim())
            .map_err(|e| format!("commit {revision}: bad date {date:?}: {e}"))?
            .with_timezone(&Utc);
        let message = text(5).trim_end_matches(['\n', '\r']).to_string();
        commits.push((
            CommitInfo {
                author: format!("{} <{}>", text(1), text(2)),
                revision,
                committed_at,
                message,
                files: Vec::new(),
            },
            text(4),
        ));
    }
    Ok(commits)
}

/// What one poll of a repository found.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct PollResult {
    /// Current heads of the branches matching the patterns (store these as the new `known`).
    pub heads: BTreeMap<String, String>,
    /// New commits as `(branch, commit)`, grouped by branch, oldest first within a branch.
    pub new: Vec<(String, CommitInfo)>,
    /// Matching branches seen for the first time: their head is recorded, nothing is built.
    pub first_seen: Vec<String>,
    /// Branches in `known` that no longer exist upstream (or no longer match).
    pub deleted: Vec<String>,
    /// Matching branches the remote advertised under names git's rules refuse, skipped: why,
    /// with the name escaped (a hostile server's advertisement is not git's local check).
    pub refused: Vec<String>,
}

/// Poll the mirror's remote once.
///
/// `known` is the last recorded head per branch (from the database). A branch not in `known`
/// is recorded and not built; an unchanged head yields nothing; a moved head yields
/// [`Mirror::new_commits`]. Only moved branches are fetched, so an idle poll is one
/// `ls-remote`.
pub async fn poll(
    mirror: &Mirror,
    branch_patterns: &[String],
    known: &BTreeMap<String, String>,
    limit: usize,
) -> Result<PollResult, GitError> {
    mirror.ensure().await?;
    let remote = ls_remote(mirror.url()).await?;
    let mut result = PollResult::default();
    let mut changed = Vec::new();
    for (branch, sha) in remote {
        if !branch_matches(branch_patterns, &branch) {
            continue;
        }
        // Skipped, not fatal: one bad name must not stop the other branches' builds.
        if let Err(e) = refname::check_branch("branch", &branch) {
            result.refused.push(e.to_string());
            continue;
        }
        match known.get(&branch) {
            None => result.first_seen.push(branch.clone()),
            Some(old) if *old == sha => {}
            Some(_) => changed.push(branch.clone()),
        }
        result.heads.insert(branch, sha);
    }
    result.deleted = known.keys().filter(|b| !result.heads.contains_key(*b)).cloned().collect();
    if changed.is_empty() {
        return Ok(result);
    }
    mirror.fetch(&changed).await?;
    for branch in changed {
        // The branch may have moved again between ls-remote and fetch: trust what we fetched,
        // so the recorded head is exactly the newest commit we report.
        let head = mirror.branch_head(&branch).await?;
        let old = known.get(&branch).map(String::as_str);
        for c in mirror.new_commits(old, &head, limit).await? {
            result.new.push((branch.clone(), c));
        }
        result.heads.insert(branch, head);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_semantics() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(branch_matches(&p(&["stable/*"]), "stable/5.2.x"));
        assert!(!branch_matches(&p(&["stable/*"]), "stable"));
        assert!(branch_matches(&p(&["*"]), "main"));
        assert!(!branch_matches(&p(&["*"]), "feature/x"));
        assert!(branch_matches(&p(&["**"]), "feature/x"));
        assert!(branch_matches(&p(&["main", "stable/*"]), "main"));
        assert!(!branch_matches(&p(&[]), "main"));
        assert!(!branch_matches(&p(&["[bad"]), "main"));
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("fatal: 'https://me:tok@host/x.git' nope"), "fatal: 'https://***@host/x.git' nope");
        assert_eq!(redact("https://host/x"), "https://host/x");
        assert_eq!(redact("no url"), "no url");
    }

    #[test]
    fn parse_log_rejects_garbage() {
        assert!(parse_log(b"").unwrap().is_empty());
        assert!(parse_log(b"abc\0").is_err());
        let sha = "a".repeat(40);
        let rec = format!("{sha}\0N\0e@x\0not-a-date\0\0msg\n\0");
        assert!(parse_log(rec.as_bytes()).is_err());
        let rec = format!("{sha}\0N\0e@x\x002024-01-02T03:04:05+01:00\0\0m|sg\n\nbody\n\0");
        let v = parse_log(rec.as_bytes()).unwrap();
        assert_eq!(v[0].0.author, "N <e@x>");
        assert_eq!(v[0].0.message, "m|sg\n\nbody");
        assert_eq!(v[0].0.committed_at.to_rfc3339(), "2024-01-02T02:04:05+00:00");
    }

    #[test]
    fn branch_checks() {
        assert!(check_branch("stable/5.2.x").is_ok());
        assert!(check_branch("-x").is_err());
        assert!(check_branch("a:b").is_err());
        assert!(check_branch("a b").is_err());
        assert!(check_branch("a..b").is_err());
        assert!(check_branch("a\nb").is_err());
        assert!(check_branch("../../x").is_err());
    }
}

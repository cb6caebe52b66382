//! The git poller against real repositories in temporary directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use paddock::changes::git::{self, CommitInfo, GitError, Mirror, PollResult};
use tempfile::TempDir;

/// A working repository standing in for the remote.
struct Upstream {
    dir: TempDir,
}

impl Upstream {
    fn new() -> Upstream {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = Upstream { dir };
        up.git(&["init", "--quiet", "."]);
        up
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Run git in the upstream with a fixed identity and no dependence on global config.
    fn git(&self, args: &[&str]) -> String {
        self.git_as("Zoë Tester", "zoe@example.com", args)
    }

    fn git_as(&self, name: &str, email: &str, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"])
            .args(args)
            .current_dir(self.path())
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env("GIT_AUTHOR_NAME", name)
            .env("GIT_AUTHOR_EMAIL", email)
            .env("GIT_COMMITTER_NAME", name)
            .env("GIT_COMMITTER_EMAIL", email)
            .env("GIT_COMMITTER_DATE", "2024-03-04T05:06:07+02:00")
            .env("GIT_AUTHOR_DATE", "2024-03-04T05:06:07+02:00")
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn write(&self, file: &str, content: &str) {
        let p = self.path().join(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, content).expect("write");
    }

    /// Write `files`, stage everything (including removals) and commit; return the commit id.
    fn commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        for (f, c) in files {
            self.write(f, c);
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.head()
    }

    fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }

    fn file_url(&self) -> String {
        format!("file://{}", self.url())
    }
}

/// A mirror in its own temporary directory (kept alive by the returned TempDir).
fn mirror(url: String) -> (TempDir, Mirror) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = Mirror::new(dir.path().join("mirror.git"), url);
    (dir, m)
}

fn pats(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

async fn poll(m: &Mirror, patterns: &[&str], known: &BTreeMap<String, String>) -> PollResult {
    git::poll(m, &pats(patterns), known, 100).await.expect("poll")
}

fn revs(r: &PollResult) -> Vec<(String, String)> {
    r.new.iter().map(|(b, c)| (b.clone(), c.revision.clone())).collect()
}

#[tokio::test]
async fn first_poll_records_then_new_commits_oldest_first() {
    let up = Upstream::new();
    let c0 = up.commit("initial", &[("a.txt", "a"), ("old.txt", "x")]);
    let (_d, m) = mirror(up.url());

    let r = poll(&m, &["main"], &BTreeMap::new()).await;
    assert_eq!(r.heads.get("main"), Some(&c0));
    assert_eq!(r.first_seen, vec!["main"]);
    assert!(r.new.is_empty(), "first sight builds nothing");

    // Nothing moved: nothing new.
    let known = r.heads.clone();
    let r = poll(&m, &["main"], &known).await;
    assert!(r.new.is_empty() && r.first_seen.is_empty() && r.deleted.is_empty());
    assert_eq!(r.heads, known);

    let message = "Fixed #1 | ünïcödé ✓\n\nBody with | pipes,\nnewlines,\ttabs and \x1e\x1f separators.\n";
    let c1 = up.commit(message, &[("a.txt", "a2"), ("dir/new file.txt", "n")]);
    std::fs::remove_file(up.path().join("old.txt")).expect("rm");
    let c2 = up.commit("second", &[]);

    let r = poll(&m, &["main"], &known).await;
    assert_eq!(revs(&r), vec![("main".into(), c1.clone()), ("main".into(), c2.clone())]);
    assert_eq!(r.heads.get("main"), Some(&c2));
    let first: &CommitInfo = &r.new[0].1;
    assert_eq!(first.author, "Zoë Tester <zoe@example.com>");
    assert_eq!(first.message, "Fixed #1 | ünïcödé ✓\n\nBody with | pipes,\nnewlines,\ttabs and \x1e\x1f separators.");
    assert_eq!(first.committed_at.to_rfc3339(), "2024-03-04T03:06:07+00:00");
    assert_eq!(first.files, vec!["a.txt", "dir/new file.txt"]);
    assert_eq!(r.new[1].1.files, vec!["old.txt"]);
    assert_eq!(r.new[1].1.message, "second");

    // Recorded heads up to date: a further poll is quiet.
    let r = poll(&m, &["main"], &r.heads).await;
    assert!(r.new.is_empty());
}

#[tokio::test]
async fn commit_on_one_branch_only_shows_there() {
    let up = Upstream::new();
    up.commit("initial", &[("a", "1")]);
    up.git(&["branch", "feature"]);
    let (_d, m) = mirror(up.url());
    let known = poll(&m, &["*"], &BTreeMap::new()).await.heads;
    assert_eq!(known.keys().collect::<Vec<_>>(), vec!["feature", "main"]);

    up.git(&["checkout", "--quiet", "feature"]);
    let c = up.commit("on feature", &[("f", "1")]);
    let r = poll(&m, &["*"], &known).await;
    assert_eq!(revs(&r), vec![("feature".into(), c.clone())]);
    assert_eq!(r.heads.get("feature"), Some(&c));
    assert_eq!(r.heads.get("main"), known.get("main"));
}

#[tokio::test]
async fn force_push_yields_only_the_new_head() {
    let up = Upstream::new();
    let c0 = up.commit("c0", &[("a", "0")]);
    up.commit("c1", &[("a", "1")]);
    up.commit("c2", &[("a", "2")]);
    let (_d, m) = mirror(up.url());
    let known = poll(&m, &["main"], &BTreeMap::new()).await.heads;
    // Make sure the old head is in the mirror too, as it would be after earlier polls.
    m.fetch(&[]).await.expect("fetch");

    up.git(&["reset", "--quiet", "--hard", &c0]);
    let c3 = up.commit("c3 rewritten", &[("b", "3")]);
    let r = poll(&m, &["main"], &known).await;
    assert_eq!(revs(&r), vec![("main".into(), c3)]);
    assert_eq!(r.new[0].1.files, vec!["b"]);
}

#[tokio::test]
async fn old_head_unknown_to_mirror_yields_only_the_new_head() {
    // E.g. the database remembers a head from a history that was rewritten before we mirrored.
    let up = Upstream::new();
    up.commit("c0", &[("a", "0")]);
    let c1 = up.commit("c1", &[("a", "1")]);
    let (_d, m) = mirror(up.url());
    let mut known = BTreeMap::new();
    known.insert("main".to_string(), "f".repeat(40));
    let r = poll(&m, &["main"], &known).await;
    assert_eq!(revs(&r), vec![("main".into(), c1)]);
}

#[tokio::test]
async fn branch_globs() {
    let up = Upstream::new();
    up.commit("c0", &[("a", "0")]);
    for b in ["stable/5.1.x", "stable/5.2.x", "feature/x", "stable-old"] {
        up.git(&["branch", b]);
    }
    let (_d, m) = mirror(up.url());
    let r = poll(&m, &["stable/*"], &BTreeMap::new()).await;
    assert_eq!(r.heads.keys().collect::<Vec<_>>(), vec!["stable/5.1.x", "stable/5.2.x"]);
    let r = poll(&m, &["main", "stable/*"], &BTreeMap::new()).await;
    assert_eq!(r.heads.keys().collect::<Vec<_>>(), vec!["main", "stable/5.1.x", "stable/5.2.x"]);
    let r = poll(&m, &["*"], &BTreeMap::new()).await;
    assert_eq!(r.heads.keys().collect::<Vec<_>>(), vec!["main", "stable-old"]);
}

#[tokio::test]
async fn deleted_branch_is_dropped() {
    let up = Upstream::new();
    up.commit("c0", &[("a", "0")]);
    up.git(&["branch", "gone"]);
    let (_d, m) = mirror(up.url());
    let known = poll(&m, &["*"], &BTreeMap::new()).await.heads;
    assert!(known.contains_key("gone"));
    up.git(&["branch", "-D", "gone"]);
    let r = poll(&m, &["*"], &known).await;
    assert!(!r.heads.contains_key("gone"));
    assert_eq!(r.deleted, vec!["gone"]);
    assert!(r.new.is_empty());
    // Fetching all heads prunes it from the mirror as well.
    m.fetch(&[]).await.expect("fetch");
    assert!(m.branch_head("gone").await.is_err());
}

#[tokio::test]
async fn file_url_and_plain_path_both_work() {
    let up = Upstream::new();
    let c0 = up.commit("c0", &[("a", "0")]);
    let by_path = git::ls_remote(&up.url()).await.expect("ls-remote path");
    let by_url = git::ls_remote(&up.file_url()).await.expect("ls-remote file://");
    assert_eq!(by_path, by_url);
    assert_eq!(by_path.get("main"), Some(&c0));

    for url in [up.url(), up.file_url()] {
        let (_d, m) = mirror(url.clone());
        let known = poll(&m, &["main"], &BTreeMap::new()).await.heads;
        let c = up.commit(&format!("via {url}"), &[("a", &url)]);
        let r = poll(&m, &["main"], &known).await;
        assert_eq!(revs(&r), vec![("main".into(), c)], "{url}");
    }
}

#[tokio::test]
async fn merge_files_are_vs_first_parent_and_limit_keeps_newest() {
    let up = Upstream::new();
    let c0 = up.commit("c0", &[("base", "0")]);
    let (_d, m) = mirror(up.url());
    let known = poll(&m, &["main"], &BTreeMap::new()).await.heads;

    up.git(&["checkout", "--quiet", "-b", "topic"]);
    let t1 = up.commit("topic work", &[("topic.txt", "t")]);
    up.git(&["checkout", "--quiet", "main"]);
    let c1 = up.commit("main work", &[("main.txt", "m")]);
    up.git(&["merge", "--quiet", "--no-ff", "--no-edit", "topic"]);
    let merge = up.head();

    m.fetch(&["main".to_string()]).await.expect("fetch");
    let all = m.new_commits(Some(&c0), &merge, 100).await.expect("log");
    let ids: Vec<_> = all.iter().map(|c| c.revision.clone()).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids.last(), Some(&merge));
    assert!(ids.contains(&t1) && ids.contains(&c1));
    let merged = all.last().expect("merge");
    assert_eq!(merged.files, vec!["topic.txt"]);

    let newest = m.new_commits(Some(&c0), &merge, 1).await.expect("log");
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].revision, merge);

    // Limit through poll: five commits, keep the newest two, oldest first.
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(up.commit(&format!("n{i}"), &[("n", &i.to_string())]));
    }
    let known2 = BTreeMap::from([("main".to_string(), merge.clone())]);
    let r = git::poll(&m, &pats(&["main"]), &known2, 2).await.expect("poll");
    assert_eq!(revs(&r), vec![("main".into(), made[3].clone()), ("main".into(), made[4].clone())]);
    let _ = known;

    // old == new: nothing; old None: just the head.
    assert!(m.new_commits(Some(&merge), &merge, 10).await.expect("same").is_empty());
    let head_only = m.new_commits(None, &made[4], 10).await.expect("none");
    assert_eq!(head_only.len(), 1);
    assert_eq!(head_only[0].revision, made[4]);
    let root = m.commit(&c0).await.expect("root");
    assert_eq!(root.files, vec!["base"]);
}

#[tokio::test]
async fn bad_url_fails_with_git_stderr() {
    let missing = tempfile::tempdir().expect("tempdir");
    let url = missing.path().join("no-such-repo").to_string_lossy().into_owned();
    let (_d, m) = mirror(url);
    let r = tokio::time::timeout(Duration::from_secs(60), git::poll(&m, &pats(&["*"]), &BTreeMap::new(), 10))
        .await
        .expect("no hang");
    match r {
        Err(GitError::Failed { command, stderr, .. }) => {
            assert!(command.contains("ls-remote"), "{command}");
            assert!(!stderr.is_empty());
            let shown = format!("{}", GitError::Failed { command, status: String::new(), stderr: stderr.clone() });
            assert!(shown.contains(&stderr));
            assert!(
                stderr.contains("does not appear to be a git repository") || stderr.contains("no-such-repo"),
                "{stderr}"
            );
        }
        other => panic!("expected GitError::Failed, got {other:?}"),
    }

    // An unreachable HTTP remote fails promptly rather than asking for credentials.
    let r = tokio::time::timeout(Duration::from_secs(60), git::ls_remote("http://127.0.0.1:9/nope.git"))
        .await
        .expect("no hang");
    let err = r.expect_err("unreachable");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");

    // A URL that git would read as an option is refused outright.
    let r = git::ls_remote("--upload-pack=touch /tmp/pwned").await;
    assert!(matches!(r, Err(GitError::InvalidArgument { .. })), "{r:?}");
}

#[tokio::test]
async fn credentials_are_redacted_from_errors() {
    let r = git::ls_remote("http://user:s3cret@127.0.0.1:9/nope.git").await;
    let err = r.expect_err("unreachable");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[tokio::test]
async fn ensure_is_idempotent_and_updates_url() {
    let up = Upstream::new();
    let c0 = up.commit("c0", &[("a", "0")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("m.git");
    let m = Mirror::new(path.clone(), "/nonexistent".into());
    m.ensure().await.expect("ensure");
    let m = Mirror::new(path, up.url());
    m.ensure().await.expect("ensure again");
    m.fetch(&[]).await.expect("fetch all");
    assert_eq!(m.branch_head("main").await.expect("head"), c0);
    let info = m.commit("main").await.expect("commit");
    assert_eq!(info.revision, c0);
    assert!(m.commit("no-such-ref").await.is_err());
}

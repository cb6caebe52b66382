//! Test bed for end-to-end tests: a real git repository, the real `paddock` binary as master,
//! real agent processes, a real SQLite file. Waits poll the API with a deadline; no guessed sleeps.

#![allow(dead_code)]

pub mod boot;
pub mod cloud;
pub mod db;
pub mod faultproxy;
pub mod lb;
pub mod moto;
pub mod tls;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Config for a local pool and one builder `b` on repository `app` (branch scheduler) whose
/// build fails while `a.txt` says "broken": the notifier tests' pass/fail switch.
pub const ONE_BUILDER_FAILING_ON_BROKEN: &str = "[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\n\
    boot_timeout = \"60s\"\n\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
    steps = [\"! grep -q broken a.txt\"]\n\n[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n\n";

/// The binary under test.
pub fn paddock_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_paddock"))
}

/// How long any single wait may take before the test fails (generous for a loaded 2-core box).
pub const DEADLINE: Duration = Duration::from_secs(90);

/// The unprivileged user local machines run as (`run_as`) when the tests run as root, as CI
/// does; `.ci/test` creates it.
pub const TEST_USER: &str = "paddock-test";

/// Whether the tests run as root (then the masters they start need `run_as`).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The uid and gid of user `name`, failing the test with how to create it.
pub fn user_ids(name: &str) -> (u32, u32) {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
        _ => panic!(
            "user `{name}` is missing: local machines of a root master run as it; create it with \
             `useradd --system --no-create-home {name}` (.ci/test does)"
        ),
    }
}

/// Fails the test, saying what to install, when local machines cannot be sandboxed here.
pub fn require_sandbox() {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join("bwrap").is_file())).unwrap_or(false);
    assert!(found, "bubblewrap is needed to sandbox local machines: apt-get install bubblewrap");
    if is_root() {
        user_ids(TEST_USER);
    }
}

/// `text` with `run_as = TEST_USER` added to every local pool that sets neither `run_as` nor
/// `isolation`: a root master refuses local pools without it, and the suite is to exercise the
/// sandbox as CI runs it.
pub fn with_run_as(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        out.push_str(line);
        out.push('\n');
        if !(line.trim_start().starts_with("[pool.") && line.trim_end().ends_with(']')) {
            continue;
        }
        let section: Vec<&str> =
            lines[i + 1..].iter().take_while(|l| !l.trim_start().starts_with('[')).copied().collect();
        let has = |key: &str| section.iter().any(|l| l.trim_start().starts_with(key));
        let ec2 = section.iter().any(|l| l.replace(' ', "") == "provisioner=\"ec2\"");
        if !ec2 && !has("run_as") && !has("isolation") {
            out.push_str(&format!("run_as = \"{TEST_USER}\"\n"));
        }
    }
    out
}

/// Rewrites the config at `path` with [`with_run_as`] when the master will run as root.
pub fn confine_config(path: &Path) {
    if !is_root() {
        return;
    }
    let text = std::fs::read_to_string(path).expect("read config");
    let confined = with_run_as(&text);
    if confined != text {
        std::fs::write(path, confined).expect("write config");
    }
}

/// One test's world: a temp folder with a repository, a config and (when started) a master.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub port: u16,
    master: Option<Child>,
    pub master_log: PathBuf,
    /// Sends the bed's admin token: tests read and act as an admin unless they say otherwise.
    pub http: reqwest::blocking::Client,
    starts: u32,
    token: Option<String>,
    /// The CA of the master's certificate when it serves HTTPS (see [`Bed::serve_https`]).
    pub ca: Option<PathBuf>,
    /// Who the master and every command of the bed run as: `None` for the test's own user,
    /// or (uid, gid) of an unprivileged one (a root test playing a non-root installation).
    user: Option<(u32, u32)>,
    /// The bed's PostgreSQL database, when its master runs on one (see [`beds_on_postgres`]);
    /// else the master's database is `paddock.db` in the bed.
    pub pg: Option<db::PgBlocking>,
}

thread_local! {
    static ON_POSTGRES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the beds this test (its thread) creates from now on run their master on a fresh
/// database of the test PostgreSQL server instead of a SQLite file.
pub fn beds_on_postgres() {
    ON_POSTGRES.with(|on| on.set(true));
}

/// `cmd` run as `user` (uid, gid; no supplementary groups), with its home in `home`.
fn as_user(cmd: &mut Command, user: Option<(u32, u32)>, home: &Path) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", home);
    }
}

fn run_git(dir: &Path, args: &[&str]) -> String {
    run_git_as(dir, args, None)
}

fn run_git_as(dir: &Path, args: &[&str], user: Option<(u32, u32)>) -> String {
    let mut cmd = Command::new("git");
    as_user(&mut cmd, user, dir);
    let out = cmd
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada Tester")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada Tester")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .output()
        .expect("git must be installed to run these tests (apt-get install git)");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A blocking HTTP client builder with Paddock's TLS settings (reqwest has no crypto provider
/// of its own here: `reqwest::blocking::Client::new()` would panic).
pub fn blocking_client() -> reqwest::blocking::ClientBuilder {
    let tls = paddock::tls::client_config(None).expect("TLS client settings");
    reqwest::blocking::Client::builder().use_preconfigured_tls(tls)
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Bed {
    /// A repository with `main` (and the given other branches), each with one commit.
    pub fn new(branches: &[&str]) -> Bed {
        require_sandbox();
        Bed::new_for(branches, None)
    }

    /// Like [`Bed::new`], for a master that runs as the unprivileged user `name` (the tests
    /// must run as root): the folder is that user's, and every command of the bed runs as it.
    pub fn new_as(branches: &[&str], name: &str) -> Bed {
        require_sandbox();
        assert!(is_root(), "a bed of another user needs the tests to run as root");
        let ids = user_ids(name);
        Bed::new_for(branches, Some(ids))
    }

    fn new_for(branches: &[&str], user: Option<(u32, u32)>) -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the bed");
        }
        let repo = dir.path().join("repo");
        let git = |args: &[&str]| run_git_as(dir.path(), args, user);
        git(&["init", "-q", "-b", "main", "repo"]);
        let file = |path: &Path, text: &str| {
            std::fs::write(path, text).expect("write");
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
            }
        };
        file(&repo.join("README.md"), "hello\n");
        run_git_as(&repo, &["add", "."], user);
        run_git_as(&repo, &["commit", "-q", "-m", "initial"], user);
        for b in branches {
            run_git_as(&repo, &["branch", b], user);
        }
        let master_log = dir.path().join("master.log");
        // PADDOCK_TEST_BEDS=postgres puts every bed on PostgreSQL: the whole suite once more
        // on the other backend (tests that read the SQLite file itself then fail, as they should).
        let everywhere = std::env::var("PADDOCK_TEST_BEDS").is_ok_and(|b| b == "postgres");
        let pg = (everywhere || ON_POSTGRES.with(|on| on.get())).then(db::PgBlocking::new);
        Bed {
            dir,
            repo,
            port: free_port(),
            master: None,
            master_log,
            http: blocking_client().timeout(Duration::from_secs(20)).build().expect("client"),
            starts: 0,
            token: None,
            ca: None,
            user,
            pg,
        }
    }

    /// Makes the bed's master an HTTPS one whose certificate `ca` signed: [`Bed::url`] (and so
    /// the config's `[master] url`) says https, and [`Bed::http`] trusts `ca` alone (the config
    /// still needs `tls_cert`/`tls_key`).
    pub fn serve_https(&mut self, ca: &Path) {
        self.ca = Some(ca.to_path_buf());
        self.http = Bed::client_trusting(self.token.as_deref(), Some(ca));
    }

    /// A command of the bed: run as the bed's user, if it has one.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        as_user(&mut cmd, self.user, self.path());
        if self.pg.is_some() {
            // As an installation gives them: the password and the server's CA in the
            // environment, never in the config.
            cmd.env("PGPASSWORD", db::pg_env("PGPASSWORD").unwrap_or_default());
            cmd.env("PGSSLROOTCERT", db::pg_env("PGSSLROOTCERT").unwrap_or_default());
        }
        cmd
    }

    /// A path a test creates to signal a running build step: sandboxed machines see nothing of
    /// the bed but the repository, so it lies in the repository's `.git` folder.
    pub fn flag(&self, name: &str) -> PathBuf {
        self.repo.join(".git").join(format!("test-flag-{name}"))
    }

    /// The `paddock` binary as an agent script of a test runs it inside a machine: a link to
    /// (or copy of) the binary in the repository's `.git` folder, the one part of the bed a
    /// sandboxed machine sees. The binary's own folder may not be reachable there: the build
    /// user cannot enter a checkout in a private folder (`mktemp -d` makes it 0700).
    pub fn agent_binary(&self) -> PathBuf {
        let inside = self.repo.join(".git").join("paddock-agent");
        if !inside.exists() && std::fs::hard_link(paddock_bin(), &inside).is_err() {
            std::fs::copy(paddock_bin(), &inside).expect("copy the paddock binary into the repository");
        }
        inside
    }

    /// Creates [`Bed::flag`] `name`.
    pub fn raise(&self, name: &str) {
        let path = self.flag(name);
        std::fs::write(&path, "").expect("write flag");
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
        }
    }

    /// The work directory of local machine `id` of pool `pool`.
    pub fn machine_dir(&self, pool: &str, id: i64) -> PathBuf {
        self.path().join("paddock-state").join("machines").join(pool).join(format!("machine-{id}"))
    }

    /// The bed admin's API token (made at the first start).
    pub fn token(&self) -> &str {
        self.token.as_deref().expect("the bed's admin token is made when the master first starts")
    }

    /// Runs `paddock ARGS --config paddock.toml` (a command of the master's host) with `stdin`;
    /// returns stdout, failing the test if the command fails.
    pub fn host_cli(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = self
            .command(paddock_bin())
            .args(args)
            .arg("--config")
            .arg(self.path().join("paddock.toml"))
            .current_dir(self.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run paddock");
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).expect("stdin");
        }
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "paddock {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Adds a user through `paddock user add` and returns an API token of theirs made with
    /// `paddock token create`.
    pub fn add_user(&self, name: &str, role: &str, password: &str) -> String {
        self.host_cli(&["user", "add", name, "--role", role, "--password-stdin"], &format!("{password}\n"));
        self.host_cli(&["token", "create", name, "--name", "tests"], "").trim().to_string()
    }

    /// An HTTP client that sends `token` (none: anonymous), trusting the system's CAs.
    pub fn client(token: Option<&str>) -> reqwest::blocking::Client {
        Bed::client_trusting(token, None)
    }

    /// An HTTP client that sends `token` (none: anonymous) and, given a CA file, trusts only
    /// the certificates in it (else the system's CAs).
    pub fn client_trusting(token: Option<&str>, ca: Option<&Path>) -> reqwest::blocking::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
            );
        }
        let tls = match ca {
            Some(ca) => {
                let roots = paddock::tls::read_ca_file(ca).expect("the test CA file");
                paddock::tls::client_config(Some(&roots)).expect("TLS client settings")
            }
            None => paddock::tls::client_config(None).expect("TLS client settings"),
        };
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(20))
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client")
    }

    /// The test folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs git in the repository.
    pub fn git(&self, args: &[&str]) -> String {
        run_git_as(&self.repo, args, self.user)
    }

    /// Commits `text` appended to `file` on `branch`; returns the new revision.
    pub fn commit(&self, branch: &str, file: &str, text: &str, message: &str) -> String {
        self.git(&["checkout", "-q", branch]);
        let path = self.repo.join(file);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        let mut old = std::fs::read_to_string(&path).unwrap_or_default();
        old.push_str(text);
        self.write_file(&path, &old);
        self.git(&["add", file]);
        self.git(&["commit", "-q", "-m", message]);
        let rev = self.git(&["rev-parse", "HEAD"]);
        self.git(&["checkout", "-q", "main"]);
        rev
    }

    /// Commits a.txt with exactly `content` on main and waits for the build of that revision to
    /// succeed or fail; returns the build.
    pub fn build_file(&self, content: &str, message: &str) -> Value {
        self.git(&["checkout", "-q", "main"]);
        self.write_file(&self.repo.join("a.txt"), content);
        self.git(&["add", "a.txt"]);
        self.git(&["commit", "-q", "-m", message]);
        let rev = self.git(&["rev-parse", "HEAD"]);
        self.wait(&format!("the build of {message:?}"), || {
            self.builds()
                .into_iter()
                .find(|b| b["revision"] == rev.as_str() && matches!(b["state"].as_str(), Some("success" | "failure")))
        })
    }

    /// Writes a file of the bed (owned by the bed's user).
    pub fn write_file(&self, path: &Path, text: &str) {
        if let Some(p) = path.parent() {
            if !p.exists() {
                std::fs::create_dir_all(p).expect("mkdir");
                if let Some((uid, gid)) = self.user {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
                }
            }
        }
        std::fs::write(path, text).expect("write");
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
        }
    }

    /// Waits until every build event is planned and no notification is pending.
    pub fn notifications_settled(&self) {
        self.wait("notifications settled", || {
            let unplanned = self.db_scalar("SELECT COUNT(*) FROM build_events WHERE processed = 0").filter(|n| *n == 0);
            let pending = self.db_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").filter(|n| *n == 0);
            unplanned.and(pending)
        });
    }

    /// The master's base URL.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Writes `paddock.toml`: a `[master]` section for this bed, a repo `app` at the test
    /// repository, then `rest`.
    pub fn config(&self, repo_extra: &str, rest: &str) -> PathBuf {
        self.config_with_master("", repo_extra, rest)
    }

    /// Like [`Bed::config`], with extra `[master]` lines.
    pub fn config_with_master(&self, master_extra: &str, repo_extra: &str, rest: &str) -> PathBuf {
        let poll = if repo_extra.contains("poll =") { "" } else { "poll = \"300ms\"\n" };
        let heartbeat = if master_extra.contains("heartbeat_timeout") { "" } else { "heartbeat_timeout = \"6s\"\n" };
        let database = self.pg.as_ref().map_or("sqlite://paddock.db", |pg| pg.url.as_str());
        let text = format!(
            "[master]\nurl = \"{url}\"\ndatabase = \"{database}\"\n{heartbeat}shutdown_grace = \"20s\"\n{master_extra}\n\n\
             [[repo]]\nname = \"app\"\nurl = \"repo\"\n{poll}{repo_extra}\n\n{rest}\n",
            url = self.url()
        );
        let path = self.path().join("paddock.toml");
        self.write_file(&path, &text);
        path
    }

    /// Starts `paddock run paddock.toml`, waits for `/healthz` and for the poller to record
    /// the heads of `branches`.
    pub fn start(&mut self, branches: &[&str]) {
        self.start_with_env(branches, &[]);
    }

    /// Like [`Bed::start`], with extra environment for the master.
    pub fn start_with_env(&mut self, branches: &[&str], env: &[(&str, &str)]) {
        self.starts += 1;
        if self.token.is_none() {
            let token = self.add_user("bed-admin", "admin", "bed-admin-password");
            self.http = Bed::client_trusting(Some(&token), self.ca.as_deref());
            self.token = Some(token);
        }
        if self.user.is_none() {
            confine_config(&self.path().join("paddock.toml"));
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.master_log).expect("log");
        let mut cmd = self.command(paddock_bin());
        cmd.arg("run")
            .arg(self.path().join("paddock.toml"))
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.master = Some(cmd.spawn().expect("start master"));
        self.wait("master /healthz", || {
            self.http.get(format!("{}/healthz", self.url())).send().ok().filter(|r| r.status().is_success()).map(|_| ())
        });
        for b in branches {
            let b = b.to_string();
            self.wait(&format!("head of {b} recorded"), || {
                self.db_scalar(&format!("SELECT COUNT(*) FROM branch_heads WHERE branch = '{b}'"))
                    .filter(|n| *n > 0)
                    .map(|_| ())
            });
        }
    }

    /// Runs `sql` on the master's database (a test playing a crash's leftovers), with the
    /// `sqlite3` CLI or `psql`.
    pub fn db_execute(&self, sql: &str) {
        if let Some(pg) = &self.pg {
            pg.query(sql);
            return;
        }
        let out = self
            .command("sqlite3")
            .arg(self.path().join("paddock.db"))
            .arg(sql)
            .output()
            .expect("sqlite3 must be installed to run these tests (apt-get install sqlite3)");
        assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Reads one integer from the master's database with the `sqlite3` CLI (or `psql`, on
    /// PostgreSQL), read-only use.
    pub fn db_scalar(&self, sql: &str) -> Option<i64> {
        if let Some(pg) = &self.pg {
            return pg.query(sql).trim().parse().ok();
        }
        let out = self
            .command("sqlite3")
            .arg(self.path().join("paddock.db"))
            .arg(sql)
            .output()
            .expect("sqlite3 must be installed to run these tests (apt-get install sqlite3)");
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Polls `f` until it returns `Some`, failing the test after [`DEADLINE`].
    pub fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        self.wait_long(what, DEADLINE, f)
    }

    /// On a failed wait: the builds by state, and with `PADDOCK_TEST_KEEP=DIR` a copy of the
    /// bed's database and master log in DIR (the bed itself is deleted as the test unwinds).
    fn kept_for_debugging(&self) -> String {
        let builds: Option<Vec<Value>> = self
            .http
            .get(format!("{}/api/builds?limit=1000", self.url()))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|v| v["builds"].as_array().cloned());
        let mut by_state = std::collections::BTreeMap::<String, usize>::new();
        for b in builds.iter().flatten() {
            *by_state.entry(b["state"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
        let mut out = format!("{by_state:?}");
        if let Some(dir) = std::env::var_os("PADDOCK_TEST_KEEP").map(PathBuf::from) {
            let dest = dir.join(format!("bed-{}-{}", std::process::id(), self.port));
            let copied = std::fs::create_dir_all(&dest)
                .and_then(|_| std::fs::copy(self.path().join("paddock.db"), dest.join("paddock.db")))
                .and_then(|_| std::fs::copy(&self.master_log, dest.join("master.log")));
            out.push_str(&format!("\nkept in {}: {copied:?}", dest.display()));
        }
        out
    }

    /// Like [`Bed::wait`] with a deadline of its own, for waits on many events at once.
    pub fn wait_long<T>(&self, what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > deadline {
                // Lossy: a log with a stray invalid byte must still show its tail.
                let log = String::from_utf8_lossy(&std::fs::read(&self.master_log).unwrap_or_default()).into_owned();
                let tail: String =
                    log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                panic!(
                    "timed out waiting for: {what}\n--- builds ---\n{}\n--- master log tail ---\n{tail}",
                    self.kept_for_debugging()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET a JSON API path.
    pub fn get(&self, path: &str) -> Value {
        let resp = self.http.get(format!("{}{path}", self.url())).send().expect("GET");
        let status = resp.status();
        if !status.is_success() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "GET {path}: {status}: {}\n--- master log tail ---\n{}",
                resp.text().unwrap_or_default(),
                tail.join("\n")
            );
        }
        resp.json().expect("json")
    }

    /// All builds (newest first).
    pub fn builds(&self) -> Vec<Value> {
        self.get("/api/builds?limit=1000")["builds"].as_array().cloned().unwrap_or_default()
    }

    /// All machines.
    pub fn machines(&self) -> Vec<Value> {
        self.get("/api/machines")["machines"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until exactly `n` builds exist and none is queued or running; returns them.
    pub fn wait_builds_done(&self, n: usize) -> Vec<Value> {
        self.wait(&format!("{n} finished builds"), || {
            let builds = self.builds();
            let done = builds.iter().all(|b| !matches!(b["state"].as_str(), Some("queued") | Some("running")));
            (done && builds.len() == n).then_some(builds)
        })
    }

    /// Pids of agent processes started from this bed (found by their machine key).
    pub fn agent_pids(&self) -> Vec<i32> {
        let root = std::fs::canonicalize(self.path()).unwrap_or_else(|_| self.path().to_path_buf());
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| is_agent(*pid) && machine_key(*pid).is_some_and(|k| Path::new(&k).starts_with(&root)))
            .collect()
    }

    /// The agent process of machine `id` (inside its sandbox: not the bwrap the master started).
    pub fn agent_of(&self, id: i64) -> i32 {
        self.wait(&format!("the agent process of machine {id}"), || {
            machine_processes(self.path(), id).into_iter().find(|p| is_agent(*p))
        })
    }

    /// The running master's pid.
    pub fn master_pid(&self) -> u32 {
        self.master.as_ref().expect("master running").id()
    }

    /// Whether the master started by the bed still runs.
    pub fn master_alive(&mut self) -> bool {
        self.master.as_mut().is_some_and(|m| matches!(m.try_wait(), Ok(None)))
    }

    /// Runs `paddock run paddock.toml` (as the bed's user) with `env`, expecting it to refuse
    /// to start; returns what it printed.
    pub fn master_refuses(&self, env: &[(&str, &str)]) -> String {
        let mut cmd = self.command(paddock_bin());
        cmd.arg("run").arg(self.path().join("paddock.toml")).current_dir(self.path()).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start master");
        let start = Instant::now();
        while matches!(child.try_wait(), Ok(None)) {
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("the master started, though it should have refused to");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("wait");
        assert!(!out.status.success(), "the master should have refused to start");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Stops the master with SIGKILL (a crash).
    pub fn kill_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    /// Sends `signal` (e.g. `-STOP`) to the master without waiting.
    pub fn signal_master(&self, signal: &str) {
        let status = Command::new("kill").arg(signal).arg(self.master_pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Bytes received on the master's port but not yet read by the master (summed over its
    /// established connections, from /proc/net/tcp{,6}): what a frozen master holds unread.
    pub fn unread_bytes_at_master(&self) -> u64 {
        let mut total = 0;
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(st), Some(queues)) = (cols.get(1), cols.get(3), cols.get(4)) else { continue };
                let port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                if port != Some(self.port) || *st != "01" {
                    continue;
                }
                let rx = queues.split(':').nth(1).and_then(|q| u64::from_str_radix(q, 16).ok()).unwrap_or(0);
                total += rx;
            }
        }
        total
    }

    /// The stored log text of one step of a build, exactly (read with the `sqlite3` CLI).
    pub fn step_log(&self, build: i64, step: i64) -> String {
        if let Some(pg) = &self.pg {
            let hex = pg.query(&format!(
                "SELECT encode(convert_to(text, 'UTF8'), 'hex') FROM log_chunks WHERE build_id = {build} AND step_idx = {step} ORDER BY id"
            ));
            let hex: String = hex.split_whitespace().collect();
            let bytes: Vec<u8> =
                (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect();
            return String::from_utf8(bytes).expect("the log is UTF-8");
        }
        let out = Command::new("sqlite3")
            .arg(self.path().join("paddock.db"))
            .arg(format!("SELECT hex(text) FROM log_chunks WHERE build_id = {build} AND step_idx = {step} ORDER BY id"))
            .output()
            .expect("sqlite3 must be installed to run these tests (apt-get install sqlite3)");
        assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
        let hex: String = String::from_utf8_lossy(&out.stdout).split_whitespace().collect();
        let bytes: Vec<u8> =
            (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect();
        String::from_utf8(bytes).expect("the log is UTF-8")
    }

    /// Sends SIGTERM to the master without waiting.
    pub fn term_master(&self) {
        let m = self.master.as_ref().expect("master running");
        let _ = Command::new("kill").arg("-TERM").arg(m.id().to_string()).status();
    }

    /// Waits for the master to exit and returns its status.
    pub fn wait_master_exit(&mut self) -> std::process::ExitStatus {
        let mut m = self.master.take().expect("master running");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = m.try_wait() {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "master did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the master with SIGTERM and waits for it to exit.
    pub fn stop_master(&mut self) -> std::process::ExitStatus {
        self.term_master();
        self.wait_master_exit()
    }

    /// The master's log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.master_log).unwrap_or_default()).into_owned()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut m) = self.master.take() {
            let _ = Command::new("kill").arg("-TERM").arg(m.id().to_string()).status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = m.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = m.kill();
            let _ = m.wait();
        }
        // Never leave a machine's process behind, even when a test failed half-way.
        let root = std::fs::canonicalize(self.path()).unwrap_or_else(|_| self.path().to_path_buf());
        for _ in 0..50 {
            let left = processes_under(&root);
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pg) = self.pg.take() {
            pg.drop_it();
        }
    }
}

/// Counts live agent processes under a folder (for sampling from another thread).
pub struct AgentProbe {
    root: PathBuf,
}

impl AgentProbe {
    /// Probes agents whose working directory is under `root`.
    pub fn new(root: &Path) -> AgentProbe {
        AgentProbe { root: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()) }
    }

    /// How many machines have a live process now. Counted by machine key, not by process: a
    /// step just forked by its agent (before it execs) looks exactly like the agent.
    pub fn count(&self) -> usize {
        let root = self.root.to_string_lossy().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
        let keys: std::collections::BTreeSet<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                !matches!(stat.rsplit(')').next().and_then(|r| r.trim_start().chars().next()), Some('Z') | None)
            })
            .filter_map(|pid| {
                let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                env.split(|b| *b == 0).find_map(|v| {
                    let v = String::from_utf8_lossy(v);
                    v.strip_prefix("PADDOCK_MACHINE_KEY=").filter(|k| k.starts_with(&root)).map(str::to_string)
                })
            })
            .collect();
        keys.len()
    }
}

/// Live processes whose machine key lies under `root`.
fn processes_under(root: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| live(*pid) && machine_key(*pid).is_some_and(|k| Path::new(&k).starts_with(root)))
        .collect()
}

/// Whether `pid` is a process that has not exited (not a zombie).
fn live(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !matches!(stat.rsplit(')').next().and_then(|r| r.trim_start().chars().next()), Some('Z') | Some('X') | None)
}

/// The command name of `pid` (`bwrap` for a sandbox's own processes).
fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

/// The machine key in a process's environment.
fn machine_key(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|v| String::from_utf8_lossy(v).strip_prefix("PADDOCK_MACHINE_KEY=").map(str::to_string))
}

/// Whether `pid`'s parent belongs to the same machine (and is not the sandbox around it): then
/// it is a process the agent just forked (to exec a step or git), which looks like the agent
/// until it execs.
fn forked_by_its_machine(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse::<i32>().ok());
    match (ppid, machine_key(pid)) {
        (Some(ppid), Some(key)) => comm(ppid) != "bwrap" && machine_key(ppid).as_deref() == Some(key.as_str()),
        _ => false,
    }
}

/// Whether `pid` is a live `paddock agent` process started by a local provisioner (the agent
/// itself, not the bwrap processes of its sandbox).
pub fn is_agent(pid: i32) -> bool {
    if !live(pid) || comm(pid) == "bwrap" {
        return false;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    environ.split(|b| *b == 0).any(|v| v.starts_with(b"PADDOCK_MACHINE_ID="))
        && cmdline.split(|b| *b == 0).any(|a| a == b"agent")
        && !forked_by_its_machine(pid)
}

/// Live processes (agent or build steps) of machine `id` of the master rooted at `root`.
pub fn machine_processes(root: &Path, id: i64) -> Vec<i32> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let suffix = format!("/machine-{id}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !matches!(stat.rsplit(')').next().and_then(|r| r.trim_start().chars().next()), Some('Z') | None)
        })
        .filter(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            env.split(|b| *b == 0).any(|v| {
                let v = String::from_utf8_lossy(v);
                v.strip_prefix("PADDOCK_MACHINE_KEY=")
                    .is_some_and(|k| k.starts_with(&*root.to_string_lossy()) && k.ends_with(&suffix))
            })
        })
        .collect()
}

/// A master running inside the test process on a [`paddock::clock::ManualClock`], so the test
/// moves time (nightly schedules, spend caps).
pub struct InProcessMaster {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    master: Option<tokio::task::JoinHandle<Result<(), paddock::runtime::MasterError>>>,
}

impl InProcessMaster {
    /// Starts the master of `config` on `clock` and waits for the head of `main` to be recorded.
    pub fn start(bed: &Bed, config: &std::path::Path, clock: &paddock::clock::ManualClock) -> InProcessMaster {
        Self::start_with(bed, config, clock, Default::default())
    }

    /// Like [`InProcessMaster::start`], with `provisioners` instead of the config's for the
    /// pools they name.
    pub fn start_with(
        bed: &Bed,
        config: &std::path::Path,
        clock: &paddock::clock::ManualClock,
        provisioners: std::collections::HashMap<String, std::sync::Arc<dyn paddock_provisioners::Provisioner>>,
    ) -> InProcessMaster {
        confine_config(config);
        let config = paddock::config::load(config).expect("config");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let opts = paddock::runtime::RunOptions {
            on_ready: Some(ready_tx),
            provisioners,
            ..paddock::runtime::RunOptions::new(paddock_bin(), std::sync::Arc::new(clock.clone()))
        };
        let master = rt.spawn(paddock::runtime::run(config, opts, async {
            let _ = stop_rx.await;
        }));
        rt.block_on(ready_rx).expect("master ready");
        bed.wait("head of main recorded", || {
            bed.db_scalar("SELECT COUNT(*) FROM branch_heads WHERE branch = 'main'").filter(|n| *n > 0)
        });
        InProcessMaster { rt, stop: Some(stop_tx), master: Some(master) }
    }

    /// Stops the master and checks it ended cleanly.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(master) = self.master.take() {
            self.rt.block_on(master).expect("join").expect("master ran cleanly");
        }
    }
}

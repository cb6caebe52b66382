//! `paddock demo`: Paddock's main job on its embedded default, from nothing but this binary.
//!
//! It creates a git repository with two branches and a config with local latent workers,
//! starts the master, commits to both branches so builds start, and prints every build's
//! progress and how to make another commit and watch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::store::{BuildFilter, Store};

const CONFIG: &str = r#"# Paddock demo configuration, written by `paddock demo`. Edit it and run
# `paddock check-config paddock.toml` to see the expanded builders.

[master]
url = "http://127.0.0.1:@PORT@"
database = "sqlite://paddock.db"

[[repo]]
name = "demo"
url = "repo"                    # the demo repository beside this file
branches = ["main", "feature/*"]
poll = "2s"

[pool.local]
provisioner = "local"           # each machine is a `paddock agent` child process
max_instances = 2               # at most two builds at once
idle_timeout = "15s"            # a machine idle this long is stopped
hourly_price = 0.05             # a nominal price, so `paddock cost` has something to show
boot_timeout = "30s"
@ISOLATION@
# Two builders from one matrix: test-quick and test-full.
[[builder]]
name = "test-{suite}"
repo = "demo"
pool = "local"
matrix = { suite = ["quick", "full"] }
env = { SUITE = "{suite}" }
steps = [
  { name = "test", run = "sh ./test.sh {suite}", timeout = "2m" },
  { name = "report", run = "echo finished the $SUITE suite at $(git rev-parse --short HEAD)", always = true },
]

[[builder]]
name = "docs"
repo = "demo"
pool = "local"
steps = [{ run = "wc -w docs/*.md" }]

[[scheduler]]
kind = "branch"
repo = "demo"
builders = ["test-*"]
tree_stable = "2s"              # a burst of commits gives one build of the newest
ignore = ["docs/**"]            # docs-only commits do not run the tests

[[scheduler]]
kind = "branch"
repo = "demo"
builders = ["docs"]
files = ["docs/**"]             # only commits touching docs build the docs
"#;

const TEST_SH: &str = r#"#!/bin/sh
# The demo's "test suite": it counts lines and takes a moment, like a real one.
set -e
echo "running the $1 suite on $(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo detached)"
for f in src/*.txt; do
  echo "checking $f: $(wc -l < "$f") lines"
done
if [ "$1" = full ]; then sleep 2; else sleep 1; fi
grep -q broken src/*.txt && { echo "found 'broken' in the source"; exit 1; }
echo ok
"#;

async fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Paddock Demo")
        .env("GIT_AUTHOR_EMAIL", "demo@paddock.invalid")
        .env("GIT_COMMITTER_NAME", "Paddock Demo")
        .env("GIT_COMMITTER_EMAIL", "demo@paddock.invalid")
        .output()
        .await
        .context("cannot run git; is it installed?")?;
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn commit_file(repo: &Path, file: &str, text: &str, message: &str) -> anyhow::Result<()> {
    let path = repo.join(file);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut old = tokio::fs::read_to_string(&path).await.unwrap_or_default();
    old.push_str(text);
    tokio::fs::write(&path, old).await?;
    git(repo, &["add", file]).await?;
    git(repo, &["commit", "-q", "-m", message]).await?;
    Ok(())
}

/// The demo's admin, with a random password and an API token kept in files only their owner
/// can read (written before the account, so a failed write never leaves an account nobody
/// knows the password of). Returns the password and the token file.
async fn demo_admin(store: &Store, dir: &Path) -> anyhow::Result<(String, std::path::PathBuf)> {
    use crate::accounts;
    let password_file = dir.join("admin.password");
    let token_file = dir.join("admin.token");
    let kept = |path: std::path::PathBuf| async move {
        tokio::fs::read_to_string(&path).await.ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
    };
    let password = match kept(password_file.clone()).await {
        Some(p) => p,
        None => accounts::new_secret("").get(..16).unwrap_or_default().to_string(),
    };
    write_private(&password_file, &password).await?;
    let now = crate::clock::Clock::now(&crate::clock::SystemClock);
    match store.user_with_hash("admin").await? {
        None => {
            store.add_user("admin", accounts::Role::Admin, &accounts::hash_password(&password)?, now).await?;
        }
        // The password file was lost or changed: the account follows the file.
        Some((_, hash)) if !accounts::verify_password(&password, &hash) => {
            store.set_password("admin", &accounts::hash_password(&password)?).await?;
        }
        Some(_) => {}
    }
    match kept(token_file.clone()).await {
        Some(token) => {
            write_private(&token_file, &token).await?;
            // A database made afresh beside an old token file: the token is made valid again.
            if store.token_user(&accounts::secret_hash(&token), now).await?.is_none() {
                store.create_token("admin", "demo", &accounts::secret_hash(&token), now).await?;
            }
        }
        None => {
            let token = accounts::new_secret(accounts::TOKEN_PREFIX);
            write_private(&token_file, &token).await?;
            store.create_token("admin", "demo", &accounts::secret_hash(&token), now).await?;
        }
    }
    Ok((password, token_file))
}

/// Writes `text` to a file only its owner may read, whatever it was before.
async fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).await?;
    // An existing file keeps its old mode through `open`: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).await?;
    f.write_all(format!("{text}\n").as_bytes()).await?;
    f.flush().await
}

async fn create_repo(repo: &Path) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(repo).await?;
    // Machines may run as another user (a root demo's `run_as`) and must read it, whatever the
    // umask.
    git(repo, &["init", "-q", "-b", "main", "--shared=0644"]).await?;
    // So the person trying the demo can commit here without a global git identity.
    git(repo, &["config", "user.name", "Paddock Demo"]).await?;
    git(repo, &["config", "user.email", "demo@paddock.invalid"]).await?;
    tokio::fs::write(repo.join("test.sh"), TEST_SH).await?;
    tokio::fs::create_dir_all(repo.join("src")).await?;
    tokio::fs::write(repo.join("src/app.txt"), "hello\n").await?;
    tokio::fs::create_dir_all(repo.join("docs")).await?;
    tokio::fs::write(repo.join("docs/index.md"), "# Demo\n\nThe demo project.\n").await?;
    tokio::fs::write(repo.join("README.md"), "A demo project for Paddock.\n").await?;
    git(repo, &["add", "."]).await?;
    git(repo, &["commit", "-q", "-m", "Start the demo project"]).await?;
    git(repo, &["branch", "feature/greeting"]).await?;
    Ok(())
}

/// The user a root demo's builds run as when none is named; the demo creates it if missing.
pub const DEFAULT_RUN_AS: &str = "paddock-build";

/// How the demo's local pool confines its machines, as lines of its config: the sandbox when
/// bubblewrap is installed (as `run_as` when the demo runs as root: a named user must exist,
/// the default one is created), else the opt-out, said once.
async fn isolation_lines(run_as: Option<&str>) -> anyhow::Result<String> {
    let root = nix::unistd::geteuid().is_root();
    if crate::runtime::isolation::find_program("bwrap").is_none() {
        println!(
            "Note: bubblewrap is not installed, so the demo's builds run unsandboxed as {}, with access to \
             its files. To sandbox them: apt-get install bubblewrap, then delete paddock.toml in the demo folder.",
            if root { "root" } else { "you" }
        );
        return Ok("# bubblewrap (bwrap) was not found when this file was written, so builds run unsandboxed as\n\
                   # the master's user. To sandbox them: apt-get install bubblewrap, and delete the next line.\n\
                   isolation = \"none\"\n"
            .to_string());
    }
    if !root {
        return Ok(String::new());
    }
    let user = run_as.unwrap_or(DEFAULT_RUN_AS);
    let found = |name: &str| matches!(nix::unistd::User::from_name(name), Ok(Some(u)) if !u.uid.is_root());
    if !found(user) && run_as.is_none() {
        // Builds never run as root; the default user is one the demo may make for itself.
        create_system_user(user).await?;
    }
    if !found(user) {
        bail!(
            "the demo runs as root, and its builds must not: --run-as {user} names no unprivileged user; \
             create it (useradd --system --no-create-home {user}), name another, or run the demo as a normal user"
        );
    }
    Ok(format!("run_as = \"{user}\"               # the demo runs as root; its builds run as this user\n"))
}

/// Creates an unprivileged system user with no home and no login shell.
async fn create_system_user(name: &str) -> anyhow::Result<()> {
    println!("The demo runs as root; creating the unprivileged user {name} for its builds (useradd --system).");
    let out = tokio::process::Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        .output()
        .await
        .context("cannot run useradd to create the demo's build user")?;
    if !out.status.success() {
        bail!("useradd could not create the demo's build user {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs the demo in `dir` with the master on `port`, until Ctrl-C. `run_as` is the user its
/// builds run as when the demo runs as root ([`DEFAULT_RUN_AS`] when `None`).
pub async fn run(dir: &Path, port: u16, run_as: Option<&str>) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir).await.with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = tokio::fs::canonicalize(dir).await?;
    let repo = dir.join("repo");
    if !repo.join(".git").exists() {
        create_repo(&repo).await?;
    }
    let config_path = dir.join("paddock.toml");
    if !config_path.exists() {
        let text = CONFIG.replace("@PORT@", &port.to_string()).replace("@ISOLATION@", &isolation_lines(run_as).await?);
        tokio::fs::write(&config_path, text).await?;
    }
    let config = crate::config::load(&config_path)?;
    let database = config.master.database.clone();
    let url = config.master.url.clone();

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let program = std::env::current_exe().context("cannot find the paddock executable")?;
    let opts = crate::runtime::RunOptions {
        on_ready: Some(ready_tx),
        ..crate::runtime::RunOptions::new(program, Arc::new(crate::clock::SystemClock))
    };
    let master = tokio::spawn(crate::runtime::run(config, opts, crate::cli::shutdown_signal()));
    if ready_rx.await.is_err() {
        return match master.await {
            Ok(Err(e)) => Err(e.into()),
            _ => bail!("the master stopped before it was ready"),
        };
    }
    let store = Store::open(&database).await?;
    let (password, token) = demo_admin(&store, &dir).await?;
    wait_for_heads(&store).await?;

    commit_file(&repo, "src/app.txt", "a line from the demo\n", "Add a line to the app").await?;
    git(&repo, &["checkout", "-q", "feature/greeting"]).await?;
    commit_file(&repo, "src/greeting.txt", "hello, world\n", "Add a greeting").await?;
    git(&repo, &["checkout", "-q", "main"]).await?;

    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "paddock".into());
    println!();
    println!("Paddock demo: master at {url}, repository at {}", repo.display());
    println!("Two commits were just made (on main and on feature/greeting); builds follow below.");
    println!();
    println!("Web UI: {url}/  (log in as admin, password {password})");
    println!();
    println!("Try it yourself, in another terminal:");
    println!("  cd {} && echo 'one more line' >> src/app.txt && git commit -qam 'My change'", repo.display());
    println!("  export PADDOCK_TOKEN=$(cat {})   # the admin's API token, for the commands below", token.display());
    println!("  {exe} builds --master {url}          # the build table");
    println!("  {exe} log 1 --master {url}           # a build's log");
    println!("  {exe} force docs --branch main --master {url}");
    println!("  {exe} cost --by builder --master {url}   # what the machines cost, busy and idle");
    println!("  (a commit whose text contains 'broken' makes the tests fail; docs/ changes build only the docs)");
    println!("Stop with Ctrl-C: running builds finish, machines stop.");
    println!();

    let watcher = tokio::spawn(watch(store));
    let result = master.await;
    watcher.abort();
    match result {
        Ok(r) => r.map_err(Into::into),
        Err(e) => bail!("master task failed: {e}"),
    }
}

async fn wait_for_heads(store: &Store) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while store.heads("demo").await?.len() < 2 {
        if tokio::time::Instant::now() > deadline {
            bail!("the poller did not see the demo repository's branches within a minute");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Prints each build when its state changes.
async fn watch(store: Store) {
    let mut seen: HashMap<crate::core::BuildId, crate::core::build::BuildState> = HashMap::new();
    loop {
        if let Ok(builds) = store.list_builds(&BuildFilter { limit: Some(50), ..Default::default() }).await {
            for b in builds.iter().rev() {
                if seen.get(&b.id) != Some(&b.state) {
                    let machine = b.machine.map(|m| format!(" on machine {m}")).unwrap_or_default();
                    println!(
                        "build {:>3}  {:<12} {:<18} {:.10}  {}{machine}",
                        b.id, b.builder, b.branch, b.revision, b.state
                    );
                    seen.insert(b.id, b.state);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

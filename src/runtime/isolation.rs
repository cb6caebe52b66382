//! What keeps a build away from the master: the modes of the master's own files, and for each
//! local pool the sandbox its machines get, with the refusals when a pool could not be
//! confined as configured (checked at start, so a misconfigured master never runs a build).

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use paddock_provisioners::local::{self, LocalProvisioner, ProbeError, RunAs, Sandbox};

use crate::config::{Config, Isolation, Pool};

/// Why the master will not start its local machines, or cannot protect its files.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// A local pool cannot be confined as configured; the message says how to fix it.
    #[error("pool {pool}: {message}")]
    Pool { pool: String, message: String },
    /// A file or folder of the master could not be given its private mode.
    #[error("cannot make {path} private to the master: {source}")]
    Files { path: PathBuf, source: std::io::Error },
    /// A file of the master lies where a sandbox cannot hide it.
    #[error("{0}")]
    Layout(String),
}

/// Top-level folders of the system that a sandbox cannot cover with an empty one: a master's
/// file lying directly in one must move into a folder of its own.
const SYSTEM_FOLDERS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin", "/sys",
    "/usr", "/var",
];

/// Creates the state folder private to the master (0700) and makes the SQLite database and
/// its `-wal`, `-shm` and `-journal` files readable by the master alone (0600). SQLite gives
/// the files it creates later the database's mode, so they stay private too.
pub fn protect_files(config: &Config) -> Result<(), IsolationError> {
    let private = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|source| IsolationError::Files { path: path.to_path_buf(), source })
    };
    let state = &config.master.state_dir;
    std::fs::create_dir_all(state).map_err(|source| IsolationError::Files { path: state.clone(), source })?;
    private(state, 0o700)?;
    let Some(db) = config.master.sqlite_file() else { return Ok(()) };
    if db.parent().is_some_and(Path::is_dir) && !db.exists() {
        // Made here with its final mode, so it is never readable by others, even briefly.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&db)
            .map_err(|source| IsolationError::Files { path: db.clone(), source })?;
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.clone().into_os_string();
        name.push(suffix);
        let path = PathBuf::from(name);
        if path.exists() {
            private(&path, 0o600)?;
        }
    }
    Ok(())
}

/// The local provisioner of `pool`, confined as the pool says, after checking that it can be:
/// bwrap is installed and can set up the sandbox here, a root master names an existing
/// unprivileged `run_as` user, and no folder bound into the machines holds the master's files.
/// `isolation = "none"` is logged as a warning.
pub async fn local_provisioner(
    config: &Config,
    pool: &Pool,
    program: PathBuf,
) -> Result<LocalProvisioner, IsolationError> {
    let base = config.master.state_dir.join("machines").join(&pool.name);
    let provisioner = LocalProvisioner::new(program.clone(), base);
    let err = |message: String| IsolationError::Pool { pool: pool.name.clone(), message };
    let root = nix::unistd::geteuid().is_root();
    if pool.isolation == Isolation::None {
        let who = if root { "root".to_string() } else { current_user() };
        tracing::warn!(
            pool = %pool.name,
            "isolation = \"none\": build steps run unsandboxed as {who}, the master's own user, with access to \
             its files (database, config, secrets) and its processes"
        );
        return Ok(provisioner);
    }
    let bwrap = find_program("bwrap").ok_or_else(|| {
        err(format!(
            "the sandbox needs bubblewrap, and `bwrap` is not on PATH: install it (apt-get install bubblewrap), \
             or set isolation = \"none\" in [pool.{}] to run its builds unsandboxed as the master's user",
            pool.name
        ))
    })?;
    let user = match (&pool.run_as, root) {
        (None, true) => {
            return Err(err(format!(
                "the master runs as root, and its builds must not: create an unprivileged user \
                 (useradd --system --no-create-home paddock-build) and set run_as = \"paddock-build\" in [pool.{0}], \
                 or set isolation = \"none\" in [pool.{0}] to run its builds as root, unsandboxed",
                pool.name
            )))
        }
        (None, false) => None,
        (Some(name), _) => {
            let found =
                nix::unistd::User::from_name(name).map_err(|e| err(format!("cannot look up user `{name}`: {e}")))?;
            let Some(found) = found else {
                return Err(err(format!(
                    "run_as user `{name}` does not exist: create it with useradd --system --no-create-home {name}"
                )));
            };
            if found.uid.is_root() {
                return Err(err(format!("run_as user `{name}` is root (uid 0); name an unprivileged user")));
            }
            if !root && found.uid != nix::unistd::geteuid() {
                return Err(err(format!(
                    "run_as = \"{name}\" needs a master running as root (this one runs as {}); remove run_as to run \
                     the builds sandboxed as the master's user",
                    current_user()
                )));
            }
            if root {
                let setpriv = find_program("setpriv").ok_or_else(|| {
                    err("run_as needs `setpriv` (util-linux), which is not on PATH: apt-get install util-linux".into())
                })?;
                Some(RunAs { name: name.clone(), uid: found.uid.as_raw(), gid: found.gid.as_raw(), setpriv })
            } else {
                None
            }
        }
    };
    let hide = hidden_paths(config)?;
    let read_only = bound_paths(config, pool)?;
    let provisioner = provisioner.with_isolation(local::Isolation::Sandbox(Sandbox { bwrap, hide, read_only, user }));
    match provisioner.probe().await {
        Ok(()) => {}
        // Not fatal: its launches fail, and say so, as any broken agent program's do.
        Err(e @ ProbeError::Program(_)) => {
            let who = match &pool.run_as {
                Some(name) if root => format!(" by user {name}"),
                _ => String::new(),
            };
            tracing::warn!(pool = %pool.name, "{e}{who}: its machines will fail to start");
        }
        Err(ProbeError::Sandbox(e)) => {
            return Err(err(format!(
                "bubblewrap cannot set up a sandbox here: {e}. If unprivileged user namespaces are disabled, enable \
                 them (sysctl kernel.unprivileged_userns_clone=1) or run the master as root with run_as; or set \
                 isolation = \"none\" in [pool.{}] to run builds unsandboxed",
                pool.name
            )))
        }
    }
    Ok(provisioner)
}

/// The master's files a build must never reach, with what they are: every file the config
/// names, and the config itself.
fn master_files(config: &Config) -> Vec<(&'static str, PathBuf)> {
    let mut files = vec![("config", config.path.clone())];
    if let Some(db) = config.master.sqlite_file() {
        files.push(("database", db));
    }
    if let Some(s) = &config.master.secrets_file {
        files.push(("secrets file", s.clone()));
    }
    for n in &config.notifiers {
        if let crate::config::NotifierKind::Irc { ca_file: Some(f), .. }
        | crate::config::NotifierKind::Email { ca_file: Some(f), .. } = &n.kind
        {
            files.push(("notifier CA file", f.clone()));
        }
    }
    files
}

/// What a machine must not see: the state folder (mirrors, every machine's work directory),
/// the folder of each of the master's files (so their siblings, backups and SQLite's `-wal`
/// files go too), and the master's home (credentials such as ~/.aws, ~/.ssh).
fn hidden_paths(config: &Config) -> Result<Vec<PathBuf>, IsolationError> {
    let mut hide = vec![absolute(&config.master.state_dir)];
    for (what, file) in master_files(config) {
        let file = absolute(&file);
        let folder = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        if SYSTEM_FOLDERS.iter().any(|s| Path::new(s) == folder) {
            return Err(IsolationError::Layout(format!(
                "the master's {what} {} lies directly in {}, which a sandbox cannot hide from builds without \
                 hiding the system: move it into a folder of its own (e.g. {}/paddock/)",
                file.display(),
                folder.display(),
                folder.display().to_string().trim_end_matches('/')
            )));
        }
        hide.push(folder);
    }
    if SYSTEM_FOLDERS.iter().any(|s| Path::new(s) == hide[0]) {
        return Err(IsolationError::Layout(format!(
            "state_dir {} is a system folder; give the master a folder of its own",
            hide[0].display()
        )));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        if home.is_absolute() && !SYSTEM_FOLDERS.iter().any(|s| Path::new(s) == home) {
            hide.push(absolute(&home));
        }
    }
    Ok(hide)
}

/// What the pool's machines see read-only besides the host's system: the local repositories
/// its builders clone, and the CA certificates the agent is told to trust. None may hold a
/// file of the master's or lie in its state folder.
fn bound_paths(config: &Config, pool: &Pool) -> Result<Vec<PathBuf>, IsolationError> {
    let mut bound: Vec<(String, PathBuf)> = Vec::new();
    for repo in &config.repos {
        if !config.builders.iter().any(|b| b.pool == pool.name && b.repo == repo.name) {
            continue;
        }
        let path = repo.url.strip_prefix("file://").unwrap_or(&repo.url);
        if path.starts_with('/') {
            bound.push((format!("repository `{}`", repo.name), absolute(Path::new(path))));
        }
    }
    for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(p) = std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute()) {
            bound.push((var.to_string(), absolute(&p)));
        }
    }
    let state = absolute(&config.master.state_dir);
    for (what, path) in &bound {
        if path.starts_with(&state) {
            return Err(IsolationError::Pool {
                pool: pool.name.clone(),
                message: format!(
                    "{what} at {} lies in the master's state folder, which machines must not see",
                    path.display()
                ),
            });
        }
        for (file_what, file) in master_files(config) {
            if absolute(&file).starts_with(path) {
                return Err(IsolationError::Pool {
                    pool: pool.name.clone(),
                    message: format!(
                        "{what} at {} holds the master's {file_what} {}, which its machines would see: keep the \
                         master's files out of it",
                        path.display(),
                        file.display()
                    ),
                });
            }
        }
        if state.starts_with(path) {
            return Err(IsolationError::Pool {
                pool: pool.name.clone(),
                message: format!(
                    "{what} at {} holds the master's state folder {}, which its machines would see",
                    path.display(),
                    state.display()
                ),
            });
        }
    }
    Ok(bound.into_iter().map(|(_, p)| p).collect())
}

/// `path` with symbolic links resolved when it exists (what the sandbox must cover is the real
/// folder), else as given.
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The first executable file named `name` in the folders of PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The name of the user the master runs as (its uid when it has no name).
fn current_user() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => format!("user {}", u.name),
        _ => format!("uid {uid}"),
    }
}

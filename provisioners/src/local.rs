//! The `local` provisioner: each machine is a `paddock agent` child process in its own work
//! directory and its own process group. It is Paddock's embedded default: no cloud account.
//!
//! A machine is recognised across master restarts by its pid *and* the `PADDOCK_MACHINE_KEY` in
//! its environment (inherited by the steps it runs), so a recycled pid is never mistaken for
//! one of ours and no step outlives its machine.
//!
//! Build steps run code from whoever can push, so a machine is normally confined in a
//! bubblewrap sandbox ([`Isolation::Sandbox`]): the host read-only, the master's folders
//! hidden, its own work directory the only writable place, and PID and IPC namespaces of its
//! own so it can neither see nor signal any process outside it. The pid the master records is
//! then bwrap's; the agent runs inside, as a grandchild, in the same process group.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::{BoxFuture, LaunchSpec, Launched, Listed, ProvisionError, Provisioner};

/// Environment variable carrying the machine id into the agent process.
pub const MACHINE_ID_ENV: &str = "PADDOCK_MACHINE_ID";
/// Environment variable that marks every process of a machine (the agent and the steps it
/// starts inherit it): its work directory, unique per master and machine.
pub const MACHINE_KEY_ENV: &str = "PADDOCK_MACHINE_KEY";
/// Environment variable carrying the one-time token (kept off the command line, where `ps`
/// would show it).
pub const TOKEN_ENV: &str = "PADDOCK_AGENT_TOKEN";

/// The only variables of the master's environment that a local machine inherits.
pub const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "TERM",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// How a local machine is kept away from the master's files and processes.
#[derive(Debug, Clone, Default)]
pub enum Isolation {
    /// No confinement: the agent runs as the master's own user, with access to everything
    /// that user can read, write or signal.
    #[default]
    None,
    /// A bubblewrap sandbox.
    Sandbox(Sandbox),
}

/// A bubblewrap sandbox for every machine of a pool: the host file system read-only, fresh
/// `/dev`, `/proc` (in a PID namespace of its own) and `/tmp`, `hide` covered by empty
/// folders, `read_only` bound back read-only, and the machine's work directory the one
/// writable place of the host. The network is shared: agents dial the master.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The `bwrap` program.
    pub bwrap: PathBuf,
    /// Folders no machine may see (the master's state, its config's, database's and secrets'
    /// folders, its home). Missing ones are skipped.
    pub hide: Vec<PathBuf>,
    /// Paths bound back read-only, at the same place (local repositories, CA files). The
    /// agent program is always bound back too.
    pub read_only: Vec<PathBuf>,
    /// The unprivileged user machines run as, when the master runs as root.
    pub user: Option<RunAs>,
}

/// An unprivileged user a root master runs its machines as. bwrap is started as root (so it
/// can reach folders only root may traverse) and `setpriv` inside drops to this user, with
/// no supplementary groups and no capabilities, before the agent starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The `setpriv` program (util-linux).
    pub setpriv: PathBuf,
}

/// Why a trial sandbox ([`LocalProvisioner::probe`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// bwrap could not set the sandbox up (what it said).
    #[error("{0}")]
    Sandbox(String),
    /// The sandbox works, but the agent program cannot be executed inside it.
    #[error("the agent program {} cannot be executed inside the sandbox", .0.display())]
    Program(PathBuf),
}

/// Starts agents as local child processes.
#[derive(Debug, Clone)]
pub struct LocalProvisioner {
    program: PathBuf,
    base_dir: PathBuf,
    grace: Duration,
    isolation: Isolation,
}

impl LocalProvisioner {
    /// Agents run `program agent …` in `base_dir/machine-<id>`.
    pub fn new(program: PathBuf, base_dir: PathBuf) -> Self {
        // The work directory is also the machine's key in its processes' environment: it must
        // be absolute, or two masters started from different folders would share keys.
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        LocalProvisioner { program, base_dir, grace: Duration::from_secs(10), isolation: Isolation::None }
    }

    /// Confines every machine as `isolation` says.
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// How long a stopped agent gets between SIGTERM and SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    fn workdir(&self, machine_id: i64) -> PathBuf {
        self.base_dir.join(format!("machine-{machine_id}"))
    }

    fn key(&self, machine_id: i64) -> String {
        self.workdir(machine_id).display().to_string()
    }

    async fn start(&self, spec: LaunchSpec) -> Result<Launched, ProvisionError> {
        if matches!(self.isolation, Isolation::Sandbox(_)) {
            // bwrap would start and fail inside: say it as a failed launch, as a spawn would.
            match std::fs::metadata(&self.program) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => {
                    return Err(ProvisionError::Launch(format!(
                        "cannot start {}: not an executable file",
                        self.program.display()
                    )))
                }
                Err(e) => return Err(ProvisionError::Launch(format!("cannot start {}: {e}", self.program.display()))),
            }
        }
        let dir = self.workdir(spec.machine_id);
        // Only the master (and, for `run_as`, the machine's user) may look inside.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let log_err = log.try_clone()?;
        let mut agent_args: Vec<OsString> = vec!["agent".into(), "--master".into(), spec.master_url.clone().into()];
        agent_args.extend(["--workdir".into(), dir.clone().into_os_string()]);
        let mut cmd = match &self.isolation {
            Isolation::None => {
                let mut cmd = tokio::process::Command::new(&self.program);
                cmd.args(&agent_args);
                cmd
            }
            Isolation::Sandbox(sandbox) => {
                let home = dir.join("home");
                prepare_home(&dir, &home, sandbox.user.as_ref())?;
                let mut cmd = tokio::process::Command::new(&sandbox.bwrap);
                cmd.args(self.sandbox_args(sandbox, Some(&dir)));
                cmd.arg("--");
                if let Some(user) = &sandbox.user {
                    cmd.arg(&user.setpriv).args(setpriv_args(user));
                }
                cmd.arg(&self.program).args(&agent_args);
                cmd
            }
        };
        // A machine starts with a clean environment, as a fresh VM would: the master's own
        // (webhook secrets, cloud keys, secrets that other builds use) must not reach steps.
        cmd.env_clear();
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        if let Isolation::Sandbox(sandbox) = &self.isolation {
            // The master's home and temporary folder are hidden: the machine has its own.
            cmd.env("HOME", dir.join("home")).env("TMPDIR", "/tmp");
            if let Some(user) = &sandbox.user {
                cmd.env("USER", &user.name).env("LOGNAME", &user.name);
            }
        }
        cmd.env(TOKEN_ENV, &spec.token)
            .env(MACHINE_ID_ENV, spec.machine_id.to_string())
            .env(MACHINE_KEY_ENV, self.key(spec.machine_id))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(false);
        new_session(&mut cmd);
        let mut child =
            cmd.spawn().map_err(|e| ProvisionError::Launch(format!("cannot start {}: {e}", self.program.display())))?;
        let pid = child.id().ok_or_else(|| ProvisionError::Launch("agent exited at once".into()))?;
        // Reap the child whenever it exits so it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        tracing::info!(machine = spec.machine_id, pid, pool = %spec.pool, "local agent started");
        // No zone, spot price or cloud volume: a local machine costs nothing per hour.
        Ok(Launched {
            provider_id: pid.to_string(),
            instance_type: Some("local".into()),
            lifecycle: "local".into(),
            zone: None,
            spot_price: None,
            volume_gb: None,
            volume_type: None,
            launched_at: None,
        })
    }

    /// Checks that the sandbox can be set up on this host and that the agent program can be
    /// run inside it (as the pool's user), by starting one that only tests the program.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        let Isolation::Sandbox(sandbox) = &self.isolation else { return Ok(()) };
        let mut cmd = tokio::process::Command::new(&sandbox.bwrap);
        cmd.args(self.sandbox_args(sandbox, None)).arg("--");
        if let Some(user) = &sandbox.user {
            cmd.arg(&user.setpriv).args(setpriv_args(user));
        }
        // Exit code 3 (from the test, not bwrap): the sandbox works, the program does not.
        cmd.args(["/bin/sh", "-c", "test -x \"$1\" || exit 3", "sh"])
            .arg(&self.program)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        new_session(&mut cmd);
        let out = match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(ProbeError::Sandbox(format!("cannot start {}: {e}", sandbox.bwrap.display()))),
            Err(_) => return Err(ProbeError::Sandbox("a trial sandbox did not finish within 30s".into())),
        };
        match out.status.code() {
            Some(0) => Ok(()),
            Some(3) => Err(ProbeError::Program(self.program.clone())),
            _ => {
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                Err(ProbeError::Sandbox(if stderr.is_empty() {
                    format!("a trial sandbox failed: {}", out.status)
                } else {
                    stderr
                }))
            }
        }
    }

    /// bwrap's arguments (before `--`) for the machine whose work directory is `workdir`
    /// (`None`: a probe, with no work directory).
    fn sandbox_args(&self, sandbox: &Sandbox, workdir: Option<&Path>) -> Vec<OsString> {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut mounts: Vec<Mount> = vec![
            Mount::Dev("/dev".into()),
            Mount::Proc("/proc".into()),
            Mount::Scratch("/dev/shm".into()),
            Mount::Scratch("/tmp".into()),
            Mount::Scratch("/var/tmp".into()),
            // Per-user runtime folders hold the sockets of the user's session bus and
            // service manager, through which a process could start others outside.
            Mount::Tmpfs("/run/user".into()),
        ];
        mounts.retain(|m| m.path().exists());
        let covered: Vec<PathBuf> = mounts.iter().map(|m| m.path().to_path_buf()).collect();
        mounts.extend(
            sandbox
                .hide
                .iter()
                .filter(|p| p.exists())
                .map(|p| canonical(p))
                .filter(|p| !covered.contains(p))
                .map(Mount::Tmpfs),
        );
        mounts.extend(
            sandbox
                .read_only
                .iter()
                .chain(std::iter::once(&self.program))
                .filter(|p| p.exists())
                .map(|p| Mount::ReadOnly(canonical(p))),
        );
        if let Some(dir) = workdir {
            mounts.push(Mount::Writable(canonical(dir)));
        }
        if let Some(user) = &sandbox.user {
            // Folders the user could not traverse on the host (a root-only parent of a test
            // folder, say) become empty folders it can: binding the needed paths back into them
            // reveals nothing else, since the user could not have looked inside anyway.
            let mut reach: Vec<&Path> = mounts.iter().filter(|m| m.is_bind()).map(Mount::path).collect();
            if let Some(dir) = workdir {
                reach.push(dir);
            }
            let extra: Vec<Mount> = reach
                .iter()
                .filter_map(|p| first_untraversable(&mounts, &canonical(p), user))
                .map(Mount::Tmpfs)
                .collect();
            mounts.extend(extra);
        }
        // bwrap makes the missing folders on the way to a mount point private (0700): made
        // here first, they are open to the machine's user, as the host's own folders are.
        let mut dirs: Vec<Mount> = Vec::new();
        for m in mounts.iter().filter(|m| m.is_bind()) {
            for a in m.path().ancestors().skip(1) {
                let over =
                    mounts.iter().filter(|o| a.starts_with(o.path())).max_by_key(|o| (depth(o.path()), o.is_bind()));
                if matches!(over, Some(Mount::Tmpfs(t) | Mount::Scratch(t)) if t != a) {
                    dirs.push(Mount::Dir(a.to_path_buf()));
                }
            }
        }
        mounts.extend(dirs);
        order_mounts(&mut mounts);
        let mut args: Vec<OsString> = vec!["--ro-bind".into(), "/".into(), "/".into()];
        for m in &mounts {
            args.extend(m.args());
        }
        args.push("--chdir".into());
        args.push(workdir.map(|d| canonical(d).into_os_string()).unwrap_or_else(|| "/".into()));
        // Its own PID namespace: no process outside can be seen, signalled or traced, and when
        // the agent ends, the kernel ends every process left in it. Its own IPC namespace:
        // no shared memory or semaphores of the host's.
        args.extend(["--unshare-pid".into(), "--unshare-ipc".into()]);
        args
    }

    async fn stop(&self, machine_id: i64, provider_id: &str) -> Result<(), ProvisionError> {
        let key = self.key(machine_id);
        if let Ok(pid) = provider_id.parse::<i32>() {
            if is_ours(pid, &key) {
                // The agent cancels its build and exits on SIGTERM. It shares the group of the
                // process the master started (bwrap, when sandboxed), which ends at once; the
                // machine is over when none of its processes is left.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + self.grace;
                while !processes_with_key(&key).is_empty() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if !processes_with_key(&key).is_empty() {
                    tracing::warn!(machine = machine_id, pid, "machine still running after SIGTERM; killing it");
                }
            }
        }
        // Whatever is left of the machine (the agent, or steps in their own process groups
        // after the agent died) carries its key: none of it survives the machine.
        if let Err(left) = kill_machine(&key, Duration::ZERO).await {
            return Err(ProvisionError::Terminate(format!(
                "processes {left:?} of machine {machine_id} survive SIGKILL"
            )));
        }
        let dir = self.workdir(machine_id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(machine = machine_id, dir = %dir.display(), "cannot remove work directory: {e}");
            }
        }
        Ok(())
    }
}

impl Provisioner for LocalProvisioner {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched, ProvisionError>> {
        Box::pin(self.start(spec))
    }

    fn terminate(&self, machine_id: i64, provider_id: &str) -> BoxFuture<'_, Result<(), ProvisionError>> {
        let provider_id = provider_id.to_string();
        Box::pin(async move { self.stop(machine_id, &provider_id).await })
    }

    fn list(&self, known: &[(i64, String)]) -> BoxFuture<'_, Result<Vec<Listed>, ProvisionError>> {
        let listed = known
            .iter()
            .map(|(id, provider_id)| Listed {
                provider_id: provider_id.clone(),
                machine_id: Some(*id),
                // The agent itself: steps that outlived it do not make a machine alive.
                alive: provider_id.parse::<i32>().map(|pid| is_ours(pid, &self.key(*id))).unwrap_or(false),
            })
            .collect();
        Box::pin(async move { Ok(listed) })
    }
}

/// One mount of a sandbox, at the same path inside as outside.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mount {
    Dev(PathBuf),
    Proc(PathBuf),
    /// An empty folder in memory over the path.
    Tmpfs(PathBuf),
    /// A folder made inside a tmpfs, open to everyone (0755).
    Dir(PathBuf),
    /// A tmpfs everyone may write to, like the host's `/tmp` (1777).
    Scratch(PathBuf),
    ReadOnly(PathBuf),
    Writable(PathBuf),
}

impl Mount {
    fn path(&self) -> &Path {
        match self {
            Mount::Dev(p)
            | Mount::Proc(p)
            | Mount::Tmpfs(p)
            | Mount::Dir(p)
            | Mount::Scratch(p)
            | Mount::ReadOnly(p)
            | Mount::Writable(p) => p,
        }
    }

    /// Whether it shows the host's files (and so the host's permissions) at its path.
    fn is_bind(&self) -> bool {
        matches!(self, Mount::ReadOnly(_) | Mount::Writable(_))
    }

    fn args(&self) -> Vec<OsString> {
        match self {
            Mount::Dir(p) => return vec!["--perms".into(), "0755".into(), "--dir".into(), p.as_os_str().to_owned()],
            Mount::Scratch(p) => {
                return vec!["--perms".into(), "1777".into(), "--tmpfs".into(), p.as_os_str().to_owned()]
            }
            _ => {}
        }
        let (flag, twice) = match self {
            Mount::Dev(_) => ("--dev", false),
            Mount::Proc(_) => ("--proc", false),
            Mount::Tmpfs(_) | Mount::Dir(_) | Mount::Scratch(_) => ("--tmpfs", false),
            Mount::ReadOnly(_) => ("--ro-bind", true),
            Mount::Writable(_) => ("--bind", true),
        };
        let mut out = vec![OsString::from(flag), self.path().as_os_str().to_owned()];
        if twice {
            out.push(self.path().as_os_str().to_owned());
        }
        out
    }
}

fn depth(p: &Path) -> usize {
    p.components().filter(|c| matches!(c, Component::Normal(_))).count()
}

/// Sorts mounts so that the most specific path wins: shallower paths first, and at one path a
/// folder is hidden before anything is bound back onto it. Duplicates go.
fn order_mounts(mounts: &mut Vec<Mount>) {
    mounts.sort_by_key(|m| (depth(m.path()), m.is_bind(), matches!(m, Mount::Dir(_))));
    let mut seen: Vec<Mount> = Vec::new();
    mounts.retain(|m| {
        let dup = seen.contains(m);
        seen.push(m.clone());
        !dup
    });
}

/// The shallowest folder on the way to `path` (excluding `path`) that `user` could not
/// traverse inside the sandbox described by `mounts` (on top of the read-only host), if any.
fn first_untraversable(mounts: &[Mount], path: &Path, user: &RunAs) -> Option<PathBuf> {
    let mut at = PathBuf::from("/");
    let parents: Vec<Component> = path.components().collect();
    for c in parents.iter().take(parents.len().saturating_sub(1)) {
        if !matches!(c, Component::RootDir) {
            at.push(c);
        }
        // The deepest mount at or above this folder decides what it is.
        let over = mounts.iter().filter(|m| at.starts_with(m.path())).max_by_key(|m| (depth(m.path()), m.is_bind()));
        match over {
            // Folders of a tmpfs, and the folders bwrap makes in it, are open to everyone.
            Some(Mount::Tmpfs(_) | Mount::Dir(_) | Mount::Scratch(_) | Mount::Dev(_) | Mount::Proc(_)) => return None,
            _ => {
                if !traversable(&at, user) {
                    return Some(at);
                }
            }
        }
    }
    None
}

/// Whether `user` (with no supplementary groups) may pass through host folder `dir`.
fn traversable(dir: &Path, user: &RunAs) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else { return true };
    let mode = meta.permissions().mode();
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if meta.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// `setpriv`'s arguments (before the program) that drop from root to `user`: its uid and gid,
/// no supplementary groups, no capabilities in any set.
fn setpriv_args(user: &RunAs) -> Vec<String> {
    vec![
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        "--bounding-set=-all".into(),
        "--".into(),
    ]
}

/// Makes the machine's home folder, with a git configuration that lets the machine's user
/// clone the local repositories the master binds in, which another user owns; for `run_as`,
/// the work directory and the home belong to the machine's user.
fn prepare_home(dir: &Path, home: &Path, user: Option<&RunAs>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(home).or_else(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Ok(()),
        _ => Err(e),
    })?;
    let gitconfig = home.join(".gitconfig");
    std::fs::write(&gitconfig, "[safe]\n\tdirectory = *\n")?;
    if let Some(user) = user {
        for p in [dir, home, &gitconfig] {
            std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid))?;
        }
    }
    Ok(())
}

/// Starts the child in a session of its own, without a controlling terminal (so no step can
/// push input into the terminal the master was started from), leading its own process group
/// (so stopping it reaches the agent, and a Ctrl-C aimed at the master's terminal does not),
/// with the usual umask of a fresh machine rather than the master's strict one.
fn new_session(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe calls setsid(2) and umask(2); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            Ok(())
        });
    }
}

/// Whether `pid` is a live (non-zombie) process of the machine whose key is `key`.
pub fn is_ours(pid: i32, key: &str) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat.rsplit(')').next().and_then(|rest| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let Ok(environ) = std::fs::read(proc_dir.join("environ")) else {
        return false;
    };
    let want = format!("{MACHINE_KEY_ENV}={key}");
    environ.split(|b| *b == 0).any(|var| var == want.as_bytes())
}

/// Every live process carrying the machine key `key` in its environment.
pub fn processes_with_key(key: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| is_ours(*pid, key))
        .collect()
}

/// Ends every process carrying the machine key `key`: SIGTERM, up to `grace` for them to exit
/// (none when `grace` is zero), then SIGKILL until none is left. Errs with the pids that still
/// live 5 s after the first SIGKILL.
pub async fn kill_machine(key: &str, grace: Duration) -> Result<(), Vec<i32>> {
    if !grace.is_zero() {
        // Signalled one by one, not by group: steps run in process groups of their own.
        for pid in processes_with_key(key) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !processes_with_key(key).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_with_key(key);
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(left);
        }
        for pid in left {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

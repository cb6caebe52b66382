//! The `local` provisioner: each machine is a `paddock agent` child process in its own work
//! directory and its own process group. It is Paddock's embedded default: no cloud account.
//!
//! A machine is recognised across master restarts by its pid *and* the `PADDOCK_MACHINE_KEY` in
//! its environment (inherited by the steps it runs), so a recycled pid is never mistaken for
//! one of ours and no step outlives its machine.

use std::path::{Path, PathBuf};
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

/// Starts agents as local child processes.
#[derive(Debug, Clone)]
pub struct LocalProvisioner {
    program: PathBuf,
    base_dir: PathBuf,
    grace: Duration,
}

impl LocalProvisioner {
    /// Agents run `program agent …` in `base_dir/machine-<id>`.
    pub fn new(program: PathBuf, base_dir: PathBuf) -> Self {
        // The work directory is also the machine's key in its processes' environment: it must
        // be absolute, or two masters started from different folders would share keys.
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        LocalProvisioner { program, base_dir, grace: Duration::from_secs(10) }
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
        let dir = self.workdir(spec.machine_id);
        tokio::fs::create_dir_all(&dir).await?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let log_err = log.try_clone()?;
        let mut cmd = tokio::process::Command::new(&self.program);
        // A machine starts with a clean environment, as a fresh VM would: the master's own
        // (webhook secrets, cloud keys, secrets that other builds use) must not reach steps.
        cmd.env_clear();
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.arg("agent")
            .arg("--master")
            .arg(&spec.master_url)
            .arg("--workdir")
            .arg(&dir)
            .env(TOKEN_ENV, &spec.token)
            .env(MACHINE_ID_ENV, spec.machine_id.to_string())
            .env(MACHINE_KEY_ENV, self.key(spec.machine_id))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group, so stopping it also stops the build steps it started,
            // and a Ctrl-C aimed at the master's terminal does not reach it directly.
            .process_group(0)
            .kill_on_drop(false);
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

    async fn stop(&self, machine_id: i64, provider_id: &str) -> Result<(), ProvisionError> {
        let key = self.key(machine_id);
        if let Ok(pid) = provider_id.parse::<i32>() {
            if is_ours(pid, &key) {
                // The agent cancels its build and exits on SIGTERM.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + self.grace;
                while is_ours(pid, &key) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if is_ours(pid, &key) {
                    tracing::warn!(machine = machine_id, pid, "agent ignored SIGTERM; killing it");
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

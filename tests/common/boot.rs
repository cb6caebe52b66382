//! Boot emulator: plays the cloud's part for the instances moto reports. For each instance of a
//! cluster that is `running`, it does what cloud-init would on the machine: writes the
//! user-data's `write_files` under a folder of its own (`<root>/<instance-id>`) and runs its
//! `runcmd` there, on this host. When the instance is shutting down, terminated or gone, it
//! kills every process the boot started, as the end of a VM would.
//!
//! Processes are found by `PADDOCK_MACHINE_KEY=<root>/<instance-id>` in their environment, set
//! on the boot script and inherited by the agent and its steps, the same way the local
//! provisioner finds a machine's processes. `PADDOCK_ROOT` (the same folder) tells
//! `images/bootstrap.sh` to keep every path under it and to exit instead of powering off.
//!
//! Modules that cannot be emulated on a shared host (`users`, `packages`, …) are ignored.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{Filter, InstanceAttributeName};
use paddock_provisioners::ec2::TAG_CLUSTER;
use paddock_provisioners::local::kill_machine;
use serde_yaml_ng::Value;

/// How often the emulator looks at the instances.
const POLL: Duration = Duration::from_millis(200);
/// How long an instance's processes get between SIGTERM and SIGKILL when it ends.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// The host variables a boot script starts with; the rest of the test's environment stays out,
/// as it would on a fresh VM.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG"];
/// Instance states in which a VM no longer runs anything.
const ENDED: &[&str] = &["shutting-down", "terminated", "stopping", "stopped"];

/// Plays cloud-init for one cluster's instances on a moto server, from a background thread.
pub struct BootEmulator {
    shared: Arc<Mutex<Shared>>,
    thread: Option<JoinHandle<()>>,
    root: tempfile::TempDir,
}

/// State shared by the emulator's thread and the test.
struct Shared {
    stop: bool,
    boot_delay: Duration,
    power_off_on_exit: bool,
    /// An agent binary placed where a baked image has it, so boots skip the download.
    baked_agent: Option<PathBuf>,
    /// How long an ended instance's processes get between SIGTERM and SIGKILL (zero: SIGKILL
    /// only, as when a machine fails without a clean shutdown).
    kill_grace: Duration,
    /// When each instance was first seen running.
    seen_running: BTreeMap<String, Instant>,
    /// Instances booted, in boot order.
    booted: Vec<String>,
    machines: BTreeMap<String, Machine>,
}

/// One booted instance's processes.
struct Machine {
    key: String,
    /// The runcmd shell, reaped by the emulator.
    runcmd: Option<Child>,
    killed: bool,
}

/// Why an instance could not be booted.
#[derive(Debug)]
enum BootError {
    /// The cloud did not answer; try again on the next poll.
    Cloud(String),
    /// The user-data cannot be run; booting it again would not help.
    UserData(String),
}

impl BootEmulator {
    /// Starts emulating boots for the instances tagged `paddock:cluster = cluster` on the EC2
    /// endpoint `endpoint`; each boots `boot_delay` after it is first seen running.
    pub fn start(endpoint: String, cluster: String, boot_delay: Duration) -> BootEmulator {
        let root = tempfile::Builder::new().prefix("paddock-boot-").tempdir().expect("emulator root");
        let shared = Arc::new(Mutex::new(Shared {
            stop: false,
            boot_delay,
            power_off_on_exit: false,
            baked_agent: None,
            kill_grace: KILL_GRACE,
            seen_running: BTreeMap::new(),
            booted: Vec::new(),
            machines: BTreeMap::new(),
        }));
        let thread = {
            let shared = shared.clone();
            let root = root.path().to_path_buf();
            std::thread::Builder::new()
                .name("boot-emulator".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    rt.block_on(run(endpoint, cluster, root, shared));
                })
                .expect("spawn boot emulator")
        };
        BootEmulator { shared, thread: Some(thread), root }
    }

    /// Boots instances as if their image had `agent` baked in (as the Packer template does):
    /// no download per machine, for tests that boot many.
    pub fn set_baked_agent(&self, agent: PathBuf) {
        lock(&self.shared).baked_agent = Some(agent);
    }

    /// Ends instances with SIGKILL only: the machine dies without a clean shutdown.
    pub fn set_hard_kill(&self, hard: bool) {
        lock(&self.shared).kill_grace = if hard { Duration::ZERO } else { KILL_GRACE };
    }

    /// When on, an instance whose boot script exits is terminated through the EC2 API, as the
    /// real bootstrap's power-off (with shutdown behaviour `terminate`) would. Off by default.
    pub fn set_power_off_on_exit(&self, on: bool) {
        lock(&self.shared).power_off_on_exit = on;
    }

    /// The instance ids booted so far, in boot order.
    pub fn booted(&self) -> Vec<String> {
        lock(&self.shared).booted.clone()
    }

    /// The instances whose processes the emulator started and has not killed yet.
    pub fn alive(&self) -> Vec<String> {
        lock(&self.shared).machines.iter().filter(|(_, m)| !m.killed).map(|(id, _)| id.clone()).collect()
    }

    /// What the boot of `instance` printed (the emulator's notes and the runcmd output).
    pub fn boot_log(&self, instance: &str) -> String {
        std::fs::read_to_string(self.instance_root(instance).join("boot.log")).unwrap_or_default()
    }

    /// The folder under which every instance gets its own root.
    pub fn root(&self) -> PathBuf {
        self.root.path().to_path_buf()
    }

    /// The folder standing for `/` on `instance` (its `PADDOCK_ROOT` and machine key).
    pub fn instance_root(&self, instance: &str) -> PathBuf {
        self.root.path().join(instance)
    }
}

impl Drop for BootEmulator {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Nothing a test booted may outlive it, whatever state its instances are in.
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let mut shared = lock(&self.shared);
        for (id, machine) in shared.machines.iter_mut().filter(|(_, m)| !m.killed) {
            if let Err(left) = rt.block_on(kill_machine(&machine.key, KILL_GRACE)) {
                eprintln!("boot emulator: processes {left:?} of {id} survive SIGKILL");
            }
            reap(machine);
            machine.killed = true;
        }
    }
}

/// The shared state, even if a panicking test thread poisoned it.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills what is left of `machine`'s runcmd shell and waits for it, so it is no zombie.
fn reap(machine: &mut Machine) {
    if let Some(mut child) = machine.runcmd.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The emulator's loop: look at the cluster's instances, boot and kill accordingly.
async fn run(endpoint: String, cluster: String, root: PathBuf, shared: Arc<Mutex<Shared>>) {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "boot-emulator"))
        .endpoint_url(endpoint)
        // The next poll is the retry; a dead endpoint must not hold the loop (or Drop) up.
        .retry_config(RetryConfig::disabled())
        .build();
    let client = aws_sdk_ec2::Client::from_conf(conf);
    while !lock(&shared).stop {
        match states(&client, &cluster).await {
            Ok(states) => tick(&client, &root, &shared, &states).await,
            Err(e) => eprintln!("boot emulator: DescribeInstances: {e}"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every instance of the cluster and its state.
async fn states(client: &aws_sdk_ec2::Client, cluster: &str) -> Result<BTreeMap<String, String>, String> {
    let filter = Filter::builder().name(format!("tag:{TAG_CLUSTER}")).values(cluster).build();
    let mut pages = client.describe_instances().filters(filter).into_paginator().items().send();
    let mut out = BTreeMap::new();
    while let Some(reservation) = pages.next().await {
        let reservation = reservation.map_err(|e| DisplayErrorContext(&e).to_string())?;
        for i in reservation.instances() {
            let Some(id) = i.instance_id() else { continue };
            let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
            out.insert(id.to_string(), state);
        }
    }
    Ok(out)
}

/// One look at the instances: boots those due, kills those ended, reaps finished boots.
async fn tick(
    client: &aws_sdk_ec2::Client,
    root: &Path,
    shared: &Arc<Mutex<Shared>>,
    states: &BTreeMap<String, String>,
) {
    let now = Instant::now();
    let baked;
    let (due, ended, exited) = {
        let mut s = lock(shared);
        for (id, state) in states {
            if state == "running" {
                s.seen_running.entry(id.clone()).or_insert(now);
            }
        }
        let delay = s.boot_delay;
        let due: Vec<String> = s
            .seen_running
            .iter()
            .filter(|(id, seen)| {
                !s.machines.contains_key(*id)
                    && now.duration_since(**seen) >= delay
                    && states.get(*id).is_some_and(|st| st == "running")
            })
            .map(|(id, _)| id.clone())
            .collect();
        let ended: Vec<(String, String)> = s
            .machines
            .iter()
            .filter(|(id, m)| !m.killed && states.get(*id).is_none_or(|st| ENDED.contains(&st.as_str())))
            .map(|(id, m)| (id.clone(), m.key.clone()))
            .collect();
        let power_off = s.power_off_on_exit;
        baked = s.baked_agent.clone();
        let mut exited = Vec::new();
        for (id, m) in s.machines.iter_mut() {
            let done = m.runcmd.as_mut().is_some_and(|c| !matches!(c.try_wait(), Ok(None)));
            if done {
                reap(m);
                if power_off && !m.killed {
                    exited.push(id.clone());
                }
            }
        }
        (due, ended, exited)
    };

    for id in due {
        let key = root.join(&id);
        if let Some(agent) = &baked {
            let bin = key.join("opt/paddock/bin");
            let _ = std::fs::create_dir_all(&bin);
            let _ = std::os::unix::fs::symlink(agent, bin.join("paddock"));
        }
        match boot(client, &id, &key).await {
            Ok(runcmd) => {
                let mut s = lock(shared);
                s.booted.push(id.clone());
                s.machines.insert(id, Machine { key: key.display().to_string(), runcmd, killed: false });
            }
            Err(BootError::Cloud(e)) => eprintln!("boot emulator: {id}: {e} (retrying)"),
            Err(BootError::UserData(e)) => {
                note(&key, &format!("cannot boot: {e}"));
                let mut s = lock(shared);
                s.booted.push(id.clone());
                s.machines.insert(id, Machine { key: key.display().to_string(), runcmd: None, killed: false });
            }
        }
    }

    for (id, key) in ended {
        note(Path::new(&key), "instance ended: killing its processes");
        let grace = lock(shared).kill_grace;
        let result = kill_machine(&key, grace).await;
        if let Err(left) = &result {
            eprintln!("boot emulator: processes {left:?} of {id} survive SIGKILL");
        }
        let mut s = lock(shared);
        if let Some(m) = s.machines.get_mut(&id) {
            reap(m);
            m.killed = result.is_ok();
        }
    }

    for id in exited {
        note(&root.join(&id), "boot script exited: powering off");
        if let Err(e) = client.terminate_instances().instance_ids(&id).send().await {
            eprintln!("boot emulator: TerminateInstances {id}: {}", DisplayErrorContext(&e));
        }
    }
}

/// Appends one line of the emulator's own to the instance's boot log.
fn note(instance_root: &Path, line: &str) {
    let _ = std::fs::create_dir_all(instance_root);
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(instance_root.join("boot.log")) {
        let _ = writeln!(f, "[boot emulator] {line}");
    }
}

/// Boots instance `id` under `base`: fetches its user-data, writes its files, starts its runcmd.
async fn boot(client: &aws_sdk_ec2::Client, id: &str, base: &Path) -> Result<Option<Child>, BootError> {
    let attr = client
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .map_err(|e| BootError::Cloud(format!("DescribeInstanceAttribute: {}", DisplayErrorContext(&e))))?;
    let encoded = attr.user_data().and_then(|v| v.value()).unwrap_or_default();
    std::fs::create_dir_all(base).map_err(|e| BootError::UserData(format!("{}: {e}", base.display())))?;
    note(base, &format!("booting {id}"));
    if encoded.is_empty() {
        note(base, "no user-data: nothing to run");
        return Ok(None);
    }
    let raw = aws_smithy_types::base64::decode(encoded)
        .map_err(|e| BootError::UserData(format!("user-data is not base64: {e}")))?;
    let text = String::from_utf8(raw).map_err(|_| BootError::UserData("user-data is not UTF-8".into()))?;
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Err(BootError::UserData("user-data does not start with #cloud-config".into()));
    }
    let config: Value =
        serde_yaml_ng::from_str(&text).map_err(|e| BootError::UserData(format!("cloud-config: {e}")))?;
    let written = write_files(&config, base)?;
    let Some(script) = runcmd_script(&config, base, &written)? else {
        note(base, "no runcmd: nothing to run");
        return Ok(None);
    };
    start_runcmd(base, &script).map(Some)
}

/// Writes each `write_files` entry under `base` with its permissions; returns the paths written.
fn write_files(config: &Value, base: &Path) -> Result<Vec<String>, BootError> {
    let bad = |m: String| BootError::UserData(m);
    let mut written = Vec::new();
    let Some(entries) = config.get("write_files") else { return Ok(written) };
    let entries = entries.as_sequence().ok_or_else(|| bad("write_files is not a list".into()))?;
    for entry in entries {
        let path = entry
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| p.starts_with('/') && !p.split('/').any(|c| c == ".."))
            .ok_or_else(|| bad("write_files entry without an absolute path".into()))?;
        let content = entry.get("content").and_then(Value::as_str).unwrap_or_default();
        let bytes = match entry.get("encoding").and_then(Value::as_str).unwrap_or("text/plain") {
            "text/plain" => content.as_bytes().to_vec(),
            "b64" | "base64" => aws_smithy_types::base64::decode(content.split_whitespace().collect::<String>())
                .map_err(|e| bad(format!("{path}: bad base64: {e}")))?,
            other => return Err(bad(format!("{path}: encoding {other} is not emulated"))),
        };
        // cloud-init reads a string as octal and takes an integer as it is.
        let mode = match entry.get("permissions") {
            None => 0o644,
            Some(Value::String(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| bad(format!("{path}: permissions {s}")))?,
            Some(Value::Number(n)) => {
                n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(format!("{path}: permissions {n}")))?
            }
            Some(other) => return Err(bad(format!("{path}: permissions {other:?}"))),
        };
        let append = entry.get("append").and_then(Value::as_bool).unwrap_or(false);
        let target = base.join(path.trim_start_matches('/'));
        let io = |e: std::io::Error| bad(format!("{}: {e}", target.display()));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Created with its final mode, so a secret is never readable by others, even briefly.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .mode(mode)
            .open(&target)
            .map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        note(base, &format!("wrote {path} ({} bytes, mode {mode:04o})", bytes.len()));
        written.push(path.to_string());
    }
    Ok(written)
}

/// The shell script cloud-init would make of `runcmd`, with the written paths moved under `base`.
fn runcmd_script(config: &Value, base: &Path, written: &[String]) -> Result<Option<String>, BootError> {
    let Some(entries) = config.get("runcmd") else { return Ok(None) };
    let entries = entries.as_sequence().ok_or_else(|| BootError::UserData("runcmd is not a list".into()))?;
    let paths: Vec<&str> = written.iter().map(String::as_str).collect();
    let mut script = String::from("#!/bin/sh\n");
    for entry in entries {
        let line = match entry {
            // A list is one command, each item one word, as cloud-init quotes them.
            Value::Sequence(words) => words
                .iter()
                .map(|w| {
                    let w = scalar(w).ok_or_else(|| BootError::UserData(format!("runcmd word {w:?}")))?;
                    let w = match paths.iter().find(|p| **p == w) {
                        Some(p) => base.join(p.trim_start_matches('/')).display().to_string(),
                        None => w,
                    };
                    Ok(format!("'{}'", w.replace('\'', r"'\''")))
                })
                .collect::<Result<Vec<_>, BootError>>()?
                .join(" "),
            // A string is a line of shell, as written.
            other => {
                let line = scalar(other).ok_or_else(|| BootError::UserData(format!("runcmd entry {other:?}")))?;
                remap(&line, &paths, base)
            }
        };
        script.push_str(&line);
        script.push('\n');
    }
    Ok(Some(script))
}

/// A YAML scalar as the text cloud-init would see.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `line` with each of `paths` that stands as a word of its own moved under `base` (the
/// longest match wins, so a path is never taken for a shorter one it starts with).
pub fn remap(line: &str, paths: &[&str], base: &Path) -> String {
    let starts_word = |c: char| c.is_whitespace() || "'\"=;&|(`".contains(c);
    let ends_word = |c: char| c.is_whitespace() || "'\";&|)`".contains(c);
    let mut out = String::with_capacity(line.len());
    let mut prev: Option<char> = None;
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let at_start = prev.is_none_or(starts_word);
        let hit = at_start
            .then(|| {
                paths
                    .iter()
                    .filter(|p| {
                        !p.is_empty() && rest.starts_with(**p) && rest[p.len()..].chars().next().is_none_or(ends_word)
                    })
                    .max_by_key(|p| p.len())
            })
            .flatten();
        if let Some(p) = hit {
            out.push_str(&base.join(p.trim_start_matches('/')).display().to_string());
            i += p.len();
            prev = p.chars().last();
            continue;
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        prev = Some(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// Starts the runcmd script as cloud-init's final stage would, in the instance's clean world.
fn start_runcmd(base: &Path, script: &str) -> Result<Child, BootError> {
    let bad = |e: std::io::Error| BootError::UserData(format!("runcmd: {e}"));
    let dir = base.join("var/lib/cloud/instance/scripts");
    std::fs::create_dir_all(&dir).map_err(bad)?;
    let path = dir.join("runcmd");
    std::fs::write(&path, script).map_err(bad)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(bad)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(base.join("boot.log")).map_err(bad)?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg(&path).env_clear();
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    note(base, "starting runcmd");
    let child = cmd
        .env("PADDOCK_ROOT", base)
        .env(paddock_provisioners::local::MACHINE_KEY_ENV, base)
        .current_dir(base)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(bad)?)
        .stderr(log)
        // Like a VM's processes, not part of the test's process group (a Ctrl-C on the test
        // run must not be what ends them: the emulator does).
        .process_group(0)
        .spawn()
        .map_err(bad)?;
    Ok(child)
}

//! Running one build on this machine: checkout, then the configured steps.
//!
//! Step 0 is always the checkout (the master names it `checkout`); configured steps are
//! 1..=n. Every step that runs reports [`AgentMsg::StepStarted`], its output as
//! [`AgentMsg::Log`] and [`AgentMsg::StepFinished`]; a skipped step only reports
//! `StepFinished { result: Skipped }`. The caller sends [`AgentMsg::BuildFinished`]. Reports
//! leave here with `seq: 0`: the connection layer numbers them as it keeps them for the master.
//!
//! Secrets: `{secret:NAME}` in a step's command becomes `"$PADDOCK_SECRET_NAME"` (a quoted
//! variable reference, so it works bare or inside double quotes, not inside single quotes) with
//! the variable set to the value, so the command text never holds it; in environment values the
//! reference is replaced by the value. All output goes through a [`Redactor`]. Inherited
//! `PADDOCK_*` variables (the agent's own settings) are removed from every command, except the
//! machine markers the provisioner uses to find every process of a machine.
//!
//! Each command runs in its own process group so that a timeout or a cancel kills everything
//! it started, and whatever is left in the group when the command exits is killed too: a
//! step never leaves processes behind on a machine that will run the next build.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::protocol::{AgentMsg, BuildJob, BuildResult, JobStep, StepResult};
use super::redact::{redact_str, Redactor};
use crate::core::BuildId;

/// What [`run_job`] is told, in increasing force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Carry on.
    #[default]
    Running,
    /// The build was cancelled: kill the running step, skip the rest but the `always` steps.
    Cancel,
    /// The agent is going away: kill whatever runs, `always` steps too, and run nothing more.
    Now,
}

/// Stop signal for [`run_job`]. Dropping the sender means "never stopped".
pub type CancelRx = watch::Receiver<Stop>;

/// Index of the checkout step; configured steps follow from 1.
pub const CHECKOUT_STEP: usize = 0;

/// The checkout has no configured timeout; this bounds each git command.
const GIT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Time between SIGTERM and SIGKILL when a step is stopped.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for output pipes to close after the process group is gone (a process that
/// escaped the group may keep them open forever).
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Partial lines are sent at least this often.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Output is sent once this much is pending, even without a newline.
const FLUSH_BYTES: usize = 8 * 1024;
/// A `timeout_secs` of 0 means no limit; cap it anyway so deadlines stay representable.
const NO_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Runs `job` in `workdir` (checkout under `workdir/src/<builder>`), streaming progress to
/// `out`; returns the build result for the caller's `BuildFinished`.
pub async fn run_job(job: &BuildJob, workdir: &Path, out: mpsc::Sender<AgentMsg>, cancel: CancelRx) -> BuildResult {
    let ctx = Ctx {
        build: job.build,
        out,
        secrets: job.secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        cancel,
        stops_at: Stop::Cancel,
    };

    ctx.send(AgentMsg::StepStarted { build: ctx.build, seq: 0, step: CHECKOUT_STEP }).await;
    let (src, result, code) = checkout(&ctx, job, workdir).await;
    ctx.finished(CHECKOUT_STEP, result, code).await;
    let src = match src {
        Some(dir) => dir,
        None => {
            for idx in 1..=job.steps.len() {
                ctx.finished(idx, StepResult::Skipped, None).await;
            }
            return if ctx.is_cancelled() { BuildResult::Cancelled } else { BuildResult::Exception };
        }
    };

    let mut failed = false;
    let mut exception = false;
    let mut cancelled = false;
    for (i, step) in job.steps.iter().enumerate() {
        let idx = i + 1;
        let stop = ctx.stop();
        cancelled = cancelled || stop >= Stop::Cancel;
        if stop == Stop::Now || ((cancelled || failed || exception) && !step.always) {
            ctx.finished(idx, StepResult::Skipped, None).await;
            continue;
        }
        ctx.send(AgentMsg::StepStarted { build: ctx.build, seq: 0, step: idx }).await;
        let (result, code, was_cancelled) = if cancelled {
            // Clean-up still runs after a cancel (as `if: always()` does elsewhere); the cancel
            // has been spent, so only the step's timeout or the agent stopping ends it.
            ctx.line(idx, "*** build cancelled; running this `always` step anyway").await;
            run_step(&ctx.only_stopped_now(), job, step, idx, &src).await
        } else {
            run_step(&ctx, job, step, idx, &src).await
        };
        cancelled |= was_cancelled;
        match result {
            StepResult::Failure | StepResult::Timeout => failed = true,
            StepResult::Exception => exception = true,
            StepResult::Success | StepResult::Skipped | StepResult::Cancelled => {}
        }
        ctx.finished(idx, result, code).await;
    }

    if cancelled {
        BuildResult::Cancelled
    } else if failed && !exception {
        BuildResult::Failure
    } else if exception {
        BuildResult::Exception
    } else {
        BuildResult::Success
    }
}

/// What one job's helpers share.
struct Ctx {
    build: BuildId,
    out: mpsc::Sender<AgentMsg>,
    /// (name, value) of every secret of the job, for redaction.
    secrets: Vec<(String, String)>,
    cancel: CancelRx,
    /// The signal that stops a command here.
    stops_at: Stop,
}

impl Ctx {
    /// Sends a message; a closed channel means the connection is gone and the caller will
    /// cancel us, so errors are ignored.
    async fn send(&self, msg: AgentMsg) {
        let _ = self.out.send(msg).await;
    }

    /// Sends an agent-written line (headers, notices), redacted like step output.
    async fn line(&self, step: usize, text: &str) {
        let text = redact_str(&self.secrets, &format!("{text}\n"));
        self.send(AgentMsg::Log { build: self.build, seq: 0, step, text }).await;
    }

    /// Reports the end of a step.
    async fn finished(&self, step: usize, result: StepResult, exit_code: Option<i32>) {
        self.send(AgentMsg::StepFinished { build: self.build, seq: 0, step, result, exit_code }).await;
    }

    /// The same job, whose commands only [`Stop::Now`] stops.
    fn only_stopped_now(&self) -> Ctx {
        Ctx {
            build: self.build,
            out: self.out.clone(),
            secrets: self.secrets.clone(),
            cancel: self.cancel.clone(),
            stops_at: Stop::Now,
        }
    }

    /// The latest signal.
    fn stop(&self) -> Stop {
        *self.cancel.borrow()
    }

    /// Whether the build was cancelled or the agent is stopping.
    fn is_cancelled(&self) -> bool {
        self.stop() >= Stop::Cancel
    }
}

/// How a command ended.
enum Outcome {
    /// Exited by itself (code) or was killed by a signal from elsewhere (`None`).
    Exited(std::process::ExitStatus),
    TimedOut,
    Cancelled,
    SpawnFailed(std::io::Error),
}

/// How long a step killed by a signal from outside waits for the agent's own stop.
const SIGNALLED_GRACE: Duration = Duration::from_secs(2);

/// Runs one configured step; returns its result, exit code and whether it was cancelled.
async fn run_step(
    ctx: &Ctx,
    job: &BuildJob,
    step: &JobStep,
    idx: usize,
    src: &Path,
) -> (StepResult, Option<i32>, bool) {
    // The header shows the command as configured: secret references, never values.
    ctx.line(idx, &format!("$ {}", step.run)).await;

    let (script, secret_env) = match expand_run(&step.run, &job.secrets) {
        Ok(x) => x,
        Err(name) => {
            ctx.line(idx, &format!("*** unknown secret {name:?} in command")).await;
            return (StepResult::Exception, None, false);
        }
    };
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in job.env.iter().chain(step.env.iter()) {
        match substitute_secrets(v, &job.secrets) {
            Ok(v) => {
                merged.insert(k.clone(), v);
            }
            Err(name) => {
                ctx.line(idx, &format!("*** unknown secret {name:?} in environment variable {k}")).await;
                return (StepResult::Exception, None, false);
            }
        }
    }
    merged.insert("PADDOCK_BUILD".into(), job.build.to_string());
    merged.insert("PADDOCK_BUILDER".into(), job.builder.clone());
    merged.insert("PADDOCK_BRANCH".into(), job.branch.clone());
    merged.insert("PADDOCK_REVISION".into(), job.revision.clone());
    // Secret variables last, so no configured variable can shadow them.
    let env = merged.into_iter().chain(secret_env);

    let dir = match &step.workdir {
        Some(w) => src.join(w),
        None => src.to_path_buf(),
    };
    if !dir.is_dir() {
        ctx.line(idx, &format!("*** working directory {} does not exist", dir.display())).await;
        return (StepResult::Exception, None, false);
    }

    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&script).current_dir(&dir);
    scrub_env(&mut cmd);
    cmd.envs(env);
    let timeout = match step.timeout_secs {
        0 => NO_TIMEOUT,
        s => Duration::from_secs(s).min(NO_TIMEOUT),
    };
    match run_process(ctx, idx, cmd, timeout).await {
        Outcome::Exited(status) => match (status.code(), status.signal()) {
            (Some(0), _) => (StepResult::Success, Some(0), false),
            (Some(code), _) => {
                ctx.line(idx, &format!("*** exit code {code}")).await;
                (StepResult::Failure, Some(code), false)
            }
            (None, sig) => {
                // Killed from outside: when the whole machine is going down, the agent was
                // signalled too and cancels the build in a moment. Wait for that briefly, so a
                // shutdown is never reported as the step's own failure.
                let mut cancel = ctx.cancel.clone();
                if tokio::time::timeout(SIGNALLED_GRACE, cancelled(&mut cancel, ctx.stops_at)).await.is_ok() {
                    ctx.line(idx, "*** build cancelled; process group killed").await;
                    return (StepResult::Cancelled, None, true);
                }
                let sig = sig.map_or_else(|| "?".to_string(), |s| s.to_string());
                ctx.line(idx, &format!("*** killed by signal {sig}")).await;
                (StepResult::Failure, None, false)
            }
        },
        Outcome::TimedOut => {
            ctx.line(idx, &format!("*** timed out after {}s; process group killed", timeout.as_secs())).await;
            (StepResult::Timeout, None, false)
        }
        Outcome::Cancelled => {
            ctx.line(idx, "*** build cancelled; process group killed").await;
            (StepResult::Cancelled, None, true)
        }
        Outcome::SpawnFailed(e) => {
            ctx.line(idx, &format!("*** cannot start sh: {e}")).await;
            (StepResult::Exception, None, false)
        }
    }
}

/// Inherited variables a step keeps: the machine's markers, which let the provisioner find
/// (and stop) every process of the machine, steps included. They hold no secret.
const KEPT_ENV: &[&str] = &["PADDOCK_MACHINE_ID", "PADDOCK_MACHINE_KEY"];

/// Removes inherited `PADDOCK_*` variables: that namespace belongs to the agent (the agent's
/// own settings, e.g. its token, must not leak into build steps).
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("PADDOCK_") && !KEPT_ENV.contains(&name.as_ref()) {
            cmd.env_remove(key);
        }
    }
}

/// Environment variable that carries secret `name` into a step.
fn secret_var(name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("PADDOCK_SECRET_{clean}")
}

/// Finds `{secret:NAME}` references: (start, end, name) byte ranges.
fn secret_refs(text: &str) -> Vec<(usize, usize, &str)> {
    const OPEN: &str = "{secret:";
    let mut refs = Vec::new();
    let mut from = 0;
    while let Some(rel) = text[from..].find(OPEN) {
        let start = from + rel;
        let name_start = start + OPEN.len();
        match text[name_start..].find('}') {
            Some(len) => {
                let end = name_start + len + 1;
                refs.push((start, end, &text[name_start..name_start + len]));
                from = end;
            }
            None => break,
        }
    }
    refs
}

/// Replaces `{secret:NAME}` by `"$PADDOCK_SECRET_NAME"` so the command text never holds the
/// value; returns the script and the variables to set. `Err(name)` for an unknown secret.
fn expand_run(run: &str, secrets: &BTreeMap<String, String>) -> Result<(String, Vec<(String, String)>), String> {
    let mut script = String::with_capacity(run.len());
    let mut env = Vec::new();
    let mut last = 0;
    for (start, end, name) in secret_refs(run) {
        let value = secrets.get(name).ok_or_else(|| name.to_string())?;
        let var = secret_var(name);
        script.push_str(&run[last..start]);
        script.push_str(&format!("\"${var}\""));
        env.push((var, value.clone()));
        last = end;
    }
    script.push_str(&run[last..]);
    Ok((script, env))
}

/// Replaces `{secret:NAME}` by the value (for environment values). `Err(name)` if unknown.
fn substitute_secrets(text: &str, secrets: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end, name) in secret_refs(text) {
        let value = secrets.get(name).ok_or_else(|| name.to_string())?;
        out.push_str(&text[last..start]);
        out.push_str(value);
        last = end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

/// Directory name for a builder's source tree: only `[A-Za-z0-9._-]`, never `.`/`..`.
fn sanitize(builder: &str) -> String {
    let mut s: String = builder
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    s
}

/// Hides `user:password@` in a URL shown in the log.
fn mask_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]);
        }
    }
    url.to_string()
}

/// Whether `rev` looks like a full or abbreviated commit id (as opposed to a ref name).
fn looks_like_sha(rev: &str) -> bool {
    rev.len() >= 7 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// A git command with the environment every git call of the agent uses.
fn git(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.args(args).current_dir(dir);
    scrub_env(&mut cmd);
    // Never wait for a password on a terminal nobody watches.
    cmd.env("GIT_TERMINAL_PROMPT", "0");
    cmd
}

/// Runs a git command as part of the checkout, logging `$ git …` (shown as `shown`) and its
/// output. `Err((exit code, cancelled))` when it did not succeed.
async fn run_git(ctx: &Ctx, dir: &Path, args: &[&str], shown: &str) -> Result<(), (Option<i32>, bool)> {
    ctx.line(CHECKOUT_STEP, &format!("$ git {shown}")).await;
    match run_process(ctx, CHECKOUT_STEP, git(dir, args), GIT_TIMEOUT).await {
        Outcome::Exited(status) if status.success() => Ok(()),
        Outcome::Exited(status) => Err((status.code(), false)),
        Outcome::TimedOut => {
            ctx.line(CHECKOUT_STEP, "*** git timed out").await;
            Err((None, false))
        }
        Outcome::Cancelled => {
            ctx.line(CHECKOUT_STEP, "*** build cancelled").await;
            Err((None, true))
        }
        Outcome::SpawnFailed(e) => {
            ctx.line(CHECKOUT_STEP, &format!("*** cannot start git: {e}")).await;
            Err((None, false))
        }
    }
}

/// Whether `rev` names a commit present in the repository at `dir` (quiet, not logged).
async fn has_commit(dir: &Path, rev: &str) -> bool {
    let spec = format!("{rev}^{{commit}}");
    let mut cmd = git(dir, &["rev-parse", "--verify", "--quiet", &spec]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
    matches!(
        tokio::time::timeout(Duration::from_secs(60), cmd.status()).await,
        Ok(Ok(status)) if status.success()
    )
}

/// Step 0: brings `workdir/src/<builder>` to exactly `job.revision`, reusing an earlier clone.
/// Returns the source directory (or `None` on failure), the step result and an exit code.
async fn checkout(ctx: &Ctx, job: &BuildJob, workdir: &Path) -> (Option<PathBuf>, StepResult, Option<i32>) {
    let fail = |(code, cancelled): (Option<i32>, bool)| {
        let result = if cancelled { StepResult::Cancelled } else { StepResult::Exception };
        (None, result, code)
    };
    // Option-looking values would be parsed by git as options.
    if job.revision.is_empty() || job.revision.starts_with('-') {
        ctx.line(CHECKOUT_STEP, &format!("*** invalid revision {:?}", job.revision)).await;
        return fail((None, false));
    }
    let parent = workdir.join("src");
    let dir = parent.join(sanitize(&job.builder));
    if let Err(e) = tokio::fs::create_dir_all(&parent).await {
        ctx.line(CHECKOUT_STEP, &format!("*** cannot create {}: {e}", parent.display())).await;
        return fail((None, false));
    }
    let dir_str = dir.to_string_lossy().into_owned();
    let url = mask_url(&job.repo_url);

    let mut fresh = !dir.join(".git").exists();
    if !fresh {
        ctx.line(CHECKOUT_STEP, &format!("reusing {dir_str}")).await;
        let _ = git(&dir, &["remote", "set-url", "origin", &job.repo_url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if let Err(e) = run_git(ctx, &dir, &["fetch", "--prune", "origin"], "fetch --prune origin").await {
            if e.1 {
                return fail(e);
            }
            // A broken clone (interrupted earlier, disk trouble) is replaced by a fresh one.
            ctx.line(CHECKOUT_STEP, "fetch failed; cloning afresh").await;
            fresh = true;
        }
    }
    if fresh {
        if dir.exists() {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                ctx.line(CHECKOUT_STEP, &format!("*** cannot remove {dir_str}: {e}")).await;
                return fail((None, false));
            }
        }
        if let Err(e) = run_git(
            ctx,
            &parent,
            &["clone", "--no-checkout", "--", &job.repo_url, &dir_str],
            &format!("clone --no-checkout {url} {dir_str}"),
        )
        .await
        {
            return fail(e);
        }
    }

    // A commit id already present needs no fetch; a ref name is always fetched, since the local
    // copy of it may be stale, and then checked out through FETCH_HEAD.
    let mut target = job.revision.clone();
    let sha = looks_like_sha(&job.revision);
    if !sha || !has_commit(&dir, &job.revision).await {
        match run_git(ctx, &dir, &["fetch", "origin", &job.revision], &format!("fetch origin {}", job.revision)).await {
            Ok(()) if !sha => target = "FETCH_HEAD".to_string(),
            Ok(()) => {}
            Err(e) if e.1 => return fail(e),
            // The checkout below reports whether the revision is really missing.
            Err(_) => {}
        }
    }
    if let Err(e) = run_git(
        ctx,
        &dir,
        &["checkout", "--force", "--detach", &target],
        &format!("checkout --force --detach {target}"),
    )
    .await
    {
        return fail(e);
    }
    if let Err(e) = run_git(ctx, &dir, &["clean", "-ffdx"], "clean -ffdx").await {
        return fail(e);
    }
    (Some(dir), StepResult::Success, Some(0))
}

/// Sends a signal to a whole process group, ignoring "no such process".
fn signal_group(pgid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// Resolves when the signal reaches `at`; never, if the sender is gone.
async fn cancelled(rx: &mut CancelRx, at: Stop) {
    if rx.wait_for(|s| *s >= at).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Spawns `cmd` in its own process group with output captured into the log of `step`, and
/// waits for it, the timeout or a cancel.
///
/// stdout and stderr share one pipe, as with `2>&1`: the log shows them in the order they were
/// written, and one redactor sees the merged stream, so a secret written half to each is still
/// caught.
async fn run_process(ctx: &Ctx, step: usize, mut cmd: Command, timeout: Duration) -> Outcome {
    let reader = match output_pipe(&mut cmd) {
        Ok(reader) => reader,
        Err(e) => return Outcome::SpawnFailed(e),
    };
    cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
    let spawned = cmd.spawn();
    // The command holds the pipe's write ends; once the child has its copies, ours must go, or
    // the reader never sees the end of the output.
    drop(cmd);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Outcome::SpawnFailed(e),
    };
    // The child leads its own group, so its pid is the group id.
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    let pump = pump_output(ctx.build, step, ctx.out.clone(), &ctx.secrets, reader);
    tokio::pin!(pump);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut cancel = ctx.cancel.clone();
    let mut pump_done = false;

    let outcome = loop {
        tokio::select! {
            status = child.wait() => break match status {
                Ok(status) => Outcome::Exited(status),
                Err(e) => Outcome::SpawnFailed(e),
            },
            () = &mut deadline => break Outcome::TimedOut,
            () = cancelled(&mut cancel, ctx.stops_at) => break Outcome::Cancelled,
            () = &mut pump, if !pump_done => pump_done = true,
        }
    };
    if matches!(outcome, Outcome::TimedOut | Outcome::Cancelled) {
        if let Some(pgid) = pgid {
            signal_group(pgid, Signal::SIGTERM);
        }
        // Keep draining output while the group shuts down, so nothing blocks on a full pipe.
        let grace = tokio::time::sleep(KILL_GRACE);
        tokio::pin!(grace);
        let mut exited = false;
        loop {
            tokio::select! {
                _ = child.wait() => { exited = true; break; }
                () = &mut grace => break,
                () = &mut pump, if !pump_done => pump_done = true,
            }
        }
        if !exited {
            if let Some(pgid) = pgid {
                signal_group(pgid, Signal::SIGKILL);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    // Whatever the command left running in its group goes too.
    if let Some(pgid) = pgid {
        signal_group(pgid, Signal::SIGKILL);
    }
    if !pump_done && tokio::time::timeout(DRAIN_GRACE, &mut pump).await.is_err() {
        ctx.line(step, "*** output still open after the command ended (a process left its group?); not waiting").await;
    }
    outcome
}

/// One pipe for a command's stdout and stderr, set on `cmd`; returns the reading end.
fn output_pipe(cmd: &mut Command) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    let (reader, writer) = std::io::pipe()?;
    cmd.stdout(Stdio::from(writer.try_clone()?)).stderr(Stdio::from(writer));
    tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(reader))
}

/// A step's captured output: stdout and stderr merged in one pipe.
struct Output {
    reader: Option<tokio::net::unix::pipe::Receiver>,
    redactor: Redactor,
    /// Redacted text not sent yet (a partial line, normally).
    pending: String,
    buf: Vec<u8>,
}

impl Output {
    /// Reads once; returns text ready to send (complete lines, or a large chunk), or
    /// everything left at end of stream. Pending forever once closed.
    async fn read(&mut self) -> String {
        let Some(reader) = self.reader.as_mut() else {
            return std::future::pending().await;
        };
        match reader.read(&mut self.buf).await {
            Ok(n) if n > 0 => {
                let text = self.redactor.push(&self.buf[..n]);
                self.pending.push_str(&text);
                if self.pending.len() >= FLUSH_BYTES {
                    std::mem::take(&mut self.pending)
                } else if let Some(nl) = self.pending.rfind('\n') {
                    let rest = self.pending.split_off(nl + 1);
                    std::mem::replace(&mut self.pending, rest)
                } else {
                    String::new()
                }
            }
            // EOF, or a read error (nothing more will come either way).
            _ => {
                self.reader = None;
                let tail = self.redactor.finish();
                self.pending.push_str(&tail);
                std::mem::take(&mut self.pending)
            }
        }
    }
}

/// Copies a step's output into `Log` messages, redacted, batched by line / time / size.
async fn pump_output(
    build: BuildId,
    step: usize,
    out: mpsc::Sender<AgentMsg>,
    secrets: &[(String, String)],
    reader: tokio::net::unix::pipe::Receiver,
) {
    let mut output = Output {
        reader: Some(reader),
        redactor: Redactor::new(secrets.iter().cloned()),
        pending: String::new(),
        buf: vec![0; FLUSH_BYTES],
    };
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let send = |text: String| {
        let out = out.clone();
        async move {
            if !text.is_empty() {
                let _ = out.send(AgentMsg::Log { build, seq: 0, step, text }).await;
            }
        }
    };
    while output.reader.is_some() {
        tokio::select! {
            text = output.read() => send(text).await,
            _ = tick.tick() => send(std::mem::take(&mut output.pending)).await,
        }
    }
    send(std::mem::take(&mut output.pending)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> BTreeMap<String, String> {
        [("TOKEN".to_string(), "s3cr3t".to_string())].into_iter().collect()
    }

    #[test]
    fn run_references_become_variables() {
        let (script, env) = expand_run("curl -H {secret:TOKEN} x", &secrets()).unwrap_or_default();
        assert_eq!(script, "curl -H \"$PADDOCK_SECRET_TOKEN\" x");
        assert_eq!(env, vec![("PADDOCK_SECRET_TOKEN".to_string(), "s3cr3t".to_string())]);
        assert_eq!(expand_run("echo {secret:NOPE}", &secrets()), Err("NOPE".to_string()));
        assert_eq!(
            expand_run("echo {secret:unterminated", &secrets()),
            Ok(("echo {secret:unterminated".to_string(), vec![]))
        );
    }

    #[test]
    fn env_references_are_substituted() {
        assert_eq!(substitute_secrets("Bearer {secret:TOKEN}", &secrets()), Ok("Bearer s3cr3t".to_string()));
        assert_eq!(substitute_secrets("{secret:X}", &secrets()), Err("X".to_string()));
    }

    #[test]
    fn sanitize_builder_names() {
        assert_eq!(sanitize("py3.12-sqlite"), "py3.12-sqlite");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(".."), "_..");
        assert_eq!(sanitize(""), "_");
    }

    #[test]
    fn urls_are_masked() {
        assert_eq!(mask_url("https://user:pw@github.com/a/b.git"), "https://***@github.com/a/b.git");
        assert_eq!(mask_url("/tmp/repo"), "/tmp/repo");
        assert_eq!(mask_url("https://github.com/a@b"), "https://github.com/a@b");
    }
}

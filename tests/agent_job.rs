//! `run_job` against a real git repository in a temporary directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use paddock::agent::job::{run_job, Stop};
use paddock::agent::protocol::{AgentMsg, BuildJob, BuildResult, JobStep, StepResult};
use paddock::core::{BuildId, MachineId};
use tokio::sync::{mpsc, watch};

/// Runs git with an identity given on the command line, so no global config is needed.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Paddock Test",
            "-c",
            "user.email=test@paddock.invalid",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit_file(repo: &Path, name: &str, content: &str, message: &str) -> String {
    std::fs::write(repo.join(name), content).expect("write file");
    git(repo, &["add", name]);
    git(repo, &["commit", "-q", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

/// A repository with `a.txt` on `main` (rev1) and `b.txt` on `feature` (rev2).
struct Repo {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    rev1: String,
    rev2: String,
}

fn make_repo() -> Repo {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("origin");
    std::fs::create_dir(&path).expect("mkdir");
    git(&path, &["init", "-q", "-b", "main"]);
    let rev1 = commit_file(&path, "a.txt", "hello from a\n", "first");
    git(&path, &["checkout", "-q", "-b", "feature"]);
    let rev2 = commit_file(&path, "b.txt", "hello from b\n", "second");
    git(&path, &["checkout", "-q", "main"]);
    Repo { _dir: dir, path, rev1, rev2 }
}

/// How long a job may take before the test fails (generous for a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(90);

fn step(name: &str, run: &str) -> JobStep {
    JobStep { name: name.into(), run: run.into(), env: BTreeMap::new(), workdir: None, timeout_secs: 60, always: false }
}

fn job(build: BuildId, repo: &Repo, revision: &str, steps: Vec<JobStep>) -> BuildJob {
    BuildJob {
        build,
        builder: "py3.12/sqlite".into(),
        repo_url: repo.path.to_string_lossy().into_owned(),
        branch: "main".into(),
        revision: revision.into(),
        env: BTreeMap::new(),
        steps,
        secrets: BTreeMap::new(),
    }
}

/// Runs a job to the end, collecting every message it sent.
async fn run(job: &BuildJob, workdir: &Path) -> (BuildResult, Vec<AgentMsg>) {
    let (_cancel_tx, cancel_rx) = watch::channel(Stop::Running);
    run_with_cancel(job, workdir, cancel_rx).await
}

async fn run_with_cancel(
    job: &BuildJob,
    workdir: &Path,
    cancel: watch::Receiver<Stop>,
) -> (BuildResult, Vec<AgentMsg>) {
    // A small channel on purpose: the job must cope with back-pressure.
    let (tx, mut rx) = mpsc::channel(4);
    let collector = tokio::spawn(async move {
        let mut msgs = Vec::new();
        while let Some(m) = rx.recv().await {
            msgs.push(m);
        }
        msgs
    });
    let result = run_job(job, workdir, tx, cancel).await;
    let msgs = collector.await.expect("collector");
    (result, msgs)
}

fn log(msgs: &[AgentMsg], step: usize) -> String {
    msgs.iter()
        .filter_map(|m| match m {
            AgentMsg::Log { step: s, text, .. } if *s == step => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn finished(msgs: &[AgentMsg], step: usize) -> (StepResult, Option<i32>) {
    let found: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            AgentMsg::StepFinished { step: s, result, exit_code, .. } if *s == step => Some((*result, *exit_code)),
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "one StepFinished for step {step}: {msgs:?}");
    found[0]
}

fn started(msgs: &[AgentMsg], step: usize) -> bool {
    msgs.iter().any(|m| matches!(m, AgentMsg::StepStarted { step: s, .. } if *s == step))
}

/// Whether a process is gone (or only a zombie nobody reaped yet).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn passing_steps_at_exact_revision() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let mut env_step =
        step("env", "echo \"$PADDOCK_BUILD $PADDOCK_BUILDER $PADDOCK_BRANCH $PADDOCK_REVISION $JOB_VAR $STEP_VAR\"");
    env_step.env.insert("STEP_VAR".into(), "from-step".into());
    let mut j = job(
        BuildId(7),
        &repo,
        &repo.rev2,
        vec![step("rev", "git rev-parse HEAD"), step("files", "cat a.txt b.txt; echo to-stderr >&2"), env_step],
    );
    j.env.insert("JOB_VAR".into(), "from-job".into());
    let (result, msgs) = run(&j, work.path()).await;

    assert_eq!(result, BuildResult::Success, "{msgs:?}");
    assert!(matches!(msgs.first(), Some(AgentMsg::StepStarted { build: BuildId(7), step: 0, .. })));
    for i in 0..=3 {
        assert!(started(&msgs, i));
        assert_eq!(finished(&msgs, i).0, StepResult::Success);
    }
    assert_eq!(finished(&msgs, 1), (StepResult::Success, Some(0)));
    assert!(log(&msgs, 0).contains("$ git checkout --force --detach"));
    assert!(log(&msgs, 1).starts_with("$ git rev-parse HEAD\n"));
    assert!(log(&msgs, 1).contains(&format!("{}\n", repo.rev2)));
    let files = log(&msgs, 2);
    assert!(files.contains("hello from a\nhello from b\n"), "{files}");
    assert!(files.contains("to-stderr\n"));
    assert!(log(&msgs, 3).contains(&format!("7 py3.12/sqlite main {} from-job from-step\n", repo.rev2)));
    assert!(work.path().join("src/py3.12_sqlite/.git").is_dir());
    // Nothing arrives for a step after it finished.
    let last_finish = msgs.iter().rposition(|m| matches!(m, AgentMsg::StepFinished { step: 3, .. }));
    assert_eq!(last_finish, Some(msgs.len() - 1));
}

#[tokio::test]
async fn failure_skips_later_steps_but_runs_always() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let mut cleanup = step("cleanup", "echo cleaning up");
    cleanup.always = true;
    let j = job(
        BuildId(1),
        &repo,
        &repo.rev1,
        vec![step("fail", "echo before; exit 3"), step("never", "echo should-not-run"), cleanup],
    );
    let (result, msgs) = run(&j, work.path()).await;

    assert_eq!(result, BuildResult::Failure);
    assert_eq!(finished(&msgs, 1), (StepResult::Failure, Some(3)));
    assert!(log(&msgs, 1).contains("before\n"));
    assert_eq!(finished(&msgs, 2), (StepResult::Skipped, None));
    assert!(!started(&msgs, 2));
    assert!(!log(&msgs, 2).contains("should-not-run"));
    assert_eq!(finished(&msgs, 3), (StepResult::Success, Some(0)));
    assert!(log(&msgs, 3).contains("cleaning up\n"));
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    // The sleeps outlast the deadline below by far: the job ends only if the timeout kills the
    // group (the background sleep would otherwise hold the output pipes open).
    let mut slow = step("slow", "sleep 600 & echo bg=$!; echo fg=$$; sleep 600; echo not-reached");
    slow.timeout_secs = 1;
    let j = job(BuildId(1), &repo, &repo.rev1, vec![slow, step("after", "echo after")]);
    let (result, msgs) = tokio::time::timeout(DEADLINE, run(&j, work.path())).await.expect("the timeout ends the job");

    assert_eq!(result, BuildResult::Failure);
    assert_eq!(finished(&msgs, 1), (StepResult::Timeout, None));
    assert_eq!(finished(&msgs, 2).0, StepResult::Skipped);
    let text = log(&msgs, 1);
    assert!(!text.lines().any(|l| l == "not-reached"), "{text}");
    assert!(text.contains("timed out"), "{text}");
    let pids: Vec<i32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("bg=").or_else(|| l.strip_prefix("fg=")))
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    let deadline = Instant::now() + DEADLINE;
    while !pids.iter().all(|&p| process_gone(p)) {
        assert!(Instant::now() < deadline, "processes {pids:?} still alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let mut s = step(
        "secret",
        "echo whole={secret:API}; printf 'abc'; sleep 0.2; printf 'def\\n'; printf 'ab' >&2; sleep 0.2; printf 'cdef!\\n' >&2; echo \"env=$WITH_SECRET\"",
    );
    s.env.insert("WITH_SECRET".into(), "x-{secret:API}-y".into());
    let mut j = job(BuildId(1), &repo, &repo.rev1, vec![s]);
    j.secrets.insert("API".into(), "abcdef".into());
    let (result, msgs) = run(&j, work.path()).await;

    assert_eq!(result, BuildResult::Success, "{msgs:?}");
    for m in &msgs {
        if let AgentMsg::Log { text, .. } = m {
            assert!(!text.contains("abcdef"), "secret leaked in {text:?}");
        }
    }
    let text = log(&msgs, 1);
    // The header shows the reference, never the value.
    assert!(text.starts_with("$ echo whole={secret:API};"), "{text}");
    assert!(text.contains("whole=<secret:API>\n"), "{text}");
    assert!(text.contains("<secret:API>\n<secret:API>!\n") || text.contains("<secret:API>!\n"));
    assert_eq!(text.matches("<secret:API>").count(), 4, "{text}");
    assert!(text.contains("env=x-<secret:API>-y\n"), "{text}");
}

#[tokio::test]
async fn a_secret_written_half_to_stdout_and_half_to_stderr_is_redacted_in_order() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let s = step("split", "echo out-1; echo err-1 >&2; printf 'key=ab'; printf 'cdef\\n' >&2; echo out-2");
    let mut j = job(BuildId(1), &repo, &repo.rev1, vec![s]);
    j.secrets.insert("API".into(), "abcdef".into());
    let (result, msgs) = run(&j, work.path()).await;
    assert_eq!(result, BuildResult::Success, "{msgs:?}");
    let text = log(&msgs, 1);
    assert!(!text.contains("abcdef"), "secret leaked: {text}");
    // One stream, in the order it was written.
    assert!(text.ends_with("out-1\nerr-1\nkey=<secret:API>\nout-2\n"), "{text}");
}

#[tokio::test]
async fn unknown_secret_is_an_exception() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let j = job(BuildId(1), &repo, &repo.rev1, vec![step("bad", "echo {secret:MISSING}"), step("next", "true")]);
    let (result, msgs) = run(&j, work.path()).await;
    assert_eq!(result, BuildResult::Exception);
    assert_eq!(finished(&msgs, 1).0, StepResult::Exception);
    assert!(log(&msgs, 1).contains("unknown secret \"MISSING\""));
    assert_eq!(finished(&msgs, 2).0, StepResult::Skipped);
}

#[tokio::test]
async fn source_dir_is_reused_across_builds() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let first = job(
        BuildId(1),
        &repo,
        &repo.rev1,
        vec![step("dirty", "git rev-parse HEAD; touch junk; mkdir -p out && touch out/x")],
    );
    let (result, msgs) = run(&first, work.path()).await;
    assert_eq!(result, BuildResult::Success, "{msgs:?}");
    assert!(log(&msgs, 0).contains("clone --no-checkout"));

    let second = job(
        BuildId(2),
        &repo,
        &repo.rev2,
        vec![step("check", "git rev-parse HEAD; ls; test ! -e junk && test ! -e out")],
    );
    let (result, msgs) = run(&second, work.path()).await;
    assert_eq!(result, BuildResult::Success, "{}", log(&msgs, 0) + &log(&msgs, 1));
    let checkout = log(&msgs, 0);
    assert!(checkout.contains("reusing"), "{checkout}");
    assert!(!checkout.contains("clone --no-checkout"), "{checkout}");
    let text = log(&msgs, 1);
    assert!(text.contains(&format!("{}\n", repo.rev2)), "{text}");
    assert!(text.contains("b.txt"));

    // A commit made after the clone is fetched.
    let rev3 = commit_file(&repo.path, "c.txt", "third\n", "third");
    let third = job(BuildId(3), &repo, &rev3, vec![step("check", "git rev-parse HEAD; cat c.txt")]);
    let (result, msgs) = run(&third, work.path()).await;
    assert_eq!(result, BuildResult::Success, "{}", log(&msgs, 0));
    assert!(log(&msgs, 1).contains(&format!("{rev3}\nthird\n")));
}

#[tokio::test]
async fn bad_revision_is_a_checkout_exception() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let mut always = step("always", "echo x");
    always.always = true;
    let j = job(BuildId(1), &repo, "0123456789abcdef0123456789abcdef01234567", vec![step("s", "true"), always]);
    let (result, msgs) = run(&j, work.path()).await;
    assert_eq!(result, BuildResult::Exception);
    assert_eq!(finished(&msgs, 0).0, StepResult::Exception);
    assert_eq!(finished(&msgs, 1).0, StepResult::Skipped);
    assert_eq!(finished(&msgs, 2).0, StepResult::Skipped);
}

#[tokio::test]
async fn cancel_stops_the_running_step_skips_the_rest_and_still_runs_always_steps() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let mut cleanup = step("cleanup", "echo cleaned up");
    cleanup.always = true;
    let steps = vec![step("slow", "echo started; sleep 600"), step("next", "echo should-not-run"), cleanup];
    let j = job(BuildId(1), &repo, &repo.rev1, steps);
    let (cancel_tx, cancel_rx) = watch::channel(Stop::Running);
    let (tx, mut rx) = mpsc::channel(4);
    // Cancel once the first step has visibly started; keep every message.
    let collector = tokio::spawn(async move {
        let mut msgs = Vec::new();
        while let Some(m) = rx.recv().await {
            if matches!(&m, AgentMsg::Log { step: 1, text, .. } if text.lines().any(|l| l == "started")) {
                let _ = cancel_tx.send(Stop::Cancel);
            }
            msgs.push(m);
        }
        msgs
    });
    // The sleep outlasts the deadline: the job ends only because the cancel killed it.
    let result =
        tokio::time::timeout(DEADLINE, run_job(&j, work.path(), tx, cancel_rx)).await.expect("the cancel ends the job");
    let msgs = collector.await.expect("collector");
    assert_eq!(result, BuildResult::Cancelled);
    assert_eq!(finished(&msgs, 1).0, StepResult::Cancelled);
    assert!(log(&msgs, 1).contains("cancelled"));
    assert_eq!(finished(&msgs, 2).0, StepResult::Skipped);
    assert!(!log(&msgs, 2).contains("should-not-run"));
    assert_eq!(finished(&msgs, 3), (StepResult::Success, Some(0)));
    let cleanup = log(&msgs, 3);
    assert!(cleanup.contains("*** build cancelled; running this `always` step anyway\n"), "{cleanup}");
    assert!(cleanup.contains("cleaned up\n"), "{cleanup}");
}

#[tokio::test]
async fn an_agent_stopping_after_a_cancel_stops_the_always_step_too() {
    let repo = make_repo();
    let work = tempfile::tempdir().expect("tempdir");
    let mut cleanup = step("cleanup", "echo cleaning; sleep 1; echo still-cleaning; sleep 600");
    cleanup.always = true;
    let mut last = step("last", "echo should-not-run");
    last.always = true;
    let j = job(BuildId(1), &repo, &repo.rev1, vec![step("slow", "echo started; sleep 600"), cleanup, last]);
    let (cancel_tx, cancel_rx) = watch::channel(Stop::Running);
    let (tx, mut rx) = mpsc::channel(4);
    // Cancel when the first step runs; stop the agent when the clean-up runs. A second cancel
    // in between changes nothing: the clean-up is past cancelling.
    let collector = tokio::spawn(async move {
        let mut msgs = Vec::new();
        while let Some(m) = rx.recv().await {
            match &m {
                AgentMsg::Log { step: 1, text, .. } if text.lines().any(|l| l == "started") => {
                    let _ = cancel_tx.send(Stop::Cancel);
                }
                AgentMsg::Log { step: 2, text, .. } if text.lines().any(|l| l == "still-cleaning") => {
                    let _ = cancel_tx.send(Stop::Now);
                }
                AgentMsg::Log { step: 2, text, .. } if text.lines().any(|l| l == "cleaning") => {
                    cancel_tx.send_replace(Stop::Cancel);
                }
                _ => {}
            }
            msgs.push(m);
        }
        msgs
    });
    let result =
        tokio::time::timeout(DEADLINE, run_job(&j, work.path(), tx, cancel_rx)).await.expect("the stop ends the job");
    let msgs = collector.await.expect("collector");
    assert_eq!(result, BuildResult::Cancelled);
    assert_eq!(finished(&msgs, 1).0, StepResult::Cancelled);
    assert_eq!(finished(&msgs, 2).0, StepResult::Cancelled, "{}", log(&msgs, 2));
    assert!(log(&msgs, 2).contains("still-cleaning\n"), "a second cancel does not stop clean-up");
    assert_eq!(finished(&msgs, 3).0, StepResult::Skipped, "nothing more runs once the agent stops");
    assert!(!started(&msgs, 3));
}

// ---- The agent process against a fake master ----

mod client {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use paddock::agent::client::{run as run_agent, AgentError, AgentOptions};
    use paddock::agent::protocol::MasterMsg;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    type Ws = WebSocketStream<TcpStream>;

    /// Accepts one agent, checking the endpoint path.
    // The callback's error type is fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    async fn accept(listener: &TcpListener) -> Ws {
        let (tcp, _) = listener.accept().await.expect("accept");
        let path = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let seen = path.clone();
        let ws = tokio_tungstenite::accept_hdr_async(
            tcp,
            move |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                *seen.lock().expect("lock") = req.uri().path().to_string();
                Ok(resp)
            },
        )
        .await
        .expect("handshake");
        assert_eq!(*path.lock().expect("lock"), "/agent/ws");
        ws
    }

    async fn recv(ws: &mut Ws) -> Option<AgentMsg> {
        loop {
            match ws.next().await? {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("agent json")),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn send(ws: &mut Ws, msg: &MasterMsg) {
        let text = serde_json::to_string(msg).expect("json");
        ws.send(Message::text(text)).await.expect("send");
    }

    async fn hello(ws: &mut Ws) {
        match recv(ws).await {
            Some(AgentMsg::Hello { token, version }) => {
                assert_eq!(token.expose(), "tok-1");
                assert_eq!(version, env!("CARGO_PKG_VERSION"));
            }
            other => panic!("expected hello, got {other:?}"),
        }
    }

    fn options(port: u16, workdir: &Path) -> AgentOptions {
        AgentOptions {
            master: format!("http://127.0.0.1:{port}/"),
            token: "tok-1".into(),
            workdir: workdir.to_path_buf(),
        }
    }

    #[tokio::test]
    async fn runs_a_build_heartbeats_and_exits_on_shutdown() {
        let repo = make_repo();
        let work = tempfile::tempdir().expect("tempdir");
        // Reserve a port, then start listening only after the agent has begun retrying.
        let port = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
        let agent = tokio::spawn(run_agent(options(port, work.path())));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let mut ws = accept(&listener).await;
        hello(&mut ws).await;
        send(
            &mut ws,
            &MasterMsg::Welcome {
                machine: MachineId(5),
                heartbeat_secs: 1,
                resume_token: None,
                reconnect_secs: 0,
                acked: None,
            },
        )
        .await;
        let j = job(BuildId(42), &repo, &repo.rev1, vec![step("slowish", "git rev-parse HEAD; sleep 1.5")]);
        send(&mut ws, &MasterMsg::Run(Box::new(j))).await;
        let mut msgs = Vec::new();
        loop {
            let m = recv(&mut ws).await.expect("agent hung up");
            let done = matches!(m, AgentMsg::BuildFinished { .. });
            msgs.push(m);
            if done {
                break;
            }
        }
        assert!(
            matches!(
                msgs.last(),
                Some(AgentMsg::BuildFinished { build: BuildId(42), result: BuildResult::Success, .. })
            ),
            "{msgs:?}"
        );
        // Every report about the build is numbered, from 1, without a gap.
        let seqs: Vec<u64> = msgs.iter().filter_map(AgentMsg::sequenced).map(|(_, seq)| seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        assert!(msgs.contains(&AgentMsg::Heartbeat), "{msgs:?}");
        assert!(log(&msgs, 1).contains(&repo.rev1));
        send(&mut ws, &MasterMsg::Shutdown).await;
        let r = tokio::time::timeout(Duration::from_secs(10), agent).await.expect("agent exits").expect("join");
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test]
    async fn refused_is_an_error() {
        let work = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let agent = tokio::spawn(run_agent(options(port, work.path())));
        let mut ws = accept(&listener).await;
        hello(&mut ws).await;
        send(&mut ws, &MasterMsg::Refused { reason: "unknown token".into() }).await;
        let r = agent.await.expect("join");
        assert!(matches!(&r, Err(AgentError::Refused(reason)) if reason == "unknown token"), "{r:?}");
    }

    #[tokio::test]
    async fn master_gone_kills_the_running_step_and_exits() {
        let repo = make_repo();
        let work = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let agent = tokio::spawn(run_agent(options(port, work.path())));
        let mut ws = accept(&listener).await;
        hello(&mut ws).await;
        send(
            &mut ws,
            &MasterMsg::Welcome {
                machine: MachineId(1),
                heartbeat_secs: 30,
                resume_token: None,
                reconnect_secs: 0,
                acked: None,
            },
        )
        .await;
        let j = job(BuildId(1), &repo, &repo.rev1, vec![step("forever", "echo pid=$$; exec sleep 60")]);
        send(&mut ws, &MasterMsg::Run(Box::new(j))).await;
        let mut text = String::new();
        let pid: i32 = loop {
            if let AgentMsg::Log { step: 1, text: t, .. } = recv(&mut ws).await.expect("agent hung up") {
                text.push_str(&t);
            }
            if let Some(pid) = text.lines().find_map(|l| l.strip_prefix("pid=")).and_then(|p| p.trim().parse().ok()) {
                break pid;
            }
        };
        drop(ws);
        let r = tokio::time::timeout(Duration::from_secs(10), agent).await.expect("agent exits").expect("join");
        assert!(r.is_ok(), "{r:?}");
        assert!(process_gone(pid), "step process {pid} survived the agent");
    }
}

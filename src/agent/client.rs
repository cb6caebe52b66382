//! The `paddock agent` process: connect to the master, authenticate, heartbeat, run builds.
//!
//! The agent is a latent worker. It runs one build at a time. On [`MasterMsg::Shutdown`] or
//! SIGTERM/SIGINT it kills whatever is running and exits, so nothing is left behind.
//!
//! Every report about a build is kept in a [`Journal`] until the master acknowledges it, so
//! nothing said to a master that died before storing it is lost. When the connection drops (the
//! master restarts, the network hiccups), a build in progress carries on: the agent reconnects
//! with the resume token of its last [`MasterMsg::Welcome`], for up to `reconnect_secs`. Once
//! back, the master adopts the build and receives every report it has not acknowledged. A master that gave no resume token, refuses the
//! resume, or stays away past the window, gets the old behaviour: the build is killed and the
//! agent exits.
//!
//! On EC2 the agent also polls the instance metadata service (see [`super::imds`]). A spot
//! interruption notice or rebalance recommendation is told to the master at once, and told again
//! after a reconnection; the build carries on until the master says Shutdown.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::imds::{self, Notice};
use super::job::{run_job, Stop};
use super::journal::Journal;
use super::protocol::{Ack, AgentMsg, BuildResult, MasterMsg, Secret, MAX_LOG_BYTES};
use crate::core::{BuildId, MachineId};

/// How long the initial connection is retried.
const CONNECT_WINDOW: Duration = Duration::from_secs(30);
/// First and largest pause between connection attempts.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long to wait for Welcome/Refused after Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cancelled job may take to stop before the agent exits anyway (kill grace and
/// output drain fit well within this).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Messages buffered between the running job and the socket.
const JOB_CHANNEL: usize = 256;
/// How long one reconnection attempt (connect, Resume, Welcome) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Notices waiting for the connection (there are at most two kinds, each reported once).
const NOTICE_CHANNEL: usize = 4;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Settings of `paddock agent`.
#[derive(Clone)]
pub struct AgentOptions {
    /// Base URL of the master (`http://…`, `https://…`, `ws://…` or `wss://…`).
    pub master: String,
    /// One-time token bound to this machine.
    pub token: String,
    /// Where checkouts and build files live.
    pub workdir: PathBuf,
}

// Hand-written so that the token never reaches a log through `{:?}`.
impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("master", &self.master)
            .field("token", &"<redacted>")
            .field("workdir", &self.workdir)
            .finish()
    }
}

/// Where `paddock agent` watches for spot interruption notices (on EC2 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsOptions {
    /// Base URL of the instance metadata service, e.g. `http://169.254.169.254`.
    pub url: String,
    /// Time between two polls.
    pub poll: Duration,
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The master URL is not http(s)/ws(s).
    #[error("invalid master URL {0:?}: expected http://, https://, ws:// or wss://")]
    BadUrl(String),
    /// No connection could be made within the retry window.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The WebSocket URL tried.
        url: String,
        /// The last error (boxed: tungstenite errors are large).
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// The master refused the token.
    #[error("refused by master: {0}")]
    Refused(String),
    /// The master did not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The WebSocket failed during the handshake phase.
    #[error("websocket error: {0}")]
    Ws(#[source] Box<tungstenite::Error>),
    /// Local I/O (work directory, signal handlers).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tungstenite::Error> for AgentError {
    fn from(e: tungstenite::Error) -> Self {
        AgentError::Ws(Box::new(e))
    }
}

/// The WebSocket URL of the agent endpoint for a master base URL.
pub fn ws_url(master: &str) -> Result<String, AgentError> {
    let base = master.trim_end_matches('/');
    let rest = if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_string()
    } else {
        return Err(AgentError::BadUrl(master.to_string()));
    };
    Ok(format!("{rest}/agent/ws"))
}

/// What a Welcome granted. No `Debug`: it holds the resume token.
struct Session {
    machine: MachineId,
    heartbeat_secs: u64,
    resume_token: Option<String>,
    reconnect_secs: u64,
    /// How far the master had stored the reports of the build a Resume named.
    acked: Option<Ack>,
}

/// Why a connected stretch ended.
enum End {
    /// The master said Shutdown, or a signal arrived: stop, the socket still works.
    Stop,
    /// The connection is gone; what it did not carry is still in the journal.
    Lost,
}

/// What the agent carries from one connection to the next.
struct State {
    /// Reports about builds, kept until the master acknowledges them.
    journal: Journal,
    /// Interruption notices told to the master. Nothing acknowledges them, so each is repeated
    /// after every reconnection (the master ignores a repeat); they matter more than a few
    /// duplicate frames.
    notices: Vec<AgentMsg>,
    /// The build being run, if any.
    current: Option<Running>,
    /// The last build given to this machine, for a Resume while idle.
    last_build: Option<BuildId>,
    /// Log text of one step held back (since when) for up to [`LOG_LINGER`]: lines that come
    /// in a burst (a command's header and its output) travel, and are stored, as one report.
    held_log: Option<(AgentMsg, tokio::time::Instant)>,
}

/// How long log text may wait for more of the same step before it is sent.
const LOG_LINGER: Duration = Duration::from_millis(50);

/// The most log text one held report gathers.
const LOG_BATCH_BYTES: usize = 64 * 1024;

impl State {
    fn new(workdir: &std::path::Path) -> State {
        State {
            journal: Journal::new(workdir.join(SPILL_FILE)),
            notices: Vec::new(),
            current: None,
            last_build: None,
            held_log: None,
        }
    }

    /// The build a Resume speaks of: the one running, else the last one.
    fn resume_build(&self) -> Option<BuildId> {
        self.current.as_ref().map(|r| r.build).or(self.last_build)
    }

    /// Keeps a report of the job's for the master. Log text is held back to gather more of
    /// the same step; anything else first releases what is held, so reports keep their order.
    fn keep(&mut self, msg: AgentMsg) {
        if let AgentMsg::Log { build, step, text, .. } = &msg {
            if let Some((AgentMsg::Log { build: b, step: st, text: held, .. }, _)) = &mut self.held_log {
                if b == build && st == step && held.len() + text.len() <= LOG_BATCH_BYTES {
                    held.push_str(text);
                    return;
                }
            }
            self.release_log();
            self.held_log = Some((msg, tokio::time::Instant::now()));
            return;
        }
        self.release_log();
        if let AgentMsg::BuildFinished { build, .. } = &msg {
            if self.current.as_ref().is_some_and(|r| r.build == *build) {
                self.current = None;
            }
        }
        self.journal_push(msg);
    }

    fn journal_push(&mut self, msg: AgentMsg) {
        if let Err(e) = self.journal.push(msg) {
            tracing::error!("cannot keep a report for the master: {e}");
        }
    }

    /// Puts held log text into the journal, to be sent.
    fn release_log(&mut self) {
        if let Some((msg, _)) = self.held_log.take() {
            self.journal_push(msg);
        }
    }

    /// When held log text is due to be sent.
    fn log_due(&self) -> Option<tokio::time::Instant> {
        self.held_log.as_ref().map(|(_, since)| *since + LOG_LINGER)
    }

    /// The master stored reports up to `ack`.
    fn acked(&mut self, ack: Ack) {
        if let Err(e) = self.journal.ack(ack) {
            tracing::error!("cannot read back kept reports: {e}");
        }
        self.journal.forget_done();
    }

    /// A job task that ended without its BuildFinished (it panicked) must still be reported.
    fn job_ended(&mut self, r: Result<(), tokio::task::JoinError>) {
        // Taken either way: a finished JoinHandle must not be polled again. A normal end has
        // already queued its BuildFinished, which is kept in order.
        if let (Err(e), Some(run)) = (r, self.current.take()) {
            tracing::error!(build = run.build.get(), "build task failed: {e}");
            self.keep(AgentMsg::BuildFinished { build: run.build, seq: 0, result: BuildResult::Exception });
        }
    }
}

/// Where reports that do not fit in memory wait, in the agent's work directory.
const SPILL_FILE: &str = ".paddock-journal";

/// Stops a background task when the agent stops, however it stops.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the agent until the master says Shutdown, a signal arrives, or the master stays
/// unreachable past the reconnection window.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    run_with(opts, None).await
}

/// [`run`], also watching the metadata service for spot notices when `metadata` is given; the
/// poller lives as long as the agent.
pub async fn run_with(opts: AgentOptions, metadata: Option<ImdsOptions>) -> Result<(), AgentError> {
    tokio::fs::create_dir_all(&opts.workdir).await?;
    let url = ws_url(&opts.master)?;
    let mut signals = Signals::new()?;
    // Started before connecting: a notice that comes early waits in the channel for the Welcome.
    // Without a poller the sender is dropped at once and the channel simply stays empty.
    let (notice_tx, mut notices) = mpsc::channel::<Notice>(NOTICE_CHANNEL);
    let _poller = metadata.map(|i| AbortOnDrop(tokio::spawn(imds::poll(i.url, i.poll, notice_tx))));

    let ws = tokio::select! {
        r = connect(&url) => r?,
        () = signals.recv() => {
            tracing::info!("signal received before connecting; exiting");
            return Ok(());
        }
    };
    let (mut sink, mut stream) = ws.split();

    let hello = AgentMsg::Hello { token: Secret(opts.token.clone()), version: env!("CARGO_PKG_VERSION").to_string() };
    sink.send(Message::text(encode(&hello)?)).await?;
    let mut session = tokio::select! {
        r = tokio::time::timeout(WELCOME_TIMEOUT, await_welcome(&mut stream)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(AgentError::Protocol("no welcome from master".into())),
        },
        () = signals.recv() => return Ok(()),
    };
    tracing::info!(machine = session.machine.get(), heartbeat_secs = session.heartbeat_secs, "connected to master");

    let (job_tx, mut job_rx) = mpsc::channel::<AgentMsg>(JOB_CHANNEL);
    let mut state = State::new(&opts.workdir);

    // Whether the socket can still take the job's last messages.
    let socket_open = loop {
        let end = match start_connection(&mut sink, &session, &mut state).await {
            true => {
                connected(
                    &mut sink,
                    &mut stream,
                    &session,
                    &opts,
                    &job_tx,
                    &mut job_rx,
                    &mut state,
                    &mut notices,
                    &mut signals,
                )
                .await
            }
            false => End::Lost,
        };
        match end {
            End::Stop => break true,
            End::Lost => {
                let Some(token) = session.resume_token.clone().filter(|_| session.reconnect_secs > 0) else {
                    tracing::warn!("lost the master; exiting");
                    break false;
                };
                tracing::warn!(window_secs = session.reconnect_secs, "lost the master; reconnecting");
                let window = Duration::from_secs(session.reconnect_secs);
                let back = reconnect(
                    &url,
                    session.machine,
                    &token,
                    window,
                    &mut job_rx,
                    &mut state,
                    &mut notices,
                    &mut signals,
                )
                .await;
                match back {
                    Some((new_sink, new_stream, new_session)) => {
                        tracing::info!(machine = new_session.machine.get(), "reconnected to master");
                        (sink, stream, session) = (new_sink, new_stream, new_session);
                    }
                    None => break false,
                }
            }
        }
    };

    // Stop the running build (if any). While it stops, keep forwarding what it says (its last
    // log lines, BuildFinished) if the socket still works, so it never blocks on a full channel.
    drop(job_tx);
    let mut forward = socket_open;
    if let Some(mut run) = state.current.take() {
        let _ = run.cancel.send(Stop::Now);
        let give_up = tokio::time::sleep(STOP_TIMEOUT);
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                _ = &mut run.handle => break,
                Some(msg) = job_rx.recv() => {
                    state.keep(msg);
                    forward = forward && send_pending(&mut sink, &mut state).await;
                }
                () = &mut give_up => {
                    tracing::warn!(build = run.build.get(), "build did not stop in time; exiting anyway");
                    break;
                }
            }
        }
    }
    while let Ok(msg) = job_rx.try_recv() {
        state.keep(msg);
    }
    forward = forward && send_pending(&mut sink, &mut state).await;
    if forward {
        let _ = sink.send(Message::Close(None)).await;
    }
    Ok(())
}

/// Begins a connection after its Welcome: forgets what the master said it already has, tells
/// the notices again, and sends every kept report in order. `false` if the socket failed.
async fn start_connection(sink: &mut SplitSink<Ws, Message>, session: &Session, state: &mut State) -> bool {
    if let Some(ack) = session.acked {
        state.acked(ack);
    }
    state.journal.rewind();
    for notice in &state.notices {
        if !send_msg(sink, notice).await {
            return false;
        }
    }
    send_pending(sink, state).await
}

/// Sends the kept reports not yet sent on this connection; `false` if the socket failed (they
/// stay kept).
async fn send_pending(sink: &mut SplitSink<Ws, Message>, state: &mut State) -> bool {
    state.release_log();
    let dropped = state.journal.take_dropped();
    if dropped > 0 {
        tracing::warn!(bytes = dropped, max = MAX_LOG_BYTES, "build output past the log limit dropped");
    }
    // Written out together (one flush): the master reads what arrives together as one batch.
    let mut fed = false;
    while let Some(text) = state.journal.next_unsent() {
        if sink.feed(Message::text(text.to_string())).await.is_err() {
            return false;
        }
        fed = true;
        state.journal.mark_sent();
    }
    !fed || sink.flush().await.is_ok()
}

/// Sleeps until `at` (for ever when `None`).
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Serves one connection: heartbeats, runs builds, forwards their messages.
#[allow(clippy::too_many_arguments)]
async fn connected(
    sink: &mut SplitSink<Ws, Message>,
    stream: &mut SplitStream<Ws>,
    session: &Session,
    opts: &AgentOptions,
    job_tx: &mpsc::Sender<AgentMsg>,
    job_rx: &mut mpsc::Receiver<AgentMsg>,
    state: &mut State,
    notices: &mut mpsc::Receiver<Notice>,
    signals: &mut Signals,
) -> End {
    let period = Duration::from_secs(session.heartbeat_secs.max(1));
    let mut heartbeat = tokio::time::interval(period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The master pings every heartbeat period: silence for three means the connection is
    // half-open (the master's host vanished without closing it).
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            // The first tick is at once: the master hears from this connection right after the
            // Welcome, which tells it the Welcome (and its resume token) arrived.
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > period * 3 && session.resume_token.is_some() {
                    tracing::warn!("nothing heard from the master for {:?}", last_heard.elapsed());
                    return End::Lost;
                }
                if !send_msg(sink, &AgentMsg::Heartbeat).await {
                    return End::Lost;
                }
            }
            Some(msg) = job_rx.recv() => {
                // Log text waits (see `LOG_LINGER`) for more of its step; the rest goes now,
                // with whatever else the job has reported meanwhile.
                let mut log = matches!(msg, AgentMsg::Log { .. });
                state.keep(msg);
                while let Ok(more) = job_rx.try_recv() {
                    log &= matches!(more, AgentMsg::Log { .. });
                    state.keep(more);
                }
                if !log && !send_pending(sink, state).await {
                    return End::Lost;
                }
            }
            () = until(state.log_due()), if state.log_due().is_some() => {
                if !send_pending(sink, state).await {
                    return End::Lost;
                }
            }
            Some(notice) = notices.recv() => {
                let msg = notice.to_msg();
                tracing::warn!(kind = notice.kind.as_str(), detail = %notice.detail, "this machine is going away; telling the master");
                state.notices.push(msg.clone());
                // Output held back goes first: once told, the master ignores the build's reports.
                if !send_pending(sink, state).await || !send_msg(sink, &msg).await {
                    return End::Lost;
                }
            }
            r = wait_running(&mut state.current) => {
                state.job_ended(r);
                if !send_pending(sink, state).await {
                    return End::Lost;
                }
            }
            incoming = stream.next() => match incoming.inspect(|frame| if frame.is_ok() { last_heard = tokio::time::Instant::now() }) {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<MasterMsg>(text.as_str()) {
                    Ok(MasterMsg::Ack(ack)) => {
                        state.acked(ack);
                        // Room in memory may have brought spilled reports back.
                        if !send_pending(sink, state).await {
                            return End::Lost;
                        }
                    }
                    Ok(MasterMsg::Run(job)) => {
                        if let Some(run) = state.current.as_ref() {
                            tracing::warn!(busy_with = run.build.get(), build = job.build.get(), "ignoring a second build while busy");
                            continue;
                        }
                        // Log identifiers only: the job carries secrets.
                        tracing::info!(build = job.build.get(), builder = %job.builder, revision = %job.revision, "running build");
                        let (cancel_tx, cancel_rx) = watch::channel(Stop::Running);
                        let tx = job_tx.clone();
                        let workdir = opts.workdir.clone();
                        let build = job.build;
                        let handle = tokio::spawn(async move {
                            let result = run_job(&job, &workdir, tx.clone(), cancel_rx).await;
                            tracing::info!(build = build.get(), result = result.as_str(), "build finished");
                            let _ = tx.send(AgentMsg::BuildFinished { build, seq: 0, result }).await;
                        });
                        state.current = Some(Running { build, handle, cancel: cancel_tx });
                        state.last_build = Some(build);
                    }
                    Ok(MasterMsg::Shutdown) => {
                        tracing::info!("master asked to shut down");
                        return End::Stop;
                    }
                    Ok(MasterMsg::Cancel { build }) => match state.current.as_ref() {
                        // The job sees the flag, kills its step's process group and reports the
                        // build cancelled; the connection stays for the next build.
                        Some(run) if run.build == build => {
                            tracing::info!(build = build.get(), "master cancelled the build; stopping it");
                            // Never softens a stop already under way.
                            run.cancel.send_if_modified(|s| {
                                let was = *s;
                                *s = was.max(Stop::Cancel);
                                *s != was
                            });
                        }
                        _ => tracing::info!(build = build.get(), "cancel for a build not running here; ignored"),
                    },
                    Ok(MasterMsg::Welcome { .. } | MasterMsg::Refused { .. }) => {
                        tracing::warn!("unexpected handshake message after welcome; ignored");
                    }
                    Err(e) => tracing::warn!("unreadable message from master ignored: {e}"),
                },
                Some(Ok(Message::Close(_))) | None => {
                    tracing::info!("master closed the connection");
                    return End::Lost;
                }
                // Pings are answered by tungstenite itself; binary frames are not part of the protocol.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!("connection to master failed: {e}");
                    return End::Lost;
                }
            },
            () = signals.recv() => {
                tracing::info!("signal received; stopping");
                if let Some(run) = state.current.as_ref() {
                    // The machine is going down under a running build (a cloud shutdown, an
                    // operator): the master must retry it, not take the killed step's exit as
                    // the build's result. Said before the build is stopped, so it comes first.
                    let msg = AgentMsg::Interrupted {
                        kind: "shutdown".to_string(),
                        detail: format!("the agent was signalled to stop during build {}", run.build),
                    };
                    // Output held back goes first: once told, the master ignores the build's
                    // reports.
                    if send_pending(sink, state).await {
                        let _ = send_msg(sink, &msg).await;
                    }
                }
                return End::Stop;
            }
        }
    }
}

/// The build being run.
struct Running {
    build: BuildId,
    handle: JoinHandle<()>,
    cancel: watch::Sender<Stop>,
}

// However the agent leaves its loop, a build it stops tracking is told to stop: the job treats
// a dropped sender as "never stopped", so this is what prevents orphaned steps.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.cancel.send(Stop::Now);
    }
}

/// Sends one message; `false` if the socket is gone (encoding cannot fail for these types).
async fn send_msg(sink: &mut SplitSink<Ws, Message>, msg: &AgentMsg) -> bool {
    match encode(msg) {
        Ok(text) => sink.send(Message::text(text)).await.is_ok(),
        Err(e) => {
            tracing::error!("{e}");
            false
        }
    }
}

/// Resolves when the running job's task ends; never while idle.
async fn wait_running(current: &mut Option<Running>) -> Result<(), tokio::task::JoinError> {
    match current {
        Some(run) => (&mut run.handle).await,
        None => std::future::pending().await,
    }
}

/// Serializes a message for a text frame.
fn encode(msg: &AgentMsg) -> Result<String, AgentError> {
    serde_json::to_string(msg).map_err(|e| AgentError::Protocol(format!("cannot encode: {e}")))
}

/// Connects, retrying for [`CONNECT_WINDOW`] with a growing pause.
async fn connect(url: &str) -> Result<Ws, AgentError> {
    let give_up = tokio::time::Instant::now() + CONNECT_WINDOW;
    let mut pause = BACKOFF_START;
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _response)) => return Ok(ws),
            Err(e) => {
                // Errors that waiting cannot fix are reported at once.
                let permanent = matches!(e, tungstenite::Error::Url(_) | tungstenite::Error::Tls(_));
                if permanent || tokio::time::Instant::now() + pause > give_up {
                    return Err(AgentError::Connect { url: url.to_string(), source: Box::new(e) });
                }
                tracing::debug!("master not reachable yet ({e}); retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Tries to reconnect for up to `window`, keeping the job's messages meanwhile. `None` when
/// the window passed, the master refused, or a signal arrived.
#[allow(clippy::too_many_arguments)]
async fn reconnect(
    url: &str,
    machine: MachineId,
    token: &str,
    window: Duration,
    job_rx: &mut mpsc::Receiver<AgentMsg>,
    state: &mut State,
    notices: &mut mpsc::Receiver<Notice>,
    signals: &mut Signals,
) -> Option<(SplitSink<Ws, Message>, SplitStream<Ws>, Session)> {
    let give_up = tokio::time::sleep(window);
    tokio::pin!(give_up);
    let mut pause = BACKOFF_START;
    loop {
        let build = state.resume_build();
        let attempt = resume_once(url, machine, token, build);
        tokio::pin!(attempt);
        let pause_over = tokio::time::sleep(pause);
        tokio::pin!(pause_over);
        let mut attempt_done = false;
        // Drive the attempt, then the pause, while the job goes on and its messages are kept.
        loop {
            tokio::select! {
                r = &mut attempt, if !attempt_done => match r {
                    Ok(back) => return Some(back),
                    Err(AgentError::Refused(reason)) => {
                        tracing::warn!(%reason, "master refused the reconnection; exiting");
                        return None;
                    }
                    Err(e) => {
                        tracing::debug!("master not reachable yet: {e}");
                        attempt_done = true;
                    }
                },
                () = &mut pause_over, if attempt_done => break,
                Some(msg) = job_rx.recv() => state.keep(msg),
                Some(notice) = notices.recv() => {
                    tracing::warn!(kind = notice.kind.as_str(), detail = %notice.detail, "this machine is going away; will tell the master");
                    state.notices.push(notice.to_msg());
                }
                r = wait_running(&mut state.current) => state.job_ended(r),
                () = signals.recv() => {
                    tracing::info!("signal received while reconnecting; stopping");
                    return None;
                }
                () = &mut give_up => {
                    tracing::warn!("the master stayed unreachable; exiting");
                    return None;
                }
            }
        }
        pause = (pause * 2).min(BACKOFF_MAX);
    }
}

/// One reconnection attempt: connect, Resume, wait for Welcome.
async fn resume_once(
    url: &str,
    machine: MachineId,
    token: &str,
    build: Option<BuildId>,
) -> Result<(SplitSink<Ws, Message>, SplitStream<Ws>, Session), AgentError> {
    let timed_out = || AgentError::Protocol("reconnection attempt timed out".into());
    let connected =
        tokio::time::timeout(ATTEMPT_TIMEOUT, tokio_tungstenite::connect_async(url)).await.map_err(|_| timed_out())?;
    let (ws, _response) = connected.map_err(|e| AgentError::Connect { url: url.to_string(), source: Box::new(e) })?;
    let (mut sink, mut stream) = ws.split();
    let resume = AgentMsg::Resume {
        machine,
        token: Secret(token.to_string()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        build,
    };
    sink.send(Message::text(encode(&resume)?)).await?;
    let session =
        tokio::time::timeout(ATTEMPT_TIMEOUT, await_welcome(&mut stream)).await.map_err(|_| timed_out())??;
    Ok((sink, stream, session))
}

/// Waits for Welcome or Refused.
async fn await_welcome(stream: &mut SplitStream<Ws>) -> Result<Session, AgentError> {
    while let Some(msg) = stream.next().await {
        match msg? {
            Message::Text(text) => {
                return match serde_json::from_str::<MasterMsg>(text.as_str()) {
                    Ok(MasterMsg::Welcome { machine, heartbeat_secs, resume_token, reconnect_secs, acked }) => {
                        Ok(Session {
                            machine,
                            heartbeat_secs,
                            resume_token: resume_token.map(|t| t.expose().to_string()),
                            reconnect_secs,
                            acked,
                        })
                    }
                    Ok(MasterMsg::Refused { reason }) => Err(AgentError::Refused(reason)),
                    Ok(_) => Err(AgentError::Protocol("expected welcome".into())),
                    Err(e) => Err(AgentError::Protocol(format!("unreadable welcome: {e}"))),
                };
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Err(AgentError::Protocol("master closed the connection before welcome".into()))
}

/// SIGTERM and SIGINT as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (from then on these signals no longer kill the process).
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(ws_url("http://127.0.0.1:8010/").ok(), Some("ws://127.0.0.1:8010/agent/ws".to_string()));
        assert_eq!(ws_url("https://ci.example.org").ok(), Some("wss://ci.example.org/agent/ws".to_string()));
        assert_eq!(ws_url("ws://h:1").ok(), Some("ws://h:1/agent/ws".to_string()));
        assert!(matches!(ws_url("ftp://x"), Err(AgentError::BadUrl(_))));
    }

    #[test]
    fn debug_hides_token() {
        let opts = AgentOptions { master: "http://m".into(), token: "tok-123".into(), workdir: PathBuf::from("/tmp") };
        assert!(!format!("{opts:?}").contains("tok-123"));
    }
}

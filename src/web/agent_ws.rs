//! `GET /agent/ws`: where agents connect, authenticate once, and report their builds.
//!
//! Until an agent has authenticated, its socket is a stranger's: at most
//! [`MAX_UNAUTHENTICATED`] such sockets exist at once (past that, the upgrade is refused with
//! 503 and the agent retries), and the one message read from each (the Hello or Resume, a few
//! hundred bytes) may be at most [`MAX_HELLO_BYTES`]. That message is read frame by frame here
//! rather than by tungstenite, whose frame and message limits are fixed for a socket's whole
//! life: it reserves a frame's announced length before reading it, so its limits for an
//! authenticated agent (16 MiB frames) would let each stranger cost 16 MiB with a few bytes.

use std::collections::HashSet;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::serve::{env_number, WarnEvery};
use super::ApiError;
use crate::agent::protocol::{Ack, AgentMsg, MasterMsg, Secret};
use crate::agent::reports::{Next, ReportStream};
use crate::core::{BuildId, MachineId};
use crate::runtime::{new_token, token_hash, Shared};
use crate::store::{Applied, Report, ReportEffect};

/// An agent's socket, once upgraded.
type WebSocket = WebSocketStream<TokioIo<Upgraded>>;

/// How long a new connection may take to say hello (tests lengthen it with the hidden
/// `PADDOCK_AGENT_HELLO_TIMEOUT_MS`).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most sockets waiting for their hello at once (tests change it with the hidden
/// `PADDOCK_AGENT_MAX_UNAUTHENTICATED`).
pub const MAX_UNAUTHENTICATED: usize = 64;
/// Largest first message read from a socket that has not authenticated yet.
pub const MAX_HELLO_BYTES: usize = 4096;
/// Sockets upgraded and not yet authenticated.
static UNAUTHENTICATED: AtomicUsize = AtomicUsize::new(0);
/// Warnings about sockets refused at the cap come at most this often.
static REFUSALS: WarnEvery = WarnEvery::new(Duration::from_secs(10));
/// Tells a connection's close from that of an earlier connection of the same machine.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);
/// Most characters of an interruption notice stored in the machine's event log.
const MAX_NOTICE_DETAIL: usize = 300;
/// Most messages of an agent's handled together (their reports stored in one transaction).
const BATCH_MESSAGES: usize = 64;
/// Most text read into one batch: what arrived beyond it waits for the next one (an agent
/// sends logs in reports of at most 64 KiB; a misbehaving one must not make a batch huge).
const BATCH_BYTES: usize = 1024 * 1024;

/// A place among the sockets that have not authenticated; given back when dropped.
struct Stranger;

impl Stranger {
    /// A place, unless [`MAX_UNAUTHENTICATED`] (or the test's number) are taken.
    fn arrive() -> Option<Stranger> {
        let max = env_number("PADDOCK_AGENT_MAX_UNAUTHENTICATED")
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(MAX_UNAUTHENTICATED);
        UNAUTHENTICATED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Stranger)
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        UNAUTHENTICATED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts the WebSocket upgrade (RFC 6455) and serves the socket in a task of its own.
pub async fn upgrade(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let accept = match accept_key(req.headers()) {
        Ok(accept) => accept,
        Err(why) => return ApiError::bad_request(why).into_response(),
    };
    let Some(stranger) = Stranger::arrive() else {
        if let Some(n) = REFUSALS.tick() {
            tracing::warn!(%peer, refused = n, "agent sockets refused: as many as allowed are waiting for their hello");
        }
        let reason = "too many agents are connecting at once; try again".to_string();
        return ApiError { status: StatusCode::SERVICE_UNAVAILABLE, reason }.into_response();
    };
    let upgrading = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrading.await {
            Ok(io) => serve(TokioIo::new(io), s, peer, stranger).await,
            Err(e) => tracing::debug!(%peer, "agent socket upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

/// The `Sec-WebSocket-Accept` answering a valid upgrade request, or why it is not one.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err("expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket)");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err("expected WebSocket version 13");
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or("missing Sec-WebSocket-Key")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).map_err(|_| "invalid Sec-WebSocket-Key")
}

/// Reads the first message of a socket that has not authenticated: one unfragmented, masked
/// text frame of at most [`MAX_HELLO_BYTES`], as every agent sends its Hello or Resume. Nothing
/// is read past it, so the socket can be handed to tungstenite afterwards.
async fn read_hello(io: &mut (impl AsyncRead + Unpin)) -> Result<String, &'static str> {
    const CLOSED: &str = "the connection closed before hello";
    // A header is 2 to 14 bytes; it is read a byte at a time until it parses, so that no byte
    // of what follows is consumed.
    let mut head = Vec::with_capacity(14);
    let (frame, len) = loop {
        head.push(io.read_u8().await.map_err(|_| CLOSED)?);
        match FrameHeader::parse(&mut Cursor::new(&head)) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) if head.len() < 14 => continue,
            _ => return Err("expected hello"),
        }
    };
    let text = frame.opcode == OpCode::Data(Data::Text) && frame.is_final && !(frame.rsv1 || frame.rsv2 || frame.rsv3);
    let (true, Some(mask)) = (text, frame.mask) else { return Err("expected hello") };
    if len > MAX_HELLO_BYTES as u64 {
        return Err("hello too large");
    }
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload).await.map_err(|_| CLOSED)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    String::from_utf8(payload).map_err(|_| "expected hello")
}

async fn send(socket: &mut WebSocket, msg: &MasterMsg) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

/// Tells the agent why it is refused, logs it (never the token), and closes.
async fn refuse(mut socket: WebSocket, peer: SocketAddr, reason: &str) {
    tracing::warn!(%peer, "agent refused: {reason}");
    let _ = send(&mut socket, &MasterMsg::Refused { reason: reason.into() }).await;
    let _ = socket.close(None).await;
}

async fn serve(mut io: TokioIo<Upgraded>, s: Arc<Shared>, peer: SocketAddr, stranger: Stranger) {
    let timeout = env_number("PADDOCK_AGENT_HELLO_TIMEOUT_MS").map(Duration::from_millis).unwrap_or(HELLO_TIMEOUT);
    let first = match tokio::time::timeout(timeout, read_hello(&mut io)).await {
        Ok(Ok(text)) => serde_json::from_str::<AgentMsg>(&text).map_err(|_| "expected hello"),
        Ok(Err(why)) => Err(why),
        Err(_) => Err("expected hello"),
    };
    // An authenticated agent's messages are bigger (logs); tungstenite's limits, as before.
    let mut socket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let first = match first {
        Ok(msg) => msg,
        Err(why) => return refuse(socket, peer, why).await,
    };
    let resume_token = new_token();
    let new_hash = token_hash(&resume_token);
    let (machine, resumed) = match first {
        AgentMsg::Hello { token, .. } => match s.store.claim_token(&token_hash(token.expose()), s.now()).await {
            Ok(Some(m)) => match s.store.set_resume_hash(m, &new_hash).await {
                Ok(()) => (m, None),
                Err(e) => {
                    tracing::error!(%peer, "cannot store the resume token: {e}");
                    return;
                }
            },
            Ok(None) => return refuse(socket, peer, "unknown or already used token").await,
            Err(e) => {
                tracing::error!(%peer, "cannot check agent token: {e}");
                return;
            }
        },
        AgentMsg::Resume { machine, token, build, .. } => {
            match s.store.claim_resume(machine, &token_hash(token.expose()), &new_hash).await {
                Ok(true) => (machine, Some(build)),
                Ok(false) => return refuse(socket, peer, "unknown or already used resume token").await,
                Err(e) => {
                    tracing::error!(%peer, "cannot check resume token: {e}");
                    return;
                }
            }
        }
        _ => return refuse(socket, peer, "expected hello").await,
    };
    // Authenticated: no longer a stranger.
    drop(stranger);
    // A resumed agent sends only what follows what is stored of the build it speaks of.
    let acked = match resumed {
        Some(Some(build)) => match s.store.applied_seq(build).await {
            Ok(seq) => Some(Ack { build, seq }),
            Err(e) => {
                tracing::error!(machine = machine.get(), "cannot read how far build {build} is stored: {e}");
                None
            }
        },
        _ => None,
    };
    let heartbeat_secs = (s.config.master.heartbeat_timeout.as_secs() / 3).max(1);
    let welcome = MasterMsg::Welcome {
        machine,
        heartbeat_secs,
        resume_token: Some(Secret(resume_token)),
        // Long enough to ride out a master restart; no longer than the master waits for a
        // busy machine, so an agent never builds on after its build was given to another.
        reconnect_secs: s.config.master.heartbeat_timeout.as_secs().max(1),
        acked,
    };
    if !send(&mut socket, &welcome).await {
        return;
    }
    tracing::info!(machine = machine.get(), %peer, resumed = resumed.is_some(), "agent connected");
    let conn = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Acknowledgements go out through the same writer as the loop's messages.
    let acks = tx.clone();
    s.master.agent_connected(machine, conn, tx, resumed).await;

    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        // Pings let the agent tell a live master from a half-open connection.
        let mut ping = tokio::time::interval(Duration::from_secs(heartbeat_secs));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let shutdown = matches!(msg, MasterMsg::Shutdown);
                    let Ok(text) = serde_json::to_string(&msg) else { continue };
                    if sink.send(Message::Text(text.into())).await.is_err() || shutdown {
                        break;
                    }
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    // Any message is a sign of life, not only heartbeats: an agent delivering a long backlog
    // after a reconnection is alive. Told to the fleet at most once a second.
    let mut last_alive = tokio::time::Instant::now();
    // Interruption notices already handled on this connection (agents repeat them).
    let mut notices = HashSet::new();
    let mut heard = false;
    let mut closed = false;
    while !closed {
        let Some(frame) = stream.next().await else { break };
        // What else has already arrived is handled with it: the reports among it are stored
        // in one transaction and acknowledged once (an agent sends a step's end, the next
        // step's start and a quick step's whole life back to back).
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            if frame.is_ok() && last_alive.elapsed() >= Duration::from_secs(1) {
                last_alive = tokio::time::Instant::now();
                s.master.heartbeat(machine).await;
            }
            let text = match frame {
                Ok(Message::Text(text)) => Some(text),
                Ok(Message::Close(_)) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => None,
            };
            if let Some(text) = text {
                bytes += text.len();
                if !heard {
                    heard = true;
                    // The agent speaks only once it has the Welcome: its resume token is now
                    // in use, and the one it came back with must never work again.
                    if let Err(e) = s.store.confirm_resume(machine, &new_hash).await {
                        tracing::error!(machine = machine.get(), "cannot retire the previous resume token: {e}");
                    }
                }
                match serde_json::from_str::<AgentMsg>(&text) {
                    Ok(msg) => batch.push(msg),
                    Err(e) => tracing::warn!(machine = machine.get(), "unreadable message from agent: {e}"),
                }
            }
            if batch.len() >= BATCH_MESSAGES || bytes >= BATCH_BYTES {
                break;
            }
            match stream.next().now_or_never() {
                Some(Some(frame)) => next = Some(frame),
                Some(None) => closed = true,
                None => {}
            }
        }
        // Reports read before the connection ended are still stored.
        if !handle_all(&s, machine, batch, &mut notices, &acks).await {
            break;
        }
    }
    writer.abort();
    tracing::info!(machine = machine.get(), "agent disconnected");
    s.master.agent_closed(machine, conn).await;
}

/// The report stream of `build` if it runs on `machine`; `None` if the agent speaks of a build
/// it was not given, or no longer has (retried, cancelled, interrupted): such reports are
/// acknowledged and ignored.
fn reports_of(s: &Shared, machine: MachineId, build: BuildId) -> Option<Arc<tokio::sync::Mutex<ReportStream>>> {
    s.running.reports_of(build, machine)
}

/// The agent says its machine is going away (spot interruption or rebalance recommendation):
/// the loop records it, and the fleet requeues the build and stops the machine. A repeat on
/// this connection is dropped here; one on a new connection the loop knows for old news.
async fn interrupted(s: &Shared, machine: MachineId, kind: &str, detail: &str, seen: &mut HashSet<String>) {
    // Agent text ends up in the event log and the master's log: keep it short and on one line.
    let detail: String =
        format!("{kind}: {detail}").chars().filter(|c| !c.is_control()).take(MAX_NOTICE_DETAIL).collect();
    if !seen.insert(detail.clone()) {
        tracing::debug!(machine = machine.get(), %detail, "repeated interruption notice ignored");
        return;
    }
    // The loop records it and retries the build; what this connection reads next (a step
    // killed by the shutdown) is handled after the loop has acted, so it cannot end the build.
    s.master.interrupted(machine, detail).await;
}

/// Handles messages of an agent, in order; `false` when the connection must end (it broke
/// the report sequence: the agent sends everything again on a new connection).
async fn handle_all(
    s: &Shared,
    machine: MachineId,
    msgs: Vec<AgentMsg>,
    notices: &mut HashSet<String>,
    acks: &mpsc::UnboundedSender<MasterMsg>,
) -> bool {
    let mut msgs = msgs.into_iter().peekable();
    while let Some(msg) = msgs.next() {
        let build = match msg {
            AgentMsg::Hello { .. } | AgentMsg::Resume { .. } => continue,
            // Counted as a sign of life when it arrived (see `serve`).
            AgentMsg::Heartbeat => continue,
            AgentMsg::Interrupted { kind, detail } => {
                interrupted(s, machine, &kind, &detail, notices).await;
                continue;
            }
            AgentMsg::StepStarted { build, .. }
            | AgentMsg::Log { build, .. }
            | AgentMsg::StepFinished { build, .. }
            | AgentMsg::BuildFinished { build, .. } => build,
        };
        // This report and those right after it about the same build, up to its end.
        let mut run = vec![msg];
        while !matches!(run.last(), Some(AgentMsg::BuildFinished { .. })) {
            match msgs.next_if(|m| m.sequenced().is_some_and(|(b, _)| b == build)) {
                Some(m) => run.push(m),
                None => break,
            }
        }
        let (ack, broken) = stored_reports(s, machine, build, &run).await;
        if let Some(ack) = ack {
            let _ = acks.send(MasterMsg::Ack(ack));
        }
        if let Some(Broken(why)) = broken {
            tracing::warn!(
                machine = machine.get(),
                "{why}; closing the connection, the agent will send its reports again"
            );
            return false;
        }
    }
    true
}

/// A report sequence the agent broke.
struct Broken(String);

/// What a report does besides its log text (the build's end apart: see `stored_reports`).
fn effect_of(report: &AgentMsg) -> ReportEffect {
    match report {
        AgentMsg::StepStarted { step, .. } => ReportEffect::StepStarted { step: *step as i64 },
        AgentMsg::StepFinished { step, result, exit_code, .. } => {
            ReportEffect::StepFinished { step: *step as i64, result: result.as_str(), exit_code: *exit_code }
        }
        _ => ReportEffect::None,
    }
}

/// Stores numbered reports about `build`, in order and each once, in one transaction; says
/// what to acknowledge, if anything, and whether the agent broke the sequence (what came
/// before the break is stored and acknowledged).
async fn stored_reports(
    s: &Shared,
    machine: MachineId,
    build: BuildId,
    reports: &[AgentMsg],
) -> (Option<Ack>, Option<Broken>) {
    let last_seq = reports.iter().filter_map(AgentMsg::sequenced).map(|(_, seq)| seq).max().unwrap_or(0);
    let Some(stream) = reports_of(s, machine, build) else {
        if reports.iter().any(|r| matches!(r, AgentMsg::BuildFinished { .. })) {
            tracing::warn!(
                machine = machine.get(),
                build = build.get(),
                "agent reported a build it does not run; ignored"
            );
        }
        return (Some(Ack { build, seq: last_seq }), None);
    };
    let mut stream = stream.lock().await;
    // Nothing is stored until the end of this call: every report taken follows `after`. If
    // nothing gets stored, the stream goes back to where it was: the agent sends these
    // reports again, and they must then be new to it (not repeats of what was never stored).
    let after = stream.applied();
    let before = stream.clone();
    let mut taken = Vec::new();
    let mut finished = None;
    let mut answered = false;
    let mut broken = None;
    for report in reports {
        let Some((_, seq)) = report.sequenced() else { continue };
        match stream.accept(report) {
            Next::Repeat { .. } => answered = true,
            Next::OutOfOrder { expected } => {
                broken = Some(Broken(format!("report {seq} of build {build} arrived where {expected} was due")));
                break;
            }
            Next::Hold => {}
            Next::Store { log, .. } => {
                answered = true;
                let log = log.map(|(step, text)| (step as i64, text));
                let effect = match report {
                    AgentMsg::BuildFinished { result, .. } => {
                        finished = Some(seq);
                        ReportEffect::BuildFinished { machine, result: result.state() }
                    }
                    _ => effect_of(report),
                };
                taken.push(Report { seq, log, effect });
            }
        }
    }
    let (stored, seq) = match finished {
        // The build's end is the loop's to decide and carry out (the fleet frees the machine
        // in the same turn): it stores these reports and answers.
        Some(seq) => match s.master.finished(machine, build, after, taken).await {
            Some(stored) => (stored, seq),
            None => {
                *stream = before;
                return (None, Some(Broken(format!("report {seq} of build {build}: the master is stopping"))));
            }
        },
        None => match taken.last() {
            Some(last) => {
                let seq = last.seq;
                (s.store.apply_reports(build, after, &taken, s.now()).await, seq)
            }
            None => return (answered.then(|| Ack { build, seq: stream.applied() }), broken),
        },
    };
    match stored {
        Ok(Applied::Stored { .. }) => stream.stored(seq),
        Ok(Applied::Stale { applied }) => {
            tracing::info!(
                machine = machine.get(),
                build = build.get(),
                seq,
                applied,
                "reports already stored by another connection"
            );
            stream.resync(applied);
        }
        Err(e) => {
            // Not acknowledged: the agent keeps them and sends them again after a reconnection.
            *stream = before;
            tracing::error!(machine = machine.get(), build = build.get(), seq, "cannot store agent reports: {e}");
            return (None, Some(Broken(format!("reports up to {seq} of build {build} could not be stored"))));
        }
    }
    (Some(Ack { build, seq: stream.applied() }), broken)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::agent::protocol::{BuildResult, StepResult};
    use crate::core::build::BuildState;
    use crate::core::Ts;
    use crate::runtime::Input;
    use crate::store::Store;

    /// What the stand-in loop was asked.
    #[derive(Debug, PartialEq)]
    enum Asked {
        Finished { build: BuildId, ended: Option<crate::core::build::BuildState> },
        Interrupted { machine: MachineId, detail: String },
    }

    /// Answers the socket's requests as the loop's store writes do (the loop's own rules are
    /// tested with the real loop), and says what it was asked.
    fn stand_in_loop(store: Store, mut rx: mpsc::Receiver<Input>) -> mpsc::UnboundedReceiver<Asked> {
        let (tx, asked) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(input) = rx.recv().await {
                match input {
                    Input::Finished { build, after, reports, reply, .. } => {
                        let stored = store.apply_reports(build, after, &reports, Ts(0)).await;
                        let ended = match &stored {
                            Ok(Applied::Stored { ended }) => ended.as_ref().map(|t| t.to),
                            _ => None,
                        };
                        let _ = tx.send(Asked::Finished { build, ended });
                        let _ = reply.send(stored);
                    }
                    Input::Interrupted { machine, detail, reply } => {
                        let _ = tx.send(Asked::Interrupted { machine, detail });
                        let _ = reply.send(());
                    }
                    other => panic!("the socket asked the loop for {other:?}"),
                }
            }
        });
        asked
    }

    /// A master's shared state on a fresh database holding busy machine 7, and what its
    /// (stand-in) loop is asked.
    async fn master(dir: &std::path::Path) -> (Shared, mpsc::UnboundedReceiver<Asked>, String) {
        let db = format!("sqlite://{}", dir.join("paddock.db").display());
        let text = format!("[master]\nurl = \"http://127.0.0.1:0\"\ndatabase = \"{db}\"\n");
        let config = crate::config::parse(&text, &dir.join("paddock.toml")).expect("config");
        let store = Store::open(&db).await.expect("store");
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
        store.insert_machine(MachineId(7), "spot", "ec2", "hash", clock.now()).await.expect("machine");
        store.set_machine_state(MachineId(7), "busy", clock.now()).await.expect("busy");
        let (inputs, rx) = mpsc::channel(16);
        let shared = Shared::for_test(config, store, clock, inputs);
        let asked = stand_in_loop(shared.store.clone(), rx);
        (shared, asked, db)
    }

    #[tokio::test]
    async fn an_interruption_is_told_to_the_loop_once_per_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, mut asked, _db) = master(dir.path()).await;
        let mut seen = HashSet::new();
        let notice = "terminate at 2026-11-24T20:00:00Z";
        interrupted(&s, MachineId(7), "spot-interruption", notice, &mut seen).await;
        let detail = format!("spot-interruption: {notice}");
        assert_eq!(asked.try_recv().ok(), Some(Asked::Interrupted { machine: MachineId(7), detail: detail.clone() }));
        // The same notice again on this connection: nothing more (a new connection tells the
        // loop again, which knows the machine is already given up).
        interrupted(&s, MachineId(7), "spot-interruption", notice, &mut seen).await;
        assert!(asked.try_recv().is_err());
        interrupted(&s, MachineId(7), "spot-interruption", notice, &mut HashSet::new()).await;
        assert_eq!(asked.try_recv().ok(), Some(Asked::Interrupted { machine: MachineId(7), detail }));
    }

    /// Build `b` running on machine 7 with steps checkout and test, as the loop's `assign`
    /// leaves it.
    async fn running_build(s: &Shared) -> BuildId {
        let now = s.now();
        let b = s.store.create_request("b", "app", "main", "abc", "force", "test", &[], now).await.expect("request");
        let steps = ["checkout".to_string(), "test".to_string()];
        assert!(s.store.start_build(b.id, MachineId(7), &steps, now).await.expect("start"));
        let secrets = [("TOKEN".to_string(), "hunter2-secret".to_string())];
        s.running.start(b.id, MachineId(7), &secrets, 0, 0);
        b.id
    }

    /// Feeds `msgs` through one connection's handler, one at a time as from a slow agent;
    /// returns the acknowledgements sent.
    async fn feed(s: &Shared, msgs: &[AgentMsg]) -> Vec<u64> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut seen = HashSet::new();
        for m in msgs {
            assert!(handle_all(s, MachineId(7), vec![m.clone()], &mut seen, &tx).await, "connection kept");
        }
        acks_sent(&mut rx)
    }

    /// Feeds `msgs` through one connection's handler all at once, as when they arrived
    /// together; returns the acknowledgements sent, and whether the connection is kept.
    async fn feed_together(s: &Shared, msgs: &[AgentMsg]) -> (Vec<u64>, bool) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let kept = handle_all(s, MachineId(7), msgs.to_vec(), &mut HashSet::new(), &tx).await;
        (acks_sent(&mut rx), kept)
    }

    fn acks_sent(rx: &mut mpsc::UnboundedReceiver<MasterMsg>) -> Vec<u64> {
        let mut acks = Vec::new();
        while let Ok(MasterMsg::Ack(a)) = rx.try_recv() {
            acks.push(a.seq);
        }
        acks
    }

    /// Every report of a quick two-step build of `running_build`'s, with a secret split over
    /// two log reports; stored, its log reads "cloned\ntoken <secret:TOKEN> ok\n".
    fn whole_build(b: BuildId) -> Vec<AgentMsg> {
        vec![
            AgentMsg::StepStarted { build: b, seq: 1, step: 0 },
            log(b, 2, 0, "cloned\n"),
            step_done(b, 3, 0),
            AgentMsg::StepStarted { build: b, seq: 4, step: 1 },
            log(b, 5, 1, "token hunter2"),
            log(b, 6, 1, "-secret ok\n"),
            step_done(b, 7, 1),
            AgentMsg::BuildFinished { build: b, seq: 8, result: BuildResult::Success },
        ]
    }

    /// The states of build `b`'s steps, in order.
    async fn step_states(s: &Shared, b: BuildId) -> Vec<String> {
        s.store.steps(b).await.expect("steps").into_iter().map(|st| st.state).collect()
    }

    fn log(build: BuildId, seq: u64, step: usize, text: &str) -> AgentMsg {
        AgentMsg::Log { build, seq, step, text: text.to_string() }
    }

    fn step_done(build: BuildId, seq: u64, step: usize) -> AgentMsg {
        AgentMsg::StepFinished { build, seq, step, result: StepResult::Success, exit_code: Some(0) }
    }

    #[tokio::test]
    async fn a_build_report_after_the_interruption_does_not_end_the_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, mut asked, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        // A shutdown kills the step; the agent says so first, then reports the killed build.
        // The loop gives the build up to its retry before the socket reads on (as the real
        // loop does), so the report finds no running build.
        s.running.clear();
        let finished = AgentMsg::BuildFinished { build: b, seq: 1, result: BuildResult::Failure };
        let shutdown = AgentMsg::Interrupted { kind: "shutdown".into(), detail: "SIGTERM".into() };
        assert_eq!(feed(&s, &[shutdown, finished]).await, [1], "acknowledged, so the agent forgets it");
        assert!(matches!(asked.try_recv(), Ok(Asked::Interrupted { machine: MachineId(7), .. })));
        assert!(asked.try_recv().is_err(), "the build report was ignored");
        let row = s.store.build(b).await.expect("build").expect("row");
        assert_eq!(row.state.as_str(), "running", "left for the fleet's retry, not stored as a failure");
    }

    #[tokio::test]
    async fn reports_sent_again_are_stored_once_and_a_split_secret_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, mut asked, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        let first = [
            AgentMsg::StepStarted { build: b, seq: 1, step: 0 },
            log(b, 2, 0, "cloned\n"),
            step_done(b, 3, 0),
            AgentMsg::StepStarted { build: b, seq: 4, step: 1 },
            log(b, 5, 1, "token hunter2"),
        ];
        // The last log holds the start of a secret: not stored, not acknowledged yet.
        assert_eq!(feed(&s, &first).await, [1, 2, 3, 4]);
        // The connection dies; the agent sends everything unacknowledged again, and more. A
        // master that died after storing 4 but before acknowledging it gets 4 again too.
        let again = [
            AgentMsg::StepStarted { build: b, seq: 4, step: 1 },
            log(b, 5, 1, "token hunter2"),
            log(b, 6, 1, "-secret ok\n"),
            step_done(b, 7, 1),
            AgentMsg::BuildFinished { build: b, seq: 8, result: BuildResult::Success },
        ];
        assert_eq!(feed(&s, &again).await, [4, 4, 6, 7, 8]);
        assert_eq!(s.store.log(b).await.expect("log"), "cloned\ntoken <secret:TOKEN> ok\n");
        let row = s.store.build(b).await.expect("build").expect("row");
        assert_eq!(row.state.as_str(), "success");
        assert_eq!(step_states(&s, b).await, ["success", "success"]);
        assert_eq!(asked.try_recv().ok(), Some(Asked::Finished { build: b, ended: Some(BuildState::Success) }));
        // After the end (the loop forgets the running build), a straggler of the build is
        // acknowledged and ignored.
        s.running.clear();
        assert_eq!(feed(&s, &[log(b, 9, 1, "late\n")]).await, [9]);
        assert_eq!(s.store.log(b).await.expect("log"), "cloned\ntoken <secret:TOKEN> ok\n");
    }

    #[tokio::test]
    async fn a_gap_in_the_reports_ends_the_connection_and_stores_nothing_past_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _inbox, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut seen = HashSet::new();
        let first = vec![AgentMsg::StepStarted { build: b, seq: 1, step: 0 }];
        assert!(handle_all(&s, MachineId(7), first, &mut seen, &tx).await);
        let gap = vec![log(b, 3, 0, "skipped two\n")];
        assert!(!handle_all(&s, MachineId(7), gap, &mut seen, &tx).await, "connection dropped");
        assert_eq!(s.store.log(b).await.expect("log"), "");
        assert_eq!(s.store.report_position(b).await.expect("position").0, 1);
    }

    #[tokio::test]
    async fn reports_that_arrive_together_are_stored_together_and_acknowledged_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, mut asked, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        // A whole quick build, with a secret split over two reports and, first, the end of a
        // build this machine no longer runs (sent again after a reconnection).
        let mut all = vec![AgentMsg::BuildFinished { build: BuildId(99), seq: 5, result: BuildResult::Success }];
        all.extend(whole_build(b));
        assert_eq!(feed_together(&s, &all).await, (vec![5, 8], true), "one acknowledgement per build");
        assert_eq!(asked.try_recv().ok(), Some(Asked::Finished { build: b, ended: Some(BuildState::Success) }));
        assert!(asked.try_recv().is_err(), "the other build's end was not the loop's business");
        assert_eq!(s.store.log(b).await.expect("log"), "cloned\ntoken <secret:TOKEN> ok\n");
        assert_eq!(step_states(&s, b).await, ["success", "success"]);
        assert_eq!(s.store.report_position(b).await.expect("position").0, 8);
    }

    #[tokio::test]
    async fn reports_that_could_not_be_stored_are_taken_as_new_when_sent_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, mut asked, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        let all = whole_build(b);
        // Another process takes the steps table away: every write of a step fails.
        let other = rusqlite::Connection::open(dir.path().join("paddock.db")).expect("second connection");
        let away = || other.execute_batch("ALTER TABLE steps RENAME TO steps_away").expect("rename");
        let back = || other.execute_batch("ALTER TABLE steps_away RENAME TO steps").expect("rename back");
        // Stored by the socket, then (with the build's end) by the loop: each fails once,
        // unacknowledged, and the agent's second sending is stored whole, once.
        for part in [&all[..3], &all[3..]] {
            away();
            assert_eq!(feed_together(&s, part).await, (vec![], false), "nothing acknowledged");
            back();
            let last = part.last().and_then(AgentMsg::sequenced).map(|(_, seq)| seq);
            assert_eq!(feed_together(&s, part).await, (last.into_iter().collect(), true));
        }
        assert_eq!(s.store.log(b).await.expect("log"), "cloned\ntoken <secret:TOKEN> ok\n");
        assert_eq!(step_states(&s, b).await, ["success", "success"]);
        assert_eq!(asked.try_recv().ok(), Some(Asked::Finished { build: b, ended: None }), "the failed try");
        assert_eq!(asked.try_recv().ok(), Some(Asked::Finished { build: b, ended: Some(BuildState::Success) }));
    }

    #[tokio::test]
    async fn reports_before_a_gap_in_what_arrived_together_are_stored_and_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _inbox, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        let all = [
            AgentMsg::StepStarted { build: b, seq: 1, step: 0 },
            log(b, 2, 0, "cloned\n"),
            log(b, 4, 0, "after a gap\n"),
            step_done(b, 5, 0),
        ];
        assert_eq!(feed_together(&s, &all).await, (vec![2], false), "connection dropped after the gap");
        assert_eq!(s.store.log(b).await.expect("log"), "cloned\n");
        assert_eq!(s.store.report_position(b).await.expect("position").0, 2);
        assert_eq!(step_states(&s, b).await, ["running", "pending"]);
    }

    #[tokio::test]
    async fn a_build_is_never_a_success_while_a_step_has_no_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _inbox, _db) = master(dir.path()).await;
        let b = running_build(&s).await;
        let msgs = [
            AgentMsg::StepStarted { build: b, seq: 1, step: 0 },
            step_done(b, 2, 0),
            // Step 1's reports never came; the agent says success anyway.
            AgentMsg::BuildFinished { build: b, seq: 3, result: BuildResult::Success },
        ];
        assert_eq!(feed(&s, &msgs).await, [1, 2, 3]);
        let row = s.store.build(b).await.expect("build").expect("row");
        assert_eq!(row.state.as_str(), "exception");
        let log = s.store.log(b).await.expect("log");
        assert!(log.contains("step test reported no result"), "{log}");
    }

    #[tokio::test]
    async fn agent_text_is_kept_short_and_on_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, mut asked, _db) = master(dir.path()).await;
        let long = format!("terminate\nnow{}", "x".repeat(1000));
        interrupted(&s, MachineId(7), "rebalance", &long, &mut HashSet::new()).await;
        let Ok(Asked::Interrupted { detail, .. }) = asked.try_recv() else { panic!("the loop was not told") };
        assert_eq!(detail.chars().count(), MAX_NOTICE_DETAIL);
        assert!(detail.starts_with("rebalance: terminatenowxxx"), "{detail}");
    }
}

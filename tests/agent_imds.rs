//! Spot interruption notices: the metadata poller against a fake IMDSv2 server, and the agent
//! telling a fake master about them. Every wait polls a state or a channel with a deadline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use paddock::agent::client::{run_with, AgentOptions, ImdsOptions};
use paddock::agent::imds::{poll, Notice, NoticeKind};
use paddock::agent::protocol::{AgentMsg, MasterMsg, Secret};
use paddock::core::MachineId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Longest any single wait may take (generous for a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval for the tests: fast, so many polls happen within a fraction of a second.
const FAST: Duration = Duration::from_millis(20);
const SPOT_BODY: &str = r#"{"action": "terminate", "time": "2026-11-24T20:00:00Z"}"#;
const REBALANCE_BODY: &str = r#"{"noticeTime": "2026-11-24T19:58:00Z"}"#;

// ---- A fake IMDSv2 ----

/// What the fake metadata service serves and what it has seen.
#[derive(Default)]
struct ImdsState {
    /// Tokens handed out and still valid.
    tokens: HashSet<String>,
    /// Tokens handed out in all.
    issued: u32,
    /// PUTs refused for a missing or invalid TTL header.
    bad_puts: u32,
    /// GETs refused for a missing, unknown or expired token.
    unauthorized: u32,
    /// Authorised GETs of each notice path.
    spot_gets: u32,
    rebalance_gets: u32,
    /// Whether each notice is posted (404 until then).
    spot: bool,
    rebalance: bool,
    /// Expire every token at the next GET (which then gets a 401).
    expire_next: bool,
}

#[derive(Clone)]
struct FakeImds {
    url: String,
    state: Arc<Mutex<ImdsState>>,
}

impl FakeImds {
    /// Serves on a fresh loopback port.
    async fn start() -> FakeImds {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        FakeImds::serve(listener)
    }

    /// Serves on `listener` until the test ends.
    fn serve(listener: TcpListener) -> FakeImds {
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(ImdsState::default()));
        let app = Router::new()
            .route("/latest/api/token", put(issue_token))
            .route("/latest/meta-data/spot/instance-action", get(spot))
            .route("/latest/meta-data/events/recommendations/rebalance", get(rebalance))
            .with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        FakeImds { url, state }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ImdsState) -> T) -> T {
        f(&mut self.state.lock().expect("lock"))
    }

    /// Waits until `cond` holds, failing the test after [`DEADLINE`].
    async fn wait_for(&self, what: &str, mut cond: impl FnMut(&ImdsState) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !self.with(|s| cond(s)) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

type Shared = Arc<Mutex<ImdsState>>;

/// `PUT /latest/api/token`: a token, but only for a request that says how long it should live.
async fn issue_token(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|ttl| (1..=21_600).contains(ttl));
    let mut s = state.lock().expect("lock");
    if ttl.is_none() {
        s.bad_puts += 1;
        return StatusCode::BAD_REQUEST.into_response();
    }
    s.issued += 1;
    let token = format!("imds-token-{}", s.issued);
    s.tokens.insert(token.clone());
    token.into_response()
}

/// Whether a GET carries a valid token; expires them all first when the test asked for it.
fn authorised(s: &mut ImdsState, headers: &HeaderMap) -> bool {
    if s.expire_next {
        s.expire_next = false;
        s.tokens.clear();
    }
    let ok = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|token| s.tokens.contains(token));
    if !ok {
        s.unauthorized += 1;
    }
    ok
}

async fn spot(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let mut s = state.lock().expect("lock");
    if !authorised(&mut s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.spot_gets += 1;
    if s.spot {
        SPOT_BODY.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn rebalance(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let mut s = state.lock().expect("lock");
    if !authorised(&mut s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.rebalance_gets += 1;
    if s.rebalance {
        REBALANCE_BODY.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// The next notice, failing the test after [`DEADLINE`].
async fn next_notice(rx: &mut mpsc::Receiver<Notice>) -> Notice {
    tokio::time::timeout(DEADLINE, rx.recv()).await.expect("no notice in time").expect("poller stopped")
}

fn spot_notice() -> Notice {
    Notice { kind: NoticeKind::SpotInterruption, detail: "terminate at 2026-11-24T20:00:00Z".into() }
}

fn rebalance_notice() -> Notice {
    Notice { kind: NoticeKind::Rebalance, detail: "recommended at 2026-11-24T19:58:00Z".into() }
}

// ---- The poller ----

#[tokio::test]
async fn spot_notice_is_reported_once_when_it_appears() {
    let imds = FakeImds::start().await;
    let (tx, mut rx) = mpsc::channel(8);
    let poller = tokio::spawn(poll(imds.url.clone(), FAST, tx));

    imds.wait_for("polls without a notice", |s| s.spot_gets >= 5 && s.rebalance_gets >= 5).await;
    // The poller hands over a notice before its next request: after five answered polls,
    // anything reported for the first ones would already be here.
    assert!(rx.try_recv().is_err(), "a notice was reported while IMDS answered 404");

    imds.with(|s| s.spot = true);
    assert_eq!(next_notice(&mut rx).await, spot_notice());

    // Once reported, the spot path is left alone and the notice is not reported again.
    let spot_gets = imds.with(|s| s.spot_gets);
    let rebalance_gets = imds.with(|s| s.rebalance_gets);
    imds.wait_for("more rebalance polls", |s| s.rebalance_gets >= rebalance_gets + 5).await;
    assert!(rx.try_recv().is_err(), "the spot notice was reported twice");
    assert_eq!(imds.with(|s| s.spot_gets), spot_gets);

    // One token did for every poll, and every request was a proper IMDSv2 one.
    imds.with(|s| {
        assert_eq!((s.issued, s.bad_puts, s.unauthorized), (1, 0, 0));
    });

    // The poller stops when nobody listens any more (the agent is gone).
    drop(rx);
    tokio::time::timeout(DEADLINE, poller).await.expect("poller stops").expect("join");
}

#[tokio::test]
async fn rebalance_recommendation_is_reported_and_polling_ends_after_both() {
    let imds = FakeImds::start().await;
    let (tx, mut rx) = mpsc::channel(8);
    let poller = tokio::spawn(poll(imds.url.clone(), FAST, tx));

    imds.wait_for("polls without a notice", |s| s.spot_gets >= 5 && s.rebalance_gets >= 5).await;
    assert!(rx.try_recv().is_err(), "a notice was reported while IMDS answered 404");

    imds.with(|s| s.rebalance = true);
    assert_eq!(next_notice(&mut rx).await, rebalance_notice());

    // The interruption that often follows a recommendation is still reported.
    imds.with(|s| s.spot = true);
    assert_eq!(next_notice(&mut rx).await, spot_notice());

    // Nothing is left to watch for: the poller ends by itself, reporting nothing more.
    tokio::time::timeout(DEADLINE, poller).await.expect("poller stops").expect("join");
    assert!(rx.recv().await.is_none());
    imds.with(|s| assert_eq!((s.bad_puts, s.unauthorized), (0, 0)));
}

#[tokio::test]
async fn an_expired_token_is_renewed() {
    let imds = FakeImds::start().await;
    let (tx, mut rx) = mpsc::channel(8);
    let _poller = tokio::spawn(poll(imds.url.clone(), FAST, tx));

    imds.wait_for("polls with the first token", |s| s.spot_gets >= 3).await;
    imds.with(|s| s.expire_next = true);
    imds.wait_for("a second token", |s| s.issued >= 2).await;
    let gets = imds.with(|s| s.spot_gets + s.rebalance_gets);
    imds.wait_for("polls with the new token", |s| s.spot_gets + s.rebalance_gets >= gets + 4).await;
    // One 401 (the expiry itself), then the new token: the old one was not tried again.
    imds.with(|s| assert_eq!((s.issued, s.unauthorized, s.bad_puts), (2, 1, 0)));

    imds.with(|s| s.spot = true);
    assert_eq!(next_notice(&mut rx).await, spot_notice());
}

#[tokio::test]
async fn polling_goes_on_while_imds_is_unreachable() {
    // Something that takes connections and drops them: IMDS is not answering.
    let broken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = broken.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::channel(8);
    let _poller = tokio::spawn(poll(format!("http://{addr}"), FAST, tx));
    for _ in 0..3 {
        let (conn, _) = tokio::time::timeout(DEADLINE, broken.accept()).await.expect("a poll").expect("accept");
        drop(conn);
    }
    assert!(rx.try_recv().is_err());

    // The service comes (back) on the same address: the next notice is still seen.
    drop(broken);
    let imds = FakeImds::serve(TcpListener::bind(addr).await.expect("rebind"));
    imds.with(|s| s.spot = true);
    assert_eq!(next_notice(&mut rx).await, spot_notice());
}

// ---- The agent against a fake master ----

type Ws = WebSocketStream<TcpStream>;

async fn accept(listener: &TcpListener) -> Ws {
    let (tcp, _) = tokio::time::timeout(DEADLINE, listener.accept()).await.expect("agent connects").expect("accept");
    tokio_tungstenite::accept_async(tcp).await.expect("handshake")
}

async fn recv(stream: &mut SplitStream<Ws>) -> Option<AgentMsg> {
    loop {
        match tokio::time::timeout(DEADLINE, stream.next()).await.expect("agent says something")? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("agent json")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn send(sink: &mut SplitSink<Ws, Message>, msg: &MasterMsg) {
    let text = serde_json::to_string(msg).expect("json");
    sink.send(Message::text(text)).await.expect("send");
}

/// Reads every message of one connection, each with whether the spot notice was posted when it
/// arrived, until the connection ends.
fn read_all(
    mut stream: SplitStream<Ws>,
    imds: FakeImds,
) -> (mpsc::UnboundedReceiver<(AgentMsg, bool)>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(DEADLINE, stream.next()).await {
            if let Message::Text(t) = frame {
                let msg: AgentMsg = serde_json::from_str(t.as_str()).expect("agent json");
                let posted = imds.with(|s| s.spot);
                if tx.send((msg, posted)).is_err() {
                    break;
                }
            }
        }
    });
    (rx, reader)
}

/// Messages up to the first `Interrupted`, which must not come before the notice was posted.
async fn until_interrupted(msgs: &mut mpsc::UnboundedReceiver<(AgentMsg, bool)>) -> AgentMsg {
    loop {
        let (msg, posted) =
            tokio::time::timeout(DEADLINE, msgs.recv()).await.expect("interrupted in time").expect("connection open");
        if let AgentMsg::Interrupted { .. } = msg {
            assert!(posted, "the agent reported an interruption before IMDS posted one");
            return msg;
        }
    }
}

#[tokio::test]
async fn agent_tells_the_master_once_the_notice_appears_and_again_after_reconnecting() {
    let imds = FakeImds::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let opts =
        AgentOptions { master: format!("http://127.0.0.1:{port}"), token: "tok-1".into(), workdir: work.path().into() };
    let agent = tokio::spawn(run_with(opts, Some(ImdsOptions { url: imds.url.clone(), poll: FAST })));

    // First connection: Hello, Welcome with a resume token.
    let (mut sink, mut stream) = accept(&listener).await.split();
    match recv(&mut stream).await {
        Some(AgentMsg::Hello { token, .. }) => assert_eq!(token.expose(), "tok-1"),
        other => panic!("expected hello, got {other:?}"),
    }
    let welcome = |n: u32| MasterMsg::Welcome {
        machine: MachineId(7),
        heartbeat_secs: 30,
        resume_token: Some(Secret(format!("resume-{n}"))),
        reconnect_secs: 30,
        acked: None,
    };
    send(&mut sink, &welcome(1)).await;
    let (mut msgs, reader) = read_all(stream, imds.clone());

    imds.wait_for("the agent's polls", |s| s.spot_gets >= 5).await;
    imds.with(|s| s.spot = true);
    let expected =
        AgentMsg::Interrupted { kind: "spot-interruption".into(), detail: "terminate at 2026-11-24T20:00:00Z".into() };
    assert_eq!(until_interrupted(&mut msgs).await, expected);

    // The connection drops (the message may have died with it): the agent reconnects and says
    // it again.
    reader.abort();
    drop(sink);
    let (mut sink, mut stream) = accept(&listener).await.split();
    match recv(&mut stream).await {
        Some(AgentMsg::Resume { machine, token, build, .. }) => {
            assert_eq!((machine, token.expose(), build), (MachineId(7), "resume-1", None));
        }
        other => panic!("expected resume, got {other:?}"),
    }
    send(&mut sink, &welcome(2)).await;
    let (mut msgs, reader) = read_all(stream, imds.clone());
    assert_eq!(until_interrupted(&mut msgs).await, expected);

    // The master stops the machine: the agent exits cleanly, having said it once on this connection.
    send(&mut sink, &MasterMsg::Shutdown).await;
    let r = tokio::time::timeout(DEADLINE, agent).await.expect("agent exits").expect("join");
    assert!(r.is_ok(), "{r:?}");
    tokio::time::timeout(DEADLINE, reader).await.expect("connection ends").expect("join");
    while let Ok((msg, _)) = msgs.try_recv() {
        assert!(!matches!(msg, AgentMsg::Interrupted { .. }), "notice sent twice on one connection");
    }
    imds.with(|s| assert_eq!((s.bad_puts, s.unauthorized), (0, 0)));
}

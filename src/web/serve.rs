//! The master's listener: our own accept loop around hyper, so that every connection has
//! timeouts, and their number a cap, before anyone has said who they are.
//!
//! Each connection is watched through its bytes ([`Watched`]) and its requests ([`Phase`]):
//! - a request's head must arrive within [`Limits::header_read`] of the connection opening, or
//!   of the first byte after a keep-alive pause; trickling it in byte by byte moves nothing;
//! - a keep-alive connection without a request is closed after [`Limits::idle`];
//! - a handler, reading of the request's body included, must have its response head ready
//!   within [`Limits::request`], else the client gets 408 and the connection is closed;
//! - a response body then streams as long as it likes (a live log, a download), unless the
//!   client takes none of it for [`Limits::idle`] while the master has some to send (a client
//!   that stopped reading): then it is dropped;
//! - a TLS handshake must end within [`Limits::tls_handshake`];
//! - a WebSocket upgrade leaves all of this behind (the agent socket has its own heartbeats) but
//!   still counts against [`Limits::max_connections`] while it lives; past that many, a new
//!   connection is closed at once.
//!
//! Tests shorten the limits with hidden environment variables (milliseconds):
//! `PADDOCK_HTTP_HEADER_TIMEOUT_MS`, `PADDOCK_HTTP_IDLE_TIMEOUT_MS`,
//! `PADDOCK_HTTP_REQUEST_TIMEOUT_MS`, `PADDOCK_TLS_HANDSHAKE_TIMEOUT_MS`, and the cap with
//! `PADDOCK_HTTP_MAX_CONNECTIONS`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Largest request head (request line and headers) read; a bigger one gets 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after a failed accept other than a peer's reset (out of descriptors, say), so the loop
/// does not spin while nothing can be accepted.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// Warnings about refused connections come at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The listener's timeouts and cap (see the module's documentation for what each bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// For a request's head to arrive, from the connection's start or a pause's first byte.
    pub header_read: Duration,
    /// Of a keep-alive pause, and of a client not taking the response being sent to it.
    pub idle: Duration,
    /// For a handler (reading the request's body included) to have its response head ready.
    pub request: Duration,
    /// For a TLS handshake to end.
    pub tls_handshake: Duration,
    /// Connections open at once, WebSockets included.
    pub max_connections: usize,
}

impl Default for Limits {
    /// Production values, in the range of what established servers use.
    fn default() -> Self {
        Limits {
            header_read: Duration::from_secs(20),
            idle: Duration::from_secs(90),
            request: Duration::from_secs(60),
            tls_handshake: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

impl Limits {
    /// The production values, each replaced by its hidden environment variable when set.
    pub fn from_env() -> Limits {
        let d = Limits::default();
        let ms = |var: &str, default: Duration| {
            env_number(var).filter(|n| *n > 0).map(Duration::from_millis).unwrap_or(default)
        };
        Limits {
            header_read: ms("PADDOCK_HTTP_HEADER_TIMEOUT_MS", d.header_read),
            idle: ms("PADDOCK_HTTP_IDLE_TIMEOUT_MS", d.idle),
            request: ms("PADDOCK_HTTP_REQUEST_TIMEOUT_MS", d.request),
            tls_handshake: ms("PADDOCK_TLS_HANDSHAKE_TIMEOUT_MS", d.tls_handshake),
            max_connections: env_number("PADDOCK_HTTP_MAX_CONNECTIONS")
                .filter(|n| *n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(d.max_connections),
        }
    }
}

/// A whole number from a (hidden, test-only) environment variable.
pub(crate) fn env_number(var: &str) -> Option<u64> {
    std::env::var(var).ok()?.trim().parse().ok()
}

/// Lets a warning through at most once per period and counts the ones held back, so a flood
/// of refusals costs the log one line per period.
pub(crate) struct WarnEvery {
    period: Duration,
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl WarnEvery {
    /// A limiter that lets one warning through per `period`.
    pub(crate) const fn new(period: Duration) -> WarnEvery {
        WarnEvery { period, state: Mutex::new((None, 0)) }
    }

    /// Counts one event; `Some(n)` when it is time to warn, for `n` events (this one included).
    pub(crate) fn tick(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, count) = &mut *state;
        *count += 1;
        if last.is_some_and(|t| t.elapsed() < self.period) {
            return None;
        }
        *last = Some(std::time::Instant::now());
        Some(std::mem::take(count))
    }
}

/// Raises this process's open-files soft limit to its hard limit, so that the connection cap,
/// not the descriptor limit, is what a flood of connections meets.
pub fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let hard = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-files limit");
                hard
            }
            Err(e) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read the open-files limit: {e}");
            return;
        }
    };
    // The database, mirrors, agents' processes and pipes need descriptors too.
    if hard < max_connections as u64 + 256 {
        tracing::warn!(
            "the open-files limit ({hard}) leaves little room above the {max_connections} connections the master accepts; raise it (ulimit -n, LimitNOFILE=)"
        );
    }
}

/// A running listener; [`Server::shutdown`] stops it.
pub struct Server {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves `app` on `listener` within `limits`: HTTPS only when `tls` is given, else plain HTTP.
pub fn spawn(listener: TcpListener, app: Router, tls: Option<Arc<ServerConfig>>, limits: Limits) -> Server {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, app, tls.map(TlsAcceptor::from), limits, stopped));
    Server { stop, task }
}

impl Server {
    /// Stops accepting, lets open requests and responses end for up to `grace` (idle
    /// connections close at once), then closes every connection still open.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            tracing::warn!("web connections still open after {grace:?}; closing them");
            // Dropping the loop drops its set of connection tasks, which aborts them.
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = WarnEvery::new(WARN_EVERY);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A value, or the sender gone: either way, stop.
            _ = stop.changed() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("a connection's task panicked: {e}");
                    }
                }
            }
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) if is_peer_error(&e) => continue,
                    Err(e) => {
                        tracing::warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    if let Some(n) = refusals.tick() {
                        tracing::warn!(refused = n, "{} connections are open, as many as allowed: closing new ones at once", limits.max_connections);
                    }
                    drop(tcp);
                    continue;
                };
                connections.spawn(connection(tcp, peer, permit, app.clone(), tls.clone(), limits, stop.clone()));
            }
        }
    }
    // New connections are refused from here on; open ones finish what they are doing.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Errors of one connection that went away before it was accepted: nothing to wait for.
fn is_peer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = tls else {
        return http(Watched::new(tcp, permit), peer, app, limits, stop).await;
    };
    match tokio::time::timeout(limits.tls_handshake, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => http(Watched::new(stream, permit), peer, app, limits, stop).await,
        // Plain HTTP on the TLS port, a client that does not trust the certificate, a scanner.
        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%peer, "no TLS handshake within {:?}; closed", limits.tls_handshake),
    }
}

/// Serves HTTP/1.1 requests (and WebSocket upgrades) on one connection until it ends, its
/// watchdog fires, or the server stops.
async fn http<I>(io: Watched<I>, peer: SocketAddr, app: Router, limits: Limits, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = io.activity.clone();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| handle(req, peer, app.clone(), activity.clone(), limits.request))
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog keeps time: hyper's own header timer also runs while a keep-alive
    // connection waits for its next request, which would cut every pause at the header timeout.
    builder.header_read_timeout(None).max_buf_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            why = watchdog(&activity, &limits) => {
                tracing::debug!(%peer, "closing the connection: {why}");
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// One request: the router's answer, or 408 once `limit` has passed without it.
async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    app: Router,
    activity: Arc<Activity>,
    limit: Duration,
) -> Result<Response<Tracked>, Infallible> {
    req.extensions_mut().insert(ConnectInfo(peer));
    activity.set(Phase::Handling);
    // Held by the response's body: the connection is idle once hyper has dropped it.
    let done = Done(activity.clone());
    let resp = match tokio::time::timeout(limit, app.oneshot(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(never)) => match never {},
        Err(_) => too_slow(limit),
    };
    activity.set(if resp.status() == StatusCode::SWITCHING_PROTOCOLS { Phase::Upgraded } else { Phase::Responding });
    Ok(resp.map(|body| Tracked { body, _done: done }))
}

/// 408, and the connection closes after it (the request's body may still be coming).
fn too_slow(limit: Duration) -> Response<Body> {
    let reason = format!("the request was not handled within {limit:?}");
    let mut resp = super::ApiError { status: StatusCode::REQUEST_TIMEOUT, reason }.into_response();
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Where a connection is in its life, which says which deadline applies.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head since then (the connection's start, or the first byte after
    /// a keep-alive pause).
    Head(Instant),
    /// A handler is running (bounded by the request timeout, not the watchdog).
    Handling,
    /// The response's body is being sent: the client must keep taking what is written.
    Responding,
    /// Keep-alive pause since then.
    Idle(Instant),
    /// Handed over to a WebSocket: no HTTP deadline any more.
    Upgraded,
}

/// What a connection's IO, its requests and its watchdog share: its phase, and since when a
/// write has been waiting for the client to take bytes (`None` while writes go through).
struct Activity {
    state: Mutex<(Phase, Option<Instant>)>,
    /// Wakes the watchdog when a deadline may have come closer.
    changed: Notify,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity { state: Mutex::new((Phase::Head(Instant::now()), None)), changed: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Phase, Option<Instant>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `phase`; an upgraded connection stays upgraded.
    fn set(&self, phase: Phase) {
        let mut state = self.lock();
        if !matches!(state.0, Phase::Upgraded) {
            state.0 = phase;
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Bytes arrived from the client: after a keep-alive pause, a request head has begun.
    fn read_some(&self) {
        let mut state = self.lock();
        if matches!(state.0, Phase::Idle(_)) {
            state.0 = Phase::Head(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A write (or flush) went through (`true`), or has to wait for the client (`false`).
    fn wrote(&self, through: bool) {
        let mut state = self.lock();
        match (through, state.1) {
            (true, _) => state.1 = None,
            (false, Some(_)) => {}
            (false, None) => {
                state.1 = Some(Instant::now());
                drop(state);
                self.changed.notify_one();
            }
        }
    }

    /// When the connection is to be closed if nothing changes, and why.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        let (phase, blocked) = *self.lock();
        match phase {
            Phase::Head(since) => {
                Some((since + limits.header_read, "no complete request head within the header timeout"))
            }
            Phase::Idle(since) => Some((since + limits.idle, "idle for the idle timeout")),
            // A response with nothing to send (a quiet live log) waits as long as it likes.
            Phase::Responding => {
                blocked.map(|since| (since + limits.idle, "the client took none of the response for the idle timeout"))
            }
            Phase::Handling | Phase::Upgraded => None,
        }
    }
}

/// Completes when the connection has passed its deadline; says why.
async fn watchdog(activity: &Activity, limits: &Limits) -> &'static str {
    loop {
        match activity.deadline(limits) {
            Some((at, why)) if at <= Instant::now() => return why,
            Some((at, _)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = activity.changed.notified() => {}
                }
            }
            None => activity.changed.notified().await,
        }
    }
}

/// Marks the connection idle when the response it belongs to is over.
struct Done(Arc<Activity>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// A response body that tells the connection when it is done (by being dropped).
struct Tracked {
    body: Body,
    _done: Done,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's byte stream, noting every byte that moves, and holding the connection's
/// place under the cap for as long as it lives (through a WebSocket upgrade too).
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl<I> Watched<I> {
    fn new(io: I, permit: OwnedSemaphorePermit) -> Watched<I> {
        Watched { io, activity: Activity::new(), _permit: permit }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_some();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.activity.wrote(polled.is_ready());
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.activity.wrote(polled.is_ready());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.activity.wrote(polled.is_ready());
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Serves `app` on one end of an in-memory pipe of `buffer` bytes within `limits`; the other
    /// end, and the task that ends when the master lets the connection go.
    fn pipe(app: Router, buffer: usize, limits: Limits) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(buffer);
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("permit");
        let (stop, stopped) = watch::channel(false);
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let task = tokio::spawn(async move {
            let _stop = stop;
            http(Watched::new(server, permit), peer, app, limits, stopped).await
        });
        (client, task)
    }

    #[tokio::test]
    async fn a_client_that_takes_none_of_its_response_is_let_go() {
        let app = Router::new().route("/big", axum::routing::get(|| async { "x".repeat(4 << 20) }));
        let limits = Limits { idle: Duration::from_millis(200), ..Limits::default() };
        let (mut client, served) = pipe(app, 64 * 1024, limits);
        client.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("request");
        tokio::time::timeout(Duration::from_secs(60), served).await.expect("let go").expect("task");
    }

    #[test]
    fn warnings_are_let_through_once_per_period_with_a_count() {
        let w = WarnEvery::new(Duration::from_secs(3600));
        assert_eq!(w.tick(), Some(1));
        assert_eq!(w.tick(), None);
        assert_eq!(w.tick(), None);
        let now = WarnEvery::new(Duration::ZERO);
        assert_eq!(now.tick(), Some(1));
        assert_eq!(now.tick(), Some(1));
    }

    #[test]
    fn each_phase_has_its_deadline() {
        let limits = Limits::default();
        let a = Activity::new();
        let (at, _) = a.deadline(&limits).expect("a new connection waits for its head");
        assert!(at <= Instant::now() + limits.header_read);
        a.set(Phase::Handling);
        assert!(a.deadline(&limits).is_none(), "a running handler has the request timeout instead");
        let idle_since = Instant::now();
        a.set(Phase::Idle(idle_since));
        assert_eq!(a.deadline(&limits).map(|d| d.0), Some(idle_since + limits.idle));
        a.wrote(true);
        assert_eq!(a.deadline(&limits).map(|d| d.0), Some(idle_since + limits.idle), "writing does not start a head");
        a.read_some();
        let (at, why) = a.deadline(&limits).expect("head");
        assert!(
            at <= Instant::now() + limits.header_read && why.contains("head"),
            "a byte after a pause starts a head"
        );
        a.set(Phase::Responding);
        assert!(a.deadline(&limits).is_none(), "a response with nothing to send waits");
        a.wrote(false);
        let (blocked, why) = a.deadline(&limits).expect("a client that takes nothing");
        assert!(why.contains("took none"), "{why}");
        a.wrote(false);
        assert_eq!(a.deadline(&limits).map(|d| d.0), Some(blocked), "still since the first refusal");
        a.wrote(true);
        assert!(a.deadline(&limits).is_none(), "the client took bytes again");
        a.set(Phase::Upgraded);
        a.set(Phase::Idle(Instant::now()));
        assert!(a.deadline(&limits).is_none(), "an upgraded connection stays upgraded");
    }
}

//! A fault-injecting HTTP proxy between the SDK and moto.
//!
//! moto answers every EC2 call at once and correctly. Real EC2 throttles, runs out of
//! capacity, fails with 500s, is slow, and sometimes serves a call whose answer never reaches
//! the caller. The proxy forwards to moto and, following rules set at runtime, replaces,
//! delays or swallows answers, so the EC2 provisioner can be tested against all of that.
//!
//! It speaks just enough HTTP/1.1 on a raw TCP socket: only at that level can it let moto serve
//! a request and then close the connection without a word, which is what makes a launch
//! non-idempotent from the caller's side. The SDK sends `POST /` with a Content-Length body on
//! kept-alive connections; chunked bodies and `Expect: 100-continue` are handled as well, so a
//! future SDK or another client does not hang the proxy.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Seed of the fault dice used by [`FaultProxy::start`].
pub const DEFAULT_SEED: u64 = 0x5EED_FA17;

/// What the proxy does to a request a rule picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 503 `RequestLimitExceeded`, without calling moto: the account's API rate is exceeded.
    Throttle,
    /// 500 `InsufficientInstanceCapacity`, without calling moto: no on-demand capacity.
    Capacity,
    /// 400 `Unsupported`, without calling moto: the type is not offered in the subnet's zone.
    Unsupported,
    /// 500 `InsufficientInstanceCapacity` with EC2's spot wording, without calling moto.
    SpotCapacity,
    /// 400 `MaxSpotInstanceCountExceeded`, without calling moto: the spot quota is used up.
    SpotLimit,
    /// 500 `InternalError`, without calling moto.
    ServerError,
    /// Forward to moto, wait for its answer, then close the connection without answering.
    DropAfterServe,
    /// Wait this long, then go on: later rules still apply, so a delay can precede a fault.
    Latency(Duration),
}

impl Fault {
    /// Status, EC2 error code and message when this fault answers instead of moto.
    fn error(&self) -> Option<(u16, &'static str, &'static str)> {
        Some(match self {
            Fault::Throttle => (503, "RequestLimitExceeded", "Request limit exceeded."),
            Fault::Capacity => (
                500,
                "InsufficientInstanceCapacity",
                "We currently do not have sufficient capacity in the Availability Zone you requested.",
            ),
            Fault::Unsupported => (
                400,
                "Unsupported",
                "Your requested instance type is not supported in your requested Availability Zone.",
            ),
            Fault::SpotCapacity => {
                (500, "InsufficientInstanceCapacity", "There is no Spot capacity available that matches your request.")
            }
            Fault::SpotLimit => (400, "MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"),
            Fault::ServerError => (500, "InternalError", "An internal error has occurred"),
            Fault::DropAfterServe | Fault::Latency(_) => return None,
        })
    }
}

/// When to inject a fault: requests are checked against the rules in the order they were
/// added; the first rule that matches, has injections left and wins its dice roll applies
/// (a [`Fault::Latency`] rule adds its delay and lets the later rules go on).
#[derive(Debug, Clone)]
pub struct Rule {
    /// The `Action` to match; `None` matches every action.
    pub action: Option<String>,
    /// Form parameters that must all be present with exactly these values.
    pub params: Vec<(String, String)>,
    /// What to do to a matching request.
    pub fault: Fault,
    /// Share of matching requests to fault, 0..=1, drawn from the proxy's seeded dice.
    pub rate: f64,
    /// At most this many injections; `None` for no limit.
    pub limit: Option<u32>,
}

impl Rule {
    /// A rule on one action that always throttles until told otherwise.
    pub fn on(action: &str) -> Rule {
        Rule { action: Some(action.to_string()), ..Rule::any() }
    }

    /// A rule on every action that always throttles until told otherwise.
    pub fn any() -> Rule {
        Rule { action: None, params: Vec::new(), fault: Fault::Throttle, rate: 1.0, limit: None }
    }

    /// Also requires form parameter `key` (e.g. `InstanceType`, `SubnetId`,
    /// `InstanceMarketOptions.MarketType`) to equal `value`.
    pub fn when(mut self, key: &str, value: &str) -> Rule {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the fault.
    pub fn fault(mut self, fault: Fault) -> Rule {
        self.fault = fault;
        self
    }

    /// Sets the share of matching requests to fault.
    pub fn rate(mut self, rate: f64) -> Rule {
        assert!((0.0..=1.0).contains(&rate), "rate {rate} is not within 0..=1");
        self.rate = rate;
        self
    }

    /// Injects at most `n` times.
    pub fn limit(mut self, n: u32) -> Rule {
        self.limit = Some(n);
        self
    }

    fn matches(&self, action: &str, params: &BTreeMap<String, String>) -> bool {
        self.action.as_deref().is_none_or(|a| a == action)
            && self.params.iter().all(|(k, v)| params.get(k).is_some_and(|p| p == v))
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The `Action` parameter ("" when the request had none).
    pub action: String,
    /// Every query and form parameter, decoded.
    pub params: BTreeMap<String, String>,
    /// When the whole request had reached the proxy (before any injected delay).
    pub at: Instant,
    /// The fault injected: the answering or dropping fault if one applied, else the total
    /// delay as [`Fault::Latency`]; `None` when the request went through untouched.
    pub fault: Option<Fault>,
    /// Injected delay before the request was answered or forwarded.
    pub delay: Duration,
    /// Whether the request was passed on to moto (untouched, delayed or dropped after).
    pub forwarded: bool,
}

struct State {
    /// Rules with how often each has injected.
    rules: Vec<(Rule, u32)>,
    dice: StdRng,
    calls: Vec<Call>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every new call, for [`FaultProxy::wait_calls`].
    called: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide its own failure behind ours.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the rules to a request, records it and returns its index and what to do.
    fn decide(&self, action: String, params: BTreeMap<String, String>) -> (usize, Option<Fault>, Duration) {
        let mut guard = self.lock();
        let at = Instant::now();
        let State { rules, dice, calls } = &mut *guard;
        let mut delay = Duration::ZERO;
        let mut fault = None;
        for (rule, injected) in rules.iter_mut() {
            if !rule.matches(&action, &params) || rule.limit.is_some_and(|l| *injected >= l) {
                continue;
            }
            // Every eligible rule draws once, whatever its rate: the sequence of outcomes then
            // depends only on the seed and the order of requests.
            if dice.gen::<f64>() >= rule.rate {
                continue;
            }
            *injected += 1;
            match &rule.fault {
                Fault::Latency(d) => delay += *d,
                other => {
                    fault = Some(other.clone());
                    break;
                }
            }
        }
        let forwarded = fault.as_ref().is_none_or(|f| f.error().is_none());
        let recorded = fault.clone().or((!delay.is_zero()).then_some(Fault::Latency(delay)));
        calls.push(Call { action, params, at, fault: recorded, delay, forwarded });
        let index = calls.len() - 1;
        drop(guard);
        self.called.notify_all();
        (index, fault, delay)
    }
}

/// A running proxy on 127.0.0.1 with its own thread and runtime, so blocking tests and async
/// code can use it alike. Stops when dropped.
pub struct FaultProxy {
    /// The port it listens on.
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (e.g. `moto.endpoint()`), dice seeded with
    /// [`DEFAULT_SEED`].
    pub fn start(upstream: &str) -> FaultProxy {
        FaultProxy::with_seed(upstream, DEFAULT_SEED)
    }

    /// Starts a proxy in front of `upstream` whose dice are seeded with `seed`. Outcomes repeat
    /// for the same seed and the same order of requests (concurrent callers may vary the order).
    pub fn with_seed(upstream: &str, seed: u64) -> FaultProxy {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { rules: Vec::new(), dice: StdRng::seed_from_u64(seed), calls: Vec::new() }),
            called: Condvar::new(),
        });
        let upstream = upstream.trim_end_matches('/').to_string();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("faultproxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy runtime");
                rt.block_on(accept_loop(served, upstream, port_tx, stopped));
            })
            .expect("spawn proxy thread");
        let port = port_rx.recv().expect("proxy thread died before listening");
        FaultProxy { port, shared, stop: Some(stop), thread: Some(thread) }
    }

    /// The endpoint URL to give the SDK.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A real EC2 client talking to moto through this proxy. Pass
    /// `RetryConfig::disabled()` to see each injected fault as it is, or
    /// `RetryConfig::standard()` for what a default client does.
    pub fn client(&self, retry: aws_sdk_ec2::config::retry::RetryConfig) -> aws_sdk_ec2::Client {
        use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(super::moto::REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .endpoint_url(self.endpoint())
            .retry_config(retry)
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }

    /// Adds a rule after the existing ones.
    pub fn add(&self, rule: Rule) {
        self.shared.lock().rules.push((rule, 0));
    }

    /// Removes every rule (the recorded calls stay).
    pub fn clear(&self) {
        self.shared.lock().rules.clear();
    }

    /// Every request so far, in order of arrival.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// How many `action` requests reached the proxy.
    pub fn count(&self, action: &str) -> usize {
        self.shared.lock().calls.iter().filter(|c| c.action == action).count()
    }

    /// How many `action` requests got a fault (latency included).
    pub fn injected(&self, action: &str) -> usize {
        self.shared.lock().calls.iter().filter(|c| c.action == action && c.fault.is_some()).count()
    }

    /// The most `action` requests that reached the proxy within any window of length
    /// `window`. Every attempt counts, faulted or not, as it does against EC2's own rate limit;
    /// for the requests moto saw, filter [`FaultProxy::calls`] on `forwarded` and use
    /// [`busiest_window`].
    pub fn max_in_window(&self, action: &str, window: Duration) -> usize {
        let times: Vec<Instant> =
            self.shared.lock().calls.iter().filter(|c| c.action == action).map(|c| c.at).collect();
        busiest_window(&times, window)
    }

    /// Blocks until at least `n` `action` requests have reached the proxy and returns them;
    /// fails the test after [`super::DEADLINE`].
    pub fn wait_calls(&self, action: &str, n: usize) -> Vec<Call> {
        let start = Instant::now();
        let mut state = self.shared.lock();
        loop {
            let seen: Vec<Call> = state.calls.iter().filter(|c| c.action == action).cloned().collect();
            if seen.len() >= n {
                return seen;
            }
            let left = super::DEADLINE.checked_sub(start.elapsed());
            let Some(left) = left else { panic!("timed out waiting for {n} {action} calls; saw {}", seen.len()) };
            state = self.shared.called.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The most of `times` that fall within any half-open window `[t, t + window)`.
pub fn busiest_window(times: &[Instant], window: Duration) -> usize {
    let mut times = times.to_vec();
    times.sort();
    let mut first = 0;
    let mut most = 0;
    for last in 0..times.len() {
        // With a zero window nothing fits, and `first` passes `last`.
        while first <= last && times[last].duration_since(times[first]) >= window {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    most
}

async fn accept_loop(
    shared: Arc<Shared>,
    upstream: String,
    port: std::sync::mpsc::Sender<u16>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let _ = port.send(listener.local_addr().expect("proxy address").port());
    // Never through an HTTP proxy from the environment: moto is on loopback.
    let http = paddock::tls::http_builder(None).expect("TLS").no_proxy().build().expect("upstream client");
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve(shared.clone(), http.clone(), upstream.clone(), stream));
                }
            }
        }
    }
}

/// An HTTP request as read off the socket.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An HTTP response to write back.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Serves one client connection, request after request, until either side closes it. An idle
/// kept-alive connection is never closed from here: such a close could race the client's reuse
/// of the connection and fail a request for a reason no test asked for.
async fn serve(shared: Arc<Shared>, http: reqwest::Client, upstream: String, stream: TcpStream) {
    let mut conn = BufReader::new(stream);
    while let Ok(Some(req)) = read_request(&mut conn).await {
        let mut params = BTreeMap::new();
        if let Some((_, query)) = req.target.split_once('?') {
            params.extend(parse_form(query));
        }
        let form = req.header("content-type").is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
        if form {
            params.extend(parse_form(&String::from_utf8_lossy(&req.body)));
        }
        let action = params.get("Action").cloned().unwrap_or_default();
        let (index, fault, delay) = shared.decide(action, params);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let response = match fault.as_ref().and_then(Fault::error) {
            Some((status, code, message)) => ec2_error(status, code, message, index),
            None => forward(&http, &upstream, &req).await,
        };
        if fault == Some(Fault::DropAfterServe) {
            // moto has served the request; closing now leaves the caller not knowing that.
            return;
        }
        if write_response(conn.get_mut(), &response, req.keep_alive).await.is_err() || !req.keep_alive {
            return;
        }
    }
}

/// Reads one request; `None` when the client closed the connection between requests.
async fn read_request(conn: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    // A client may send a stray line break between requests; it is not a request.
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next()) else {
        return Err(bad(format!("bad request line {line:?}")));
    };
    let (method, target, version) = (method.to_string(), target.to_string(), version.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(bad("connection closed inside the headers".into()));
        }
        let text = line.trim_end();
        if text.is_empty() {
            break;
        }
        let (name, value) = text.split_once(':').ok_or_else(|| bad(format!("bad header {text:?}")))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut req = Request { method, target, headers, body: Vec::new(), keep_alive: false };
    let connection = req.header("connection").map(str::to_ascii_lowercase).unwrap_or_default();
    req.keep_alive = if version == "HTTP/1.0" { connection == "keep-alive" } else { connection != "close" };
    if req.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        // The client holds the body back until told to go on.
        conn.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    if req.header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        req.body = read_chunked(conn).await?;
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        req.body = vec![0; len];
        conn.read_exact(&mut req.body).await?;
    }
    Ok(Some(req))
}

async fn read_chunked(conn: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let size = line.trim().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size, 16).map_err(|_| bad(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            break;
        }
        let start = body.len();
        body.resize(start + size, 0);
        conn.read_exact(&mut body[start..]).await?;
        line.clear();
        conn.read_line(&mut line).await?;
    }
    // Trailers, if any, end with an empty line; nothing here needs them.
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            return Ok(body);
        }
    }
}

fn bad(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// Headers that describe one connection, not the message, so they are not passed on.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "content-length",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Passes the request to moto and returns its answer (a 502 when moto cannot be reached).
async fn forward(http: &reqwest::Client, upstream: &str, req: &Request) -> Response {
    let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    // The Host header goes along unchanged: the SDK signed it.
    let mut call = http.request(method, format!("{upstream}{}", req.target)).body(req.body.clone());
    for (name, value) in req.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        call = call.header(name, value);
    }
    let answer = async {
        let resp = call.send().await?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(n, _)| !hop_by_hop(n.as_str()))
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = resp.bytes().await?.to_vec();
        Ok::<_, reqwest::Error>(Response { status, headers, body })
    };
    answer.await.unwrap_or_else(|e| Response {
        status: 502,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: format!("faultproxy: upstream {upstream} failed: {e}").into_bytes(),
    })
}

/// An EC2 query-protocol error answer, with a request id derived from the call's index so
/// runs stay reproducible.
fn ec2_error(status: u16, code: &str, message: &str, index: usize) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>fa017000-0000-4000-8000-{index:012x}</RequestID></Response>"
    );
    Response {
        status,
        headers: vec![("Content-Type".into(), "text/xml;charset=UTF-8".into()), ("Server".into(), "AmazonEC2".into())],
        body: body.into_bytes(),
    }
}

async fn write_response(stream: &mut TcpStream, resp: &Response, keep_alive: bool) -> std::io::Result<()> {
    let reason = reqwest::StatusCode::from_u16(resp.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", resp.status);
    for (name, value) in &resp.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&resp.body);
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Decodes `application/x-www-form-urlencoded` text (also what a query string holds).
fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // Only two hex digits make an escape (from_str_radix alone would also take "+1").
        let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let escaped = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

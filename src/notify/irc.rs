//! The IRC bot: one connection per IRC notifier, kept up in the background with backoff. It
//! registers (SASL PLAIN or NickServ when a password is given), joins its channel, answers
//! pings, and posts what the delivery worker hands it; a message counts as delivered once it is
//! written to the channel. While it is disconnected, deliveries fail and are retried later, so
//! nothing waits on IRC. It also answers questions addressed to it in its channel (`paddock:
//! status`), read-only, and only there: members of a private channel are the audience.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::webhook::SendError;

/// Where and as whom the bot connects.
#[derive(Debug, Clone, PartialEq)]
pub struct IrcSettings {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub nick: String,
    pub channel: String,
    /// How to use the password, if there is one.
    pub auth: IrcAuth,
    /// CA certificates to trust instead of the system's, for a server with a private CA.
    pub roots: Option<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>,
}

pub use crate::config::IrcAuth;

/// How long a connection attempt or a write may take.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// IRC lines are at most 512 bytes with the command; keep messages well inside.
const MAX_TEXT: usize = 400;

type Request = (String, oneshot::Sender<Result<(), String>>);

/// A question asked of the bot in its channel: `paddock: status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    Help,
    /// The newest build of every builder (on one branch, if given).
    Status {
        branch: Option<String>,
    },
    /// The newest finished build of a builder (on one branch, if given).
    Last {
        builder: String,
        branch: Option<String>,
    },
    /// Anything else: answered with a pointer to `help`.
    Unknown(String),
}

/// Answers questions from what the master knows (the delivery worker answers from the store).
pub trait Answers: Send + Sync + 'static {
    /// The reply, a line each (the bot posts at most [`MAX_ANSWER_LINES`]).
    fn answer(&self, q: Question) -> futures_util::future::BoxFuture<'_, Vec<String>>;
}

/// Lines one answer may post.
pub const MAX_ANSWER_LINES: usize = 4;
/// Questions answered in a burst, then one per [`ANSWER_EVERY`]; the rest are ignored
/// (anyone in the channel can ask, and the answers must not crowd out the build news).
const ANSWER_BURST: f64 = 8.0;
const ANSWER_EVERY: Duration = Duration::from_secs(2);
/// How long an answer may take to make.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Answer lines waiting for flood-control room at most; more are dropped.
const MAX_PENDING_ANSWER_LINES: usize = 16;

/// The question in `text`, if it is addressed to the bot (`nick: …` or `nick, …`; any of
/// `nicks`, since the bot may be `paddock_` while its nick is taken).
pub fn question(text: &str, nicks: &[&str]) -> Option<Question> {
    let text = text.trim();
    let asked = nicks.iter().find_map(|nick| match text.get(..nick.len()) {
        Some(head) if head.eq_ignore_ascii_case(nick) => {
            let rest = &text[nick.len()..];
            rest.strip_prefix(':').or_else(|| rest.strip_prefix(',')).map(str::trim)
        }
        _ => None,
    })?;
    let words: Vec<&str> = asked.split_whitespace().collect();
    let word = |i: usize| words.get(i).map(|w| w.to_string());
    Some(match words.first().map(|w| w.to_ascii_lowercase()).as_deref() {
        Some("help") | None => Question::Help,
        Some("status") if words.len() <= 2 => Question::Status { branch: word(1) },
        Some("last") if (2..=3).contains(&words.len()) => {
            Question::Last { builder: words[1].to_string(), branch: word(2) }
        }
        _ => Question::Unknown(asked.chars().take(40).collect()),
    })
}

/// A handle on a running bot.
#[derive(Debug, Clone)]
pub struct IrcBot {
    tx: mpsc::Sender<Request>,
}

impl IrcBot {
    /// Starts the bot's connection task. `password` is used per `settings.auth`; `answers`
    /// (if any) answers the questions people ask the bot.
    pub fn start(settings: IrcSettings, password: Option<String>, answers: Option<Arc<dyn Answers>>) -> IrcBot {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run(settings, password, answers, rx));
        IrcBot { tx }
    }

    /// Posts `text` to the channel (each line a message); fails when not joined.
    pub async fn say(&self, text: &str) -> Result<(), SendError> {
        let (ack, answer) = oneshot::channel();
        self.tx.send((text.to_string(), ack)).await.map_err(|_| SendError::Retry("the IRC bot has stopped".into()))?;
        match tokio::time::timeout(IO_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(SendError::Retry(why)),
            Ok(Err(_)) => Err(SendError::Retry("the IRC connection dropped".into())),
            Err(_) => Err(SendError::Retry("IRC did not take the message in time".into())),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connects, and reconnects with backoff for as long as the master runs.
async fn run(
    settings: IrcSettings,
    password: Option<String>,
    answers: Option<Arc<dyn Answers>>,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        // Why the bot is away, for the deliveries that fail meanwhile (and so for the API).
        let why = match connect(&settings).await {
            Ok(stream) => {
                tracing::info!(server = %settings.host, port = settings.port, "connected to IRC");
                match session(&settings, password.as_deref(), answers.clone(), stream, &mut rx, &mut backoff).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(server = %settings.host, "IRC connection ended: {e}");
                        format!("not connected to IRC (the connection ended: {e})")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(server = %settings.host, retry_in = ?backoff, "cannot connect to IRC: {e}");
                format!("not connected to IRC (cannot connect: {e})")
            }
        };
        // While away, say so to whoever asks, until it is time to try again.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                req = rx.recv() => match req {
                    Some((_, ack)) => { let _ = ack.send(Err(why.clone())); }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(s: &IrcSettings) -> Result<Box<dyn Stream>, String> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect((s.host.as_str(), s.port)))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if !s.tls {
        return Ok(Box::new(tcp));
    }
    // `roots` were checked at start (`crate::tls::read_ca_file`): every one is usable.
    let config = crate::tls::client_config(s.roots.as_deref()).map_err(|e| e.to_string())?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(s.host.clone()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(IO_TIMEOUT, tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    Ok(Box::new(tls))
}

/// One connection: register, join, then serve messages and pings until it ends. `Ok` only
/// when the master is stopping (the request channel closed).
///
/// A message is acknowledged only when the server answers a PING sent after it: lines are
/// handled in order, so the PONG proves the server took the message (a half-open connection
/// cannot swallow messages reported as sent). A connection silent past `IDLE_LIMIT` is dropped.
async fn session(
    s: &IrcSettings,
    password: Option<&str>,
    answers: Option<Arc<dyn Answers>>,
    stream: Box<dyn Stream>,
    rx: &mut mpsc::Receiver<Request>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let mut nick = s.nick.clone();
    let sasl = password.filter(|_| s.auth == IrcAuth::Sasl);
    let mut out = String::new();
    if sasl.is_some() {
        out.push_str("CAP REQ :sasl\r\n");
    }
    out.push_str(&format!("NICK {nick}\r\nUSER paddock 0 * :Paddock CI\r\n"));
    send(&mut write, &out).await?;
    let mut joined = false;
    let mut waiting: std::collections::VecDeque<(String, oneshot::Sender<Result<(), String>>)> = Default::default();
    let mut next_token = 0u64;
    let mut flood = Flood::new();
    let mut last_heard = tokio::time::Instant::now();
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = Vec::new();
    let (mut answer_tokens, mut answer_at) = (ANSWER_BURST, tokio::time::Instant::now());
    // Answers are made off the loop (a slow store must not hold up pings and deliveries) and
    // posted only with flood-control room to spare, so build news goes first.
    let (answered_tx, mut answered) = mpsc::channel::<Vec<String>>(4);
    let mut pending_answer: std::collections::VecDeque<String> = Default::default();
    loop {
        tokio::select! {
            read = read_line(&mut reader, &mut buf) => {
                let line = read?;
                last_heard = tokio::time::Instant::now();
                let msg = parse(&line);
                match (msg.command, msg.params.as_slice()) {
                    ("PING", [token, ..]) => send(&mut write, &format!("PONG :{token}\r\n")).await?,
                    ("PONG", [.., token]) if token.len() == 20 && token.bytes().all(|b| b.is_ascii_digit()) => {
                        // Every message written before this PING has reached the server.
                        while waiting.front().is_some_and(|(t, _)| t.as_str() <= *token) {
                            if let Some((_, ack)) = waiting.pop_front() {
                                let _ = ack.send(Ok(()));
                            }
                        }
                    }
                    ("CAP", [_, sub, ..]) if sub.eq_ignore_ascii_case("ACK") => send(&mut write, "AUTHENTICATE PLAIN\r\n").await?,
                    ("CAP", [_, sub, ..]) if sub.eq_ignore_ascii_case("NAK") => {
                        tracing::warn!("the IRC server offers no SASL; continuing without it");
                        send(&mut write, "CAP END\r\n").await?;
                    }
                    ("AUTHENTICATE", ["+", ..]) => {
                        // The account is the configured nick, whatever nick this connection got.
                        let (account, pass) = (&s.nick, sasl.unwrap_or_default());
                        let blob = base64::engine::general_purpose::STANDARD.encode(format!("{account}\0{account}\0{pass}"));
                        send(&mut write, &format!("AUTHENTICATE {blob}\r\n")).await?;
                    }
                    ("903", _) => send(&mut write, "CAP END\r\n").await?,
                    ("904" | "905", _) => {
                        send(&mut write, "CAP END\r\n").await?;
                        return Err("SASL authentication failed (check the password)".into());
                    }
                    ("433", _) if nick.len() < s.nick.len() + 3 => {
                        // Nick in use (an old connection not yet timed out): take another.
                        nick.push('_');
                        send(&mut write, &format!("NICK {nick}\r\n")).await?;
                    }
                    ("432" | "433", _) => return Err(format!("the server refuses the nick {nick}")),
                    ("001", _) => {
                        // Identify only as ourselves: with another nick, "NickServ" may be anyone.
                        if let (Some(pass), IrcAuth::NickServ, true) = (password, s.auth, nick == s.nick) {
                            send(&mut write, &format!("PRIVMSG NickServ :IDENTIFY {pass}\r\n")).await?;
                        }
                        send(&mut write, &format!("JOIN {}\r\n", s.channel)).await?;
                    }
                    ("JOIN", [channel, ..]) if msg.nick == nick && channel.eq_ignore_ascii_case(&s.channel) => {
                        tracing::info!(channel = %s.channel, nick = %nick, "joined the IRC channel");
                        joined = true;
                        *backoff = Duration::from_secs(1);
                    }
                    ("KICK", [channel, who, ..]) if *who == nick && channel.eq_ignore_ascii_case(&s.channel) => {
                        joined = false;
                        send(&mut write, &format!("JOIN {}\r\n", s.channel)).await?;
                    }
                    ("404", _) => {
                        // Cannot send to the channel: what was written is lost; say so.
                        for (_, ack) in waiting.drain(..) {
                            let _ = ack.send(Err(format!("the server would not let the bot speak in {}", s.channel)));
                        }
                    }
                    ("471" | "473" | "474" | "475" | "477", _) => {
                        tracing::error!(channel = %s.channel, "the IRC server refused the join: {}", msg.params.join(" "));
                    }
                    // Only people (`nick!user@host`) asking in the channel; never CTCP.
                    ("PRIVMSG", [target, text])
                        if target.eq_ignore_ascii_case(&s.channel)
                            && msg.from_user
                            && msg.nick != nick
                            && !text.starts_with('\u{1}') =>
                    {
                        let (Some(answers), Some(q)) = (&answers, question(text, &[&s.nick, &nick])) else { continue };
                        let now = tokio::time::Instant::now();
                        let earned = now.duration_since(answer_at).as_secs_f64() / ANSWER_EVERY.as_secs_f64();
                        (answer_tokens, answer_at) = ((answer_tokens + earned).min(ANSWER_BURST), now);
                        if answer_tokens < 1.0 {
                            continue;
                        }
                        answer_tokens -= 1.0;
                        let (answers, done, asker) = (answers.clone(), answered_tx.clone(), msg.nick.to_string());
                        tokio::spawn(async move {
                            let lines = tokio::time::timeout(ANSWER_TIMEOUT, answers.answer(q))
                                .await
                                .unwrap_or_else(|_| vec!["no answer in time; try again later".to_string()]);
                            let lines = lines
                                .iter()
                                .filter(|l| !l.trim().is_empty())
                                .take(MAX_ANSWER_LINES)
                                .map(|l| format!("{asker}: {l}"))
                                .collect();
                            let _ = done.send(lines).await;
                        });
                    }
                    ("ERROR", _) => return Err(format!("the server said: {}", msg.params.join(" "))),
                    _ => {}
                }
            }
            _ = keepalive.tick() => {
                if last_heard.elapsed() > IDLE_LIMIT {
                    return Err("no word from the server; reconnecting".into());
                }
                if !joined {
                    // A refused or lost join is tried again.
                    if last_heard.elapsed() > KEEPALIVE {
                        send(&mut write, &format!("JOIN {}\r\n", s.channel)).await?;
                    }
                } else {
                    send(&mut write, "PING :keepalive\r\n").await?;
                }
            }
            Some(lines) = answered.recv() => {
                for l in lines {
                    if pending_answer.len() < MAX_PENDING_ANSWER_LINES {
                        pending_answer.push_back(l);
                    }
                }
                while flood.room(1.0) {
                    let Some(l) = pending_answer.pop_front() else { break };
                    send(&mut write, &format!("PRIVMSG {} :{}\r\n", s.channel, clip(&l))).await?;
                }
            }
            () = tokio::time::sleep(flood.refill_in(1.0)), if !pending_answer.is_empty() => {
                if flood.room(1.0) {
                    if let Some(l) = pending_answer.pop_front() {
                        send(&mut write, &format!("PRIVMSG {} :{}\r\n", s.channel, clip(&l))).await?;
                    }
                }
            }
            req = rx.recv() => {
                let Some((text, ack)) = req else {
                    let _ = send(&mut write, "QUIT :Paddock stopping\r\n").await;
                    return Ok(());
                };
                if ack.is_closed() {
                    // Its sender gave up waiting: it will be retried; do not post it twice.
                    continue;
                }
                if !joined {
                    let _ = ack.send(Err(format!("not in {} yet", s.channel)));
                    continue;
                }
                for l in text.lines().filter(|l| !l.trim().is_empty()).take(MAX_LINES) {
                    flood.wait().await;
                    send(&mut write, &format!("PRIVMSG {} :{}\r\n", s.channel, clip(l))).await?;
                }
                next_token += 1;
                let token = format!("{next_token:020}");
                send(&mut write, &format!("PING :{token}\r\n")).await?;
                waiting.push_back((token, ack));
            }
        }
    }
}

/// Lines one message may post.
const MAX_LINES: usize = 10;
/// How often the bot checks the connection (and pings the server).
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Silence after which the connection counts as dead.
const IDLE_LIMIT: Duration = Duration::from_secs(150);

/// Flood control: bursts of 4 lines, then one a second (servers kill floods).
struct Flood {
    tokens: f64,
    at: tokio::time::Instant,
}

impl Flood {
    fn new() -> Flood {
        Flood { tokens: 4.0, at: tokio::time::Instant::now() }
    }

    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64()).min(4.0);
        self.at = now;
    }

    /// Takes a line's room if there is some to spare beyond `reserve` (kept for build news).
    fn room(&mut self, reserve: f64) -> bool {
        self.refill();
        if self.tokens >= 1.0 + reserve {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until [`Flood::room`] with `reserve` can succeed.
    fn refill_in(&self, reserve: f64) -> Duration {
        let have = (self.tokens + self.at.elapsed().as_secs_f64()).min(4.0);
        Duration::from_secs_f64((1.0 + reserve - have).max(0.0)) + Duration::from_millis(5)
    }

    async fn wait(&mut self) {
        self.refill();
        if self.tokens < 1.0 {
            tokio::time::sleep(Duration::from_secs_f64(1.0 - self.tokens)).await;
            self.tokens = 1.0;
            self.at = tokio::time::Instant::now();
        }
        self.tokens -= 1.0;
    }
}

/// Reads one line, as text even when it is not UTF-8 (anyone in the channel can send any
/// bytes), at most 8 KiB of it. Safe in `select!`: bytes read before a cancellation stay in
/// `buf` and the next call carries on from them.
async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<String, String> {
    const LIMIT: usize = 8 * 1024;
    while !buf.ends_with(b"\n") && buf.len() < LIMIT {
        let room = (LIMIT - buf.len()) as u64;
        let n = (&mut *r).take(room).read_until(b'\n', buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
    }
    let line = String::from_utf8_lossy(buf).trim_end_matches(['\r', '\n']).to_string();
    buf.clear();
    Ok(line)
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> Result<(), String> {
    let write = async {
        w.write_all(text.as_bytes()).await?;
        w.flush().await
    };
    tokio::time::timeout(IO_TIMEOUT, write).await.map_err(|_| "write timed out".to_string())?.map_err(|e| e.to_string())
}

/// Cuts a line to fit an IRC message, at a character boundary; drops control characters
/// (a stray CR would end the line and start a command).
fn clip(line: &str) -> String {
    let clean: String = line.chars().filter(|c| !c.is_control()).collect();
    let mut end = clean.len().min(MAX_TEXT);
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    clean[..end].to_string()
}

/// An IRC line, split: the sender's nick, the command, the parameters (trailing included).
struct Msg<'a> {
    nick: &'a str,
    /// Sent by a user (`nick!user@host`), not by a server.
    from_user: bool,
    command: &'a str,
    params: Vec<&'a str>,
}

fn parse(line: &str) -> Msg<'_> {
    let mut rest = line.trim_end_matches(['\r', '\n']);
    let (mut nick, mut from_user) = ("", false);
    if let Some(r) = rest.strip_prefix(':') {
        let (prefix, after) = r.split_once(' ').unwrap_or((r, ""));
        nick = prefix.split('!').next().unwrap_or(prefix);
        from_user = prefix.contains('!');
        rest = after;
    }
    let (command, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut params = Vec::new();
    while !rest.is_empty() {
        if let Some(trailing) = rest.strip_prefix(':') {
            params.push(trailing);
            break;
        }
        let (p, after) = rest.split_once(' ').unwrap_or((rest, ""));
        if !p.is_empty() {
            params.push(p);
        }
        rest = after;
    }
    Msg { nick, from_user, command, params }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_are_addressed_to_the_bot() {
        let status = Some(Question::Status { branch: None });
        let nicks = ["paddock", "paddock_"];
        assert_eq!(question("paddock: status", &nicks), status);
        assert_eq!(question("Paddock, status", &nicks), status);
        assert_eq!(question("  paddock:   status  ", &nicks), status);
        assert_eq!(question("paddock_: status", &nicks), status, "the nick it has while its own is taken");
        assert_eq!(question("status", &nicks), None, "not addressed");
        assert_eq!(question("paddockfan: status", &nicks), None);
        assert_eq!(question("paddock status", &nicks), None);
        assert_eq!(question("paddock:", &nicks), Some(Question::Help));
        assert_eq!(
            question("paddock: status stable/1.0", &nicks),
            Some(Question::Status { branch: Some("stable/1.0".into()) })
        );
        assert_eq!(
            question("paddock: last py3.12-sqlite main", &nicks),
            Some(Question::Last { builder: "py3.12-sqlite".into(), branch: Some("main".into()) })
        );
        assert_eq!(question("paddock: last", &nicks), Some(Question::Unknown("last".into())));
        assert_eq!(question("paddock: force b", &nicks), Some(Question::Unknown("force b".into())));
        assert_eq!(question("ü: x", &nicks), None, "no panic on short or non-ASCII text");
        assert_eq!(question("paddoc", &nicks), None);
    }

    #[test]
    fn parses_lines() {
        let m = parse(":paddock!~p@127.0.0.1 JOIN :#ci\r\n");
        assert_eq!((m.nick, m.command, m.params.as_slice()), ("paddock", "JOIN", &["#ci"][..]));
        assert!(m.from_user);
        let m = parse("PING :irc.example");
        assert_eq!((m.command, m.params.as_slice()), ("PING", &["irc.example"][..]));
        let m = parse(":srv CAP * ACK :sasl");
        assert_eq!(m.params, ["*", "ACK", "sasl"]);
        assert!(!m.from_user);
        let m = parse(":srv 433 * paddock :Nickname already in use");
        assert_eq!(m.command, "433");
    }

    /// A scripted server for the password exchanges (ngircd has neither SASL nor NickServ):
    /// reads what the bot sends and answers as a server with services would.
    async fn scripted(auth: IrcAuth) -> Vec<String> {
        // A broken bot must fail the test, not hang it.
        tokio::time::timeout(Duration::from_secs(60), scripted_inner(auth))
            .await
            .expect("the exchange finished in time")
    }

    async fn scripted_inner(auth: IrcAuth) -> Vec<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let settings = IrcSettings {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            roots: None,
            nick: "paddock".into(),
            channel: "#ci".into(),
            auth,
        };
        let bot = IrcBot::start(settings, Some("s3cret".into()), None);
        let (sock, _) = listener.accept().await.expect("accept");
        let (read, mut write) = tokio::io::split(sock);
        let mut lines = BufReader::new(read).lines();
        let mut seen = Vec::new();
        let mut negotiating = false;
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            // As a real server: registration waits for CAP END once capabilities are asked for.
            let reply = match line.as_str() {
                "CAP REQ :sasl" => {
                    negotiating = true;
                    ":srv CAP * ACK :sasl\r\n".to_string()
                }
                "AUTHENTICATE PLAIN" => "AUTHENTICATE +\r\n".to_string(),
                l if l.starts_with("AUTHENTICATE ") => ":srv 903 paddock :SASL authentication successful\r\n".into(),
                "CAP END" => ":srv 001 paddock :Welcome\r\n".into(),
                l if l.starts_with("USER ") && !negotiating => ":srv 001 paddock :Welcome\r\n".into(),
                "JOIN #ci" => ":paddock!~p@127.0.0.1 JOIN :#ci\r\n".into(),
                _ => String::new(),
            };
            write.write_all(reply.as_bytes()).await.expect("reply");
            if line == "JOIN #ci" {
                break;
            }
        }
        // Joined (once the bot has read the JOIN): a message goes out.
        let said = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match bot.say("hello\nworld").await {
                    Ok(()) => return true,
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(_) => return false,
                }
            }
        });
        // The two lines, then the PING that asks the server to confirm them.
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(token) = line.strip_prefix("PING :") {
                write.write_all(format!(":srv PONG srv :{token}\r\n").as_bytes()).await.expect("pong");
                if token != "keepalive" {
                    break;
                }
                continue;
            }
            seen.push(line);
        }
        assert!(said.await.expect("join"), "the bot spoke once joined: {seen:?}");
        seen
    }

    #[tokio::test]
    async fn sasl_plain_then_join_then_speak() {
        let seen = scripted(IrcAuth::Sasl).await;
        let blob = base64::engine::general_purpose::STANDARD.encode("paddock\0paddock\0s3cret");
        let expected = [
            "CAP REQ :sasl".to_string(),
            "NICK paddock".into(),
            "USER paddock 0 * :Paddock CI".into(),
            "AUTHENTICATE PLAIN".into(),
            format!("AUTHENTICATE {blob}"),
            "CAP END".into(),
            "JOIN #ci".into(),
            "PRIVMSG #ci :hello".into(),
            "PRIVMSG #ci :world".into(),
        ];
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn nickserv_identify_before_joining() {
        let seen = scripted(IrcAuth::NickServ).await;
        assert_eq!(
            seen,
            [
                "NICK paddock",
                "USER paddock 0 * :Paddock CI",
                "PRIVMSG NickServ :IDENTIFY s3cret",
                "JOIN #ci",
                "PRIVMSG #ci :hello",
                "PRIVMSG #ci :world"
            ]
        );
    }

    #[test]
    fn clips_at_characters_and_drops_controls() {
        assert_eq!(clip("a\rb\u{7}c"), "abc");
        let long = "é".repeat(300);
        let c = clip(&long);
        assert!(c.len() <= MAX_TEXT && c.chars().all(|ch| ch == 'é'));
    }
}

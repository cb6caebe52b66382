//! Spot interruption notices from the EC2 instance metadata service (IMDSv2).
//!
//! On EC2 the agent polls two metadata paths: the spot instance action, set about two minutes
//! before AWS stops or terminates a spot instance, and the rebalance recommendation, set when
//! the instance is at raised risk of interruption. Each is reported once; the agent's client
//! tells the master, which requeues the build at once instead of waiting for the machine to
//! vanish and its heartbeat to time out.
//!
//! IMDSv2 wants a session token: `PUT /latest/api/token` first, then every GET carries the
//! token. A 401 means the token expired, so a new one is fetched and the GET tried again.
//! Off EC2 (or with IMDS disabled) nothing answers: the poller keeps trying quietly, since a
//! metadata service that is down for a moment must not cost a notice.

use std::time::Duration;

use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::protocol::AgentMsg;

/// Where IMDSv2 hands out session tokens.
const TOKEN_PATH: &str = "/latest/api/token";
/// Present (200) once AWS has scheduled a spot interruption; 404 until then.
const SPOT_PATH: &str = "/latest/meta-data/spot/instance-action";
/// Present (200) once AWS recommends moving work off this instance; 404 until then.
const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
/// Request header giving the wanted token lifetime in seconds (required on the PUT).
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// Request header carrying the session token on every GET.
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Token lifetime asked for: the longest IMDS grants, so tokens are rarely fetched.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// A token is renewed this long before it expires, so a poll seldom meets a 401.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// The service sits on the local link: slower than this means it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Whole-request limit, so a stuck request cannot stall the next poll for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Most response bytes read: notices and tokens are tiny, anything larger is not IMDS.
const MAX_BODY: usize = 4096;
/// Most characters of a notice's detail kept (it ends up in the master's event log).
const MAX_DETAIL: usize = 200;

/// Which metadata notice was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// AWS will stop, hibernate or terminate this spot instance shortly.
    SpotInterruption,
    /// AWS recommends moving work off this instance (an interruption is likely soon).
    Rebalance,
}

impl NoticeKind {
    /// Both kinds, in the order they are polled: the interruption first, being the urgent one.
    pub const ALL: [NoticeKind; 2] = [NoticeKind::SpotInterruption, NoticeKind::Rebalance];

    /// The name sent to the master in [`AgentMsg::Interrupted`].
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::SpotInterruption => "spot-interruption",
            NoticeKind::Rebalance => "rebalance",
        }
    }

    /// The metadata path that carries this notice.
    fn path(self) -> &'static str {
        match self {
            NoticeKind::SpotInterruption => SPOT_PATH,
            NoticeKind::Rebalance => REBALANCE_PATH,
        }
    }
}

/// A notice read from the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What kind of notice.
    pub kind: NoticeKind,
    /// Human-readable summary, e.g. `terminate at 2026-11-24T20:00:00Z`.
    pub detail: String,
}

impl Notice {
    /// The message that tells the master about this notice.
    pub fn to_msg(&self) -> AgentMsg {
        AgentMsg::Interrupted { kind: self.kind.as_str().to_string(), detail: self.detail.clone() }
    }
}

/// Why one poll of the metadata service failed.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// The HTTP client could not be set up.
    #[error("cannot set up the metadata client: {0}")]
    Client(#[source] reqwest::Error),
    /// Its TLS settings could not be made.
    #[error("cannot set up the metadata client: {0}")]
    Tls(#[source] crate::tls::TlsError),
    /// No answer: not on EC2, IMDS disabled, or a hop limit too low.
    #[error("metadata service unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    /// The session token was refused even right after being renewed.
    #[error("metadata token refused")]
    TokenRefused,
    /// The token endpoint answered with something that cannot be a token.
    #[error("unusable metadata token")]
    BadToken,
    /// An answer that is neither a notice nor "no notice".
    #[error("metadata service answered {status} for {path}")]
    Status {
        /// The path asked for.
        path: &'static str,
        /// The HTTP status.
        status: u16,
    },
}

/// Spot instance action, as IMDS serves it.
#[derive(Deserialize)]
struct InstanceAction {
    action: String,
    #[serde(default)]
    time: String,
}

/// Rebalance recommendation, as IMDS serves it.
#[derive(Deserialize)]
struct Rebalance {
    #[serde(rename = "noticeTime", default)]
    notice_time: String,
}

/// Turns one metadata answer into a notice: 404 is "none yet", 200 is a notice, 401 asks for a
/// new token ([`ImdsError::TokenRefused`]) and anything else is an error.
///
/// A 200 whose body cannot be read still counts as a notice: at these paths it can only mean
/// AWS announced something, and missing a real interruption costs more than a false alarm
/// (either way the build is simply retried elsewhere).
pub fn parse_notice(kind: NoticeKind, status: u16, body: &str) -> Result<Option<Notice>, ImdsError> {
    match status {
        404 => Ok(None),
        200 => {
            let detail = match kind {
                NoticeKind::SpotInterruption => match serde_json::from_str::<InstanceAction>(body) {
                    Ok(a) if a.time.is_empty() => a.action,
                    Ok(a) => format!("{} at {}", a.action, a.time),
                    Err(_) => "unreadable instance action".to_string(),
                },
                NoticeKind::Rebalance => match serde_json::from_str::<Rebalance>(body) {
                    Ok(r) if !r.notice_time.is_empty() => format!("recommended at {}", r.notice_time),
                    _ => "recommended".to_string(),
                },
            };
            Ok(Some(Notice { kind, detail: clamp(&detail) }))
        }
        401 => Err(ImdsError::TokenRefused),
        status => Err(ImdsError::Status { path: kind.path(), status }),
    }
}

/// Keeps the first [`MAX_DETAIL`] characters, without control characters (the detail is logged).
fn clamp(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_DETAIL).collect()
}

/// A session with the metadata service: the HTTP client and the current token.
pub struct ImdsClient {
    http: reqwest::Client,
    base: String,
    /// The token (marked sensitive, so its `Debug` hides it) and when it was fetched.
    token: Option<(HeaderValue, Instant)>,
}

// No derive: even though the header value hides itself, the token stays out of `Debug` entirely.
impl std::fmt::Debug for ImdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImdsClient").field("base", &self.base).field("has_token", &self.token.is_some()).finish()
    }
}

impl ImdsClient {
    /// A client for the service at `base` (e.g. `http://169.254.169.254`).
    pub fn new(base: &str) -> Result<Self, ImdsError> {
        // Plain HTTP to a link-local address: no CA is trusted for https.
        let http = crate::tls::http_builder(Some(&[]))
            .map_err(ImdsError::Tls)?
            // A proxy from the environment must not see (or answer for) link-local metadata.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(ImdsError::Client)?;
        Ok(ImdsClient { http, base: base.trim_end_matches('/').to_string(), token: None })
    }

    /// Asks once whether a notice of `kind` is posted, renewing the token on a 401.
    pub async fn check(&mut self, kind: NoticeKind) -> Result<Option<Notice>, ImdsError> {
        let url = format!("{}{}", self.base, kind.path());
        let mut renewed = false;
        loop {
            let token = self.token().await?;
            let resp = self.http.get(&url).header(TOKEN_HEADER, token).send().await.map_err(ImdsError::Unreachable)?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !renewed {
                tracing::debug!("metadata token expired; renewing");
                self.token = None;
                renewed = true;
                continue;
            }
            let body = if status == StatusCode::OK { read_body(resp).await? } else { String::new() };
            return parse_notice(kind, status.as_u16(), &body);
        }
    }

    /// The current token, fetching a new one when there is none or it is about to expire.
    async fn token(&mut self) -> Result<HeaderValue, ImdsError> {
        if let Some((token, at)) = &self.token {
            if at.elapsed() + TOKEN_MARGIN < TOKEN_TTL {
                return Ok(token.clone());
            }
        }
        let resp = self
            .http
            .put(format!("{}{TOKEN_PATH}", self.base))
            .header(TTL_HEADER, TOKEN_TTL.as_secs().to_string())
            .send()
            .await
            .map_err(ImdsError::Unreachable)?;
        if resp.status() != StatusCode::OK {
            return Err(ImdsError::Status { path: TOKEN_PATH, status: resp.status().as_u16() });
        }
        let text = read_body(resp).await?;
        let text = text.trim();
        if text.is_empty() {
            return Err(ImdsError::BadToken);
        }
        let mut token = HeaderValue::from_str(text).map_err(|_| ImdsError::BadToken)?;
        token.set_sensitive(true);
        self.token = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// Reads at most [`MAX_BODY`] bytes of a response as text.
async fn read_body(mut resp: reqwest::Response) -> Result<String, ImdsError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ImdsError::Unreachable)? {
        let room = MAX_BODY.saturating_sub(bytes.len());
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() >= MAX_BODY {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Polls the service at `base` every `every`, sending each kind of notice to `notices` once.
/// Returns when both kinds were sent, when `notices` is closed, or when the client cannot be
/// set up; failures to reach the service are logged (once at warn) and polling goes on.
pub async fn poll(base: String, every: Duration, notices: mpsc::Sender<Notice>) {
    let mut client = match ImdsClient::new(&base) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("spot notices will not be seen: {e}");
            return;
        }
    };
    tracing::info!(url = %base, every = ?every, "polling the metadata service for spot notices");
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Vec<NoticeKind> = NoticeKind::ALL.to_vec();
    // Whether the last poll failed: only the first failure of a run is worth a warning (off EC2
    // every poll fails, and the log must not fill up with it).
    let mut failing = false;
    while !pending.is_empty() {
        tokio::select! {
            _ = ticker.tick() => {}
            () = notices.closed() => return,
        }
        let mut seen = Vec::new();
        for &kind in &pending {
            match client.check(kind).await {
                Ok(found) => {
                    if failing {
                        tracing::info!("the metadata service answers again");
                        failing = false;
                    }
                    if let Some(notice) = found {
                        // The client warns when it tells the master; once is enough.
                        tracing::info!(kind = kind.as_str(), detail = %notice.detail, "metadata notice");
                        if notices.send(notice).await.is_err() {
                            return;
                        }
                        seen.push(kind);
                    }
                }
                Err(e) => {
                    if failing {
                        tracing::debug!("{e}");
                    } else {
                        tracing::warn!("{e}; still polling for spot notices");
                        failing = true;
                    }
                    // The other path would most likely fail the same way: wait for the next tick.
                    break;
                }
            }
        }
        pending.retain(|k| !seen.contains(k));
    }
    tracing::debug!("every kind of metadata notice was reported; polling stops");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_notice_yet() {
        for kind in NoticeKind::ALL {
            assert!(matches!(parse_notice(kind, 404, "<html>Not Found</html>"), Ok(None)));
        }
    }

    #[test]
    fn spot_notice() {
        let body = r#"{"action": "terminate", "time": "2026-11-24T20:00:00Z"}"#;
        let n = parse_notice(NoticeKind::SpotInterruption, 200, body).ok().flatten();
        assert_eq!(
            n,
            Some(Notice { kind: NoticeKind::SpotInterruption, detail: "terminate at 2026-11-24T20:00:00Z".into() })
        );
        let hibernate = parse_notice(NoticeKind::SpotInterruption, 200, r#"{"action":"hibernate"}"#).ok().flatten();
        assert_eq!(hibernate.map(|n| n.detail), Some("hibernate".into()));
    }

    #[test]
    fn rebalance_notice() {
        let body = r#"{"noticeTime": "2026-11-24T19:58:00Z"}"#;
        let n = parse_notice(NoticeKind::Rebalance, 200, body).ok().flatten();
        assert_eq!(
            n,
            Some(Notice { kind: NoticeKind::Rebalance, detail: "recommended at 2026-11-24T19:58:00Z".into() })
        );
    }

    #[test]
    fn unreadable_body_is_still_a_notice() {
        let n = parse_notice(NoticeKind::SpotInterruption, 200, "not json").ok().flatten();
        assert_eq!(n.map(|n| n.kind), Some(NoticeKind::SpotInterruption));
        let n = parse_notice(NoticeKind::Rebalance, 200, "").ok().flatten();
        assert_eq!(n.map(|n| n.detail), Some("recommended".into()));
    }

    #[test]
    fn errors() {
        assert!(matches!(parse_notice(NoticeKind::Rebalance, 401, ""), Err(ImdsError::TokenRefused)));
        assert!(matches!(
            parse_notice(NoticeKind::SpotInterruption, 503, ""),
            Err(ImdsError::Status { path: SPOT_PATH, status: 503 })
        ));
    }

    #[test]
    fn detail_is_clamped_and_clean() {
        let body = format!(r#"{{"action": "terminate\nnow", "time": "{}"}}"#, "9".repeat(1000));
        let n = parse_notice(NoticeKind::SpotInterruption, 200, &body).ok().flatten();
        let detail = n.map(|n| n.detail).unwrap_or_default();
        assert_eq!(detail.chars().count(), MAX_DETAIL);
        assert!(detail.starts_with("terminatenow at 999"), "{detail}");
    }

    #[test]
    fn message_shape() {
        let n = Notice { kind: NoticeKind::Rebalance, detail: "recommended".into() };
        assert_eq!(n.to_msg(), AgentMsg::Interrupted { kind: "rebalance".into(), detail: "recommended".into() });
    }
}

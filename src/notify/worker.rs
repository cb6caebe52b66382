//! The two background loops: the planner turns outbox rows into deliveries, the sender sends
//! what is due and retries with backoff. Both poll the store, so they pick up where they were
//! after a restart, and neither is on the master loop's path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{email, github, irc, plan, webhook, Facts};
use crate::config::{Config, Notifier, NotifierKind};
use crate::core::{BuildId, Ts};
use crate::runtime::Shared;
use crate::store::{Delivery, StoreError};
use tokio_rustls::rustls::pki_types::CertificateDer;

/// The longest the loops sleep without news: what another process (a second master, an admin's
/// tool) wrote to the outbox is seen within this time.
const IDLE_LOOK: Duration = Duration::from_secs(30);
/// How long sent and given-up deliveries (and planned outbox rows) are kept, for the API.
const KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often old records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Tries before a delivery is given up (about 3 hours in all with the backoff below).
pub const MAX_ATTEMPTS: i64 = 14;

/// The wait before try number `attempts + 1`: 5 s doubling, at most 30 min. (Tests shorten
/// the first wait with `PADDOCK_NOTIFY_RETRY_MS`.)
pub fn backoff(attempts: i64) -> Duration {
    let first = std::env::var("PADDOCK_NOTIFY_RETRY_MS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(5_000);
    let ms = first.saturating_mul(1u64 << attempts.clamp(0, 20));
    Duration::from_millis(ms.min(30 * 60 * 1000))
}

/// Why the notifiers cannot start.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notifier {notifier}: environment variable {var} (its `{key}`) is not set")]
    MissingSecret { notifier: String, var: String, key: &'static str },
    #[error("notifier {notifier}: `ca_file` {path}: {why}")]
    CaFile { notifier: String, path: String, why: String },
    #[error("notifier {notifier}: {source}")]
    Tls { notifier: String, source: crate::tls::TlsError },
}

/// Checks every notifier's `ca_file`, as the master does at start.
pub fn check_ca_files(config: &Config) -> Result<(), NotifyError> {
    ca_files(config).map(|_| ())
}

fn ca_files(config: &Config) -> Result<HashMap<String, Vec<CertificateDer<'static>>>, NotifyError> {
    let mut cas = HashMap::new();
    for n in &config.notifiers {
        if let NotifierKind::Irc { ca_file: Some(path), .. }
        | NotifierKind::Email { ca_file: Some(path), .. }
        | NotifierKind::Webhook { ca_file: Some(path), .. }
        | NotifierKind::GitHub { ca_file: Some(path), .. } = &n.kind
        {
            let certs = crate::tls::read_ca_file(path).map_err(|why| NotifyError::CaFile {
                notifier: n.name.clone(),
                path: path.display().to_string(),
                why,
            })?;
            cas.insert(n.name.clone(), certs);
        }
    }
    Ok(cas)
}

/// The configured notifiers with their secrets read from the environment.
pub struct Notifiers {
    list: Vec<Notifier>,
    secrets: HashMap<String, Vec<u8>>,
    /// Repository name -> its URL (where a GitHub notifier finds `owner/name`).
    repos: HashMap<String, String>,
    /// Notifier name -> the CA certificates it trusts instead of the system's.
    cas: HashMap<String, Vec<CertificateDer<'static>>>,
    /// Webhook or GitHub notifier name -> its HTTP client (one shared by those trusting the
    /// system's CAs, its own for one with a `ca_file`).
    http: HashMap<String, reqwest::Client>,
    /// Each IRC notifier's bot, started with the workers.
    bots: std::sync::Mutex<HashMap<String, irc::IrcBot>>,
}

impl std::fmt::Debug for Notifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the secrets never reach a log.
        f.debug_struct("Notifiers").field("list", &self.list.iter().map(|n| &n.name).collect::<Vec<_>>()).finish()
    }
}

impl Notifiers {
    /// Reads each notifier's secret; a signing notifier without its secret is an error, so
    /// nothing goes out unsigned by mistake.
    pub fn from_config(config: &Config) -> Result<Notifiers, NotifyError> {
        let mut secrets = HashMap::new();
        for n in &config.notifiers {
            let (var, key) = match &n.kind {
                NotifierKind::Webhook { secret_env: Some(var), .. } => (var, "secret_env"),
                NotifierKind::GitHub { token_env, .. } => (token_env, "token_env"),
                NotifierKind::Irc { password_env: Some(var), .. }
                | NotifierKind::Email { password_env: Some(var), .. } => (var, "password_env"),
                _ => continue,
            };
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => {
                    secrets.insert(n.name.clone(), v.into_bytes());
                }
                _ => return Err(NotifyError::MissingSecret { notifier: n.name.clone(), var: var.clone(), key }),
            }
        }
        let cas = ca_files(config)?;
        // Built here, so the system's CA store is read at start like the `ca_file`s.
        let mut http = HashMap::new();
        let mut system: Option<reqwest::Client> = None;
        for n in &config.notifiers {
            if !matches!(n.kind, NotifierKind::Webhook { .. } | NotifierKind::GitHub { .. }) {
                continue;
            }
            let tls_error = |source| NotifyError::Tls { notifier: n.name.clone(), source };
            let client = match (cas.get(&n.name), &system) {
                (Some(ca), _) => crate::tls::http_client(Some(ca)).map_err(tls_error)?,
                (None, Some(client)) => client.clone(),
                (None, None) => system.insert(crate::tls::http_client(None).map_err(tls_error)?).clone(),
            };
            http.insert(n.name.clone(), client);
        }
        let repos = config.repos.iter().map(|r| (r.name.clone(), r.url.clone())).collect();
        Ok(Notifiers { list: config.notifiers.clone(), secrets, repos, cas, http, bots: Default::default() })
    }
}

/// Starts the IRC bots, the planner and the sender.
pub fn spawn(shared: Arc<Shared>, notifiers: Arc<Notifiers>) -> Vec<tokio::task::JoinHandle<()>> {
    if let Ok(mut bots) = notifiers.bots.lock() {
        for n in &notifiers.list {
            if let NotifierKind::Irc { host, port, tls, nick, channel, auth, .. } = &n.kind {
                let settings = irc::IrcSettings {
                    host: host.clone(),
                    port: *port,
                    tls: *tls,
                    nick: nick.clone(),
                    channel: channel.clone(),
                    auth: *auth,
                    roots: notifiers.cas.get(&n.name).cloned(),
                };
                let password = notifiers.secrets.get(&n.name).map(|p| String::from_utf8_lossy(p).to_string());
                let answers: Arc<dyn irc::Answers> = Arc::new(StoreAnswers { shared: shared.clone() });
                bots.insert(n.name.clone(), irc::IrcBot::start(settings, password, Some(answers)));
            }
        }
    }
    // The planner wakes the sender when it has planned deliveries.
    let planned = Arc::new(tokio::sync::Notify::new());
    let planner = {
        let (shared, notifiers, planned) = (shared.clone(), notifiers.clone(), planned.clone());
        let news = shared.store.news();
        tokio::spawn(async move {
            let mut pruned_at = tokio::time::Instant::now();
            loop {
                if pruned_at.elapsed() >= PRUNE_EVERY {
                    pruned_at = tokio::time::Instant::now();
                    let before = Ts(shared.now().0 - KEEP.as_millis() as i64);
                    match shared.store.prune_notifications(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(rows = n, "old notification records pruned"),
                        Err(e) => tracing::warn!("cannot prune old notification records: {e}"),
                    }
                }
                match plan_pending(&shared, &notifiers).await {
                    Ok(n) if n > 0 => {
                        // With no notifier nothing was planned: the sender has nothing new.
                        if !notifiers.list.is_empty() {
                            planned.notify_one();
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!("cannot plan notifications: {e}"),
                }
                // Until a build starts or ends (the store says so), or a last look. With no
                // notifier nothing is urgent: the rows are cleared at the look.
                tokio::select! {
                    () = news.notified(), if !notifiers.list.is_empty() => {}
                    () = tokio::time::sleep(IDLE_LOOK) => {}
                }
            }
        })
    };
    let sender = tokio::spawn(async move {
        loop {
            match send_due(&shared, &notifiers).await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::error!("cannot send notifications: {e}"),
            }
            // Until the next retry is due, new deliveries are planned, or a last look.
            let due = match shared.store.next_delivery_at().await {
                Ok(next) => next.as_deref().and_then(crate::cost::parse_ts).map(|t| t.since(shared.now())),
                Err(e) => {
                    tracing::error!("cannot read when the next notification is due: {e}");
                    None
                }
            };
            let wait = due.map_or(IDLE_LOOK, |d| d.min(IDLE_LOOK)).max(Duration::from_millis(100));
            tokio::select! {
                () = planned.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
    vec![planner, sender]
}

/// How far back `status` without a branch looks.
const STATUS_RECENT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Answers what people ask the IRC bots, from the store.
struct StoreAnswers {
    shared: Arc<Shared>,
}

impl irc::Answers for StoreAnswers {
    fn answer(&self, q: irc::Question) -> futures_util::future::BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            match answer(&self.shared, q).await {
                Ok(lines) => lines,
                Err(e) => {
                    tracing::warn!("cannot answer on IRC: {e}");
                    vec!["cannot look that up right now".to_string()]
                }
            }
        })
    }
}

async fn answer(shared: &Shared, q: irc::Question) -> Result<Vec<String>, StoreError> {
    let page = |id: BuildId| format!("{}/builds/{id}", shared.url.trim_end_matches('/'));
    Ok(match q {
        irc::Question::Help | irc::Question::Unknown(_) => {
            let lead = match q {
                irc::Question::Unknown(what) => format!("I do not know {what:?}. "),
                _ => String::new(),
            };
            vec![format!(
                "{lead}Ask me: status [BRANCH] (every builder's newest build), last BUILDER [BRANCH] \
                 (its newest result), help. Everything else: {}",
                shared.url
            )]
        }
        irc::Question::Status { branch } => {
            // Without a branch, only what was built lately: an old feature branch's last
            // failure is not today's news.
            let since = crate::core::Ts(shared.now().0 - STATUS_RECENT.as_millis() as i64);
            let since = crate::store::ts_string(since);
            let newest: Vec<_> = shared
                .store
                .latest_per_builder_branch()
                .await?
                .into_iter()
                .filter(|b| match &branch {
                    Some(br) => *br == b.branch,
                    None => b.queued_at >= since,
                })
                .collect();
            if newest.is_empty() {
                return Ok(vec![match branch {
                    Some(br) => format!("no builds on {br} yet"),
                    None => "no builds yet".to_string(),
                }]);
            }
            let failing: Vec<_> =
                newest.iter().filter(|b| matches!(b.state.as_str(), "failure" | "exception")).collect();
            let passing = newest.iter().filter(|b| b.state == crate::core::build::BuildState::Success).count();
            let building = newest.iter().filter(|b| b.state.is_live()).count();
            let mut lines = Vec::new();
            if failing.is_empty() {
                lines.push(format!("nothing failing: {passing} passing, {building} building"));
            } else {
                // As many as fit one IRC line whole (links must not be cut).
                let mut shown: Vec<String> = Vec::new();
                for b in &failing {
                    let item = format!("{} on {} ({})", b.builder, b.branch, page(b.id));
                    if shown.iter().map(|s| s.len() + 2).sum::<usize>() + item.len() > 300 {
                        break;
                    }
                    shown.push(item);
                }
                let more = failing.len().saturating_sub(shown.len());
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                lines.push(format!("failing: {}{more}", shown.join(", ")));
                lines.push(format!("{passing} passing, {building} building"));
            }
            lines
        }
        irc::Question::Last { builder, branch } => {
            let filter = crate::store::BuildFilter {
                builder: Some(builder.clone()),
                branch: branch.clone(),
                state: None,
                limit: Some(50),
            };
            let builds = shared.store.list_builds(&filter).await?;
            let done = ["success", "failure", "exception"];
            let Some(last) = builds.iter().find(|b| done.contains(&b.state.as_str())) else {
                let on = branch.map(|b| format!(" on {b}")).unwrap_or_default();
                return Ok(vec![format!("no finished build of {builder}{on}")]);
            };
            let by = shared.store.build_changes(last.id).await?.into_iter().map(|c| c.author).find(|a| !a.is_empty());
            let by = by.map(|a| format!(" by {a}")).unwrap_or_default();
            let short: String = last.revision.chars().take(10).collect();
            let mut line =
                format!("{} on {}: {} at {short}{by}: {}", last.builder, last.branch, last.state, page(last.id));
            if let Some(now) = builds.iter().find(|b| b.id > last.id && b.state.is_live()) {
                line.push_str(&format!(" (build {} is {})", now.id, now.state));
            }
            vec![line]
        }
    })
}

/// Turns up to 100 outbox rows into deliveries; returns how many rows it handled.
pub async fn plan_pending(shared: &Shared, notifiers: &Notifiers) -> Result<usize, StoreError> {
    let store = &shared.store;
    let events = store.pending_build_events(100).await?;
    if notifiers.list.is_empty() {
        // Nobody to tell: the rows are done with, in one write rather than one per row.
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        store.skip_build_events(&ids).await?;
        return Ok(events.len());
    }
    for ev in &events {
        let deliveries = match store.build(ev.build).await? {
            Some(build) => {
                let standing = match ev.kind.as_str() {
                    "finished" => store.standing(build.id).await?,
                    _ => Default::default(),
                };
                let mut committers: Vec<String> = Vec::new();
                for c in store.build_changes(build.id).await? {
                    if !c.author.is_empty() && !committers.contains(&c.author) {
                        committers.push(c.author);
                    }
                }
                let failing_step = store
                    .steps(build.id)
                    .await?
                    .into_iter()
                    .find(|s| matches!(s.state.as_str(), "failure" | "timeout" | "exception"))
                    .map(|s| s.name);
                let url = format!("{}/builds/{}", shared.url.trim_end_matches('/'), build.id);
                let mails = notifiers.list.iter().any(|n| {
                    matches!(n.kind, NotifierKind::Email { .. })
                        || n.template.as_deref().is_some_and(|t| t.contains("{log_tail}"))
                });
                let log_tail = match (mails, ev.kind.as_str()) {
                    (true, "finished") => log_tail(shared, build.id).await?,
                    _ => String::new(),
                };
                let facts = Facts {
                    build,
                    previous: standing.previous,
                    superseded: standing.superseded,
                    committers,
                    failing_step,
                    url,
                    log_tail,
                };
                plan(&notifiers.list, &ev.kind, &facts)
            }
            _ => Vec::new(),
        };
        store.plan_deliveries(ev.id, &deliveries, shared.now()).await?;
    }
    Ok(events.len())
}

/// Lines of the log a mail ends with.
const MAIL_LOG_LINES: usize = 40;

/// The last lines of a build's log (at most 8 KiB).
async fn log_tail(shared: &Shared, build: BuildId) -> Result<String, StoreError> {
    let (chunks, _) = shared.store.log_tail(build, 8 * 1024).await?;
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines[lines.len().saturating_sub(MAIL_LOG_LINES)..].join("\n"))
}

/// Sends the deliveries due now, each notifier's in order and the notifiers side by side (a
/// receiver that hangs holds up only its own messages); returns how many it tried.
pub async fn send_due(shared: &Shared, notifiers: &Notifiers) -> Result<usize, StoreError> {
    let due = shared.store.due_deliveries(shared.now(), 50).await?;
    let mut by_notifier: Vec<(String, Vec<&Delivery>)> = Vec::new();
    for d in &due {
        match by_notifier.iter_mut().find(|(n, _)| *n == d.notifier) {
            Some((_, list)) => list.push(d),
            None => by_notifier.push((d.notifier.clone(), vec![d])),
        }
    }
    let sends = by_notifier.into_iter().map(|(name, list)| async move {
        for d in list {
            let outcome = match notifiers.list.iter().find(|n| n.name == name) {
                None => Err(webhook::SendError::Refused("the notifier is no longer configured".into())),
                Some(n) => deliver(n, notifiers, d).await,
            };
            record(shared, d, outcome).await?;
        }
        Ok::<(), StoreError>(())
    });
    for r in futures_util::future::join_all(sends).await {
        r?;
    }
    Ok(due.len())
}

async fn deliver(n: &Notifier, notifiers: &Notifiers, d: &Delivery) -> Result<(), webhook::SendError> {
    let secret = notifiers.secrets.get(&n.name).map(Vec::as_slice);
    let http = || {
        // Every webhook and GitHub notifier has one, made at start.
        notifiers.http.get(&n.name).ok_or_else(|| webhook::SendError::Refused("no HTTP client for the notifier".into()))
    };
    match &n.kind {
        NotifierKind::Webhook { url, .. } => webhook::send(http()?, url, secret, d.id, &d.event, &d.payload).await,
        NotifierKind::GitHub { api_url, repository, .. } => {
            let payload: serde_json::Value = serde_json::from_str(&d.payload)
                .map_err(|e| webhook::SendError::Refused(format!("unreadable stored message: {e}")))?;
            let repo = payload["build"]["repo"].as_str().unwrap_or_default();
            let host = github::repo_host(api_url);
            let slug = repository.clone().or_else(|| notifiers.repos.get(repo).and_then(|u| github::slug_of(u, &host)));
            let Some(slug) = slug else {
                return Err(webhook::SendError::Refused(format!(
                    "repository {repo}'s URL is not on {host}; set `repository` on the notifier"
                )));
            };
            github::send(http()?, api_url, secret.unwrap_or_default(), &slug, &payload).await
        }
        NotifierKind::Email { host, port, security, from, username, .. } => {
            let payload: serde_json::Value = serde_json::from_str(&d.payload)
                .map_err(|e| webhook::SendError::Refused(format!("unreadable stored message: {e}")))?;
            let to: Vec<String> = payload["recipients"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let smtp = email::Smtp {
                host,
                port: *port,
                security: *security,
                username: username.as_deref(),
                password: secret,
                roots: notifiers.cas.get(&n.name).map(Vec::as_slice),
            };
            let subject = payload["subject"].as_str().unwrap_or_default();
            email::send(&smtp, from, &to, subject, payload["text"].as_str().unwrap_or_default()).await
        }
        NotifierKind::Irc { .. } => {
            let bot = notifiers.bots.lock().ok().and_then(|b| b.get(&n.name).cloned());
            let Some(bot) = bot else {
                return Err(webhook::SendError::Retry("the IRC bot is not running".into()));
            };
            let payload: serde_json::Value = serde_json::from_str(&d.payload)
                .map_err(|e| webhook::SendError::Refused(format!("unreadable stored message: {e}")))?;
            bot.say(payload["text"].as_str().unwrap_or_default()).await
        }
    }
}

async fn record(shared: &Shared, d: &Delivery, outcome: Result<(), webhook::SendError>) -> Result<(), StoreError> {
    let now = shared.now();
    match outcome {
        Ok(()) => {
            tracing::info!(notifier = %d.notifier, build = d.build.get(), event = %d.event, "notification sent");
            shared.store.delivery_sent(d.id, now).await
        }
        Err(webhook::SendError::Retry(why)) if d.attempts + 1 < MAX_ATTEMPTS => {
            let wait = backoff(d.attempts);
            tracing::warn!(notifier = %d.notifier, build = d.build.get(), retry_in = ?wait, "notification failed: {why}");
            shared.store.delivery_failed(d.id, &why, Some(Ts(now.0 + wait.as_millis() as i64))).await
        }
        Err(e) => {
            tracing::error!(notifier = %d.notifier, build = d.build.get(), attempts = d.attempts + 1, "notification given up: {e}");
            shared.store.delivery_failed(d.id, &e.to_string(), None).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_half_an_hour() {
        assert_eq!(backoff(0), Duration::from_secs(5));
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(5), Duration::from_secs(160));
        assert_eq!(backoff(9), Duration::from_secs(1800));
        assert_eq!(backoff(60), Duration::from_secs(1800));
    }
}

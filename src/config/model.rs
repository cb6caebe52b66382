//! The validated, expanded configuration that the rest of Paddock reads.
//!
//! These types are what `config::load` returns after parsing, validation and matrix expansion;
//! nothing downstream ever sees raw TOML.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the configuration was read from (relative paths resolve against its folder).
    pub path: PathBuf,
    pub master: Master,
    pub repos: Vec<Repo>,
    /// Pools by name, in the order they appear.
    pub pools: Vec<Pool>,
    /// `[cost]`: caps over all pools together.
    pub cost: CostSettings,
    /// `[web]`: who may look without logging in, how long a login lasts.
    pub web: Web,
    /// `[[notifier]]`s: who hears about builds, and when.
    pub notifiers: Vec<Notifier>,
    /// Builders after matrix expansion, in config order then matrix order.
    pub builders: Vec<Builder>,
    pub schedulers: Vec<Scheduler>,
}

/// `[master]`: how the master listens, where it stores state and finds secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct Master {
    /// What agents connect back to; the API and UI are served here too. Default `http://127.0.0.1:8010`.
    pub url: String,
    /// Address to bind; default derived from `url` (host:port).
    pub listen: String,
    /// Database URL (`sqlite://FILE`). Default `sqlite://paddock.db` (relative to the config's folder).
    pub database: String,
    /// Folder for mirrors and local worker directories. Default `paddock-state` beside the config.
    pub state_dir: PathBuf,
    /// Optional secrets file (TOML `NAME = "value"`), must not be readable by group/others.
    pub secrets_file: Option<PathBuf>,
    /// `tls_cert` and `tls_key`: when set, the master serves HTTPS itself (and only HTTPS).
    pub tls: Option<TlsFiles>,
    /// Name of the environment variable holding the GitHub webhook secret. Default `PADDOCK_GITHUB_SECRET`.
    pub github_secret_env: String,
    /// Agents that miss heartbeats for this long are lost. Default 30s.
    pub heartbeat_timeout: Duration,
    /// How long running builds may take to finish on SIGINT/SIGTERM. Default 60s.
    pub shutdown_grace: Duration,
    /// On PostgreSQL: how long the farm's lease lasts unless renewed (renewed every fifth of
    /// it); a standby master takes over within this of the active one's death. Default 15s.
    pub lease_ttl: Duration,
    /// Tags every cloud machine this master owns (`paddock:cluster`); two masters sharing an
    /// account must differ. Default `paddock`.
    pub cluster: String,
    /// How often the cloud's listing is compared with the store. Default 60s.
    pub reconcile_interval: Duration,
    /// How long a tagged machine the store does not know may live before it is terminated as
    /// an orphan, and how long a launched machine may be missing from listings before it
    /// counts as gone. Default 120s.
    pub orphan_grace: Duration,
    /// How `paddock run` writes its log (`--log-format` wins). Default text.
    pub log_format: crate::logging::LogFormat,
}

/// The PEM files the master serves HTTPS with (paths relative to the config's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls_cert`: the server's certificate chain, its own certificate first.
    pub cert: PathBuf,
    /// `tls_key`: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Master {
    /// The SQLite database file, when `database` names one (not `:memory:`, not PostgreSQL).
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        let rest = self.database.strip_prefix("sqlite://").or_else(|| self.database.strip_prefix("sqlite:"))?;
        let file = rest.split('?').next().unwrap_or("");
        (!file.is_empty() && !file.starts_with(':')).then(|| PathBuf::from(file))
    }
}

/// `[[repo]]`: a git repository that changes come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Repo {
    pub name: String,
    /// Any git URL, local paths and file:// included. Relative paths resolve against the config's folder.
    pub url: String,
    /// Branch names or glob patterns to watch. Default `["main"]`.
    pub branches: Vec<String>,
    /// Poll interval; `None` when `poll = "0s"` or `poll = false`-equivalent (webhook only). Default 60s.
    pub poll: Option<Duration>,
}

/// Which backend starts a pool's machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionerKind {
    /// A child process running `paddock agent`.
    Local,
    /// An EC2 instance bootstrapped by cloud-init.
    Ec2(Box<paddock_provisioners::ec2::Ec2Settings>),
}

/// `[pool.NAME]`: a set of interchangeable machines.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub provisioner: ProvisionerKind,
    /// Default 4.
    pub max_instances: u32,
    /// Default 0.
    pub min_idle: u32,
    /// Default 5m.
    pub idle_timeout: Duration,
    /// Default 5m.
    pub boot_timeout: Duration,
    /// Builds per machine before it is stopped; 0 = unlimited (default), 1 = ephemeral.
    pub max_builds: u32,
    /// Local provisioner only: the agent binary to start. Default: the running `paddock` binary.
    pub agent_command: Option<PathBuf>,
    /// Local provisioner only: how machines are kept from the master's files and processes.
    /// Default [`Isolation::Sandbox`].
    pub isolation: Isolation,
    /// Local provisioner only: the unprivileged OS user machines run as. Required when the
    /// master runs as root (checked at start, with the user's existence).
    pub run_as: Option<String>,
    /// USD per hour for every machine of the pool (overrides the price table; for local
    /// machines a nominal price, default 0).
    pub hourly_price: Option<f64>,
    /// USD per hour per instance type (overrides `hourly_price` and the price table).
    pub prices: BTreeMap<String, f64>,
    /// Spend caps of this pool.
    pub spend: SpendCaps,
}

/// `isolation` of a local pool: what a build step on one of its machines can reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Isolation {
    /// A bubblewrap sandbox: the host read-only, the master's files and other machines hidden,
    /// no process outside the machine visible.
    #[default]
    Sandbox,
    /// No sandbox: steps run as the master's user, with access to everything it can reach.
    None,
}

impl Isolation {
    /// The config's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Sandbox => "sandbox",
            Isolation::None => "none",
        }
    }
}

/// Spend caps (USD): no machine is launched while the spend of the current UTC hour or day
/// has reached one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpendCaps {
    pub hourly: Option<f64>,
    pub daily: Option<f64>,
}

impl SpendCaps {
    /// Whether any cap is set.
    pub fn any(&self) -> bool {
        self.hourly.is_some() || self.daily.is_some()
    }
}

/// `[cost]`: settings over every pool.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostSettings {
    /// Caps over all pools together.
    pub spend: SpendCaps,
}

/// A `[[notifier]]`: where messages about builds go, on which events, for which builds.
#[derive(Debug, Clone, PartialEq)]
pub struct Notifier {
    /// Unique; default: the kind.
    pub name: String,
    pub kind: NotifierKind,
    /// When it speaks.
    pub events: Vec<NotifyOn>,
    /// Builder name globs; empty: every builder.
    pub builders: Vec<String>,
    /// Branch globs; empty: every branch.
    pub branches: Vec<String>,
    /// Message text with `{builder}`, `{branch}`, `{result}`, … (see
    /// [`crate::config::template::FIELDS`]); default: a short line per event.
    pub template: Option<String>,
}

/// Where a notifier delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum NotifierKind {
    /// A JSON POST to `url`, signed with HMAC-SHA256 when `secret_env` names a variable that
    /// holds the key.
    Webhook {
        url: String,
        secret_env: Option<String>,
        /// PEM file of the CA certificates to trust instead of the system's (an https:// `url`
        /// with a private CA).
        ca_file: Option<PathBuf>,
    },
    /// An IRC bot in one channel.
    Irc {
        /// Host name of the server.
        host: String,
        /// Default 6697 with TLS, 6667 without.
        port: u16,
        tls: bool,
        /// Default `paddock`.
        nick: String,
        /// `#name`.
        channel: String,
        /// Environment variable holding the nick's password, if it has one.
        password_env: Option<String>,
        /// How the password is used: SASL (default) or NickServ.
        auth: IrcAuth,
        /// PEM file of the CA certificates to trust instead of the system's (a private CA).
        ca_file: Option<PathBuf>,
    },
    /// Mail over SMTP to the build's committers and fixed lists.
    Email {
        host: String,
        port: u16,
        security: SmtpSecurity,
        /// `Name <address>` or an address.
        from: String,
        /// Addresses always mailed.
        to: Vec<String>,
        /// Also mail the authors of the build's changes. Default true.
        committers: bool,
        /// Mail only the authors whose address is in one of these domains (lowercase); empty:
        /// any. Commit metadata is written by whoever pushes, so this keeps logs in-house.
        committer_domains: Vec<String>,
        /// SMTP login, with the password in `password_env`.
        username: Option<String>,
        password_env: Option<String>,
        /// Subject template; default `{builder} on {branch}: {result}`.
        subject: String,
        /// PEM file of the CA certificates to trust instead of the system's (a private CA).
        ca_file: Option<PathBuf>,
    },
    /// GitHub commit statuses: pending when a build starts, then success, failure or error.
    GitHub {
        /// API base, default `https://api.github.com` (GitHub Enterprise: `https://HOST/api/v3`).
        api_url: String,
        /// Environment variable holding the token (needs the `repo:status` scope).
        token_env: String,
        /// `owner/name` for every build; default: read from each repository's GitHub URL.
        repository: Option<String>,
        /// The status's context, a template; default `paddock/{builder}`.
        context: String,
        /// PEM file of the CA certificates to trust instead of the system's (GitHub Enterprise
        /// with a private CA).
        ca_file: Option<PathBuf>,
    },
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// STARTTLS (port 587 by default).
    StartTls,
    /// TLS from the first byte (port 465 by default).
    Tls,
    /// Plain text (port 25 by default; for a relay on the same host or network).
    None,
}

/// The events a notifier can speak on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyOn {
    /// A build started running.
    Started,
    /// A build ended (success, failure, exception or cancelled).
    Finished,
    /// A build's result differs from the previous one of its builder and branch (passing to
    /// failing or back), or a first build fails.
    Transition,
}

impl NotifyOn {
    /// The config's and the store's name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOn::Started => "started",
            NotifyOn::Finished => "finished",
            NotifyOn::Transition => "transition",
        }
    }
}

/// `[web]`: access to the UI and the read side of the API.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Web {
    /// `access = "public"` (default): anyone may read builds, logs, changes, builders, pools and
    /// machines; `"login"`: nothing without a session or an API token.
    pub public: bool,
    /// How long a browser login lasts. Default 14 days.
    pub session_lifetime: Duration,
}

impl Default for Web {
    fn default() -> Self {
        Web { public: true, session_lifetime: Duration::from_secs(14 * 24 * 3600) }
    }
}

/// One step of a builder, with every `{axis}` already substituted.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Default: the command itself, shortened.
    pub name: String,
    /// Shell command (run with `sh -c`). May contain `{secret:NAME}` references.
    pub run: String,
    /// Extra environment; values may contain `{secret:NAME}`.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the checkout. Default: the checkout.
    pub workdir: Option<String>,
    /// Per-step timeout. Default 1h.
    pub timeout: Duration,
    /// Run even when an earlier step failed.
    pub always: bool,
}

/// One builder after matrix expansion.
#[derive(Debug, Clone, PartialEq)]
pub struct Builder {
    /// Expanded name, e.g. `py3.12-sqlite`.
    pub name: String,
    pub repo: String,
    pub pool: String,
    /// Branch globs this builder may build; empty = any.
    pub branches: Vec<String>,
    /// The matrix cell that produced it (axis -> value); empty for a plain builder.
    pub cell: BTreeMap<String, String>,
    /// Environment for every step (after templating).
    pub env: BTreeMap<String, String>,
    pub steps: Vec<Step>,
}

/// What kind of scheduler, with its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerKind {
    /// One request per (builder, branch) per interesting change.
    Branch {
        /// Fold a burst of commits inside this window into one build of the newest.
        tree_stable: Option<Duration>,
        /// Only changes touching at least one of these globs trigger (empty = all).
        files: Vec<String>,
        /// Changes touching only these globs do not trigger.
        ignore: Vec<String>,
    },
    /// Builds on a cron schedule (UTC, 5 fields).
    Nightly {
        cron: String,
        /// Skip a branch whose head did not change since the last nightly.
        only_if_changed: bool,
    },
}

/// `[[scheduler]]`: decides which changes become build requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduler {
    /// Default `<kind>-<index>`.
    pub name: String,
    pub repo: String,
    /// Branch globs this scheduler listens to; empty = all the repo's branches.
    pub branches: Vec<String>,
    /// Expanded builder names (globs in the file resolved against the expanded builders).
    pub builders: Vec<String>,
    pub kind: SchedulerKind,
}

impl Config {
    /// The builder with this expanded name.
    pub fn builder(&self, name: &str) -> Option<&Builder> {
        self.builders.iter().find(|b| b.name == name)
    }
    /// The pool with this name.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
    /// The repository with this name.
    pub fn repo(&self, name: &str) -> Option<&Repo> {
        self.repos.iter().find(|r| r.name == name)
    }
}

/// How an IRC bot proves its nick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrcAuth {
    /// SASL PLAIN during registration.
    Sasl,
    /// `PRIVMSG NickServ :IDENTIFY …` once registered.
    NickServ,
}

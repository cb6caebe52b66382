//! The runtime shell: tokio tasks around the sans-IO core.
//!
//! One loop owns the [`Fleet`] and the [`Schedulers`]. Everything else (the web server, agent
//! connections, pollers, provisioner calls) talks to it through one bounded channel of
//! [`Input`]s. The loop persists what an action intends, then carries it out, and feeds the
//! outcome back as an event: that is what keeps a crash from losing or duplicating work.

mod execute;
pub mod handle;
pub mod ingest;
pub mod isolation;
pub mod job;
pub mod lease;
mod lifecycle;
mod main_loop;
pub mod poller;
mod recovery;
pub mod running;
pub mod secrets;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paddock_provisioners::ec2::{Ec2Provisioner, Ec2Regions};
use paddock_provisioners::{LaunchSpec, Launched, Provisioner};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::agent::protocol::MasterMsg;
use crate::clock::Clock;
use crate::config::{Config, ProvisionerKind};
use crate::core::fleet::{
    recovery, Fleet, FleetAction, FleetEvent, LeftOver, Liveness, MachineState, Recovery, StopRefused,
};
use crate::core::reconcile::{Believed, Listed, Reconciler, Verdict};
use crate::core::scheduler::{ChangeInfo, SchedAction, SchedEvent, Schedulers};
use crate::core::{BuildId, MachineId, Ts};
use crate::store::{BuildRow, ChangeRow, Store, StoreError};
use secrets::Secrets;

/// Why the master could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("invalid scheduler: {0}")]
    Scheduler(#[from] crate::core::scheduler::SpecError),
    #[error(transparent)]
    Tls(#[from] crate::web::tls::TlsError),
    #[error(transparent)]
    Notify(#[from] crate::notify::worker::NotifyError),
    #[error(transparent)]
    Isolation(#[from] isolation::IsolationError),
}

/// What the loop is told, by everyone else (through its [`handle::LoopHandle`]).
#[derive(Debug)]
pub(crate) enum Input {
    /// A fleet event from an agent connection or a timer.
    Fleet(FleetEvent),
    /// A change or a branch head from a poller or a webhook (already stored).
    Sched(SchedEvent),
    /// An agent authenticated; this is how to reach it, over connection `conn`. `resumed` is
    /// `Some(build it speaks of)` when it reconnected with a resume token.
    AgentConnected {
        machine: MachineId,
        conn: u64,
        tx: mpsc::UnboundedSender<MasterMsg>,
        resumed: Option<Option<BuildId>>,
    },
    /// Connection `conn` of a machine's agent closed.
    AgentClosed { machine: MachineId, conn: u64 },
    /// A provisioner call to launch a machine returned, or a machine whose launch outcome was
    /// unknown was found (or is known never to have started).
    Launched { machine: MachineId, result: LaunchOutcome },
    /// A provisioner call to stop a machine returned.
    Terminated { machine: MachineId },
    /// A reconcile round's listing of one scope (a region and cluster, or a local pool), or
    /// why it could not be had.
    Listing { scope: String, listed_at: Ts, result: Result<Vec<Listed>, String> },
    /// The late instance of a machine already gone was terminated at `stopped_at`: it is
    /// billed to the machine.
    LateInstance { machine: MachineId, launched: Launched, stopped_at: Ts },
    /// A spend check's answer: which caps are reached and which pools they hold.
    SpendChecked(Result<crate::cost::caps::Caps, String>),
    /// An agent's reports that end with its build's end (the first follows report `after`;
    /// the last one's effect is `BuildFinished`): the loop stores them, ends the attempt as
    /// the lifecycle decides, and frees the machine.
    Finished {
        machine: MachineId,
        build: BuildId,
        after: u64,
        reports: Vec<crate::store::Report>,
        reply: tokio::sync::oneshot::Sender<Result<crate::store::Applied, StoreError>>,
    },
    /// An agent said its machine is being taken away (a spot notice, a shutdown): `detail` is
    /// recorded and its build retried; the answer comes once the loop has acted.
    Interrupted { machine: MachineId, detail: String, reply: tokio::sync::oneshot::Sender<()> },
    /// Someone asked for a build (force or rebuild): the loop stores and queues it, unless the
    /// master is shutting down.
    Request { request: NewRequest, reply: tokio::sync::oneshot::Sender<Result<BuildRow, ActionError>> },
    /// Someone asked to cancel a build; the answer says what became of it.
    Cancel { build: BuildId, by: String, reply: tokio::sync::oneshot::Sender<Result<Cancelled, ActionError>> },
    /// An admin asked to stop a machine (its build, if any, is retried elsewhere).
    StopMachine { machine: MachineId, by: String, reply: tokio::sync::oneshot::Sender<Result<(), ActionError>> },
    /// An admin pauses or resumes a pool: recorded, then applied, in the loop's order (so two
    /// admins at once cannot leave the record and the fleet disagreeing).
    Pause { pool: String, paused: bool, by: String, reply: tokio::sync::oneshot::Sender<Result<(), ActionError>> },
}

/// A build asked for by someone (forced, or a rebuild): what to build and why.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub builder: String,
    pub repo: String,
    pub branch: String,
    pub revision: String,
    /// What made it: `force` or `rebuild`.
    pub scheduler: &'static str,
    pub reason: String,
    pub changes: Vec<crate::core::ChangeId>,
}

/// How a launch ended, as far as the master can tell.
#[derive(Debug)]
pub enum LaunchOutcome {
    /// The machine is up (or starting).
    Up(Launched),
    /// No machine was started.
    Failed(String),
    /// A machine may have been started (no answer, a lost answer): it must be looked up.
    Unknown(String),
    /// Looked up after the fact, the machine had already stopped: it ran, and is billed.
    Ran(Launched),
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The build had not started: it is cancelled.
    Queued,
    /// The build is running: its agent was told to stop it and reports it `cancelled`.
    Stopping,
}

/// Why an action asked of the loop was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    NotFound(String),
    /// The thing is in a state where the action makes no sense (a finished build, a machine
    /// already stopping).
    #[error("{0}")]
    Conflict(String),
    /// The master is shutting down and takes no new work.
    #[error("master is shutting down")]
    Stopping,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub use crate::agent::protocol::MAX_LOG_BYTES;

/// State shared by the loop, the web handlers and the pollers.
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    /// The master's URL as agents reach it (with the real port when configured as 0).
    pub url: String,
    /// The loop's handle: the only way to ask the loop for anything.
    pub master: handle::LoopHandle,
    /// The builds running now, for the agent sockets.
    pub running: running::RunningBuilds,
    pub secrets: Secrets,
    /// Serialises mirror updates per repository (poller and webhooks share the mirror).
    pub repo_locks: HashMap<String, tokio::sync::Mutex<()>>,
    /// Set once shutdown began: no new builds are accepted.
    pub draining: AtomicBool,
    /// Set once the loop has stopped and the web server is closing: open streams end.
    pub web_closing: AtomicBool,
    /// Pools that may not launch because a spend cap is reached, and why.
    pub spend_holds: Mutex<HashMap<String, String>>,
    /// Recent failed logins, to slow down password guessing.
    pub login_throttle: Mutex<crate::web::throttle::LoginThrottle>,
}

impl Shared {
    /// State for unit tests of the pieces around the loop: nothing running, no secrets, no
    /// repositories; `inputs` is the loop's inbox.
    #[cfg(test)]
    pub(crate) fn for_test(config: Config, store: Store, clock: Arc<dyn Clock>, inputs: mpsc::Sender<Input>) -> Shared {
        Shared {
            config: Arc::new(config),
            store,
            clock,
            url: "http://127.0.0.1:0".into(),
            master: handle::LoopHandle::new(inputs),
            running: running::RunningBuilds::default(),
            secrets: Secrets::default(),
            repo_locks: HashMap::new(),
            draining: AtomicBool::new(false),
            web_closing: AtomicBool::new(false),
            spend_holds: Mutex::new(HashMap::new()),
            login_throttle: Default::default(),
        }
    }

    /// Current time from the injected clock.
    pub fn now(&self) -> Ts {
        self.clock.now()
    }
    /// Where the bare mirror of `repo` lives.
    pub fn mirror_dir(&self, repo: &str) -> PathBuf {
        self.config.master.state_dir.join("mirrors").join(format!("{repo}.git"))
    }
    /// Holds the lock that serialises updates of `repo`'s mirror and branch heads.
    pub async fn lock_repo(&self, repo: &str) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.repo_locks.get(repo) {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }
}

/// Options that are not in the config file.
pub struct RunOptions {
    /// The program local machines run as `PROGRAM agent …` (default: this executable).
    pub agent_program: PathBuf,
    pub clock: Arc<dyn Clock>,
    /// Told the bound address once the master listens.
    pub on_ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    /// Provisioners to use instead of the config's, by pool name (an in-process fake in
    /// tests); pools not named here get the one their config says.
    pub provisioners: HashMap<String, Arc<dyn Provisioner>>,
}

impl RunOptions {
    /// The config's own provisioners for every pool, this executable as the agent program,
    /// on `clock`.
    pub fn new(agent_program: PathBuf, clock: Arc<dyn Clock>) -> RunOptions {
        RunOptions { agent_program, clock, on_ready: None, provisioners: HashMap::new() }
    }
}

/// Runs the master until `shutdown` completes, then drains: running builds get the configured
/// grace period, machines are stopped, and the function returns.
pub async fn run(
    config: Config,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let config = Arc::new(config);
    isolation::protect_files(&config)?;
    let store = Store::open(&config.master.database).await?;
    // On PostgreSQL several masters may share the database: one acts for the farm, the others
    // wait here as standbys (not listening yet) until its lease is theirs.
    let mut shutdown = Box::pin(shutdown);
    let lease = match store.backend() {
        "postgres" => {
            let me = lease::Identity::of_this_process();
            let held = tokio::select! {
                held = lease::acquire(&store, &me, &config.master.url, config.master.lease_ttl) => held?,
                // A standby asked to stop has nothing to hand over.
                () = &mut shutdown => {
                    let _ = store.master_stopped(&me.id).await;
                    tracing::info!("standby master stopped");
                    return Ok(());
                }
            };
            store.set_fence(Some(held.fence.clone()));
            let renewer = lease::spawn_renewer(
                store.clone(),
                me.clone(),
                held.clone(),
                config.master.lease_ttl,
                config.master.url.clone(),
            );
            Some((me, held, renewer))
        }
        _ => None,
    };
    let secrets = Secrets::load(config.master.secrets_file.as_deref())?;
    let notifiers = Arc::new(crate::notify::worker::Notifiers::from_config(&config)?);
    let tls = config.master.tls.as_ref().map(crate::web::tls::server_config).transpose()?;
    let limits = crate::web::serve::Limits::from_env();
    crate::web::serve::raise_fd_limit(limits.max_connections);
    let listener = tokio::net::TcpListener::bind(&config.master.listen)
        .await
        .map_err(|source| MasterError::Listen { addr: config.master.listen.clone(), source })?;
    let addr =
        listener.local_addr().map_err(|source| MasterError::Listen { addr: config.master.listen.clone(), source })?;
    let url = effective_url(&config.master.url, addr);
    let (tx, rx) = mpsc::channel(1024);
    let shared = Arc::new(Shared {
        store: store.clone(),
        clock: opts.clock.clone(),
        url: url.clone(),
        master: handle::LoopHandle::new(tx),
        running: running::RunningBuilds::default(),
        secrets,
        repo_locks: config.repos.iter().map(|r| (r.name.clone(), tokio::sync::Mutex::new(()))).collect(),
        draining: AtomicBool::new(false),
        web_closing: AtomicBool::new(false),
        spend_holds: Mutex::new(HashMap::new()),
        login_throttle: Default::default(),
        config: config.clone(),
    });

    let mut provisioners: HashMap<String, Arc<dyn Provisioner>> = HashMap::new();
    let regions = Ec2Regions::default();
    let mut given = opts.provisioners;
    for pool in &config.pools {
        if let Some(p) = given.remove(&pool.name) {
            provisioners.insert(pool.name.clone(), p);
            continue;
        }
        let p: Arc<dyn Provisioner> = match &pool.provisioner {
            ProvisionerKind::Local => {
                let program = pool.agent_command.clone().unwrap_or_else(|| opts.agent_program.clone());
                Arc::new(isolation::local_provisioner(&config, pool, program).await?)
            }
            ProvisionerKind::Ec2(settings) => {
                let api = regions.api(settings.region.as_deref(), settings.endpoint_url.as_deref()).await;
                Arc::new(Ec2Provisioner::new(api, (**settings).clone(), &config.master.cluster, &pool.name))
            }
        };
        provisioners.insert(pool.name.clone(), p);
    }

    let mut master = Master::new(shared.clone(), provisioners, rx).await?;
    master.recover().await?;

    let https = tls.is_some();
    let server = crate::web::serve::spawn(listener, crate::web::router(shared.clone()), tls, limits);
    tracing::info!(%url, https, "master listening");
    if let Some(ready) = opts.on_ready {
        let _ = ready.send(addr);
    }
    let mut pollers = poller::spawn_all(shared.clone());
    pollers.extend(crate::notify::worker::spawn(shared.clone(), notifiers));

    master.run_loop(shutdown).await?;
    // The loop is over: requests still waiting on it (an action's reply) hear so at once.
    drop(master);

    for p in pollers {
        p.abort();
    }
    shared.web_closing.store(true, Ordering::SeqCst);
    // Open responses (a live log, a slow client) get a moment to end; then the server goes.
    server.shutdown(WEB_STOP_GRACE).await;
    if let Some((me, held, renewer)) = lease {
        // Handed over at once: a standby need not wait for the lease to expire.
        renewer.abort();
        if let Err(e) = store.release_lease(&held.fence).await {
            tracing::warn!(error = %e, "cannot give the farm's lease up; a standby takes it when it expires");
        }
        let _ = store.master_stopped(&me.id).await;
    }
    tracing::info!("master stopped");
    Ok(())
}

/// This UTC hour's and day's spend, compared with the caps.
async fn spend_caps(shared: &Shared) -> Result<crate::cost::caps::Caps, StoreError> {
    use crate::cost::caps;
    let now = shared.now();
    let hour = crate::cost::spend(&shared.store, caps::hour_start(now), now).await?;
    let day = crate::cost::spend(&shared.store, caps::day_start(now), now).await?;
    Ok(caps::evaluate(&shared.config, &hour, &day, now))
}

/// The URL agents use: the configured one, with the bound port when it says port 0.
fn effective_url(configured: &str, addr: SocketAddr) -> String {
    let trimmed = configured.trim_end_matches('/');
    match trimmed.strip_suffix(":0") {
        Some(base) => format!("{base}:{}", addr.port()),
        None => trimmed.to_string(),
    }
}

/// How often spend is compared with the caps (when any is set): a launch may overshoot a cap
/// by what is spent in this time.
const SPEND_CHECK: Duration = Duration::from_secs(2);

/// The longest the loop sleeps with nothing due (a wall clock may be stepped meanwhile).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// How often a draining master looks whether its running builds have ended.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// How long open HTTP responses may take to end once the master has stopped.
const WEB_STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a provisioner's launch call may take; past it, its outcome is unknown (the call may
/// still start a machine) and the machine is looked up by its id.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Time between two lookups of a machine whose launch outcome is unknown.
const RESOLVE_POLL: Duration = Duration::from_secs(3);

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Hashes a presented agent token the way the store keeps it.
pub fn token_hash(token: &str) -> String {
    hash_token(token)
}

/// A fresh random token (32 bytes, hex).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A machine of the previous run still running a build, found at start-up.
pub(super) struct Adoption {
    machine: crate::store::MachineRow,
    build: BuildRow,
    pid: String,
    secrets: Vec<(String, String)>,
    /// How far the build's reports are stored, and its log's size.
    applied: u64,
    log_bytes: usize,
}

/// The loop's own state: the core machines plus what is needed to reach the outside.
struct Master {
    shared: Arc<Shared>,
    fleet: Fleet,
    sched: Schedulers,
    provisioners: HashMap<String, Arc<dyn Provisioner>>,
    rx: mpsc::Receiver<Input>,
    /// Connected agents the fleet accepted: connection id and sender.
    agents: HashMap<MachineId, (u64, mpsc::UnboundedSender<MasterMsg>)>,
    /// An agent connection waiting for the fleet's accept or refuse.
    connecting: HashMap<MachineId, (u64, mpsc::UnboundedSender<MasterMsg>)>,
    pending: VecDeque<FleetEvent>,
    /// (scheduler, change) pairs requested before a crash, for changes replayed at start.
    already_requested: HashSet<(String, crate::core::ChangeId)>,
    /// One reconciler per scope (see [`Provisioner::scope`]).
    reconcilers: HashMap<String, Reconciler>,
    /// Scopes whose listing is under way, so a slow cloud never gets two at once.
    listing: HashSet<String>,
    /// Spend caps reached at the last check (to warn once per crossing).
    caps_reached: HashSet<String>,
    /// A spend check is under way.
    spend_checking: bool,
}

impl Master {
    pub(super) async fn new(
        shared: Arc<Shared>,
        provisioners: HashMap<String, Arc<dyn Provisioner>>,
        rx: mpsc::Receiver<Input>,
    ) -> Result<Master, MasterError> {
        let config = &shared.config;
        let pools = config.pool_specs();
        let first_id = shared.store.max_machine_id().await?.next();
        let fleet = Fleet::new(pools, config.master.heartbeat_timeout, first_id);
        let specs = config.scheduler_specs();
        let mut sched = Schedulers::new(specs, shared.now())?;
        for n in shared.store.nightly_states().await? {
            sched.restore_nightly(&n.name, n.last_fire, n.built);
        }
        Ok(Master {
            shared,
            fleet,
            sched,
            provisioners,
            rx,
            agents: HashMap::new(),
            connecting: HashMap::new(),
            pending: VecDeque::new(),
            already_requested: HashSet::new(),
            reconcilers: HashMap::new(),
            listing: HashSet::new(),
            caps_reached: HashSet::new(),
            spend_checking: false,
        })
    }

    pub(super) fn queue(&mut self, b: &BuildRow, front: bool) {
        match self.shared.config.builder(&b.builder) {
            Some(builder) => {
                self.pending.push_back(FleetEvent::BuildQueued { build: b.id, pool: builder.pool.clone(), front })
            }
            None => {
                tracing::warn!(build = b.id.get(), builder = %b.builder, "queued build's builder is no longer configured")
            }
        }
    }
}

/// The scheduler's view of a stored change.
pub fn change_info(c: &ChangeRow) -> ChangeInfo {
    ChangeInfo {
        id: c.id,
        repo: c.repo.clone(),
        branch: c.branch.clone(),
        revision: c.revision.clone(),
        files: c.files.clone(),
        unlisted_files: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_becomes_the_bound_port() {
        let addr: SocketAddr = "127.0.0.1:4567".parse().expect("addr");
        assert_eq!(effective_url("http://127.0.0.1:0", addr), "http://127.0.0.1:4567");
        assert_eq!(effective_url("http://ci.example:8010/", addr), "http://ci.example:8010");
    }

    /// The loop's rule for interruption notices: the first is recorded and acted on (the fleet
    /// gives the machine up); a repeat, as an agent sends after reconnecting, is old news.
    #[tokio::test]
    async fn an_interruption_is_acted_on_once_whatever_the_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = format!("sqlite://{}", dir.path().join("paddock.db").display());
        let text =
            format!("[master]\nurl = \"http://127.0.0.1:0\"\ndatabase = \"{db}\"\n\n[pool.spot]\nmax_instances = 1\n");
        let config = crate::config::parse(&text, &dir.path().join("paddock.toml")).expect("config");
        let store = Store::open(&db).await.expect("store");
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        store.insert_machine(MachineId(7), "spot", "local", "hash", clock.now()).await.expect("machine");
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::new(Shared::for_test(config, store.clone(), clock.clone(), tx));
        let mut master = Master::new(shared, HashMap::new(), rx).await.expect("master");
        master.fleet.restore_machine(
            MachineId(7),
            "spot",
            MachineState::Idle,
            None,
            0,
            Some("i-7".into()),
            clock.now(),
        );
        let interrupted = |db: String| async move {
            let file = db.strip_prefix("sqlite://").expect("a file URL");
            let conn = rusqlite::Connection::open(file).expect("db");
            let mut stmt = conn
                .prepare(
                    "SELECT detail FROM machine_events WHERE machine_id = 7 AND kind = 'interrupted' AND detail != ''",
                )
                .expect("query");
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect("events");
            rows.collect::<Result<Vec<String>, _>>().expect("events")
        };

        master.interrupted(MachineId(7), "spot-interruption: terminate at 20:00").await.expect("acted on");
        master.drain_pending().await.expect("fleet");
        assert_ne!(master.fleet.machine_state(MachineId(7)), Some(MachineState::Idle), "the fleet gave the machine up");
        assert_eq!(interrupted(db.clone()).await, ["spot-interruption: terminate at 20:00"]);

        master.interrupted(MachineId(7), "spot-interruption: terminate at 20:00").await.expect("ignored");
        master.drain_pending().await.expect("fleet");
        assert_eq!(interrupted(db.clone()).await.len(), 1, "recorded once");
    }
}

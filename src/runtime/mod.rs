//! The runtime shell: tokio tasks around the sans-IO core.
//!
//! One loop owns the [`Fleet`] and the [`Schedulers`]. Everything else (the web server, agent
//! connections, pollers, provisioner calls) talks to it through one bounded channel of
//! [`Input`]s. The loop persists what an action intends, then carries it out, and feeds the
//! outcome back as an event: that is what keeps a crash from losing or duplicating work.

pub mod ingest;
pub mod isolation;
pub mod poller;
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

use crate::agent::protocol::{BuildJob, JobStep, MasterMsg};
use crate::clock::Clock;
use crate::config::{Config, ProvisionerKind};
use crate::core::fleet::{recovery, Fleet, FleetAction, FleetEvent, LeftOver, MachineState, Recovery, StopRefused};
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

/// What the loop is told, by everyone else.
#[derive(Debug)]
pub enum Input {
    /// A fleet event from an agent connection or a timer.
    Fleet(FleetEvent),
    /// A change or a branch head from a poller or a webhook (already stored).
    Sched(SchedEvent),
    /// A build attempt was stored in `queued` state (force builds).
    Queued(BuildRow),
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
    /// Someone asked to cancel a build; the answer says what became of it.
    Cancel { build: BuildId, by: String, reply: tokio::sync::oneshot::Sender<Result<Cancelled, ActionError>> },
    /// An admin asked to stop a machine (its build, if any, is retried elsewhere).
    StopMachine { machine: MachineId, by: String, reply: tokio::sync::oneshot::Sender<Result<(), ActionError>> },
    /// An admin pauses or resumes a pool: recorded, then applied, in the loop's order (so two
    /// admins at once cannot leave the record and the fleet disagreeing).
    Pause { pool: String, paused: bool, by: String, reply: tokio::sync::oneshot::Sender<Result<(), ActionError>> },
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A build being run: which machine runs it, and where its agent's reports stand (with the
/// redactor for its log). The stream is locked while one report is stored, so two connections
/// of one agent (a dying one and its replacement) never store a report twice.
#[derive(Clone)]
pub struct RunningBuild {
    pub machine: MachineId,
    pub reports: Arc<tokio::sync::Mutex<crate::agent::reports::ReportStream>>,
}

impl RunningBuild {
    /// A build on `machine` whose reports are stored up to `applied`, with `log_bytes` of log.
    pub fn new(machine: MachineId, secrets: &[(String, String)], applied: u64, log_bytes: usize) -> RunningBuild {
        let stream = crate::agent::reports::ReportStream::new(secrets, applied, log_bytes);
        RunningBuild { machine, reports: Arc::new(tokio::sync::Mutex::new(stream)) }
    }
}

pub use crate::agent::protocol::MAX_LOG_BYTES;

/// State shared by the loop, the web handlers and the pollers.
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    /// The master's URL as agents reach it (with the real port when configured as 0).
    pub url: String,
    pub inputs: mpsc::Sender<Input>,
    pub running: Mutex<HashMap<BuildId, RunningBuild>>,
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

    /// Hands the loop an input; fails only when the master is shutting down.
    pub async fn send(&self, input: Input) {
        if self.inputs.send(input).await.is_err() {
            tracing::debug!("master loop has stopped; input dropped");
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
        inputs: tx,
        running: Mutex::new(HashMap::new()),
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
struct Adoption {
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
    async fn new(
        shared: Arc<Shared>,
        provisioners: HashMap<String, Arc<dyn Provisioner>>,
        rx: mpsc::Receiver<Input>,
    ) -> Result<Master, MasterError> {
        let config = &shared.config;
        let pools = config.pool_specs();
        let first_id = shared.store.max_machine_id().await? + 1;
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

    /// Repairs what a crash or kill of the previous master left: adopts machines still running
    /// a build (their agents reconnect), stops the other machines, retries the builds whose
    /// machine is gone, re-queues queued builds and replays unscheduled changes.
    async fn recover(&mut self) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        if crate::cost::caps::any(&self.shared.config) {
            // Before any build is queued: a cap reached before the restart still holds.
            let caps = spend_caps(&self.shared).await?;
            self.apply_caps(caps);
        }
        // Before any build is queued too: a pool paused before the restart stays paused.
        for p in store.paused_pools().await? {
            self.pending.push_back(FleetEvent::Pause { pool: p.pool, paused: true });
        }
        let running = store.builds_in_state("running").await?;
        let live = store.live_machines().await?;
        let alive = self.alive_machines(&live).await;
        let mut keep = Vec::new();
        for m in live {
            let Some(state) = MachineState::parse(&m.state) else {
                self.stop_leftover(&m).await?;
                continue;
            };
            let left = LeftOver {
                state,
                launched: m.provider_id.is_some(),
                alive: alive.contains(&m.id),
                running_build: running.iter().any(|b| b.machine == Some(m.id)),
            };
            match recovery(left) {
                Recovery::AdoptBusy => match self.adoptable(&m, &running) {
                    Some(a) => keep.push(a),
                    None => self.stop_leftover(&m).await?,
                },
                Recovery::KeepBooting => self.keep_booting(&m).await?,
                Recovery::Resolve => self.resolve_launch(&m),
                Recovery::Stop => self.stop_leftover(&m).await?,
            }
        }
        // Adopted machines' timers start now, after the leftovers were stopped, so a slow
        // stop does not eat into the time their agents have to reconnect.
        let now = self.shared.now();
        let mut adopted = HashSet::new();
        for mut a in keep {
            (a.applied, a.log_bytes) = store.report_position(a.build.id).await?;
            if self.adopt(&a, now) {
                adopted.insert(a.build.id);
            } else {
                self.stop_leftover(&a.machine).await?;
            }
        }
        for b in running.iter().filter(|b| !adopted.contains(&b.id)) {
            store.retry_build(b.id, "its machine was lost while the master was down", now).await?;
        }
        for b in store.builds_in_state("queued").await? {
            if self.shared.config.builder(&b.builder).is_none() {
                let reason = format!("builder {} is no longer configured", b.builder);
                tracing::warn!(build = b.id, %reason, "queued build abandoned");
                store.abandon_build(b.id, &reason, now).await?;
                continue;
            }
            self.queue(&b, false);
        }
        let config = self.shared.config.clone();
        for repo in &config.repos {
            for (branch, revision) in store.heads(&repo.name).await? {
                self.apply_sched(SchedEvent::Head { repo: repo.name.clone(), branch, revision }).await?;
            }
        }
        let replay = store.unscheduled_changes().await?;
        if let Some(oldest) = replay.iter().map(|c| c.created_at.as_str()).min() {
            self.already_requested = store.requested_changes(oldest).await?;
        }
        for c in replay {
            self.apply_sched(SchedEvent::Change(change_info(&c))).await?;
        }
        self.drain_pending().await?;
        Ok(())
    }

    /// Cancels a build: a queued one at once, a running one by telling its agent (which
    /// reports it `cancelled`); a running build whose agent is not connected ends as cancelled
    /// here and its machine is stopped.
    async fn cancel(&mut self, build: BuildId, by: &str) -> Result<Cancelled, ActionError> {
        let store = self.shared.store.clone();
        let now = self.shared.now();
        let row = store.build(build).await?.ok_or_else(|| ActionError::NotFound(format!("no build {build}")))?;
        match (row.state.as_str(), row.machine) {
            ("queued", _) => {
                if !store.cancel_queued(build, by, now).await? {
                    return Err(ActionError::Conflict(format!("build {build} has just started; cancel it again")));
                }
                self.pending.push_back(FleetEvent::BuildCancelled { build });
                tracing::info!(build, %by, "queued build cancelled");
                Ok(Cancelled::Queued)
            }
            ("running", Some(machine)) => {
                if !store.cancel_requested(build, by).await? {
                    return Err(ActionError::Conflict(format!("build {build} has just finished")));
                }
                store.append_log(build, 0, &format!("*** cancel requested by {by}\n"), now).await?;
                match self.agents.get(&machine) {
                    Some((_, tx)) if self.fleet.machine_build(machine) == Some(build) => {
                        let _ = tx.send(MasterMsg::Cancel { build });
                        tracing::info!(build, machine, %by, "running build cancelled; its agent is stopping it");
                    }
                    _ => {
                        // Nobody to tell: end it here, and stop the machine rather than trust it.
                        // (Stopping it, not finishing the build on it: a machine made idle here
                        // would be handed the next queued build, which the stop would then retry.)
                        self.shared.running.lock().map(|mut r| r.remove(&build)).ok();
                        store.finish_build(build, machine, "cancelled", now).await?;
                        self.pending.push_back(FleetEvent::StopMachine {
                            machine,
                            reason: format!("build {build} cancelled by {by} while its agent was away"),
                        });
                        tracing::info!(build, machine, %by, "running build cancelled; its agent is away, stopping the machine");
                    }
                }
                Ok(Cancelled::Stopping)
            }
            (state, _) => Err(ActionError::Conflict(format!(
                "build {build} is {state}; only queued or running builds can be cancelled"
            ))),
        }
    }

    /// Stops a machine of the previous run and records it gone when the stop is confirmed (its
    /// meter ends then). Even without a provider id the provisioner finds the machine by its
    /// id. If the stop fails, the row is left as it is: the next start tries again rather than
    /// forget it.
    async fn stop_leftover(&mut self, m: &crate::store::MachineRow) -> Result<(), MasterError> {
        if let Some(p) = self.provisioners.get(&m.pool) {
            let pid = m.provider_id.as_deref().unwrap_or("");
            tracing::info!(machine = m.id, provider_id = pid, "stopping machine left by the previous run");
            if let Err(e) = p.terminate(m.id, pid).await {
                tracing::error!(machine = m.id, "cannot stop leftover machine: {e}");
                return Ok(());
            }
        }
        self.shared.store.set_machine_state(m.id, "gone", self.shared.now()).await?;
        Ok(())
    }

    /// Keeps a machine of the previous run that was launched but whose agent had not connected
    /// yet: its agent says hello with its one-time token, within `boot_timeout` of its launch.
    async fn keep_booting(&mut self, m: &crate::store::MachineRow) -> Result<(), MasterError> {
        let now = self.shared.now();
        let launched_at = m.launched_at.as_deref().and_then(crate::cost::parse_ts).unwrap_or(now);
        let builds_run = m.builds_run.max(0) as u32;
        let pid = m.provider_id.clone();
        self.fleet.restore_machine(m.id, &m.pool, MachineState::Booting, None, builds_run, pid, launched_at);
        if self.fleet.machine_state(m.id) != Some(MachineState::Booting) {
            return self.stop_leftover(m).await;
        }
        if m.state != MachineState::Booting.as_str() {
            self.shared.store.set_machine_state(m.id, MachineState::Booting.as_str(), now).await?;
        }
        tracing::info!(
            machine = m.id,
            "keeping a machine of the previous run that is still booting; waiting for its agent"
        );
        Ok(())
    }

    /// Takes in a machine of the previous run whose launch call was in flight when it died:
    /// the fleet counts it (launching) against the pool's limit while the provider is asked
    /// for it by its id, until the answer is final.
    fn resolve_launch(&mut self, m: &crate::store::MachineRow) {
        let requested_at = crate::cost::parse_ts(&m.requested_at).unwrap_or_else(|| self.shared.now());
        self.fleet.restore_machine(m.id, &m.pool, MachineState::Launching, None, 0, None, requested_at);
        tracing::info!(
            machine = m.id,
            "the previous run died while launching this machine; asking the provider for it"
        );
        self.spawn_resolve(m.id, requested_at, "the master restarted during the launch".to_string());
    }

    /// Asks the provider for a machine whose launch outcome is unknown, until it is found or
    /// the provider's settle time since the request has passed; the answer comes back as an
    /// [`Input::Launched`]. Errors from the provider are retried: until it answers, the machine
    /// keeps counting against the pool's limit.
    fn spawn_resolve(&mut self, machine: MachineId, requested_at: Ts, why: String) {
        let Some(p) = self.provisioner_of(machine) else {
            self.pending.push_back(FleetEvent::LaunchFailed { machine, reason: format!("no provisioner ({why})") });
            return;
        };
        let final_at = requested_at.plus(p.settle_time());
        let (inputs, clock) = (self.shared.inputs.clone(), self.shared.clock.clone());
        tokio::spawn(async move {
            let result = loop {
                match p.find(machine).await {
                    Ok(Some(found)) if found.alive => break LaunchOutcome::Up(found.launched),
                    Ok(Some(found)) => break LaunchOutcome::Ran(found.launched),
                    Ok(None) if clock.now() >= final_at => {
                        break LaunchOutcome::Failed(format!("{why}; no machine was started (none found by its id)"))
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(machine, "cannot look the machine up yet; trying again: {e}"),
                }
                tokio::time::sleep(RESOLVE_POLL).await;
            };
            let _ = inputs.send(Input::Launched { machine, result }).await;
        });
    }

    /// Which launched machines of the previous run are still alive: one listing per pool (not
    /// one per machine), tried a few times, since a machine wrongly thought dead is stopped.
    async fn alive_machines(&self, live: &[crate::store::MachineRow]) -> HashSet<MachineId> {
        let mut alive = HashSet::new();
        for (pool, p) in &self.provisioners {
            let known: Vec<(MachineId, String)> = live
                .iter()
                .filter(|m| &m.pool == pool)
                .filter_map(|m| m.provider_id.clone().map(|pid| (m.id, pid)))
                .collect();
            if known.is_empty() {
                continue;
            }
            for attempt in 1..=3u32 {
                match p.list(&known).await {
                    Ok(listed) => {
                        alive.extend(listed.iter().filter(|l| l.alive).filter_map(|l| l.machine_id));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%pool, attempt, "cannot list the previous run's machines: {e}");
                        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                    }
                }
            }
        }
        alive
    }

    /// A busy machine of the previous run that can be taken back (see [`recovery`]): its build,
    /// still running in the store, is still buildable.
    fn adoptable(&self, m: &crate::store::MachineRow, running: &[BuildRow]) -> Option<Adoption> {
        let build = running.iter().find(|b| b.machine == Some(m.id))?;
        let pid = m.provider_id.clone()?;
        let job = self.job_for(build).ok()?;
        Some(Adoption {
            machine: m.clone(),
            build: build.clone(),
            pid,
            secrets: job.secrets.into_iter().collect(),
            applied: 0,
            log_bytes: 0,
        })
    }

    /// Takes back an adoptable machine: the fleet counts it busy with its build, and the agent,
    /// which keeps the build going while the master is away, reconnects with its resume token.
    /// If it does not within the heartbeat limit, the fleet declares it lost and the build is
    /// retried.
    fn adopt(&mut self, a: &Adoption, now: Ts) -> bool {
        let m = &a.machine;
        // The store counted the running build when it started; the fleet counts it when it ends.
        let builds_run = (m.builds_run - 1).max(0) as u32;
        let pid = Some(a.pid.clone());
        self.fleet.restore_machine(m.id, &m.pool, MachineState::Busy, Some(a.build.id), builds_run, pid, now);
        if self.fleet.machine_build(m.id) != Some(a.build.id) {
            tracing::error!(machine = m.id, build = a.build.id, "the fleet refused to adopt the machine");
            return false;
        }
        if let Ok(mut r) = self.shared.running.lock() {
            r.insert(a.build.id, RunningBuild::new(m.id, &a.secrets, a.applied, a.log_bytes));
        }
        tracing::info!(
            machine = m.id,
            build = a.build.id,
            "adopting a machine still running a build; waiting for its agent"
        );
        true
    }

    fn queue(&mut self, b: &BuildRow, front: bool) {
        match self.shared.config.builder(&b.builder) {
            Some(builder) => {
                self.pending.push_back(FleetEvent::BuildQueued { build: b.id, pool: builder.pool.clone(), front })
            }
            None => {
                tracing::warn!(build = b.id, builder = %b.builder, "queued build's builder is no longer configured")
            }
        }
    }

    async fn run_loop(
        &mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), MasterError> {
        let jumps = self.shared.clock.jumps();
        let mut reconcile = tokio::time::interval(self.shared.config.master.reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut spend_check = tokio::time::interval(SPEND_CHECK);
        spend_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let capped = crate::cost::caps::any(&self.shared.config);
        let mut shutdown = Box::pin(shutdown);
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // The first look: what the pools want with nothing yet asked of them (min_idle).
        self.pending.push_back(FleetEvent::Tick);
        self.drain_pending().await?;
        loop {
            let wake = self.next_wake(drain_deadline.is_some());
            let jumped = async {
                match &jumps {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown, if drain_deadline.is_none() => {
                    tracing::info!(grace = ?self.shared.config.master.shutdown_grace, "shutting down: no new builds, waiting for running ones");
                    self.shared.draining.store(true, Ordering::SeqCst);
                    drain_deadline = Some(tokio::time::Instant::now() + self.shared.config.master.shutdown_grace);
                    self.pending.push_back(FleetEvent::Drain);
                }
                input = self.rx.recv() => match input {
                    Some(input) => {
                        if let Err(e) = self.on_input(input).await {
                            tracing::error!("cannot handle an event (it will be repaired at the next start): {e}");
                        }
                    }
                    None => break,
                },
                _ = reconcile.tick(), if drain_deadline.is_none() => self.start_listings(),
                _ = spend_check.tick(), if capped && drain_deadline.is_none() => self.start_spend_check(),
                () = jumped => self.pending.push_back(FleetEvent::Tick),
                () = tokio::time::sleep(wake) => {
                    self.pending.push_back(FleetEvent::Tick);
                    if let Err(e) = self.apply_sched(SchedEvent::Tick).await {
                        tracing::error!("scheduler tick failed: {e}");
                    }
                    if let Some(deadline) = drain_deadline {
                        let running = self.shared.store.builds_in_state("running").await.map(|r| r.len()).unwrap_or(1);
                        if running == 0 || tokio::time::Instant::now() >= deadline {
                            if let Err(e) = self.drain_pending().await {
                                tracing::error!("cannot handle an event during shutdown: {e}");
                            }
                            break;
                        }
                    }
                }
            }
            // A store error in one event must not take the master (and its machines' stops)
            // down with it: what was not written is repaired from the store at the next start.
            if let Err(e) = self.drain_pending().await {
                tracing::error!("cannot handle a fleet event (it will be repaired at the next start): {e}");
            }
        }
        self.stop_everything().await
    }

    /// How long the loop may sleep: until the fleet's or the schedulers' next deadline (a
    /// clock that jumps wakes it earlier), at most [`MAX_SLEEP`], and briefly while draining
    /// (it watches the running builds end).
    fn next_wake(&self, draining: bool) -> Duration {
        let now = self.shared.now();
        let next = match (self.fleet.next_deadline(), self.sched.next_wakeup()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // One millisecond past the deadline: a timer never fires before its time is due.
        let wake = next.map_or(MAX_SLEEP, |t| t.since(now) + Duration::from_millis(1)).min(MAX_SLEEP);
        if draining {
            wake.min(DRAIN_POLL)
        } else {
            wake
        }
    }

    /// After the grace period: builds still running are retried by the next start; every
    /// machine is stopped.
    async fn stop_everything(&mut self) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        let now = self.shared.now();
        for b in store.builds_in_state("running").await? {
            tracing::warn!(build = b.id, "build still running at shutdown; it will be retried on the next start");
            store.retry_build(b.id, "master shut down while it ran", now).await?;
        }
        for (_, tx) in self.agents.values() {
            let _ = tx.send(MasterMsg::Shutdown);
        }
        let mut stops = Vec::new();
        for m in store.live_machines().await? {
            let p = self.provisioners.get(&m.pool).cloned();
            let store = store.clone();
            let clock = self.shared.clock.clone();
            stops.push(tokio::spawn(async move {
                if let Some(p) = p {
                    if let Err(e) = p.terminate(m.id, m.provider_id.as_deref().unwrap_or("")).await {
                        tracing::error!(machine = m.id, "cannot stop machine; the next start tries again: {e}");
                        return;
                    }
                }
                if let Err(e) = store.set_machine_state(m.id, "gone", clock.now()).await {
                    tracing::warn!(machine = m.id, "cannot record machine as gone: {e}");
                }
            }));
        }
        for s in stops {
            let _ = s.await;
        }
        Ok(())
    }

    async fn on_input(&mut self, input: Input) -> Result<(), MasterError> {
        match input {
            Input::Fleet(ev) => self.pending.push_back(ev),
            Input::Sched(ev) => self.apply_sched(ev).await?,
            Input::Queued(b) => self.queue(&b, false),
            Input::Cancel { build, by, reply } => {
                let answer = self.cancel(build, &by).await;
                let _ = reply.send(answer);
            }
            Input::StopMachine { machine, by, reply } => {
                let now = self.shared.now();
                let answer = match self.fleet.stop_machine(machine, &format!("terminated by {by}"), now) {
                    Err(e @ StopRefused::NotRunning) => Err(ActionError::NotFound(format!("machine {machine}: {e}"))),
                    Err(e @ StopRefused::Already(_)) => Err(ActionError::Conflict(format!("machine {machine}: {e}"))),
                    Ok(actions) => {
                        tracing::info!(machine, %by, "admin asked to stop the machine");
                        self.execute_all(actions, now).await?;
                        Ok(())
                    }
                };
                let _ = reply.send(answer);
            }
            Input::Pause { pool, paused, by, reply } => {
                let store = &self.shared.store;
                let recorded = match paused {
                    true => store.pause_pool(&pool, &by, self.shared.now()).await,
                    false => store.resume_pool(&pool).await,
                };
                let answer = match recorded {
                    Ok(()) => {
                        tracing::info!(pool, paused, %by, "pool {}", if paused { "paused" } else { "resumed" });
                        self.pending.push_back(FleetEvent::Pause { pool, paused });
                        Ok(())
                    }
                    Err(e) => Err(ActionError::Store(e)),
                };
                let _ = reply.send(answer);
            }
            Input::AgentConnected { machine, conn, tx, resumed } => {
                // The fleet accepts or refuses it (see `FleetAction::Accept`/`Refuse`).
                self.connecting.insert(machine, (conn, tx));
                self.pending.push_back(FleetEvent::AgentConnected { machine, resumed });
            }
            Input::AgentClosed { machine, conn } => {
                let ours = |m: &HashMap<MachineId, (u64, _)>| m.get(&machine).is_some_and(|(c, _)| *c == conn);
                if ours(&self.agents) || ours(&self.connecting) {
                    self.agents.remove(&machine);
                    self.connecting.remove(&machine);
                    tracing::info!(machine, "agent disconnected");
                    self.pending.push_back(FleetEvent::AgentDisconnected { machine });
                }
            }
            Input::Launched { machine, result } => {
                let now = self.shared.now();
                let view = self.fleet.machine_view(machine);
                let requested_at = view.as_ref().map(|v| v.requested_at);
                let pool = view.map(|v| v.pool.to_string()).unwrap_or_default();
                match result {
                    LaunchOutcome::Up(launched) => {
                        self.record_launch(machine, &pool, &launched, requested_at, now).await?;
                        let provider_id = launched.provider_id;
                        self.pending.push_back(FleetEvent::LaunchSucceeded { machine, provider_id });
                    }
                    LaunchOutcome::Ran(launched) => {
                        // It ran while nobody watched and has stopped since: billed from the
                        // provider's launch time to now, then gone.
                        tracing::warn!(machine, %pool, instance = %launched.provider_id, "the machine ran but had already stopped when found");
                        self.record_launch(machine, &pool, &launched, requested_at, now).await?;
                        let reason = "its instance had already stopped when found".to_string();
                        self.pending.push_back(FleetEvent::LaunchFailed { machine, reason });
                    }
                    LaunchOutcome::Unknown(reason) => {
                        tracing::warn!(machine, %pool, %reason, "launch outcome unknown; looking the machine up");
                        self.shared.store.machine_event(machine, "launch_unknown", &reason, now).await?;
                        self.pending.push_back(FleetEvent::LaunchUnknown { machine, reason });
                    }
                    LaunchOutcome::Failed(reason) => {
                        tracing::warn!(machine, %pool, %reason, "launch failed");
                        self.shared.store.machine_event(machine, "launch_failed", &reason, now).await?;
                        self.pending.push_back(FleetEvent::LaunchFailed { machine, reason });
                    }
                }
            }
            Input::LateInstance { machine, launched, stopped_at } => {
                let Some(row) = self.shared.store.machine(machine).await? else { return Ok(()) };
                let price = match self.shared.config.pool(&row.pool) {
                    Some(p) => crate::cost::price_machine(p, &launched, crate::cost::prices::PriceTable::builtin()),
                    None => crate::store::MachinePrice::default(),
                };
                let requested_at = crate::cost::parse_ts(&row.requested_at).unwrap_or(stopped_at);
                let started = Ts(launched.launched_at.unwrap_or(stopped_at.0).clamp(requested_at.0, stopped_at.0));
                let recorded = self.shared.store.late_life(machine, &launched, &price, started, stopped_at).await?;
                if !recorded {
                    tracing::warn!(machine, instance = %launched.provider_id, "a second instance ran for this machine; the cost report does not show it");
                }
            }
            Input::Terminated { machine } => self.pending.push_back(FleetEvent::MachineGone { machine }),
            Input::SpendChecked(result) => {
                self.spend_checking = false;
                match result {
                    Ok(caps) => self.apply_caps(caps),
                    Err(e) => tracing::error!("cannot check spend caps; holds stay as they were: {e}"),
                }
            }
            Input::Listing { scope, listed_at, result } => {
                self.listing.remove(&scope);
                match result {
                    Ok(listing) => self.judge(&scope, &listing, listed_at).await?,
                    Err(e) => tracing::warn!(%scope, "reconcile: cannot list machines; trying again next round: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Records a machine's launch with its price. Its meter starts when the provider says the
    /// machine started (never before it was asked for, never after now), so a machine the
    /// master learns of late is billed for all the time it ran.
    async fn record_launch(
        &self,
        machine: MachineId,
        pool: &str,
        launched: &Launched,
        requested_at: Option<Ts>,
        now: Ts,
    ) -> Result<(), MasterError> {
        let price = match self.shared.config.pool(pool) {
            Some(p) => crate::cost::price_machine(p, launched, crate::cost::prices::PriceTable::builtin()),
            None => crate::store::MachinePrice::default(),
        };
        let at = match launched.launched_at {
            Some(t) => Ts(t.clamp(requested_at.unwrap_or(Ts(t)).0, now.0)),
            None => now,
        };
        let store = &self.shared.store;
        store
            .machine_launched(
                machine,
                &launched.provider_id,
                launched.instance_type.as_deref(),
                &launched.lifecycle,
                &price,
                at,
            )
            .await?;
        Ok(())
    }

    /// The pools of each scope: pools sharing a region and cluster share one listing.
    fn scopes(&self) -> HashMap<String, Vec<String>> {
        let mut scopes: HashMap<String, Vec<String>> = HashMap::new();
        for (pool, p) in &self.provisioners {
            let scope = p.scope();
            let scope = if scope.is_empty() { format!("pool:{pool}") } else { scope };
            scopes.entry(scope).or_default().push(pool.clone());
        }
        scopes
    }

    /// Acts on a spend check: pools that reached a cap stop launching (their machines keep
    /// working), pools below again launch. A warning is logged once per crossing.
    fn apply_caps(&mut self, state: crate::cost::caps::Caps) {
        for (cap, why) in &state.reached {
            if !self.caps_reached.contains(cap) {
                tracing::warn!("{why}; queued builds wait, running builds finish");
            }
        }
        for cap in self.caps_reached.iter().filter(|c| !state.reached.contains_key(*c)) {
            tracing::info!("{cap} spend cap no longer reached");
        }
        self.caps_reached = state.reached.keys().cloned().collect();
        let before = match self.shared.spend_holds.lock() {
            Ok(mut h) => std::mem::replace(&mut *h, state.holds.clone().into_iter().collect()),
            Err(_) => return,
        };
        for pool in self.shared.config.pools.iter().map(|p| &p.name) {
            match (before.contains_key(pool), state.holds.contains_key(pool)) {
                (false, true) => self.pending.push_back(FleetEvent::LaunchHold { pool: pool.clone(), held: true }),
                (true, false) => {
                    tracing::info!(%pool, "spend is below the caps again; launching resumes");
                    self.pending.push_back(FleetEvent::LaunchHold { pool: pool.clone(), held: false });
                }
                _ => {}
            }
        }
    }

    /// Checks spend off the loop (a day of machines is read): the answer comes back as
    /// [`Input::SpendChecked`].
    fn start_spend_check(&mut self) {
        if self.spend_checking {
            return;
        }
        self.spend_checking = true;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let result = spend_caps(&shared).await.map_err(|e| e.to_string());
            shared.send(Input::SpendChecked(result)).await;
        });
    }

    /// Starts one listing per scope (level-triggered reconcile): the cloud's inventory where
    /// the provisioner has one, else a liveness check of the machines this master knows.
    fn start_listings(&mut self) {
        for (scope, pools) in self.scopes() {
            if !self.listing.insert(scope.clone()) {
                continue;
            }
            let Some(p) = pools.first().and_then(|pool| self.provisioners.get(pool)).cloned() else { continue };
            let known: Vec<(MachineId, String)> = self
                .fleet
                .machine_views()
                .filter(|(_, v)| pools.iter().any(|p| p == v.pool))
                .filter_map(|(m, v)| v.provider_id.map(|pid| (m, pid.to_string())))
                .collect();
            let inputs = self.shared.inputs.clone();
            let listed_at = self.shared.now();
            tokio::spawn(async move {
                let result = match p.inventory().await {
                    Ok(Some(all)) => Ok(all),
                    Ok(None) => p.list(&known).await,
                    Err(e) => Err(e),
                };
                let result = result
                    .map(|l| {
                        l.into_iter()
                            .map(|x| Listed { provider_id: x.provider_id, machine: x.machine_id, alive: x.alive })
                            .collect()
                    })
                    .map_err(|e| e.to_string());
                let _ = inputs.send(Input::Listing { scope, listed_at, result }).await;
            });
        }
    }

    /// Acts on one listing: orphans are terminated, vanished machines are gone (their builds
    /// retried).
    async fn judge(&mut self, scope: &str, listing: &[Listed], listed_at: Ts) -> Result<(), MasterError> {
        let Some(pools) = self.scopes().remove(scope) else { return Ok(()) };
        // Live machines of other scopes: a listing by tag may include them (same region and
        // cluster through another endpoint); they are owned, never orphans.
        let ours = |pool: &str| pools.iter().any(|p| p == pool);
        let elsewhere: HashSet<MachineId> =
            self.fleet.machine_views().filter(|(_, v)| !ours(v.pool)).map(|(m, _)| m).collect();
        let believed: Vec<Believed> = self
            .fleet
            .machine_views()
            .filter(|(_, v)| ours(v.pool))
            .map(|(m, v)| Believed {
                machine: m,
                provider_id: v.provider_id.map(str::to_string),
                launched_at: v.answered_at,
            })
            .collect();
        // Tagged instances of machines the store has as gone: launches served too late.
        let strangers: Vec<MachineId> = listing
            .iter()
            .filter(|l| l.alive)
            .filter_map(|l| l.machine)
            .filter(|m| !elsewhere.contains(m) && !believed.iter().any(|b| b.machine == *m))
            .collect();
        let over = self.shared.store.gone_machines(&strangers).await?;
        let now = self.shared.now();
        let grace = self.shared.config.master.orphan_grace;
        let verdicts = self
            .reconcilers
            .entry(scope.to_string())
            .or_insert_with(|| Reconciler::new(grace))
            .judge(listing, &believed, &elsewhere, &over, listed_at, now);
        for v in verdicts {
            let (provider_id, machine, late) = match v {
                Verdict::Late { provider_id, machine } => {
                    tracing::warn!(%provider_id, machine, "reconcile: terminating the late instance of a machine already stopped");
                    (provider_id, Some(machine), Some(machine))
                }
                Verdict::Orphan { provider_id, machine } => {
                    tracing::warn!(%provider_id, ?machine, "reconcile: terminating an orphan (tagged as ours, owned by no machine)");
                    (provider_id, machine, None)
                }
                Verdict::Vanished { machine, provider_id } => {
                    let actions = self.fleet.handle(FleetEvent::Vanished { machine }, now);
                    if !actions.is_empty() {
                        tracing::warn!(machine, %provider_id, "reconcile: machine is gone from the cloud; its build (if any) is retried");
                        let detail = format!("{provider_id} no longer running");
                        self.shared.store.machine_event(machine, "vanished", &detail, now).await?;
                    }
                    self.execute_all(actions, now).await?;
                    continue;
                }
            };
            let Some(p) = pools.first().and_then(|pool| self.provisioners.get(pool)).cloned() else { continue };
            let (inputs, clock) = (self.shared.inputs.clone(), self.shared.clock.clone());
            tokio::spawn(async move {
                // A late instance ran for its machine: what it was and when it started,
                // so the cost report has it.
                let found = match late {
                    Some(m) => p.find(m).await.ok().flatten(),
                    None => None,
                };
                if let Err(e) = p.terminate(machine.unwrap_or(0), &provider_id).await {
                    tracing::error!(%provider_id, "reconcile: cannot terminate orphan; next round tries again: {e}");
                    return;
                }
                if let (Some(machine), Some(found)) = (late, found) {
                    let stopped_at = clock.now();
                    let _ = inputs.send(Input::LateInstance { machine, launched: found.launched, stopped_at }).await;
                }
            });
        }
        Ok(())
    }

    async fn apply_sched(&mut self, ev: SchedEvent) -> Result<(), MasterError> {
        let now = self.shared.now();
        for action in self.sched.handle(ev, now) {
            match action {
                SchedAction::Request(req)
                    if !req.changes.is_empty()
                        && req
                            .changes
                            .iter()
                            .all(|c| self.already_requested.contains(&(req.scheduler.clone(), *c))) =>
                {
                    tracing::info!(scheduler = %req.scheduler, changes = ?req.changes, "replayed changes were already requested before the restart");
                }
                SchedAction::Request(req) => {
                    if self.shared.draining.load(Ordering::SeqCst) {
                        // Still stored: the next start runs it.
                        tracing::info!(reason = %req.reason, "request stored during shutdown");
                    }
                    for builder in &req.builders {
                        let b = self
                            .shared
                            .store
                            .create_request(
                                builder,
                                &req.repo,
                                &req.branch,
                                &req.revision,
                                &req.scheduler,
                                &req.reason,
                                &req.changes,
                                now,
                            )
                            .await?;
                        tracing::info!(build = b.id, builder = %b.builder, branch = %b.branch, revision = %b.revision, reason = %req.reason, "build queued");
                        self.queue(&b, false);
                    }
                }
                SchedAction::ChangesDone(ids) => self.shared.store.mark_scheduled(&ids).await?,
                SchedAction::NightlyState { scheduler, last_fire, built } => {
                    self.shared.store.save_nightly(&scheduler, last_fire, &built).await?
                }
            }
        }
        Ok(())
    }

    async fn drain_pending(&mut self) -> Result<(), MasterError> {
        while let Some(ev) = self.pending.pop_front() {
            let now = self.shared.now();
            let actions = self.fleet.handle(ev, now);
            self.execute_all(actions, now).await?;
        }
        Ok(())
    }

    async fn execute_all(&mut self, actions: Vec<FleetAction>, now: Ts) -> Result<(), MasterError> {
        for action in actions {
            self.execute(action, now).await?;
        }
        Ok(())
    }

    /// The provisioner of a machine's pool (while the fleet knows the machine).
    fn provisioner_of(&self, machine: MachineId) -> Option<Arc<dyn Provisioner>> {
        self.fleet.machine_pool(machine).and_then(|pool| self.provisioners.get(pool)).cloned()
    }

    async fn execute(&mut self, action: FleetAction, now: Ts) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        match action {
            FleetAction::SetState { machine, state } => {
                // The row is created by `Launch`, which follows.
                if state != MachineState::Requested {
                    store.set_machine_state(machine, state.as_str(), now).await?;
                }
                if state == MachineState::Gone {
                    self.agents.remove(&machine);
                    self.connecting.remove(&machine);
                }
            }
            FleetAction::Launch { machine, pool } => {
                let Some(provisioner) = self.provisioners.get(&pool).cloned() else {
                    self.pending.push_back(FleetEvent::LaunchFailed {
                        machine,
                        reason: format!("no provisioner for pool {pool}"),
                    });
                    return Ok(());
                };
                let token = new_token();
                // Intent first: the row (with the token's hash) exists before the process does.
                let kind = match self.shared.config.pool(&pool).map(|p| &p.provisioner) {
                    Some(ProvisionerKind::Ec2(_)) => "ec2",
                    _ => "local",
                };
                store.insert_machine(machine, &pool, kind, &hash_token(&token), now).await?;
                let spec = LaunchSpec { machine_id: machine, pool, master_url: self.shared.url.clone(), token };
                let inputs = self.shared.inputs.clone();
                tokio::spawn(async move {
                    let result = match tokio::time::timeout(LAUNCH_TIMEOUT, provisioner.launch(spec)).await {
                        Ok(Ok(l)) => LaunchOutcome::Up(l),
                        Ok(Err(e @ paddock_provisioners::ProvisionError::Unknown(_))) => {
                            LaunchOutcome::Unknown(e.to_string())
                        }
                        Ok(Err(e)) => LaunchOutcome::Failed(e.to_string()),
                        Err(_) => {
                            LaunchOutcome::Unknown(format!("the provisioner did not answer within {LAUNCH_TIMEOUT:?}"))
                        }
                    };
                    let _ = inputs.send(Input::Launched { machine, result }).await;
                });
            }
            FleetAction::Assign { machine, build } => self.assign(machine, build, now).await?,
            FleetAction::Terminate { machine, provider_id, reason } => {
                tracing::info!(machine, %reason, "stopping machine");
                store.machine_event(machine, "stop_requested", &reason, now).await?;
                self.terminate(machine, provider_id.unwrap_or_default());
            }
            FleetAction::Resolve { machine, requested_at } => {
                self.spawn_resolve(machine, requested_at, "the launch's outcome was unknown".to_string())
            }
            FleetAction::Accept { machine, build } => {
                if let Some(agent) = self.connecting.remove(&machine) {
                    self.agents.insert(machine, agent);
                }
                if let Some(b) = build {
                    tracing::info!(machine, build = b, "agent reconnected; its build carries on");
                    // A cancel sent while the connection was dying may never have arrived.
                    let row = store.build(b).await?;
                    if row.is_some_and(|r| r.state == "running" && r.cancelled_by.is_some()) {
                        if let Some((_, tx)) = self.agents.get(&machine) {
                            let _ = tx.send(MasterMsg::Cancel { build: b });
                        }
                    }
                }
            }
            FleetAction::Refuse { machine, reason } => {
                if let Some((_, tx)) = self.connecting.remove(&machine) {
                    tracing::warn!(machine, %reason, "agent connection refused; telling it to stop");
                    let _ = tx.send(MasterMsg::Shutdown);
                }
            }
            FleetAction::Retry { build, reason } => {
                self.shared.running.lock().map(|mut r| r.remove(&build)).ok();
                if let Some(next) = store.retry_build(build, &reason, now).await? {
                    tracing::warn!(build, next = next.id, %reason, "build will be retried");
                    self.queue(&next, true);
                }
            }
        }
        Ok(())
    }

    fn terminate(&mut self, machine: MachineId, provider_id: String) {
        if let Some((_, tx)) = self.agents.remove(&machine) {
            let _ = tx.send(MasterMsg::Shutdown);
        }
        let Some(provisioner) = self.provisioner_of(machine) else {
            self.pending.push_back(FleetEvent::MachineGone { machine });
            return;
        };
        let inputs = self.shared.inputs.clone();
        tokio::spawn(async move {
            // The machine is gone only once the provisioner says so; until then it stays
            // `stopping` (and counts against the pool's limit), and the stop is retried.
            let mut delay = Duration::from_secs(1);
            while let Err(e) = provisioner.terminate(machine, &provider_id).await {
                tracing::error!(machine, retry_in = ?delay, "terminate failed: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            let _ = inputs.send(Input::Terminated { machine }).await;
        });
    }

    async fn assign(&mut self, machine: MachineId, build: BuildId, now: Ts) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        let Some(row) = store.build(build).await? else {
            self.pending.push_back(FleetEvent::AssignRefused { machine, build });
            return Ok(());
        };
        let Some((_, tx)) = self.agents.get(&machine).cloned() else {
            // The agent vanished between connecting and now: the fleet retries the build.
            let reason = "its agent's connection is gone".to_string();
            self.pending.push_back(FleetEvent::AgentLost { machine, reason });
            return Ok(());
        };
        let job = match self.job_for(&row) {
            Ok(job) => job,
            Err(message) => {
                tracing::warn!(build, %message, "build cannot start");
                if store.start_build(build, machine, &["setup".to_string()], now).await? {
                    store.append_log(build, 0, &format!("paddock: {message}\n"), now).await?;
                    store.step_finished(build, 0, "exception", None, now).await?;
                    store.finish_build(build, machine, "exception", now).await?;
                }
                self.pending.push_back(FleetEvent::BuildFinished { machine, build });
                return Ok(());
            }
        };
        let mut names = vec!["checkout".to_string()];
        names.extend(job.steps.iter().map(|s| s.name.clone()));
        if !store.start_build(build, machine, &names, now).await? {
            // Cancelled or already taken: give the machine back.
            self.pending.push_back(FleetEvent::AssignRefused { machine, build });
            return Ok(());
        }
        let secrets: Vec<(String, String)> = job.secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Ok(mut running) = self.shared.running.lock() {
            running.insert(build, RunningBuild::new(machine, &secrets, 0, 0));
        }
        tracing::info!(build, machine, builder = %row.builder, "build started");
        if tx.send(MasterMsg::Run(Box::new(job))).is_err() {
            let reason = "its agent's connection closed as the build was sent".to_string();
            self.pending.push_back(FleetEvent::AgentLost { machine, reason });
        }
        Ok(())
    }

    /// Everything the agent needs for `row`, with the secrets it references resolved.
    fn job_for(&self, row: &BuildRow) -> Result<BuildJob, String> {
        let config = &self.shared.config;
        let builder =
            config.builder(&row.builder).ok_or_else(|| format!("builder {} is no longer configured", row.builder))?;
        let repo =
            config.repo(&builder.repo).ok_or_else(|| format!("repository {} is no longer configured", builder.repo))?;
        let mut wanted = Vec::new();
        let texts = builder
            .env
            .values()
            .chain(builder.steps.iter().flat_map(|s| std::iter::once(&s.run).chain(s.env.values())));
        for text in texts {
            for name in secrets::references(text) {
                if !wanted.contains(&name) {
                    wanted.push(name);
                }
            }
        }
        let mut resolved = std::collections::BTreeMap::new();
        for name in wanted {
            let value = self.shared.secrets.get(&name).ok_or_else(|| {
                format!("secret {name} is not defined (neither in the secrets file nor in the environment)")
            })?;
            resolved.insert(name, value);
        }
        Ok(BuildJob {
            build: row.id,
            builder: row.builder.clone(),
            repo_url: repo.url.clone(),
            branch: row.branch.clone(),
            revision: row.revision.clone(),
            env: builder.env.clone(),
            steps: builder
                .steps
                .iter()
                .map(|s| JobStep {
                    name: s.name.clone(),
                    run: s.run.clone(),
                    env: s.env.clone(),
                    workdir: s.workdir.clone(),
                    timeout_secs: s.timeout.as_secs().max(1),
                    always: s.always,
                })
                .collect(),
            secrets: resolved,
        })
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
}

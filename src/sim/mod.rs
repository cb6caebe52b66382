//! `paddock simulate`: a commit history replayed through the real schedulers and fleet (the
//! same core code the master runs, on the same config) on a virtual clock, with models of
//! what the outside world does: how long machines take to boot, how long builds run, how
//! often the cloud reclaims a spot machine. What comes out is what the meter would bill.
//!
//! The engine here is pure: trace and model in, [`Outcome`] out. Reading traces (CSV, git,
//! the store) is in [`trace`]; rendering in [`render`].

pub mod model;
pub mod render;
pub mod trace;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, ProvisionerKind};
use crate::core::build::{after_loss, AfterLoss};
use crate::core::fleet::{Fleet, FleetAction, FleetEvent, MachineState};
use crate::core::scheduler::{ChangeInfo, SchedAction, SchedEvent, Schedulers, SpecError};
use crate::core::{BuildId, MachineId, Ts};
use crate::cost::meter::{Life, Use, EC2_MINIMUM_MS};
pub use model::{Draw, Model, Span};
pub use trace::{Files, TraceChange};

/// How long past the history's end builds still waiting are given before they count as
/// unfinished (a pool whose machines never boot would retry them forever).
const GIVE_UP_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// The simulated agents never miss a heartbeat: machines are lost only by the models.
const NO_HEARTBEAT_LOSS: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A scheduler's globs or cron do not compile.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The trace has nothing to replay.
    #[error("{0}")]
    EmptyTrace(String),
    /// The model cannot work with the config.
    #[error("{0}")]
    Model(String),
    /// The config has no repository to replay the trace into, or several and none was named.
    #[error("{0}")]
    Repo(String),
}

/// Totals of one pool, or of all of them. The JSON shape is relied on by scripts: add
/// fields freely, rename none.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Build requests (retried attempts count once).
    pub builds: u64,
    /// What the machines cost, by the meter's billing rules.
    pub cost: f64,
    /// Of which: running builds.
    pub busy_cost: f64,
    /// Of which: connected and waiting for work (and the unused rest of a billing minimum).
    pub idle_cost: f64,
    /// Of which: booting, before the agent connected.
    pub boot_cost: f64,
    /// What the builds' own running time costs at the pool's price: no policy pays less.
    pub floor_cost: f64,
    /// `cost - floor_cost`: what the policy adds to the floor.
    pub cost_over_floor: f64,
    /// Seconds billed.
    pub billed_seconds: f64,
    /// Seconds machines ran builds (interrupted attempts included).
    pub busy_seconds: f64,
    /// Queue wait (request to first start) percentiles and maximum, seconds.
    pub wait_p50_s: f64,
    pub wait_p95_s: f64,
    pub wait_p99_s: f64,
    pub wait_max_s: f64,
    /// Most machines alive at once.
    pub peak_machines: u64,
    /// Machines launched.
    pub launches: u64,
    /// Build attempts retried (a spot interruption, a boot that timed out).
    pub retries: u64,
    /// Spot interruptions.
    pub interruptions: u64,
    /// Builds that gave up after losing their machine on every attempt (`exception`).
    pub gave_up: u64,
    /// Builds not finished when the simulation ended (none, unless a pool can never run them).
    pub unfinished: u64,
}

/// One builder's share.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BuilderTotals {
    /// Build requests.
    pub builds: u64,
    /// The busy cost of its builds.
    pub cost: f64,
    /// 95th percentile of its queue waits, seconds.
    pub wait_p95_s: f64,
}

/// The price a pool's machines were simulated at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolPrice {
    /// Per hour, machine and volume; `None` when unknown (its cost is counted as 0).
    pub hourly: Option<f64>,
    /// Where it came from: `config`, `table`, `nominal` (local), `table (on-demand; spot varies)`.
    pub source: String,
}

/// What a simulation found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// All pools together.
    pub total: Totals,
    /// Per pool.
    pub pools: BTreeMap<String, Totals>,
    /// Per builder.
    pub builders: BTreeMap<String, BuilderTotals>,
    /// The prices used.
    pub prices: BTreeMap<String, PoolPrice>,
    /// Changes replayed, and the span of time they cover (RFC 3339).
    pub changes: u64,
    /// Changes of the trace on branches the repo does not watch (not replayed).
    pub unwatched_changes: u64,
    pub from: String,
    pub until: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Change(usize),
    Booted(MachineId),
    Finished(MachineId, BuildId),
    Interrupt(MachineId, BuildId),
}

struct Request {
    builder: usize,
    pool: usize,
    requested: Ts,
    started: Option<Ts>,
    finished: bool,
    attempts: u32,
}

struct Machine {
    pool: usize,
    life: Life,
    /// Index in `life.builds` of the attempt it runs.
    running: Option<usize>,
}

#[derive(Default)]
struct Acc {
    totals: Totals,
    waits: Vec<i64>,
    alive: u64,
}

/// Replays `trace` (changes of repository `repo`) through `config`'s schedulers and fleet
/// under `model`. Same inputs, same outcome.
pub fn simulate(config: &Config, repo: &str, trace: &[TraceChange], model: &Model) -> Result<Outcome, SimError> {
    // The master sees pushes only to the branches its repo watches.
    let watched = config.repo(repo).map(|r| r.branches.clone()).unwrap_or_default();
    let watched = |b: &str| watched.is_empty() || crate::changes::git::branch_matches(&watched, b);
    let all = trace.len();
    if all == 0 {
        return Err(SimError::EmptyTrace("the trace has no changes".into()));
    }
    let unwatched = trace.iter().filter(|c| !watched(&c.branch)).count();
    // A commit pushed twice to one branch is one change, as the master stores it.
    let mut seen = HashSet::new();
    let trace: Vec<TraceChange> = trace
        .iter()
        .filter(|c| watched(&c.branch) && seen.insert((c.branch.clone(), c.sha.clone())))
        .cloned()
        .collect();
    let trace = trace.as_slice();
    let Some(first) = trace.iter().map(|c| c.at).min() else {
        let branches = config.repo(repo).map(|r| r.branches.join(", ")).unwrap_or_default();
        return Err(SimError::EmptyTrace(format!(
            "none of the trace's {all} changes is on a branch repo {repo} watches ({branches})"
        )));
    };
    check_model(config, model)?;
    let last = trace.iter().map(|c| c.at).max().unwrap_or(first);
    let mut sim = Sim::new(config, repo, model, first)?;
    for (i, c) in trace.iter().enumerate() {
        sim.push(c.at, Ev::Change(i));
    }
    sim.run(trace, last);
    let mut outcome = sim.finish(trace.len(), first, last);
    outcome.unwatched_changes = unwatched as u64;
    Ok(outcome)
}

/// Refuses a model no machine could work under: boots that always outlast a pool's
/// `boot_timeout` (every machine would be stopped before its agent connects).
fn check_model(config: &Config, model: &Model) -> Result<(), SimError> {
    let Draw::Range(span) = &model.boot else { return Ok(()) };
    for p in &config.pools {
        if span.lo >= p.boot_timeout {
            return Err(SimError::Model(format!(
                "--boot {}: pool {}'s boot_timeout is {}, so every machine would be stopped before its agent connects",
                crate::core::format_duration(span.lo),
                p.name,
                crate::core::format_duration(p.boot_timeout)
            )));
        }
    }
    Ok(())
}

/// Picks the repository a trace replays into: `named`, or the config's only one.
pub fn pick_repo(config: &Config, named: Option<&str>) -> Result<String, SimError> {
    let names: Vec<&str> = config.repos.iter().map(|r| r.name.as_str()).collect();
    match named {
        Some(n) if names.contains(&n) => Ok(n.to_string()),
        Some(n) => {
            Err(SimError::Repo(format!("--repo {n}: the config has no such repo (it has: {})", names.join(", "))))
        }
        None => match names.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(SimError::Repo("the config has no [[repo]] to replay the trace into".into())),
            _ => Err(SimError::Repo(format!(
                "the config has several repos ({}): name one with --repo",
                names.join(", ")
            ))),
        },
    }
}

struct Sim<'a> {
    config: &'a Config,
    repo: String,
    model: &'a Model,
    fleet: Fleet,
    sched: Schedulers,
    now: Ts,
    heap: BinaryHeap<Reverse<(Ts, u64, Ev)>>,
    seq: u64,
    pending: VecDeque<FleetEvent>,
    requests: Vec<Request>,
    /// Attempt id -> request index.
    attempts: HashMap<BuildId, usize>,
    next_attempt: BuildId,
    machines: HashMap<MachineId, Machine>,
    builder_index: HashMap<String, usize>,
    builder_names: Vec<String>,
    builder_busy: Vec<f64>,
    pool_index: HashMap<String, usize>,
    rates: Vec<f64>,
    minimum_ms: Vec<i64>,
    pools: Vec<Acc>,
    total_alive: u64,
    total_peak: u64,
    last_activity: Ts,
    /// Requests not finished yet.
    open: usize,
    /// Attempts that ran to their end.
    completed: HashSet<BuildId>,
}

impl<'a> Sim<'a> {
    fn new(config: &'a Config, repo: &str, model: &'a Model, start: Ts) -> Result<Sim<'a>, SimError> {
        let fleet = Fleet::new(config.pool_specs(), NO_HEARTBEAT_LOSS, MachineId(1));
        let sched = Schedulers::new(config.scheduler_specs(), start)?;
        let pool_index = config.pools.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        let builder_names: Vec<String> = config.builders.iter().map(|b| b.name.clone()).collect();
        let builder_index = builder_names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        let rates = config.pools.iter().map(|p| pool_price(p).hourly.unwrap_or(0.0)).collect();
        let minimum_ms = config
            .pools
            .iter()
            .map(|p| match p.provisioner {
                ProvisionerKind::Ec2(_) => EC2_MINIMUM_MS,
                ProvisionerKind::Local => 0,
            })
            .collect();
        Ok(Sim {
            config,
            repo: repo.to_string(),
            model,
            fleet,
            sched,
            now: start,
            heap: BinaryHeap::new(),
            seq: 0,
            pending: VecDeque::new(),
            requests: Vec::new(),
            attempts: HashMap::new(),
            next_attempt: BuildId(1),
            machines: HashMap::new(),
            builder_busy: vec![0.0; builder_names.len()],
            builder_index,
            builder_names,
            pool_index,
            rates,
            minimum_ms,
            pools: config.pools.iter().map(|_| Acc::default()).collect(),
            total_alive: 0,
            total_peak: 0,
            last_activity: start,
            open: 0,
            completed: HashSet::new(),
        })
    }

    fn push(&mut self, at: Ts, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    /// The master's loop on a virtual clock: the next event or the core's next deadline,
    /// whichever is first. Nightlies fire up to `until`; then what is running ends and idle
    /// machines reach their timeouts.
    fn run(&mut self, trace: &[TraceChange], until: Ts) {
        self.fleet_event(FleetEvent::Tick);
        let longest_idle = self.config.pools.iter().map(|p| p.idle_timeout).max().unwrap_or_default();
        // Builds a pool can never run (every boot times out) would be retried forever.
        let give_up_at = until.plus(GIVE_UP_AFTER);
        let mut ticked_at = None;
        let mut dirty = true;
        while self.now <= give_up_at {
            let next_ev = self.heap.peek().map(|Reverse((t, _, _))| *t);
            // Nightlies fire up to `until`; a tree-stable burst still waiting fires after it.
            let sched_due = self.sched.next_wakeup().filter(|t| *t <= until || self.sched.pending_changes() > 0);
            // Past the history's end, with nothing left to run, only idle timeouts matter: a
            // machine kept warm would otherwise be watched forever.
            let horizon = Ts(self.last_activity.0.max(until.0)).plus(longest_idle);
            let active = next_ev.is_some() || self.open > 0 || sched_due.is_some();
            let fleet_due = self.fleet.next_deadline().filter(|t| active || *t <= horizon);
            let core_due = [sched_due, fleet_due].into_iter().flatten().min();
            // A deadline already passed is looked at again only if something happened since.
            let tick = core_due
                .filter(|c| next_ev.is_none_or(|e| *c <= e) && (dirty || ticked_at != Some(Ts(c.0.max(self.now.0)))));
            if let Some(t) = tick {
                self.now = Ts(self.now.0.max(t.0));
                ticked_at = Some(self.now);
                dirty = false;
                if sched_due.is_some_and(|s| s <= self.now) {
                    let mut actions = self.sched.handle(SchedEvent::Tick, self.now);
                    if self.now > until {
                        actions.retain(|a| !matches!(a, SchedAction::Request(r) if r.changes.is_empty()));
                    }
                    self.sched_actions(actions);
                }
                self.fleet_event(FleetEvent::Tick);
                continue;
            }
            let Some(Reverse((t, _, ev))) = self.heap.pop() else { break };
            self.now = Ts(self.now.0.max(t.0));
            self.on(ev, trace);
            dirty = true;
        }
        let end = Ts(self.now.0.max(until.0));
        // Machines kept warm past the history's end are billed up to it.
        for m in self.machines.values_mut() {
            if m.life.end.is_none() {
                m.life.end = Some(end);
            }
        }
        let ids: Vec<MachineId> = self.machines.keys().copied().collect();
        for id in ids {
            self.bill(id);
        }
    }

    fn on(&mut self, ev: Ev, trace: &[TraceChange]) {
        match ev {
            Ev::Change(i) => {
                let c = &trace[i];
                let (files, unlisted_files) = match &c.files {
                    Files::Listed(f) => (f.clone(), 0),
                    Files::Count(n) => (Vec::new(), *n),
                };
                let info = ChangeInfo {
                    id: i as i64 + 1,
                    repo: self.repo.clone(),
                    branch: c.branch.clone(),
                    revision: c.sha.clone(),
                    files,
                    unlisted_files,
                };
                let actions = self.sched.handle(SchedEvent::Change(info), self.now);
                self.sched_actions(actions);
            }
            Ev::Booted(machine) => {
                if self.machines.get(&machine).is_some_and(|m| m.life.end.is_none()) {
                    let accepted = self.fleet.machine_state(machine).is_some_and(|s| {
                        matches!(s, MachineState::Requested | MachineState::Launching | MachineState::Booting)
                    });
                    if accepted {
                        if let Some(m) = self.machines.get_mut(&machine) {
                            m.life.connected = Some(self.now);
                        }
                    }
                    self.fleet_event(FleetEvent::AgentConnected { machine, resumed: None });
                }
            }
            Ev::Finished(machine, build) => {
                if self.close_attempt(machine, build) {
                    self.completed.insert(build);
                    if let Some(&r) = self.attempts.get(&build) {
                        self.requests[r].finished = true;
                        self.open -= 1;
                    }
                    self.last_activity = self.now;
                    self.fleet_event(FleetEvent::BuildFinished { machine, build });
                }
            }
            Ev::Interrupt(machine, build) => {
                let running = self.machines.get(&machine).and_then(|m| m.running.map(|i| m.life.builds[i].0));
                if running == Some(build) {
                    let p = self.machines[&machine].pool;
                    self.pools[p].totals.interruptions += 1;
                    self.fleet_event(FleetEvent::Interrupted { machine });
                }
            }
        }
    }

    /// Ends the attempt `build` on `machine`, if it is the one running there.
    fn close_attempt(&mut self, machine: MachineId, build: BuildId) -> bool {
        let now = self.now;
        let Some(m) = self.machines.get_mut(&machine) else { return false };
        match m.running {
            Some(i) if m.life.builds[i].0 == build => {
                m.life.builds[i].2 = Some(now);
                m.running = None;
                true
            }
            _ => false,
        }
    }

    fn sched_actions(&mut self, actions: Vec<SchedAction>) {
        for a in actions {
            let SchedAction::Request(req) = a else { continue };
            for name in &req.builders {
                let Some(&builder) = self.builder_index.get(name) else { continue };
                let pool_name = &self.config.builders[builder].pool;
                let Some(&pool) = self.pool_index.get(pool_name) else { continue };
                self.requests.push(Request {
                    builder,
                    pool,
                    requested: self.now,
                    started: None,
                    finished: false,
                    attempts: 0,
                });
                self.pools[pool].totals.builds += 1;
                self.open += 1;
                let attempt = self.new_attempt(self.requests.len() - 1);
                let pool = pool_name.clone();
                self.fleet_event(FleetEvent::BuildQueued { build: attempt, pool, front: false });
            }
        }
    }

    fn new_attempt(&mut self, request: usize) -> BuildId {
        let id = self.next_attempt;
        self.next_attempt = self.next_attempt.next();
        self.attempts.insert(id, request);
        id
    }

    /// Feeds one event to the fleet and carries out what it says, as the shell does, until
    /// nothing follows.
    fn fleet_event(&mut self, ev: FleetEvent) {
        self.pending.push_back(ev);
        while let Some(ev) = self.pending.pop_front() {
            for action in self.fleet.handle(ev, self.now) {
                self.act(action);
            }
        }
    }

    fn act(&mut self, action: FleetAction) {
        let now = self.now;
        match action {
            FleetAction::Launch { machine, pool } => {
                let p = self.pool_index.get(&pool).copied().unwrap_or_default();
                let life = Life { machine, start: Some(now), minimum_ms: self.minimum_ms[p], ..Life::default() };
                self.machines.insert(machine, Machine { pool: p, life, running: None });
                let acc = &mut self.pools[p];
                acc.totals.launches += 1;
                acc.alive += 1;
                acc.totals.peak_machines = acc.totals.peak_machines.max(acc.alive);
                self.total_alive += 1;
                self.total_peak = self.total_peak.max(self.total_alive);
                let boot = self.model.boot.sample(self.model.seed, &[1, machine.get() as u64]);
                self.push(now.plus(boot), Ev::Booted(machine));
                let provider_id = format!("sim-{machine}");
                self.pending.push_back(FleetEvent::LaunchSucceeded { machine, provider_id });
            }
            FleetAction::Assign { machine, build } => {
                let Some(&r) = self.attempts.get(&build) else { return };
                let req = &mut self.requests[r];
                req.started.get_or_insert(now);
                req.attempts += 1;
                let (builder, attempt, req_pool) = (req.builder, req.attempts, req.pool);
                let name = &self.builder_names[builder];
                let key = [2, r as u64, u64::from(attempt)];
                let duration = self.model.build_duration(name, &key);
                // Only the cloud's spot machines are reclaimed.
                let spot = matches!(&self.config.pools[req_pool].provisioner, ProvisionerKind::Ec2(s) if s.spot);
                let interrupted = spot
                    && self.model.interruptions > 0.0
                    && model::unit(self.model.seed, &[3, r as u64, u64::from(attempt)]) < self.model.interruptions;
                if let Some(m) = self.machines.get_mut(&machine) {
                    m.life.builds.push((build, now, None));
                    m.running = Some(m.life.builds.len() - 1);
                }
                if interrupted {
                    let at = model::unit(self.model.seed, &[4, r as u64, u64::from(attempt)]);
                    let after = Duration::from_millis((duration.as_millis() as f64 * at) as u64);
                    self.push(now.plus(after), Ev::Interrupt(machine, build));
                } else {
                    self.push(now.plus(duration), Ev::Finished(machine, build));
                }
            }
            FleetAction::Terminate { machine, .. } => {
                // The stop is confirmed at once: billing ends now.
                self.pending.push_back(FleetEvent::MachineGone { machine });
            }
            FleetAction::SetState { machine, state: MachineState::Gone } => {
                if let Some(m) = self.machines.get_mut(&machine) {
                    if m.life.end.is_none() {
                        m.life.end = Some(now);
                        let p = m.pool;
                        self.pools[p].alive -= 1;
                        self.total_alive -= 1;
                    }
                }
                self.last_activity = now;
                self.bill(machine);
            }
            FleetAction::Retry { build, .. } => {
                let machine =
                    self.machines.iter().find(|(_, m)| m.running.is_some_and(|i| m.life.builds[i].0 == build));
                if let Some((&machine, _)) = machine {
                    self.close_attempt(machine, build);
                }
                let Some(&r) = self.attempts.get(&build) else { return };
                let p = self.requests[r].pool;
                // The master's own rule: a build that keeps losing its machine gives up.
                match after_loss(self.requests[r].attempts, false) {
                    AfterLoss::Retry => {
                        self.pools[p].totals.retries += 1;
                        let attempt = self.new_attempt(r);
                        let pool = self.config.pools[p].name.clone();
                        self.pending.push_back(FleetEvent::BuildQueued { build: attempt, pool, front: true });
                    }
                    AfterLoss::GiveUp | AfterLoss::Cancelled => {
                        self.pools[p].totals.gave_up += 1;
                        self.requests[r].finished = true;
                        self.open -= 1;
                    }
                }
            }
            FleetAction::SetState { .. }
            | FleetAction::Resolve { .. }
            | FleetAction::Accept { .. }
            | FleetAction::Refuse { .. } => {}
        }
    }

    /// Adds a machine that has ended to the totals, by the meter's rules, and forgets it.
    fn bill(&mut self, machine: MachineId) {
        let Some(m) = self.machines.remove(&machine) else { return };
        let rate = self.rates[m.pool];
        let (since, until) = (Ts(i64::MIN), Ts(i64::MAX));
        let end = m.life.end.unwrap_or(self.now);
        let acc = &mut self.pools[m.pool].totals;
        let builder_busy = &mut self.builder_busy;
        let attempts = &self.attempts;
        let requests = &self.requests;
        let completed = &self.completed;
        m.life.stretches(since, until, end, |s| {
            let cost = s.ms as f64 * rate / 3_600_000.0;
            acc.cost += cost;
            acc.billed_seconds += s.ms as f64 / 1000.0;
            match s.what {
                Use::Busy => {
                    acc.busy_cost += cost;
                    acc.busy_seconds += s.ms as f64 / 1000.0;
                    if let Some(r) = s.build.and_then(|b| attempts.get(&b)) {
                        builder_busy[requests[*r].builder] += cost;
                    }
                }
                Use::Idle => acc.idle_cost += cost,
                Use::Boot => acc.boot_cost += cost,
            }
        });
        // The floor: the finished attempts' own running time at this pool's price.
        for (build, from, to) in &m.life.builds {
            if let (true, Some(to)) = (completed.contains(build), to) {
                acc.floor_cost += (to.0 - from.0) as f64 * rate / 3_600_000.0;
            }
        }
    }

    fn finish(mut self, changes: usize, from: Ts, until: Ts) -> Outcome {
        let mut builder_waits: Vec<Vec<i64>> = vec![Vec::new(); self.builder_names.len()];
        let mut builder_builds = vec![0u64; self.builder_names.len()];
        let mut all_waits = Vec::with_capacity(self.requests.len());
        for r in &self.requests {
            builder_builds[r.builder] += 1;
            if !r.finished {
                self.pools[r.pool].totals.unfinished += 1;
            }
            if let Some(s) = r.started {
                let w = s.0 - r.requested.0;
                self.pools[r.pool].waits.push(w);
                builder_waits[r.builder].push(w);
                all_waits.push(w);
            }
        }
        let mut pools = BTreeMap::new();
        let mut total = Totals::default();
        for (i, acc) in self.pools.iter_mut().enumerate() {
            let mut t = acc.totals.clone();
            waits_into(&mut t, &mut acc.waits);
            t.cost_over_floor = t.cost - t.floor_cost;
            add(&mut total, &t);
            pools.insert(self.config.pools[i].name.clone(), rounded(t));
        }
        waits_into(&mut total, &mut all_waits);
        total.peak_machines = self.total_peak;
        total.cost_over_floor = total.cost - total.floor_cost;
        let mut builders = BTreeMap::new();
        for (i, name) in self.builder_names.iter().enumerate() {
            if builder_builds[i] == 0 {
                continue;
            }
            builder_waits[i].sort_unstable();
            builders.insert(
                name.clone(),
                BuilderTotals {
                    builds: builder_builds[i],
                    cost: crate::cost::report::money(self.builder_busy[i]),
                    wait_p95_s: secs(percentile(&builder_waits[i], 95.0)),
                },
            );
        }
        let prices = self.config.pools.iter().map(|p| (p.name.clone(), pool_price(p))).collect();
        Outcome {
            total: rounded(total),
            pools,
            builders,
            prices,
            changes: changes as u64,
            unwatched_changes: 0,
            from: crate::store::ts_string(from),
            until: crate::store::ts_string(until),
        }
    }
}

fn add(total: &mut Totals, t: &Totals) {
    total.builds += t.builds;
    total.cost += t.cost;
    total.busy_cost += t.busy_cost;
    total.idle_cost += t.idle_cost;
    total.boot_cost += t.boot_cost;
    total.floor_cost += t.floor_cost;
    total.billed_seconds += t.billed_seconds;
    total.busy_seconds += t.busy_seconds;
    total.launches += t.launches;
    total.retries += t.retries;
    total.interruptions += t.interruptions;
    total.unfinished += t.unfinished;
    total.gave_up += t.gave_up;
}

fn waits_into(t: &mut Totals, waits: &mut [i64]) {
    waits.sort_unstable();
    t.wait_p50_s = secs(percentile(waits, 50.0));
    t.wait_p95_s = secs(percentile(waits, 95.0));
    t.wait_p99_s = secs(percentile(waits, 99.0));
    t.wait_max_s = secs(waits.last().copied().unwrap_or(0));
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs(ms: i64) -> f64 {
    (ms as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Money to the cent's hundredth and seconds to the millisecond, so outputs compare exactly.
fn rounded(mut t: Totals) -> Totals {
    use crate::cost::report::money;
    t.cost = money(t.cost);
    t.busy_cost = money(t.busy_cost);
    t.idle_cost = money(t.idle_cost);
    t.boot_cost = money(t.boot_cost);
    t.floor_cost = money(t.floor_cost);
    t.cost_over_floor = money(t.cost_over_floor);
    t.billed_seconds = (t.billed_seconds * 1000.0).round() / 1000.0;
    t.busy_seconds = (t.busy_seconds * 1000.0).round() / 1000.0;
    t
}

/// The hourly price the meter would give this pool's machines, as the master prices a launch
/// (its first instance type; a spot pool without a configured price at the on-demand price).
pub fn pool_price(pool: &crate::config::Pool) -> PoolPrice {
    let table = crate::cost::prices::PriceTable::builtin();
    let (itype, lifecycle, volume_gb, volume_type) = match &pool.provisioner {
        ProvisionerKind::Ec2(s) => (
            s.instance_types.first().cloned(),
            if s.spot { "spot" } else { "on-demand" },
            s.root_volume_size.and_then(|v| u32::try_from(v).ok()),
            s.root_volume_type.clone(),
        ),
        ProvisionerKind::Local => (Some("local".to_string()), "local", None, None),
    };
    let launched = paddock_provisioners::Launched {
        provider_id: String::new(),
        instance_type: itype.clone(),
        lifecycle: lifecycle.to_string(),
        zone: None,
        spot_price: None,
        volume_gb,
        volume_type,
        launched_at: None,
    };
    let mut price = quiet_price(pool, &launched, table);
    if price.hourly_price.is_none() && lifecycle == "spot" {
        let on_demand = paddock_provisioners::Launched { lifecycle: "on-demand".into(), ..launched };
        let p = quiet_price(pool, &on_demand, table);
        if let Some(h) = p.hourly_price {
            price = p;
            price.hourly_price = Some(h);
            price.price_source = Some("table (on-demand; spot prices vary)".into());
        }
    }
    PoolPrice {
        hourly: price.hourly_price.map(|h| h + price.volume_hourly.unwrap_or(0.0)),
        source: price.price_source.unwrap_or_else(|| "unknown".into()),
    }
}

fn quiet_price(
    pool: &crate::config::Pool,
    launched: &paddock_provisioners::Launched,
    table: &crate::cost::prices::PriceTable,
) -> crate::store::MachinePrice {
    // The master warns of an unknown price once per launch; here the outcome says it.
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        crate::cost::price_machine(pool, launched, table)
    })
}

/// One builder's verdict in a dry run: would this change start it, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The builder (expanded name).
    pub builder: String,
    /// A build would be requested.
    pub starts: bool,
    /// Which scheduler decided, and by which setting.
    pub why: String,
}

/// The config's dry run: which builders the change `spec` (`branch=main files=a.md,src/x.py`)
/// would start, and why the others would not, by the schedulers' own rules.
pub fn dry_run(config: &Config, repo: &str, spec: &str) -> Result<Vec<Verdict>, String> {
    let mut branch = None;
    let mut files = Vec::new();
    for part in spec.split_whitespace() {
        match part.split_once('=') {
            Some(("branch", b)) if !b.is_empty() => branch = Some(b.to_string()),
            Some(("files", f)) => files.extend(f.split(',').filter(|f| !f.is_empty()).map(str::to_string)),
            _ => return Err(format!("--change: {part:?} is not branch=NAME or files=PATH,PATH")),
        }
    }
    let branch = branch.ok_or("--change needs branch=NAME (and files=PATH,PATH when filters matter)")?;
    let sched = Schedulers::new(config.scheduler_specs(), Ts(0)).map_err(|e| e.to_string())?;
    let change =
        ChangeInfo { id: 1, repo: repo.to_string(), branch, revision: "HEAD".into(), files, unlisted_files: 0 };
    let explained = sched.explain(&change);
    let watched = config.repo(repo).map(|r| r.branches.clone()).unwrap_or_default();
    let unwatched = !watched.is_empty() && !crate::changes::git::branch_matches(&watched, &change.branch);
    let mut out = Vec::new();
    for b in &config.builders {
        if unwatched {
            let list = watched.join(", ");
            let why = format!("repo {repo} watches only branches {list}: a push to {} is never seen", change.branch);
            out.push(Verdict { builder: b.name.clone(), starts: false, why });
            continue;
        }
        let mine: Vec<_> = explained.iter().filter(|e| e.builder == b.name).collect();
        let verdict = match mine.iter().find(|e| e.starts) {
            Some(e) => Verdict { builder: b.name.clone(), starts: true, why: e.why.clone() },
            None if mine.is_empty() => {
                Verdict { builder: b.name.clone(), starts: false, why: "no scheduler requests this builder".into() }
            }
            None => Verdict {
                builder: b.name.clone(),
                starts: false,
                why: mine.iter().map(|e| e.why.as_str()).collect::<Vec<_>>().join("; "),
            },
        };
        out.push(verdict);
    }
    Ok(out)
}

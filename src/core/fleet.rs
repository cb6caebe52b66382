//! The fleet: matches queued builds to machines, one build at a time per machine.
//!
//! Per pool it boots what the queue needs (up to `max_instances`), keeps `min_idle` machines
//! warm, hands an idle machine the next queued build of its pool, and stops machines that idled
//! past `idle_timeout`, never connected within `boot_timeout`, went silent past the heartbeat
//! limit, or reached `max_builds`.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use super::{BuildId, MachineId, Ts};

/// The fleet's view of one pool's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    /// The pool's name (the `[pool.NAME]` key).
    pub name: String,
    /// Most machines launching or alive at once.
    pub max_instances: u32,
    /// Idle machines kept warm even with an empty queue.
    pub min_idle: u32,
    /// An idle machine beyond `min_idle` is stopped after this long.
    pub idle_timeout: Duration,
    /// A machine whose agent has not connected this long after launch is stopped.
    pub boot_timeout: Duration,
    /// 0 = unlimited.
    pub max_builds: u32,
}

/// Machine lifecycle, as in DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachineState {
    /// Decided, row written, launch not yet confirmed by the provisioner.
    Requested,
    /// The provisioner accepted the launch; waiting for it to come up.
    Launching,
    /// Running, waiting for its agent to connect.
    Booting,
    /// Agent connected, no build.
    Idle,
    /// Running exactly one build.
    Busy,
    /// Terminate requested, waiting for the provisioner to confirm.
    Stopping,
    /// Confirmed stopped; dropped from the fleet's memory.
    Gone,
    /// Agent silent past the heartbeat limit or disconnected.
    Lost,
    /// Reclaimed by the cloud (spot notice).
    Interrupted,
}

impl MachineState {
    /// The API's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Requested => "requested",
            MachineState::Launching => "launching",
            MachineState::Booting => "booting",
            MachineState::Idle => "idle",
            MachineState::Busy => "busy",
            MachineState::Stopping => "stopping",
            MachineState::Gone => "gone",
            MachineState::Lost => "lost",
            MachineState::Interrupted => "interrupted",
        }
    }
    /// Parse the API's lowercase name.
    pub fn parse(s: &str) -> Option<MachineState> {
        Some(match s {
            "requested" => MachineState::Requested,
            "launching" => MachineState::Launching,
            "booting" => MachineState::Booting,
            "idle" => MachineState::Idle,
            "busy" => MachineState::Busy,
            "stopping" => MachineState::Stopping,
            "gone" => MachineState::Gone,
            "lost" => MachineState::Lost,
            "interrupted" => MachineState::Interrupted,
            _ => return None,
        })
    }
    /// Counted against `max_instances`: launching or alive (everything but `Gone`).
    pub fn counts_against_limit(self) -> bool {
        !matches!(self, MachineState::Gone)
    }
}

/// Something that happened, fed to [`Fleet::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum FleetEvent {
    /// A build attempt is waiting for a machine of `pool`. `front` puts it at the head of the
    /// queue (retries keep their place in line).
    BuildQueued { build: BuildId, pool: String, front: bool },
    /// A queued build was cancelled before it started (no-op if it is not queued).
    BuildCancelled { build: BuildId },
    /// The provisioner started the machine as `provider_id` (`Launching` -> `Booting`).
    LaunchSucceeded { machine: MachineId, provider_id: String },
    /// The launch call gave no usable answer (timed out, the answer was lost): the machine
    /// may exist. It stays `Launching`, counted against the limit, while it is looked up.
    LaunchUnknown { machine: MachineId, reason: String },
    /// The provisioner could not start the machine; it is gone, the queue still wants one
    /// (after a backoff that grows with the pool's consecutive failures).
    LaunchFailed { machine: MachineId, reason: String },
    /// The machine's agent authenticated. `resumed` is `Some(build it speaks of)` when it
    /// reconnected with a resume token (a live agent coming back), `None` for a first hello.
    AgentConnected { machine: MachineId, resumed: Option<Option<BuildId>> },
    /// The machine's agent is alive.
    Heartbeat { machine: MachineId },
    /// The agent's connection closed. A busy agent keeps its build going and is given until
    /// the heartbeat limit to reconnect; any other is lost.
    AgentDisconnected { machine: MachineId },
    /// The machine's agent cannot be used (a job could not be sent to it): its build is
    /// retried and the machine stopped.
    AgentLost { machine: MachineId, reason: String },
    /// The store refused to start the build just assigned (it was cancelled or taken in the
    /// meantime): the machine is idle again, and the build does not count as one it ran.
    AssignRefused { machine: MachineId, build: BuildId },
    /// The machine finished its build (any result).
    BuildFinished { machine: MachineId, build: BuildId },
    /// The provisioner confirmed the machine has stopped.
    MachineGone { machine: MachineId },
    /// The cloud no longer lists the machine (reconcile): gone, its build retried; a machine
    /// being stopped is gone only once its stop is confirmed.
    Vanished { machine: MachineId },
    /// Time passed; check timeouts.
    Tick,
    /// Stop taking new builds and launching machines (shutdown or pause).
    Drain,
    /// Undo [`FleetEvent::Drain`]: assign and launch again.
    Resume,
    /// The cloud announced it reclaims the machine (spot interruption notice): its build, if
    /// any, is retried elsewhere and the machine is terminated.
    Interrupted { machine: MachineId },
    /// A spend cap was reached (`held`) or lifted for a pool: while held, the pool launches
    /// nothing; its machines keep running and taking builds.
    LaunchHold { pool: String, held: bool },
    /// An admin paused (or resumed) a pool: while paused it starts no build and launches
    /// nothing; running builds finish and idle machines time out as usual.
    Pause { pool: String, paused: bool },
    /// An admin asked to stop this machine; a build on it is retried elsewhere.
    StopMachine { machine: MachineId, reason: String },
}

/// What the shell must do, returned by [`Fleet::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum FleetAction {
    /// Persist the machine row in `Requested` state, then ask the pool's provisioner for it.
    Launch { machine: MachineId, pool: String },
    /// Look the machine up by its id (its launch outcome is unknown) until it is found or the
    /// provider's settle time after `requested_at` has passed; feed the answer back as
    /// `LaunchSucceeded` or `LaunchFailed`.
    Resolve { machine: MachineId, requested_at: Ts },
    /// Keep this agent connection: the machine speaks through it. `build` is the build it runs
    /// when a busy agent came back (a cancel sent while it was away must be sent again).
    Accept { machine: MachineId, build: Option<BuildId> },
    /// Refuse this agent connection: tell the agent to shut down.
    Refuse { machine: MachineId, reason: String },
    /// Send this build to this machine (machine is now `Busy`).
    Assign { machine: MachineId, build: BuildId },
    /// Stop this machine through its provisioner (`provider_id` is `None` when no launch
    /// answer named it: the provisioner finds it by its id); feed `MachineGone` once stopped.
    Terminate { machine: MachineId, provider_id: Option<String>, reason: String },
    /// The build attempt failed for infrastructure reasons: mark it `retry` and queue a new
    /// attempt (the shell feeds `BuildQueued { front: true }` for it).
    Retry { build: BuildId, reason: String },
    /// Record the machine's new state (persist it; a machine event for the cost meter).
    SetState { machine: MachineId, state: MachineState },
}

/// The fleet state machine. See the module docs.
///
/// Costs: every non-`Tick` event touches one machine and one pool (hash lookups, `VecDeque`
/// and `BTreeSet` operations), so it is O(log n) at worst; `Tick` pops only due timers and
/// sweeps each pool's oldest idle machines. `Drain`/`Resume` scan everything (rare).
#[derive(Debug, Clone)]
pub struct Fleet {
    pools: Vec<Pool>,
    pool_index: HashMap<String, usize>,
    machines: HashMap<MachineId, Machine>,
    /// Queued build -> (pool index, sequence number of its live queue entry).
    queued: HashMap<BuildId, (usize, u64)>,
    /// Running build -> machine.
    running: HashMap<BuildId, MachineId>,
    /// Lazy timer wheel: (when, machine). An entry is live only if it equals the machine's
    /// `next_check`; stale entries are skipped, which keeps heartbeats O(1).
    timers: BinaryHeap<Reverse<(Ts, MachineId)>>,
    heartbeat_timeout: Duration,
    next_id: MachineId,
    seq: u64,
    draining: bool,
}

#[derive(Debug, Clone)]
struct Machine {
    pool: usize,
    state: MachineState,
    build: Option<BuildId>,
    launched_at: Ts,
    last_seen: Ts,
    idle_since: Ts,
    builds_run: u32,
    next_check: Option<Ts>,
    /// The provider's id for it, once a launch answer (or the store) named it.
    provider_id: Option<String>,
    /// When the launch answer arrived (or the machine was taken back at a restart): a
    /// cloud listing taken before then may not show it yet.
    answered_at: Option<Ts>,
    /// Its launch call has not answered (or its outcome is being looked up).
    launch_pending: bool,
    /// A stop was decided before the launch answered: it is carried out when it does.
    stop_after_launch: bool,
    /// Its agent's connection is open.
    connected: bool,
}

impl Machine {
    fn new(pool: usize, state: MachineState, at: Ts) -> Machine {
        Machine {
            pool,
            state,
            build: None,
            launched_at: at,
            last_seen: at,
            idle_since: at,
            builds_run: 0,
            next_check: None,
            provider_id: None,
            answered_at: None,
            launch_pending: false,
            stop_after_launch: false,
            connected: false,
        }
    }
}

/// What the fleet knows of one machine, for the shell and the reconciler.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineView<'a> {
    /// Its pool's name.
    pub pool: &'a str,
    /// Its state.
    pub state: MachineState,
    /// The build it runs.
    pub build: Option<BuildId>,
    /// The provider's id, once known.
    pub provider_id: Option<&'a str>,
    /// When it was asked for (restored machines: as the store had it).
    pub requested_at: Ts,
    /// When the launch answered (or it was taken back at a restart).
    pub answered_at: Option<Ts>,
}

#[derive(Debug, Clone)]
struct Pool {
    spec: PoolSpec,
    /// (build, seq); entries whose seq no longer matches `Fleet::queued` are cancelled leftovers.
    queue: VecDeque<(BuildId, u64)>,
    queued_len: usize,
    /// Idle machines ordered by when they became idle (oldest first).
    idle: BTreeSet<(Ts, MachineId)>,
    /// Requested/Launching/Booting: will become available without a new launch.
    starting: usize,
    busy: usize,
    /// Every state but Gone (counted against `max_instances`).
    live: usize,
    /// No launches (a spend cap is reached).
    held: bool,
    /// No launches and no new builds (an admin paused the pool).
    paused: bool,
    /// Consecutive failed launches (reset by a successful one).
    failures: u32,
    /// No launches before this time: the last launch failed.
    backoff_until: Option<Ts>,
}

/// Why the fleet refused an admin's stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StopRefused {
    /// No such machine is starting or running.
    #[error("the machine is not running")]
    NotRunning,
    /// It is already on its way out.
    #[error("the machine is already {}", .0.as_str())]
    Already(MachineState),
}

/// The backoff after `failures` consecutive failed launches: 1 s, 2 s, 4 s … up to 64 s, so a
/// broken provisioner is retried, not hammered.
pub fn launch_backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.clamp(1, 7)))
}

impl Pool {
    fn new(spec: PoolSpec) -> Pool {
        Pool {
            spec,
            queue: VecDeque::new(),
            queued_len: 0,
            idle: BTreeSet::new(),
            starting: 0,
            busy: 0,
            live: 0,
            held: false,
            paused: false,
            failures: 0,
            backoff_until: None,
        }
    }
}

fn is_starting(s: MachineState) -> bool {
    matches!(s, MachineState::Requested | MachineState::Launching | MachineState::Booting)
}

impl Fleet {
    /// A fleet with these pools and no machines; new machine ids count up from `first_machine_id`.
    pub fn new(pools: Vec<PoolSpec>, heartbeat_timeout: Duration, first_machine_id: MachineId) -> Fleet {
        let mut fleet = Fleet {
            pools: Vec::new(),
            pool_index: HashMap::new(),
            machines: HashMap::new(),
            queued: HashMap::new(),
            running: HashMap::new(),
            timers: BinaryHeap::new(),
            heartbeat_timeout,
            next_id: first_machine_id,
            seq: 0,
            draining: false,
        };
        for spec in pools {
            // First definition wins; config validation rejects duplicates anyway.
            if !fleet.pool_index.contains_key(&spec.name) {
                fleet.pool_index.insert(spec.name.clone(), fleet.pools.len());
                fleet.pools.push(Pool::new(spec));
            }
        }
        fleet
    }

    /// Re-insert a machine known from the store after a restart (no actions; send a `Tick`
    /// afterwards). Timers restart from `now`. Ignored if the id is already known.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_machine(
        &mut self,
        machine: MachineId,
        pool: &str,
        state: MachineState,
        build: Option<BuildId>,
        builds_run: u32,
        provider_id: Option<String>,
        now: Ts,
    ) {
        if self.machines.contains_key(&machine) || state == MachineState::Gone {
            return;
        }
        if let Some(b) = build {
            if self.running.contains_key(&b) || self.queued.contains_key(&b) {
                return;
            }
        }
        let p = self.pool_idx(pool);
        self.next_id = self.next_id.max(machine.next());
        // A Busy row without a build (or vice versa) cannot be trusted: stop it.
        let state = match (state, build) {
            (MachineState::Busy, None) => MachineState::Stopping,
            (MachineState::Busy, Some(_)) => MachineState::Busy,
            (_, Some(_)) => MachineState::Stopping,
            (s, None) => s,
        };
        let pool = &mut self.pools[p];
        pool.live += 1;
        let build = if state == MachineState::Busy { build } else { None };
        match state {
            s if is_starting(s) => pool.starting += 1,
            MachineState::Idle => {
                pool.idle.insert((now, machine));
            }
            MachineState::Busy => pool.busy += 1,
            _ => {}
        }
        if let Some(b) = build {
            self.running.insert(b, machine);
        }
        let mut m = Machine::new(p, state, now);
        m.build = build;
        m.builds_run = builds_run;
        m.answered_at = provider_id.as_ref().map(|_| now);
        m.launch_pending = provider_id.is_none() && is_starting(state);
        m.provider_id = provider_id;
        self.machines.insert(machine, m);
        self.schedule(machine, now);
    }

    /// Feed one event; returns the actions the shell must carry out, in order.
    ///
    /// `LaunchFailed` frees the slot; the pool launches again once its backoff (see
    /// [`launch_backoff`]) has passed, which [`Fleet::next_deadline`] includes.
    pub fn handle(&mut self, event: FleetEvent, now: Ts) -> Vec<FleetAction> {
        let mut out = Vec::new();
        match event {
            FleetEvent::BuildQueued { build, pool, front } => {
                if self.queued.contains_key(&build) || self.running.contains_key(&build) {
                    // Already queued or running: queueing again could run it twice.
                    return out;
                }
                let p = self.pool_idx(&pool);
                self.seq += 1;
                self.queued.insert(build, (p, self.seq));
                let pool = &mut self.pools[p];
                if front {
                    pool.queue.push_front((build, self.seq));
                } else {
                    pool.queue.push_back((build, self.seq));
                }
                pool.queued_len += 1;
                self.assign(p, &mut out);
                self.provision(p, now, &mut out);
            }
            FleetEvent::BuildCancelled { build } => {
                if let Some((p, _)) = self.queued.remove(&build) {
                    let pool = &mut self.pools[p];
                    pool.queued_len -= 1;
                    // Cancelled entries stay in the deque until popped; compact when they
                    // dominate so a pool nobody serves cannot grow without bound.
                    if pool.queue.len() > 2 * pool.queued_len + 64 {
                        let queued = &self.queued;
                        pool.queue.retain(|(b, s)| queued.get(b).map(|&(_, qs)| qs) == Some(*s));
                    }
                }
            }
            FleetEvent::LaunchSucceeded { machine, provider_id } => {
                let Some(m) = self.machines.get_mut(&machine) else {
                    return out;
                };
                let p = m.pool;
                m.launch_pending = false;
                if m.provider_id.is_none() {
                    m.provider_id = Some(provider_id);
                    m.answered_at = Some(now);
                }
                self.pools[p].failures = 0;
                self.pools[p].backoff_until = None;
                if m.stop_after_launch {
                    // A stop was decided while the call was out: carry it out now.
                    m.stop_after_launch = false;
                    let reason = "stopped before its launch answered".to_string();
                    out.push(FleetAction::Terminate { machine, provider_id: m.provider_id.clone(), reason });
                } else if is_starting(m.state) && m.state != MachineState::Booting {
                    self.set_state(machine, MachineState::Booting, now, &mut out);
                    if self.draining {
                        self.terminate(machine, "draining", now, &mut out);
                    }
                }
            }
            FleetEvent::LaunchUnknown { machine, .. } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                if m.launch_pending {
                    out.push(FleetAction::Resolve { machine, requested_at: m.launched_at });
                }
            }
            FleetEvent::LaunchFailed { machine, reason } => {
                let Some(m) = self.machines.get_mut(&machine) else {
                    return out;
                };
                let p = m.pool;
                m.launch_pending = false;
                if m.stop_after_launch {
                    // Stopped while launching: stop it by its id anyway (the provisioner
                    // finds what is left of it); it is gone once that is confirmed.
                    m.stop_after_launch = false;
                    let reason = format!("launch failed: {reason}");
                    out.push(FleetAction::Terminate { machine, provider_id: None, reason });
                    self.backoff(p, now);
                } else if matches!(m.state, MachineState::Requested | MachineState::Launching | MachineState::Stopping)
                {
                    // A launch whose answer was lost or late may still have started the machine:
                    // if its agent has connected since, the machine is alive, whatever the call said.
                    self.gone(machine, &format!("launch failed: {reason}"), now, &mut out);
                    self.backoff(p, now);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::AgentConnected { machine, resumed } => self.connected(machine, resumed, now, &mut out),
            FleetEvent::Heartbeat { machine } => {
                if let Some(m) = self.machines.get_mut(&machine) {
                    if matches!(m.state, MachineState::Booting | MachineState::Idle | MachineState::Busy) {
                        m.last_seen = now;
                    }
                }
            }
            FleetEvent::AgentDisconnected { machine } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                let p = m.pool;
                match m.state {
                    // Its build may still be running: the agent has until the heartbeat limit
                    // (counted from when it was last heard) to reconnect.
                    MachineState::Busy => {
                        if let Some(m) = self.machines.get_mut(&machine) {
                            m.connected = false;
                        }
                    }
                    MachineState::Booting | MachineState::Idle => {
                        self.lose(machine, MachineState::Lost, "agent disconnected", now, &mut out);
                        self.provision(p, now, &mut out);
                    }
                    _ => {}
                }
            }
            FleetEvent::AgentLost { machine, reason } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                let p = m.pool;
                if matches!(m.state, MachineState::Booting | MachineState::Idle | MachineState::Busy) {
                    self.lose(machine, MachineState::Lost, &reason, now, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::AssignRefused { machine, build } => {
                let Some(m) = self.machines.get_mut(&machine) else {
                    return out;
                };
                if m.state != MachineState::Busy || m.build != Some(build) {
                    return out;
                }
                m.build = None;
                let p = m.pool;
                self.running.remove(&build);
                self.free(machine, p, now, &mut out);
                self.provision(p, now, &mut out);
            }
            FleetEvent::Interrupted { machine } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                let p = m.pool;
                if !matches!(
                    m.state,
                    MachineState::Stopping | MachineState::Gone | MachineState::Lost | MachineState::Interrupted
                ) {
                    self.lose(machine, MachineState::Interrupted, "spot interruption", now, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::BuildFinished { machine, build } => {
                let Some(m) = self.machines.get_mut(&machine) else {
                    return out;
                };
                if m.state != MachineState::Busy || m.build != Some(build) {
                    // Late result from a machine we already gave up on: its build was retried.
                    return out;
                }
                m.build = None;
                m.builds_run = m.builds_run.saturating_add(1);
                m.last_seen = now;
                let p = m.pool;
                self.running.remove(&build);
                let max = self.pools[p].spec.max_builds;
                if max > 0 && m.builds_run >= max {
                    self.terminate(machine, "reached max_builds", now, &mut out);
                } else {
                    self.free(machine, p, now, &mut out);
                }
                self.provision(p, now, &mut out);
            }
            FleetEvent::MachineGone { machine } => {
                if let Some(p) = self.machines.get(&machine).map(|m| m.pool) {
                    self.gone(machine, "machine gone", now, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::Vanished { machine } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                // A machine being stopped is gone once its stop is confirmed, not before.
                if m.state != MachineState::Stopping {
                    let p = m.pool;
                    self.gone(machine, "vanished from the cloud", now, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::Tick => self.tick(now, &mut out),
            FleetEvent::Drain => {
                self.draining = true;
                let mut stop: Vec<MachineId> = self
                    .machines
                    .iter()
                    .filter(|(_, m)| matches!(m.state, MachineState::Idle | MachineState::Booting))
                    .map(|(&id, _)| id)
                    .collect();
                // Deterministic output order regardless of hash order.
                stop.sort_unstable();
                for id in stop {
                    self.terminate(id, "draining", now, &mut out);
                }
            }
            FleetEvent::LaunchHold { pool, held } => {
                let p = self.pool_idx(&pool);
                self.pools[p].held = held;
                if !held {
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::Pause { pool, paused } => {
                let p = self.pool_idx(&pool);
                self.pools[p].paused = paused;
                if paused {
                    // Warm machines kept past their idle deadline go now: paused keeps none.
                    self.idle_sweep(p, now, &mut out);
                } else {
                    self.assign(p, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::StopMachine { machine, reason } => {
                if let Some(p) = self.machines.get(&machine).map(|m| m.pool) {
                    self.terminate(machine, &reason, now, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::Resume => {
                self.draining = false;
                for p in 0..self.pools.len() {
                    self.assign(p, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
        }
        self.drop_stale_timers();
        out
    }

    /// A machine's state, `None` once gone (or never known).
    pub fn machine_state(&self, id: MachineId) -> Option<MachineState> {
        self.machines.get(&id).map(|m| m.state)
    }

    /// The build a machine is running.
    pub fn machine_build(&self, id: MachineId) -> Option<BuildId> {
        self.machines.get(&id).and_then(|m| m.build)
    }

    /// What the fleet knows of a (not yet gone) machine.
    pub fn machine_view(&self, id: MachineId) -> Option<MachineView<'_>> {
        self.machines.get(&id).map(|m| self.view(m))
    }

    /// Every known (not gone) machine, in no particular order.
    pub fn machine_views(&self) -> impl Iterator<Item = (MachineId, MachineView<'_>)> {
        self.machines.iter().map(|(&id, m)| (id, self.view(m)))
    }

    fn view<'a>(&'a self, m: &'a Machine) -> MachineView<'a> {
        MachineView {
            pool: &self.pools[m.pool].spec.name,
            state: m.state,
            build: m.build,
            provider_id: m.provider_id.as_deref(),
            requested_at: m.launched_at,
            answered_at: m.answered_at,
        }
    }

    /// An admin's stop: refused when the machine is unknown or already on its way out;
    /// otherwise the actions (a build on it is retried elsewhere).
    pub fn stop_machine(&mut self, machine: MachineId, reason: &str, now: Ts) -> Result<Vec<FleetAction>, StopRefused> {
        match self.machine_state(machine) {
            None => Err(StopRefused::NotRunning),
            Some(s @ (MachineState::Stopping | MachineState::Lost | MachineState::Interrupted)) => {
                Err(StopRefused::Already(s))
            }
            Some(_) => Ok(self.handle(FleetEvent::StopMachine { machine, reason: reason.to_string() }, now)),
        }
    }

    /// The pool a (not yet gone) machine belongs to.
    pub fn machine_pool(&self, id: MachineId) -> Option<&str> {
        self.machines.get(&id).map(|m| self.pools[m.pool].spec.name.as_str())
    }

    /// Builds a machine has finished since launch.
    pub fn machine_builds_run(&self, id: MachineId) -> Option<u32> {
        self.machines.get(&id).map(|m| m.builds_run)
    }

    /// Every known (not gone) machine with its state, in id order.
    pub fn machines(&self) -> Vec<(MachineId, MachineState)> {
        let mut v: Vec<_> = self.machines.iter().map(|(&id, m)| (id, m.state)).collect();
        v.sort_unstable_by_key(|&(id, _)| id);
        v
    }

    /// The machine running a build, if it is running.
    pub fn build_machine(&self, build: BuildId) -> Option<MachineId> {
        self.running.get(&build).copied()
    }

    /// Whether a build is waiting in some pool's queue.
    pub fn is_queued(&self, build: BuildId) -> bool {
        self.queued.contains_key(&build)
    }

    /// Builds waiting in a pool's queue.
    pub fn queue_len(&self, pool: &str) -> usize {
        self.pool(pool).map_or(0, |p| p.queued_len)
    }

    /// A pool's queued builds, head first.
    pub fn queued(&self, pool: &str) -> Vec<BuildId> {
        let Some(p) = self.pool(pool) else {
            return Vec::new();
        };
        p.queue.iter().filter(|(b, s)| self.queued.get(b).map(|&(_, qs)| qs) == Some(*s)).map(|&(b, _)| b).collect()
    }

    /// Machines of a pool counted against `max_instances` (everything not gone).
    pub fn live_machines(&self, pool: &str) -> usize {
        self.pool(pool).map_or(0, |p| p.live)
    }

    /// Idle machines across all pools.
    pub fn idle_total(&self) -> usize {
        self.pools.iter().map(|p| p.idle.len()).sum()
    }

    /// Busy machines across all pools.
    pub fn busy_total(&self) -> usize {
        self.pools.iter().map(|p| p.busy).sum()
    }

    /// Whether a `Drain` is in effect.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The earliest time a `Tick` may change something (a boot, heartbeat or idle deadline,
    /// or the end of a launch backoff); `None` if nothing is pending. Never later than the
    /// true deadline.
    pub fn next_deadline(&self) -> Option<Ts> {
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let backoff = self.pools.iter().filter_map(|p| p.backoff_until).min();
        match (timer, backoff) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pool_index.get(name).map(|&i| &self.pools[i])
    }

    /// Index of a pool; an unknown name gets an empty pool with `max_instances = 0`, so its
    /// builds stay visibly queued instead of being dropped (config validation should prevent it).
    fn pool_idx(&mut self, name: &str) -> usize {
        if let Some(&i) = self.pool_index.get(name) {
            return i;
        }
        let i = self.pools.len();
        self.pools.push(Pool::new(PoolSpec {
            name: name.to_string(),
            max_instances: 0,
            min_idle: 0,
            idle_timeout: Duration::ZERO,
            boot_timeout: Duration::ZERO,
            max_builds: 0,
        }));
        self.pool_index.insert(name.to_string(), i);
        i
    }

    /// Move a machine to a new state, keeping the pool counters, idle set and timer in step.
    fn set_state(&mut self, id: MachineId, new: MachineState, now: Ts, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        let old = m.state;
        if old == new {
            return;
        }
        let pool = &mut self.pools[m.pool];
        match old {
            s if is_starting(s) => pool.starting -= 1,
            MachineState::Idle => {
                pool.idle.remove(&(m.idle_since, id));
            }
            MachineState::Busy => pool.busy -= 1,
            _ => {}
        }
        match new {
            s if is_starting(s) => pool.starting += 1,
            MachineState::Idle => {
                m.idle_since = now;
                pool.idle.insert((now, id));
            }
            MachineState::Busy => pool.busy += 1,
            MachineState::Gone => pool.live -= 1,
            _ => {}
        }
        m.state = new;
        out.push(FleetAction::SetState { machine: id, state: new });
        if new == MachineState::Gone {
            self.machines.remove(&id);
        } else {
            self.schedule(id, now);
        }
    }

    /// The next time this machine needs a look, given its state.
    fn deadline(&self, m: &Machine, now: Ts) -> Option<Ts> {
        let spec = &self.pools[m.pool].spec;
        match m.state {
            s if is_starting(s) => Some(m.launched_at.plus(spec.boot_timeout)),
            MachineState::Idle => {
                let hb = m.last_seen.plus(self.heartbeat_timeout);
                let idle = m.idle_since.plus(spec.idle_timeout);
                // Once past its idle deadline a machine kept for min_idle needs no more idle
                // checks; a newer idle machine's deadline triggers the pool sweep.
                Some(if idle > now { hb.min(idle) } else { hb })
            }
            MachineState::Busy => Some(m.last_seen.plus(self.heartbeat_timeout)),
            _ => None,
        }
    }

    fn schedule(&mut self, id: MachineId, now: Ts) {
        let Some(m) = self.machines.get(&id) else {
            return;
        };
        let d = self.deadline(m, now);
        if d != m.next_check {
            if let Some(t) = d {
                self.timers.push(Reverse((t, id)));
            }
            if let Some(m) = self.machines.get_mut(&id) {
                m.next_check = d;
            }
        }
    }

    fn drop_stale_timers(&mut self) {
        while let Some(&Reverse((t, id))) = self.timers.peek() {
            match self.machines.get(&id) {
                Some(m) if m.next_check == Some(t) => break,
                _ => {
                    self.timers.pop();
                }
            }
        }
    }

    fn tick(&mut self, now: Ts, out: &mut Vec<FleetAction>) {
        while let Some(&Reverse((t, id))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(m) = self.machines.get_mut(&id) else {
                continue;
            };
            if m.next_check != Some(t) {
                continue;
            }
            m.next_check = None;
            self.check(id, now, out);
        }
        for p in 0..self.pools.len() {
            // An ended backoff is cleared even where the pool launches nothing now (held,
            // paused, draining): a deadline in the past would wake the shell at once, forever.
            if self.pools[p].backoff_until.is_some_and(|t| t <= now) {
                self.pools[p].backoff_until = None;
            }
            self.idle_sweep(p, now, out);
            self.assign(p, out);
            self.provision(p, now, out);
        }
    }

    /// Apply boot and heartbeat timeouts to one machine whose timer fired.
    fn check(&mut self, id: MachineId, now: Ts, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get(&id) else {
            return;
        };
        let spec = &self.pools[m.pool].spec;
        match m.state {
            s if is_starting(s) => {
                if now >= m.launched_at.plus(spec.boot_timeout) {
                    // A machine that never came up is a failed launch: the pool backs off
                    // before the next, so a broken image is not relaunched in a hot loop.
                    let p = m.pool;
                    self.terminate(id, "boot timeout", now, out);
                    self.backoff(p, now);
                    return;
                }
            }
            MachineState::Busy => {
                if now >= m.last_seen.plus(self.heartbeat_timeout) {
                    self.lose(id, MachineState::Lost, "heartbeat timeout", now, out);
                    return;
                }
            }
            MachineState::Idle => {
                if now >= m.last_seen.plus(self.heartbeat_timeout) {
                    self.terminate(id, "heartbeat timeout", now, out);
                    return;
                }
            }
            _ => return,
        }
        self.schedule(id, now);
    }

    /// Stop idle machines past `idle_timeout`, oldest first, keeping `min_idle`.
    fn idle_sweep(&mut self, p: usize, now: Ts, out: &mut Vec<FleetAction>) {
        loop {
            let pool = &self.pools[p];
            // A paused pool keeps nothing warm: it is paused to stop spending.
            let keep = if pool.paused { 0 } else { pool.spec.min_idle as usize };
            if pool.idle.len() <= keep {
                return;
            }
            let Some(&(since, id)) = pool.idle.first() else {
                return;
            };
            if now < since.plus(pool.spec.idle_timeout) {
                return;
            }
            self.terminate(id, "idle timeout", now, out);
        }
    }

    /// Hand queued builds to idle machines (most recently idle first, so older ones can time out).
    fn assign(&mut self, p: usize, out: &mut Vec<FleetAction>) {
        if self.draining || self.pools[p].paused {
            return;
        }
        loop {
            let pool = &mut self.pools[p];
            if pool.queued_len == 0 {
                return;
            }
            let Some(&(since, id)) = pool.idle.last() else {
                return;
            };
            let Some(build) = pop_queued(pool, &mut self.queued) else {
                return;
            };
            pool.idle.remove(&(since, id));
            pool.busy += 1;
            let Some(m) = self.machines.get_mut(&id) else {
                return;
            };
            m.state = MachineState::Busy;
            m.build = Some(build);
            self.running.insert(build, id);
            out.push(FleetAction::SetState { machine: id, state: MachineState::Busy });
            out.push(FleetAction::Assign { machine: id, build });
            // Busy machines only need heartbeat checks.
            let hb = m.last_seen.plus(self.heartbeat_timeout);
            if m.next_check != Some(hb) {
                m.next_check = Some(hb);
                self.timers.push(Reverse((hb, id)));
            }
        }
    }

    /// Launch what the queue and `min_idle` need, within `max_instances`.
    fn provision(&mut self, p: usize, now: Ts, out: &mut Vec<FleetAction>) {
        if self.draining || self.pools[p].held || self.pools[p].paused {
            return;
        }
        let pool = &mut self.pools[p];
        match pool.backoff_until {
            Some(t) if now < t => return,
            Some(_) => pool.backoff_until = None,
            None => {}
        }
        let wanted = pool.queued_len + pool.spec.min_idle as usize;
        let available = pool.starting + pool.idle.len();
        let room = (pool.spec.max_instances as usize).saturating_sub(pool.live);
        let n = wanted.saturating_sub(available).min(room);
        for _ in 0..n {
            let id = self.next_id;
            self.next_id = id.next();
            pool.starting += 1;
            pool.live += 1;
            let deadline = now.plus(pool.spec.boot_timeout);
            // Requested while its row is written, Launching once the call is out.
            let mut m = Machine::new(p, MachineState::Launching, now);
            m.next_check = Some(deadline);
            m.launch_pending = true;
            self.machines.insert(id, m);
            self.timers.push(Reverse((deadline, id)));
            out.push(FleetAction::SetState { machine: id, state: MachineState::Requested });
            out.push(FleetAction::Launch { machine: id, pool: pool.spec.name.clone() });
            out.push(FleetAction::SetState { machine: id, state: MachineState::Launching });
        }
    }

    /// A launch failed: the pool waits before launching again, longer after each failure.
    fn backoff(&mut self, p: usize, now: Ts) {
        let pool = &mut self.pools[p];
        pool.failures = pool.failures.saturating_add(1);
        pool.backoff_until = Some(now.plus(launch_backoff(pool.failures)));
    }

    /// An agent said hello: accepted when the machine can take it, refused otherwise.
    fn connected(&mut self, machine: MachineId, resumed: Option<Option<BuildId>>, now: Ts, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get_mut(&machine) else {
            let reason = "no such machine is starting or running".to_string();
            out.push(FleetAction::Refuse { machine, reason });
            return;
        };
        let p = m.pool;
        match (resumed, m.state) {
            (None, s) if is_starting(s) => {
                m.last_seen = now;
                m.connected = true;
                out.push(FleetAction::Accept { machine, build: None });
                self.set_state(machine, MachineState::Idle, now, out);
                if self.draining {
                    self.terminate(machine, "draining", now, out);
                } else {
                    self.assign(p, out);
                    self.idle_sweep(p, now, out);
                    self.provision(p, now, out);
                }
            }
            (Some(spoken), MachineState::Busy | MachineState::Idle) => {
                let expected = m.build;
                if expected.is_some() && spoken != expected {
                    // The agent never got (or lost) the build the master gave it: retry it.
                    let reason = format!("its agent came back without build {}", expected.unwrap_or_default());
                    out.push(FleetAction::Refuse { machine, reason: reason.clone() });
                    self.lose(machine, MachineState::Lost, &reason, now, out);
                    self.provision(p, now, out);
                } else {
                    // Running it, or finished it: its reports (and BuildFinished) are sent again.
                    m.last_seen = now;
                    m.connected = true;
                    out.push(FleetAction::Accept { machine, build: expected });
                }
            }
            (_, s) => {
                let reason = format!("the machine is {} and cannot take this connection", s.as_str());
                out.push(FleetAction::Refuse { machine, reason });
            }
        }
    }

    /// A machine done with a build: stopped when draining, else idle and offered the queue
    /// (with no idle timeout, a machine left idle goes at once: no timer would be due).
    fn free(&mut self, machine: MachineId, p: usize, now: Ts, out: &mut Vec<FleetAction>) {
        if self.draining {
            self.terminate(machine, "draining", now, out);
        } else {
            self.set_state(machine, MachineState::Idle, now, out);
            self.assign(p, out);
            self.idle_sweep(p, now, out);
        }
    }

    /// Ask the provisioner to stop a machine (no-op if already stopping or lost).
    fn terminate(&mut self, id: MachineId, reason: &str, now: Ts, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        if matches!(
            m.state,
            MachineState::Stopping | MachineState::Gone | MachineState::Lost | MachineState::Interrupted
        ) {
            return;
        }
        if let Some(build) = m.build.take() {
            // Never lose a build, even if a caller terminates a busy machine.
            self.running.remove(&build);
            out.push(FleetAction::Retry { build, reason: reason.to_string() });
        }
        self.set_state(id, MachineState::Stopping, now, out);
        self.stop(id, reason, out);
    }

    /// Emit the provisioner's stop, or defer it until the launch answers with an id.
    fn stop(&mut self, id: MachineId, reason: &str, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        if m.launch_pending {
            m.stop_after_launch = true;
            return;
        }
        out.push(FleetAction::Terminate {
            machine: id,
            provider_id: m.provider_id.clone(),
            reason: reason.to_string(),
        });
    }

    /// The machine is unusable (`Lost`/`Interrupted`): retry its build and stop it.
    fn lose(&mut self, id: MachineId, state: MachineState, reason: &str, now: Ts, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        if let Some(build) = m.build.take() {
            self.running.remove(&build);
            out.push(FleetAction::Retry { build, reason: reason.to_string() });
        }
        self.set_state(id, state, now, out);
        self.stop(id, reason, out);
    }

    /// The machine no longer exists: retry its build if it had one and forget it.
    fn gone(&mut self, id: MachineId, reason: &str, now: Ts, out: &mut Vec<FleetAction>) {
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        if let Some(build) = m.build.take() {
            self.running.remove(&build);
            out.push(FleetAction::Retry { build, reason: reason.to_string() });
        }
        self.set_state(id, MachineState::Gone, now, out);
    }
}

/// What a restarted master knows of a machine the previous run left not gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftOver {
    /// Its state in the store.
    pub state: MachineState,
    /// The provider's id is recorded (the launch's answer was stored, or a lookup found it).
    pub launched: bool,
    /// Whether the provider lists it pending or running (only asked when `launched`).
    pub alive: Liveness,
    /// The store has a build running on it.
    pub running_build: bool,
    /// It was already looked up by its id (see [`Recovery::LookUp`]).
    pub looked_up: bool,
}

/// What the provider's listing said of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// The provider did not answer.
    Unknown,
}

/// What a restarted master does with a machine the previous run left (see [`recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Busy with a build its agent is still running: adopt it; the agent resumes.
    AdoptBusy,
    /// Launched, its agent not connected yet: keep it booting; its agent says hello with its
    /// one-time token, within `boot_timeout` counted from its launch.
    KeepBooting,
    /// The launch's outcome is unknown (the master died during the call): it counts against
    /// `max_instances` while the provider is asked for it, until its answer is final.
    Resolve,
    /// Past its launch but no answer named it (its agent connected before the launch's answer,
    /// and the previous run died in between): find it by its id, record what is found, and ask
    /// again with `launched` and `looked_up` set.
    LookUp,
    /// Anything else: stop it and record it gone.
    Stop,
}

/// The restart rule for one machine of the previous run.
pub fn recovery(m: LeftOver) -> Recovery {
    let launching = matches!(m.state, MachineState::Requested | MachineState::Launching);
    // Not known to be dead is not dead: a busy machine is taken back and its agent given the
    // heartbeat limit to reconnect, a booting one its boot timeout; the fleet retries the
    // build if it does not. Stopping it on a failed listing would retry a build still running.
    let dead = m.alive == Liveness::Dead;
    match m.state {
        _ if !m.launched && !m.looked_up && !launching => Recovery::LookUp,
        s if is_starting(s) && !m.launched => Recovery::Resolve,
        _ if !m.launched || dead => Recovery::Stop,
        MachineState::Busy if m.running_build => Recovery::AdoptBusy,
        // Booting, or launched with its state not yet moved on when the master died.
        s if is_starting(s) => Recovery::KeepBooting,
        _ => Recovery::Stop,
    }
}

/// Pop the head of a pool's queue, skipping cancelled leftovers.
fn pop_queued(pool: &mut Pool, queued: &mut HashMap<BuildId, (usize, u64)>) -> Option<BuildId> {
    while let Some((b, seq)) = pool.queue.pop_front() {
        if queued.get(&b).map(|&(_, s)| s) == Some(seq) {
            queued.remove(&b);
            pool.queued_len -= 1;
            return Some(b);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_keeps_what_can_go_on_and_resolves_what_it_cannot_know() {
        use Liveness::*;
        use MachineState::*;
        let m = |state, launched, alive, running_build| LeftOver {
            state,
            launched,
            alive,
            running_build,
            looked_up: launched || matches!(state, Requested | Launching),
        };
        assert_eq!(recovery(m(Requested, false, Dead, false)), Recovery::Resolve);
        assert_eq!(recovery(m(Launching, false, Dead, false)), Recovery::Resolve);
        assert_eq!(recovery(m(Booting, true, Alive, false)), Recovery::KeepBooting);
        // The answer was stored but the state not yet moved on.
        assert_eq!(recovery(m(Requested, true, Alive, false)), Recovery::KeepBooting);
        assert_eq!(recovery(m(Booting, true, Dead, false)), Recovery::Stop, "dead while the master was down");
        assert_eq!(recovery(m(Busy, true, Alive, true)), Recovery::AdoptBusy);
        assert_eq!(recovery(m(Busy, true, Alive, false)), Recovery::Stop, "busy with nothing");
        assert_eq!(recovery(m(Busy, true, Dead, true)), Recovery::Stop);
        for s in [Idle, Stopping, Lost, Interrupted] {
            assert_eq!(recovery(m(s, true, Alive, false)), Recovery::Stop, "{s:?}");
        }
        // A provider that did not answer: taken as alive until the agents say otherwise.
        assert_eq!(recovery(m(Busy, true, Unknown, true)), Recovery::AdoptBusy);
        assert_eq!(recovery(m(Booting, true, Unknown, false)), Recovery::KeepBooting);
        // Busy (or booting) with no launch answer recorded: looked up first, then judged.
        let unnamed = LeftOver { state: Busy, launched: false, alive: Dead, running_build: true, looked_up: false };
        assert_eq!(recovery(unnamed), Recovery::LookUp);
        assert_eq!(recovery(LeftOver { looked_up: true, ..unnamed }), Recovery::Stop, "not found");
        let found = LeftOver { launched: true, alive: Alive, looked_up: true, ..unnamed };
        assert_eq!(recovery(found), Recovery::AdoptBusy);
    }

    const S: i64 = 1000;

    fn spec(name: &str, max: u32, min_idle: u32, max_builds: u32) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            max_instances: max,
            min_idle,
            idle_timeout: Duration::from_secs(600),
            boot_timeout: Duration::from_secs(300),
            max_builds,
        }
    }

    fn fleet(specs: Vec<PoolSpec>) -> Fleet {
        Fleet::new(specs, Duration::from_secs(60), MachineId(1))
    }

    fn q(f: &mut Fleet, build: BuildId, now: i64) -> Vec<FleetAction> {
        f.handle(FleetEvent::BuildQueued { build, pool: "p".into(), front: false }, Ts(now))
    }

    fn launched(a: &[FleetAction]) -> Vec<MachineId> {
        a.iter()
            .filter_map(|a| match a {
                FleetAction::Launch { machine, .. } => Some(*machine),
                _ => None,
            })
            .collect()
    }

    fn has_terminate(a: &[FleetAction], m: MachineId) -> bool {
        a.iter().any(|a| matches!(a, FleetAction::Terminate { machine, .. } if *machine == m))
    }

    /// Launch, boot and connect machine `m`, returning the connect actions.
    fn bring_up(f: &mut Fleet, m: MachineId, now: i64) -> Vec<FleetAction> {
        f.handle(FleetEvent::LaunchSucceeded { machine: m, provider_id: format!("i-{}", m) }, Ts(now));
        f.handle(FleetEvent::AgentConnected { machine: m, resumed: None }, Ts(now))
    }

    #[test]
    fn queued_build_launches_and_assigns() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        let a = q(&mut f, BuildId(10), 0);
        assert_eq!(
            a,
            vec![
                FleetAction::SetState { machine: MachineId(1), state: MachineState::Requested },
                FleetAction::Launch { machine: MachineId(1), pool: "p".into() },
                FleetAction::SetState { machine: MachineId(1), state: MachineState::Launching },
            ]
        );
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Launching));
        f.handle(FleetEvent::LaunchSucceeded { machine: MachineId(1), provider_id: format!("i-{}", 1) }, Ts(S));
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Booting));
        let a = f.handle(FleetEvent::AgentConnected { machine: MachineId(1), resumed: None }, Ts(2 * S));
        assert!(a.contains(&FleetAction::Assign { machine: MachineId(1), build: BuildId(10) }));
        assert_eq!(f.machine_build(MachineId(1)), Some(BuildId(10)));
        assert_eq!(f.queue_len("p"), 0);
        // Finished: idle, no new launch.
        let a = f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(10) }, Ts(3 * S));
        assert_eq!(a, vec![FleetAction::SetState { machine: MachineId(1), state: MachineState::Idle }]);
        // Next build goes straight to the idle machine.
        let a = q(&mut f, BuildId(11), 4 * S);
        assert!(a.contains(&FleetAction::Assign { machine: MachineId(1), build: BuildId(11) }));
        assert!(launched(&a).is_empty());
    }

    #[test]
    fn a_held_pool_launches_nothing_but_its_warm_machine_keeps_working() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        let hold = |held| FleetEvent::LaunchHold { pool: "p".into(), held };
        assert_eq!(launched(&q(&mut f, BuildId(10), 0)), vec![MachineId(1)]);
        bring_up(&mut f, MachineId(1), S);
        assert_eq!(f.machine_build(MachineId(1)), Some(BuildId(10)));
        // A spend cap is reached.
        assert!(f.handle(hold(true), Ts(S)).is_empty());
        let a = q(&mut f, BuildId(11), 2 * S);
        assert!(launched(&a).is_empty(), "no launch while held: {a:?}");
        // The running machine finishes and takes the queued build: no new spend needed.
        let a = f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(10) }, Ts(3 * S));
        assert!(a.contains(&FleetAction::Assign { machine: MachineId(1), build: BuildId(11) }));
        let a = q(&mut f, BuildId(12), 4 * S);
        assert!(launched(&a).is_empty());
        assert_eq!(f.queued("p"), vec![BuildId(12)]);
        // Lifted: the queue gets its machine.
        assert_eq!(launched(&f.handle(hold(false), Ts(5 * S))), vec![MachineId(2)]);
    }

    #[test]
    fn a_paused_pool_starts_nothing_until_resumed() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        let pause = |paused| FleetEvent::Pause { pool: "p".into(), paused };
        assert_eq!(launched(&q(&mut f, BuildId(10), 0)), vec![MachineId(1)]);
        bring_up(&mut f, MachineId(1), S);
        assert!(f.handle(pause(true), Ts(S)).is_empty());
        // Queued while paused: no launch, and the warm machine does not take it either.
        assert!(q(&mut f, BuildId(11), 2 * S).is_empty());
        let a = f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(10) }, Ts(3 * S));
        assert_eq!(a, vec![FleetAction::SetState { machine: MachineId(1), state: MachineState::Idle }]);
        assert_eq!(f.queued("p"), vec![BuildId(11)]);
        // Resumed: the idle machine takes the build.
        let a = f.handle(pause(false), Ts(4 * S));
        assert!(a.contains(&FleetAction::Assign { machine: MachineId(1), build: BuildId(11) }), "{a:?}");
    }

    #[test]
    fn a_paused_pool_lets_its_warm_machines_time_out() {
        let mut f = fleet(vec![PoolSpec { idle_timeout: Duration::from_secs(60), ..spec("p", 4, 1, 0) }]);
        let a = f.handle(FleetEvent::Tick, Ts(0));
        assert_eq!(launched(&a), vec![MachineId(1)], "min_idle keeps one warm");
        f.handle(FleetEvent::LaunchSucceeded { machine: MachineId(1), provider_id: format!("i-{}", 1) }, Ts(S));
        f.handle(FleetEvent::AgentConnected { machine: MachineId(1), resumed: None }, Ts(S));
        f.handle(FleetEvent::Pause { pool: "p".into(), paused: true }, Ts(2 * S));
        f.handle(FleetEvent::Heartbeat { machine: MachineId(1) }, Ts(60 * S));
        let a = f.handle(FleetEvent::Tick, Ts(62 * S));
        assert!(
            a.contains(&FleetAction::Terminate {
                machine: MachineId(1),
                provider_id: Some("i-1".into()),
                reason: "idle timeout".into()
            }),
            "past idle_timeout while paused: {a:?}"
        );
        assert!(launched(&a).is_empty(), "and no replacement");
    }

    #[test]
    fn stopping_a_busy_machine_retries_its_build() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        q(&mut f, BuildId(10), 0);
        bring_up(&mut f, MachineId(1), S);
        let a = f.handle(FleetEvent::StopMachine { machine: MachineId(1), reason: "by admin".into() }, Ts(2 * S));
        assert!(a.contains(&FleetAction::Retry { build: BuildId(10), reason: "by admin".into() }), "{a:?}");
        assert!(has_terminate(&a, MachineId(1)));
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Stopping));
        assert!(f
            .handle(FleetEvent::StopMachine { machine: MachineId(1), reason: "again".into() }, Ts(3 * S))
            .is_empty());
    }

    #[test]
    fn max_instances_caps_launches() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        let mut l = Vec::new();
        for b in 0..5 {
            l.extend(launched(&q(&mut f, BuildId(b), 0)));
        }
        assert_eq!(l, vec![MachineId(1), MachineId(2)]);
        assert_eq!(f.live_machines("p"), 2);
        assert_eq!(f.queued("p"), vec![BuildId(0), BuildId(1), BuildId(2), BuildId(3), BuildId(4)]);
    }

    #[test]
    fn retry_goes_to_front() {
        let mut f = fleet(vec![spec("p", 0, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        q(&mut f, BuildId(2), 0);
        f.handle(FleetEvent::BuildQueued { build: BuildId(3), pool: "p".into(), front: true }, Ts(0));
        assert_eq!(f.queued("p"), vec![BuildId(3), BuildId(1), BuildId(2)]);
        f.handle(FleetEvent::BuildCancelled { build: BuildId(1) }, Ts(0));
        assert_eq!(f.queued("p"), vec![BuildId(3), BuildId(2)]);
        assert_eq!(f.queue_len("p"), 2);
    }

    #[test]
    fn duplicate_queue_is_ignored() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        assert!(q(&mut f, BuildId(1), 0).is_empty());
        assert_eq!(f.queue_len("p"), 1);
    }

    #[test]
    fn launch_failure_relaunches_after_a_growing_backoff() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        let a = f.handle(FleetEvent::LaunchFailed { machine: MachineId(1), reason: "capacity".into() }, Ts(S));
        assert!(a.contains(&FleetAction::SetState { machine: MachineId(1), state: MachineState::Gone }));
        assert!(launched(&a).is_empty(), "not at once: {a:?}");
        assert_eq!(f.machine_state(MachineId(1)), None);
        // The loop sleeps until the backoff ends, then the queue gets its machine.
        assert_eq!(f.next_deadline(), Some(Ts(2 * S)));
        assert!(launched(&f.handle(FleetEvent::Tick, Ts(2 * S - 1))).is_empty());
        assert_eq!(launched(&f.handle(FleetEvent::Tick, Ts(2 * S))), vec![MachineId(2)]);
        // A second failure in a row waits twice as long.
        f.handle(FleetEvent::LaunchFailed { machine: MachineId(2), reason: "capacity".into() }, Ts(3 * S));
        assert_eq!(f.next_deadline(), Some(Ts(5 * S)));
        assert!(launched(&f.handle(FleetEvent::Tick, Ts(4 * S))).is_empty());
        assert_eq!(launched(&f.handle(FleetEvent::Tick, Ts(5 * S))), vec![MachineId(3)]);
        // A success resets it: the next failure waits 1 s again.
        f.handle(FleetEvent::LaunchSucceeded { machine: MachineId(3), provider_id: "i-3".into() }, Ts(6 * S));
        let a = f.handle(FleetEvent::MachineGone { machine: MachineId(3) }, Ts(7 * S));
        assert_eq!(launched(&a), vec![MachineId(4)], "{a:?}");
        f.handle(FleetEvent::LaunchFailed { machine: MachineId(4), reason: "capacity".into() }, Ts(8 * S));
        assert_eq!(launched(&f.handle(FleetEvent::Tick, Ts(9 * S))), vec![MachineId(5)]);
        assert_eq!(launch_backoff(0), Duration::from_secs(1));
        assert_eq!(launch_backoff(7), Duration::from_secs(64));
        assert_eq!(launch_backoff(u32::MAX), Duration::from_secs(64), "capped");
    }

    #[test]
    fn a_stop_decided_before_the_launch_answers_waits_for_the_answer() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        q(&mut f, BuildId(2), 0);
        for m in [MachineId(1), MachineId(2)] {
            let a = f.stop_machine(m, "by admin", Ts(S)).expect("a launching machine can be stopped");
            // Its launch is still out: nothing to stop yet, but it is on its way out.
            assert!(!has_terminate(&a, m), "{a:?}");
            assert_eq!(f.machine_state(m), Some(MachineState::Stopping));
        }
        assert!(!has_terminate(&f.handle(FleetEvent::Tick, Ts(2 * S)), MachineId(1)));
        // The answer names the instance: it is stopped by that id.
        let a = f.handle(FleetEvent::LaunchSucceeded { machine: MachineId(1), provider_id: "i-1".into() }, Ts(3 * S));
        assert_eq!(
            a,
            vec![FleetAction::Terminate {
                machine: MachineId(1),
                provider_id: Some("i-1".into()),
                reason: "stopped before its launch answered".into()
            }]
        );
        // A failed launch may still have left something: stopped by the machine's own id, and
        // counted against the limit until the stop is confirmed.
        let a = f.handle(FleetEvent::LaunchFailed { machine: MachineId(2), reason: "timed out".into() }, Ts(3 * S));
        assert!(a.contains(&FleetAction::Terminate {
            machine: MachineId(2),
            provider_id: None,
            reason: "launch failed: timed out".into()
        }));
        assert_eq!(f.machine_state(MachineId(2)), Some(MachineState::Stopping));
        assert_eq!(f.live_machines("p"), 2);
        assert!(launched(&f.handle(FleetEvent::Tick, Ts(3 * S))).is_empty(), "no room until it is gone");
        let a = f.handle(FleetEvent::MachineGone { machine: MachineId(2) }, Ts(4 * S));
        assert_eq!(launched(&a), vec![MachineId(3)], "its place is free once the stop is confirmed");
    }

    #[test]
    fn an_unknown_launch_outcome_is_looked_up_and_counted() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        let a = f.handle(FleetEvent::LaunchUnknown { machine: MachineId(1), reason: "timed out".into() }, Ts(S));
        assert_eq!(a, vec![FleetAction::Resolve { machine: MachineId(1), requested_at: Ts(0) }]);
        assert_eq!(f.live_machines("p"), 1, "it may exist: it counts against max_instances");
        assert!(launched(&q(&mut f, BuildId(2), 2 * S)).is_empty());
        // Found: it boots as any other.
        f.handle(FleetEvent::LaunchSucceeded { machine: MachineId(1), provider_id: "i-1".into() }, Ts(3 * S));
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Booting));
        // A second unknown answer for a launch already answered asks nothing.
        assert!(f
            .handle(FleetEvent::LaunchUnknown { machine: MachineId(1), reason: "late".into() }, Ts(4 * S))
            .is_empty());
    }

    #[test]
    fn a_busy_agent_that_comes_back_with_another_build_is_refused_and_its_build_retried() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        q(&mut f, BuildId(7), 0);
        bring_up(&mut f, MachineId(1), 0);
        f.handle(FleetEvent::AgentDisconnected { machine: MachineId(1) }, Ts(S));
        let a = f.handle(FleetEvent::AgentConnected { machine: MachineId(1), resumed: Some(None) }, Ts(2 * S));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Refuse { machine: MachineId(1), .. })), "{a:?}");
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: BuildId(7), .. })), "{a:?}");
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Lost));
        // A first hello from a machine already running is refused too, and changes nothing.
        q(&mut f, BuildId(8), 3 * S);
        bring_up(&mut f, MachineId(2), 3 * S);
        let a = f.handle(FleetEvent::AgentConnected { machine: MachineId(2), resumed: None }, Ts(4 * S));
        assert!(matches!(a.as_slice(), [FleetAction::Refuse { machine: MachineId(2), .. }]), "{a:?}");
        assert_eq!(f.machine_build(MachineId(2)), Some(BuildId(8)));
    }

    #[test]
    fn an_admins_stop_is_refused_for_what_is_not_running() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        assert_eq!(f.stop_machine(MachineId(1), "by admin", Ts(0)), Err(StopRefused::NotRunning));
        q(&mut f, BuildId(1), 0);
        bring_up(&mut f, MachineId(1), 0);
        let a = f.stop_machine(MachineId(1), "by admin", Ts(S)).expect("a running machine can be stopped");
        assert!(has_terminate(&a, MachineId(1)));
        assert_eq!(f.stop_machine(MachineId(1), "again", Ts(2 * S)), Err(StopRefused::Already(MachineState::Stopping)));
    }

    #[test]
    fn a_refused_assignment_does_not_count_as_a_build_run() {
        let mut f = fleet(vec![spec("p", 1, 0, 1)]);
        q(&mut f, BuildId(1), 0);
        bring_up(&mut f, MachineId(1), 0);
        assert_eq!(f.machine_build(MachineId(1)), Some(BuildId(1)));
        // The store refused to start it (cancelled meanwhile): the ephemeral machine is idle again.
        let a = f.handle(FleetEvent::AssignRefused { machine: MachineId(1), build: BuildId(1) }, Ts(S));
        assert_eq!(a, vec![FleetAction::SetState { machine: MachineId(1), state: MachineState::Idle }]);
        assert_eq!(f.machine_builds_run(MachineId(1)), Some(0));
        let a = q(&mut f, BuildId(2), 2 * S);
        assert!(a.contains(&FleetAction::Assign { machine: MachineId(1), build: BuildId(2) }), "{a:?}");
    }

    #[test]
    fn an_agent_lost_while_sending_its_job_retries_the_build() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        bring_up(&mut f, MachineId(1), 0);
        let a = f.handle(FleetEvent::AgentLost { machine: MachineId(1), reason: "send failed".into() }, Ts(S));
        assert!(a.contains(&FleetAction::Retry { build: BuildId(1), reason: "send failed".into() }));
        assert!(a.contains(&FleetAction::SetState { machine: MachineId(1), state: MachineState::Lost }));
        assert!(has_terminate(&a, MachineId(1)));
    }

    #[test]
    fn a_machine_that_vanishes_while_stopping_is_gone_only_once_confirmed() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        bring_up(&mut f, MachineId(1), 0);
        f.stop_machine(MachineId(1), "by admin", Ts(S)).expect("running");
        assert!(f.handle(FleetEvent::Vanished { machine: MachineId(1) }, Ts(2 * S)).is_empty());
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Stopping));
        // A running machine that vanishes is gone; its build was already retried by the stop.
        q(&mut f, BuildId(2), 3 * S);
        f.handle(FleetEvent::MachineGone { machine: MachineId(1) }, Ts(3 * S));
        bring_up(&mut f, MachineId(2), 4 * S);
        assert_eq!(f.machine_build(MachineId(2)), Some(BuildId(2)));
        let a = f.handle(FleetEvent::Vanished { machine: MachineId(2) }, Ts(5 * S));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: BuildId(2), .. })), "{a:?}");
        assert_eq!(f.machine_state(MachineId(2)), None);
    }

    #[test]
    fn a_late_launch_failure_does_not_kill_a_machine_whose_agent_connected() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        // The launch call timed out, but the instance booted and its agent connected first.
        let a = f.handle(FleetEvent::AgentConnected { machine: MachineId(1), resumed: None }, Ts(S));
        assert!(a.contains(&FleetAction::Assign { machine: MachineId(1), build: BuildId(1) }));
        let a = f.handle(FleetEvent::LaunchFailed { machine: MachineId(1), reason: "timed out".into() }, Ts(2 * S));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(f.machine_build(MachineId(1)), Some(BuildId(1)));
    }

    #[test]
    fn boot_timeout_terminates_and_relaunches() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        f.handle(FleetEvent::LaunchSucceeded { machine: MachineId(1), provider_id: format!("i-{}", 1) }, Ts(S));
        assert_eq!(f.next_deadline(), Some(Ts(300 * S)));
        assert!(f.handle(FleetEvent::Tick, Ts(299 * S)).is_empty());
        let a = f.handle(FleetEvent::Tick, Ts(300 * S));
        assert!(has_terminate(&a, MachineId(1)));
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Stopping));
        // Still counted against max_instances until gone.
        assert!(launched(&a).is_empty());
        // Gone at once: the next launch waits out the backoff a failed boot earns.
        let a = f.handle(FleetEvent::MachineGone { machine: MachineId(1) }, Ts(300 * S + 500));
        assert!(launched(&a).is_empty(), "{a:?}");
        assert_eq!(launched(&f.handle(FleetEvent::Tick, Ts(301 * S))), vec![MachineId(2)]);
    }

    #[test]
    fn an_idle_timeout_of_zero_stops_a_machine_as_soon_as_it_is_idle() {
        let mut f = fleet(vec![PoolSpec { idle_timeout: Duration::ZERO, ..spec("p", 1, 0, 0) }]);
        q(&mut f, BuildId(1), 0);
        bring_up(&mut f, MachineId(1), 0);
        let a = f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(1) }, Ts(5 * S));
        assert!(has_terminate(&a, MachineId(1)), "stopped at once, not left to the heartbeat limit: {a:?}");
    }

    #[test]
    fn idle_timeout_keeps_min_idle() {
        let mut f = fleet(vec![spec("p", 3, 1, 0)]);
        // min_idle launches one machine with no queue.
        let a = f.handle(FleetEvent::Tick, Ts(0));
        assert_eq!(launched(&a), vec![MachineId(1)]);
        q(&mut f, BuildId(10), 0);
        q(&mut f, BuildId(11), 0);
        for m in (1..=3).map(MachineId) {
            bring_up(&mut f, m, 0);
        }
        f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(10) }, Ts(10 * S));
        f.handle(FleetEvent::BuildFinished { machine: MachineId(2), build: BuildId(11) }, Ts(20 * S));
        // Keep heartbeats flowing so only idle timeouts matter.
        for t in (0..=700).step_by(30) {
            for m in (1..=3).map(MachineId) {
                f.handle(FleetEvent::Heartbeat { machine: m }, Ts(t * S));
            }
        }
        assert_eq!(f.idle_total(), 3);
        // Machine 3 became idle at 0 (no build left), 1 at 10s, 2 at 20s.
        let a = f.handle(FleetEvent::Tick, Ts(600 * S));
        assert!(has_terminate(&a, MachineId(3)));
        assert!(!has_terminate(&a, MachineId(1)));
        let a = f.handle(FleetEvent::Tick, Ts(625 * S));
        assert!(has_terminate(&a, MachineId(1)));
        assert!(!has_terminate(&a, MachineId(2)), "min_idle = 1 keeps the newest idle machine");
        assert!(f.handle(FleetEvent::Tick, Ts(700 * S)).is_empty());
        assert_eq!(f.machine_state(MachineId(2)), Some(MachineState::Idle));
    }

    #[test]
    fn ephemeral_machine_runs_one_build() {
        let mut f = fleet(vec![spec("p", 2, 0, 1)]);
        q(&mut f, BuildId(1), 0);
        q(&mut f, BuildId(2), 0);
        bring_up(&mut f, MachineId(1), 0);
        bring_up(&mut f, MachineId(2), 0);
        let a = f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(1) }, Ts(S));
        assert!(has_terminate(&a, MachineId(1)));
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Stopping));
        q(&mut f, BuildId(3), 2 * S);
        assert_eq!(f.queue_len("p"), 1, "the stopping machine takes nothing");
        let a = f.handle(FleetEvent::MachineGone { machine: MachineId(1) }, Ts(3 * S));
        assert_eq!(launched(&a), vec![MachineId(3)]);
    }

    #[test]
    fn heartbeat_loss_retries_build() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        q(&mut f, BuildId(7), 0);
        bring_up(&mut f, MachineId(1), 0);
        f.handle(FleetEvent::Heartbeat { machine: MachineId(1) }, Ts(30 * S));
        assert!(f.handle(FleetEvent::Tick, Ts(60 * S)).is_empty());
        let a = f.handle(FleetEvent::Tick, Ts(90 * S));
        assert!(a.contains(&FleetAction::SetState { machine: MachineId(1), state: MachineState::Lost }));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: BuildId(7), .. })));
        assert!(has_terminate(&a, MachineId(1)));
        assert_eq!(f.machine_build(MachineId(1)), None);
        // The late result is ignored; the retry runs elsewhere.
        assert!(f
            .handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(7) }, Ts(91 * S))
            .is_empty());
        let a = f.handle(FleetEvent::BuildQueued { build: BuildId(8), pool: "p".into(), front: true }, Ts(92 * S));
        assert_eq!(launched(&a), vec![MachineId(2)]);
    }

    #[test]
    fn a_busy_disconnect_waits_for_the_heartbeat_limit_and_gone_retries() {
        let mut f = fleet(vec![spec("p", 3, 0, 0)]);
        q(&mut f, BuildId(7), 0);
        bring_up(&mut f, MachineId(1), 0);
        // Its build may still run: no decision yet.
        assert!(f.handle(FleetEvent::AgentDisconnected { machine: MachineId(1) }, Ts(S)).is_empty());
        assert_eq!(f.machine_state(MachineId(1)), Some(MachineState::Busy));
        // It comes back speaking of its build: accepted, the build goes on.
        let a =
            f.handle(FleetEvent::AgentConnected { machine: MachineId(1), resumed: Some(Some(BuildId(7))) }, Ts(10 * S));
        assert_eq!(a, vec![FleetAction::Accept { machine: MachineId(1), build: Some(BuildId(7)) }]);
        // Gone again and silent past the heartbeat limit: lost, its build retried.
        f.handle(FleetEvent::AgentDisconnected { machine: MachineId(1) }, Ts(11 * S));
        assert!(f.handle(FleetEvent::Tick, Ts(69 * S)).is_empty());
        let a = f.handle(FleetEvent::Tick, Ts(70 * S));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: BuildId(7), .. })), "{a:?}");
        assert!(a.contains(&FleetAction::SetState { machine: MachineId(1), state: MachineState::Lost }));
        // An idle agent that disconnects is lost at once.
        q(&mut f, BuildId(9), 71 * S);
        let m = launched(&f.handle(FleetEvent::Tick, Ts(71 * S)));
        let m = m.first().copied().unwrap_or_else(|| f.build_machine(BuildId(9)).unwrap_or(MachineId(2)));
        bring_up(&mut f, m, 72 * S);
        f.handle(FleetEvent::BuildFinished { machine: m, build: BuildId(9) }, Ts(73 * S));
        let a = f.handle(FleetEvent::AgentDisconnected { machine: m }, Ts(74 * S));
        assert!(a.contains(&FleetAction::SetState { machine: m, state: MachineState::Lost }), "{a:?}");
        q(&mut f, BuildId(8), 75 * S);
        let m2 = m.next();
        bring_up(&mut f, m2, 75 * S);
        let a = f.handle(FleetEvent::MachineGone { machine: m2 }, Ts(76 * S));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: BuildId(8), .. })), "{a:?}");
    }

    #[test]
    fn drain_stops_idle_and_lets_busy_finish() {
        let mut f = fleet(vec![spec("p", 3, 0, 0)]);
        q(&mut f, BuildId(1), 0);
        q(&mut f, BuildId(2), 0);
        bring_up(&mut f, MachineId(1), 0);
        bring_up(&mut f, MachineId(2), 0);
        f.handle(FleetEvent::BuildFinished { machine: MachineId(2), build: BuildId(2) }, Ts(S));
        let a = f.handle(FleetEvent::Drain, Ts(2 * S));
        assert!(has_terminate(&a, MachineId(2)));
        assert!(!has_terminate(&a, MachineId(1)));
        assert!(launched(&q(&mut f, BuildId(3), 3 * S)).is_empty());
        let a = f.handle(FleetEvent::BuildFinished { machine: MachineId(1), build: BuildId(1) }, Ts(4 * S));
        assert!(has_terminate(&a, MachineId(1)));
        assert!(f.is_draining());
        let a = f.handle(FleetEvent::Resume, Ts(5 * S));
        assert_eq!(launched(&a).len(), 1);
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        for e in [
            FleetEvent::LaunchSucceeded { machine: MachineId(99), provider_id: format!("i-{}", 99) },
            FleetEvent::LaunchFailed { machine: MachineId(99), reason: String::new() },
            FleetEvent::LaunchUnknown { machine: MachineId(99), reason: String::new() },
            FleetEvent::Heartbeat { machine: MachineId(99) },
            FleetEvent::AgentLost { machine: MachineId(99), reason: String::new() },
            FleetEvent::AssignRefused { machine: MachineId(99), build: BuildId(1) },
            FleetEvent::Vanished { machine: MachineId(99) },
            FleetEvent::StopMachine { machine: MachineId(99), reason: String::new() },
            FleetEvent::AgentDisconnected { machine: MachineId(99) },
            FleetEvent::BuildFinished { machine: MachineId(99), build: BuildId(1) },
            FleetEvent::MachineGone { machine: MachineId(99) },
            FleetEvent::Interrupted { machine: MachineId(99) },
            FleetEvent::BuildCancelled { build: BuildId(5) },
        ] {
            assert!(f.handle(e, Ts(0)).is_empty());
        }
        // An agent naming no known machine is told to go.
        let a = f.handle(FleetEvent::AgentConnected { machine: MachineId(99), resumed: None }, Ts(0));
        assert!(matches!(a.as_slice(), [FleetAction::Refuse { machine: MachineId(99), .. }]), "{a:?}");
    }

    #[test]
    fn unknown_pool_keeps_build_queued() {
        let mut f = fleet(vec![]);
        let a = f.handle(FleetEvent::BuildQueued { build: BuildId(1), pool: "nope".into(), front: false }, Ts(0));
        assert!(a.is_empty());
        assert_eq!(f.queue_len("nope"), 1);
    }
}

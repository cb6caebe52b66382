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
    /// The provisioner started the machine (`Requested` -> `Booting`).
    LaunchSucceeded { machine: MachineId },
    /// The provisioner could not start the machine; it is gone, the queue still wants one.
    LaunchFailed { machine: MachineId, reason: String },
    /// The machine's agent authenticated.
    AgentConnected { machine: MachineId },
    /// The machine's agent is alive.
    Heartbeat { machine: MachineId },
    /// The agent's connection closed.
    AgentDisconnected { machine: MachineId },
    /// The machine finished its build (any result).
    BuildFinished { machine: MachineId, build: BuildId },
    /// The provisioner confirmed the machine has stopped (or it vanished).
    MachineGone { machine: MachineId },
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
    /// Send this build to this machine (machine is now `Busy`).
    Assign { machine: MachineId, build: BuildId },
    /// Stop this machine through its provisioner.
    Terminate { machine: MachineId, reason: String },
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
    pub fn restore_machine(
        &mut self,
        machine: MachineId,
        pool: &str,
        state: MachineState,
        build: Option<BuildId>,
        builds_run: u32,
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
        self.next_id = self.next_id.max(machine.saturating_add(1));
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
        self.machines.insert(
            machine,
            Machine {
                pool: p,
                state,
                build,
                launched_at: now,
                last_seen: now,
                idle_since: now,
                builds_run,
                next_check: None,
            },
        );
        self.schedule(machine, now);
    }

    /// Feed one event; returns the actions the shell must carry out, in order.
    ///
    /// `LaunchFailed` frees the slot and, if the queue still wants a machine, launches a new
    /// one at once: backing off after repeated failures is the shell's job (it can delay
    /// feeding `LaunchFailed`, or `Drain`).
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
            FleetEvent::LaunchSucceeded { machine } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                if matches!(m.state, MachineState::Requested | MachineState::Launching) {
                    self.set_state(machine, MachineState::Booting, now, &mut out);
                    if self.draining {
                        self.terminate(machine, "draining", now, &mut out);
                    }
                }
            }
            FleetEvent::LaunchFailed { machine, reason } => {
                let Some(m) = self.machines.get(&machine) else {
                    return out;
                };
                // A launch whose answer was lost or late may still have started the machine:
                // if its agent has connected since, the machine is alive, whatever the call said.
                if matches!(m.state, MachineState::Requested | MachineState::Launching | MachineState::Stopping) {
                    let p = m.pool;
                    self.gone(machine, &format!("launch failed: {reason}"), now, &mut out);
                    self.provision(p, now, &mut out);
                }
            }
            FleetEvent::AgentConnected { machine } => {
                let Some(m) = self.machines.get_mut(&machine) else {
                    return out;
                };
                let p = m.pool;
                match m.state {
                    s if is_starting(s) => {
                        m.last_seen = now;
                        self.set_state(machine, MachineState::Idle, now, &mut out);
                        if self.draining {
                            self.terminate(machine, "draining", now, &mut out);
                        } else {
                            self.assign(p, &mut out);
                            self.provision(p, now, &mut out);
                        }
                    }
                    // A reconnect of a live agent only proves it is alive.
                    MachineState::Idle | MachineState::Busy => m.last_seen = now,
                    _ => {}
                }
            }
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
                if matches!(m.state, MachineState::Booting | MachineState::Idle | MachineState::Busy) {
                    self.lose(machine, MachineState::Lost, "agent disconnected", now, &mut out);
                    self.provision(p, now, &mut out);
                }
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
                } else if self.draining {
                    self.terminate(machine, "draining", now, &mut out);
                } else {
                    self.set_state(machine, MachineState::Idle, now, &mut out);
                    self.assign(p, &mut out);
                }
                self.provision(p, now, &mut out);
            }
            FleetEvent::MachineGone { machine } => {
                if let Some(p) = self.machines.get(&machine).map(|m| m.pool) {
                    self.gone(machine, "machine gone", now, &mut out);
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
                if !paused {
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

    /// The earliest time a `Tick` may change something (a boot, heartbeat or idle deadline);
    /// `None` if no timer is pending. Never later than the true deadline.
    pub fn next_deadline(&self) -> Option<Ts> {
        self.timers.peek().map(|Reverse((t, _))| *t)
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
                    self.terminate(id, "boot timeout", now, out);
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
        let wanted = pool.queued_len + pool.spec.min_idle as usize;
        let available = pool.starting + pool.idle.len();
        let room = (pool.spec.max_instances as usize).saturating_sub(pool.live);
        let n = wanted.saturating_sub(available).min(room);
        for _ in 0..n {
            let id = self.next_id;
            self.next_id += 1;
            pool.starting += 1;
            pool.live += 1;
            let deadline = now.plus(pool.spec.boot_timeout);
            self.machines.insert(
                id,
                Machine {
                    pool: p,
                    state: MachineState::Requested,
                    build: None,
                    launched_at: now,
                    last_seen: now,
                    idle_since: now,
                    builds_run: 0,
                    next_check: Some(deadline),
                },
            );
            self.timers.push(Reverse((deadline, id)));
            out.push(FleetAction::SetState { machine: id, state: MachineState::Requested });
            out.push(FleetAction::Launch { machine: id, pool: pool.spec.name.clone() });
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
        out.push(FleetAction::Terminate { machine: id, reason: reason.to_string() });
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
        out.push(FleetAction::Terminate { machine: id, reason: reason.to_string() });
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
    /// The provider's id is recorded (the launch's answer was stored).
    pub launched: bool,
    /// The provider lists it pending or running (only asked when `launched`).
    pub alive: bool,
    /// The store has a build running on it.
    pub running_build: bool,
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
    /// Anything else: stop it and record it gone.
    Stop,
}

/// The restart rule for one machine of the previous run.
pub fn recovery(m: LeftOver) -> Recovery {
    match m.state {
        s if is_starting(s) && !m.launched => Recovery::Resolve,
        _ if !m.launched || !m.alive => Recovery::Stop,
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
        let m = |state, launched, alive, running_build| LeftOver { state, launched, alive, running_build };
        use MachineState::*;
        assert_eq!(recovery(m(Requested, false, false, false)), Recovery::Resolve);
        assert_eq!(recovery(m(Launching, false, false, false)), Recovery::Resolve);
        assert_eq!(recovery(m(Booting, true, true, false)), Recovery::KeepBooting);
        // The answer was stored but the state not yet moved on.
        assert_eq!(recovery(m(Requested, true, true, false)), Recovery::KeepBooting);
        assert_eq!(recovery(m(Booting, true, false, false)), Recovery::Stop, "dead while the master was down");
        assert_eq!(recovery(m(Busy, true, true, true)), Recovery::AdoptBusy);
        assert_eq!(recovery(m(Busy, true, true, false)), Recovery::Stop, "busy with nothing");
        assert_eq!(recovery(m(Busy, true, false, true)), Recovery::Stop);
        for s in [Idle, Stopping, Lost, Interrupted] {
            assert_eq!(recovery(m(s, true, true, false)), Recovery::Stop, "{s:?}");
        }
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
        Fleet::new(specs, Duration::from_secs(60), 1)
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
        f.handle(FleetEvent::LaunchSucceeded { machine: m }, Ts(now));
        f.handle(FleetEvent::AgentConnected { machine: m }, Ts(now))
    }

    #[test]
    fn queued_build_launches_and_assigns() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        let a = q(&mut f, 10, 0);
        assert_eq!(
            a,
            vec![
                FleetAction::SetState { machine: 1, state: MachineState::Requested },
                FleetAction::Launch { machine: 1, pool: "p".into() }
            ]
        );
        assert_eq!(f.machine_state(1), Some(MachineState::Requested));
        f.handle(FleetEvent::LaunchSucceeded { machine: 1 }, Ts(S));
        assert_eq!(f.machine_state(1), Some(MachineState::Booting));
        let a = f.handle(FleetEvent::AgentConnected { machine: 1 }, Ts(2 * S));
        assert!(a.contains(&FleetAction::Assign { machine: 1, build: 10 }));
        assert_eq!(f.machine_build(1), Some(10));
        assert_eq!(f.queue_len("p"), 0);
        // Finished: idle, no new launch.
        let a = f.handle(FleetEvent::BuildFinished { machine: 1, build: 10 }, Ts(3 * S));
        assert_eq!(a, vec![FleetAction::SetState { machine: 1, state: MachineState::Idle }]);
        // Next build goes straight to the idle machine.
        let a = q(&mut f, 11, 4 * S);
        assert!(a.contains(&FleetAction::Assign { machine: 1, build: 11 }));
        assert!(launched(&a).is_empty());
    }

    #[test]
    fn a_held_pool_launches_nothing_but_its_warm_machine_keeps_working() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        let hold = |held| FleetEvent::LaunchHold { pool: "p".into(), held };
        assert_eq!(launched(&q(&mut f, 10, 0)), vec![1]);
        bring_up(&mut f, 1, S);
        assert_eq!(f.machine_build(1), Some(10));
        // A spend cap is reached.
        assert!(f.handle(hold(true), Ts(S)).is_empty());
        let a = q(&mut f, 11, 2 * S);
        assert!(launched(&a).is_empty(), "no launch while held: {a:?}");
        // The running machine finishes and takes the queued build: no new spend needed.
        let a = f.handle(FleetEvent::BuildFinished { machine: 1, build: 10 }, Ts(3 * S));
        assert!(a.contains(&FleetAction::Assign { machine: 1, build: 11 }));
        let a = q(&mut f, 12, 4 * S);
        assert!(launched(&a).is_empty());
        assert_eq!(f.queued("p"), vec![12]);
        // Lifted: the queue gets its machine.
        assert_eq!(launched(&f.handle(hold(false), Ts(5 * S))), vec![2]);
    }

    #[test]
    fn a_paused_pool_starts_nothing_until_resumed() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        let pause = |paused| FleetEvent::Pause { pool: "p".into(), paused };
        assert_eq!(launched(&q(&mut f, 10, 0)), vec![1]);
        bring_up(&mut f, 1, S);
        assert!(f.handle(pause(true), Ts(S)).is_empty());
        // Queued while paused: no launch, and the warm machine does not take it either.
        assert!(q(&mut f, 11, 2 * S).is_empty());
        let a = f.handle(FleetEvent::BuildFinished { machine: 1, build: 10 }, Ts(3 * S));
        assert_eq!(a, vec![FleetAction::SetState { machine: 1, state: MachineState::Idle }]);
        assert_eq!(f.queued("p"), vec![11]);
        // Resumed: the idle machine takes the build.
        let a = f.handle(pause(false), Ts(4 * S));
        assert!(a.contains(&FleetAction::Assign { machine: 1, build: 11 }), "{a:?}");
    }

    #[test]
    fn a_paused_pool_lets_its_warm_machines_time_out() {
        let mut f = fleet(vec![PoolSpec { idle_timeout: Duration::from_secs(60), ..spec("p", 4, 1, 0) }]);
        let a = f.handle(FleetEvent::Tick, Ts(0));
        assert_eq!(launched(&a), vec![1], "min_idle keeps one warm");
        f.handle(FleetEvent::LaunchSucceeded { machine: 1 }, Ts(S));
        f.handle(FleetEvent::AgentConnected { machine: 1 }, Ts(S));
        f.handle(FleetEvent::Pause { pool: "p".into(), paused: true }, Ts(2 * S));
        f.handle(FleetEvent::Heartbeat { machine: 1 }, Ts(60 * S));
        let a = f.handle(FleetEvent::Tick, Ts(62 * S));
        assert!(
            a.contains(&FleetAction::Terminate { machine: 1, reason: "idle timeout".into() }),
            "past idle_timeout while paused: {a:?}"
        );
        assert!(launched(&a).is_empty(), "and no replacement");
    }

    #[test]
    fn stopping_a_busy_machine_retries_its_build() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        q(&mut f, 10, 0);
        bring_up(&mut f, 1, S);
        let a = f.handle(FleetEvent::StopMachine { machine: 1, reason: "by admin".into() }, Ts(2 * S));
        assert!(a.contains(&FleetAction::Retry { build: 10, reason: "by admin".into() }), "{a:?}");
        assert!(has_terminate(&a, 1));
        assert_eq!(f.machine_state(1), Some(MachineState::Stopping));
        assert!(f.handle(FleetEvent::StopMachine { machine: 1, reason: "again".into() }, Ts(3 * S)).is_empty());
    }

    #[test]
    fn max_instances_caps_launches() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        let mut l = Vec::new();
        for b in 0..5 {
            l.extend(launched(&q(&mut f, b, 0)));
        }
        assert_eq!(l, vec![1, 2]);
        assert_eq!(f.live_machines("p"), 2);
        assert_eq!(f.queued("p"), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn retry_goes_to_front() {
        let mut f = fleet(vec![spec("p", 0, 0, 0)]);
        q(&mut f, 1, 0);
        q(&mut f, 2, 0);
        f.handle(FleetEvent::BuildQueued { build: 3, pool: "p".into(), front: true }, Ts(0));
        assert_eq!(f.queued("p"), vec![3, 1, 2]);
        f.handle(FleetEvent::BuildCancelled { build: 1 }, Ts(0));
        assert_eq!(f.queued("p"), vec![3, 2]);
        assert_eq!(f.queue_len("p"), 2);
    }

    #[test]
    fn duplicate_queue_is_ignored() {
        let mut f = fleet(vec![spec("p", 4, 0, 0)]);
        q(&mut f, 1, 0);
        assert!(q(&mut f, 1, 0).is_empty());
        assert_eq!(f.queue_len("p"), 1);
    }

    #[test]
    fn launch_failure_relaunches() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, 1, 0);
        let a = f.handle(FleetEvent::LaunchFailed { machine: 1, reason: "capacity".into() }, Ts(S));
        assert!(a.contains(&FleetAction::SetState { machine: 1, state: MachineState::Gone }));
        assert_eq!(launched(&a), vec![2]);
        assert_eq!(f.machine_state(1), None);
    }

    #[test]
    fn a_late_launch_failure_does_not_kill_a_machine_whose_agent_connected() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, 1, 0);
        // The launch call timed out, but the instance booted and its agent connected first.
        let a = f.handle(FleetEvent::AgentConnected { machine: 1 }, Ts(S));
        assert!(a.contains(&FleetAction::Assign { machine: 1, build: 1 }));
        let a = f.handle(FleetEvent::LaunchFailed { machine: 1, reason: "timed out".into() }, Ts(2 * S));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(f.machine_build(1), Some(1));
    }

    #[test]
    fn boot_timeout_terminates_and_relaunches() {
        let mut f = fleet(vec![spec("p", 1, 0, 0)]);
        q(&mut f, 1, 0);
        f.handle(FleetEvent::LaunchSucceeded { machine: 1 }, Ts(S));
        assert_eq!(f.next_deadline(), Some(Ts(300 * S)));
        assert!(f.handle(FleetEvent::Tick, Ts(299 * S)).is_empty());
        let a = f.handle(FleetEvent::Tick, Ts(300 * S));
        assert!(has_terminate(&a, 1));
        assert_eq!(f.machine_state(1), Some(MachineState::Stopping));
        // Still counted against max_instances until gone.
        assert!(launched(&a).is_empty());
        let a = f.handle(FleetEvent::MachineGone { machine: 1 }, Ts(301 * S));
        assert_eq!(launched(&a), vec![2]);
    }

    #[test]
    fn idle_timeout_keeps_min_idle() {
        let mut f = fleet(vec![spec("p", 3, 1, 0)]);
        // min_idle launches one machine with no queue.
        let a = f.handle(FleetEvent::Tick, Ts(0));
        assert_eq!(launched(&a), vec![1]);
        q(&mut f, 10, 0);
        q(&mut f, 11, 0);
        for m in 1..=3 {
            bring_up(&mut f, m, 0);
        }
        f.handle(FleetEvent::BuildFinished { machine: 1, build: 10 }, Ts(10 * S));
        f.handle(FleetEvent::BuildFinished { machine: 2, build: 11 }, Ts(20 * S));
        // Keep heartbeats flowing so only idle timeouts matter.
        for t in (0..=700).step_by(30) {
            for m in 1..=3 {
                f.handle(FleetEvent::Heartbeat { machine: m }, Ts(t * S));
            }
        }
        assert_eq!(f.idle_total(), 3);
        // Machine 3 became idle at 0 (no build left), 1 at 10s, 2 at 20s.
        let a = f.handle(FleetEvent::Tick, Ts(600 * S));
        assert!(has_terminate(&a, 3));
        assert!(!has_terminate(&a, 1));
        let a = f.handle(FleetEvent::Tick, Ts(625 * S));
        assert!(has_terminate(&a, 1));
        assert!(!has_terminate(&a, 2), "min_idle = 1 keeps the newest idle machine");
        assert!(f.handle(FleetEvent::Tick, Ts(700 * S)).is_empty());
        assert_eq!(f.machine_state(2), Some(MachineState::Idle));
    }

    #[test]
    fn ephemeral_machine_runs_one_build() {
        let mut f = fleet(vec![spec("p", 2, 0, 1)]);
        q(&mut f, 1, 0);
        q(&mut f, 2, 0);
        bring_up(&mut f, 1, 0);
        bring_up(&mut f, 2, 0);
        let a = f.handle(FleetEvent::BuildFinished { machine: 1, build: 1 }, Ts(S));
        assert!(has_terminate(&a, 1));
        assert_eq!(f.machine_state(1), Some(MachineState::Stopping));
        q(&mut f, 3, 2 * S);
        assert_eq!(f.queue_len("p"), 1, "the stopping machine takes nothing");
        let a = f.handle(FleetEvent::MachineGone { machine: 1 }, Ts(3 * S));
        assert_eq!(launched(&a), vec![3]);
    }

    #[test]
    fn heartbeat_loss_retries_build() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        q(&mut f, 7, 0);
        bring_up(&mut f, 1, 0);
        f.handle(FleetEvent::Heartbeat { machine: 1 }, Ts(30 * S));
        assert!(f.handle(FleetEvent::Tick, Ts(60 * S)).is_empty());
        let a = f.handle(FleetEvent::Tick, Ts(90 * S));
        assert!(a.contains(&FleetAction::SetState { machine: 1, state: MachineState::Lost }));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: 7, .. })));
        assert!(has_terminate(&a, 1));
        assert_eq!(f.machine_build(1), None);
        // The late result is ignored; the retry runs elsewhere.
        assert!(f.handle(FleetEvent::BuildFinished { machine: 1, build: 7 }, Ts(91 * S)).is_empty());
        let a = f.handle(FleetEvent::BuildQueued { build: 8, pool: "p".into(), front: true }, Ts(92 * S));
        assert_eq!(launched(&a), vec![2]);
    }

    #[test]
    fn disconnect_retries_and_gone_retries() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        q(&mut f, 7, 0);
        bring_up(&mut f, 1, 0);
        let a = f.handle(FleetEvent::AgentDisconnected { machine: 1 }, Ts(S));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: 7, .. })));
        q(&mut f, 8, 0);
        bring_up(&mut f, 2, 0);
        let a = f.handle(FleetEvent::MachineGone { machine: 2 }, Ts(S));
        assert!(a.iter().any(|a| matches!(a, FleetAction::Retry { build: 8, .. })));
    }

    #[test]
    fn drain_stops_idle_and_lets_busy_finish() {
        let mut f = fleet(vec![spec("p", 3, 0, 0)]);
        q(&mut f, 1, 0);
        q(&mut f, 2, 0);
        bring_up(&mut f, 1, 0);
        bring_up(&mut f, 2, 0);
        f.handle(FleetEvent::BuildFinished { machine: 2, build: 2 }, Ts(S));
        let a = f.handle(FleetEvent::Drain, Ts(2 * S));
        assert!(has_terminate(&a, 2));
        assert!(!has_terminate(&a, 1));
        assert!(launched(&q(&mut f, 3, 3 * S)).is_empty());
        let a = f.handle(FleetEvent::BuildFinished { machine: 1, build: 1 }, Ts(4 * S));
        assert!(has_terminate(&a, 1));
        assert!(f.is_draining());
        let a = f.handle(FleetEvent::Resume, Ts(5 * S));
        assert_eq!(launched(&a).len(), 1);
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut f = fleet(vec![spec("p", 2, 0, 0)]);
        for e in [
            FleetEvent::LaunchSucceeded { machine: 99 },
            FleetEvent::LaunchFailed { machine: 99, reason: String::new() },
            FleetEvent::AgentConnected { machine: 99 },
            FleetEvent::Heartbeat { machine: 99 },
            FleetEvent::AgentDisconnected { machine: 99 },
            FleetEvent::BuildFinished { machine: 99, build: 1 },
            FleetEvent::MachineGone { machine: 99 },
            FleetEvent::Interrupted { machine: 99 },
            FleetEvent::BuildCancelled { build: 5 },
        ] {
            assert!(f.handle(e, Ts(0)).is_empty());
        }
    }

    #[test]
    fn unknown_pool_keeps_build_queued() {
        let mut f = fleet(vec![]);
        let a = f.handle(FleetEvent::BuildQueued { build: 1, pool: "nope".into(), front: false }, Ts(0));
        assert!(a.is_empty());
        assert_eq!(f.queue_len("nope"), 1);
    }
}

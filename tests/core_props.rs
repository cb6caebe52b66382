//! Property tests for the sans-IO core: random event sequences against a modelled environment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use paddock::core::fleet::{Fleet, FleetAction, FleetEvent, MachineState, PoolSpec};
use paddock::core::scheduler::{BuilderRef, ChangeInfo, SchedAction, SchedEvent, SchedulerSpec, Schedulers, SpecKind};
use paddock::core::{BuildId, MachineId, Ts};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Queue { pool: usize, front: bool },
    Cancel(usize),
    LaunchResult { pick: usize, outcome: u8 },
    Connect(usize),
    Reconnect(usize),
    Heartbeat(usize),
    Disconnect(usize),
    Interrupt(usize),
    Finish(usize),
    Gone(usize),
    StaleFinish { machine: MachineId, build: BuildId },
    Advance(u32),
    Tick,
    Drain,
    Resume,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, any::<bool>()).prop_map(|(pool, front)| Op::Queue { pool, front }),
        1 => any::<usize>().prop_map(Op::Cancel),
        4 => (any::<usize>(), 0..10u8).prop_map(|(pick, outcome)| Op::LaunchResult { pick, outcome }),
        4 => any::<usize>().prop_map(Op::Connect),
        1 => any::<usize>().prop_map(Op::Reconnect),
        3 => any::<usize>().prop_map(Op::Heartbeat),
        1 => any::<usize>().prop_map(Op::Disconnect),
        1 => any::<usize>().prop_map(Op::Interrupt),
        5 => any::<usize>().prop_map(Op::Finish),
        3 => any::<usize>().prop_map(Op::Gone),
        1 => (0..40i64, 0..40i64).prop_map(|(machine, build)| Op::StaleFinish { machine: MachineId(machine), build: BuildId(build) }),
        3 => (1..200_000u32).prop_map(Op::Advance),
        3 => Just(Op::Tick),
        1 => prop::bool::weighted(0.1).prop_map(|d| if d { Op::Drain } else { Op::Tick }),
        1 => Just(Op::Resume),
    ]
}

fn pool_spec() -> impl Strategy<Value = (u32, u32, u64, u64, u32)> {
    (0..5u32, 0..3u32, 1..600u64, 1..300u64, 0..3u32)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BuildState {
    Queued,
    Running(MachineId),
    Finished,
    Retried,
    Cancelled,
}

/// The world outside the fleet: what the provisioner and agents would see.
struct Env {
    fleet: Fleet,
    specs: Vec<PoolSpec>,
    now: i64,
    next_build: BuildId,
    builds: BTreeMap<BuildId, (usize, BuildState)>,
    /// Machine -> (pool, state as reported by SetState).
    machines: BTreeMap<MachineId, (usize, MachineState)>,
    machine_build: HashMap<MachineId, BuildId>,
    ever_launched: BTreeSet<MachineId>,
    max_id: MachineId,
    pending_launch: Vec<MachineId>,
    booted: Vec<MachineId>,
    connected: Vec<MachineId>,
    /// Busy machines whose agent's connection closed (their builds go on).
    away: Vec<MachineId>,
    terminating: Vec<MachineId>,
    /// Machines whose launch outcome was unknown and is being looked up.
    resolving: BTreeSet<MachineId>,
    /// Machines whose launch failed (only these may be stopped without a provider id).
    failed_launch: BTreeSet<MachineId>,
}

fn pick<T: Copy>(v: &[T], i: usize) -> Option<T> {
    if v.is_empty() {
        None
    } else {
        Some(v[i % v.len()])
    }
}

impl Env {
    fn new(specs: Vec<PoolSpec>) -> Env {
        Env {
            fleet: Fleet::new(specs.clone(), Duration::from_secs(90), MachineId(1)),
            specs,
            now: 0,
            next_build: BuildId(1),
            builds: BTreeMap::new(),
            machines: BTreeMap::new(),
            machine_build: HashMap::new(),
            ever_launched: BTreeSet::new(),
            max_id: MachineId(0),
            pending_launch: Vec::new(),
            booted: Vec::new(),
            connected: Vec::new(),
            away: Vec::new(),
            terminating: Vec::new(),
            resolving: BTreeSet::new(),
            failed_launch: BTreeSet::new(),
        }
    }

    fn pool_of(&self, name: &str) -> usize {
        self.specs.iter().position(|s| s.name == name).expect("known pool")
    }

    fn queue(&mut self, pool: usize, front: bool) {
        let b = self.next_build;
        self.next_build = self.next_build.next();
        self.builds.insert(b, (pool, BuildState::Queued));
        let name = self.specs[pool].name.clone();
        self.send(FleetEvent::BuildQueued { build: b, pool: name, front });
    }

    fn send(&mut self, e: FleetEvent) {
        self.act(e);
    }

    /// Feed an event, check the actions against the world, and return them.
    fn act(&mut self, e: FleetEvent) -> Vec<FleetAction> {
        let actions = self.fleet.handle(e, Ts(self.now));
        let returned = actions.clone();
        let mut retries = Vec::new();
        for a in actions {
            match a {
                FleetAction::SetState { machine, state } => {
                    if state == MachineState::Requested {
                        assert!(!self.ever_launched.contains(&machine), "machine id {machine} reused");
                        assert!(machine > self.max_id, "ids increase");
                        self.max_id = machine;
                        self.ever_launched.insert(machine);
                        self.machines.insert(machine, (usize::MAX, state));
                        continue;
                    }
                    let entry = self.machines.get_mut(&machine).expect("SetState for known machine");
                    if state == MachineState::Busy {
                        assert_eq!(entry.1, MachineState::Idle, "only idle machines become busy");
                    }
                    entry.1 = state;
                    if state == MachineState::Gone {
                        assert!(!self.machine_build.contains_key(&machine), "gone with a build");
                        self.machines.remove(&machine);
                        self.forget(machine);
                        self.terminating.retain(|&m| m != machine);
                    }
                }
                FleetAction::Launch { machine, pool } => {
                    let p = self.pool_of(&pool);
                    let entry = self.machines.get_mut(&machine).expect("Launch after Requested");
                    assert_eq!(entry.1, MachineState::Requested);
                    entry.0 = p;
                    self.pending_launch.push(machine);
                }
                FleetAction::Assign { machine, build } => {
                    let (_, st) = self.machines[&machine];
                    assert_eq!(st, MachineState::Busy, "assign to a non-busy(-from-idle) machine");
                    assert!(!self.machine_build.contains_key(&machine), "machine runs two builds");
                    let entry = self.builds.get_mut(&build).expect("assigned build exists");
                    assert_eq!(entry.1, BuildState::Queued, "build {build} assigned twice");
                    assert_eq!(entry.0, self.machines[&machine].0, "build runs in its pool");
                    entry.1 = BuildState::Running(machine);
                    self.machine_build.insert(machine, build);
                }
                FleetAction::Terminate { machine, provider_id, .. } => {
                    assert!(self.machines.contains_key(&machine));
                    assert!(
                        provider_id.is_some() || self.failed_launch.contains(&machine),
                        "machine {machine} stopped before its launch answered"
                    );
                    self.forget(machine);
                    if !self.terminating.contains(&machine) {
                        self.terminating.push(machine);
                    }
                }
                FleetAction::Resolve { machine, .. } => {
                    assert!(self.machines.contains_key(&machine), "resolve of an unknown machine");
                    assert!(!self.pending_launch.contains(&machine), "resolve of a launch still out");
                    assert!(self.resolving.insert(machine), "machine {machine} resolved twice at once");
                    self.pending_launch.push(machine);
                }
                FleetAction::Accept { machine, .. } => {
                    assert!(self.machines.contains_key(&machine), "accepted an unknown machine's agent")
                }
                FleetAction::Refuse { .. } => {}
                FleetAction::Retry { build, .. } => {
                    let entry = self.builds.get_mut(&build).expect("retried build exists");
                    let BuildState::Running(m) = entry.1 else {
                        panic!("retry of a build that is not running: {:?}", entry.1)
                    };
                    entry.1 = BuildState::Retried;
                    assert_eq!(self.machine_build.remove(&m), Some(build));
                    retries.push(entry.0);
                }
            }
        }
        // The shell queues a new attempt at the front for every retry.
        for pool in retries {
            self.queue(pool, true);
        }
        returned
    }

    /// The machine is no longer reachable by the environment's agents/provisioner.
    fn forget(&mut self, m: MachineId) {
        self.pending_launch.retain(|&x| x != m);
        self.booted.retain(|&x| x != m);
        self.connected.retain(|&x| x != m);
        self.away.retain(|&x| x != m);
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Queue { pool, front } => {
                let pool = pool % self.specs.len();
                self.queue(pool, front)
            }
            Op::Cancel(i) => {
                let queued: Vec<BuildId> =
                    self.builds.iter().filter(|(_, (_, s))| *s == BuildState::Queued).map(|(&b, _)| b).collect();
                if let Some(b) = pick(&queued, i) {
                    self.builds.get_mut(&b).unwrap().1 = BuildState::Cancelled;
                    self.send(FleetEvent::BuildCancelled { build: b });
                }
            }
            Op::LaunchResult { pick: i, outcome } => {
                if let Some(m) = pick(&self.pending_launch, i) {
                    self.pending_launch.retain(|&x| x != m);
                    self.resolving.remove(&m);
                    match outcome {
                        0..=7 => {
                            self.booted.push(m);
                            self.send(FleetEvent::LaunchSucceeded { machine: m, provider_id: format!("i-{m}") });
                        }
                        8 => {
                            self.failed_launch.insert(m);
                            self.send(FleetEvent::LaunchFailed { machine: m, reason: "capacity".into() });
                        }
                        _ => {
                            let a = self.act(FleetEvent::LaunchUnknown { machine: m, reason: "timeout".into() });
                            // Looked up (Resolve puts it back in the world's hands), or given up.
                            assert!(
                                a.iter().any(|x| matches!(x, FleetAction::Resolve { machine, .. } if *machine == m))
                                    || !self.machines.contains_key(&m),
                                "an unknown launch of machine {m} is neither looked up nor forgotten"
                            );
                        }
                    }
                }
            }
            Op::Connect(i) => {
                if let Some(m) = pick(&self.booted, i) {
                    self.booted.retain(|&x| x != m);
                    self.connected.push(m);
                    self.send(FleetEvent::AgentConnected { machine: m, resumed: None });
                }
            }
            Op::Heartbeat(i) => {
                if let Some(m) = pick(&self.connected, i) {
                    self.send(FleetEvent::Heartbeat { machine: m });
                }
            }
            Op::Disconnect(i) => {
                if let Some(m) = pick(&self.connected, i) {
                    self.connected.retain(|&x| x != m);
                    let busy = self.machine_build.contains_key(&m);
                    let a = self.act(FleetEvent::AgentDisconnected { machine: m });
                    if busy {
                        // Its build goes on; the agent has until the heartbeat limit to return.
                        assert!(a.is_empty(), "a busy agent's disconnect acted at once: {a:?}");
                        self.away.push(m);
                    }
                }
            }
            Op::Reconnect(i) => {
                if let Some(m) = pick(&self.away, i) {
                    self.away.retain(|&x| x != m);
                    let build = self.machine_build.get(&m).copied();
                    let a = self.act(FleetEvent::AgentConnected { machine: m, resumed: Some(build) });
                    if build.is_some() {
                        assert!(
                            a.contains(&FleetAction::Accept { machine: m, build }),
                            "a busy agent coming back with its build is refused: {a:?}"
                        );
                        self.connected.push(m);
                    }
                }
            }
            Op::Interrupt(i) => {
                let all: Vec<MachineId> = self.machines.keys().copied().collect();
                if let Some(m) = pick(&all, i) {
                    self.send(FleetEvent::Interrupted { machine: m });
                }
            }
            Op::Finish(i) => {
                let mut running: Vec<(MachineId, BuildId)> = self.machine_build.iter().map(|(&m, &b)| (m, b)).collect();
                running.sort_unstable();
                if let Some((m, b)) = pick(&running, i) {
                    if self.connected.contains(&m) {
                        self.builds.get_mut(&b).unwrap().1 = BuildState::Finished;
                        self.machine_build.remove(&m);
                        self.send(FleetEvent::BuildFinished { machine: m, build: b });
                    }
                }
            }
            Op::Gone(i) => {
                // Usually a confirmed terminate; sometimes a machine vanishing on its own.
                let all: Vec<MachineId> = self.machines.keys().copied().collect();
                let m = if i % 4 == 0 { pick(&all, i / 4) } else { pick(&self.terminating, i) };
                if let Some(m) = m {
                    self.send(FleetEvent::MachineGone { machine: m });
                }
            }
            Op::StaleFinish { machine, build } => {
                // Only reports that cannot be the real, current assignment.
                if self.machine_build.get(&machine) != Some(&build) {
                    self.send(FleetEvent::BuildFinished { machine, build });
                }
            }
            Op::Advance(ms) => {
                self.now += ms as i64;
                self.send(FleetEvent::Tick);
            }
            Op::Tick => self.send(FleetEvent::Tick),
            Op::Drain => self.send(FleetEvent::Drain),
            Op::Resume => self.send(FleetEvent::Resume),
        }
        self.check();
    }

    fn check(&self) {
        for (p, spec) in self.specs.iter().enumerate() {
            let live = self.machines.values().filter(|(mp, s)| *mp == p && *s != MachineState::Gone).count();
            assert!(live <= spec.max_instances as usize, "pool {p}: {live} > max");
            assert_eq!(self.fleet.live_machines(&spec.name), live);
            let queued: Vec<BuildId> = self
                .builds
                .iter()
                .filter(|(_, (bp, s))| *bp == p && *s == BuildState::Queued)
                .map(|(&b, _)| b)
                .collect();
            let mut fq = self.fleet.queued(&spec.name);
            assert_eq!(fq.len(), self.fleet.queue_len(&spec.name));
            fq.sort_unstable();
            assert_eq!(fq, queued, "pool {p} queue");
        }
        for (&b, &(_, s)) in &self.builds {
            if let BuildState::Running(m) = s {
                assert_eq!(self.fleet.machine_build(m), Some(b), "build {b} on machine {m}");
                assert_eq!(self.machine_build.get(&m), Some(&b));
            }
        }
        for (&m, &(_, s)) in &self.machines {
            assert_eq!(self.fleet.machine_state(m), Some(s), "machine {m}");
        }
    }

    /// A well-behaved world: everything launches, connects, finishes and stops.
    fn settle(&mut self) {
        self.send(FleetEvent::Resume);
        for round in 0..400 {
            // The world reacts instantly; time only moves every few rounds, so short boot
            // timeouts do not starve the pool.
            if round % 4 == 3 {
                self.now += 1000;
            }
            while let Some(m) = self.pending_launch.pop() {
                self.booted.push(m);
                self.send(FleetEvent::LaunchSucceeded { machine: m, provider_id: format!("i-{}", m) });
            }
            while let Some(m) = self.booted.pop() {
                self.connected.push(m);
                self.send(FleetEvent::AgentConnected { machine: m, resumed: None });
            }
            let mut running: Vec<(MachineId, BuildId)> = self.machine_build.iter().map(|(&m, &b)| (m, b)).collect();
            running.sort_unstable();
            for (m, b) in running {
                self.builds.get_mut(&b).unwrap().1 = BuildState::Finished;
                self.machine_build.remove(&m);
                self.send(FleetEvent::BuildFinished { machine: m, build: b });
            }
            while let Some(m) = self.terminating.pop() {
                self.send(FleetEvent::MachineGone { machine: m });
            }
            for m in self.connected.clone() {
                self.send(FleetEvent::Heartbeat { machine: m });
            }
            self.send(FleetEvent::Tick);
            self.check();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fleet_invariants(
        pools in prop::collection::vec(pool_spec(), 1..=3),
        ops in prop::collection::vec(op(), 0..300),
    ) {
        let specs: Vec<PoolSpec> = pools
            .iter()
            .enumerate()
            .map(|(i, &(max, min_idle, idle, boot, max_builds))| PoolSpec {
                name: format!("pool{i}"),
                max_instances: max,
                min_idle,
                idle_timeout: Duration::from_secs(idle),
                boot_timeout: Duration::from_secs(boot),
                max_builds,
            })
            .collect();
        let mut env = Env::new(specs.clone());
        for o in ops {
            env.step(o);
        }
        // Liveness: in a well-behaved world every pool with capacity drains its queue.
        env.settle();
        for (p, spec) in specs.iter().enumerate() {
            if spec.max_instances > 0 {
                prop_assert_eq!(env.fleet.queue_len(&spec.name), 0, "pool {} stuck", p);
            }
        }
        for (&b, &(p, s)) in &env.builds {
            if specs[p].max_instances > 0 {
                prop_assert!(
                    matches!(s, BuildState::Finished | BuildState::Retried | BuildState::Cancelled),
                    "build {} left {:?}", b, s
                );
            }
        }
    }
}

#[derive(Debug, Clone)]
enum SOp {
    Change { repo: usize, branch: usize, files: Vec<usize> },
    Head { branch: usize },
    Advance(u32),
    Tick,
}

fn sop() -> impl Strategy<Value = SOp> {
    prop_oneof![
        5 => (0..2usize, 0..3usize, prop::collection::vec(0..4usize, 0..3))
            .prop_map(|(repo, branch, files)| SOp::Change { repo, branch, files }),
        1 => (0..3usize).prop_map(|branch| SOp::Head { branch }),
        3 => (1..40_000u32).prop_map(SOp::Advance),
        2 => Just(SOp::Tick),
    ]
}

const BRANCHES: [&str; 3] = ["main", "stable/1", "feature"];
const FILES: [&str; 4] = ["docs/a.rst", "docs/b.rst", "src/lib.rs", "README"];

fn sched_specs() -> Vec<SchedulerSpec> {
    let builders = vec![
        BuilderRef { name: "py".into(), branches: vec![] },
        BuilderRef { name: "main-only".into(), branches: vec!["main".into()] },
    ];
    let branch = |name: &str, tree: Option<u64>, files: &[&str], ignore: &[&str]| SchedulerSpec {
        name: name.into(),
        repo: "r0".into(),
        branches: vec![],
        builders: builders.clone(),
        kind: SpecKind::Branch {
            tree_stable: tree.map(Duration::from_secs),
            files: files.iter().map(|s| s.to_string()).collect(),
            ignore: ignore.iter().map(|s| s.to_string()).collect(),
        },
    };
    vec![
        branch("stable", Some(15), &[], &["docs/**"]),
        branch("slow", Some(60), &[], &[]),
        branch("docs", None, &["docs/**"], &[]),
        SchedulerSpec {
            name: "nightly".into(),
            repo: "r0".into(),
            branches: vec!["main".into(), "stable/*".into()],
            builders,
            kind: SpecKind::Nightly { cron: "*/5 * * * *".into(), only_if_changed: true },
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn changes_never_lost(ops in prop::collection::vec(sop(), 0..200)) {
        let mut s = Schedulers::new(sched_specs(), Ts(0)).unwrap();
        let mut now = 0i64;
        let mut next_id = 1;
        let mut sent = BTreeSet::new();
        let mut done: BTreeMap<i64, u32> = BTreeMap::new();
        let record = |acts: Vec<SchedAction>, done: &mut BTreeMap<i64, u32>| {
            for a in acts {
                match a {
                    SchedAction::ChangesDone(ids) => {
                        for id in ids {
                            *done.entry(id).or_default() += 1;
                        }
                    }
                    SchedAction::Request(r) => {
                        assert!(!r.builders.is_empty());
                        if r.branch != "main" {
                            assert!(!r.builders.iter().any(|b| b == "main-only"));
                        }
                    }
                    SchedAction::NightlyState { .. } => {}
                }
            }
        };
        for o in ops {
            let acts = match o {
                SOp::Change { repo, branch, files } => {
                    let id = next_id;
                    next_id += 1;
                    sent.insert(id);
                    s.handle(
                        SchedEvent::Change(ChangeInfo {
                            id,
                            repo: format!("r{repo}"),
                            branch: BRANCHES[branch].into(),
                            revision: format!("rev{id}"),
                            files: files.iter().map(|&f| FILES[f].to_string()).collect(),
                            unlisted_files: 0,
                        }),
                        Ts(now),
                    )
                }
                SOp::Head { branch } => s.handle(
                    SchedEvent::Head { repo: "r0".into(), branch: BRANCHES[branch].into(), revision: "h".into() },
                    Ts(now),
                ),
                SOp::Advance(ms) => {
                    now += ms as i64;
                    s.handle(SchedEvent::Tick, Ts(now))
                }
                SOp::Tick => s.handle(SchedEvent::Tick, Ts(now)),
            };
            record(acts, &mut done);
            if let Some(w) = s.next_wakeup() {
                prop_assert!(w.0 > now, "next_wakeup {} not after now {}", w.0, now);
            }
        }
        now += 3_600_000;
        let acts = s.handle(SchedEvent::Tick, Ts(now));
        record(acts, &mut done);
        prop_assert_eq!(s.pending_changes(), 0);
        let done_ids: BTreeSet<i64> = done.keys().copied().collect();
        prop_assert_eq!(&done_ids, &sent);
        prop_assert!(done.values().all(|&n| n == 1), "a change reported done twice");
    }
}

/// What can happen to one build request's attempts, in the order the store sees it.
#[derive(Debug, Clone)]
enum LifeOp {
    /// The fleet starts the current attempt on a machine (with this many steps).
    Start {
        machine: MachineId,
        steps: u8,
    },
    /// The current attempt's next open step reports its result.
    StepDone,
    /// An agent reports an end, about the current attempt (or an earlier one, `stale`).
    Report {
        machine: MachineId,
        result: u8,
        stale: bool,
    },
    Lost,
    Cancel {
        reachable: bool,
    },
    Abandon,
}

fn life_op() -> impl Strategy<Value = LifeOp> {
    prop_oneof![
        4 => (1..4i64, 0..4u8).prop_map(|(machine, steps)| LifeOp::Start { machine: MachineId(machine), steps }),
        4 => Just(LifeOp::StepDone),
        4 => (1..4i64, 0..6u8, prop::bool::weighted(0.2))
            .prop_map(|(machine, result, stale)| LifeOp::Report { machine: MachineId(machine), result, stale }),
        3 => Just(LifeOp::Lost),
        1 => any::<bool>().prop_map(|reachable| LifeOp::Cancel { reachable }),
        1 => Just(LifeOp::Abandon),
    ]
}

/// A build request's attempts as the store holds them, changed only by what `decide` says.
struct Request {
    attempts: Vec<paddock::core::build::BuildFacts>,
    /// Steps of the current attempt not yet reported.
    open: Vec<i64>,
    /// Notifications of an end sent.
    news: usize,
}

impl Request {
    fn apply(&mut self, at: usize, t: &paddock::core::build::Transition) {
        let f = &mut self.attempts[at];
        f.state = t.to;
        f.cancel_asked = t.cancel_by.is_some() || (f.cancel_asked && !t.forget_cancel);
        if t.open_steps.is_some() {
            f.open_step = None;
            self.open.clear();
        }
        if t.news {
            self.news += 1;
        }
        if t.requeue.is_some() {
            let next = paddock::core::build::BuildFacts {
                id: f.id.next(),
                state: paddock::core::build::BuildState::Queued,
                attempt: f.attempt + 1,
                machine: None,
                cancel_asked: false,
                open_step: None,
            };
            self.attempts.push(next);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// The build lifecycle's rules over random histories of one request: an ended attempt never
    /// changes, a cancel wins over a retry, a request has at most MAX_ATTEMPTS attempts, a
    /// success has every step reported, reports from a machine that does not run the attempt
    /// change nothing, and a request that ended after it ran was announced exactly once.
    #[test]
    fn the_build_lifecycle_keeps_its_promises(ops in prop::collection::vec(life_op(), 1..60)) {
        use paddock::core::build::{decide, BuildEvent, BuildFacts, BuildState as S, FleetNext, MAX_ATTEMPTS};
        let first = BuildFacts { id: BuildId(1), state: S::Queued, attempt: 1, machine: None, cancel_asked: false, open_step: None };
        let mut r = Request { attempts: vec![first], open: Vec::new(), news: 0 };
        let mut cancelled = false;
        for op in ops {
            let at = r.attempts.len() - 1;
            let before = r.attempts[at].clone();
            let event = match op {
                LifeOp::Start { machine, steps } => {
                    if before.state == S::Queued {
                        let f = &mut r.attempts[at];
                        f.state = S::Running;
                        f.machine = Some(machine);
                        r.open = (0..i64::from(steps)).collect();
                        f.open_step = r.open.first().map(|&i| (i, format!("step{i}")));
                    }
                    continue;
                }
                LifeOp::StepDone => {
                    if before.state == S::Running && !r.open.is_empty() {
                        r.open.remove(0);
                        r.attempts[at].open_step = r.open.first().map(|&i| (i, format!("step{i}")));
                    }
                    continue;
                }
                LifeOp::Report { machine, result, stale } => {
                    let result = S::ALL[usize::from(result) % S::ALL.len()];
                    let target = if stale { 0 } else { at };
                    let f = r.attempts[target].clone();
                    let ev = BuildEvent::Reported { machine, result };
                    match decide(&f, &ev) {
                        Ok(t) => {
                            prop_assert_eq!(f.state, S::Running);
                            prop_assert_eq!(f.machine, Some(machine), "only the machine running it ends it");
                            prop_assert!(t.to.is_final());
                            if t.to == S::Success {
                                prop_assert!(f.open_step.is_none(), "a success with a step unreported");
                            }
                            prop_assert_eq!(&t.fleet, &FleetNext::MachineFree(machine));
                            prop_assert!(t.news && t.requeue.is_none());
                            r.apply(target, &t);
                        }
                        Err(_) => prop_assert!(f.state != S::Running || f.machine != Some(machine) || !result.is_final()),
                    }
                    continue;
                }
                LifeOp::Lost => BuildEvent::Lost { reason: "lost".into() },
                LifeOp::Cancel { reachable } => BuildEvent::Cancel { by: "ann".into(), agent_reachable: reachable },
                LifeOp::Abandon => BuildEvent::Abandon { reason: "builder removed".into() },
            };
            match decide(&before, &event) {
                Ok(t) => {
                    prop_assert!(before.state.is_live(), "an ended attempt changed: {:?}", before.state);
                    prop_assert_eq!(t.from, before.state);
                    if matches!(event, BuildEvent::Cancel { .. }) {
                        cancelled = true;
                        if let Some(m) = t.tell_agent {
                            prop_assert_eq!(Some(m), before.machine, "only its own agent is told");
                            prop_assert_eq!(t.to, S::Running);
                        }
                    }
                    if t.requeue.is_some() {
                        prop_assert!(!cancelled && !before.cancel_asked, "a cancelled build was retried");
                        prop_assert!(before.attempt < MAX_ATTEMPTS);
                    }
                    if let Some(m) = t.meter_end {
                        prop_assert_eq!(Some(m), before.machine, "the meter ends on the machine it ran on");
                    }
                    r.apply(at, &t);
                }
                Err(_) => prop_assert!(
                    !before.state.is_live() || matches!(event, BuildEvent::Abandon { .. }),
                    "a live attempt refused {:?}", event
                ),
            }
        }
        prop_assert!(r.attempts.len() as u32 <= MAX_ATTEMPTS);
        // Every attempt but the last was handed on as a retry.
        for f in &r.attempts[..r.attempts.len() - 1] {
            prop_assert_eq!(f.state, S::Retry);
        }
        // Retries are not news; the request's end is, once, when its last attempt ran (a
        // queued attempt cancelled was never announced as started either).
        let last = &r.attempts[r.attempts.len() - 1];
        match (last.state, last.machine) {
            (s, _) if s.is_live() => prop_assert_eq!(r.news, 0),
            (_, Some(_)) => prop_assert_eq!(r.news, 1),
            (S::Cancelled, None) => prop_assert_eq!(r.news, 0),
            (_, None) => prop_assert_eq!(r.news, 1, "given up or abandoned is news"),
        }

    }
}

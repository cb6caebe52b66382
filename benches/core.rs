//! Fleet throughput benchmark: 10,000 requests over 100 builders on 10 pools of up to 100
//! machines, driven by a simulated world with a virtual clock until every build has finished.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use paddock::core::fleet::{Fleet, FleetAction, FleetEvent, PoolSpec};
use paddock::core::Ts;
use paddock::core::{BuildId, MachineId};

/// Counts live heap bytes so the benchmark can report the peak.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const POOLS: usize = 10;
const BUILDERS: usize = 100;
const REQUESTS: i64 = 10_000;

/// Deterministic xorshift so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn vm_hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM")).map(|l| l.to_string()))
        .unwrap_or_else(|| "VmHWM: n/a".into())
}

fn main() {
    let specs: Vec<PoolSpec> = (0..POOLS)
        .map(|i| PoolSpec {
            name: format!("pool{i}"),
            max_instances: 100,
            min_idle: 2,
            idle_timeout: Duration::from_secs(300),
            boot_timeout: Duration::from_secs(600),
            // Mix ephemeral and reusable pools.
            max_builds: if i % 2 == 0 { 1 } else { 0 },
        })
        .collect();
    let builder_pool: Vec<String> = (0..BUILDERS).map(|b| format!("pool{}", b % POOLS)).collect();
    let mut fleet = Fleet::new(specs, Duration::from_secs(120), MachineId(1));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    // Virtual-time event queue: (time, seq) -> event.
    let mut agenda: BinaryHeap<Reverse<(i64, u64)>> = BinaryHeap::new();
    let mut pending: HashMap<u64, FleetEvent> = HashMap::new();
    let mut seq = 0u64;
    let mut at = |agenda: &mut BinaryHeap<Reverse<(i64, u64)>>,
                  pending: &mut HashMap<u64, FleetEvent>,
                  t: i64,
                  e: FleetEvent| {
        seq += 1;
        agenda.push(Reverse((t, seq)));
        pending.insert(seq, e);
    };

    // Requests arrive over the first hour.
    for b in 0..REQUESTS {
        let builder = (rng.next() as usize) % BUILDERS;
        let t = (rng.next() % 3_600_000) as i64;
        let pool = builder_pool[builder].clone();
        at(&mut agenda, &mut pending, t, FleetEvent::BuildQueued { build: BuildId(b), pool, front: false });
    }

    let start = Instant::now();
    let mut events = 0u64;
    let mut finished = 0i64;
    let mut next_tick = 0i64;
    let mut now = 0i64;
    let mut peak_machines = 0usize;
    let mut alive: HashMap<MachineId, i64> = HashMap::new(); // machine -> next heartbeat
    while finished < REQUESTS {
        let next_event = agenda.peek().map(|Reverse((t, _))| *t).unwrap_or(i64::MAX);
        let actions = if next_tick <= next_event {
            now = next_tick;
            next_tick += 10_000;
            // Heartbeats from every connected agent each tick (every 10s of virtual time).
            let mut acts = Vec::new();
            for (&m, hb) in alive.iter_mut() {
                if *hb <= now {
                    *hb = now + 30_000;
                    acts.extend(fleet.handle(FleetEvent::Heartbeat { machine: m }, Ts(now)));
                    events += 1;
                }
            }
            acts.extend(fleet.handle(FleetEvent::Tick, Ts(now)));
            events += 1;
            acts
        } else {
            let Reverse((t, s)) = agenda.pop().unwrap();
            now = t;
            let e = pending.remove(&s).unwrap();
            if let FleetEvent::BuildFinished { .. } = e {
                finished += 1;
            }
            if let FleetEvent::AgentConnected { machine, .. } = e {
                alive.insert(machine, now + 30_000);
            }
            if let FleetEvent::MachineGone { machine } = e {
                alive.remove(&machine);
            }
            events += 1;
            fleet.handle(e, Ts(now))
        };
        for a in actions {
            match a {
                FleetAction::Launch { machine, .. } => {
                    let boot = 20_000 + (rng.next() % 40_000) as i64;
                    at(
                        &mut agenda,
                        &mut pending,
                        now + 2_000,
                        FleetEvent::LaunchSucceeded { machine, provider_id: format!("i-{machine}") },
                    );
                    at(&mut agenda, &mut pending, now + boot, FleetEvent::AgentConnected { machine, resumed: None });
                }
                FleetAction::Assign { machine, build } => {
                    let dur = 60_000 + (rng.next() % 540_000) as i64;
                    at(&mut agenda, &mut pending, now + dur, FleetEvent::BuildFinished { machine, build });
                }
                FleetAction::Terminate { machine, .. } => {
                    alive.remove(&machine);
                    at(&mut agenda, &mut pending, now + 5_000, FleetEvent::MachineGone { machine });
                }
                FleetAction::Retry { build, .. } => {
                    // Not expected in this well-behaved world, but keep the count honest.
                    eprintln!("unexpected retry of build {build}");
                    finished -= 1;
                }
                FleetAction::SetState { .. }
                | FleetAction::Accept { .. }
                | FleetAction::Refuse { .. }
                | FleetAction::Resolve { .. } => {}
            }
        }
        let live: usize = (0..POOLS).map(|i| fleet.live_machines(&format!("pool{i}"))).sum();
        peak_machines = peak_machines.max(live);
    }
    let elapsed = start.elapsed();
    println!("fleet benchmark: {REQUESTS} builds, {BUILDERS} builders, {POOLS} pools x 100 max");
    println!("virtual time simulated: {:.1} h", now as f64 / 3_600_000.0);
    println!("peak live machines: {peak_machines}");
    println!("total events: {events}");
    println!("elapsed: {:.3} s", elapsed.as_secs_f64());
    println!("events/s: {:.0}", events as f64 / elapsed.as_secs_f64());
    println!("peak heap (counting allocator): {:.2} MB", PEAK.load(Ordering::Relaxed) as f64 / 1_048_576.0);
    println!("{}", vm_hwm());
}

//! The fleet: matches queued builds to machines, one build at a time per machine.
//!
//! Per pool it boots what the queue needs (up to `max_instances`), keeps `min_idle` machines
//! warm, hands an idle machine the next queued build of its pool, and stops machines that idled
//! past `idle_timeout`, never connected within `boot_timeout`, went silent past the heartbeat
//! limit, or reached `max_builds`.

use std::time::Duration;

use super::{BuildId, MachineId, Ts};

/// The fleet's view of one pool's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub max_instances: u32,
    pub min_idle: u32,
    pub idle_timeout: Duration,
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
    Idle,
    Busy,
    Stopping,
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
#[derive(Debug, Clone)]
pub struct Fleet {
    // implementation-defined
}
impl Fleet {
    pub fn new(_p: Vec<PoolSpec>, _h: Duration, _f: MachineId) -> Fleet { todo!() }
    pub fn handle(&mut self, _e: FleetEvent, _n: Ts) -> Vec<FleetAction> { todo!() }
    pub fn machine_state(&self, _m: MachineId) -> Option<MachineState> { todo!() }
}

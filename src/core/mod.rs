//! The sans-IO core: pure state machines that decide what to build and on which machine.
//!
//! Nothing in here performs I/O, reads a clock or spawns a task. The runtime shell feeds events
//! together with the current time and carries out the actions that come back. That keeps every
//! decision deterministic, replayable and testable with property tests.

pub mod build;
pub mod fleet;
pub mod reconcile;
pub mod scheduler;

use std::time::Duration;

/// A point in time: milliseconds since the Unix epoch (UTC). Always passed in, never read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ts(pub i64);

impl Ts {
    /// This time plus a duration (saturating).
    pub fn plus(self, d: Duration) -> Ts {
        Ts(self.0.saturating_add(d.as_millis() as i64))
    }
    /// Time elapsed from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: Ts) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

/// Renders a duration compactly in the config's syntax (`1h30m`, `90s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

/// A build attempt's id (the `builds` row id).
pub type BuildId = i64;
/// A machine's id (the `machines` row id, also the provisioner's idempotency token).
pub type MachineId = i64;
/// A stored change's id.
pub type ChangeId = i64;

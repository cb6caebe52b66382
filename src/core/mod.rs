//! The sans-IO core: pure state machines that decide what to build and on which machine.
//!
//! Nothing in here performs I/O, reads a clock or spawns a task. The runtime shell feeds events
//! together with the current time and carries out the actions that come back. That keeps every
//! decision deterministic, replayable and testable with property tests.

pub mod build;
pub mod fleet;
pub mod lease;
pub mod reconcile;
pub mod scheduler;

use serde::{Deserialize, Serialize};
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

/// Formats a time the way the API and the database want it: RFC 3339, UTC, milliseconds.
pub fn ts_string(ts: Ts) -> String {
    match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ts.0) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

/// Reads a stored time (`2026-11-24T22:27:38.123Z`) without a general parser: reports read a
/// million of them.
pub fn parse_ts(s: &str) -> Option<Ts> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let mut v = 0i64;
        for &c in b.get(r)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    if b.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z' {
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let days = days_from_civil(y, mo, d);
        return Some(Ts(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms));
    }
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| Ts(t.timestamp_millis()))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Declares a row id as its own type, so a build's id can never be passed where a machine's is
/// expected; it is a plain integer on the wire (serde) and in the database (see `store::types`).
macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl $name {
            /// The id as the integer stored in the database and sent on the wire.
            pub const fn get(self) -> i64 {
                self.0
            }

            /// The id after this one (ids are handed out in increasing order).
            pub const fn next(self) -> Self {
                $name(self.0.saturating_add(1))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }
    };
}

row_id!(
    /// A build attempt's id (the `builds` row id).
    BuildId
);
row_id!(
    /// A machine's id (the `machines` row id, also the provisioner's idempotency token).
    MachineId
);
/// A stored change's id.
pub type ChangeId = i64;

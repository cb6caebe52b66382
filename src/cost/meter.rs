//! The meter: one machine's billed life, cut into boot, busy and idle stretches and clipped to
//! a report window. Pure: times in, stretches out; no I/O and no clock of its own.
//!
//! Billing runs from the moment the machine is running (the `launched` event) to the moment
//! it is stopped (`gone`). A machine still running is billed up to "now". A provider minimum
//! (EC2: 60 s) is charged when the machine ends: the missing seconds are one extra stretch at
//! the end time, counted as idle (paid for, used by nothing) — or boot if the agent never
//! connected.

use serde::Serialize;

use crate::core::{BuildId, MachineId, Ts};

/// EC2's per-second billing minimum for Linux, on-demand and spot alike.
pub const EC2_MINIMUM_MS: i64 = 60_000;

/// What a billed stretch of a machine's life was used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Use {
    /// Running, before its agent connected.
    Boot,
    /// Running one build.
    Busy,
    /// Connected and waiting for work (and the unused rest of a billing minimum).
    Idle,
}

/// One machine's life as the meter sees it (from its `machine_events`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Life {
    pub machine: MachineId,
    /// Billing starts (the machine is running).
    pub start: Option<Ts>,
    /// The agent connected: boot ends.
    pub connected: Option<Ts>,
    /// Billing ends (the machine is stopped); `None` while it runs.
    pub end: Option<Ts>,
    /// Builds it ran: (build, started, finished — `None` while running).
    pub builds: Vec<(BuildId, Ts, Option<Ts>)>,
    /// The provider's minimum billed time, in milliseconds (0: none).
    pub minimum_ms: i64,
}

/// A billed stretch: `ms` milliseconds of use, from `from` to `to` (for a minimum's top-up,
/// `from == to`, the end time, and `ms` is the missing time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stretch {
    pub from: Ts,
    pub to: Ts,
    pub ms: i64,
    pub what: Use,
    pub build: Option<BuildId>,
    /// The provider's minimum, charged beyond the machine's life.
    pub minimum: bool,
}

impl Life {
    /// Calls `emit` for every billed stretch inside `[since, until)`, in time order. `now`
    /// ends the life of a machine still running.
    pub fn stretches(&self, since: Ts, until: Ts, now: Ts, mut emit: impl FnMut(Stretch)) {
        let Some(start) = self.start else { return };
        let end = Ts(self.end.unwrap_or(now).0.max(start.0));
        let mut piece = |from: Ts, to: Ts, what: Use, build: Option<BuildId>| {
            let (from, to) = (Ts(from.0.max(since.0)), Ts(to.0.min(until.0)));
            if from < to {
                emit(Stretch { from, to, ms: to.0 - from.0, what, build, minimum: false });
            }
        };
        let connected = self.connected.map(|c| Ts(c.0.clamp(start.0, end.0)));
        let boot_end = connected.unwrap_or(end);
        piece(start, boot_end, Use::Boot, None);
        if let Some(mut cursor) = connected {
            let mut builds = self.builds.clone();
            builds.sort_by_key(|b| (b.1, b.0));
            for (id, b_start, b_end) in builds {
                let from = Ts(b_start.0.max(cursor.0));
                let to = Ts(b_end.unwrap_or(end).0.min(end.0));
                if from >= to {
                    continue;
                }
                piece(cursor, from, Use::Idle, None);
                piece(from, to, Use::Busy, Some(id));
                cursor = to;
            }
            piece(cursor, end, Use::Idle, None);
        }
        // The minimum is owed once the machine has ended: charged at its end time.
        if let Some(ended) = self.end {
            let lived = end.0 - start.0;
            if lived < self.minimum_ms && since <= ended && ended < until {
                let what = if connected.is_some_and(|c| c < end) { Use::Idle } else { Use::Boot };
                emit(Stretch { from: end, to: end, ms: self.minimum_ms - lived, what, build: None, minimum: true });
            }
        }
    }

    /// Billed milliseconds from the start to `now` (for a machine still running: so far),
    /// the minimum included once it has ended.
    pub fn billed_ms(&self, now: Ts) -> i64 {
        let mut ms = 0;
        self.stretches(Ts(i64::MIN), Ts(i64::MAX), now, |s| ms += s.ms);
        ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: i64) -> Ts {
        Ts(x * 1000)
    }

    fn collect(life: &Life, since: i64, until: i64, now: i64) -> Vec<(i64, i64, Use, Option<BuildId>)> {
        let mut out = vec![];
        life.stretches(s(since), s(until), s(now), |st| out.push((st.from.0 / 1000, st.ms / 1000, st.what, st.build)));
        out
    }

    fn life() -> Life {
        Life {
            machine: MachineId(1),
            start: Some(s(100)),
            connected: Some(s(130)),
            end: Some(s(400)),
            builds: vec![(BuildId(7), s(150), Some(s(250))), (BuildId(8), s(300), Some(s(350)))],
            minimum_ms: EC2_MINIMUM_MS,
        }
    }

    #[test]
    fn a_life_is_boot_then_idle_and_busy_in_turn() {
        assert_eq!(
            collect(&life(), 0, 1000, 1000),
            vec![
                (100, 30, Use::Boot, None),
                (130, 20, Use::Idle, None),
                (150, 100, Use::Busy, Some(BuildId(7))),
                (250, 50, Use::Idle, None),
                (300, 50, Use::Busy, Some(BuildId(8))),
                (350, 50, Use::Idle, None),
            ]
        );
        assert_eq!(life().billed_ms(s(1000)), 300_000);
    }

    #[test]
    fn a_window_cuts_stretches() {
        assert_eq!(
            collect(&life(), 200, 320, 1000),
            vec![
                (200, 50, Use::Busy, Some(BuildId(7))),
                (250, 50, Use::Idle, None),
                (300, 20, Use::Busy, Some(BuildId(8)))
            ]
        );
    }

    #[test]
    fn a_short_life_pays_the_minimum_at_its_end() {
        let l = Life { start: Some(s(10)), connected: Some(s(15)), end: Some(s(30)), ..life() };
        let l = Life { builds: vec![], ..l };
        assert_eq!(
            collect(&l, 0, 100, 100),
            vec![(10, 5, Use::Boot, None), (15, 15, Use::Idle, None), (30, 40, Use::Idle, None)]
        );
        // Outside the window that holds its end, the top-up is not charged.
        assert_eq!(collect(&l, 0, 30, 100), vec![(10, 5, Use::Boot, None), (15, 15, Use::Idle, None)]);
        // Never connected: the whole minimum is boot.
        let never = Life { connected: None, ..l };
        assert_eq!(collect(&never, 0, 100, 100), vec![(10, 20, Use::Boot, None), (30, 40, Use::Boot, None)]);
    }

    #[test]
    fn a_running_machine_is_billed_up_to_now_without_the_minimum_yet() {
        let l = Life { end: None, builds: vec![(BuildId(7), s(150), None)], ..life() };
        assert_eq!(
            collect(&l, 0, 1000, 170),
            vec![(100, 30, Use::Boot, None), (130, 20, Use::Idle, None), (150, 20, Use::Busy, Some(BuildId(7)))]
        );
        let young = Life { start: Some(s(100)), connected: None, end: None, builds: vec![], ..life() };
        assert_eq!(young.billed_ms(s(120)), 20_000);
    }

    #[test]
    fn a_machine_never_started_costs_nothing() {
        let l = Life { start: None, ..life() };
        assert!(collect(&l, 0, 1000, 1000).is_empty());
    }
}

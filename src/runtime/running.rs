//! The builds running now, as the agent sockets need them: which machine runs each, and where
//! its reports stand. The loop adds and removes entries; sockets only look them up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::agent::reports::ReportStream;
use crate::core::{BuildId, MachineId};

/// A build being run: which machine runs it, and where its agent's reports stand (with the
/// redactor for its log). The stream is locked while one report is stored, so two connections
/// of one agent (a dying one and its replacement) never store a report twice.
#[derive(Clone)]
struct RunningBuild {
    machine: MachineId,
    reports: Arc<tokio::sync::Mutex<ReportStream>>,
}

/// The handle on the running builds, shared by the loop and the agent sockets.
#[derive(Default)]
pub struct RunningBuilds(Mutex<HashMap<BuildId, RunningBuild>>);

impl RunningBuilds {
    /// Every entry is complete after each call, so a panic elsewhere while the lock was held
    /// leaves nothing half-written: a poisoned lock is used as it is.
    fn map(&self) -> MutexGuard<'_, HashMap<BuildId, RunningBuild>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `build` now runs on `machine`, its reports stored up to `applied` with `log_bytes` of
    /// log; `secrets` are what its log must not show.
    pub fn start(
        &self,
        build: BuildId,
        machine: MachineId,
        secrets: &[(String, String)],
        applied: u64,
        log_bytes: usize,
    ) {
        let stream = ReportStream::new(secrets, applied, log_bytes);
        self.map().insert(build, RunningBuild { machine, reports: Arc::new(tokio::sync::Mutex::new(stream)) });
    }

    /// `build` runs no more: what its agent still says about it is ignored.
    pub fn end(&self, build: BuildId) {
        self.map().remove(&build);
    }

    /// Nothing on `machine` runs any more (it is being interrupted: its build is retried).
    pub fn forget_machine(&self, machine: MachineId) {
        self.map().retain(|_, r| r.machine != machine);
    }

    /// Where the reports of `build` stand, if `machine` runs it: `None` for a build it was not
    /// given, or no longer has (retried, cancelled, interrupted).
    pub fn reports_of(&self, build: BuildId, machine: MachineId) -> Option<Arc<tokio::sync::Mutex<ReportStream>>> {
        self.map().get(&build).filter(|r| r.machine == machine).map(|r| r.reports.clone())
    }

    /// Forgets every build (tests that set up their own).
    #[cfg(test)]
    pub fn clear(&self) {
        self.map().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_machine_running_a_build_reaches_its_reports() {
        let r = RunningBuilds::default();
        r.start(BuildId(1), MachineId(7), &[], 0, 0);
        r.start(BuildId(2), MachineId(8), &[], 0, 0);
        assert!(r.reports_of(BuildId(1), MachineId(7)).is_some());
        assert!(r.reports_of(BuildId(1), MachineId(8)).is_none(), "another machine's build");
        assert!(r.reports_of(BuildId(3), MachineId(7)).is_none(), "a build never given");
        r.forget_machine(MachineId(7));
        assert!(r.reports_of(BuildId(1), MachineId(7)).is_none(), "interrupted");
        assert!(r.reports_of(BuildId(2), MachineId(8)).is_some(), "other machines keep theirs");
        r.end(BuildId(2));
        assert!(r.reports_of(BuildId(2), MachineId(8)).is_none(), "ended");
    }
}

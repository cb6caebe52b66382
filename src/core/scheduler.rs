//! Schedulers: turn changes and the calendar into build requests.
//!
//! The branch scheduler asks for one build per (builder, branch) per interesting change, folding
//! bursts inside its tree-stable window into one build of the newest revision and applying file
//! filters; the nightly scheduler fires on a cron schedule, optionally only for branches that
//! changed since its last run.

use super::{ChangeId, Ts};

use std::collections::BTreeMap;
use std::time::Duration;

/// A builder as the scheduler sees it: its name and the branches it may build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderRef {
    pub name: String,
    /// Branch globs; empty = any branch.
    pub branches: Vec<String>,
}

/// One scheduler's settings (built by the shell from the config).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerSpec {
    pub name: String,
    pub repo: String,
    /// Branch globs; empty = every branch of the repo.
    pub branches: Vec<String>,
    pub builders: Vec<BuilderRef>,
    pub kind: SpecKind,
}

/// The kind-specific part of a [`SchedulerSpec`].
#[derive(Debug, Clone, PartialEq)]
pub enum SpecKind {
    Branch {
        tree_stable: Option<Duration>,
        files: Vec<String>,
        ignore: Vec<String>,
    },
    Nightly {
        /// 5-field cron expression, UTC.
        cron: String,
        only_if_changed: bool,
    },
}

/// A change as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeInfo {
    pub id: ChangeId,
    pub repo: String,
    pub branch: String,
    pub revision: String,
    pub files: Vec<String>,
}

/// Something that happened, fed to [`Schedulers::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum SchedEvent {
    /// A new change was stored.
    Change(ChangeInfo),
    /// The current head of a branch, known without a change (e.g. recorded on first poll).
    Head { repo: String, branch: String, revision: String },
    /// Time passed: fire due tree-stable timers and nightlies.
    Tick,
}

/// A request for builds, produced by a scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub scheduler: String,
    pub repo: String,
    pub branch: String,
    pub revision: String,
    /// Builders (expanded names) to build, already filtered by each builder's branches.
    pub builders: Vec<String>,
    /// The changes this request covers (empty for nightlies).
    pub changes: Vec<ChangeId>,
    /// Human-readable: "change 12 on main", "nightly", …
    pub reason: String,
}

/// What the shell must do, returned by [`Schedulers::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum SchedAction {
    /// Store build requests for these builders.
    Request(Request),
    /// These changes have been fully considered by every scheduler (mark them so a restart
    /// does not replay them).
    ChangesDone(Vec<ChangeId>),
    /// Persist a nightly's state so a restart neither repeats nor skips it.
    NightlyState {
        scheduler: String,
        last_fire: Ts,
        /// branch -> revision built at the last nightly.
        built: BTreeMap<String, String>,
    },
}

/// Error in a scheduler spec (bad glob or cron expression).
#[derive(Debug, thiserror::Error)]
#[error("scheduler {scheduler}: {message}")]
pub struct SpecError {
    pub scheduler: String,
    pub message: String,
}
pub struct Schedulers;
impl Schedulers {
    pub fn new(_s: Vec<SchedulerSpec>, _n: Ts) -> Result<Schedulers, SpecError> { todo!() }
    pub fn restore_nightly(&mut self, _s: &str, _l: Ts, _b: BTreeMap<String, String>) { todo!() }
    pub fn handle(&mut self, _e: SchedEvent, _n: Ts) -> Vec<SchedAction> { todo!() }
}

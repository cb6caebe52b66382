//! The build lifecycle as a pure state machine: given what is stored of an attempt
//! ([`BuildFacts`]) and what happened to it ([`BuildEvent`]), [`decide`] says what it becomes
//! ([`Transition`]) or why the event does not apply ([`Refused`]). The store carries a decision
//! out in the transaction that read the facts; the loop carries out the follow-ups (the fleet,
//! the agent); the simulator applies the same retry rule.

use super::{BuildId, MachineId};

/// Where a build attempt is in its life. Stored and shown as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for a machine.
    Queued,
    /// On a machine.
    Running,
    /// Every step passed.
    Success,
    /// A step failed.
    Failure,
    /// Its machine was lost; a new attempt of the same request was queued.
    Retry,
    /// Someone cancelled it.
    Cancelled,
    /// It could not run or finish as a build should (a missing secret, a step that never
    /// reported, too many lost machines).
    Exception,
}

impl BuildState {
    /// Every state, in lifecycle order.
    pub const ALL: [BuildState; 7] = [
        BuildState::Queued,
        BuildState::Running,
        BuildState::Success,
        BuildState::Failure,
        BuildState::Retry,
        BuildState::Cancelled,
        BuildState::Exception,
    ];

    /// Its stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Success => "success",
            BuildState::Failure => "failure",
            BuildState::Retry => "retry",
            BuildState::Cancelled => "cancelled",
            BuildState::Exception => "exception",
        }
    }

    /// The state named `s`, if it is one.
    pub fn parse(s: &str) -> Option<BuildState> {
        BuildState::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// Still to end: queued or running.
    pub fn is_live(self) -> bool {
        matches!(self, BuildState::Queued | BuildState::Running)
    }

    /// Ended, with a result of its own (not handed on to another attempt).
    pub fn is_final(self) -> bool {
        !self.is_live() && self != BuildState::Retry
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Attempts of one build request before it ends as `exception` instead of being retried.
pub const MAX_ATTEMPTS: u32 = 3;

/// What becomes of a build attempt whose machine was lost (stopped, vanished, interrupted)
/// before it reported its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLoss {
    /// Someone cancelled it: it ends `cancelled` and never runs again (cancel wins).
    Cancelled,
    /// A new attempt is queued at the front.
    Retry,
    /// It keeps killing its machines: it ends `exception`, so it cannot launch machines forever.
    GiveUp,
}

/// The rule for attempt number `attempt` (1-based) of a build, `cancelled` when a cancel was
/// asked for.
pub fn after_loss(attempt: u32, cancelled: bool) -> AfterLoss {
    if cancelled {
        AfterLoss::Cancelled
    } else if attempt >= MAX_ATTEMPTS {
        AfterLoss::GiveUp
    } else {
        AfterLoss::Retry
    }
}

/// What the lifecycle rules need to know of an attempt, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFacts {
    pub id: BuildId,
    pub state: BuildState,
    /// 1-based attempt number of its request.
    pub attempt: u32,
    /// The machine it runs (or ran) on.
    pub machine: Option<MachineId>,
    /// Someone asked to cancel it while it ran.
    pub cancel_asked: bool,
    /// The first step still pending or running (index, name): a report that never arrived.
    pub open_step: Option<(i64, String)>,
}

/// What can happen to a build attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// The agent on `machine` reported the build's end with `result` (a final state).
    Reported { machine: MachineId, result: BuildState },
    /// Its machine was lost (stopped, vanished, interrupted, the master shut down) before it
    /// reported its end.
    Lost { reason: String },
    /// Someone asked to cancel it; `agent_reachable` says whether its agent can be told.
    Cancel { by: String, agent_reachable: bool },
    /// It can never run (its builder is no longer configured).
    Abandon { reason: String },
}

/// What becomes of steps still open when an attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenSteps {
    /// The build ended before they ran (a failure earlier, a cancel seen by the agent).
    Skipped,
    /// The attempt was cut off (its machine lost).
    Cancelled,
}

impl OpenSteps {
    /// The step state stored for them.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenSteps::Skipped => "skipped",
            OpenSteps::Cancelled => "cancelled",
        }
    }
}

/// What the machine pool is to hear once a transition is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetNext {
    /// Nothing: the fleet made the event itself, or the build had no machine yet.
    Nothing,
    /// A queued build left the queue.
    Dequeued,
    /// The machine that ran it is free for the next build.
    MachineFree(MachineId),
    /// The machine must be stopped, not reused (nobody could tell it the build was cancelled).
    StopMachine { machine: MachineId, reason: String },
}

/// What a build attempt becomes: the store writes it, the loop carries out the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state the attempt must still be in when it is written (the store's guard).
    pub from: BuildState,
    pub to: BuildState,
    /// The attempt's new reason, when it changes.
    pub reason: Option<String>,
    /// Who asked to cancel it, recorded.
    pub cancel_by: Option<String>,
    /// A cancel asked for earlier is forgotten (it lost the race with the build's end).
    pub forget_cancel: bool,
    /// What steps still open become.
    pub open_steps: Option<OpenSteps>,
    /// A line for the build's log: (step index, text).
    pub note: Option<(i64, String)>,
    /// The machine's meter records that its build ended (it ran on one).
    pub meter_end: Option<MachineId>,
    /// Notifiers hear of its end.
    pub news: bool,
    /// A new attempt of the same request is queued, at the front, with this reason.
    pub requeue: Option<String>,
    /// Its agent is told to stop it (it then reports `cancelled`).
    pub tell_agent: Option<MachineId>,
    pub fleet: FleetNext,
}

impl Transition {
    fn new(from: BuildState, to: BuildState) -> Transition {
        Transition {
            from,
            to,
            reason: None,
            cancel_by: None,
            forget_cancel: false,
            open_steps: None,
            note: None,
            meter_end: None,
            news: false,
            requeue: None,
            tell_agent: None,
            fleet: FleetNext::Nothing,
        }
    }
}

/// Why an event does not apply to an attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// It has ended; nothing changes it any more.
    #[error("build {0} is {1}; only queued or running builds can change")]
    Ended(BuildId, BuildState),
    /// A report from a machine that no longer runs it (the attempt was retried meanwhile).
    #[error("build {0} does not run on machine {1}")]
    NotOnMachine(BuildId, MachineId),
    /// An agent reported a state that is not an end.
    #[error("build {0} cannot end as {1}")]
    NotAnEnd(BuildId, BuildState),
    /// There is no such attempt.
    #[error("no build {0}")]
    NoSuchBuild(BuildId),
    /// The attempt changed between reading and writing it (nothing was written).
    #[error("build {0} changed meanwhile; try again")]
    Raced(BuildId),
    /// Only a queued build can be abandoned.
    #[error("build {0} is {1}, not queued")]
    NotQueued(BuildId, BuildState),
}

/// The lifecycle's rules: what `event` does to the attempt described by `facts`.
pub fn decide(facts: &BuildFacts, event: &BuildEvent) -> Result<Transition, Refused> {
    let id = facts.id;
    if !facts.state.is_live() {
        return Err(Refused::Ended(id, facts.state));
    }
    let running_on = match facts.state {
        BuildState::Running => facts.machine,
        _ => None,
    };
    match event {
        BuildEvent::Reported { machine, result } => {
            if running_on != Some(*machine) {
                return Err(Refused::NotOnMachine(id, *machine));
            }
            if !result.is_final() {
                return Err(Refused::NotAnEnd(id, *result));
            }
            let mut t = Transition::new(facts.state, *result);
            // A build is a success only if every step reported its own result.
            if let (BuildState::Success, Some((idx, name))) = (result, &facts.open_step) {
                t.to = BuildState::Exception;
                t.note = Some((
                    *idx,
                    format!("paddock: step {name} reported no result, so the build cannot be a success\n"),
                ));
            }
            // A cancel that lost the race with the build's end leaves no trace on its result.
            t.forget_cancel = t.to != BuildState::Cancelled;
            t.open_steps = Some(OpenSteps::Skipped);
            t.meter_end = Some(*machine);
            t.news = true;
            t.fleet = FleetNext::MachineFree(*machine);
            Ok(t)
        }
        BuildEvent::Lost { reason } => {
            let mut t = Transition::new(facts.state, BuildState::Retry);
            t.open_steps = Some(OpenSteps::Cancelled);
            t.meter_end = running_on;
            match after_loss(facts.attempt, facts.cancel_asked) {
                // Cancelled, and its machine went away before saying so: it ends cancelled.
                AfterLoss::Cancelled => {
                    t.to = BuildState::Cancelled;
                    t.news = running_on.is_some();
                }
                // A build that keeps killing its machine must not launch machines forever; its
                // end is news like any other (a pending commit status must not stay pending).
                AfterLoss::GiveUp => {
                    t.to = BuildState::Exception;
                    t.reason = Some(format!("gave up after {MAX_ATTEMPTS} attempts; the last one: {reason}"));
                    t.news = true;
                }
                AfterLoss::Retry => {
                    t.reason = Some(reason.clone());
                    t.requeue = Some(format!("retry of build {id}: {reason}"));
                }
            }
            if facts.state == BuildState::Queued {
                t.fleet = FleetNext::Dequeued;
            }
            Ok(t)
        }
        BuildEvent::Cancel { by, agent_reachable } => match running_on {
            None => {
                let mut t = Transition::new(facts.state, BuildState::Cancelled);
                t.cancel_by = Some(by.clone());
                t.fleet = FleetNext::Dequeued;
                Ok(t)
            }
            Some(machine) => {
                let mut t = Transition::new(facts.state, BuildState::Running);
                t.cancel_by = Some(by.clone());
                t.note = Some((0, format!("*** cancel requested by {by}\n")));
                if *agent_reachable {
                    t.tell_agent = Some(machine);
                } else {
                    // Nobody to tell: it ends here, and the machine is stopped rather than
                    // trusted (made idle, it would be handed the next build, which the stop
                    // would then retry).
                    t.to = BuildState::Cancelled;
                    t.open_steps = Some(OpenSteps::Skipped);
                    t.meter_end = Some(machine);
                    t.news = true;
                    t.fleet = FleetNext::StopMachine {
                        machine,
                        reason: format!("build {id} cancelled by {by} while its agent was away"),
                    };
                }
                Ok(t)
            }
        },
        BuildEvent::Abandon { reason } => {
            if facts.state != BuildState::Queued {
                return Err(Refused::NotQueued(id, facts.state));
            }
            let mut t = Transition::new(BuildState::Queued, BuildState::Exception);
            t.reason = Some(reason.clone());
            t.news = true;
            t.fleet = FleetNext::Dequeued;
            Ok(t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: BuildState, attempt: u32, cancel_asked: bool) -> BuildFacts {
        let machine = (state == BuildState::Running).then_some(MachineId(7));
        BuildFacts { id: BuildId(1), state, attempt, machine, cancel_asked, open_step: None }
    }

    #[test]
    fn a_success_with_a_step_unreported_is_an_exception() {
        let mut f = facts(BuildState::Running, 1, false);
        f.open_step = Some((2, "test".into()));
        let t =
            decide(&f, &BuildEvent::Reported { machine: MachineId(7), result: BuildState::Success }).expect("applies");
        assert_eq!(t.to, BuildState::Exception);
        assert!(t.note.is_some_and(|(i, n)| i == 2 && n.contains("step test reported no result")));
        let t =
            decide(&f, &BuildEvent::Reported { machine: MachineId(7), result: BuildState::Failure }).expect("applies");
        assert_eq!((t.to, t.fleet), (BuildState::Failure, FleetNext::MachineFree(MachineId(7))));
    }

    #[test]
    fn reports_from_elsewhere_or_after_the_end_change_nothing() {
        let f = facts(BuildState::Running, 1, false);
        let ev = BuildEvent::Reported { machine: MachineId(8), result: BuildState::Success };
        assert_eq!(decide(&f, &ev), Err(Refused::NotOnMachine(BuildId(1), MachineId(8))));
        let ev = BuildEvent::Reported { machine: MachineId(7), result: BuildState::Running };
        assert_eq!(decide(&f, &ev), Err(Refused::NotAnEnd(BuildId(1), BuildState::Running)));
        for s in [BuildState::Success, BuildState::Retry, BuildState::Cancelled] {
            let ev = BuildEvent::Cancel { by: "ann".into(), agent_reachable: true };
            assert_eq!(decide(&facts(s, 1, false), &ev), Err(Refused::Ended(BuildId(1), s)));
        }
    }

    #[test]
    fn a_cancel_is_told_to_the_agent_or_ends_the_build_and_its_machine() {
        let f = facts(BuildState::Running, 1, false);
        let t = decide(&f, &BuildEvent::Cancel { by: "ann".into(), agent_reachable: true }).expect("applies");
        assert_eq!(
            (t.to, t.tell_agent, t.cancel_by.as_deref()),
            (BuildState::Running, Some(MachineId(7)), Some("ann"))
        );
        let t = decide(&f, &BuildEvent::Cancel { by: "ann".into(), agent_reachable: false }).expect("applies");
        assert_eq!(t.to, BuildState::Cancelled);
        assert!(matches!(t.fleet, FleetNext::StopMachine { machine: MachineId(7), .. }));
        let t = decide(
            &facts(BuildState::Queued, 1, false),
            &BuildEvent::Cancel { by: "ann".into(), agent_reachable: false },
        )
        .expect("applies");
        assert_eq!((t.to, t.fleet, t.news), (BuildState::Cancelled, FleetNext::Dequeued, false));
    }

    #[test]
    fn a_lost_machine_retries_gives_up_or_honours_the_cancel() {
        let lost = BuildEvent::Lost { reason: "vanished".into() };
        let t = decide(&facts(BuildState::Running, 1, false), &lost).expect("applies");
        assert_eq!((t.to, t.requeue.as_deref()), (BuildState::Retry, Some("retry of build 1: vanished")));
        let t = decide(&facts(BuildState::Running, 3, false), &lost).expect("applies");
        assert!(t.to == BuildState::Exception && t.requeue.is_none() && t.news);
        let t = decide(&facts(BuildState::Running, 1, true), &lost).expect("applies");
        assert!(t.to == BuildState::Cancelled && t.requeue.is_none());
    }

    #[test]
    fn every_state_is_named_and_parsed_back() {
        for s in BuildState::ALL {
            assert_eq!(BuildState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(serde_json::Value::String(s.as_str().into())));
        }
        assert_eq!(BuildState::parse("done"), None);
        assert!(BuildState::Queued.is_live() && !BuildState::Retry.is_final() && BuildState::Cancelled.is_final());
    }

    #[test]
    fn cancel_wins_then_three_attempts_at_most() {
        assert_eq!(after_loss(1, true), AfterLoss::Cancelled);
        assert_eq!(after_loss(3, true), AfterLoss::Cancelled);
        assert_eq!(after_loss(1, false), AfterLoss::Retry);
        assert_eq!(after_loss(2, false), AfterLoss::Retry);
        assert_eq!(after_loss(3, false), AfterLoss::GiveUp);
    }
}

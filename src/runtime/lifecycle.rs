//! Carrying out the build lifecycle's decisions: the store writes what the core decided (one
//! transaction), then the loop tells the fleet and the agent what follows from it.

use super::*;
use crate::core::build::{BuildEvent, FleetNext, Refused, Transition};

impl Master {
    /// Lets the lifecycle decide what `event` does to attempt `build`, stores it and carries
    /// out what follows (a retry queued at the front, the fleet told, the agent told).
    pub(super) async fn build_event(
        &mut self,
        build: BuildId,
        event: BuildEvent,
    ) -> Result<Result<Transition, Refused>, MasterError> {
        let now = self.shared.now();
        let decided = self.shared.store.build_event(build, &event, now).await?;
        Ok(decided.map(|d| {
            self.follow_up(build, &d.transition, d.next.as_ref());
            d.transition
        }))
    }

    /// What follows once a transition of `build` is stored.
    pub(super) fn follow_up(&mut self, build: BuildId, t: &Transition, next: Option<&BuildRow>) {
        if !t.to.is_live() {
            // What its agent still says about it (a step killed by a shutdown) must not end it
            // again as that step's failure.
            self.shared.running.end(build);
        }
        if let Some(next) = next {
            tracing::warn!(build = build.get(), next = next.id.get(), reason = ?t.reason, "build will be retried");
            self.queue(next, true);
        }
        if let Some(machine) = t.tell_agent {
            if let Some((_, tx)) = self.agents.get(&machine) {
                let _ = tx.send(MasterMsg::Cancel { build });
            }
        }
        match &t.fleet {
            FleetNext::Nothing => {}
            FleetNext::Dequeued => self.pending.push_back(FleetEvent::BuildCancelled { build }),
            FleetNext::MachineFree(machine) => {
                self.pending.push_back(FleetEvent::BuildFinished { machine: *machine, build })
            }
            FleetNext::StopMachine { machine, reason } => {
                self.pending.push_back(FleetEvent::StopMachine { machine: *machine, reason: reason.clone() })
            }
        }
    }

    /// Stores and queues a build someone asked for; refused once shutdown began (a request
    /// accepted then would wait for the next start, which its asker was not told).
    pub(super) async fn request(&mut self, r: NewRequest) -> Result<BuildRow, ActionError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(ActionError::Stopping);
        }
        let now = self.shared.now();
        let store = &self.shared.store;
        let build = store
            .create_request(&r.builder, &r.repo, &r.branch, &r.revision, r.scheduler, &r.reason, &r.changes, now)
            .await?;
        tracing::info!(build = build.id.get(), builder = %build.builder, branch = %build.branch, reason = %r.reason, "{} build queued", r.scheduler);
        self.queue(&build, false);
        Ok(build)
    }

    /// Cancels a build: a queued one at once, a running one by telling its agent (which
    /// reports it `cancelled`); a running build whose agent is not connected ends as cancelled
    /// here and its machine is stopped.
    pub(super) async fn cancel(&mut self, build: BuildId, by: &str) -> Result<Cancelled, ActionError> {
        let row = self.shared.store.build(build).await?;
        let reachable = row.and_then(|r| r.machine).is_some_and(|machine| {
            self.agents.contains_key(&machine) && self.fleet.machine_build(machine) == Some(build)
        });
        let event = BuildEvent::Cancel { by: by.to_string(), agent_reachable: reachable };
        match self.build_event(build, event).await {
            Ok(Ok(t)) if t.from == crate::core::build::BuildState::Queued => {
                tracing::info!(build = build.get(), %by, "queued build cancelled");
                Ok(Cancelled::Queued)
            }
            Ok(Ok(t)) => {
                match t.tell_agent {
                    Some(machine) => {
                        tracing::info!(build = build.get(), machine = machine.get(), %by, "running build cancelled; its agent is stopping it")
                    }
                    None => {
                        tracing::info!(build = build.get(), %by, "running build cancelled; its agent is away, stopping the machine")
                    }
                }
                Ok(Cancelled::Stopping)
            }
            Ok(Err(e @ Refused::NoSuchBuild(_))) => Err(ActionError::NotFound(e.to_string())),
            Ok(Err(Refused::Ended(_, state))) => Err(ActionError::Conflict(format!(
                "build {build} is {state}; only queued or running builds can be cancelled"
            ))),
            Ok(Err(e)) => Err(ActionError::Conflict(e.to_string())),
            Err(MasterError::Store(e)) => Err(ActionError::Store(e)),
            Err(e) => Err(ActionError::Conflict(e.to_string())),
        }
    }
}

//! The loop's handle: what the rest of the master (web handlers, agent connections, pollers,
//! the loop's own helper tasks) may ask of the loop, one method per intent. Nobody else holds
//! the loop's inbox, so every lifecycle change goes through the loop and its core.

use tokio::sync::{mpsc, oneshot};

use super::{ActionError, Cancelled, Input, NewRequest};
use crate::agent::protocol::MasterMsg;
use crate::core::fleet::FleetEvent;
use crate::core::scheduler::{ChangeInfo, SchedEvent};
use crate::core::{BuildId, MachineId};
use crate::store::{Applied, BuildRow, Report, StoreError};

/// A cheap, clonable way to reach the master's loop.
#[derive(Clone, Debug)]
pub struct LoopHandle {
    inputs: mpsc::Sender<Input>,
}

impl LoopHandle {
    /// A handle on the loop that reads `inputs`.
    pub(crate) fn new(inputs: mpsc::Sender<Input>) -> LoopHandle {
        LoopHandle { inputs }
    }

    /// Hands the loop an input; dropped only when the loop has stopped (the master is
    /// shutting down, and what was not done is repaired at the next start).
    pub(crate) async fn send(&self, input: Input) {
        if self.inputs.send(input).await.is_err() {
            tracing::debug!("master loop has stopped; input dropped");
        }
    }

    /// Sends `input` made with a reply channel and waits for the answer; `None` if the loop
    /// stopped first.
    async fn ask<T>(&self, input: impl FnOnce(oneshot::Sender<T>) -> Input) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.send(input(reply)).await;
        answer.await.ok()
    }

    /// A change was stored (by a poller or a webhook): the schedulers hear of it.
    pub async fn change(&self, change: ChangeInfo) {
        self.send(Input::Sched(SchedEvent::Change(change))).await;
    }

    /// A branch's head is `revision` now.
    pub async fn head(&self, repo: &str, branch: &str, revision: &str) {
        let head = SchedEvent::Head { repo: repo.into(), branch: branch.into(), revision: revision.into() };
        self.send(Input::Sched(head)).await;
    }

    /// Asks for a build (force, rebuild); the loop stores and queues it.
    pub async fn request(&self, request: NewRequest) -> Result<BuildRow, ActionError> {
        self.ask(|reply| Input::Request { request, reply }).await.unwrap_or(Err(ActionError::Stopping))
    }

    /// Asks to cancel build `build` on behalf of `by`.
    pub async fn cancel(&self, build: BuildId, by: &str) -> Result<Cancelled, ActionError> {
        let by = by.to_string();
        self.ask(|reply| Input::Cancel { build, by, reply }).await.unwrap_or(Err(ActionError::Stopping))
    }

    /// Asks to stop machine `machine` on behalf of `by` (its build, if any, is retried).
    pub async fn stop_machine(&self, machine: MachineId, by: &str) -> Result<(), ActionError> {
        let by = by.to_string();
        self.ask(|reply| Input::StopMachine { machine, by, reply }).await.unwrap_or(Err(ActionError::Stopping))
    }

    /// Asks to pause or resume pool `pool` on behalf of `by`.
    pub async fn pause(&self, pool: &str, paused: bool, by: &str) -> Result<(), ActionError> {
        let (pool, by) = (pool.to_string(), by.to_string());
        self.ask(|reply| Input::Pause { pool, paused, by, reply }).await.unwrap_or(Err(ActionError::Stopping))
    }

    /// An agent authenticated on connection `conn`; `tx` reaches it.
    pub async fn agent_connected(
        &self,
        machine: MachineId,
        conn: u64,
        tx: mpsc::UnboundedSender<MasterMsg>,
        resumed: Option<Option<BuildId>>,
    ) {
        self.send(Input::AgentConnected { machine, conn, tx, resumed }).await;
    }

    /// A machine's agent is alive.
    pub async fn heartbeat(&self, machine: MachineId) {
        self.send(Input::Fleet(FleetEvent::Heartbeat { machine })).await;
    }

    /// Connection `conn` of a machine's agent closed.
    pub async fn agent_closed(&self, machine: MachineId, conn: u64) {
        self.send(Input::AgentClosed { machine, conn }).await;
    }

    /// A machine's agent says the machine is being taken away; returns once the loop acted.
    pub async fn interrupted(&self, machine: MachineId, detail: String) {
        let _ = self.ask(|reply| Input::Interrupted { machine, detail, reply }).await;
    }

    /// An agent's numbered reports that end with its build's end (the last one's effect is
    /// `BuildFinished`); the loop stores them and ends the attempt. `None` if the loop stopped
    /// first (the reports are not acknowledged).
    pub async fn finished(
        &self,
        machine: MachineId,
        build: BuildId,
        after: u64,
        reports: Vec<Report>,
    ) -> Option<Result<Applied, StoreError>> {
        self.ask(|reply| Input::Finished { machine, build, after, reports, reply }).await
    }
}

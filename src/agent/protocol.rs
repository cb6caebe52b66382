//! The master⇄agent protocol: JSON messages in WebSocket text frames.
//!
//! The agent opens `GET {master}/agent/ws`, sends [`AgentMsg::Hello`] with its one-time token,
//! and waits for [`MasterMsg::Welcome`] (or [`MasterMsg::Refused`], after which the master closes
//! the socket). It then heartbeats every `heartbeat_secs` and runs the builds it is given, one at
//! a time, streaming [`AgentMsg::Log`] lines and step results.
//!
//! Every report about a build (step started, log, step finished, build finished) carries a
//! sequence number, counted from 1 per build. The master stores each report once, in order, and
//! answers [`MasterMsg::Ack`] with the highest number it has stored (reports that arrived
//! together are stored in one transaction and acknowledged once); the agent keeps every
//! report until it is acknowledged and sends the unacknowledged ones again after a
//! reconnection. What a master took off the socket but never stored (it died) is therefore sent
//! again, and what it did store is never stored twice.

use std::collections::BTreeMap;

use crate::core::{BuildId, MachineId};
use serde::{Deserialize, Serialize};

/// Most log text stored per build attempt; past it, one notice and the rest is dropped, so a
/// runaway step can fill neither the master's database nor the machine's disk.
pub const MAX_LOG_BYTES: usize = 64 * 1024 * 1024;

/// Messages from the agent to the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message: authenticate with the machine's one-time token.
    Hello { token: Secret, version: String },
    /// First message of a reconnection (the master restarted or the network dropped): the
    /// machine and the resume token of its last Welcome. `build` is the build it is running or,
    /// when idle, the last one it finished (its BuildFinished is sent again after the Welcome,
    /// in case the master never got it). Buffered messages follow the Welcome.
    Resume { machine: MachineId, token: Secret, version: String, build: Option<BuildId> },
    /// Liveness, every `heartbeat_secs`.
    Heartbeat,
    /// A step started.
    StepStarted {
        build: BuildId,
        /// The report's place in the build's sequence (see the module docs); 0 until the
        /// connection layer numbers it.
        #[serde(default)]
        seq: u64,
        step: usize,
    },
    /// Output of a step (stdout and stderr merged), already redacted by the agent (the master
    /// redacts again).
    Log {
        build: BuildId,
        #[serde(default)]
        seq: u64,
        step: usize,
        text: String,
    },
    /// A step ended.
    StepFinished {
        build: BuildId,
        #[serde(default)]
        seq: u64,
        step: usize,
        result: StepResult,
        /// Exit code when the command exited by itself.
        exit_code: Option<i32>,
    },
    /// The build ended; `result` is `success`, `failure` or `exception` (checkout failed, …).
    BuildFinished {
        build: BuildId,
        #[serde(default)]
        seq: u64,
        result: BuildResult,
    },
    /// The cloud announced that this machine is going away: `kind` is `spot-interruption` or
    /// `rebalance`, `detail` says what and when (`terminate at 2026-11-24T20:00:00Z`). The agent
    /// carries on with its build; the master requeues it and stops the machine. Sent again after
    /// a reconnection, as the first send may have died with the socket (the master ignores a
    /// repeat).
    Interrupted { kind: String, detail: String },
}

/// Messages from the master to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMsg {
    /// Authentication accepted. `resume_token` (a new one at every Welcome) lets the agent
    /// reconnect within `reconnect_secs` after losing the connection; without it the agent
    /// exits when the connection ends.
    Welcome {
        machine: MachineId,
        heartbeat_secs: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<Secret>,
        #[serde(default)]
        reconnect_secs: u64,
        /// After a Resume: how far the master has stored the reports of the build the Resume
        /// named, so the agent sends only what follows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        acked: Option<Ack>,
    },
    /// Authentication refused; the socket closes after this.
    Refused { reason: String },
    /// Run this build now.
    Run(Box<BuildJob>),
    /// Finish nothing more; exit.
    Shutdown,
    /// Stop this build (someone cancelled it): kill its step, skip the rest, report it
    /// `cancelled`, and stay connected for the next one. Ignored unless it is the running build.
    Cancel { build: BuildId },
    /// Every report of `build` up to and including `seq` is stored (or was not wanted): the
    /// agent may forget them.
    Ack(Ack),
}

/// A point in a build's sequence of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub build: BuildId,
    pub seq: u64,
}

impl AgentMsg {
    /// The build and sequence number of a report about a build; `None` for the others
    /// (handshake, heartbeat, interruption notices), which are not sequenced.
    pub fn sequenced(&self) -> Option<(BuildId, u64)> {
        match *self {
            AgentMsg::StepStarted { build, seq, .. }
            | AgentMsg::Log { build, seq, .. }
            | AgentMsg::StepFinished { build, seq, .. }
            | AgentMsg::BuildFinished { build, seq, .. } => Some((build, seq)),
            _ => None,
        }
    }

    /// The same report numbered `n` in its build's sequence (others unchanged).
    pub fn with_seq(mut self, n: u64) -> AgentMsg {
        match &mut self {
            AgentMsg::StepStarted { seq, .. }
            | AgentMsg::Log { seq, .. }
            | AgentMsg::StepFinished { seq, .. }
            | AgentMsg::BuildFinished { seq, .. } => *seq = n,
            _ => {}
        }
        self
    }
}

/// A credential carried in a message. Its `Debug` never shows it, so no log line or failed
/// assertion can print it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Everything an agent needs to run one build. Its `Debug` shows secret names, not values.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildJob {
    pub build: BuildId,
    pub builder: String,
    pub repo_url: String,
    pub branch: String,
    pub revision: String,
    /// Environment for every step.
    pub env: BTreeMap<String, String>,
    pub steps: Vec<JobStep>,
    /// Secret name -> value. Referenced as `{secret:NAME}` in steps; must never be logged.
    pub secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for BuildJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildJob")
            .field("build", &self.build)
            .field("builder", &self.builder)
            .field("repo_url", &self.repo_url)
            .field("branch", &self.branch)
            .field("revision", &self.revision)
            .field("env", &self.env)
            .field("steps", &self.steps)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One step to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStep {
    pub name: String,
    /// Shell command for `sh -c`; may contain `{secret:NAME}`.
    pub run: String,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout_secs: u64,
    pub always: bool,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepResult {
    Success,
    Failure,
    /// Killed after its timeout.
    Timeout,
    /// Not run because an earlier step failed.
    Skipped,
    /// Could not be started or internal error.
    Exception,
    /// Killed because the build was cancelled.
    Cancelled,
}

impl StepResult {
    /// Lowercase name as stored and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            StepResult::Success => "success",
            StepResult::Failure => "failure",
            StepResult::Timeout => "timeout",
            StepResult::Skipped => "skipped",
            StepResult::Exception => "exception",
            StepResult::Cancelled => "cancelled",
        }
    }
}

/// How a build ended, as reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildResult {
    Success,
    Failure,
    Exception,
    /// Stopped on request (a cancel, or the machine being shut down).
    Cancelled,
}

impl BuildResult {
    /// The build state it ends the attempt in.
    pub fn state(self) -> crate::core::build::BuildState {
        use crate::core::build::BuildState;
        match self {
            BuildResult::Success => BuildState::Success,
            BuildResult::Failure => BuildState::Failure,
            BuildResult::Exception => BuildState::Exception,
            BuildResult::Cancelled => BuildState::Cancelled,
        }
    }

    /// Lowercase name as stored and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildResult::Success => "success",
            BuildResult::Failure => "failure",
            BuildResult::Exception => "exception",
            BuildResult::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_wire_shape() {
        let msg = AgentMsg::Interrupted {
            kind: "spot-interruption".into(),
            detail: "terminate at 2026-11-24T20:00:00Z".into(),
        };
        let json = serde_json::to_value(&msg).ok();
        assert_eq!(
            json,
            Some(serde_json::json!({
                "type": "interrupted",
                "kind": "spot-interruption",
                "detail": "terminate at 2026-11-24T20:00:00Z"
            }))
        );
        let back = serde_json::from_value::<AgentMsg>(
            serde_json::json!({"type": "interrupted", "kind": "rebalance", "detail": ""}),
        );
        assert_eq!(back.ok(), Some(AgentMsg::Interrupted { kind: "rebalance".into(), detail: String::new() }));
    }
}

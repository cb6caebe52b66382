//! The master⇄agent protocol: JSON messages in WebSocket text frames.
//!
//! The agent opens `GET {master}/agent/ws`, sends [`AgentMsg::Hello`] with its one-time token,
//! and waits for [`MasterMsg::Welcome`] (or [`MasterMsg::Refused`], after which the master closes
//! the socket). It then heartbeats every `heartbeat_secs` and runs the builds it is given, one at
//! a time, streaming [`AgentMsg::Log`] lines and step results.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Messages from the agent to the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message: authenticate with the machine's one-time token.
    Hello { token: String, version: String },
    /// First message of a reconnection (the master restarted or the network dropped): the
    /// machine and the resume token of its last Welcome. The build it is running, if any,
    /// carries on and its buffered messages follow the new Welcome.
    Resume { machine: i64, token: String, version: String, build: Option<i64> },
    /// Liveness, every `heartbeat_secs`.
    Heartbeat,
    /// A step started.
    StepStarted { build: i64, step: usize },
    /// Output of a step, already redacted by the agent (the master redacts again).
    Log { build: i64, step: usize, text: String },
    /// A step ended.
    StepFinished {
        build: i64,
        step: usize,
        result: StepResult,
        /// Exit code when the command exited by itself.
        exit_code: Option<i32>,
    },
    /// The build ended; `result` is `success`, `failure` or `exception` (checkout failed, …).
    BuildFinished { build: i64, result: BuildResult },
}

/// Messages from the master to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMsg {
    /// Authentication accepted. `resume_token` (a new one at every Welcome) lets the agent
    /// reconnect within `reconnect_secs` after losing the connection; without it the agent
    /// exits when the connection ends.
    Welcome {
        machine: i64,
        heartbeat_secs: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<String>,
        #[serde(default)]
        reconnect_secs: u64,
    },
    /// Authentication refused; the socket closes after this.
    Refused { reason: String },
    /// Run this build now.
    Run(Box<BuildJob>),
    /// Finish nothing more; exit.
    Shutdown,
}

/// Everything an agent needs to run one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildJob {
    pub build: i64,
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
}

impl BuildResult {
    /// Lowercase name as stored and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildResult::Success => "success",
            BuildResult::Failure => "failure",
            BuildResult::Exception => "exception",
        }
    }
}

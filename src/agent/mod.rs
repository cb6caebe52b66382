//! The agent side (`paddock agent`) and the master⇄agent protocol.
//!
//! - [`protocol`]: the JSON messages exchanged over the WebSocket;
//! - [`redact`]: streaming removal of secret values from step output;
//! - [`reports`]: the master's side of an agent's numbered reports about a build;
//! - [`job`]: running one build (checkout + steps) on this machine;
//! - [`client`]: the `paddock agent` process: connect, authenticate, heartbeat, run builds;
//! - [`journal`]: the reports kept until the master acknowledges them;
//! - [`imds`]: on EC2, spot interruption notices from the instance metadata service.

pub mod client;
pub mod imds;
pub mod job;
pub mod journal;
pub mod protocol;
pub mod redact;
pub mod reports;

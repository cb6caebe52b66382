//! The agent side (`paddock agent`) and the master⇄agent protocol.
//!
//! - [`protocol`]: the JSON messages exchanged over the WebSocket;
//! - [`redact`]: streaming removal of secret values from step output;
//! - [`job`]: running one build (checkout + steps) on this machine;
//! - [`client`]: the `paddock agent` process: connect, authenticate, heartbeat, run builds;
//! - [`imds`]: on EC2, spot interruption notices from the instance metadata service.

pub mod client;
pub mod imds;
pub mod job;
pub mod protocol;
pub mod redact;

//! The agent side (`paddock agent`) and the master⇄agent protocol.
//!
//! - [`protocol`]: the JSON messages exchanged over the WebSocket;
//! - [`redact`]: streaming removal of secret values from step output;
//! - [`job`]: running one build (checkout + steps) on this machine;
//! - [`client`]: the `paddock agent` process: connect, authenticate, heartbeat, run builds.

pub mod client;
pub mod job;
pub mod protocol;
pub mod redact;

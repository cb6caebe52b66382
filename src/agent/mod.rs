//! The agent side (`paddock agent`) and the master⇄agent protocol.

pub mod protocol;
pub mod redact;
pub mod client;

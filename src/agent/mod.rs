//! The agent side (`paddock agent`) and the master⇄agent protocol.

pub mod protocol;

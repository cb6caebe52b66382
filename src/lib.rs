//! Paddock: a CI master that runs every build on small on-demand latent workers.
//!
//! Changes come in from git pollers and webhooks, schedulers turn them into build requests, and
//! the fleet boots machines through a provisioner, one build at a time per machine. See
//! `DESIGN.md`-style overview in the README.

pub mod agent;
pub mod changes;
pub mod config;
pub mod core;

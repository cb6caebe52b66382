//! Paddock: a CI master that runs every build on small on-demand latent workers.
//!
//! Changes come in from git pollers and webhooks, schedulers turn them into build requests, and
//! the fleet boots machines through a provisioner, one build at a time per machine. The
//! decisions live in the sans-IO [`core`]; [`runtime`] is the tokio shell around it.

pub mod accounts;
pub mod agent;
pub mod changes;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod cost;
pub mod demo;
pub mod logging;
pub mod notify;
pub mod runtime;
pub mod sim;
pub mod store;
pub mod tls;
pub mod web;

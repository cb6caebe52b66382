//! The injected clock: every persisted timestamp comes from here, so tests control time.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::core::Ts;

/// A source of "now".
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Ts;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Ts {
        Ts(chrono::Utc::now().timestamp_millis())
    }
}

/// A clock that only moves when told to (tests, the simulator).
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Ts) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start.0)))
    }
    /// Moves the clock to `t`.
    pub fn set(&self, t: Ts) {
        self.0.store(t.0, Ordering::SeqCst);
    }
    /// Moves the clock forward.
    pub fn advance(&self, d: std::time::Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Ts {
        Ts(self.0.load(Ordering::SeqCst))
    }
}

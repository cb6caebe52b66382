//! The injected clock: every persisted timestamp comes from here, so tests control time.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::core::Ts;

/// A source of "now".
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Ts;
    /// Woken when the clock jumps (a manual clock moved by a test), so a loop asleep until a
    /// deadline looks again; `None` for a clock that only moves with real time.
    fn jumps(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
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
pub struct ManualClock(Arc<AtomicI64>, Arc<tokio::sync::Notify>);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Ts) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start.0)), Arc::default())
    }
    /// Moves the clock to `t`.
    pub fn set(&self, t: Ts) {
        self.0.store(t.0, Ordering::SeqCst);
        self.1.notify_one();
    }
    /// Moves the clock forward.
    pub fn advance(&self, d: std::time::Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
        self.1.notify_one();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Ts {
        Ts(self.0.load(Ordering::SeqCst))
    }
    fn jumps(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.1.clone())
    }
}

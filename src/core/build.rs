//! The build lifecycle's rules that do not depend on storage: what becomes of an attempt
//! whose machine was lost. The store carries the decision out in one transaction; the
//! simulator applies the same rule.

/// Attempts of one build request before it ends as `exception` instead of being retried.
pub const MAX_ATTEMPTS: u32 = 3;

/// What becomes of a build attempt whose machine was lost (stopped, vanished, interrupted)
/// before it reported its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLoss {
    /// Someone cancelled it: it ends `cancelled` and never runs again (cancel wins).
    Cancelled,
    /// A new attempt is queued at the front.
    Retry,
    /// It keeps killing its machines: it ends `exception`, so it cannot launch machines forever.
    GiveUp,
}

/// The rule for attempt number `attempt` (1-based) of a build, `cancelled` when a cancel was
/// asked for.
pub fn after_loss(attempt: u32, cancelled: bool) -> AfterLoss {
    if cancelled {
        AfterLoss::Cancelled
    } else if attempt >= MAX_ATTEMPTS {
        AfterLoss::GiveUp
    } else {
        AfterLoss::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wins_then_three_attempts_at_most() {
        assert_eq!(after_loss(1, true), AfterLoss::Cancelled);
        assert_eq!(after_loss(3, true), AfterLoss::Cancelled);
        assert_eq!(after_loss(1, false), AfterLoss::Retry);
        assert_eq!(after_loss(2, false), AfterLoss::Retry);
        assert_eq!(after_loss(3, false), AfterLoss::GiveUp);
    }
}

//! The build lifecycle's rules that do not depend on storage: what becomes of an attempt
//! whose machine was lost. The store carries the decision out in one transaction; the
//! simulator applies the same rule.

/// Where a build attempt is in its life. Stored and shown as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for a machine.
    Queued,
    /// On a machine.
    Running,
    /// Every step passed.
    Success,
    /// A step failed.
    Failure,
    /// Its machine was lost; a new attempt of the same request was queued.
    Retry,
    /// Someone cancelled it.
    Cancelled,
    /// It could not run or finish as a build should (a missing secret, a step that never
    /// reported, too many lost machines).
    Exception,
}

impl BuildState {
    /// Every state, in lifecycle order.
    pub const ALL: [BuildState; 7] = [
        BuildState::Queued,
        BuildState::Running,
        BuildState::Success,
        BuildState::Failure,
        BuildState::Retry,
        BuildState::Cancelled,
        BuildState::Exception,
    ];

    /// Its stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Success => "success",
            BuildState::Failure => "failure",
            BuildState::Retry => "retry",
            BuildState::Cancelled => "cancelled",
            BuildState::Exception => "exception",
        }
    }

    /// The state named `s`, if it is one.
    pub fn parse(s: &str) -> Option<BuildState> {
        BuildState::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// Still to end: queued or running.
    pub fn is_live(self) -> bool {
        matches!(self, BuildState::Queued | BuildState::Running)
    }

    /// Ended, with a result of its own (not handed on to another attempt).
    pub fn is_final(self) -> bool {
        !self.is_live() && self != BuildState::Retry
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    fn every_state_is_named_and_parsed_back() {
        for s in BuildState::ALL {
            assert_eq!(BuildState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(serde_json::Value::String(s.as_str().into())));
        }
        assert_eq!(BuildState::parse("done"), None);
        assert!(BuildState::Queued.is_live() && !BuildState::Retry.is_final() && BuildState::Cancelled.is_final());
    }

    #[test]
    fn cancel_wins_then_three_attempts_at_most() {
        assert_eq!(after_loss(1, true), AfterLoss::Cancelled);
        assert_eq!(after_loss(3, true), AfterLoss::Cancelled);
        assert_eq!(after_loss(1, false), AfterLoss::Retry);
        assert_eq!(after_loss(2, false), AfterLoss::Retry);
        assert_eq!(after_loss(3, false), AfterLoss::GiveUp);
    }
}

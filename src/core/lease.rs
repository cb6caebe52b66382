//! When the active master renews the farm's lease, and when it must stop acting because it
//! can no longer be sure it holds it. Pure: the shell feeds the times its renewals were sent
//! and confirmed, and carries out what comes back.
//!
//! A renewal extends the lease to (the database's) time of the renewal plus the TTL, which
//! is no earlier than when this master sent it. So a master that measures from the sending of
//! its last confirmed renewal, on its own monotonic clock, knows the earliest moment another
//! could take over, whatever the clocks say; it gives up a margin before that moment.

use std::time::Duration;

use super::Ts;

/// What the lease's holder does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep {
    /// Send a renewal now.
    Renew,
    /// Nothing until `at`.
    Wait { at: Ts },
    /// Stop acting for the farm now: another master may take it over soon.
    GiveUp,
}

/// The holder's view of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseClock {
    ttl: Duration,
    /// When the last renewal the database confirmed (or the acquisition) was sent.
    confirmed_sent: Ts,
    /// When the latest renewal was sent (answered or not).
    last_sent: Ts,
    /// Whether that renewal still waits for its answer.
    in_flight: bool,
}

impl LeaseClock {
    /// A lease just acquired by a request sent at `sent`.
    pub fn new(ttl: Duration, sent: Ts) -> LeaseClock {
        LeaseClock { ttl, confirmed_sent: sent, last_sent: sent, in_flight: false }
    }

    /// Time between two renewals: a fifth of the TTL, so four may fail before giving up.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 5
    }

    /// How long before the earliest takeover the holder stops: one renewal period, room for
    /// the clocks of the master and the database to run at slightly different rates.
    fn margin(&self) -> Duration {
        self.renew_every()
    }

    fn deadline(&self) -> Ts {
        self.confirmed_sent.plus(self.ttl.saturating_sub(self.margin()))
    }

    /// What to do at `now`.
    pub fn step(&self, now: Ts) -> LeaseStep {
        if now >= self.deadline() {
            return LeaseStep::GiveUp;
        }
        if self.in_flight {
            return LeaseStep::Wait { at: self.deadline() };
        }
        // A period after the latest sending, whether it was confirmed or failed.
        let next = self.last_sent.plus(self.renew_every());
        if now >= next {
            LeaseStep::Renew
        } else {
            LeaseStep::Wait { at: next }
        }
    }

    /// A renewal was sent at `now`.
    pub fn sent(&mut self, now: Ts) {
        self.last_sent = now;
        self.in_flight = true;
    }

    /// The renewal in flight came back: `Some(true)` confirmed, `Some(false)` refused (the
    /// lease is lost), `None` failed (no answer, an error): tried again a period after it was
    /// sent. `true` while the lease may still be held.
    pub fn answered(&mut self, outcome: Option<bool>) -> bool {
        self.in_flight = false;
        match outcome {
            Some(true) => {
                self.confirmed_sent = self.confirmed_sent.max(self.last_sent);
                true
            }
            Some(false) => false,
            // Tried again a period after this sending, not at once.
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(15);

    #[test]
    fn renews_every_fifth_and_gives_up_a_period_before_the_earliest_takeover() {
        let mut l = LeaseClock::new(TTL, Ts(0));
        assert_eq!(l.step(Ts(0)), LeaseStep::Wait { at: Ts(3_000) });
        assert_eq!(l.step(Ts(3_000)), LeaseStep::Renew);
        l.sent(Ts(3_000));
        assert_eq!(l.step(Ts(3_100)), LeaseStep::Wait { at: Ts(12_000) }, "one renewal at a time");
        assert!(l.answered(Some(true)));
        // Measured from the sending of the confirmed renewal, not its answer.
        assert_eq!(l.step(Ts(3_200)), LeaseStep::Wait { at: Ts(6_000) });
        assert_eq!(l.step(Ts(14_999)), LeaseStep::Renew);
        assert_eq!(l.step(Ts(15_000)), LeaseStep::GiveUp, "nothing confirmed for 12 s since it was sent");
    }

    #[test]
    fn failed_renewals_are_tried_again_until_the_deadline_and_a_refusal_is_the_end() {
        let mut l = LeaseClock::new(TTL, Ts(0));
        for t in [3_000, 6_000, 9_000] {
            assert_eq!(l.step(Ts(t)), LeaseStep::Renew, "at {t}");
            l.sent(Ts(t));
            assert!(l.answered(None), "a failure is not a loss");
            assert_eq!(l.step(Ts(t + 500)), LeaseStep::Wait { at: Ts(t + 3_000) }, "not at once");
        }
        assert_eq!(l.step(Ts(11_999)), LeaseStep::Wait { at: Ts(12_000) });
        assert_eq!(l.step(Ts(12_000)), LeaseStep::GiveUp);
        let mut l = LeaseClock::new(TTL, Ts(0));
        l.sent(Ts(3_000));
        assert!(!l.answered(Some(false)), "refused: lost");
    }

    #[test]
    fn a_late_confirmation_of_an_old_renewal_never_moves_the_deadline_back() {
        let mut l = LeaseClock::new(TTL, Ts(5_000));
        l.sent(Ts(4_000));
        assert!(l.answered(Some(true)));
        assert_ne!(l.step(Ts(16_999)), LeaseStep::GiveUp);
        assert_eq!(l.step(Ts(17_000)), LeaseStep::GiveUp);
    }
}

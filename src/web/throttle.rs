//! Limits password guessing on the login form: too many failed logins for one name, or from one
//! address, within a window make further tries wait (HTTP 429) without checking a password.
//! Pure: the caller passes the time, so the rules are tested without a clock.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How far back failures count.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures for one name within the window before its logins wait.
pub const PER_NAME: usize = 5;
/// Failures from one address within the window before its logins wait. Higher than per name:
/// behind a reverse proxy every visitor shares one address.
pub const PER_ADDRESS: usize = 50;
/// Names and addresses remembered at most; the stalest go first, so a flood of made-up names
/// cannot grow memory without bound.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Name(String),
    Address(IpAddr),
}

/// Recent failed logins per name and per address.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: HashMap<Key, VecDeque<Instant>>,
}

impl LoginThrottle {
    /// `Err(wait)` when a login for `name` from `from` must wait that long before trying.
    pub fn check(&mut self, name: &str, from: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (key, limit) in [(Key::Name(name.to_lowercase()), PER_NAME), (Key::Address(from), PER_ADDRESS)] {
            if let Some(times) = self.failures.get_mut(&key) {
                forget_old(times, now);
                if times.len() >= limit {
                    // Tries resume when enough of the failures have aged out of the window.
                    let oldest_that_counts = times[times.len() - limit];
                    wait = wait.max(WINDOW.saturating_sub(now.saturating_duration_since(oldest_that_counts)));
                }
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait.max(Duration::from_secs(1)))
        }
    }

    /// Records a failed login.
    pub fn failed(&mut self, name: &str, from: IpAddr, now: Instant) {
        if self.failures.len() >= MAX_KEYS {
            self.prune(now);
        }
        for key in [Key::Name(name.to_lowercase()), Key::Address(from)] {
            let times = self.failures.entry(key).or_default();
            forget_old(times, now);
            times.push_back(now);
            // Only the last `PER_ADDRESS` (the larger limit) can ever matter.
            while times.len() > PER_ADDRESS {
                times.pop_front();
            }
        }
    }

    /// A successful login clears its name's failures (not its address's: one good password
    /// must not reset a guesser's count for the other names).
    pub fn succeeded(&mut self, name: &str) {
        self.failures.remove(&Key::Name(name.to_lowercase()));
    }

    /// Drops what no longer counts, then, if still full, the keys whose last failure is oldest.
    fn prune(&mut self, now: Instant) {
        self.failures.retain(|_, times| {
            forget_old(times, now);
            !times.is_empty()
        });
        if self.failures.len() >= MAX_KEYS {
            let mut last: Vec<(Instant, Key)> =
                self.failures.iter().filter_map(|(k, t)| t.back().map(|at| (*at, k.clone()))).collect();
            last.sort_by_key(|(at, _)| *at);
            for (_, key) in last.into_iter().take(MAX_KEYS / 10) {
                self.failures.remove(&key);
            }
        }
    }

    /// How many names and addresses are remembered.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

fn forget_old(times: &mut VecDeque<Instant>, now: Instant) {
    while times.front().is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW) {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_name_waits_after_five_failures_until_the_first_ages_out() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..PER_NAME as u64 {
            assert_eq!(t.check("carl", ip(1), t0 + Duration::from_secs(i)), Ok(()));
            t.failed("carl", ip(1), t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(t.check("carl", ip(2), now), Err(WINDOW - Duration::from_secs(10)), "from anywhere");
        assert_eq!(t.check("CARL", ip(2), now), Err(WINDOW - Duration::from_secs(10)), "names are not case-sensitive");
        assert_eq!(t.check("dora", ip(2), now), Ok(()), "other names are not held up");
        assert_eq!(t.check("carl", ip(1), t0 + WINDOW), Ok(()), "the first failure aged out");
    }

    #[test]
    fn an_address_waits_after_many_failures_across_names() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..PER_ADDRESS {
            t.failed(&format!("user{i}"), ip(1), t0);
        }
        assert_eq!(t.check("someone", ip(1), t0), Err(WINDOW));
        assert_eq!(t.check("someone", ip(2), t0), Ok(()));
    }

    #[test]
    fn success_clears_the_name_but_not_the_address() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..PER_NAME - 1 {
            t.failed("carl", ip(1), t0);
        }
        t.succeeded("Carl");
        t.failed("carl", ip(1), t0);
        assert_eq!(t.check("carl", ip(1), t0), Ok(()), "the count started again");
        for i in 0..PER_ADDRESS {
            t.failed(&format!("u{i}"), ip(1), t0);
        }
        t.succeeded("carl");
        assert!(t.check("carl", ip(1), t0).is_err());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_names() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..3 * MAX_KEYS {
            t.failed(&format!("made-up-{i}"), IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]), t0);
        }
        assert!(t.len() <= MAX_KEYS + 2, "{}", t.len());
        // Pruning makes room without forgetting what just happened.
        for _ in 0..PER_NAME {
            t.failed("carl", ip(9), t0);
        }
        assert!(t.check("carl", ip(8), t0).is_err());
        assert!(t.len() <= MAX_KEYS + 2);
    }
}

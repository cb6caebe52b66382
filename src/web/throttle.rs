//! Limits password guessing on the login form: too many failed logins for one name, or from one
//! address, within a window make further tries wait (HTTP 429) without checking a password.
//! Pure: the caller passes the time, so the rules are tested without a clock.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How far back failures count.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures for one name from one address within the window before that pair waits.
pub const PER_NAME_AND_ADDRESS: usize = 5;
/// Failures for one name from anywhere within the window before its logins wait: bounds a
/// guesser with many addresses, at the price that so many failures hold the name up for all.
pub const PER_NAME: usize = 30;
/// Failures from one address within the window before its logins wait. Higher than per name:
/// behind a reverse proxy every visitor shares one address. IPv6 counts per /64.
pub const PER_ADDRESS: usize = 50;
/// Keys remembered at most; past it the stalest go first. New keys come only from addresses
/// under their limit, so a flood cannot push out a name's recent failures quickly.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Name(String),
    NameAt(String, IpAddr),
    Address(IpAddr),
}

/// Recent failed logins per name, per name and address, and per address.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: HashMap<Key, VecDeque<Instant>>,
}

/// IPv6 hands out /64s: one visitor is one prefix, not one address.
fn origin(from: IpAddr) -> IpAddr {
    match from {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// The keys a login counts against, with their limits. A name that no account can have
/// (see [`crate::accounts::check_name`]) counts only against its address, so made-up names
/// cannot fill memory with large keys.
fn keys(name: &str, from: IpAddr) -> Vec<(Key, usize)> {
    let from = origin(from);
    let mut out = vec![(Key::Address(from), PER_ADDRESS)];
    if crate::accounts::check_name(name).is_ok() {
        let name = name.to_ascii_lowercase();
        out.push((Key::NameAt(name.clone(), from), PER_NAME_AND_ADDRESS));
        out.push((Key::Name(name), PER_NAME));
    }
    out
}

impl LoginThrottle {
    /// Counts a login try for `name` from `from`, unless it must wait: then `Err(wait)` and
    /// nothing is counted. Checking and counting at once means tries sent side by side cannot
    /// all slip through before the first failures are known; [`LoginThrottle::succeeded`]
    /// takes a try back once its password proves right.
    pub fn attempt(&mut self, name: &str, from: IpAddr, now: Instant) -> Result<(), Duration> {
        let keys = keys(name, from);
        let mut wait = Duration::ZERO;
        for (key, limit) in &keys {
            if let Some(times) = self.failures.get_mut(key) {
                forget_old(times, now);
                if times.len() >= *limit {
                    // Tries resume when enough of the failures have aged out of the window.
                    let oldest_that_counts = times[times.len() - limit];
                    wait = wait.max(WINDOW.saturating_sub(now.saturating_duration_since(oldest_that_counts)));
                }
            }
        }
        if !wait.is_zero() {
            return Err(wait.max(Duration::from_secs(1)));
        }
        if self.failures.len() >= MAX_KEYS {
            self.prune(now);
        }
        for (key, limit) in keys {
            let times = self.failures.entry(key).or_default();
            times.push_back(now);
            // Only the last `limit` tries can ever matter.
            while times.len() > limit {
                times.pop_front();
            }
        }
        Ok(())
    }

    /// The try for `name` from `from` was right: it does not count, and the name's earlier
    /// failures from that address are forgiven (not the address's: one good password must
    /// not reset a guesser's count for the other names).
    pub fn succeeded(&mut self, name: &str, from: IpAddr) {
        for (key, _) in keys(name, from) {
            match key {
                Key::NameAt(..) => {
                    self.failures.remove(&key);
                }
                _ => {
                    if let Some(times) = self.failures.get_mut(&key) {
                        times.pop_back();
                    }
                }
            }
        }
    }

    /// Drops what no longer counts, then the keys whose last failure is oldest, down to 90% of
    /// the cap, so the next failures do not each scan everything again.
    fn prune(&mut self, now: Instant) {
        self.failures.retain(|_, times| {
            forget_old(times, now);
            !times.is_empty()
        });
        let keep = MAX_KEYS * 9 / 10;
        if self.failures.len() > keep {
            let mut last: Vec<(Instant, Key)> =
                self.failures.iter().filter_map(|(k, t)| t.back().map(|at| (*at, k.clone()))).collect();
            last.sort_by_key(|(at, _)| *at);
            let excess = self.failures.len() - keep;
            for (_, key) in last.into_iter().take(excess) {
                self.failures.remove(&key);
            }
        }
    }

    /// How many keys are remembered.
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
    fn a_name_waits_after_five_failures_from_one_address_until_the_first_ages_out() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..PER_NAME_AND_ADDRESS as u64 {
            assert_eq!(t.attempt("carl", ip(1), t0 + Duration::from_secs(i)), Ok(()));
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(t.attempt("carl", ip(1), now), Err(WINDOW - Duration::from_secs(10)));
        assert_eq!(
            t.attempt("CARL", ip(1), now),
            Err(WINDOW - Duration::from_secs(10)),
            "names are not case-sensitive"
        );
        assert_eq!(t.attempt("carl", ip(2), now), Ok(()), "the name still works from elsewhere");
        assert_eq!(t.attempt("dora", ip(1), now), Ok(()), "other names are not held up");
        assert_eq!(t.attempt("carl", ip(1), t0 + WINDOW), Ok(()), "the first failure aged out");
    }

    #[test]
    fn a_name_waits_everywhere_after_many_failures_from_many_addresses() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..PER_NAME {
            let _ = t.attempt("carl", ip(i as u8), t0);
        }
        assert_eq!(t.attempt("carl", ip(200), t0), Err(WINDOW));
    }

    #[test]
    fn an_address_waits_after_many_failures_across_names_and_ipv6_counts_per_prefix() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..PER_ADDRESS {
            let _ = t.attempt(&format!("user{i}"), ip(1), t0);
        }
        assert_eq!(t.attempt("someone", ip(1), t0), Err(WINDOW));
        assert_eq!(t.attempt("someone", ip(2), t0), Ok(()));
        let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        for i in 0..PER_ADDRESS as u16 {
            let _ = t.attempt(&format!("user{i}"), v6(i), t0);
        }
        assert_eq!(t.attempt("someone", v6(999), t0), Err(WINDOW), "same /64");
        assert_eq!(t.attempt("someone", IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]), t0), Ok(()));
    }

    #[test]
    fn names_no_account_can_have_count_only_against_the_address() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        let long = "x".repeat(100_000);
        for _ in 0..PER_NAME_AND_ADDRESS {
            let _ = t.attempt(&long, ip(1), t0);
        }
        assert_eq!(t.len(), 1, "only the address is remembered");
        assert_eq!(t.attempt(&long, ip(1), t0), Ok(()));
    }

    #[test]
    fn success_clears_the_name_at_its_address_but_not_the_address() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..PER_NAME_AND_ADDRESS - 1 {
            assert!(t.attempt("carl", ip(1), t0).is_ok());
        }
        // The fifth try is right: it does not count, and the four before are forgiven.
        assert!(t.attempt("carl", ip(1), t0).is_ok());
        t.succeeded("Carl", ip(1));
        for _ in 0..PER_NAME_AND_ADDRESS {
            assert_eq!(t.attempt("carl", ip(1), t0), Ok(()), "the count started again");
        }
        assert!(t.attempt("carl", ip(1), t0).is_err());
        // The address's failures stay.
        let mut t = LoginThrottle::default();
        for i in 0..PER_ADDRESS - 1 {
            assert!(t.attempt(&format!("u{i}"), ip(2), t0).is_ok());
        }
        assert!(t.attempt("carl", ip(2), t0).is_ok());
        t.succeeded("carl", ip(2));
        assert!(t.attempt("u-last", ip(2), t0).is_ok());
        assert!(t.attempt("carl", ip(2), t0).is_err());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_names() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..3 * MAX_KEYS {
            let _ =
                t.attempt(&format!("made-up-{i}"), IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]), t0);
        }
        assert!(t.len() <= MAX_KEYS + 3, "{}", t.len());
        // Pruning makes room without forgetting what just happened.
        for _ in 0..PER_NAME_AND_ADDRESS {
            let _ = t.attempt("carl", ip(9), t0);
        }
        assert!(t.attempt("carl", ip(9), t0).is_err());
        assert!(t.len() <= MAX_KEYS + 3);
    }
}

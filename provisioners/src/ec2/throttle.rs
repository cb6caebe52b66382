//! Client-side token buckets matching EC2's published request-rate buckets, so a burst of
//! launches waits here instead of tripping `RequestLimitExceeded` for the whole account.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `capacity` calls at once, refilled at `refill_per_sec`.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_sec: f64,
    state: Mutex<(f64, Instant)>,
    /// Tokens handed out: one per call attempt.
    taken: std::sync::atomic::AtomicU64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, refill_per_sec: f64) -> TokenBucket {
        let capacity = f64::from(capacity.max(1));
        TokenBucket {
            capacity,
            refill_per_sec: refill_per_sec.max(0.001),
            state: Mutex::new((capacity, Instant::now())),
            taken: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes a token if one is there; otherwise says how long until one is.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(Instant::now())
    }

    /// [`TokenBucket::try_take`] at time `now` (never earlier than the last call's).
    pub fn try_take_at(&self, now: Instant) -> Result<(), Duration> {
        let Ok(mut s) = self.state.lock() else {
            // A poisoned lock means a panic elsewhere; throttling must not add a second one.
            return Ok(());
        };
        let (tokens, last) = *s;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.refill_per_sec).min(self.capacity);
        // A hair of slack: float sums of refills must not deny a token that is due.
        if tokens >= 1.0 - 1e-9 {
            *s = (tokens - 1.0, now);
            Ok(())
        } else {
            *s = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.refill_per_sec))
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
        self.taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many calls went through this bucket so far.
    pub fn taken(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The buckets of one region and account, shared by every pool that uses it.
#[derive(Debug)]
pub struct Buckets {
    /// RunInstances: burst 5, refill 2/s.
    pub run: TokenBucket,
    /// TerminateInstances: burst 100, refill 5/s.
    pub terminate: TokenBucket,
    /// Describe* calls: burst 100, refill 20/s.
    pub describe: TokenBucket,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            run: TokenBucket::new(5, 2.0),
            terminate: TokenBucket::new(100, 5.0),
            describe: TokenBucket::new(100, 20.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn burst_then_refill_rate() {
        let b = TokenBucket::new(5, 2.0);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(b.try_take_at(t0).is_ok(), "the burst is immediate");
        }
        // Empty: the next token comes after 1 / (2 per second) = 500 ms.
        let wait = b.try_take_at(t0).expect_err("empty");
        assert!(wait > 499 * MS && wait <= 500 * MS, "{wait:?}");
        assert!(b.try_take_at(t0 + 499 * MS).is_err());
        assert!(b.try_take_at(t0 + 500 * MS).is_ok());
        // Four more take two seconds in all.
        assert!(b.try_take_at(t0 + 1000 * MS).is_ok());
        assert!(b.try_take_at(t0 + 1500 * MS).is_ok());
        assert!(b.try_take_at(t0 + 1999 * MS).is_err());
        assert!(b.try_take_at(t0 + 2000 * MS).is_ok());
    }

    #[test]
    fn refill_never_exceeds_capacity() {
        let b = TokenBucket::new(2, 10.0);
        let later = Instant::now() + Duration::from_secs(60);
        assert!(b.try_take_at(later).is_ok());
        assert!(b.try_take_at(later).is_ok());
        assert!(b.try_take_at(later).is_err());
    }
}

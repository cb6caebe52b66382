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
        let Ok(mut s) = self.state.lock() else {
            // A poisoned lock means a panic elsewhere; throttling must not add a second one.
            return Ok(());
        };
        let now = Instant::now();
        let (tokens, last) = *s;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.refill_per_sec).min(self.capacity);
        if tokens >= 1.0 {
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

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_rate() {
        let b = TokenBucket::new(5, 2.0);
        let start = Instant::now();
        for _ in 0..5 {
            b.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is immediate");
        for _ in 0..4 {
            b.acquire().await;
        }
        // Four more at 2/s take two seconds (paused clock: exact).
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(1999) && e <= Duration::from_millis(2100), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn refill_never_exceeds_capacity() {
        let b = TokenBucket::new(2, 10.0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_err());
    }
}

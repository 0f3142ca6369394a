//! A token bucket for anything a guest can make us do repeatedly that costs dom0 resources
//! (log lines: XSA-180 filled dom0's disk with guest-triggered log output).

use std::time::Instant;

/// A token bucket of `burst` tokens refilled at `rate` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    denied: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        TokenBucket {
            rate: rate_per_sec,
            burst,
            tokens: burst,
            last: Instant::now(),
            denied: 0,
        }
    }

    /// Takes `n` tokens if available.
    pub fn take(&mut self, n: f64) -> bool {
        self.take_at(n, Instant::now())
    }

    /// [`TokenBucket::take`] at an explicit time (for tests).
    pub fn take_at(&mut self, n: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            self.denied += 1;
            false
        }
    }

    /// Takes and resets the count of refusals since the last call.
    pub fn take_denied(&mut self) -> u64 {
        std::mem::take(&mut self.denied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_bucket_refuses_past_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0);
        b.last = t0;
        assert!((0..5).all(|_| b.take_at(1.0, t0)));
        assert!(!b.take_at(1.0, t0));
        assert_eq!(b.take_denied(), 1);
        assert!(b.take_at(1.0, t0 + Duration::from_millis(100)));
        assert!(!b.take_at(1.0, t0 + Duration::from_millis(100)));
    }
}

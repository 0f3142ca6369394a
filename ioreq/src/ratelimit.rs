//! Rate-limited logging of what a guest can trigger (XSA-180): at most a burst of lines per
//! interval; the rest are counted, and the count is reported with the next line let through
//! and kept in [`RateLimit::suppressed`].

use std::time::{Duration, Instant};

/// Lines allowed per interval.
pub const DEFAULT_BURST: u32 = 10;
/// The interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// A token window for one kind of log line.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    window_start: Option<Instant>,
    used: u32,
    /// Suppressed since the last line let through.
    pending_suppressed: u64,
    /// Suppressed in total.
    total_suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(DEFAULT_BURST, DEFAULT_INTERVAL)
    }
}

impl RateLimit {
    /// `burst` lines per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        RateLimit {
            burst,
            interval,
            window_start: None,
            used: 0,
            pending_suppressed: 0,
            total_suppressed: 0,
        }
    }

    /// Whether a line may be logged now. If so, returns how many were suppressed since the
    /// last one (to be included in the line).
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.window_start {
            Some(s) if now.duration_since(s) < self.interval => {}
            _ => {
                self.window_start = Some(now);
                self.used = 0;
            }
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.pending_suppressed))
        } else {
            self.pending_suppressed += 1;
            self.total_suppressed += 1;
            None
        }
    }

    /// Lines suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.total_suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ratelimit_burst_then_suppress_and_count() {
        let mut r = RateLimit::new(3, Duration::from_secs(3600));
        let allowed = (0..1000).filter(|_| r.check().is_some()).count();
        assert_eq!(allowed, 3);
        assert_eq!(r.suppressed(), 997);
    }

    #[test]
    fn test_ratelimit_new_window_reports_suppressed() {
        let mut r = RateLimit::new(1, Duration::ZERO);
        assert_eq!(r.check(), Some(0));
        // A zero interval opens a new window at every call.
        assert_eq!(r.check(), Some(0));
    }
}

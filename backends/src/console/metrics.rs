//! Per-device counters: atomics, incremented without locks, read by the control surface.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one console device.
#[derive(Debug, Default)]
pub struct ConsoleMetrics {
    /// Bytes the guest wrote (output ring).
    pub bytes_out: AtomicU64,
    /// Bytes we delivered to the guest (input ring).
    pub bytes_in: AtomicU64,
    /// Lines logged.
    pub lines: AtomicU64,
    /// Lines not logged because of the rate limit.
    pub lines_suppressed: AtomicU64,
    /// Event-channel wakeups.
    pub events: AtomicU64,
    /// Notifications we sent.
    pub notifies: AtomicU64,
    /// Protocol errors by the guest.
    pub errors: AtomicU64,
}

/// A plain copy of [`ConsoleMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsoleStats {
    /// See [`ConsoleMetrics::bytes_out`].
    pub bytes_out: u64,
    /// See [`ConsoleMetrics::bytes_in`].
    pub bytes_in: u64,
    /// See [`ConsoleMetrics::lines`].
    pub lines: u64,
    /// See [`ConsoleMetrics::lines_suppressed`].
    pub lines_suppressed: u64,
    /// See [`ConsoleMetrics::events`].
    pub events: u64,
    /// See [`ConsoleMetrics::notifies`].
    pub notifies: u64,
    /// See [`ConsoleMetrics::errors`].
    pub errors: u64,
}

impl ConsoleMetrics {
    /// A snapshot.
    pub fn snapshot(&self) -> ConsoleStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsoleStats {
            bytes_out: l(&self.bytes_out),
            bytes_in: l(&self.bytes_in),
            lines: l(&self.lines),
            lines_suppressed: l(&self.lines_suppressed),
            events: l(&self.events),
            notifies: l(&self.notifies),
            errors: l(&self.errors),
        }
    }
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

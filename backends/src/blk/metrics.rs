//! Per-device counters: atomics, incremented without locks by the ring threads, read by the
//! control surface with [`BlkMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one block device (all its queues).
#[derive(Debug, Default)]
pub struct BlkMetrics {
    /// Read requests completed.
    pub reads: AtomicU64,
    /// Write requests completed (including flushes with data).
    pub writes: AtomicU64,
    /// Flush requests without data.
    pub flushes: AtomicU64,
    /// Barrier requests.
    pub barriers: AtomicU64,
    /// Discard requests.
    pub discards: AtomicU64,
    /// Indirect requests (also counted as reads or writes).
    pub indirect: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub bytes_written: AtomicU64,
    /// Requests refused by validation (malformed or unsupported).
    pub bad_requests: AtomicU64,
    /// Requests answered with an error (validation, grants or I/O).
    pub errors: AtomicU64,
    /// Requests whose grants could not be mapped or copied.
    pub grant_errors: AtomicU64,
    /// Grant map calls (each maps one batch).
    pub grant_maps: AtomicU64,
    /// Pages mapped by those calls.
    pub grant_pages_mapped: AtomicU64,
    /// Grant copy calls.
    pub grant_copies: AtomicU64,
    /// Persistent-grant cache hits (pages).
    pub persistent_hits: AtomicU64,
    /// Persistent-grant cache misses (pages).
    pub persistent_misses: AtomicU64,
    /// Persistent grants evicted (LRU).
    pub persistent_evictions: AtomicU64,
    /// Requests in flight now (all queues).
    pub in_flight: AtomicU64,
    /// Event-channel wakeups.
    pub events: AtomicU64,
    /// Events that found no work (a notify flood shows here, XSA-332).
    pub spurious_events: AtomicU64,
    /// Notifications sent to the frontend.
    pub notifications: AtomicU64,
    /// Busy-poll windows (`BlkConfig::poll_us`) in which work came.
    pub poll_hits: AtomicU64,
    /// Busy-poll windows that ran out (the ring thread then slept).
    pub poll_misses: AtomicU64,
    /// Rings halted because the frontend broke the protocol (impossible indices).
    pub rogue_rings: AtomicU64,
    /// Online resizes.
    pub resizes: AtomicU64,
}

/// A plain copy of [`BlkMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlkStats {
    /// See [`BlkMetrics::reads`].
    pub reads: u64,
    /// See [`BlkMetrics::writes`].
    pub writes: u64,
    /// See [`BlkMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlkMetrics::barriers`].
    pub barriers: u64,
    /// See [`BlkMetrics::discards`].
    pub discards: u64,
    /// See [`BlkMetrics::indirect`].
    pub indirect: u64,
    /// See [`BlkMetrics::bytes_read`].
    pub bytes_read: u64,
    /// See [`BlkMetrics::bytes_written`].
    pub bytes_written: u64,
    /// See [`BlkMetrics::bad_requests`].
    pub bad_requests: u64,
    /// See [`BlkMetrics::errors`].
    pub errors: u64,
    /// See [`BlkMetrics::grant_errors`].
    pub grant_errors: u64,
    /// See [`BlkMetrics::grant_maps`].
    pub grant_maps: u64,
    /// See [`BlkMetrics::grant_pages_mapped`].
    pub grant_pages_mapped: u64,
    /// See [`BlkMetrics::grant_copies`].
    pub grant_copies: u64,
    /// See [`BlkMetrics::persistent_hits`].
    pub persistent_hits: u64,
    /// See [`BlkMetrics::persistent_misses`].
    pub persistent_misses: u64,
    /// See [`BlkMetrics::persistent_evictions`].
    pub persistent_evictions: u64,
    /// See [`BlkMetrics::in_flight`].
    pub in_flight: u64,
    /// See [`BlkMetrics::events`].
    pub events: u64,
    /// See [`BlkMetrics::spurious_events`].
    pub spurious_events: u64,
    /// See [`BlkMetrics::notifications`].
    pub notifications: u64,
    /// See [`BlkMetrics::poll_hits`].
    pub poll_hits: u64,
    /// See [`BlkMetrics::poll_misses`].
    pub poll_misses: u64,
    /// See [`BlkMetrics::rogue_rings`].
    pub rogue_rings: u64,
    /// See [`BlkMetrics::resizes`].
    pub resizes: u64,
}

impl BlkMetrics {
    /// A snapshot.
    pub fn snapshot(&self) -> BlkStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStats {
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            barriers: l(&self.barriers),
            discards: l(&self.discards),
            indirect: l(&self.indirect),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            bad_requests: l(&self.bad_requests),
            errors: l(&self.errors),
            grant_errors: l(&self.grant_errors),
            grant_maps: l(&self.grant_maps),
            grant_pages_mapped: l(&self.grant_pages_mapped),
            grant_copies: l(&self.grant_copies),
            persistent_hits: l(&self.persistent_hits),
            persistent_misses: l(&self.persistent_misses),
            persistent_evictions: l(&self.persistent_evictions),
            in_flight: l(&self.in_flight),
            events: l(&self.events),
            spurious_events: l(&self.spurious_events),
            notifications: l(&self.notifications),
            poll_hits: l(&self.poll_hits),
            poll_misses: l(&self.poll_misses),
            rogue_rings: l(&self.rogue_rings),
            resizes: l(&self.resizes),
        }
    }
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn sub(a: &AtomicU64, n: u64) {
    a.fetch_sub(n, Ordering::Relaxed);
}

//! Per-vif counters: atomics, incremented without locks by the vif thread, read by the control
//! surface with [`NetMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:expr])* $name:ident,)*) => {
        /// Counters of one vif (all its queues).
        #[derive(Debug, Default)]
        pub struct NetMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A plain copy of [`NetMetrics`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct NetStats {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl NetMetrics {
            /// A snapshot.
            pub fn snapshot(&self) -> NetStats {
                NetStats {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Frames the guest sent that reached the engine.
    tx_packets,
    /// Their bytes.
    tx_bytes,
    /// Of those, GSO super-frames.
    tx_gso_packets,
    /// TX requests consumed (slots, extras included).
    tx_slots,
    /// Packets dropped by validation (answered NETIF_RSP_ERROR).
    tx_malformed,
    /// Packets whose data could not be grant-copied (bad or revoked grant).
    tx_grant_errors,
    /// Frames dropped because their source MAC was not the vif's (anti-spoofing).
    tx_spoofed,
    /// Frames dropped because their checksum or GSO metadata could not be set up.
    tx_offload_errors,
    /// Frames the engine refused (its queue full or gone).
    tx_engine_errors,
    /// Times the TX path stopped for the credit-based rate limit.
    tx_throttled,
    /// Rate changes applied (the `rate` key changed while connected).
    rate_updates,
    /// 1 while the frontend asks for multicast filtering (`request-multicast-control`).
    mcast_filtering,
    /// Addresses in the multicast filter now.
    mcast_addresses,
    /// Multicast filter add/delete requests.
    mcast_ops,
    /// Frames delivered to the guest.
    rx_packets,
    /// Their bytes.
    rx_bytes,
    /// Of those, GSO super-frames.
    rx_gso_packets,
    /// Frames dropped because the RX backlog was full (the guest posts too few buffers:
    /// XSA-392).
    rx_backlog_drops,
    /// Frames from the engine dropped because they were cut short (longer than the largest
    /// frame) or malformed.
    rx_truncated_drops,
    /// Multicast frames dropped by the frontend's filter.
    rx_mcast_drops,
    /// Frames the guest cannot take (too large without SG, GSO it did not ask for).
    rx_unsupported_drops,
    /// RX slots whose grant copy failed (answered NETIF_RSP_ERROR).
    rx_grant_errors,
    /// Frames waiting in the RX backlogs now.
    rx_backlog,
    /// Grant-copy calls (each one batch).
    grant_copies,
    /// Control-ring requests served.
    ctrl_requests,
    /// Event-channel wakeups.
    events,
    /// Event wakeups that found no work (a notify flood shows here, XSA-332).
    spurious_events,
    /// Notifications sent to the frontend.
    notifications,
    /// Engine queues that failed for good (e.g. the tap deleted under the vif) and are no
    /// longer served.
    engine_failures,
    /// Times the vif was disabled because the frontend broke the protocol.
    fatal_errors,
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn set(a: &AtomicU64, n: u64) {
    a.store(n, Ordering::Relaxed);
}

//! domio's PV backends: protocol engines that serve a guest's devices through the `xen`
//! traits, so they run unchanged on real Xen and on xensim.
//!
//! * [`console`]: the PV console backend (io/console.h), QEMU's `console` backend for PV
//!   guests' secondary consoles.
//!
//! blkback and netback (with their storage and network engines) come next, with the same
//! layout per device: `mod.rs` (driver, negotiation), ring handling, `metrics.rs`.
#![deny(unsafe_code)]

pub mod blk;
pub mod console;
pub mod net;
pub mod ratelimit;

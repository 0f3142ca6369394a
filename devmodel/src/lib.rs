//! HVM devices on a PCI bus: the i440FX host bridge and PIIX3 ISA bridge, the Xen platform
//! device, a 16550A UART and virtio-pci (modern) block devices, assembled into a
//! [`machine::Machine`] that serves an ioreq server through [`ioreq::IoHandler`].
//!
//! Unchecked code lives only in [`mem`] (building vm-memory regions over guest RAM
//! mappings); everything else denies it.
#![deny(unsafe_code)]

pub mod config;
pub mod irq;
pub mod machine;
#[allow(unsafe_code)]
pub mod mem;
pub mod pci;
pub mod platform;
#[allow(unsafe_code)]
mod sys;
pub mod uart;
pub mod virtio;

use std::sync::Mutex;

use backends::ratelimit::TokenBucket;

pub use machine::{Machine, MachineError};

/// A rate-limited warning log for anything a guest can trigger (XSA-180): 20 lines per
/// second with a burst of 50; suppressed lines are counted and reported with the next one.
#[derive(Debug)]
pub struct RateLog {
    bucket: Mutex<TokenBucket>,
}

impl RateLog {
    /// A fresh limiter.
    pub fn new() -> RateLog {
        RateLog {
            bucket: Mutex::new(TokenBucket::new(20.0, 50.0)),
        }
    }

    /// Logs at warn level unless over the rate.
    pub fn warn(&self, args: std::fmt::Arguments<'_>) {
        let Ok(mut b) = self.bucket.lock() else {
            return;
        };
        if b.take(1.0) {
            let suppressed = b.take_denied();
            if suppressed > 0 {
                tracing::warn!("{args} ({suppressed} similar lines suppressed)");
            } else {
                tracing::warn!("{args}");
            }
        }
    }
}

impl Default for RateLog {
    fn default() -> Self {
        Self::new()
    }
}

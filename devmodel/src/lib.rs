//! HVM devices on a PCI bus: the i440FX host bridge and PIIX3 ISA bridge, the Xen platform
//! device, a 16550A UART and virtio-pci (modern) block and network devices, assembled into
//! a [`machine::Machine`] that serves an ioreq server through [`ioreq::IoHandler`]. See
//! docs/DEVMODEL.md.
//!
//! Unchecked code lives only in [`mem`] (building vm-memory regions over guest RAM
//! mappings) and the private `sys` module (opening a pty); everything else denies it.
#![deny(unsafe_code)]

pub mod chipset;
pub mod config;
pub mod fwcfg;
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

    /// Takes a token: `Some(lines suppressed since the last one)` if the line may go out.
    fn admit(&self) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.take(1.0).then(|| b.take_denied())
    }

    /// Logs at warn level unless over the rate.
    pub fn warn(&self, args: std::fmt::Arguments<'_>) {
        match self.admit() {
            Some(0) => tracing::warn!("{args}"),
            Some(n) => tracing::warn!("{args} ({n} similar lines suppressed)"),
            None => {}
        }
    }

    /// Logs at info level unless over the rate (shares the bucket with the other levels).
    pub fn info(&self, args: std::fmt::Arguments<'_>) {
        match self.admit() {
            Some(0) => tracing::info!("{args}"),
            Some(n) => tracing::info!("{args} ({n} similar lines suppressed)"),
            None => {}
        }
    }

    /// Logs at debug level unless over the rate.
    pub fn debug(&self, args: std::fmt::Arguments<'_>) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        match self.admit() {
            Some(0) => tracing::debug!("{args}"),
            Some(n) => tracing::debug!("{args} ({n} similar lines suppressed)"),
            None => {}
        }
    }
}

impl Default for RateLog {
    fn default() -> Self {
        Self::new()
    }
}

//! A small "guest OS" for HVM tests: the drivers a guest kernel runs against domio's device
//! model, written against [`HvmBus`] only (port I/O, MMIO, guest RAM, interrupts), so the same
//! code runs over xensim's vCPUs issuing real ioreqs or over a bus that calls a device model
//! directly.
//!
//! * [`pci`]: configuration cycles through 0xcf8/0xcfc, enumeration, BAR sizing and
//!   assignment, the capability walk.
//! * [`platform`]: the Xen platform device's unplug handshake and log port.
//! * [`uart`]: a 16550A driver (polled output, interrupt-driven input).
//! * [`virtio`]: the virtio-pci modern transport (status handshake, feature negotiation,
//!   split virtqueues in guest RAM, MSI-X) and the [`blk`] and [`net`] drivers on top.

pub mod blk;
pub mod net;
pub mod pci;
pub mod platform;
pub mod uart;
pub mod virtio;

use std::sync::Mutex;

use crate::hvm::HvmBus;

/// Errors of the guest OS.
#[derive(Debug, thiserror::Error)]
pub enum GuestOsError {
    /// The bus failed (an ioreq could not be issued).
    #[error("bus: {0}")]
    Bus(Box<dyn std::error::Error + Send + Sync>),
    /// A device did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// A device behaved unlike its specification.
    #[error("{0}")]
    Device(String),
    /// Guest RAM is exhausted.
    #[error("out of guest RAM allocating {0} bytes")]
    NoMemory(u64),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, GuestOsError>;

pub(crate) fn bus_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> GuestOsError {
    GuestOsError::Bus(Box::new(e))
}

/// A bump allocator over a window of guest RAM (page-aligned allocations).
#[derive(Debug)]
pub struct RamAlloc {
    next: Mutex<u64>,
    end: u64,
}

impl RamAlloc {
    /// Allocates from `[start, end)`.
    pub fn new(start: u64, end: u64) -> RamAlloc {
        RamAlloc {
            next: Mutex::new(start),
            end,
        }
    }

    /// `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64> {
        let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*n + align - 1) & !(align - 1);
        let end = start.checked_add(len).ok_or(GuestOsError::NoMemory(len))?;
        if end > self.end {
            return Err(GuestOsError::NoMemory(len));
        }
        *n = end;
        Ok(start)
    }
}

/// Reads a little-endian u16 from guest RAM.
pub(crate) fn ram_u16<B: HvmBus>(bus: &B, gpa: u64) -> Result<u16> {
    let mut b = [0u8; 2];
    bus.ram_read(gpa, &mut b).map_err(bus_err)?;
    Ok(u16::from_le_bytes(b))
}

/// Reads a little-endian u32 from guest RAM.
pub(crate) fn ram_u32<B: HvmBus>(bus: &B, gpa: u64) -> Result<u32> {
    let mut b = [0u8; 4];
    bus.ram_read(gpa, &mut b).map_err(bus_err)?;
    Ok(u32::from_le_bytes(b))
}

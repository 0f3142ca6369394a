//! The HVM side of xensim: what a guest's vCPUs do when they touch port I/O, MMIO or PCI
//! config space that an ioreq server claims, and the interrupts a device model raises.
//!
//! [`HvmBus`] is the contract that the guest OS test library (`crate::guestos`) is written
//! against. xensim's vCPUs implement it by issuing ioreqs exactly as Xen does; a test may
//! implement it by calling a device model directly.

use std::time::Duration;

/// An interrupt raised by the device model (through DMOPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irq {
    /// XEN_DMOP_set_isa_irq_level.
    Isa {
        /// ISA IRQ (0..16).
        irq: u8,
        /// Asserted.
        level: bool,
    },
    /// XEN_DMOP_set_pci_intx_level.
    PciIntx {
        /// Bus.
        bus: u8,
        /// Device.
        dev: u8,
        /// 0..=3 for INTA..INTD.
        intx: u8,
        /// Asserted.
        level: bool,
    },
    /// XEN_DMOP_inject_msi.
    Msi {
        /// Message address.
        addr: u64,
        /// Message data.
        data: u32,
    },
}

/// What a guest OS can do on its virtual hardware.
pub trait HvmBus: Send + Sync {
    /// The error of the implementation.
    type Error: std::error::Error + Send + Sync + 'static;
    /// `in` of 1, 2 or 4 bytes.
    fn pio_read(&self, port: u16, size: u8) -> Result<u32, Self::Error>;
    /// `out` of 1, 2 or 4 bytes.
    fn pio_write(&self, port: u16, size: u8, value: u32) -> Result<(), Self::Error>;
    /// A load of 1, 2, 4 or 8 bytes from guest-physical `gpa`.
    fn mmio_read(&self, gpa: u64, size: u8) -> Result<u64, Self::Error>;
    /// A store of 1, 2, 4 or 8 bytes to guest-physical `gpa`.
    fn mmio_write(&self, gpa: u64, size: u8, value: u64) -> Result<(), Self::Error>;
    /// Guest RAM size in bytes (RAM starts at guest-physical 0).
    fn ram_size(&self) -> u64;
    /// Reads guest RAM.
    fn ram_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes guest RAM.
    fn ram_write(&self, gpa: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// Interrupts raised since the last call, oldest first.
    fn take_irqs(&self) -> Vec<Irq>;
    /// Blocks until an interrupt is raised or `timeout` passes; true if one is pending.
    fn wait_irq(&self, timeout: Duration) -> bool;
}

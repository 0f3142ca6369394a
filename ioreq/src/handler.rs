//! The interface between the ioreq server and the devices behind it.

use xen::IoRange;

/// A PCI function address (segment, bus, device, function), as in XEN_DMOP_PCI_SBDF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sbdf {
    /// Segment.
    pub seg: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub dev: u8,
    /// Function (0..8).
    pub func: u8,
}

impl Sbdf {
    /// Decodes the 32-bit SBDF that Xen puts in the high half of a PCI_CONFIG ioreq's
    /// address (`seg << 16 | bus << 8 | dev << 3 | func`).
    pub fn from_u32(v: u32) -> Sbdf {
        Sbdf {
            seg: (v >> 16) as u16,
            bus: (v >> 8) as u8,
            dev: ((v >> 3) & 0x1f) as u8,
            func: (v & 7) as u8,
        }
    }

    /// The 32-bit encoding.
    pub fn to_u32(self) -> u32 {
        (u32::from(self.seg) << 16)
            | (u32::from(self.bus) << 8)
            | (u32::from(self.dev & 0x1f) << 3)
            | u32::from(self.func & 7)
    }
}

/// The address space of one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoSpace {
    /// Port I/O (IOREQ_TYPE_PIO).
    Port,
    /// Memory-mapped I/O (IOREQ_TYPE_COPY).
    Mmio,
    /// PCI configuration space of one function (IOREQ_TYPE_PCI_CONFIG); the access address
    /// is the register offset (0..4096).
    PciConfig(Sbdf),
}

/// One single access, already validated by the server: `size` is 1, 2, 4 or 8 (8 only for
/// MMIO), a port access ends at or below 0x10000, a config access ends at or below 4096.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    /// Address space.
    pub space: IoSpace,
    /// Port, guest-physical address, or config register offset.
    pub addr: u64,
    /// Bytes (1, 2, 4 or 8).
    pub size: u8,
}

/// The devices behind an ioreq server. Called on the ioreq thread only, one access at a
/// time; long work (disk or network I/O) belongs on other threads.
pub trait IoHandler: Send {
    /// A read. `None` means no device claims the address: the server answers all ones, as
    /// an unclaimed bus cycle does on real hardware.
    fn read(&mut self, access: IoAccess) -> Option<u64>;
    /// A write. `false` means no device claims it (the server ignores it and logs at a
    /// rate limit).
    fn write(&mut self, access: IoAccess, value: u64) -> bool;
    /// IOREQ_TYPE_INVALIDATE: drop every cached mapping of guest memory.
    fn invalidate(&mut self) {}
    /// IOREQ_TYPE_TIMEOFFSET: the guest moved its RTC by `offset` seconds.
    fn time_offset(&mut self, _offset: i64) {}
}

/// Errors registering ranges.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// The range itself is invalid (end before start, empty, all-ones BAR, past the space).
    #[error("invalid range {range:?}: {why}")]
    Invalid {
        /// The range.
        range: IoRange,
        /// What is wrong.
        why: &'static str,
    },
    /// Xen (or xensim) refused it.
    #[error("mapping range {range:?} failed: {source}")]
    Dm {
        /// The range.
        range: IoRange,
        /// The error.
        #[source]
        source: xen::DmError,
    },
}

/// Where a machine registers the ranges it serves (BARs move at run time, so this is a
/// handle the devices keep).
pub trait RangeRegistry: Send + Sync {
    /// Routes `range` to this server.
    fn map(&self, range: IoRange) -> Result<(), RangeError>;
    /// Stops routing `range` to this server.
    fn unmap(&self, range: IoRange) -> Result<(), RangeError>;
}

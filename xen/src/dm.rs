//! Device-model operations (hvm/dm_op.h through IOCTL_PRIVCMD_DM_OP).

use crate::{DomId, Gfn, Port};

/// An ioreq server id (`ioservid_t`).
pub type IoServId = u16;

/// Errors from device-model operations.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// The DMOP failed.
    #[error("dm_op {op} for dom{domid} failed: {source}")]
    Op {
        /// The operation.
        op: &'static str,
        /// Target domain.
        domid: DomId,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The handle is restricted to another domain.
    #[error("dm_op handle is restricted to dom{restricted}; refused dom{requested}")]
    Restricted {
        /// The domain the handle is restricted to.
        restricted: DomId,
        /// The domain asked for.
        requested: DomId,
    },
    /// Arguments rejected before reaching Xen (for example `end < start`).
    #[error("invalid dm_op {op} for dom{domid}: {why}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// Target domain.
        domid: DomId,
        /// What is wrong.
        why: &'static str,
    },
}

/// A range of guest accesses routed to an ioreq server (XEN_DMOP_IO_RANGE_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoRange {
    /// Port I/O, inclusive.
    Port {
        /// First port.
        start: u64,
        /// Last port.
        end: u64,
    },
    /// MMIO, inclusive.
    Mmio {
        /// First address.
        start: u64,
        /// Last address.
        end: u64,
    },
    /// PCI config space of one function.
    Pci {
        /// Segment.
        seg: u16,
        /// Bus.
        bus: u8,
        /// Device.
        dev: u8,
        /// Function.
        func: u8,
    },
}

/// What XEN_DMOP_get_ioreq_server_info returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoreqServerInfo {
    /// Port of the buffered ioreq ring's event channel (in the guest).
    pub bufioreq_port: Port,
    /// Frame of the synchronous ioreq page (legacy; 0 when resources are used).
    pub ioreq_gfn: Gfn,
    /// Frame of the buffered ioreq page (legacy; 0 when resources are used).
    pub bufioreq_gfn: Gfn,
}

/// Whether an ioreq server has a buffered ring (HVM_IOREQSRV_BUFIOREQ_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufIoreq {
    /// No buffered ring.
    Off,
    /// Buffered ring, legacy (pointer pair in one word).
    Legacy,
    /// Buffered ring with atomic read/write pointer updates.
    Atomic,
}

/// One handle for device-model operations on HVM guests.
pub trait DeviceModel: Send + Sync {
    /// XEN_DMOP_create_ioreq_server.
    fn create_ioreq_server(&self, domid: DomId, bufioreq: BufIoreq) -> Result<IoServId, DmError>;
    /// XEN_DMOP_get_ioreq_server_info (with `XEN_DMOP_no_gfns` unless `want_gfns`).
    fn get_ioreq_server_info(
        &self,
        domid: DomId,
        id: IoServId,
        want_gfns: bool,
    ) -> Result<IoreqServerInfo, DmError>;
    /// XEN_DMOP_map_io_range_to_ioreq_server.
    fn map_io_range(&self, domid: DomId, id: IoServId, range: IoRange) -> Result<(), DmError>;
    /// XEN_DMOP_unmap_io_range_from_ioreq_server.
    fn unmap_io_range(&self, domid: DomId, id: IoServId, range: IoRange) -> Result<(), DmError>;
    /// XEN_DMOP_set_ioreq_server_state.
    fn set_ioreq_server_state(
        &self,
        domid: DomId,
        id: IoServId,
        enabled: bool,
    ) -> Result<(), DmError>;
    /// XEN_DMOP_destroy_ioreq_server.
    fn destroy_ioreq_server(&self, domid: DomId, id: IoServId) -> Result<(), DmError>;
    /// XEN_DMOP_set_isa_irq_level.
    fn set_isa_irq_level(&self, domid: DomId, isa_irq: u8, level: bool) -> Result<(), DmError>;
    /// XEN_DMOP_set_pci_intx_level (`intx` 0..=3 for INTA..INTD).
    fn set_pci_intx_level(
        &self,
        domid: DomId,
        seg: u16,
        bus: u8,
        dev: u8,
        intx: u8,
        level: bool,
    ) -> Result<(), DmError>;
    /// XEN_DMOP_inject_msi.
    fn inject_msi(&self, domid: DomId, addr: u64, data: u32) -> Result<(), DmError>;
    /// XEN_DMOP_remote_shutdown: shuts the domain down for `reason` (`SHUTDOWN_*`), as the
    /// guest's ACPI S5 or reset asks; the toolstack then acts on it (`on_poweroff=`).
    fn remote_shutdown(&self, domid: DomId, reason: u32) -> Result<(), DmError>;
    /// Limits this handle to `domid` (IOCTL_PRIVCMD_RESTRICT). It cannot be undone.
    fn restrict(&self, domid: DomId) -> Result<(), DmError>;
}

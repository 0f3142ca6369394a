//! xen/hvm/dm_op.h: device-model operations (HYPERVISOR_dm_op), the subset an ioreq server
//! needs.
//!
//! A call passes a [`XenDmOp`] as its first buffer; `u` holds one of the sub-op structs
//! (build it with [`XenDmOp::new`], read an OUT struct back with [`XenDmOp::payload`]).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `ioservid_t`.
pub type IoservId = u16;

/// `XEN_DMOP_create_ioreq_server`.
pub const XEN_DMOP_CREATE_IOREQ_SERVER: u32 = 1;
/// `XEN_DMOP_get_ioreq_server_info`.
pub const XEN_DMOP_GET_IOREQ_SERVER_INFO: u32 = 2;
/// `XEN_DMOP_map_io_range_to_ioreq_server`.
pub const XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER: u32 = 3;
/// `XEN_DMOP_unmap_io_range_from_ioreq_server`.
pub const XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER: u32 = 4;
/// `XEN_DMOP_set_ioreq_server_state`.
pub const XEN_DMOP_SET_IOREQ_SERVER_STATE: u32 = 5;
/// `XEN_DMOP_destroy_ioreq_server`.
pub const XEN_DMOP_DESTROY_IOREQ_SERVER: u32 = 6;
/// `XEN_DMOP_track_dirty_vram`.
pub const XEN_DMOP_TRACK_DIRTY_VRAM: u32 = 7;
/// `XEN_DMOP_set_pci_intx_level`.
pub const XEN_DMOP_SET_PCI_INTX_LEVEL: u32 = 8;
/// `XEN_DMOP_set_isa_irq_level`.
pub const XEN_DMOP_SET_ISA_IRQ_LEVEL: u32 = 9;
/// `XEN_DMOP_set_pci_link_route`.
pub const XEN_DMOP_SET_PCI_LINK_ROUTE: u32 = 10;
/// `XEN_DMOP_modified_memory`.
pub const XEN_DMOP_MODIFIED_MEMORY: u32 = 11;
/// `XEN_DMOP_set_mem_type`.
pub const XEN_DMOP_SET_MEM_TYPE: u32 = 12;
/// `XEN_DMOP_inject_event`.
pub const XEN_DMOP_INJECT_EVENT: u32 = 13;
/// `XEN_DMOP_inject_msi`.
pub const XEN_DMOP_INJECT_MSI: u32 = 14;
/// `XEN_DMOP_map_mem_type_to_ioreq_server`.
pub const XEN_DMOP_MAP_MEM_TYPE_TO_IOREQ_SERVER: u32 = 15;
/// `XEN_DMOP_remote_shutdown`.
pub const XEN_DMOP_REMOTE_SHUTDOWN: u32 = 16;
/// `XEN_DMOP_relocate_memory`.
pub const XEN_DMOP_RELOCATE_MEMORY: u32 = 17;
/// `XEN_DMOP_pin_memory_cacheattr`.
pub const XEN_DMOP_PIN_MEMORY_CACHEATTR: u32 = 18;
/// `XEN_DMOP_set_irq_level`.
pub const XEN_DMOP_SET_IRQ_LEVEL: u32 = 19;
/// `XEN_DMOP_nr_vcpus`.
pub const XEN_DMOP_NR_VCPUS: u32 = 20;

/// Flag bit of get_ioreq_server_info: do not map the legacy gfns.
pub const _XEN_DMOP_NO_GFNS: u16 = 0;
/// Flag of get_ioreq_server_info: do not map the legacy gfns (use resources).
pub const XEN_DMOP_NO_GFNS: u16 = 1 << _XEN_DMOP_NO_GFNS;

/// Range type: I/O ports.
pub const XEN_DMOP_IO_RANGE_PORT: u32 = 0;
/// Range type: MMIO.
pub const XEN_DMOP_IO_RANGE_MEMORY: u32 = 1;
/// Range type: PCI config space by SBDF (see [`xen_dmop_pci_sbdf`]).
pub const XEN_DMOP_IO_RANGE_PCI: u32 = 2;

/// `XEN_DMOP_PCI_SBDF(s, b, d, f)`: the value used as start/end of a PCI range.
/// Out-of-range parts are masked to their widths, as the C macro does. The C macro computes in
/// `int`, so a segment >= 0x8000 sign-extends into the 64-bit range fields; Xen matches PCI
/// ranges against the 32-bit SBDF zero-extended, so this returns it zero-extended.
pub const fn xen_dmop_pci_sbdf(seg: u16, bus: u8, dev: u8, func: u8) -> u64 {
    ((seg as u64) << 16) | ((bus as u64) << 8) | (((dev & 0x1f) as u64) << 3) | ((func & 7) as u64)
}

/// `struct xen_dm_op_create_ioreq_server`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpCreateIoreqServer {
    /// IN: HVM_IOREQSRV_BUFIOREQ_*.
    pub handle_bufioreq: u8,
    /// Padding.
    pub pad: [u8; 3],
    /// OUT: server id.
    pub id: IoservId,
}

/// `struct xen_dm_op_get_ioreq_server_info`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpGetIoreqServerInfo {
    /// IN: server id.
    pub id: IoservId,
    /// IN: XEN_DMOP_no_gfns.
    pub flags: u16,
    /// OUT: buffered ioreq event channel.
    pub bufioreq_port: u32,
    /// OUT: synchronous ioreq gfn.
    pub ioreq_gfn: u64,
    /// OUT: buffered ioreq gfn.
    pub bufioreq_gfn: u64,
}

/// `struct xen_dm_op_ioreq_server_range` (map and unmap).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpIoreqServerRange {
    /// IN: server id.
    pub id: IoservId,
    /// Padding.
    pub pad: u16,
    /// IN: XEN_DMOP_IO_RANGE_*.
    pub type_: u32,
    /// IN: inclusive start.
    pub start: u64,
    /// IN: inclusive end.
    pub end: u64,
}

/// `struct xen_dm_op_set_ioreq_server_state`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpSetIoreqServerState {
    /// IN: server id.
    pub id: IoservId,
    /// IN: 1 to enable.
    pub enabled: u8,
    /// Padding.
    pub pad: u8,
}

/// `struct xen_dm_op_destroy_ioreq_server`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpDestroyIoreqServer {
    /// IN: server id.
    pub id: IoservId,
    /// Padding.
    pub pad: u16,
}

/// `struct xen_dm_op_set_pci_intx_level`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpSetPciIntxLevel {
    /// IN: PCI segment.
    pub domain: u16,
    /// IN: bus.
    pub bus: u8,
    /// IN: device.
    pub device: u8,
    /// IN: INTx pin, 0..=3.
    pub intx: u8,
    /// IN: 1 asserted, 0 deasserted.
    pub level: u8,
}

/// `struct xen_dm_op_set_isa_irq_level`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpSetIsaIrqLevel {
    /// IN: ISA IRQ, 0..=15.
    pub isa_irq: u8,
    /// IN: 1 asserted, 0 deasserted.
    pub level: u8,
}

/// `struct xen_dm_op_remote_shutdown`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpRemoteShutdown {
    /// IN: a `SHUTDOWN_*` reason (sched.h).
    pub reason: u32,
}

/// `SHUTDOWN_poweroff` (public/sched.h).
pub const SHUTDOWN_POWEROFF: u32 = 0;
/// `SHUTDOWN_reboot`.
pub const SHUTDOWN_REBOOT: u32 = 1;

/// `struct xen_dm_op_inject_msi`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOpInjectMsi {
    /// IN: MSI data.
    pub data: u32,
    /// Padding.
    pub pad: u32,
    /// IN: MSI address.
    pub addr: u64,
}

/// Size of the union `u` of [`XenDmOp`] (its largest member is 24 bytes).
pub const XEN_DM_OP_UNION_SIZE: usize = 24;

/// `struct xen_dm_op`: the op number and the union of sub-op structs.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenDmOp {
    /// XEN_DMOP_*.
    pub op: u32,
    /// Padding.
    pub pad: u32,
    /// The union, as raw 8-byte-aligned storage.
    pub u: [u64; 3],
}

impl XenDmOp {
    /// A dm_op `op` carrying `payload` in its union (zero-filled after it). A payload larger
    /// than the union is truncated; none of the sub-op structs here is.
    pub fn new<T: IntoBytes + Immutable>(op: u32, payload: &T) -> Self {
        let mut d = XenDmOp {
            op,
            pad: 0,
            u: [0; 3],
        };
        let src = payload.as_bytes();
        let dst = d.u.as_mut_bytes();
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        d
    }

    /// The union read as `T` (for OUT fields after the call). `None` if `T` is larger than
    /// the union.
    pub fn payload<T: FromBytes>(&self) -> Option<T> {
        let bytes = self.u.as_bytes();
        T::read_from_prefix(bytes).ok().map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pci_sbdf_matches_macro_bit_layout() {
        assert_eq!(xen_dmop_pci_sbdf(0, 0, 3, 0), 0x18);
        assert_eq!(xen_dmop_pci_sbdf(1, 2, 0x1f, 7), 0x1_02ff);
        assert_eq!(xen_dmop_pci_sbdf(0, 0, 0xff, 0xff), 0xff);
    }

    #[test]
    fn test_dm_op_payload_roundtrip_keeps_fields() {
        let r = XenDmOpIoreqServerRange {
            id: 3,
            pad: 0,
            type_: XEN_DMOP_IO_RANGE_MEMORY,
            start: 0xfe00_0000,
            end: 0xfe00_0fff,
        };
        let op = XenDmOp::new(XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER, &r);
        assert_eq!(core::mem::size_of::<XenDmOp>(), 32);
        assert_eq!(op.payload::<XenDmOpIoreqServerRange>(), Some(r));
        assert_eq!(op.payload::<[u64; 4]>(), None);
    }
}

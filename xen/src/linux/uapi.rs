//! The Linux kernel's Xen device uapi (`include/uapi/xen/{evtchn,gntdev,privcmd}.h`):
//! ioctl numbers and argument structs, as plain `#[repr(C)]` data.
//!
//! Pointers in these structs are carried as `u64` addresses: this module describes the
//! x86_64 (LP64) ABI, which `tests/layout.rs` checks against the installed headers. Filling
//! in an address, and the ioctls themselves, happen in the private `linux::sys` module.

use std::os::raw::c_ulong;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `_IOC(_IOC_NONE, ty, nr, size)`: the Xen devices encode the argument size but no direction.
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> c_ulong {
    // _IOC_NRSHIFT 0, _IOC_TYPESHIFT 8, _IOC_SIZESHIFT 16, _IOC_DIRSHIFT 30; _IOC_NONE = 0.
    ((size as c_ulong & 0x3fff) << 16) | ((ty as c_ulong) << 8) | nr as c_ulong
}

/// Domain ids at or above this are reserved (`DOMID_FIRST_RESERVED`, xen.h).
pub const DOMID_FIRST_RESERVED: u16 = 0x7ff0;

// ---------------------------------------------------------------------------------------------
// evtchn.h

/// `struct ioctl_evtchn_bind_virq`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBindVirq {
    /// The VIRQ.
    pub virq: u32,
}

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBindInterdomain {
    /// Remote domain.
    pub remote_domain: u32,
    /// Remote port.
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBindUnboundPort {
    /// The domain allowed to bind the new port.
    pub remote_domain: u32,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnUnbind {
    /// Local port.
    pub port: u32,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnNotify {
    /// Local port.
    pub port: u32,
}

/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnRestrictDomid {
    /// The only domain this handle may bind to.
    pub domid: u16,
}

/// `IOCTL_EVTCHN_BIND_VIRQ`.
pub const IOCTL_EVTCHN_BIND_VIRQ: c_ulong =
    ioc_none(b'E', 0, core::mem::size_of::<IoctlEvtchnBindVirq>());
/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`: returns the local port.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: c_ulong =
    ioc_none(b'E', 1, core::mem::size_of::<IoctlEvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`: returns the local port.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: c_ulong =
    ioc_none(b'E', 2, core::mem::size_of::<IoctlEvtchnBindUnboundPort>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: c_ulong =
    ioc_none(b'E', 3, core::mem::size_of::<IoctlEvtchnUnbind>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: c_ulong =
    ioc_none(b'E', 4, core::mem::size_of::<IoctlEvtchnNotify>());
/// `IOCTL_EVTCHN_RESET`: clears the pending ring (after an overflow).
pub const IOCTL_EVTCHN_RESET: c_ulong = ioc_none(b'E', 5, 0);
/// `IOCTL_EVTCHN_RESTRICT_DOMID`.
pub const IOCTL_EVTCHN_RESTRICT_DOMID: c_ulong =
    ioc_none(b'E', 6, core::mem::size_of::<IoctlEvtchnRestrictDomid>());

// ---------------------------------------------------------------------------------------------
// gntdev.h

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevGrantRef {
    /// Granting domain.
    pub domid: u32,
    /// Grant reference.
    pub ref_: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with its one declared `refs` entry; the real argument
/// is this header followed by `count` [`IoctlGntdevGrantRef`]s.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevMapGrantRef {
    /// IN: number of grants.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// OUT: the mmap offset of the new mapping.
    pub index: u64,
    /// IN: the first grant (the rest follow).
    pub refs: [IoctlGntdevGrantRef; 1],
}

/// Offset of `refs` in [`IoctlGntdevMapGrantRef`].
pub const GNTDEV_MAP_GRANT_REF_REFS_OFFSET: usize = 16;

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevUnmapGrantRef {
    /// The index MAP_GRANT_REF returned.
    pub index: u64,
    /// Number of pages.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_gntdev_get_offset_for_vaddr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevGetOffsetForVaddr {
    /// IN: address of the mapping.
    pub vaddr: u64,
    /// OUT: its mmap offset.
    pub offset: u64,
    /// OUT: pages.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_gntdev_set_max_grants`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevSetMaxGrants {
    /// Limit.
    pub count: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevUnmapNotify {
    /// mmap offset of the byte to clear (mapping index + byte offset).
    pub index: u64,
    /// UNMAP_NOTIFY_* flags.
    pub action: u32,
    /// Port to notify.
    pub event_channel_port: u32,
}

/// One side of a [`GntdevGrantCopySegment`]: the C union of `void *virt` and
/// `struct { grant_ref_t ref; __u16 offset; domid_t domid; } foreign`, as its 8 bytes.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GntdevCopyPtr {
    /// The union's bytes, as a native-endian u64.
    pub raw: u64,
}

impl GntdevCopyPtr {
    /// The `virt` member: a local address.
    pub fn virt(addr: u64) -> Self {
        GntdevCopyPtr { raw: addr }
    }
    /// The `foreign` member: `ref` at byte 0, `offset` at 4, `domid` at 6 (little-endian).
    pub fn foreign(gref: u32, offset: u16, domid: u16) -> Self {
        GntdevCopyPtr {
            raw: u64::from(gref) | (u64::from(offset) << 32) | (u64::from(domid) << 48),
        }
    }
}

/// `struct gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GntdevGrantCopySegment {
    /// Source.
    pub source: GntdevCopyPtr,
    /// Destination.
    pub dest: GntdevCopyPtr,
    /// Bytes to copy.
    pub len: u16,
    /// GNTCOPY_* (which side is a grant).
    pub flags: u16,
    /// OUT: GNTST_*.
    pub status: i16,
    /// Tail padding.
    pub _pad: u16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevGrantCopy {
    /// Number of segments.
    pub count: u32,
    /// Padding.
    pub _pad: u32,
    /// Address of the segment array.
    pub segments: u64,
}

/// `UNMAP_NOTIFY_CLEAR_BYTE`.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// `IOCTL_GNTDEV_MAP_GRANT_REF`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: c_ulong =
    ioc_none(b'G', 0, core::mem::size_of::<IoctlGntdevMapGrantRef>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: c_ulong =
    ioc_none(b'G', 1, core::mem::size_of::<IoctlGntdevUnmapGrantRef>());
/// `IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR`.
pub const IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: c_ulong = ioc_none(
    b'G',
    2,
    core::mem::size_of::<IoctlGntdevGetOffsetForVaddr>(),
);
/// `IOCTL_GNTDEV_SET_MAX_GRANTS`.
pub const IOCTL_GNTDEV_SET_MAX_GRANTS: c_ulong =
    ioc_none(b'G', 3, core::mem::size_of::<IoctlGntdevSetMaxGrants>());
/// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: c_ulong =
    ioc_none(b'G', 7, core::mem::size_of::<IoctlGntdevUnmapNotify>());
/// `IOCTL_GNTDEV_GRANT_COPY`.
pub const IOCTL_GNTDEV_GRANT_COPY: c_ulong =
    ioc_none(b'G', 8, core::mem::size_of::<IoctlGntdevGrantCopy>());

// ---------------------------------------------------------------------------------------------
// privcmd.h

/// `struct privcmd_hypercall`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PrivcmdHypercall {
    /// Hypercall number.
    pub op: u64,
    /// Arguments.
    pub arg: [u64; 5],
}

/// `struct privcmd_mmapbatch_v2`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PrivcmdMmapbatchV2 {
    /// Number of frames.
    pub num: u32,
    /// Target domain.
    pub dom: u16,
    /// Padding.
    pub _pad: u16,
    /// Start of the privcmd mapping to fill.
    pub addr: u64,
    /// Address of `num` `xen_pfn_t` (u64) frames.
    pub arr: u64,
    /// Address of `num` `int` per-frame errors (0 or -errno).
    pub err: u64,
}

/// `struct privcmd_dm_op_buf`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PrivcmdDmOpBuf {
    /// Address of the buffer.
    pub uptr: u64,
    /// Its size.
    pub size: u64,
}

/// `struct privcmd_dm_op`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PrivcmdDmOp {
    /// Target domain.
    pub dom: u16,
    /// Number of buffers.
    pub num: u16,
    /// Padding.
    pub _pad: u32,
    /// Address of `num` [`PrivcmdDmOpBuf`]s.
    pub ubufs: u64,
}

/// `struct privcmd_mmap_resource`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PrivcmdMmapResource {
    /// Target domain.
    pub dom: u16,
    /// Padding.
    pub _pad: u16,
    /// XENMEM_resource_* type.
    pub type_: u32,
    /// Resource id.
    pub id: u32,
    /// First frame.
    pub idx: u32,
    /// Number of frames (0 with addr 0: query the size).
    pub num: u64,
    /// Start of the privcmd mapping to fill.
    pub addr: u64,
}

/// Largest number of buffers the kernel accepts in one DM_OP (`privcmd_dm_op_max_num`).
pub const PRIVCMD_DM_OP_MAX_NUM: usize = 16;
/// Largest DM_OP buffer the kernel accepts (`privcmd_dm_op_buf_max_size`).
pub const PRIVCMD_DM_OP_BUF_MAX_SIZE: usize = 4096;

/// `IOCTL_PRIVCMD_HYPERCALL`.
pub const IOCTL_PRIVCMD_HYPERCALL: c_ulong =
    ioc_none(b'P', 0, core::mem::size_of::<PrivcmdHypercall>());
/// `IOCTL_PRIVCMD_MMAPBATCH_V2`.
pub const IOCTL_PRIVCMD_MMAPBATCH_V2: c_ulong =
    ioc_none(b'P', 4, core::mem::size_of::<PrivcmdMmapbatchV2>());
/// `IOCTL_PRIVCMD_DM_OP`.
pub const IOCTL_PRIVCMD_DM_OP: c_ulong = ioc_none(b'P', 5, core::mem::size_of::<PrivcmdDmOp>());
/// `IOCTL_PRIVCMD_RESTRICT` (argument: a `domid_t`).
pub const IOCTL_PRIVCMD_RESTRICT: c_ulong = ioc_none(b'P', 6, core::mem::size_of::<u16>());
/// `IOCTL_PRIVCMD_MMAP_RESOURCE`.
pub const IOCTL_PRIVCMD_MMAP_RESOURCE: c_ulong =
    ioc_none(b'P', 7, core::mem::size_of::<PrivcmdMmapResource>());

const _: () = assert!(
    core::mem::size_of::<usize>() == 8,
    "the uapi mirrors describe the LP64 ABI"
);

//! Hypervisor interfaces for domio.
//!
//! * [`abi`]: `#[repr(C)]` mirrors of Xen's public headers, checked against the C headers by
//!   `tests/layout.rs`.
//! * [`mem`]: [`mem::SharedMem`], the one type through which domio touches memory that another
//!   domain can write. It is the only place (with `linux::sys`) that holds code exempt from `deny(unsafe_code)`.
//! * The traits a backend or device model is written against: [`XenHost`] opens handles
//!   of [`EventChannels`], [`GrantTables`], [`ForeignMemory`] and [`DeviceModel`], and connects
//!   to xenstore. There are two implementations: [`linux`] (the real `/dev/xen` devices) and
//!   `xensim` (the simulated host, in its own crate).
#![deny(unsafe_code)]

pub mod abi;
pub mod dm;
pub mod evtchn;
pub mod foreign;
pub mod gnttab;
pub mod host;
pub mod linux;
#[allow(unsafe_code)]
pub mod mem;
pub mod ring;

pub use dm::{BufIoreq, DeviceModel, DmError, IoRange, IoServId, IoreqServerInfo};
pub use evtchn::{EventChannels, EvtchnError};
pub use foreign::{ForeignError, ForeignMemory, Resource};
pub use gnttab::{CopyDir, CopySegment, GrantError, GrantMapping, GrantTables};
pub use host::{HostError, XenHost, XsStream, XsTransport};
pub use mem::{MemError, SharedMem};

/// A domain id (`domid_t`).
pub type DomId = u16;
/// `DOMID_SELF`.
pub const DOMID_SELF: DomId = 0x7ff0;
/// An event channel port (`evtchn_port_t`).
pub type Port = u32;
/// A grant reference (`grant_ref_t`).
pub type GrantRef = u32;
/// A guest frame number.
pub type Gfn = u64;
/// Xen's page size on x86.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

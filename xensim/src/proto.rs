//! The protocol between the xensim daemon and `SimHost` clients.
//!
//! One SOCK_SEQPACKET connection is one open handle (like one open of `/dev/xen/evtchn` or
//! `/dev/xen/gntdev`): the ports, mappings and restrictions of a handle die with its
//! connection, as they do when a process closes a device. Each request gets exactly one reply;
//! descriptors (memfds, eventfds, a xenstored connection) travel as SCM_RIGHTS.

use serde::{Deserialize, Serialize};

/// Largest datagram (a grant copy of 32 full pages plus framing).
pub const MAX_MSG: usize = 160 * 1024;

/// A request from a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// First message: the domain this client runs in (0 = dom0) and a label for logs.
    Hello {
        /// Client's domain.
        domid: u16,
        /// What the handle is for ("evtchn", "gnttab", ...).
        kind: String,
    },
    /// A connection to xenstored as the client's domain (reply carries one fd).
    Xenstore,
    /// EVTCHNOP_bind_interdomain (reply: port, fds = [incoming, peer]).
    EvtchnBindInterdomain {
        /// Remote domain.
        remote: u16,
        /// Remote port.
        remote_port: u32,
    },
    /// EVTCHNOP_alloc_unbound (reply: port, fds = [incoming]).
    EvtchnAllocUnbound {
        /// Domain allowed to bind.
        remote: u16,
    },
    /// The current peer of a port (reply: `Peer`, fds = [peer] if bound).
    EvtchnPeer {
        /// Port.
        port: u32,
    },
    /// EVTCHNOP_close.
    EvtchnClose {
        /// Port.
        port: u32,
    },
    /// The RAM file of a domain (reply: `Ram`, fds = [memfd]); privileged clients only.
    RamFd {
        /// Domain.
        domid: u16,
    },
    /// GNTTABOP_map_grant_ref for each ref (reply: `Mapped` or `MapFailed`).
    GntMap {
        /// Granting domain.
        domid: u16,
        /// References, in mapping order.
        refs: Vec<u32>,
        /// Map writable.
        writable: bool,
    },
    /// Unmap a mapping made on this connection.
    GntUnmap {
        /// The mapping's token.
        token: u64,
    },
    /// IOCTL_GNTDEV_SET_UNMAP_NOTIFY for a mapping.
    GntSetUnmapNotify {
        /// The mapping's token.
        token: u64,
        /// Byte offset within the mapping to clear on unmap.
        clear_byte: Option<u64>,
        /// Port (bound on this client's domain) to notify on unmap.
        port: Option<u32>,
    },
    /// GNTTABOP_copy (reply: `Copied`).
    GntCopy {
        /// Segments.
        segs: Vec<CopySeg>,
    },
    /// GNTTABOP_copy with the client's buffers named by address (reply: `CopyStatus`, or
    /// `CopyRefused` when the host may not reach the sender's memory): the host copies
    /// straight between the granted pages and the sending process (process_vm_readv/writev,
    /// the pid taken from the message's SCM_CREDENTIALS); no data crosses the socket.
    GntCopyIov {
        /// Segments, in order.
        segs: Vec<CopyIov>,
    },
    /// Foreign map check (privcmd mmapbatch): reply `Ok`/`ForeignFailed`, then map from RAM.
    ForeignMap {
        /// Domain.
        domid: u16,
        /// Frames.
        gfns: Vec<u64>,
    },
    /// The domains that exist (reply: `Domains`).
    Domains,
    /// HYPERVISOR_dm_op on an HVM domain (privileged clients only; reply per [`DmOp`]).
    Dm {
        /// Target domain.
        domid: u16,
        /// The operation.
        op: DmOp,
    },
    /// XENMEM_acquire_resource of an ioreq server (reply: `Resource`, fds = [pages memfd]:
    /// frame N is at offset N * 4096).
    MapResource {
        /// Target domain.
        domid: u16,
        /// XENMEM_resource_* type.
        type_: u32,
        /// Resource id (the ioreq server id).
        id: u32,
        /// First frame.
        frame: u64,
        /// Number of frames.
        nr_frames: u64,
    },
}

/// A device-model operation on the wire, with the arguments as Xen receives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DmOp {
    /// XEN_DMOP_create_ioreq_server (reply: `IoServId`).
    CreateIoreqServer {
        /// HVM_IOREQSRV_BUFIOREQ_*.
        handle_bufioreq: u8,
    },
    /// XEN_DMOP_get_ioreq_server_info (reply: `IoreqInfo`).
    GetIoreqServerInfo {
        /// Server.
        id: u16,
        /// Legacy gfns wanted (no XEN_DMOP_no_gfns).
        want_gfns: bool,
    },
    /// XEN_DMOP_map_io_range_to_ioreq_server.
    MapIoRange {
        /// Server.
        id: u16,
        /// XEN_DMOP_IO_RANGE_*.
        type_: u32,
        /// Inclusive start.
        start: u64,
        /// Inclusive end.
        end: u64,
    },
    /// XEN_DMOP_unmap_io_range_from_ioreq_server.
    UnmapIoRange {
        /// Server.
        id: u16,
        /// XEN_DMOP_IO_RANGE_*.
        type_: u32,
        /// Inclusive start.
        start: u64,
        /// Inclusive end.
        end: u64,
    },
    /// XEN_DMOP_set_ioreq_server_state.
    SetIoreqServerState {
        /// Server.
        id: u16,
        /// Enable.
        enabled: bool,
    },
    /// XEN_DMOP_destroy_ioreq_server.
    DestroyIoreqServer {
        /// Server.
        id: u16,
    },
    /// XEN_DMOP_remote_shutdown.
    RemoteShutdown {
        /// A SHUTDOWN_* reason.
        reason: u32,
    },
    /// XEN_DMOP_set_isa_irq_level.
    SetIsaIrqLevel {
        /// ISA IRQ.
        irq: u8,
        /// Level (0 or 1).
        level: u8,
    },
    /// XEN_DMOP_set_pci_intx_level.
    SetPciIntxLevel {
        /// Segment.
        seg: u16,
        /// Bus.
        bus: u8,
        /// Device.
        dev: u8,
        /// INTx pin.
        intx: u8,
        /// Level (0 or 1).
        level: u8,
    },
    /// XEN_DMOP_inject_msi.
    InjectMsi {
        /// Address.
        addr: u64,
        /// Data.
        data: u32,
    },
}

/// One grant-copy segment on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopySeg {
    /// Granting domain.
    pub domid: u16,
    /// Grant reference.
    pub gref: u32,
    /// Offset in the granted page.
    pub offset: u16,
    /// Bytes to read from the guest (FromGuest), when `to_guest` is None.
    pub len: u16,
    /// Bytes to write to the guest (ToGuest).
    pub to_guest: Option<Vec<u8>>,
}

/// Most segments in one [`Request::GntCopyIov`] (the kernel's IOV_MAX).
pub const MAX_COPY_IOV: usize = 1024;

/// One grant-copy segment whose local side is a buffer in the sending process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CopyIov {
    /// Granting domain.
    pub domid: u16,
    /// Grant reference.
    pub gref: u32,
    /// Offset in the granted page.
    pub offset: u16,
    /// Bytes to copy (at most a page; `offset + len` must stay inside the page).
    pub len: u16,
    /// Direction: from the buffer into the granted page.
    pub to_guest: bool,
    /// The buffer's address in the sending process.
    pub addr: u64,
}

/// A reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// A port (and fds).
    Port(u32),
    /// Whether the port has a peer (its eventfd attached if so).
    Peer(bool),
    /// A domain's RAM size in pages (memfd attached).
    Ram(u64),
    /// Grants mapped: token and the granted frames in order.
    Mapped {
        /// Identity of the mapping on this connection.
        token: u64,
        /// Frames.
        frames: Vec<u64>,
    },
    /// A grant in the batch failed; nothing stays mapped.
    MapFailed {
        /// Index of the failing ref.
        index: u32,
        /// GNTST_* status.
        status: i16,
    },
    /// Grant copy results: per-segment status and, for FromGuest segments, the data.
    Copied {
        /// Status per segment.
        status: Vec<i16>,
        /// Data per segment (empty for ToGuest).
        data: Vec<Vec<u8>>,
    },
    /// `GntCopyIov` done: GNTST_* status per segment.
    CopyStatus(Vec<i16>),
    /// `GntCopyIov` not possible (nothing was pinned or copied): the host may not reach the
    /// sender's memory (errno of process_vm_readv/writev, or ENOTSUP without credentials);
    /// the client falls back to `GntCopy`.
    CopyRefused {
        /// errno.
        errno: i32,
    },
    /// Foreign frame failed.
    ForeignFailed {
        /// Index.
        index: u32,
        /// errno.
        errno: i32,
    },
    /// Domains: (id, name, RAM pages).
    Domains(Vec<(u16, String, u64)>),
    /// An ioreq server id.
    IoServId(u16),
    /// XEN_DMOP_get_ioreq_server_info's answer.
    IoreqInfo {
        /// Buffered ring port.
        bufioreq_port: u32,
    },
    /// Resource frames granted (memfd attached).
    Resource,
    /// The operation failed with this errno.
    Err {
        /// errno.
        errno: i32,
        /// Description.
        msg: String,
    },
}

/// Encodes a message.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard cannot fail on these types except for allocation failure.
    postcard::to_stdvec(v).unwrap_or_default()
}

/// Decodes a message.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

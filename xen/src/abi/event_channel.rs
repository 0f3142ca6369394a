//! xen/event_channel.h: the event-channel hypercall structures we mirror.
//!
//! domio never issues these hypercalls itself (the Linux evtchn driver does), but xensim
//! implements the same operations, and the layout test checks these mirrors against the C
//! header so that both sides agree on what a port is.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `evtchn_port_t`: an event-channel port number.
pub type EvtchnPort = u32;
/// `domid_t` as used in these structures.
pub type DomidT = u16;

/// `EVTCHNOP_bind_interdomain`.
pub const EVTCHNOP_BIND_INTERDOMAIN: u32 = 0;
/// `EVTCHNOP_bind_virq`.
pub const EVTCHNOP_BIND_VIRQ: u32 = 1;
/// `EVTCHNOP_bind_pirq`.
pub const EVTCHNOP_BIND_PIRQ: u32 = 2;
/// `EVTCHNOP_close`.
pub const EVTCHNOP_CLOSE: u32 = 3;
/// `EVTCHNOP_send`.
pub const EVTCHNOP_SEND: u32 = 4;
/// `EVTCHNOP_status`.
pub const EVTCHNOP_STATUS: u32 = 5;
/// `EVTCHNOP_alloc_unbound`.
pub const EVTCHNOP_ALLOC_UNBOUND: u32 = 6;
/// `EVTCHNOP_bind_ipi`.
pub const EVTCHNOP_BIND_IPI: u32 = 7;
/// `EVTCHNOP_bind_vcpu`.
pub const EVTCHNOP_BIND_VCPU: u32 = 8;
/// `EVTCHNOP_unmask`.
pub const EVTCHNOP_UNMASK: u32 = 9;
/// `EVTCHNOP_reset`.
pub const EVTCHNOP_RESET: u32 = 10;

/// `struct evtchn_alloc_unbound`: allocate a port in `dom` that `remote_dom` may bind.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EvtchnAllocUnbound {
    /// IN: the domain that gets the port (DOMID_SELF for the caller).
    pub dom: DomidT,
    /// IN: the domain allowed to bind it.
    pub remote_dom: DomidT,
    /// OUT: the allocated port.
    pub port: EvtchnPort,
}

/// `struct evtchn_bind_interdomain`: connect a new local port to a remote unbound port.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EvtchnBindInterdomain {
    /// IN: the remote domain.
    pub remote_dom: DomidT,
    /// Explicit padding (implicit in C).
    pub _pad: u16,
    /// IN: the remote domain's unbound port.
    pub remote_port: EvtchnPort,
    /// OUT: the new local port.
    pub local_port: EvtchnPort,
}

/// `struct evtchn_send`: raise an event on the remote end of `port`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EvtchnSend {
    /// IN: the local port.
    pub port: EvtchnPort,
}

/// `struct evtchn_close`: close `port` (both ends become unbound/closed).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EvtchnClose {
    /// IN: the local port.
    pub port: EvtchnPort,
}

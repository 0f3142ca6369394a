//! Event channels: the doorbells between domains.
//!
//! A handle is like one open of `/dev/xen/evtchn`: ports bound through it are delivered on its
//! file descriptor, which becomes readable when any of them is pending. A delivered port stays
//! masked until [`EventChannels::unmask`], exactly as with the Linux device, so a backend
//! drains its ring, then unmasks, then checks the ring once more.

use std::os::fd::BorrowedFd;

use crate::{DomId, Port};

/// Errors from event-channel operations.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// The hypervisor (or xensim) refused the operation.
    #[error("event channel {op} (remote dom{remote:?}, port {port:?}) failed: {source}")]
    Op {
        /// The operation, e.g. "bind_interdomain".
        op: &'static str,
        /// Remote domain, where there is one.
        remote: Option<DomId>,
        /// Port involved, where there is one.
        port: Option<Port>,
        /// The error code.
        #[source]
        source: std::io::Error,
    },
    /// The port is not bound through this handle.
    #[error("event channel port {0} is not bound through this handle")]
    NotBound(Port),
    /// The handle is restricted to another domain.
    #[error("event channel handle is restricted to dom{restricted}; refused dom{requested}")]
    Restricted {
        /// The domain the handle is restricted to.
        restricted: DomId,
        /// The domain asked for.
        requested: DomId,
    },
}

/// One handle onto the event-channel device.
pub trait EventChannels: Send + Sync {
    /// Binds a new local port to `remote_port` of domain `remote` (EVTCHNOP_bind_interdomain).
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port, EvtchnError>;
    /// Allocates a local port that `remote` may bind to (EVTCHNOP_alloc_unbound), bound here.
    fn bind_unbound(&self, remote: DomId) -> Result<Port, EvtchnError>;
    /// Closes a port bound through this handle.
    fn unbind(&self, port: Port) -> Result<(), EvtchnError>;
    /// Sends an event on `port` to its remote end (EVTCHNOP_send).
    fn notify(&self, port: Port) -> Result<(), EvtchnError>;
    /// Unmasks a port after its delivery; an event that arrived meanwhile is delivered again.
    fn unmask(&self, port: Port) -> Result<(), EvtchnError>;
    /// Readable (poll/epoll) while some port of this handle is pending.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Takes up to `out.len()` pending ports without blocking; returns how many. Each returned
    /// port is masked until [`EventChannels::unmask`].
    fn pending(&self, out: &mut [Port]) -> Result<usize, EvtchnError>;
    /// Limits this handle to binding ports of domain `domid` (IOCTL_EVTCHN_RESTRICT_DOMID).
    /// It cannot be undone.
    fn restrict(&self, domid: DomId) -> Result<(), EvtchnError>;
}

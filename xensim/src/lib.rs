//! xensim: a simulated Xen host, faithful to Xen's semantics, for testing domio without Xen.
//!
//! * [`host::Host`]: the hypervisor — domains with memfd RAM, v1 grant tables in shared memory
//!   with Xen's pinning rules, event channels delivered on eventfds — and its [`xenstored`].
//! * [`guest::Guest`]: what a guest kernel does (allocate pages, grant them, allocate event
//!   channels, talk to xenstore), for the frontends that drive domio in tests.
//! * [`server`] and [`client`]: the host as a daemon on a unix socket, and `SimHost`, the
//!   `xen::XenHost` implementation a separate domio process uses to attach to it (memory is
//!   shared by passing memfds and eventfds with SCM_RIGHTS; nothing on the data path is
//!   copied through the socket).
#![deny(unsafe_code)]

pub mod client;
pub mod efd;
pub mod front;
pub mod guest;
pub mod guestos;
pub mod host;
pub mod hvm;
#[allow(unsafe_code)]
pub mod mem;
pub mod proto;
pub mod server;
#[allow(unsafe_code)]
pub mod sys;
pub mod toolstack;
pub mod xenstored;

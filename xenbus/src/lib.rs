//! xenstore and XenBus: the wire codec, a multiplexing client with watch streams and
//! transactions, and the backend device lifecycle (the XenBus state machine).
//!
//! - [`wire`]: the message codec, shared with xensim's xenstored.
//! - [`client`]: [`XsClient`], one connection used by many threads; [`XsOps`] for the
//!   operations that also run inside a [`Transaction`].
//! - [`watch`]: bounded, coalescing watch-event queues (XSA-349).
//! - [`state`]: [`XenbusState`], parsed strictly.
//! - [`backend`]: [`BackendWatcher`] drives one backend type for one frontend domain through
//!   the XenBus handshake, calling a [`BackendDriver`] and its [`Device`]s.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use xenbus::{BackendDriver, BackendWatcher, Device, DeviceCtx, DriverError, XsClient, XsOps};
//!
//! struct NullBlk;
//! struct NullDev;
//!
//! impl BackendDriver for NullBlk {
//!     fn backend_type(&self) -> &str { "vbd" }
//!     fn probe(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DriverError> {
//!         // Advertise features in one transaction; the watcher then writes InitWait.
//!         ctx.write_backend(&[("sectors", "2048"), ("max-ring-page-order", "0")])?;
//!         Ok(Box::new(NullDev))
//!     }
//! }
//!
//! impl Device for NullDev {
//!     fn connect(&mut self, ctx: &DeviceCtx) -> Result<(), DriverError> {
//!         // Frontend values are hostile: strict parsing, bounded by what we advertised.
//!         let _ring = ctx.frontend_required_u32("ring-ref", 1..=u32::MAX)?;
//!         let _port = ctx.frontend_required_u32("event-channel", 1..=4095)?;
//!         Ok(()) // start the ring thread here; the watcher then writes Connected
//!     }
//!     fn disconnect(&mut self, _ctx: &DeviceCtx) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let stream = std::os::unix::net::UnixStream::connect("/run/xenstored/socket")?;
//! let xs = XsClient::from_unix(stream, "xenstored")?;
//! xs.write("/local/domain/0/name", b"Domain-0")?;
//! let w = xs.watch("/local/domain/5", "home")?;
//! let _first = w.recv();
//! let watcher = BackendWatcher::start(xs.clone(), Arc::new(NullBlk), 0, 5)?;
//! // ... serve until the guest goes away ...
//! watcher.stop(); // disconnects every device, backend states Closed
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod client;
pub mod parse;
pub mod state;
pub mod watch;
pub mod wire;

pub use backend::{
    BackendDriver, BackendWatcher, Device, DeviceCtx, DeviceError, DeviceInfo, DriverError,
    Hotplug, WatcherError,
};
pub use client::{
    ClientOptions, ClientStats, Op, Transaction, Watch, WatchGuard, XsClient, XsError, XsOps,
};
pub use state::XenbusState;
pub use watch::{EventQueue, QueueStats, WatchEvent};

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
pub use client::{ClientOptions, Op, Transaction, Watch, WatchGuard, XsClient, XsError, XsOps};
pub use state::XenbusState;
pub use watch::{EventQueue, QueueStats, WatchEvent};

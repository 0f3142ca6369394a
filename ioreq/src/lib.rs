//! ioreq server for HVM guests: the sync ioreq page per vCPU, the buffered ring, range
//! registry and dispatch. Built on the `xen` crate's `DeviceModel` and `ForeignMemory`
//! traits.
//!
//! The contract with the machine (`devmodel`) is in [`handler`]: the server validates each
//! ioreq, splits rep transfers into single accesses, and calls an [`IoHandler`]; the machine
//! registers and moves its ranges through a [`RangeRegistry`].
//!
//! * [`decode`]: a copied `ioreq_t` becomes a validated [`decode::Request`] (pure; fuzzed).
//! * [`dispatch`]: one request to single accesses, guest RAM for `data_is_ptr`, rate-limited
//!   logging, counters.
//! * [`guestmem`]: the guest RAM mapping cache that INVALIDATE empties.
//! * [`layout`]: where the guest's RAM is (below the MMIO hole, and from 4 GiB).
//! * [`server`]: [`IoreqServer`], its setup, its thread and the synchronous and buffered
//!   protocols.
#![deny(unsafe_code)]

pub mod decode;
pub mod dispatch;
pub mod guestmem;
pub mod handler;
pub mod layout;
pub mod ratelimit;
pub mod server;

pub use dispatch::{Dispatcher, IoreqStats};
pub use guestmem::GuestMemory;
pub use handler::{IoAccess, IoHandler, IoSpace, RangeError, RangeRegistry, Sbdf};
pub use layout::RamLayout;
pub use server::{IoreqConfig, IoreqError, IoreqServer, ServerRanges};

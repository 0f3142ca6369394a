//! ioreq server for HVM guests: the sync ioreq page per vCPU, the buffered ring, range
//! registry and dispatch. Built on the `xen` crate's `DeviceModel` and `ForeignMemory`
//! traits.
//!
//! The contract with the machine (`devmodel`) is in [`handler`]: the server validates each
//! ioreq, splits rep transfers into single accesses, and calls an [`IoHandler`]; the machine
//! registers and moves its ranges through a [`RangeRegistry`].
#![deny(unsafe_code)]

pub mod handler;

pub use handler::{IoAccess, IoHandler, IoSpace, RangeError, RangeRegistry, Sbdf};

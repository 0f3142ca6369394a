//! ioreq server for HVM guests: the sync ioreq page per vCPU, the buffered ring, range
//! registry and dispatch. Built on the `xen` crate's `DeviceModel` and `ForeignMemory`
//! traits. (Filled in by the ioreq/devmodel issue.)
#![deny(unsafe_code)]

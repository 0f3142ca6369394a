//! The simulated Xen host.
#![deny(unsafe_code)]

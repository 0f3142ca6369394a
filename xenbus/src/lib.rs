//! xenstore.
#![deny(unsafe_code)]
pub mod wire;

//! xensim: a simulated Xen host, faithful to Xen's semantics, for testing domio without Xen.
#![deny(unsafe_code)]

pub mod xenstored;

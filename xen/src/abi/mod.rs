//! `#[repr(C)]` mirrors of Xen's public headers. Every struct here is checked against the C
//! headers (Debian's libxen-dev and the kernel uapi) by `xen/tests/layout.rs`.

pub mod blkif;
pub mod console;
pub mod dm_op;
pub mod event_channel;
pub mod grant_table;
pub mod ioreq;
pub mod netif;
pub mod ring;
pub mod xs_wire;

//! Linux implementation of the xen traits on `/dev/xen` (to be filled in).

pub mod uapi;

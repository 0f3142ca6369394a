//! domio: Xen device backends and HVM device model, one process per guest.
fn main() {}

//! Mirror of Xen's public header (to be filled in).

//! xen/io/console.h: the PV console ring page.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the guest-input ring.
pub const XENCONS_IN_SIZE: usize = 1024;
/// Size of the guest-output ring.
pub const XENCONS_OUT_SIZE: usize = 2048;

/// `struct xencons_interface`: both rings and their free-running indices.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct XenconsInterface {
    /// Input to the guest (backend produces).
    pub in_: [u8; XENCONS_IN_SIZE],
    /// Output from the guest (frontend produces).
    pub out: [u8; XENCONS_OUT_SIZE],
    /// Guest's consumer index of `in_`.
    pub in_cons: u32,
    /// Backend's producer index of `in_`.
    pub in_prod: u32,
    /// Backend's consumer index of `out`.
    pub out_cons: u32,
    /// Guest's producer index of `out`.
    pub out_prod: u32,
}

/// Byte offset of `in_` in the page.
pub const IN_OFFSET: usize = 0;
/// Byte offset of `out`.
pub const OUT_OFFSET: usize = XENCONS_IN_SIZE;
/// Byte offset of `in_cons`.
pub const IN_CONS_OFFSET: usize = XENCONS_IN_SIZE + XENCONS_OUT_SIZE;
/// Byte offset of `in_prod`.
pub const IN_PROD_OFFSET: usize = IN_CONS_OFFSET + 4;
/// Byte offset of `out_cons`.
pub const OUT_CONS_OFFSET: usize = IN_CONS_OFFSET + 8;
/// Byte offset of `out_prod`.
pub const OUT_PROD_OFFSET: usize = IN_CONS_OFFSET + 12;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_console_offsets_match_struct() {
        assert_eq!(std::mem::offset_of!(XenconsInterface, out), OUT_OFFSET);
        assert_eq!(
            std::mem::offset_of!(XenconsInterface, in_cons),
            IN_CONS_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(XenconsInterface, in_prod),
            IN_PROD_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(XenconsInterface, out_cons),
            OUT_CONS_OFFSET
        );
        assert_eq!(
            std::mem::offset_of!(XenconsInterface, out_prod),
            OUT_PROD_OFFSET
        );
        assert_eq!(std::mem::size_of::<XenconsInterface>(), 3088);
    }
}

//! xen/io/ring.h: the layout of a shared ring and its size arithmetic.
//!
//! A shared ring is a 64-byte header followed by an array of slots, each the size of the C
//! union of the request and response types. The number of slots is the largest power of two
//! that fits in the pages given (`__RING_SIZE`). The logic (producer/consumer indices, event
//! indices) lives in [`crate::ring`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `RING_IDX`: a free-running index, wrapping at 2^32.
pub type RingIdx = u32;

/// The header at the start of every `struct *_sring`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SringHeader {
    /// Requests produced by the frontend (written by the frontend only).
    pub req_prod: RingIdx,
    /// The backend wants an event when `req_prod` passes this value.
    pub req_event: RingIdx,
    /// Responses produced by the backend (written by the backend only).
    pub rsp_prod: RingIdx,
    /// The frontend wants an event when `rsp_prod` passes this value.
    pub rsp_event: RingIdx,
    /// The `pvt` union (netif smartpoll flag, tapif msg); unused by domio, kept zero.
    pub pvt: [u8; 4],
    /// `__pad[44]`: with `pvt`, 48 bytes of padding so that slots start at offset 64.
    pub pad: [u8; 44],
}

/// Offset of `req_prod` in the shared ring.
pub const SRING_REQ_PROD: usize = 0;
/// Offset of `req_event`.
pub const SRING_REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`.
pub const SRING_RSP_PROD: usize = 8;
/// Offset of `rsp_event`.
pub const SRING_RSP_EVENT: usize = 12;
/// Offset of `pvt`.
pub const SRING_PVT: usize = 16;
/// Offset of the first slot (`ring[0]`).
pub const SRING_RING_OFFSET: usize = 64;
/// Size of [`SringHeader`] (equal to [`SRING_RING_OFFSET`]).
pub const SRING_HEADER_SIZE: usize = 64;
/// The largest ring domio accepts, in pages (blkif's `max-ring-page-order` 4).
pub const MAX_RING_PAGES: usize = 16;

/// Largest power of two that is `<= x` (0 for 0): the `__RD32` macro.
pub const fn round_down_pow2(x: u32) -> u32 {
    if x == 0 {
        0
    } else {
        1 << (31 - x.leading_zeros())
    }
}

/// `__RING_SIZE`: slots in a ring of `ring_bytes` bytes whose slots are `slot_size` bytes.
///
/// Returns 0 if the ring cannot hold a single slot (or `slot_size` is 0).
pub const fn ring_entries(ring_bytes: usize, slot_size: usize) -> u32 {
    if slot_size == 0 || ring_bytes < SRING_RING_OFFSET {
        return 0;
    }
    let n = (ring_bytes - SRING_RING_OFFSET) / slot_size;
    let n = if n > u32::MAX as usize {
        u32::MAX
    } else {
        n as u32
    };
    round_down_pow2(n)
}

/// Size of the C union `*_sring_entry` of a request and a response type: the larger size,
/// rounded up to the larger alignment.
pub const fn slot_size(
    req_size: usize,
    req_align: usize,
    rsp_size: usize,
    rsp_align: usize,
) -> usize {
    let size = if req_size > rsp_size {
        req_size
    } else {
        rsp_size
    };
    let align = if req_align > rsp_align {
        req_align
    } else {
        rsp_align
    };
    size.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_round_down_pow2_matches_rd32_definition() {
        assert_eq!(round_down_pow2(0), 0);
        assert_eq!(round_down_pow2(1), 1);
        assert_eq!(round_down_pow2(3), 2);
        assert_eq!(round_down_pow2(36), 32);
        assert_eq!(round_down_pow2(u32::MAX), 1 << 31);
    }

    #[test]
    fn test_ring_entries_header_too_small_is_zero() {
        assert_eq!(ring_entries(63, 8), 0);
        assert_eq!(ring_entries(64, 8), 0);
        assert_eq!(ring_entries(4096, 0), 0);
    }

    #[test]
    fn test_slot_size_union_rounds_to_alignment() {
        assert_eq!(slot_size(112, 8, 16, 8), 112);
        assert_eq!(slot_size(6, 2, 4, 4), 8);
        assert_eq!(slot_size(108, 4, 12, 4), 108);
    }
}

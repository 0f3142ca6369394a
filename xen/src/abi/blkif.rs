//! xen/io/blkif.h: the block-device ring protocol.
//!
//! Three layouts of the same protocol exist, chosen by the frontend's `protocol` xenstore key:
//! the native one (x86_64 here), `x86_32-abi` (a 32-bit guest on a 64-bit host: 64-bit fields
//! are only 4-byte aligned) and `x86_64-abi`. The 32-bit layouts are those of Linux's
//! `drivers/block/xen-blkback/common.h` (`#pragma pack(4)` / packed structs).
//!
//! Every request variant starts with `operation`, so a backend copies a whole slot once
//! (XSA-155), reads byte 0 and then views the copy as the right variant.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::ring::{ring_entries, slot_size};
use crate::PAGE_SIZE;

/// `blkif_vdev_t`.
pub type BlkifVdev = u16;
/// `blkif_sector_t`: always in 512-byte units.
pub type BlkifSector = u64;

/// Read sectors into the segments.
pub const BLKIF_OP_READ: u8 = 0;
/// Write the segments to disk.
pub const BLKIF_OP_WRITE: u8 = 1;
/// Write with a barrier (feature-barrier).
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// Flush the disk cache (feature-flush-cache); may carry no segments.
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// Reserved (was BLKIF_OP_PACKET for blktap).
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// Discard a sector range (feature-discard); uses [`BlkifRequestDiscard`].
pub const BLKIF_OP_DISCARD: u8 = 5;
/// Indirect request (feature-max-indirect-segments); uses [`BlkifRequestIndirect`].
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// Segments carried directly in a request.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages (each full of [`BlkifRequestSegment`]) in one indirect request.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segments that fit in one indirect page (4096 / 8).
pub const BLKIF_SEGS_PER_INDIRECT_FRAME: usize =
    PAGE_SIZE / core::mem::size_of::<BlkifRequestSegment>();
/// Protocol upper bound on the segments of one indirect request (8 pages of 512 segments);
/// a backend advertises its own, smaller `feature-max-indirect-segments`.
pub const BLKIF_MAX_INDIRECT_SEGMENTS: usize =
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME;
/// Sector size of the protocol, in bytes.
pub const BLKIF_SECTOR_SIZE: u64 = 512;
/// Sectors in one 4 KiB segment page.
pub const BLKIF_SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / BLKIF_SECTOR_SIZE) as u8;

/// Discard flag: the discard must be secure (discard-secure).
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// The operation was not supported (barrier or discard).
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
/// The operation failed.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// The operation succeeded.
pub const BLKIF_RSP_OKAY: i16 = 0;

/// `info` bit: CD-ROM.
pub const VDISK_CDROM: u32 = 0x1;
/// `info` bit: removable medium.
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `info` bit: read-only.
pub const VDISK_READONLY: u32 = 0x4;

/// `protocol` xenstore value of the native x86_32 ABI.
pub const XEN_IO_PROTO_ABI_X86_32: &str = "x86_32-abi";
/// `protocol` xenstore value of the native x86_64 ABI.
pub const XEN_IO_PROTO_ABI_X86_64: &str = "x86_64-abi";

/// `struct blkif_request_segment`: one granted page and the sectors of it to transfer.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BlkifRequestSegment {
    /// Grant reference of the data page.
    pub gref: u32,
    /// First sector in the page (inclusive, 0..=7).
    pub first_sect: u8,
    /// Last sector in the page (inclusive, first_sect..=7).
    pub last_sect: u8,
    /// Explicit padding (implicit in C).
    pub _pad: [u8; 2],
}

/// `struct blkif_request` (native x86_64 layout): read, write, barrier, flush.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BlkifRequest {
    /// BLKIF_OP_*.
    pub operation: u8,
    /// Number of valid entries in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: BlkifVdev,
    /// Explicit padding (implicit in C).
    pub _pad: [u8; 4],
    /// Guest cookie, echoed in the response.
    pub id: u64,
    /// First sector on disk.
    pub sector_number: BlkifSector,
    /// The segments.
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_request_discard` (native x86_64 layout).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BlkifRequestDiscard {
    /// BLKIF_OP_DISCARD.
    pub operation: u8,
    /// BLKIF_DISCARD_SECURE or 0.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: BlkifVdev,
    /// Explicit padding (implicit in C).
    pub _pad: [u8; 4],
    /// Guest cookie.
    pub id: u64,
    /// First sector to discard.
    pub sector_number: BlkifSector,
    /// Number of sectors to discard.
    pub nr_sectors: u64,
}

/// `struct blkif_request_indirect` (native x86_64 layout).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BlkifRequestIndirect {
    /// BLKIF_OP_INDIRECT.
    pub operation: u8,
    /// The real operation (BLKIF_OP_READ or BLKIF_OP_WRITE).
    pub indirect_op: u8,
    /// Number of segments, spread over the indirect pages.
    pub nr_segments: u16,
    /// Explicit padding (implicit in C).
    pub _pad0: [u8; 4],
    /// Guest cookie.
    pub id: u64,
    /// First sector.
    pub sector_number: BlkifSector,
    /// Virtual device handle.
    pub handle: BlkifVdev,
    /// Explicit padding (implicit in C).
    pub _pad1: [u8; 2],
    /// Grant references of the pages holding the segment arrays.
    pub indirect_grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Explicit tail padding (implicit in C).
    pub _pad2: [u8; 4],
}

/// `struct blkif_response` (native x86_64 layout).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BlkifResponse {
    /// Copied from the request.
    pub id: u64,
    /// Copied from the request.
    pub operation: u8,
    /// Explicit padding (implicit in C).
    pub _pad0: u8,
    /// BLKIF_RSP_*.
    pub status: i16,
    /// Explicit tail padding (implicit in C).
    pub _pad1: [u8; 4],
}

/// `struct blkif_x86_32_request`: the read/write request of a 32-bit frontend. 64-bit fields
/// are 4-byte aligned, so `id` is at offset 4 and the whole request is 108 bytes.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkifX86_32Request {
    /// BLKIF_OP_*.
    pub operation: u8,
    /// Number of valid entries in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: BlkifVdev,
    /// Guest cookie.
    pub id: u64,
    /// First sector.
    pub sector_number: BlkifSector,
    /// The segments.
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_x86_32_request_discard` (32-bit frontend).
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkifX86_32RequestDiscard {
    /// BLKIF_OP_DISCARD.
    pub operation: u8,
    /// BLKIF_DISCARD_SECURE or 0.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: BlkifVdev,
    /// Guest cookie.
    pub id: u64,
    /// First sector.
    pub sector_number: BlkifSector,
    /// Number of sectors.
    pub nr_sectors: u64,
}

/// `struct blkif_x86_32_request_indirect` (32-bit frontend; 64 bytes).
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkifX86_32RequestIndirect {
    /// BLKIF_OP_INDIRECT.
    pub operation: u8,
    /// BLKIF_OP_READ or BLKIF_OP_WRITE.
    pub indirect_op: u8,
    /// Number of segments.
    pub nr_segments: u16,
    /// Guest cookie.
    pub id: u64,
    /// First sector.
    pub sector_number: BlkifSector,
    /// Virtual device handle.
    pub handle: BlkifVdev,
    /// Padding.
    pub _pad1: u16,
    /// Grant references of the indirect pages.
    pub indirect_grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Padding to 64 bytes.
    pub _pad2: u64,
}

/// `struct blkif_x86_32_response` (32-bit frontend; 12 bytes).
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkifX86_32Response {
    /// Copied from the request.
    pub id: u64,
    /// Copied from the request.
    pub operation: u8,
    /// Explicit padding.
    pub _pad0: u8,
    /// BLKIF_RSP_*.
    pub status: i16,
}

/// `struct blkif_x86_64_request`: identical to the native layout on x86_64.
pub type BlkifX86_64Request = BlkifRequest;
/// `struct blkif_x86_64_request_discard`.
pub type BlkifX86_64RequestDiscard = BlkifRequestDiscard;
/// `struct blkif_x86_64_request_indirect`.
pub type BlkifX86_64RequestIndirect = BlkifRequestIndirect;
/// `struct blkif_x86_64_response`.
pub type BlkifX86_64Response = BlkifResponse;

/// Slot size of a native (x86_64) blkif ring.
pub const BLKIF_SLOT_SIZE: usize = slot_size(
    core::mem::size_of::<BlkifRequest>(),
    core::mem::align_of::<BlkifRequest>(),
    core::mem::size_of::<BlkifResponse>(),
    core::mem::align_of::<BlkifResponse>(),
);
/// Slot size of an x86_32-abi blkif ring.
pub const BLKIF_X86_32_SLOT_SIZE: usize = slot_size(
    core::mem::size_of::<BlkifX86_32Request>(),
    core::mem::align_of::<BlkifX86_32Request>(),
    core::mem::size_of::<BlkifX86_32Response>(),
    core::mem::align_of::<BlkifX86_32Response>(),
);
/// Requests in a one-page native blkif ring (`__CONST_RING_SIZE(blkif, 4096)`).
pub const BLKIF_RING_SIZE_1PAGE: u32 = ring_entries(PAGE_SIZE, BLKIF_SLOT_SIZE);

impl BlkifRequest {
    /// This (private) copy of a slot read as a discard request (`operation` is
    /// BLKIF_OP_DISCARD).
    pub fn as_discard(&self) -> BlkifRequestDiscard {
        BlkifRequestDiscard::read_from_prefix(self.as_bytes())
            .map(|(v, _)| v)
            .unwrap_or_default()
    }
    /// This copy read as an indirect request (`operation` is BLKIF_OP_INDIRECT).
    pub fn as_indirect(&self) -> BlkifRequestIndirect {
        BlkifRequestIndirect::read_from_prefix(self.as_bytes())
            .map(|(v, _)| v)
            .unwrap_or_default()
    }
}

impl BlkifX86_32Request {
    /// This copy of a 32-bit slot read as a discard request.
    pub fn as_discard(&self) -> BlkifX86_32RequestDiscard {
        BlkifX86_32RequestDiscard::read_from_prefix(self.as_bytes())
            .map(|(v, _)| v)
            .unwrap_or_default()
    }
    /// This copy of a 32-bit slot read as an indirect request.
    pub fn as_indirect(&self) -> BlkifX86_32RequestIndirect {
        BlkifX86_32RequestIndirect::read_from_prefix(self.as_bytes())
            .map(|(v, _)| v)
            .unwrap_or_default()
    }
}

impl BlkifX86_32Request {
    /// Converts to the native layout (field by field, from a private copy).
    pub fn to_native(&self) -> BlkifRequest {
        BlkifRequest {
            operation: self.operation,
            nr_segments: self.nr_segments,
            handle: self.handle,
            _pad: [0; 4],
            id: self.id,
            sector_number: self.sector_number,
            seg: self.seg,
        }
    }
}

impl BlkifX86_32RequestDiscard {
    /// Converts to the native layout.
    pub fn to_native(&self) -> BlkifRequestDiscard {
        BlkifRequestDiscard {
            operation: self.operation,
            flag: self.flag,
            handle: self.handle,
            _pad: [0; 4],
            id: self.id,
            sector_number: self.sector_number,
            nr_sectors: self.nr_sectors,
        }
    }
}

impl BlkifX86_32RequestIndirect {
    /// Converts to the native layout.
    pub fn to_native(&self) -> BlkifRequestIndirect {
        BlkifRequestIndirect {
            operation: self.operation,
            indirect_op: self.indirect_op,
            nr_segments: self.nr_segments,
            _pad0: [0; 4],
            id: self.id,
            sector_number: self.sector_number,
            handle: self.handle,
            _pad1: [0; 2],
            indirect_grefs: self.indirect_grefs,
            _pad2: [0; 4],
        }
    }
}

impl BlkifX86_32Response {
    /// Converts a native response to the 32-bit layout.
    pub fn from_native(r: &BlkifResponse) -> Self {
        BlkifX86_32Response {
            id: r.id,
            operation: r.operation,
            _pad0: 0,
            status: r.status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn test_blkif_sizes_native_and_x86_32_match_protocol() {
        assert_eq!(size_of::<BlkifRequest>(), 112);
        assert_eq!(size_of::<BlkifResponse>(), 16);
        assert_eq!(size_of::<BlkifRequestIndirect>(), 64);
        assert_eq!(size_of::<BlkifX86_32Request>(), 108);
        assert_eq!(size_of::<BlkifX86_32Response>(), 12);
        assert_eq!(size_of::<BlkifX86_32RequestIndirect>(), 64);
        assert_eq!(offset_of!(BlkifX86_32Request, id), 4);
        assert_eq!(offset_of!(BlkifX86_32Request, seg), 20);
        assert_eq!(BLKIF_RING_SIZE_1PAGE, 32);
        assert_eq!(BLKIF_SEGS_PER_INDIRECT_FRAME, 512);
    }

    #[test]
    fn test_request_views_read_discard_and_indirect_fields() {
        let d = BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            flag: BLKIF_DISCARD_SECURE,
            handle: 1,
            _pad: [0; 4],
            id: 5,
            sector_number: 64,
            nr_sectors: 128,
        };
        let mut slot = BlkifRequest::default();
        slot.as_mut_bytes()[..32].copy_from_slice(d.as_bytes());
        let mut slot32 = BlkifX86_32Request::default();
        let i32v = BlkifX86_32RequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: BLKIF_OP_READ,
            nr_segments: 300,
            indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        };
        slot32.as_mut_bytes()[..64].copy_from_slice(i32v.as_bytes());

        let got = slot.as_discard();
        let got32 = slot32.as_indirect();

        assert_eq!(got, d);
        assert_eq!({ got32.nr_segments }, 300);
        assert_eq!({ got32.indirect_grefs }, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn test_x86_32_request_to_native_keeps_fields() {
        let mut r = BlkifX86_32Request {
            operation: BLKIF_OP_WRITE,
            nr_segments: 2,
            handle: 51712,
            id: 0x1122_3344_5566_7788,
            sector_number: 99,
            ..Default::default()
        };
        r.seg[1] = BlkifRequestSegment {
            gref: 7,
            first_sect: 1,
            last_sect: 6,
            _pad: [0; 2],
        };
        let n = r.to_native();
        assert_eq!(n.id, 0x1122_3344_5566_7788);
        assert_eq!(n.sector_number, 99);
        assert_eq!(n.seg[1].gref, 7);
        assert_eq!(n.handle, 51712);
    }
}

//! xen/grant_table.h: v1 grant entries, GTF_* flags and GNTST_* status codes.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `grant_entry_v1_t`: one entry of a domain's v1 grant table.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GrantEntryV1 {
    /// GTF_* flags.
    pub flags: u16,
    /// The domain being granted access.
    pub domid: u16,
    /// The frame (GTF_permit_access) or the frame to transfer.
    pub frame: u32,
}

/// Byte offset of `flags` in [`GrantEntryV1`].
pub const GNTTAB_ENTRY_FLAGS_OFFSET: usize = 0;
/// Size of a v1 entry.
pub const GRANT_ENTRY_V1_SIZE: usize = 8;

/// Type field: invalid entry.
pub const GTF_INVALID: u16 = 0;
/// Type field: grant access to a frame.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// Type field: accept a transfer.
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// Type field: transitive grant (v2 only).
pub const GTF_TRANSITIVE: u16 = 3;
/// Mask of the type field.
pub const GTF_TYPE_MASK: u16 = 3;
/// The grantee may only map read-only.
pub const GTF_READONLY: u16 = 1 << 2;
/// Set by Xen while the grantee has the frame mapped or is copying from it.
pub const GTF_READING: u16 = 1 << 3;
/// Set by Xen while the grantee has the frame mapped writable or is copying to it.
pub const GTF_WRITING: u16 = 1 << 4;
/// Caching attribute bits (PAT/PCD/PWT), shift.
pub const GTF_PWT: u16 = 1 << 5;
/// Caching attribute: PCD.
pub const GTF_PCD: u16 = 1 << 6;
/// Caching attribute: PAT.
pub const GTF_PAT: u16 = 1 << 7;
/// Sub-page grant (v2 only).
pub const GTF_SUB_PAGE: u16 = 1 << 8;

/// Operation succeeded.
pub const GNTST_OKAY: i16 = 0;
/// Undefined error.
pub const GNTST_GENERAL_ERROR: i16 = -1;
/// Unrecognised domain id.
pub const GNTST_BAD_DOMAIN: i16 = -2;
/// Unrecognised or inappropriate grant reference.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// Unrecognised or inappropriate handle.
pub const GNTST_BAD_HANDLE: i16 = -4;
/// Inappropriate virtual address to map.
pub const GNTST_BAD_VIRT_ADDR: i16 = -5;
/// Inappropriate device address to unmap.
pub const GNTST_BAD_DEV_ADDR: i16 = -6;
/// Out of space in the I/O MMU.
pub const GNTST_NO_DEVICE_SPACE: i16 = -7;
/// Not enough privilege for the operation.
pub const GNTST_PERMISSION_DENIED: i16 = -8;
/// Specified page was invalid for the operation.
pub const GNTST_BAD_PAGE: i16 = -9;
/// A copy crossed a page boundary.
pub const GNTST_BAD_COPY_ARG: i16 = -10;
/// Transfer page address too large.
pub const GNTST_ADDRESS_TOO_BIG: i16 = -11;
/// Operation was not completed (try again).
pub const GNTST_EAGAIN: i16 = -12;
/// Out of space (grant table full or similar).
pub const GNTST_NO_SPACE: i16 = -13;

/// The name Xen's GNTTABOP_error_msgs gives a status code.
pub fn gntst_name(status: i16) -> &'static str {
    match status {
        GNTST_OKAY => "okay",
        GNTST_GENERAL_ERROR => "undefined error",
        GNTST_BAD_DOMAIN => "unrecognised domain id",
        GNTST_BAD_GNTREF => "invalid grant reference",
        GNTST_BAD_HANDLE => "invalid mapping handle",
        GNTST_BAD_VIRT_ADDR => "invalid virtual address",
        GNTST_BAD_DEV_ADDR => "invalid device address",
        GNTST_NO_DEVICE_SPACE => "no spare translation slot in the I/O MMU",
        GNTST_PERMISSION_DENIED => "permission denied",
        GNTST_BAD_PAGE => "bad page",
        GNTST_BAD_COPY_ARG => "copy arguments cross page boundary",
        GNTST_ADDRESS_TOO_BIG => "page address size too large",
        GNTST_EAGAIN => "operation not done; try again",
        GNTST_NO_SPACE => "out of space",
        _ => "unknown status",
    }
}

/// GNTTABOP_copy flag bit: the source is a grant reference.
pub const _GNTCOPY_SOURCE_GREF: u16 = 0;
/// GNTTABOP_copy flag: the source is a grant reference (else a local frame).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << _GNTCOPY_SOURCE_GREF;
/// GNTTABOP_copy flag bit: the destination is a grant reference.
pub const _GNTCOPY_DEST_GREF: u16 = 1;
/// GNTTABOP_copy flag: the destination is a grant reference (else a local frame).
pub const GNTCOPY_DEST_GREF: u16 = 1 << _GNTCOPY_DEST_GREF;

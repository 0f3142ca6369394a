//! xen/io/xs_wire.h: the xenstore wire protocol.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `struct xsd_sockmsg`: the header in front of every xenstore message (host byte order).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XsdSockmsg {
    /// `enum xsd_sockmsg_type`.
    pub type_: u32,
    /// Echoed back in the reply; chosen by the client.
    pub req_id: u32,
    /// Transaction id, 0 for none.
    pub tx_id: u32,
    /// Length of the payload that follows.
    pub len: u32,
}

/// Size of [`XsdSockmsg`].
pub const XSD_SOCKMSG_SIZE: usize = 16;

/// `enum xsd_sockmsg_type`, as in Xen 4.17 (XS_RESTRICT, 20, was removed).
#[allow(missing_docs)]
pub mod msg {
    pub const XS_CONTROL: u32 = 0;
    pub const XS_DEBUG: u32 = XS_CONTROL;
    pub const XS_DIRECTORY: u32 = 1;
    pub const XS_READ: u32 = 2;
    pub const XS_GET_PERMS: u32 = 3;
    pub const XS_WATCH: u32 = 4;
    pub const XS_UNWATCH: u32 = 5;
    pub const XS_TRANSACTION_START: u32 = 6;
    pub const XS_TRANSACTION_END: u32 = 7;
    pub const XS_INTRODUCE: u32 = 8;
    pub const XS_RELEASE: u32 = 9;
    pub const XS_GET_DOMAIN_PATH: u32 = 10;
    pub const XS_WRITE: u32 = 11;
    pub const XS_MKDIR: u32 = 12;
    pub const XS_RM: u32 = 13;
    pub const XS_SET_PERMS: u32 = 14;
    pub const XS_WATCH_EVENT: u32 = 15;
    pub const XS_ERROR: u32 = 16;
    pub const XS_IS_DOMAIN_INTRODUCED: u32 = 17;
    pub const XS_RESUME: u32 = 18;
    pub const XS_SET_TARGET: u32 = 19;
    pub const XS_RESET_WATCHES: u32 = XS_SET_TARGET + 2;
    pub const XS_DIRECTORY_PART: u32 = 22;
    pub const XS_TYPE_COUNT: u32 = 23;
    pub const XS_INVALID: u32 = 0xffff;
}

/// The errors xenstored sends as the payload of XS_ERROR, with their errno values
/// (`xsd_errors[]`, in the header's order).
pub const XSD_ERRORS: &[(&str, i32)] = &[
    ("EINVAL", libc::EINVAL),
    ("EACCES", libc::EACCES),
    ("EEXIST", libc::EEXIST),
    ("EISDIR", libc::EISDIR),
    ("ENOENT", libc::ENOENT),
    ("ENOMEM", libc::ENOMEM),
    ("ENOSPC", libc::ENOSPC),
    ("EIO", libc::EIO),
    ("ENOTEMPTY", libc::ENOTEMPTY),
    ("ENOSYS", libc::ENOSYS),
    ("EROFS", libc::EROFS),
    ("EBUSY", libc::EBUSY),
    ("EAGAIN", libc::EAGAIN),
    ("EISCONN", libc::EISCONN),
    ("E2BIG", libc::E2BIG),
    ("EPERM", libc::EPERM),
];

/// The errno for an XS_ERROR payload (without its NUL); unknown names map to EINVAL, as libxs.
pub fn errno_of(name: &str) -> i32 {
    XSD_ERRORS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(libc::EINVAL, |(_, e)| *e)
}

/// The XS_ERROR name for an errno; unknown errnos map to "EINVAL".
pub fn name_of(errno: i32) -> &'static str {
    XSD_ERRORS
        .iter()
        .find(|(_, e)| *e == errno)
        .map_or("EINVAL", |(n, _)| n)
}

/// `enum xs_watch_type`: index of the path in a watch event's payload.
pub const XS_WATCH_PATH: usize = 0;
/// Index of the token in a watch event's payload.
pub const XS_WATCH_TOKEN: usize = 1;

/// Largest payload of a message.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Longest absolute path.
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// Longest relative path.
pub const XENSTORE_REL_PATH_MAX: usize = 2048;
/// Size of each ring of the xenstore shared page.
pub const XENSTORE_RING_SIZE: usize = 1024;

/// `struct xenstore_domain_interface`: the page a guest shares with xenstored.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct XenstoreDomainInterface {
    /// Requests to xenstored.
    pub req: [u8; XENSTORE_RING_SIZE],
    /// Replies and watch events.
    pub rsp: [u8; XENSTORE_RING_SIZE],
    /// Request consumer index.
    pub req_cons: u32,
    /// Request producer index.
    pub req_prod: u32,
    /// Response consumer index.
    pub rsp_cons: u32,
    /// Response producer index.
    pub rsp_prod: u32,
    /// Features the server offers (XENSTORE_SERVER_FEATURE_*).
    pub server_features: u32,
    /// XENSTORE_CONNECTED or XENSTORE_RECONNECT.
    pub connection: u32,
    /// XENSTORE_ERROR_* set by the server.
    pub error: u32,
}

/// Write-mode strings of the legacy XS_WRITE flags.
pub const XS_WRITE_NONE: &str = "NONE";
/// See [`XS_WRITE_NONE`].
pub const XS_WRITE_CREATE: &str = "CREATE";
/// See [`XS_WRITE_NONE`].
pub const XS_WRITE_CREATE_EXCL: &str = "CREATE|EXCL";

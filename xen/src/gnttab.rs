//! Grant tables: mapping and copying pages that another domain granted to us.

use crate::mem::SharedMem;
use crate::{DomId, GrantRef, Port};

/// Errors from grant-table operations.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// Xen refused to map a grant; `status` is the GNTST_* code.
    #[error("mapping grant ref {gref} of dom{domid} failed: GNTST {status} ({})", crate::abi::grant_table::gntst_name(*status))]
    Map {
        /// Granting domain.
        domid: DomId,
        /// The first reference that failed.
        gref: GrantRef,
        /// GNTST_* status.
        status: i16,
    },
    /// The device or hypercall failed as a whole.
    #[error("grant {op} for dom{domid} failed: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// Granting domain.
        domid: DomId,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be expressed (too many refs, segment crosses a page).
    #[error("invalid grant request: {0}")]
    Invalid(&'static str),
}

/// A contiguous mapping of granted pages (page `i` is `refs[i]`). Dropping it unmaps them.
#[derive(Debug)]
pub struct GrantMapping {
    mem: SharedMem,
    domid: DomId,
    token: u64,
}

impl GrantMapping {
    /// Builds a mapping; `token` identifies it to the [`GrantTables`] that made it.
    pub fn new(mem: SharedMem, domid: DomId, token: u64) -> Self {
        GrantMapping { mem, domid, token }
    }
    /// The mapped memory.
    pub fn mem(&self) -> &SharedMem {
        &self.mem
    }
    /// The granting domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }
    /// Implementation-defined identity of the mapping (the gntdev index on Linux).
    pub fn token(&self) -> u64 {
        self.token
    }
    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.mem.len() / crate::PAGE_SIZE
    }
}

/// The local side of one grant-copy segment.
#[derive(Debug)]
pub enum CopyDir<'a> {
    /// Copy from the granted page into this buffer.
    FromGuest(&'a mut [u8]),
    /// Copy this buffer into the granted page.
    ToGuest(&'a [u8]),
}

/// One segment of a batched grant copy (GNTTABOP_copy with one side local).
#[derive(Debug)]
pub struct CopySegment<'a> {
    /// Granting domain.
    pub domid: DomId,
    /// Grant reference.
    pub gref: GrantRef,
    /// Offset inside the granted page; `offset + len` must be ≤ 4096.
    pub offset: u16,
    /// Local buffer and direction; its length is the copy length.
    pub local: CopyDir<'a>,
    /// Set by [`GrantTables::copy`]: GNTST_okay (0) or the failure code.
    pub status: i16,
}

/// One handle onto the grant-table device (`/dev/xen/gntdev`).
pub trait GrantTables: Send + Sync {
    /// Maps `refs` from `domid` into one contiguous mapping, read-only unless `writable`.
    /// All or nothing: if any ref fails, nothing stays mapped and the error names it.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<GrantMapping, GrantError>;
    /// Asks that, when `mapping` is unmapped (also when this process dies), the byte at
    /// `clear_byte` is zeroed and/or an event is sent on `port` (IOCTL_GNTDEV_SET_UNMAP_NOTIFY).
    fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        clear_byte: Option<usize>,
        port: Option<Port>,
    ) -> Result<(), GrantError>;
    /// Batched grant copy. Each segment's `status` is set; the call fails as a whole only if
    /// the batch could not be issued at all.
    fn copy(&self, segs: &mut [CopySegment<'_>]) -> Result<(), GrantError>;
}

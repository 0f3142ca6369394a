//! Foreign memory: mapping another domain's frames (privcmd), as a device model does.

use crate::mem::SharedMem;
use crate::{DomId, Gfn};

/// Errors from foreign mapping.
#[derive(Debug, thiserror::Error)]
pub enum ForeignError {
    /// One frame could not be mapped (IOCTL_PRIVCMD_MMAPBATCH_V2 per-frame error).
    #[error("mapping gfn {gfn:#x} of dom{domid} failed: errno {errno}")]
    Frame {
        /// Domain.
        domid: DomId,
        /// The first frame that failed.
        gfn: Gfn,
        /// Its error (positive errno).
        errno: i32,
    },
    /// The call failed as a whole.
    #[error("foreign {op} for dom{domid} failed: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// Domain.
        domid: DomId,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The handle is restricted to another domain.
    #[error("privcmd handle is restricted to dom{restricted}; refused dom{requested}")]
    Restricted {
        /// The domain the handle is restricted to.
        restricted: DomId,
        /// The domain asked for.
        requested: DomId,
    },
}

/// A mappable resource (XENMEM_acquire_resource).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// XENMEM_resource_ioreq_server with this server id: frame 0 is the buffered ioreq page,
    /// frame 1 (and on) the synchronous ioreq page.
    IoreqServer(u16),
    /// XENMEM_resource_grant_table (id 0 = shared frames).
    GrantTable,
}

impl Resource {
    /// The XENMEM_resource_* type and the id.
    pub fn type_and_id(self) -> (u32, u32) {
        match self {
            Resource::IoreqServer(id) => (0, u32::from(id)),
            Resource::GrantTable => (1, 0),
        }
    }
}

/// One handle onto foreign mapping (`/dev/xen/privcmd`).
pub trait ForeignMemory: Send + Sync {
    /// Maps guest frames `gfns` of `domid` contiguously. All or nothing.
    fn map(&self, domid: DomId, gfns: &[Gfn], writable: bool) -> Result<SharedMem, ForeignError>;
    /// Maps `nr_frames` frames of a resource starting at `frame` (IOCTL_PRIVCMD_MMAP_RESOURCE).
    fn map_resource(
        &self,
        domid: DomId,
        res: Resource,
        frame: u64,
        nr_frames: u64,
    ) -> Result<SharedMem, ForeignError>;
    /// Limits this handle to `domid` (IOCTL_PRIVCMD_RESTRICT). It cannot be undone.
    fn restrict(&self, domid: DomId) -> Result<(), ForeignError>;
    /// The most frames one [`ForeignMemory::map`] call takes; callers mapping more split
    /// the run into several mappings.
    fn max_map_frames(&self) -> usize {
        usize::MAX
    }
}

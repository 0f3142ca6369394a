//! [`LinuxGnttab`]: grant mapping and copying through `/dev/xen/gntdev`.
//!
//! The device's semantics (drivers/xen/gntdev.c): IOCTL_GNTDEV_MAP_GRANT_REF only reserves
//! the refs and returns an mmap offset (`index`); the grant map hypercall happens in `mmap` at
//! that offset, read-only unless the mapping is PROT_WRITE, and fails as a whole (EINVAL) if
//! any ref fails, without saying which. Unmapping is `munmap` then
//! IOCTL_GNTDEV_UNMAP_GRANT_REF. IOCTL_GNTDEV_SET_UNMAP_NOTIFY takes a byte offset inside a
//! mapping (index + offset).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use super::sys::{self, GntdevMapping, Mmap};
use super::uapi::{IoctlGntdevUnmapNotify, UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT};
use crate::abi::grant_table::GNTST_OKAY;
use crate::gnttab::{CopyDir, CopySegment, GrantError, GrantMapping, GrantTables};
use crate::{DomId, GrantRef, Port, PAGE_SIZE};

/// Most refs mapped in one call: the kernel's default gntdev limit is far larger, but a
/// backend never needs more than a ring (16 pages) or an indirect batch; this bounds the
/// argument buffer.
pub const MAX_MAP_REFS: usize = 1 << 16;

/// One open of `/dev/xen/gntdev`.
#[derive(Debug)]
pub struct LinuxGnttab {
    fd: Arc<OwnedFd>,
    path: String,
}

impl LinuxGnttab {
    /// Wraps an open gntdev device.
    pub(crate) fn from_file(file: File, path: String) -> Self {
        LinuxGnttab {
            fd: Arc::new(OwnedFd::from(file)),
            path,
        }
    }

    /// The device path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn os(op: &'static str, domid: DomId, source: io::Error) -> GrantError {
        GrantError::Os { op, domid, source }
    }

    /// After a failed mmap: find the first ref Xen refuses, by a one-byte grant copy from
    /// each, so that the error names the ref and its GNTST code.
    fn diagnose(&self, domid: DomId, refs: &[GrantRef]) -> Option<(GrantRef, i16)> {
        let mut bufs = vec![[0u8; 1]; refs.len()];
        let mut segs: Vec<CopySegment<'_>> = refs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(r, b)| CopySegment {
                domid,
                gref: *r,
                offset: 0,
                local: CopyDir::FromGuest(b),
                status: GNTST_OKAY,
            })
            .collect();
        sys::gntdev_grant_copy(self.fd.as_fd(), &mut segs).ok()?;
        segs.iter()
            .find(|s| s.status != GNTST_OKAY)
            .map(|s| (s.gref, s.status))
    }
}

/// Checks a copy batch before it reaches the kernel (which would fail the whole batch).
pub(crate) fn validate_copy(segs: &[CopySegment<'_>]) -> Result<(), GrantError> {
    for s in segs {
        let len = match &s.local {
            CopyDir::FromGuest(b) => b.len(),
            CopyDir::ToGuest(b) => b.len(),
        };
        if len == 0 {
            return Err(GrantError::Invalid("grant copy segment of zero bytes"));
        }
        match usize::from(s.offset).checked_add(len) {
            Some(end) if end <= PAGE_SIZE => {}
            _ => {
                return Err(GrantError::Invalid(
                    "grant copy segment crosses the end of the granted page",
                ))
            }
        }
    }
    Ok(())
}

impl GrantTables for LinuxGnttab {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<GrantMapping, GrantError> {
        if refs.is_empty() {
            return Err(GrantError::Invalid("no grant references to map"));
        }
        if refs.len() > MAX_MAP_REFS {
            return Err(GrantError::Invalid(
                "too many grant references in one mapping",
            ));
        }
        let count = refs.len() as u32;
        let len = refs.len() * PAGE_SIZE;
        let index = sys::gntdev_map_grant_ref(self.fd.as_fd(), domid, refs)
            .map_err(|e| Self::os("map_grant_ref", domid, e))?;
        match Mmap::new(self.fd.as_fd(), len, writable, index) {
            Ok(map) => {
                let mem = GntdevMapping::into_shared_mem(map, Arc::clone(&self.fd), index, count);
                Ok(GrantMapping::new(mem, domid, index))
            }
            Err(e) => {
                if let Err(u) = sys::gntdev_unmap_grant_ref(self.fd.as_fd(), index, count) {
                    tracing::warn!(domid, index, error = %u, "gntdev unmap after failed mmap failed");
                }
                match self.diagnose(domid, refs) {
                    Some((gref, status)) => Err(GrantError::Map {
                        domid,
                        gref,
                        status,
                    }),
                    None => Err(Self::os("mmap", domid, e)),
                }
            }
        }
    }

    fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        clear_byte: Option<usize>,
        port: Option<Port>,
    ) -> Result<(), GrantError> {
        let mut action = 0;
        let offset = match clear_byte {
            Some(off) if off < mapping.mem().len() => {
                action |= UNMAP_NOTIFY_CLEAR_BYTE;
                off
            }
            Some(_) => {
                return Err(GrantError::Invalid(
                    "unmap-notify byte is outside the mapping",
                ))
            }
            None => 0,
        };
        if port.is_some() {
            action |= UNMAP_NOTIFY_SEND_EVENT;
        }
        if action == 0 {
            return Ok(());
        }
        let mut arg = IoctlGntdevUnmapNotify {
            index: mapping.token().saturating_add(offset as u64),
            action,
            event_channel_port: port.unwrap_or(0),
        };
        sys::gntdev_set_unmap_notify(self.fd.as_fd(), &mut arg)
            .map_err(|e| Self::os("set_unmap_notify", mapping.domid(), e))
    }

    fn copy(&self, segs: &mut [CopySegment<'_>]) -> Result<(), GrantError> {
        let Some(first) = segs.first() else {
            return Ok(());
        };
        let domid = first.domid;
        validate_copy(segs)?;
        sys::gntdev_grant_copy(self.fd.as_fd(), segs).map_err(|e| Self::os("grant_copy", domid, e))
    }
}

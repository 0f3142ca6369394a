//! Every ioctl, mmap and raw pointer of the Linux implementation.
//!
//! The rest of `linux` is safe code built on these wrappers. Each wrapper takes Rust
//! references or slices, fills the uapi struct (turning addresses into the `u64`s the kernel
//! reads) and makes exactly one system call per `unsafe` block.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::raw::{c_int, c_ulong, c_void};
use std::sync::Arc;

use zerocopy::{FromBytes, IntoBytes};

use super::uapi::{
    GntdevCopyPtr, GntdevGrantCopySegment, IoctlGntdevGrantCopy, IoctlGntdevGrantRef,
    IoctlGntdevMapGrantRef, IoctlGntdevUnmapGrantRef, IoctlGntdevUnmapNotify, PrivcmdDmOp,
    PrivcmdDmOpBuf, PrivcmdMmapResource, PrivcmdMmapbatchV2, GNTDEV_MAP_GRANT_REF_REFS_OFFSET,
    IOCTL_GNTDEV_GRANT_COPY, IOCTL_GNTDEV_MAP_GRANT_REF, IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
    IOCTL_GNTDEV_UNMAP_GRANT_REF, IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_MMAPBATCH_V2,
    IOCTL_PRIVCMD_MMAP_RESOURCE, IOCTL_PRIVCMD_RESTRICT,
};
use crate::abi::grant_table::{GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF};
use crate::gnttab::{CopyDir, CopySegment};
use crate::mem::SharedMem;
use crate::{DomId, GrantRef};

fn check(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An ioctl whose argument is a plain struct the kernel reads and may write back.
/// Returns the ioctl's non-negative result (a port number for the evtchn binds).
pub(super) fn ioctl_struct<T: IntoBytes + FromBytes>(
    fd: BorrowedFd<'_>,
    req: c_ulong,
    arg: &mut T,
) -> io::Result<c_int> {
    let ptr: *mut T = arg;
    // SAFETY: `ptr` points to a live, exclusively borrowed `T` whose layout is the uapi struct
    // that `req` is defined with (checked by tests/layout.rs); the kernel reads and writes at
    // most size_of::<T>() bytes, all plain integers for which any bit pattern is valid.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, ptr) })
}

/// An ioctl without an argument (IOCTL_EVTCHN_RESET).
pub(super) fn ioctl_none(fd: BorrowedFd<'_>, req: c_ulong) -> io::Result<c_int> {
    // SAFETY: the request takes no argument, so the kernel dereferences nothing of ours.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, 0usize) })
}

/// A shared mapping of a device file, unmapped on drop.
#[derive(Debug)]
pub(super) struct Mmap {
    addr: usize,
    len: usize,
    writable: bool,
}

impl Mmap {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-only unless `writable`.
    pub(super) fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        writable: bool,
        offset: u64,
    ) -> io::Result<Mmap> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new mapping at an address the kernel chooses; no existing memory of this
        // process is touched. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            addr: p as usize,
            len,
            writable,
        })
    }

    /// Start address, as the kernel's uapi structs carry it.
    pub(super) fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping this value made and owns; once it is dropped
        // nothing refers to it (a SharedMem over it owns this value and is being dropped).
        unsafe { libc::munmap(self.addr as *mut c_void, self.len) };
    }
}

impl Mmap {
    /// Turns this mapping into a [`SharedMem`] that unmaps it when dropped.
    pub(super) fn into_shared_mem(self) -> SharedMem {
        let (addr, len, writable) = (self.addr, self.len, self.writable);
        // SAFETY: `addr..addr+len` is the mapping `self` made, readable and writable iff
        // `writable`; `self` becomes the SharedMem's owner, so it stays mapped until then.
        unsafe { SharedMem::from_raw(addr as *mut u8, len, writable, Box::new(self)) }
    }
}

// ---------------------------------------------------------------------------------------------
// gntdev

/// IOCTL_GNTDEV_MAP_GRANT_REF for `refs` of `domid`; returns the mmap offset (`index`).
pub(super) fn gntdev_map_grant_ref(
    fd: BorrowedFd<'_>,
    domid: DomId,
    refs: &[GrantRef],
) -> io::Result<u64> {
    let count = u32::try_from(refs.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // The argument is the header followed by `count` grant refs: build it in a u64 buffer so
    // that `index` is 8-byte aligned.
    let bytes = GNTDEV_MAP_GRANT_REF_REFS_OFFSET + refs.len() * 8;
    let words = bytes.div_ceil(8).max(3);
    // Common batches (up to 64 refs: a blkif request or an indirect page's worth) use the
    // stack; only larger ones allocate.
    let mut stack = [0u64; 3 + 64];
    let mut heap = Vec::new();
    let buf: &mut [u64] = if words <= stack.len() {
        &mut stack[..words]
    } else {
        heap.resize(words, 0u64);
        &mut heap
    };
    {
        let b = buf.as_mut_bytes();
        b[0..4].copy_from_slice(&count.to_ne_bytes());
        for (i, r) in refs.iter().enumerate() {
            let e = IoctlGntdevGrantRef {
                domid: u32::from(domid),
                ref_: *r,
            };
            let at = GNTDEV_MAP_GRANT_REF_REFS_OFFSET + i * 8;
            b[at..at + 8].copy_from_slice(e.as_bytes());
        }
    }
    let ptr = buf.as_mut_ptr();
    // SAFETY: `buf` is a live, aligned buffer holding struct ioctl_gntdev_map_grant_ref with
    // `count` refs following it, exactly as many bytes as the kernel reads (16 + 8 * count);
    // the kernel writes only `index` (bytes 8..16) back.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, ptr) })?;
    let (hdr, _) = IoctlGntdevMapGrantRef::read_from_prefix(buf.as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(hdr.index)
}

/// IOCTL_GNTDEV_UNMAP_GRANT_REF.
pub(super) fn gntdev_unmap_grant_ref(fd: BorrowedFd<'_>, index: u64, count: u32) -> io::Result<()> {
    let mut arg = IoctlGntdevUnmapGrantRef {
        index,
        count,
        pad: 0,
    };
    ioctl_struct(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg).map(drop)
}

/// IOCTL_GNTDEV_SET_UNMAP_NOTIFY.
pub(super) fn gntdev_set_unmap_notify(
    fd: BorrowedFd<'_>,
    arg: &mut IoctlGntdevUnmapNotify,
) -> io::Result<()> {
    ioctl_struct(fd, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, arg).map(drop)
}

/// IOCTL_GNTDEV_GRANT_COPY over `segs` (already validated by the caller); sets each
/// segment's `status`.
pub(super) fn gntdev_grant_copy(
    fd: BorrowedFd<'_>,
    segs: &mut [CopySegment<'_>],
) -> io::Result<()> {
    // Up to 64 segments on the stack (the hot path); larger batches allocate.
    const STACK_SEGS: usize = 64;
    let mut stack = [GntdevGrantCopySegment::default(); STACK_SEGS];
    let mut heap = Vec::new();
    let raw: &mut [GntdevGrantCopySegment] = if segs.len() <= STACK_SEGS {
        &mut stack[..segs.len()]
    } else {
        heap.resize(segs.len(), GntdevGrantCopySegment::default());
        &mut heap
    };
    for (slot, seg) in raw.iter_mut().zip(segs.iter_mut()) {
        *slot = {
            let s = seg;
            let foreign = GntdevCopyPtr::foreign(s.gref, s.offset, s.domid);
            match &mut s.local {
                CopyDir::FromGuest(buf) => GntdevGrantCopySegment {
                    source: foreign,
                    dest: GntdevCopyPtr::virt(buf.as_mut_ptr() as u64),
                    len: buf.len() as u16,
                    flags: GNTCOPY_SOURCE_GREF,
                    status: 0,
                    _pad: 0,
                },
                CopyDir::ToGuest(buf) => GntdevGrantCopySegment {
                    source: GntdevCopyPtr::virt(buf.as_ptr() as u64),
                    dest: foreign,
                    len: buf.len() as u16,
                    flags: GNTCOPY_DEST_GREF,
                    status: 0,
                    _pad: 0,
                },
            }
        };
    }
    let count = u32::try_from(raw.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut arg = IoctlGntdevGrantCopy {
        count,
        _pad: 0,
        segments: raw.as_mut_ptr() as u64,
    };
    let ptr: *mut IoctlGntdevGrantCopy = &mut arg;
    // SAFETY: `arg` points to `count` live segments in `raw`; each `virt` address is a buffer
    // borrowed from `segs` (mutably for FromGuest, which the kernel writes) of exactly `len`
    // bytes, all alive for the duration of the call. The kernel writes back only `status`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, ptr) })?;
    for (s, r) in segs.iter_mut().zip(raw.iter()) {
        s.status = r.status;
    }
    Ok(())
}

/// The owner of a gntdev mapping: unmaps the memory, then releases the grants.
#[derive(Debug)]
pub(super) struct GntdevMapping {
    map: Option<Mmap>,
    fd: Arc<OwnedFd>,
    index: u64,
    count: u32,
}

impl GntdevMapping {
    /// The [`SharedMem`] of a gntdev mapping: dropping it unmaps `map`, then releases the
    /// grants (`index`, `count`) on `fd`, as libxengnttab does.
    pub(super) fn into_shared_mem(
        map: Mmap,
        fd: Arc<OwnedFd>,
        index: u64,
        count: u32,
    ) -> SharedMem {
        let (addr, len, writable) = (map.addr, map.len, map.writable);
        let owner = GntdevMapping {
            map: Some(map),
            fd,
            index,
            count,
        };
        // SAFETY: `addr..addr+len` is the mapping `owner.map` made, readable and writable iff
        // `writable`; `owner` becomes the SharedMem's owner and unmaps it only when dropped.
        unsafe { SharedMem::from_raw(addr as *mut u8, len, writable, Box::new(owner)) }
    }
}

impl Drop for GntdevMapping {
    fn drop(&mut self) {
        drop(self.map.take());
        if let Err(e) =
            gntdev_unmap_grant_ref(std::os::fd::AsFd::as_fd(&*self.fd), self.index, self.count)
        {
            tracing::warn!(index = self.index, count = self.count, error = %e, "gntdev unmap_grant_ref failed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// privcmd

/// IOCTL_PRIVCMD_MMAPBATCH_V2: fills `map` (a fresh privcmd mapping of `gfns.len()` pages)
/// with `gfns` of `dom`. Per-frame results (0 or -errno) land in `errs`. An `Err` means the
/// call failed as a whole; `ENOENT` means some frames are paged out (see `errs`).
pub(super) fn privcmd_mmapbatch_v2(
    fd: BorrowedFd<'_>,
    dom: DomId,
    map: &Mmap,
    gfns: &[u64],
    errs: &mut [i32],
) -> io::Result<()> {
    let num = u32::try_from(gfns.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    if errs.len() != gfns.len() || map.len() != gfns.len() * crate::PAGE_SIZE {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut arg = PrivcmdMmapbatchV2 {
        num,
        dom,
        _pad: 0,
        addr: map.addr(),
        arr: gfns.as_ptr() as u64,
        err: errs.as_mut_ptr() as u64,
    };
    let ptr: *mut PrivcmdMmapbatchV2 = &mut arg;
    // SAFETY: `arr` and `err` point to `num` live u64s and i32s (lengths checked above); the
    // kernel reads `arr` and writes `err` only. `addr` is a privcmd mapping of exactly `num`
    // pages that this process owns; the kernel replaces its pages with the foreign frames.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_PRIVCMD_MMAPBATCH_V2, ptr) }).map(drop)
}

/// IOCTL_PRIVCMD_MMAP_RESOURCE into `map` (a fresh privcmd mapping of `num` pages).
pub(super) fn privcmd_mmap_resource(
    fd: BorrowedFd<'_>,
    map: &Mmap,
    mut arg: PrivcmdMmapResource,
) -> io::Result<()> {
    if arg.num.checked_mul(crate::PAGE_SIZE as u64) != Some(map.len() as u64) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    arg.addr = map.addr();
    ioctl_struct(fd, IOCTL_PRIVCMD_MMAP_RESOURCE, &mut arg).map(drop)
}

/// IOCTL_PRIVCMD_DM_OP with `bufs` as the hypercall's buffers (Xen may write OUT fields back).
pub(super) fn privcmd_dm_op(
    fd: BorrowedFd<'_>,
    dom: DomId,
    bufs: &mut [&mut [u8]],
) -> io::Result<()> {
    let num = u16::try_from(bufs.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut ubufs: Vec<PrivcmdDmOpBuf> = bufs
        .iter_mut()
        .map(|b| PrivcmdDmOpBuf {
            uptr: b.as_mut_ptr() as u64,
            size: b.len() as u64,
        })
        .collect();
    let mut arg = PrivcmdDmOp {
        dom,
        num,
        _pad: 0,
        ubufs: ubufs.as_mut_ptr() as u64,
    };
    let ptr: *mut PrivcmdDmOp = &mut arg;
    // SAFETY: `ubufs` holds `num` descriptors of live, exclusively borrowed byte buffers of
    // the stated sizes; the kernel reads the descriptors and lets Xen read and write the
    // buffers during the call only.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_PRIVCMD_DM_OP, ptr) }).map(drop)
}

/// IOCTL_PRIVCMD_RESTRICT.
pub(super) fn privcmd_restrict(fd: BorrowedFd<'_>, domid: DomId) -> io::Result<()> {
    let mut d = domid;
    ioctl_struct(fd, IOCTL_PRIVCMD_RESTRICT, &mut d).map(drop)
}

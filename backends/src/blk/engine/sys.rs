//! Every `unsafe` operation of the storage engines: vectored I/O on raw segment addresses,
//! io_uring submissions, block-device ioctls and `statx`.
//!
//! The common safety argument for segment memory: an [`IoSeg`] holds an `Arc` of its mapping
//! and was bounds-checked when built, so `addr()..addr()+len()` is mapped for as long as the
//! segment lives. The engines keep every segment of a request inside the engine (in an io_uring
//! slot or a worker's job) until the kernel has finished with the operation, and only then
//! hand the segment vector back, emptied, in a `Completion`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::IoSeg;

/// A reusable iovec array describing a request's segments.
#[derive(Default)]
pub(crate) struct IoVecs {
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs only carry addresses of segments whose owners (`IoSeg`, `Send + Sync`
// through their `Arc<dyn IoMem>`) live beside them in the same slot or job; the pointers are
// never dereferenced by Rust code, only handed to the kernel.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// An array with room for `n` segments.
    pub(crate) fn with_capacity(n: usize) -> IoVecs {
        IoVecs {
            iov: Vec::with_capacity(n),
        }
    }

    /// Describes `segs` (replacing what was there).
    pub(crate) fn fill(&mut self, segs: &[IoSeg]) {
        self.iov.clear();
        self.iov.extend(segs.iter().map(|s| libc::iovec {
            iov_base: s.addr().cast(),
            iov_len: s.len(),
        }));
    }

    /// Drops the first `n` bytes (after a short transfer).
    pub(crate) fn advance(&mut self, mut n: usize) {
        let mut skip = 0;
        for v in &mut self.iov {
            if n == 0 {
                break;
            }
            if n >= v.iov_len {
                n -= v.iov_len;
                skip += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        self.iov.drain(..skip);
    }

    /// Forgets all addresses.
    pub(crate) fn clear(&mut self) {
        self.iov.clear();
    }

    /// Entries handed to one system call: at most IOV_MAX (1024). A longer request transfers
    /// in pieces; callers treat the piece as a short transfer and go on with the rest.
    fn count(&self) -> usize {
        self.iov.len().min(IOV_MAX)
    }

    /// Segments still described.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.iov.len()
    }
}

/// Linux's UIO_MAXIOV.
const IOV_MAX: usize = 1024;

fn ret(r: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// `preadv` into the segments described by `iov` (which the caller keeps alive with their
/// `IoSeg`s for the duration of the call).
pub(crate) fn preadv(fd: BorrowedFd<'_>, iov: &IoVecs, offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
    let n = iov.count() as libc::c_int;
    // SAFETY: every iovec points into a live, bounds-checked, writable segment mapping (IoSeg
    // refuses read-only mappings for device writes) owned by the caller until this returns.
    let r = unsafe { libc::preadv(fd.as_raw_fd(), iov.iov.as_ptr(), n, off) };
    ret(r)
}

/// `pwritev` from the segments described by `iov`.
pub(crate) fn pwritev(fd: BorrowedFd<'_>, iov: &IoVecs, offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
    let n = iov.count() as libc::c_int;
    // SAFETY: every iovec points into a live, bounds-checked segment mapping owned by the
    // caller until this returns; the kernel only reads it.
    let r = unsafe { libc::pwritev(fd.as_raw_fd(), iov.iov.as_ptr(), n, off) };
    ret(r)
}

/// Queues a `readv` (or `writev` when `write`) on the ring, or with `plain` and one segment a
/// `read` (`write`) of it. The caller keeps `iov` and the segments it describes alive until the
/// completion with `user_data` is reaped.
pub(crate) fn push_rw(
    ring: &mut IoUring,
    fd: BorrowedFd<'_>,
    iov: &IoVecs,
    offset: u64,
    write: bool,
    user_data: u64,
    plain: bool,
) -> Result<(), squeue::PushError> {
    let n = iov.count() as u32;
    let fd = types::Fd(fd.as_raw_fd());
    let one = match iov.iov.as_slice() {
        [one] if plain => u32::try_from(one.iov_len)
            .ok()
            .map(|len| (one.iov_base, len)),
        _ => None,
    };
    let sqe = if let Some((base, len)) = one {
        if write {
            opcode::Write::new(fd, base.cast::<u8>().cast_const(), len)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, base.cast::<u8>(), len)
                .offset(offset)
                .build()
        }
    } else if write {
        opcode::Writev::new(fd, iov.iov.as_ptr(), n)
            .offset(offset)
            .build()
    } else {
        opcode::Readv::new(fd, iov.iov.as_ptr(), n)
            .offset(offset)
            .build()
    }
    .user_data(user_data);
    let mut sq = ring.submission();
    // SAFETY: the iovec array (or, for a plain read/write, the one segment it describes) and
    // the segment memory it points to are owned by the engine's slot `user_data`, which is
    // neither reused nor dropped until this entry's completion has been reaped (the engine's
    // Drop waits for all in-flight entries). The fd outlives the ring.
    unsafe { sq.push(&sqe) }
}

/// Queues an `fdatasync` on the ring.
pub(crate) fn push_fdatasync(
    ring: &mut IoUring,
    fd: BorrowedFd<'_>,
    user_data: u64,
) -> Result<(), squeue::PushError> {
    let sqe = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(user_data);
    let mut sq = ring.submission();
    // SAFETY: an fsync entry references no memory; the fd outlives the ring.
    unsafe { sq.push(&sqe) }
}

/// `IORING_ENTER_GETEVENTS` (include/uapi/linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// `io_uring_enter(fd, 0, 0, IORING_ENTER_GETEVENTS)`: submits nothing and waits for nothing,
/// but runs the ring's deferred completion work (`IORING_SETUP_DEFER_TASKRUN`), which only
/// an enter carrying GETEVENTS does.
pub(crate) fn run_deferred_completions(ring: &IoUring) -> io::Result<usize> {
    // SAFETY: no argument structure is passed (`None`) and nothing is submitted, so the
    // kernel reads no memory of ours; it only posts completions into the rings it mapped.
    unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
    }
}

const BLK: u8 = 0x12;

/// `BLKGETSIZE64`: a block device's size in bytes.
pub(crate) fn blk_size(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    let req = nix::request_code_read!(BLK, 114, std::mem::size_of::<libc::size_t>());
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn blk_int(f: &File, nr: u8) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    let req = nix::request_code_none!(BLK, nr);
    // SAFETY: BLKSSZGET/BLKPBSZGET write one int through the pointer, which points to `v`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `BLKSSZGET`: logical sector size.
pub(crate) fn blk_logical_sector(f: &File) -> io::Result<u32> {
    blk_int(f, 104)
}

/// `BLKPBSZGET`: physical sector size.
pub(crate) fn blk_physical_sector(f: &File) -> io::Result<u32> {
    blk_int(f, 123)
}

fn blk_range(f: &File, nr: u8, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    let req = nix::request_code_none!(BLK, nr);
    // SAFETY: BLKDISCARD/BLKSECDISCARD read two u64s through the pointer, which points to
    // `range`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, range.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BLKDISCARD` of `len` bytes at `offset`.
pub(crate) fn blk_discard(f: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range(f, 119, offset, len)
}

/// `BLKSECDISCARD` of `len` bytes at `offset`.
pub(crate) fn blk_secure_discard(f: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range(f, 125, offset, len)
}

/// O_DIRECT alignment `(memory, offset)` from `statx(STATX_DIOALIGN)`, or `None` where the
/// kernel or file system does not report it (or does not support O_DIRECT on this file).
pub(crate) fn dio_alignment(f: &File) -> Option<(u32, u32)> {
    // SAFETY: `statx` is plain old data (integers and padding); all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string (AT_EMPTY_PATH: the fd itself)
    // and `stx` is a valid, writable statx buffer.
    let r = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_mem_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// A `struct flock` for `len` bytes at `start` (whence SEEK_SET), of type `ty`.
pub(crate) fn flock(ty: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: `flock` is plain old data (integers and, on some architectures, padding);
    // all-zero is a valid value.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ty as libc::c_short;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = start;
    f.l_len = len;
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::engine::IoMem;
    use std::sync::Arc;
    use xen::SharedMem;

    #[test]
    fn test_iovecs_advance_skips_whole_and_partial_segments() {
        // Arrange
        let m: Arc<dyn IoMem> = Arc::new(SharedMem::anonymous(8192).unwrap());
        let segs = vec![
            IoSeg::new(m.clone(), 0, 512, true).unwrap(),
            IoSeg::new(m.clone(), 1024, 1024, true).unwrap(),
            IoSeg::new(m.clone(), 4096, 4096, true).unwrap(),
        ];
        let mut v = IoVecs::with_capacity(3);
        v.fill(&segs);
        // Act
        v.advance(512 + 100);
        // Assert
        assert_eq!(v.len(), 2);
        assert_eq!(v.iov[0].iov_len, 924);
        assert_eq!(v.iov[0].iov_base as usize, segs[1].addr() as usize + 100);
        v.advance(924 + 4096);
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn test_iovecs_count_caps_at_iov_max() {
        // Arrange
        let m: Arc<dyn IoMem> = Arc::new(SharedMem::anonymous(4096).unwrap());
        let segs: Vec<IoSeg> = (0..1500)
            .map(|_| IoSeg::new(m.clone(), 0, 512, true).unwrap())
            .collect();
        let mut v = IoVecs::with_capacity(0);
        // Act
        v.fill(&segs);
        // Assert
        assert_eq!((v.len(), v.count()), (1500, IOV_MAX));
    }
}

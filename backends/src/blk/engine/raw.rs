//! The raw engine: a regular file or a block device, byte for byte.
//!
//! Mechanisms: io_uring (reads, writes, flushes; one `io_uring_enter` per `kick`) with one
//! helper thread for discards and write-zeroes, or, when io_uring cannot be set up (seccomp,
//! old kernel) or is refused by [`Mechanism::ThreadPool`], a pool of worker threads doing
//! `preadv`/`pwritev`/`fdatasync`/`fallocate`/ioctls. Both signal one eventfd.
//!
//! O_DIRECT: the image is opened with O_DIRECT when asked for and the file system allows it
//! (otherwise buffered, with the reason logged). O_DIRECT needs the memory address, offset and
//! length aligned to the alignment `statx(STATX_DIOALIGN)` reports (for block devices: the
//! logical block size). A request that is not aligned (a blkif segment may start at any
//! sector of a page; a 4 KiB-sector device gets 512-byte requests) goes to a second, buffered
//! descriptor of the same file instead of a bounce buffer: no copy by us, no allocation, and
//! the kernel keeps the page cache coherent with direct I/O on the same range (direct I/O
//! writes back and invalidates the cached range first).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::Arc;

use nix::fcntl::FallocateFlags;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::lock::{lock_image, ImageLock};
use super::null::validate;
use super::pool::{Job, Pool};
use super::sys::{self, IoVecs};
use super::uring::{TaskRun, Uring};
use super::{
    Completion, Engine, EngineError, EngineInfo, IoOp, IoRequest, IoSeg, MAX_QUEUE_DEPTH,
    MAX_THREADS,
};

/// How the raw engine does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mechanism {
    /// io_uring if it can be set up, else the thread pool; the environment variable
    /// `DOMIO_BLK_MECHANISM` (`io_uring` or `thread-pool`) overrides this.
    #[default]
    Auto,
    /// io_uring or fail.
    IoUring,
    /// Worker threads.
    ThreadPool,
}

/// How to open a raw image.
#[derive(Debug, Clone)]
pub struct RawOptions {
    /// Requests in flight at once.
    pub queue_depth: u32,
    /// I/O mechanism.
    pub mechanism: Mechanism,
    /// Try O_DIRECT.
    pub direct: bool,
    /// Worker threads for the thread-pool mechanism.
    pub pool_threads: usize,
    /// Take QEMU-compatible image locks (see `lock`): refuse an image another process writes.
    pub lock: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            queue_depth: 64,
            mechanism: Mechanism::Auto,
            direct: true,
            pool_threads: 8,
            lock: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Block,
}

/// The image's descriptors.
pub(crate) struct Files {
    path: String,
    main: File,
    /// A buffered descriptor for requests not aligned for O_DIRECT (`None` when `main` is
    /// buffered itself).
    buffered: Option<File>,
    kind: Kind,
    mem_align: usize,
    off_align: u64,
}

impl Files {
    pub(crate) fn main(&self) -> &File {
        &self.main
    }

    /// Whether a separate buffered descriptor exists (the main one is O_DIRECT).
    pub(crate) fn has_buffered(&self) -> bool {
        self.buffered.is_some()
    }

    pub(crate) fn pick(&self, buffered: bool) -> &File {
        match (&self.buffered, buffered) {
            (Some(b), true) => b,
            _ => &self.main,
        }
    }

    /// Whether `req` must avoid the O_DIRECT descriptor.
    fn needs_buffered(&self, req: &IoRequest) -> bool {
        self.buffered.is_some()
            && (!req.offset.is_multiple_of(self.off_align)
                || req.segs.iter().any(|s| !self.seg_aligned(s)))
    }

    fn seg_aligned(&self, s: &IoSeg) -> bool {
        (s.addr() as usize).is_multiple_of(self.mem_align)
            && (s.len() as u64).is_multiple_of(self.off_align)
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn nix_errno(e: nix::Error) -> i32 {
    e as i32
}

/// Does one request synchronously (the thread pool's work). Returns the byte count or errno.
pub(crate) fn execute(
    files: &Files,
    buffered: bool,
    req: &IoRequest,
    iov: &mut IoVecs,
) -> Result<u64, i32> {
    let mut f = files.pick(buffered);
    match req.op {
        IoOp::Read | IoOp::Write => {
            let total: u64 = req.segs.iter().map(|s| s.len() as u64).sum();
            iov.fill(&req.segs);
            let mut done = 0u64;
            let mut direct = !buffered && files.has_buffered();
            while done < total {
                let r = if req.op == IoOp::Read {
                    sys::preadv(f.as_fd(), iov, req.offset + done)
                } else {
                    sys::pwritev(f.as_fd(), iov, req.offset + done)
                };
                match r {
                    Ok(0) => return Err(libc::EIO),
                    Ok(n) => {
                        done += n as u64;
                        iov.advance(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if direct && e.raw_os_error() == Some(libc::EFAULT) => {
                        // Memory O_DIRECT cannot pin: continue through the page cache.
                        direct = false;
                        f = files.pick(true);
                    }
                    Err(e) => return Err(errno(&e)),
                }
            }
            if req.op == IoOp::Write && req.fua {
                files.main.sync_data().map_err(|e| errno(&e))?;
            }
            Ok(total)
        }
        IoOp::Flush => files.main.sync_data().map(|()| 0).map_err(|e| errno(&e)),
        IoOp::Discard => {
            match files.kind {
                Kind::File => fallocate(
                    &files.main,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    req.offset,
                    req.len,
                )?,
                Kind::Block => {
                    sys::blk_discard(&files.main, req.offset, req.len).map_err(|e| errno(&e))?
                }
            }
            Ok(req.len)
        }
        IoOp::SecureDiscard => match files.kind {
            Kind::File => Err(libc::EOPNOTSUPP),
            Kind::Block => sys::blk_secure_discard(&files.main, req.offset, req.len)
                .map(|()| req.len)
                .map_err(|e| errno(&e)),
        },
        IoOp::WriteZeroes => {
            let zr = fallocate(
                &files.main,
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                req.offset,
                req.len,
            );
            match zr {
                Ok(()) => {}
                Err(libc::EOPNOTSUPP) | Err(libc::EINVAL) | Err(libc::ENODEV) => {
                    write_zeroes(files, req.offset, req.len)?
                }
                Err(e) => return Err(e),
            }
            if req.fua {
                files.main.sync_data().map_err(|e| errno(&e))?;
            }
            Ok(req.len)
        }
    }
}

fn fallocate(f: &File, flags: FallocateFlags, offset: u64, len: u64) -> Result<(), i32> {
    let off = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
    let len = libc::off_t::try_from(len).map_err(|_| libc::EINVAL)?;
    nix::fcntl::fallocate(f.as_raw_fd(), flags, off, len).map_err(nix_errno)
}

/// Writes zeroes the slow way (file systems without ZERO_RANGE), through the buffered
/// descriptor so the zero buffer needs no alignment.
fn write_zeroes(files: &Files, mut offset: u64, len: u64) -> Result<(), i32> {
    static ZEROES: [u8; 65536] = [0; 65536];
    let f = files.pick(true);
    let end = offset + len;
    while offset < end {
        let n = usize::try_from((end - offset).min(ZEROES.len() as u64)).unwrap_or(ZEROES.len());
        f.write_all_at(&ZEROES[..n], offset)
            .map_err(|e| errno(&e))?;
        offset += n as u64;
    }
    Ok(())
}

fn open_file(path: &str, read_only: bool, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    o.custom_flags(flags).open(path)
}

/// A block device's major:minor.
fn dev_numbers(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// Reads a block device queue attribute (for a partition, its disk's).
fn queue_attr(rdev: u64, name: &str) -> Option<u64> {
    let (ma, mi) = dev_numbers(rdev);
    ["queue", "../queue"].iter().find_map(|q| {
        std::fs::read_to_string(format!("/sys/dev/block/{ma}:{mi}/{q}/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

/// See the module docs.
pub struct RawEngine {
    // Field order is drop order: the ring and the pool wait for in-flight I/O before the
    // descriptors and the eventfd go.
    uring: Option<Uring>,
    /// The thread pool (all requests) or, with io_uring, the helper for the rest.
    pool: Pool,
    deferred: Vec<Job>,
    info: EngineInfo,
    files: Arc<Files>,
    efd: Arc<EventFd>,
    done: VecDeque<Completion>,
    signal: bool,
    in_flight: usize,
    _lock: Option<Arc<ImageLock>>,
}

impl std::fmt::Debug for RawEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEngine")
            .field("info", &self.info)
            .finish()
    }
}

impl RawEngine {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: &str, read_only: bool, opts: &RawOptions) -> Result<RawEngine, EngineError> {
        let open_err = |what, source| EngineError::Open {
            what,
            path: path.to_string(),
            source,
        };
        let probe = open_file(path, true, false).map_err(|e| open_err("open image", e))?;
        let meta = probe.metadata().map_err(|e| open_err("stat image", e))?;
        let kind = if meta.file_type().is_block_device() {
            Kind::Block
        } else if meta.file_type().is_file() {
            Kind::File
        } else {
            return Err(EngineError::Config {
                path: path.to_string(),
                why: "not a regular file or a block device".into(),
            });
        };
        drop(probe);
        let lock = if opts.lock {
            Some(lock_image(path, !read_only)?)
        } else {
            None
        };

        let (main, buffered, mem_align, off_align) = if opts.direct {
            Self::open_direct(path, read_only, kind)?
        } else {
            let f = open_file(path, read_only, false).map_err(|e| open_err("open image", e))?;
            (f, None, 1, 1)
        };

        // The path was opened twice: make sure both opens found the same file.
        let now = main.metadata().map_err(|e| open_err("stat image", e))?;
        if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
            return Err(EngineError::Config {
                path: path.to_string(),
                why: "the path was replaced while it was being opened".into(),
            });
        }
        let (capacity, logical, physical, discard, secure) = match kind {
            Kind::File => (now.len(), 512, 4096, Some(4096), false),
            Kind::Block => {
                let size = sys::blk_size(&main).map_err(|e| open_err("BLKGETSIZE64", e))?;
                let l = sys::blk_logical_sector(&main).map_err(|e| open_err("BLKSSZGET", e))?;
                let p = sys::blk_physical_sector(&main).unwrap_or(l);
                let max = queue_attr(meta.rdev(), "discard_max_bytes").unwrap_or(0);
                let gran = queue_attr(meta.rdev(), "discard_granularity").unwrap_or(0);
                let discard = (max > 0).then(|| u32::try_from(gran).unwrap_or(0));
                (size, l, p, discard, discard.is_some())
            }
        };

        let efd = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| open_err("eventfd", e.into()))?,
        );
        let depth = opts.queue_depth.clamp(1, MAX_QUEUE_DEPTH);
        let mechanism = match (
            opts.mechanism,
            std::env::var("DOMIO_BLK_MECHANISM").as_deref(),
        ) {
            (Mechanism::Auto, Ok("thread-pool")) => Mechanism::ThreadPool,
            (Mechanism::Auto, Ok("io_uring")) => Mechanism::IoUring,
            (m, _) => m,
        };
        let uring = match mechanism {
            Mechanism::ThreadPool => None,
            Mechanism::IoUring => {
                Some(Uring::new(depth, &efd).map_err(|e| open_err("set up io_uring for", e))?)
            }
            Mechanism::Auto => match Uring::new(depth, &efd) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!(path, error = %e, "io_uring unavailable; using the thread pool");
                    None
                }
            },
        };
        let threads = if uring.is_some() {
            1
        } else {
            opts.pool_threads.clamp(1, MAX_THREADS)
        };
        let pool = Pool::new(threads, efd.clone(), "blk-io")?;
        let describe = format!(
            "raw {} {}{} {}",
            if let Some(u) = &uring {
                match u.taskrun() {
                    TaskRun::Deferred => "io_uring(deferred)".to_string(),
                    TaskRun::Immediate => "io_uring".to_string(),
                }
            } else {
                format!("thread-pool({threads})")
            },
            if buffered.is_some() {
                "O_DIRECT"
            } else {
                "buffered"
            },
            if kind == Kind::Block { " blockdev" } else { "" },
            path
        );
        Ok(RawEngine {
            info: EngineInfo {
                capacity,
                logical_sector: logical,
                physical_sector: physical,
                read_only,
                discard: if read_only { None } else { discard },
                secure_discard: secure && !read_only,
                volatile_cache: true,
                queue_depth: depth,
                describe,
            },
            files: Arc::new(Files {
                path: path.to_string(),
                main,
                buffered,
                kind,
                mem_align,
                off_align,
            }),
            efd,
            uring,
            pool,
            deferred: Vec::with_capacity(depth as usize),
            done: VecDeque::with_capacity(depth as usize),
            signal: false,
            in_flight: 0,
            _lock: lock,
        })
    }

    /// Opens with O_DIRECT plus a buffered descriptor, or only buffered if O_DIRECT is refused.
    #[allow(clippy::type_complexity)]
    fn open_direct(
        path: &str,
        read_only: bool,
        kind: Kind,
    ) -> Result<(File, Option<File>, usize, u64), EngineError> {
        let open_err = |source| EngineError::Open {
            what: "open image",
            path: path.to_string(),
            source,
        };
        let buffered = open_file(path, read_only, false).map_err(open_err)?;
        let direct = match open_file(path, read_only, true) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path, error = %e, "O_DIRECT refused by the file system; using buffered I/O");
                return Ok((buffered, None, 1, 1));
            }
        };
        let same = |a: &File, b: &File| match (a.metadata(), b.metadata()) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        if !same(&direct, &buffered) {
            return Err(EngineError::Config {
                path: path.to_string(),
                why: "the path was replaced while it was being opened".into(),
            });
        }
        let (mem, off) = match (sys::dio_alignment(&direct), kind) {
            (Some((m, o)), _) => (m, o),
            (None, Kind::Block) => {
                let l = sys::blk_logical_sector(&direct).map_err(open_err)?;
                (l, l)
            }
            // Unknown (kernel before 6.1): assume the strictest common alignment.
            (None, Kind::File) => (4096, 4096),
        };
        if mem == 0 || off == 0 {
            tracing::warn!(
                path,
                "file system reports no O_DIRECT support; using buffered I/O"
            );
            return Ok((buffered, None, 1, 1));
        }
        tracing::debug!(path, mem, off, "O_DIRECT alignment");
        Ok((direct, Some(buffered), mem as usize, u64::from(off)))
    }

    /// Whether requests go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// Whether the io_uring runs its completion work deferred, in one batch per reap
    /// (`IORING_SETUP_DEFER_TASKRUN`, Linux 6.1+).
    pub fn uring_deferred(&self) -> bool {
        self.uring
            .as_ref()
            .is_some_and(|u| u.taskrun() == TaskRun::Deferred)
    }

    /// Whether the main descriptor is O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.files.buffered.is_some()
    }

    /// The O_DIRECT alignment (memory, offset) in force (1, 1 when buffered).
    pub fn direct_alignment(&self) -> (usize, u64) {
        (self.files.mem_align, self.files.off_align)
    }

    #[cfg(test)]
    pub(crate) fn set_direct_alignment_for_test(&mut self, mem: usize, off: u64) {
        if let Some(f) = Arc::get_mut(&mut self.files) {
            f.mem_align = mem;
            f.off_align = off;
        }
    }

    fn fail(&mut self, mut req: IoRequest, errno: i32) {
        req.segs.clear();
        self.done.push_back(Completion {
            tag: req.tag,
            result: Err(errno),
            segs: req.segs,
        });
        self.signal = true;
    }
}

impl Engine for RawEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn queue(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight >= self.info.queue_depth as usize {
            return Err(req);
        }
        self.in_flight += 1;
        let total = match validate(&self.info, &req) {
            Ok(n) => n,
            Err(errno) => {
                self.fail(req, errno);
                return Ok(());
            }
        };
        let buffered = self.files.needs_buffered(&req);
        match (&mut self.uring, req.op) {
            (Some(u), IoOp::Read | IoOp::Write | IoOp::Flush) => {
                if let Err((req, errno)) = u.start(&self.files, req, buffered, total) {
                    self.fail(req, errno);
                }
            }
            _ => self.deferred.push(Job {
                req,
                files: self.files.clone(),
                buffered,
            }),
        }
        Ok(())
    }

    fn kick(&mut self) -> Result<(), EngineError> {
        for job in self.deferred.drain(..) {
            self.pool.submit(job);
        }
        // Requests that already finished (refused at queue time) are signalled even if the
        // submission below fails: the ring thread reaps only when the descriptor says so.
        if std::mem::take(&mut self.signal) {
            self.efd.write(1).map_err(|e| EngineError::Io {
                op: "eventfd write",
                source: e.into(),
            })?;
        }
        if let Some(u) = &mut self.uring {
            u.submit().map_err(|source| EngineError::Io {
                op: "io_uring submit",
                source,
            })?;
        }
        Ok(())
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, EngineError> {
        // Reset the eventfd first: anything finishing after this signals it again.
        let _ = self.efd.read();
        let before = out.len();
        out.extend(self.done.drain(..));
        self.pool.drain(out);
        let resubmit = match &mut self.uring {
            Some(u) => u.reap(&self.files, out).map(|_| ()),
            None => Ok(()),
        };
        // Count what was reaped even if resubmitting the rest failed.
        let n = out.len() - before;
        self.in_flight = self.in_flight.saturating_sub(n);
        resubmit.map_err(|source| EngineError::Io {
            op: "io_uring submit",
            source,
        })?;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn refresh_capacity(&mut self) -> Result<u64, EngineError> {
        let err = |what, source| EngineError::Open {
            what,
            path: self.files.path.clone(),
            source,
        };
        let cap = match self.files.kind {
            Kind::File => self
                .files
                .main
                .metadata()
                .map_err(|e| err("stat image", e))?
                .len(),
            Kind::Block => sys::blk_size(&self.files.main).map_err(|e| err("BLKGETSIZE64", e))?,
        };
        self.info.capacity = cap;
        Ok(cap)
    }
}

impl Drop for RawEngine {
    fn drop(&mut self) {
        // Jobs never kicked still hold their segments; the pool and ring wait for the rest.
        self.deferred.clear();
        if let Some(u) = &self.uring {
            if u.busy() > 0 {
                tracing::debug!(busy = u.busy(), path = %self.files.path, "waiting for in-flight I/O");
            }
        }
        tracing::trace!(threads = self.pool.threads(), "raw engine closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::engine::IoMem;
    use xen::SharedMem;

    fn run(e: &mut RawEngine, r: IoRequest) -> Completion {
        e.queue(r).unwrap();
        e.kick().unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            let mut fds = [nix::poll::PollFd::new(
                e.completion_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
            assert!(n > 0, "no completion within 10 s");
            e.reap(&mut out).unwrap();
        }
        out.remove(0)
    }

    #[test]
    fn test_raw_engine_unaligned_for_direct_goes_buffered_and_round_trips() {
        for mech in [Mechanism::IoUring, Mechanism::ThreadPool] {
            // Arrange: pretend the file system needs 4 KiB alignment, as on a 4Kn disk.
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("d.img");
            std::fs::write(&p, vec![0xAAu8; 1 << 20]).unwrap();
            let opts = RawOptions {
                queue_depth: 4,
                mechanism: mech,
                direct: true,
                pool_threads: 1,
                lock: false,
            };
            let mut e = RawEngine::open(p.to_str().unwrap(), false, &opts).unwrap();
            assert!(e.is_direct());
            e.set_direct_alignment_for_test(4096, 4096);
            let m: Arc<SharedMem> = Arc::new(SharedMem::anonymous(8192).unwrap());
            m.write(512, &[0x5Au8; 1536]).unwrap();
            let mk = |tag, op, dw| IoRequest {
                tag,
                op,
                offset: 512,
                len: 0,
                segs: vec![IoSeg::new(m.clone() as Arc<dyn IoMem>, 512, 1536, dw).unwrap()],
                fua: false,
            };
            let w = mk(1, IoOp::Write, false);
            assert!(e.files.needs_buffered(&w));
            // Act
            let wc = run(&mut e, w);
            m.fill(512, 1536, 0).unwrap();
            let rc = run(&mut e, mk(2, IoOp::Read, true));
            // Assert
            assert_eq!((wc.result, rc.result), (Ok(1536), Ok(1536)), "{mech:?}");
            let mut b = vec![0u8; 1536];
            m.read(512, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == 0x5A), "{mech:?}");
            let disk = std::fs::read(&p).unwrap();
            assert!(disk[..512].iter().all(|&x| x == 0xAA));
            assert!(disk[512..2048].iter().all(|&x| x == 0x5A));
            assert!(disk[2048..4096].iter().all(|&x| x == 0xAA));
        }
    }

    #[test]
    fn test_raw_engine_aligned_request_uses_direct_descriptor() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![0u8; 65536]).unwrap();
        let e = RawEngine::open(p.to_str().unwrap(), false, &RawOptions::default()).unwrap();
        let m: Arc<SharedMem> = Arc::new(SharedMem::anonymous(8192).unwrap());
        let (mem_align, off_align) = e.direct_alignment();
        // Act
        let r = IoRequest {
            tag: 1,
            op: IoOp::Read,
            offset: off_align,
            len: 0,
            segs: vec![IoSeg::new(m as Arc<dyn IoMem>, 4096, 4096, true).unwrap()],
            fua: false,
        };
        // Assert
        assert!(mem_align <= 4096 && off_align <= 4096);
        assert!(!e.files.needs_buffered(&r));
    }

    #[test]
    fn test_write_zeroes_fallback_zeroes_range_across_chunks() {
        // Arrange: the path taken where fallocate(ZERO_RANGE) is refused.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.img");
        std::fs::write(&p, vec![0xEEu8; 256 * 1024]).unwrap();
        let e = RawEngine::open(p.to_str().unwrap(), false, &RawOptions::default()).unwrap();
        // Act
        let r = write_zeroes(&e.files, 512, 140 * 1024);
        // Assert
        assert_eq!(r, Ok(()));
        let disk = std::fs::read(&p).unwrap();
        assert!(disk[..512].iter().all(|&b| b == 0xEE));
        assert!(disk[512..512 + 140 * 1024].iter().all(|&b| b == 0));
        assert!(disk[512 + 140 * 1024..].iter().all(|&b| b == 0xEE));
    }
}

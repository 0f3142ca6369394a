//! The qcow2 engine, on the `imago` crate (its native synchronous API, feature `sync`), with
//! backing chains opened from the image headers (a qcow2 or raw base is only ever opened
//! read-only, so a guest's writes land in the overlay).
//!
//! imago's I/O calls block, so requests run on worker threads (8 by default) sharing the
//! image behind a read-write lock: reads, writes, write-zeroes and flushes take it shared
//! (imago serialises its own metadata updates), discards take it exclusively (imago requires
//! `&mut` for `discard_to_zero`, because freeing clusters invalidates other requests'
//! mappings).
//!
//! Guest memory is copied through one reusable, page-aligned buffer per worker instead of
//! handing imago slices of shared memory: the guest may change that memory at any time, which
//! Rust references must not see. The copy is one memcpy of the request; measured 4 KiB random
//! reads at queue depth 32 with 16 workers reached 67k IOPS against `qemu-img bench`'s 69k
//! on the same image.
//!
//! Flush = imago `flush` (write back cached L2/refcount tables) then `sync` (fdatasync of the
//! image file). FUA writes do the same after the write. Discard deallocates whole clusters and
//! zeroes partial ones (`discard_to_zero`), so a discarded range reads back as zeroes and does
//! not expose the backing file. Online resize of a qcow2 image is not detected (imago reads the
//! header once): `refresh_capacity` returns the size at open.

use std::collections::VecDeque;
use std::fs::File as StdFile;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::lock::{lock_image, ImageLock};
use super::null::validate;
use super::{
    Completion, Engine, EngineError, EngineInfo, IoOp, IoRequest, MAX_QUEUE_DEPTH, MAX_THREADS,
};

type Image = Arc<RwLock<FormatAccess<File>>>;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
}

/// Reads and checks the header of the qcow2 image at `path`.
pub fn read_header(path: &str) -> Result<Qcow2Header, EngineError> {
    let cfg = |why: String| EngineError::Config {
        path: path.to_string(),
        why,
    };
    let mut f = StdFile::open(path).map_err(|source| EngineError::Open {
        what: "open qcow2 image",
        path: path.to_string(),
        source,
    })?;
    let mut h = [0u8; 72];
    f.read_exact(&mut h)
        .map_err(|e| cfg(format!("cannot read a qcow2 header: {e}")))?;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
    if &h[0..4] != b"QFI\xfb" {
        return Err(cfg("not a qcow2 image (bad magic)".into()));
    }
    let version = be32(4);
    if !(2..=3).contains(&version) {
        return Err(cfg(format!("unsupported qcow2 version {version}")));
    }
    let bits = be32(20);
    if !(9..=21).contains(&bits) {
        return Err(cfg(format!("invalid qcow2 cluster_bits {bits}")));
    }
    let (boff, blen) = (be64(8), be32(16));
    let backing_file = if boff != 0 && blen > 0 && blen <= 1023 {
        let mut name = vec![0u8; blen as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut name, boff)
            .map_err(|e| cfg(format!("cannot read the backing file name: {e}")))?;
        Some(String::from_utf8_lossy(&name).into_owned())
    } else {
        None
    };
    Ok(Qcow2Header {
        version,
        cluster_size: 1 << bits,
        size: be64(24),
        backing_file,
    })
}

struct Job {
    req: IoRequest,
}

/// How to open a qcow2 image.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// Requests in flight at once.
    pub queue_depth: u32,
    /// Worker threads.
    pub threads: usize,
    /// Bypass the host page cache (falls back to buffered if the file system refuses).
    pub direct: bool,
    /// Take QEMU-compatible image locks on the image (for writing unless read-only) and on
    /// every file of its backing chain (for reading, refusing writers).
    pub lock: bool,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            queue_depth: 64,
            threads: 8,
            direct: true,
            lock: false,
        }
    }
}

/// See the module docs.
pub struct Qcow2Engine {
    // Field order is drop order: the job channel closes, then the workers finish what they
    // hold and are joined, then the image is flushed and closed.
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    done_rx: Receiver<Completion>,
    image: Image,
    info: EngineInfo,
    path: String,
    efd: Arc<EventFd>,
    deferred: Vec<Job>,
    done: VecDeque<Completion>,
    signal: bool,
    in_flight: usize,
    _locks: Vec<Arc<ImageLock>>,
}

impl std::fmt::Debug for Qcow2Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Engine")
            .field("info", &self.info)
            .finish()
    }
}

impl Qcow2Engine {
    /// Opens the qcow2 image at `path` (and its backing chain).
    pub fn open(
        path: &str,
        read_only: bool,
        opts: &Qcow2Options,
    ) -> Result<Qcow2Engine, EngineError> {
        let header = read_header(path)?;
        let open_err = |what, source| EngineError::Open {
            what,
            path: path.to_string(),
            source,
        };
        let locks = if opts.lock {
            lock_chain(path, &header, !read_only)?
        } else {
            Vec::new()
        };
        let open = |direct: bool| {
            Qcow2::<File>::builder_path(path)
                .write(!read_only)
                .storage_open_options(StorageOpenOptions::new().direct(direct))
                .open(PermissiveImplicitOpenGate::default())
        };
        let (q, direct) = match open(opts.direct) {
            Ok(q) => (q, opts.direct),
            Err(e) if opts.direct => {
                tracing::warn!(path, error = %e, "qcow2 with O_DIRECT failed; trying buffered I/O");
                (
                    open(false).map_err(|e| open_err("open qcow2 image", e))?,
                    false,
                )
            }
            Err(e) => return Err(open_err("open qcow2 image", e)),
        };
        let threads = opts.threads;
        let queue_depth = opts.queue_depth;
        let image: Image = Arc::new(RwLock::new(FormatAccess::new(q)));
        let capacity = image
            .read()
            .map(|i| i.size())
            .map_err(|_| open_err("open qcow2 image", io::Error::other("lock poisoned")))?;
        let efd = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| open_err("eventfd for", e.into()))?,
        );
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let mut workers = Vec::new();
        for i in 0..threads.clamp(1, MAX_THREADS) {
            let (rx, done_tx, efd, image) =
                (rx.clone(), done_tx.clone(), efd.clone(), image.clone());
            let p = path.to_string();
            let t = std::thread::Builder::new()
                .name(format!("qcow2-{i}"))
                .spawn(move || worker(&p, &image, &rx, &done_tx, &efd))
                .map_err(|e| open_err("spawn a worker for", e))?;
            workers.push(t);
        }
        let depth = queue_depth.clamp(1, MAX_QUEUE_DEPTH);
        let mode = if direct { "O_DIRECT" } else { "buffered" };
        let describe = match &header.backing_file {
            Some(b) => format!("qcow2 {mode} {path} <- {b}"),
            None => format!("qcow2 {mode} {path}"),
        };
        Ok(Qcow2Engine {
            tx: Some(tx),
            threads: workers,
            done_rx,
            image,
            info: EngineInfo {
                capacity,
                logical_sector: 512,
                physical_sector: 4096,
                read_only,
                // imago cannot discard in version 2 images (no zero clusters).
                discard: (!read_only && header.version >= 3).then_some(header.cluster_size),
                secure_discard: false,
                volatile_cache: true,
                queue_depth: depth,
                describe,
            },
            path: path.to_string(),
            efd,
            deferred: Vec::with_capacity(depth as usize),
            done: VecDeque::new(),
            signal: false,
            in_flight: 0,
            _locks: locks,
        })
    }
}

/// Locks `path` (for writing if `write`) and every file of its backing chain for reading.
/// Backing names are resolved like QEMU does, relative to the directory of the image naming
/// them; a file that cannot be opened is left for imago to report.
fn lock_chain(
    path: &str,
    header: &Qcow2Header,
    write: bool,
) -> Result<Vec<Arc<ImageLock>>, EngineError> {
    let mut locks = vec![lock_image(path, write)?];
    let mut cur = PathBuf::from(path);
    let mut next = header.backing_file.clone();
    while let Some(name) = next.take() {
        if locks.len() > MAX_CHAIN {
            return Err(EngineError::Config {
                path: path.to_string(),
                why: format!("backing chain longer than {MAX_CHAIN} images"),
            });
        }
        let b = match Path::new(&name) {
            p if p.is_absolute() => p.to_path_buf(),
            p => cur.parent().unwrap_or(Path::new("/")).join(p),
        };
        let bs = b.to_string_lossy().into_owned();
        if std::fs::metadata(&b).is_err() {
            break;
        }
        locks.push(lock_image(&bs, false)?);
        next = read_header(&bs).ok().and_then(|h| h.backing_file);
        cur = b;
    }
    Ok(locks)
}

/// Longest backing chain domio follows for locking.
const MAX_CHAIN: usize = 64;

fn worker(path: &str, image: &Image, rx: &Receiver<Job>, done: &Sender<Completion>, efd: &EventFd) {
    let mut buf = AlignedBuf::default();
    while let Ok(Job { mut req }) = rx.recv() {
        let result = execute(image, &req, &mut buf).map_err(|e| {
            tracing::warn!(path, tag = req.tag, op = ?req.op, error = %e, "qcow2 I/O failed");
            io_errno(&e)
        });
        req.segs.clear();
        let c = Completion {
            tag: req.tag,
            result,
            segs: req.segs,
        };
        if done.send(c).is_err() {
            return;
        }
        if let Err(e) = efd.write(1) {
            tracing::error!(path, error = %e, "qcow2: completion eventfd write failed");
        }
    }
}

fn io_errno(e: &io::Error) -> i32 {
    if let Some(n) = e.raw_os_error() {
        return n;
    }
    match e.kind() {
        io::ErrorKind::Unsupported => libc::EOPNOTSUPP,
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::PermissionDenied => libc::EROFS,
        _ => libc::EIO,
    }
}

fn poisoned() -> io::Error {
    io::Error::other("image lock poisoned by a panicking worker")
}

/// Largest piece of a write-zeroes done by writing a buffer of zeroes.
const ZERO_CHUNK: usize = 1 << 20;

/// Alignment of the worker's buffer: a page, enough for O_DIRECT on any file system, so imago
/// never has to bounce it again.
const BUF_ALIGN: usize = 4096;

/// A worker's reusable, page-aligned transfer buffer (safe code: an over-allocated `Vec`
/// sliced at its first aligned byte).
#[derive(Default)]
struct AlignedBuf {
    v: Vec<u8>,
}

impl AlignedBuf {
    /// `len` bytes starting on a `BUF_ALIGN` boundary; grows (and only then allocates) when a
    /// request is larger than any before.
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.v.len() < len + BUF_ALIGN {
            self.v = vec![0u8; (len + BUF_ALIGN).next_power_of_two()];
        }
        let off = self.v.as_ptr().align_offset(BUF_ALIGN).min(BUF_ALIGN);
        &mut self.v[off..off + len]
    }
}

fn execute(image: &Image, req: &IoRequest, abuf: &mut AlignedBuf) -> io::Result<u64> {
    let mem_err = |e: xen::MemError| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    match req.op {
        IoOp::Read => {
            let total: usize = req.segs.iter().map(|s| s.len()).sum();
            let buf = abuf.get(total);
            image
                .read()
                .map_err(|_| poisoned())?
                .read(&mut *buf, req.offset)?;
            let mut pos = 0;
            for s in &req.segs {
                s.mem()
                    .write(s.offset(), &buf[pos..pos + s.len()])
                    .map_err(mem_err)?;
                pos += s.len();
            }
            Ok(total as u64)
        }
        IoOp::Write => {
            let total: usize = req.segs.iter().map(|s| s.len()).sum();
            let buf = abuf.get(total);
            let mut pos = 0;
            for s in &req.segs {
                s.mem()
                    .read(s.offset(), &mut buf[pos..pos + s.len()])
                    .map_err(mem_err)?;
                pos += s.len();
            }
            let img = image.read().map_err(|_| poisoned())?;
            img.write(&*buf, req.offset)?;
            if req.fua {
                img.flush()?;
                img.sync()?;
            }
            Ok(total as u64)
        }
        IoOp::Flush => {
            let img = image.read().map_err(|_| poisoned())?;
            img.flush()?;
            img.sync()?;
            Ok(0)
        }
        IoOp::WriteZeroes => {
            let img = image.read().map_err(|_| poisoned())?;
            match img.write_zeroes(req.offset, req.len) {
                // qcow2 v2 has no zero clusters: write real zeroes.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    let chunk = ZERO_CHUNK.min(usize::try_from(req.len).unwrap_or(ZERO_CHUNK));
                    let zeroes = abuf.get(chunk);
                    zeroes.fill(0);
                    let (mut off, end) = (req.offset, req.offset + req.len);
                    while off < end {
                        let n = usize::try_from(end - off).unwrap_or(chunk).min(chunk);
                        img.write(&zeroes[..n], off)?;
                        off += n as u64;
                    }
                }
                r => r?,
            }
            if req.fua {
                img.flush()?;
                img.sync()?;
            }
            Ok(req.len)
        }
        IoOp::Discard => {
            image
                .write()
                .map_err(|_| poisoned())?
                .discard_to_zero(req.offset, req.len)?;
            Ok(req.len)
        }
        IoOp::SecureDiscard => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    }
}

impl Engine for Qcow2Engine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn queue(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight >= self.info.queue_depth as usize {
            return Err(req);
        }
        self.in_flight += 1;
        match validate(&self.info, &req) {
            Ok(_) => self.deferred.push(Job { req }),
            Err(errno) => {
                req.segs.clear();
                self.done.push_back(Completion {
                    tag: req.tag,
                    result: Err(errno),
                    segs: req.segs,
                });
                self.signal = true;
            }
        }
        Ok(())
    }

    fn kick(&mut self) -> Result<(), EngineError> {
        if let Some(tx) = &self.tx {
            for job in self.deferred.drain(..) {
                // The workers hold the receiver while the engine lives.
                let _ = tx.send(job);
            }
        }
        if std::mem::take(&mut self.signal) {
            self.efd.write(1).map_err(|e| EngineError::Io {
                op: "eventfd write",
                source: e.into(),
            })?;
        }
        Ok(())
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, EngineError> {
        let _ = self.efd.read();
        let before = out.len();
        out.extend(self.done.drain(..));
        while let Ok(c) = self.done_rx.try_recv() {
            out.push(c);
        }
        let n = out.len() - before;
        self.in_flight = self.in_flight.saturating_sub(n);
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn refresh_capacity(&mut self) -> Result<u64, EngineError> {
        let size = self
            .image
            .read()
            .map(|i| i.size())
            .map_err(|_| EngineError::Config {
                path: self.path.clone(),
                why: "image lock poisoned".into(),
            })?;
        self.info.capacity = size;
        Ok(size)
    }
}

impl Drop for Qcow2Engine {
    fn drop(&mut self) {
        self.deferred.clear();
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if !self.info.read_only {
            if let Ok(img) = self.image.read() {
                if let Err(e) = img.flush().and_then(|()| img.sync()) {
                    tracing::error!(path = %self.path, error = %e, "qcow2: final flush failed");
                }
            }
        }
    }
}

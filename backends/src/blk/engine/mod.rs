//! Storage engines: where blkback's (and later virtio-blk's) requests go.
//!
//! An engine takes a batch of requests (`queue` then `kick`), signals completions on a file
//! descriptor, and hands them back with `reap`. Formats (raw, qcow2) and I/O mechanisms
//! (io_uring, thread pool) are separate axes behind this one trait; `null` completes every
//! request at once and measures the protocol's own cost.
//!
//! Memory safety with no unchecked code in callers: each [`IoSeg`] holds an `Arc` of the mapping it
//! points into (a grant mapping or guest RAM) and is bounds-checked when built, so the memory
//! stays mapped until the engine returns the segment in a [`Completion`]. The engine derives
//! raw pointers for the kernel only inside its own `sys` module.
//!
//! Allocation: requests carry their segment `Vec` in and the engine hands it back (emptied) in
//! the completion, so a caller that recycles those vectors allocates nothing per request.

mod lock;
pub mod null;
pub mod open;
mod pool;
pub mod qcow2;
pub mod raw;
#[allow(unsafe_code)]
mod sys;
mod uring;

/// The deepest queue the file engines accept (a larger `queue_depth` is clamped to it).
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// The most worker threads one engine starts (a larger `threads` is clamped to it).
pub const MAX_THREADS: usize = 64;

pub use open::{open_engine, open_image, parse_params, EngineOptions, ImageFormat, Params};
pub use qcow2::{Qcow2Engine, Qcow2Options};
pub use raw::{Mechanism, RawEngine, RawOptions};

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use xen::{GrantMapping, MemError, SharedMem};

/// Memory an I/O segment may point into.
pub trait IoMem: Send + Sync + 'static {
    /// The mapping.
    fn shared_mem(&self) -> &SharedMem;
}

impl IoMem for SharedMem {
    fn shared_mem(&self) -> &SharedMem {
        self
    }
}

impl IoMem for GrantMapping {
    fn shared_mem(&self) -> &SharedMem {
        self.mem()
    }
}

/// One contiguous piece of mapped memory to read into or write from.
#[derive(Clone)]
pub struct IoSeg {
    mem: Arc<dyn IoMem>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for IoSeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoSeg")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl IoSeg {
    /// A segment of `len` bytes at `offset` in `mem`. A segment the engine will write into
    /// (a read from the disk) needs a writable mapping.
    pub fn new(
        mem: Arc<dyn IoMem>,
        offset: usize,
        len: usize,
        device_writes: bool,
    ) -> Result<IoSeg, MemError> {
        let m = mem.shared_mem();
        let size = if device_writes && !m.is_writable() {
            0
        } else {
            m.len()
        };
        match offset.checked_add(len) {
            Some(end) if end <= size && len > 0 => Ok(IoSeg { mem, offset, len }),
            _ => Err(MemError::OutOfBounds { offset, len, size }),
        }
    }
    /// Offset in the mapping.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false (segments are never empty).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The mapping.
    pub fn mem(&self) -> &SharedMem {
        self.mem.shared_mem()
    }
    /// The start address, for engines handing the segment to the kernel. The memory is mapped
    /// for `len()` bytes from here for as long as this segment (or a clone) lives.
    pub fn addr(&self) -> *mut u8 {
        self.mem.shared_mem().as_ptr().wrapping_add(self.offset)
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read `segs` from `offset`.
    Read,
    /// Write `segs` at `offset`.
    Write,
    /// Make every completed write durable (fdatasync or equivalent).
    Flush,
    /// Deallocate `len` bytes at `offset` (punch a hole); reads return zeroes afterwards.
    Discard,
    /// Discard and make sure the old data cannot be read back from the medium.
    SecureDiscard,
    /// Write `len` zero bytes at `offset`.
    WriteZeroes,
}

/// One request.
#[derive(Debug)]
pub struct IoRequest {
    /// Returned in the completion.
    pub tag: u64,
    /// Operation.
    pub op: IoOp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length for Discard/SecureDiscard/WriteZeroes (Read/Write use the segments' total).
    pub len: u64,
    /// Memory for Read/Write; handed back, emptied, in the completion.
    pub segs: Vec<IoSeg>,
    /// Make this write durable before completing it (FUA; also used for WRITE_BARRIER).
    pub fua: bool,
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Bytes transferred, or a positive errno.
    pub result: Result<u64, i32>,
    /// The request's segment vector, emptied (its mappings released), for reuse.
    pub segs: Vec<IoSeg>,
}

/// What an engine's disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u32,
    /// Physical sector size.
    pub physical_sector: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// Discard is supported (and its granularity in bytes, 0 if unknown).
    pub discard: Option<u32>,
    /// Secure discard is supported.
    pub secure_discard: bool,
    /// The storage has a volatile cache, so Flush matters.
    pub volatile_cache: bool,
    /// Most requests in flight at once.
    pub queue_depth: u32,
    /// Human description ("raw io_uring O_DIRECT /path", "qcow2 /path <- base").
    pub describe: String,
}

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Opening the image or setting up the engine failed.
    #[error("{what} {path}: {source}")]
    Open {
        /// What was being opened.
        what: &'static str,
        /// Image path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The image or its configuration is unusable.
    #[error("{path}: {why}")]
    Config {
        /// Image path.
        path: String,
        /// Why.
        why: String,
    },
    /// Submitting or reaping failed as a whole.
    #[error("{op}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A storage engine.
pub trait Engine: Send {
    /// The disk.
    fn info(&self) -> &EngineInfo;
    /// Queues a request; it starts at the next [`Engine::kick`]. Returns it if the engine is
    /// at its queue depth. Requests that cannot be valid (past the end, misaligned, a write to
    /// a read-only disk) still complete, with an errno, never a panic.
    fn queue(&mut self, req: IoRequest) -> Result<(), IoRequest>;
    /// Starts everything queued (one syscall for io_uring).
    fn kick(&mut self) -> Result<(), EngineError>;
    /// Readable while completions wait to be reaped.
    fn completion_fd(&self) -> BorrowedFd<'_>;
    /// Moves finished requests into `out` (which the caller reuses); returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, EngineError>;
    /// Requests queued or in flight.
    fn in_flight(&self) -> usize;
    /// Re-reads the disk size (online resize); returns the new capacity.
    fn refresh_capacity(&mut self) -> Result<u64, EngineError>;
}

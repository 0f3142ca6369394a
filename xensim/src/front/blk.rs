//! A PV block frontend (io/blkif.h) that negotiates and queues requests as Linux's
//! `xen-blkfront` does.
//!
//! Negotiation (`talk_to_blkback`): once the backend is InitWait, read `max-ring-page-order`
//! and `multi-queue-max-queues`, set up each ring (`setup_blkring`: 2^order granted pages and an
//! unbound event channel), then in one transaction write `ring-page-order` (only when more than
//! one page), `ring-ref` (one page) or `ring-ref0..N`, `event-channel` — under `queue-N/` when
//! there is more than one queue, after `multi-queue-num-queues` — then `protocol` and
//! `feature-persistent`; then switch to Initialised. When the backend is Connected
//! (`blkfront_connect`), read `sectors`, `info`, `sector-size`, `physical-sector-size` and the
//! features (`blkfront_gather_backend_features`), then switch to Connected.
//!
//! Requests (`blkif_queue_rw_req`): data lives in guest pages taken from a per-queue pool.
//! With persistent grants (both ends offer `feature-persistent`) each pool page is granted
//! once and reused; otherwise each page is granted for one request and the grant is revoked
//! when the response arrives, which fails if the backend still maps the page (XSA-396: the
//! queue is then broken). More than 11 segments go in an INDIRECT request when the backend
//! offers `feature-max-indirect-segments`. Responses are copied out of the ring once and
//! checked (id in range and pending, operation matching), as Linux's `blkif_interrupt` does;
//! a bad response breaks the queue instead of panicking.
//!
//! Options choose what Linux's module parameters choose (ring order, queues, persistent
//! grants, indirect segments) and the guest's ABI (`x86_64-abi`, or `x86_32-abi` for a 32-bit
//! guest). [`BlkQueue::submit_at`] places data at a sector offset in its first page, as a bio
//! with an offset does. Calling [`BlkFront::init`] again after [`BlkFront::close`] reconnects
//! from Initialising, as a resumed guest does.
//!
//! Tests of hostile frontends use the raw accessors ([`BlkQueue::ring_mut`],
//! [`BlkQueue::write_slot`], [`BlkQueue::set_req_prod`], [`BlkFrontOptions::overrides`] and
//! [`BlkFrontOptions::omit`]) to do what Linux never would.

use std::sync::atomic::Ordering;
use std::time::Duration;

use xen::abi::blkif::*;
use xen::abi::ring::{SRING_REQ_PROD, SRING_RING_OFFSET, SRING_RSP_PROD};
use xen::ring::{FrontRing, RingError};
use xen::{DomId, Gfn, GrantRef, SharedMem, PAGE_SIZE};
use xenbus::{XenbusState, XsError, XsOps};

use super::{FrontError, FrontendLink};
use crate::guest::{Guest, GuestError, GuestPort};

/// Largest ring order a frontend may use (`XENBUS_MAX_RING_GRANT_ORDER`: 16 pages).
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Linux's default `xen_blkif_max_segments` (segments of an indirect request).
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u32 = 32;

/// Errors of the block frontend.
#[derive(Debug, thiserror::Error)]
pub enum BlkFrontError {
    /// xenstore or state handshake.
    #[error(transparent)]
    Front(#[from] FrontError),
    /// Guest pages, grants or event channels.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The shared ring (including a backend that produced impossible indices).
    #[error("{path}: shared ring: {source}")]
    Ring {
        /// Device and queue.
        path: String,
        /// The ring error.
        #[source]
        source: RingError,
    },
    /// The caller asked for a request this frontend cannot build.
    #[error("{path}: invalid request: {why}")]
    InvalidRequest {
        /// Device and queue.
        path: String,
        /// Why.
        why: String,
    },
    /// No free ring slot.
    #[error("{path}: ring full ({in_flight} requests in flight)")]
    QueueFull {
        /// Device and queue.
        path: String,
        /// Requests outstanding.
        in_flight: u32,
    },
    /// The backend did not offer the operation.
    #[error("{path}: the backend does not offer {op}")]
    Unsupported {
        /// Device and queue.
        path: String,
        /// The operation.
        op: &'static str,
    },
    /// The backend wrote a response no pending request matches.
    #[error("{path}: bad response from the backend: {why}")]
    BadResponse {
        /// Device and queue.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// An earlier backend error broke this queue (as Linux's BLKIF_STATE_ERROR).
    #[error("{path}: queue is broken: {why}")]
    Broken {
        /// Device and queue.
        path: String,
        /// The first error.
        why: String,
    },
    /// Grants the backend still maps (revoking them failed).
    #[error("{path}: the backend still maps grant refs {grefs:?}")]
    StillMapped {
        /// Device.
        path: String,
        /// The grants.
        grefs: Vec<GrantRef>,
    },
    /// The backend wrote a value this frontend cannot use.
    #[error("{path}: backend value {key} = {value:?}: {why}")]
    BadBackendValue {
        /// Device.
        path: String,
        /// The key.
        key: String,
        /// Its value (escaped, truncated).
        value: String,
        /// Why.
        why: &'static str,
    },
}

/// How the frontend negotiates. Defaults are Linux's module parameters on a 1-vCPU guest.
#[derive(Debug, Clone)]
pub struct BlkFrontOptions {
    /// `xen_blkif_max_ring_order` (0..=4): the ring uses min(this, backend's max) order.
    pub max_ring_order: u32,
    /// `xen_blkif_max_queues` (Linux: min(4, vCPUs)): queues = min(this, backend's max).
    pub max_queues: u32,
    /// `feature_persistent`: offer persistent grants.
    pub persistent: bool,
    /// Ring layout: a 64-bit guest (Linux's native `x86_64-abi`) or a 32-bit one.
    pub protocol: BlkProtocol,
    /// `xen_blkif_max_segments`: segments per indirect request (0 disables indirect).
    pub max_indirect_segments: u32,
    /// How long to wait for each backend state.
    pub timeout: Duration,
    /// Extra keys (relative to the device directory) written last in the negotiation
    /// transaction, replacing what the frontend wrote: tests of hostile frontends.
    pub overrides: Vec<(String, String)>,
    /// Keys (relative) the frontend must not write.
    pub omit: Vec<String>,
}

impl Default for BlkFrontOptions {
    fn default() -> Self {
        BlkFrontOptions {
            max_ring_order: 0,
            max_queues: 1,
            persistent: true,
            protocol: BlkProtocol::X86_64,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            timeout: Duration::from_secs(10),
            overrides: Vec::new(),
            omit: Vec::new(),
        }
    }
}

/// What the backend advertised (parsed as Linux's `xenbus_read_unsigned`: a missing or
/// unparsable value is the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendFeatures {
    /// `multi-queue-max-queues` (0 if absent).
    pub max_queues: u32,
    /// `max-ring-page-order` (0 if absent).
    pub max_ring_page_order: u32,
    /// `feature-persistent`.
    pub persistent: bool,
    /// `feature-max-indirect-segments` (0 if absent).
    pub max_indirect_segments: u32,
    /// `feature-flush-cache`.
    pub flush_cache: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-granularity` (bytes).
    pub discard_granularity: u32,
    /// `discard-alignment` (bytes).
    pub discard_alignment: u32,
    /// `discard-secure`.
    pub discard_secure: bool,
}

/// The disk as the backend described it at Connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// `sectors`: size in 512-byte sectors.
    pub sectors: u64,
    /// `sector-size` (logical).
    pub sector_size: u32,
    /// `physical-sector-size` (defaults to `sector-size`).
    pub physical_sector_size: u32,
    /// `info` (VDISK_* bits).
    pub info: u32,
}

impl DiskInfo {
    /// Whether the backend exports the disk read-only.
    pub fn read_only(&self) -> bool {
        self.info & VDISK_READONLY != 0
    }
}

/// One request for [`BlkQueue::submit`]. Sectors are 512-byte units, as in the protocol.
#[derive(Debug, Clone, Copy)]
pub enum BlkOp<'a> {
    /// Read `len` bytes (a multiple of 512) at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `data` (a multiple of 512 bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// BLKIF_OP_WRITE_BARRIER: a write ordered after everything before it (`data` may be
    /// empty, as Linux's flush when the backend offers only barriers).
    WriteBarrier {
        /// First sector.
        sector: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// BLKIF_OP_FLUSH_DISKCACHE with no segments.
    Flush,
    /// BLKIF_OP_DISCARD.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        nr_sectors: u64,
        /// BLKIF_DISCARD_SECURE.
        secure: bool,
    },
}

/// A response, as the backend wrote it (after validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request id [`BlkQueue::submit`] returned.
    pub id: u64,
    /// The operation the response names.
    pub operation: u8,
    /// BLKIF_RSP_*.
    pub status: i16,
    /// Bytes of data the request carried.
    pub len: usize,
}

/// The data pages of a completed request, readable until the callback returns.
#[derive(Debug)]
pub struct CompletedData<'a> {
    guest: &'a Guest,
    pages: &'a [PoolPage],
    offset: usize,
    len: usize,
}

impl CompletedData<'_> {
    /// Copies the request's data (what a read brought in) into `buf`; returns the bytes copied.
    pub fn copy_to(&self, buf: &mut [u8]) -> Result<usize, GuestError> {
        let n = buf.len().min(self.len);
        let mut done = 0;
        for (i, p) in self.pages.iter().enumerate() {
            if done == n {
                break;
            }
            let at = if i == 0 { self.offset } else { 0 };
            let chunk = (PAGE_SIZE - at).min(n - done);
            self.guest
                .read_page(p.gfn, at, &mut buf[done..done + chunk])?;
            done += chunk;
        }
        Ok(n)
    }
    /// Bytes of data.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the request carried no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A guest page of a queue's pool, with its grant while it has one.
#[derive(Debug, Clone, Copy)]
struct PoolPage {
    gfn: Gfn,
    gref: Option<GrantRef>,
}

#[derive(Debug, Default)]
struct Shadow {
    in_use: bool,
    /// The operation the response must name (the inner one of an indirect request).
    op: u8,
    /// Byte offset of the data in its first page.
    offset: usize,
    len: usize,
    data: Vec<PoolPage>,
    indirect: Vec<PoolPage>,
}

/// The ring layout the frontend announces in `protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BlkProtocol {
    /// `x86_64-abi`: what a 64-bit Linux guest writes.
    #[default]
    X86_64,
    /// `x86_32-abi`: what a 32-bit Linux guest writes (packed 4-byte-aligned requests).
    X86_32,
}

impl BlkProtocol {
    /// The `protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            BlkProtocol::X86_64 => XEN_IO_PROTO_ABI_X86_64,
            BlkProtocol::X86_32 => XEN_IO_PROTO_ABI_X86_32,
        }
    }
}

/// A front ring in the layout of the negotiated protocol. Requests are built in the native
/// layout and converted field by field for a 32-bit ring; responses come back native.
#[derive(Debug)]
enum Ring {
    X86_64(FrontRing<BlkifRequest, BlkifResponse, SharedMem>),
    X86_32(FrontRing<BlkifX86_32Request, BlkifX86_32Response, SharedMem>),
}

macro_rules! each_ring {
    ($ring:expr, $r:ident => $e:expr) => {
        match $ring {
            Ring::X86_64($r) => $e,
            Ring::X86_32($r) => $e,
        }
    };
}

impl Ring {
    fn init(mem: SharedMem, protocol: BlkProtocol) -> Result<Ring, RingError> {
        Ok(match protocol {
            BlkProtocol::X86_64 => Ring::X86_64(FrontRing::init(mem)?),
            BlkProtocol::X86_32 => Ring::X86_32(FrontRing::init(mem)?),
        })
    }
    fn size(&self) -> u32 {
        each_ring!(self, r => r.size())
    }
    fn memory(&self) -> &SharedMem {
        each_ring!(self, r => r.memory())
    }
    fn slot_size(&self) -> usize {
        match self {
            Ring::X86_64(_) => BLKIF_SLOT_SIZE,
            Ring::X86_32(_) => BLKIF_X86_32_SLOT_SIZE,
        }
    }
    fn push_rw(&mut self, q: &BlkifRequest) -> Result<(), RingError> {
        match self {
            Ring::X86_64(r) => r.push_request(q),
            Ring::X86_32(r) => r.push_request(&BlkifX86_32Request {
                operation: q.operation,
                nr_segments: q.nr_segments,
                handle: q.handle,
                id: q.id,
                sector_number: q.sector_number,
                seg: q.seg,
            }),
        }
    }
    fn push_indirect(&mut self, q: &BlkifRequestIndirect) -> Result<(), RingError> {
        match self {
            Ring::X86_64(r) => r.push_request_as(q),
            Ring::X86_32(r) => r.push_request_as(&BlkifX86_32RequestIndirect {
                operation: q.operation,
                indirect_op: q.indirect_op,
                nr_segments: q.nr_segments,
                id: q.id,
                sector_number: q.sector_number,
                handle: q.handle,
                _pad1: 0,
                indirect_grefs: q.indirect_grefs,
                _pad2: 0,
            }),
        }
    }
    fn push_discard(&mut self, q: &BlkifRequestDiscard) -> Result<(), RingError> {
        match self {
            Ring::X86_64(r) => r.push_request_as(q),
            Ring::X86_32(r) => r.push_request_as(&BlkifX86_32RequestDiscard {
                operation: q.operation,
                flag: q.flag,
                handle: q.handle,
                id: q.id,
                sector_number: q.sector_number,
                nr_sectors: q.nr_sectors,
            }),
        }
    }
    fn push_requests_and_check_notify(&mut self) -> Result<bool, RingError> {
        each_ring!(self, r => r.push_requests_and_check_notify())
    }
    fn get_response(&mut self) -> Result<Option<BlkifResponse>, RingError> {
        match self {
            Ring::X86_64(r) => r.get_response(),
            Ring::X86_32(r) => Ok(r.get_response()?.map(|x| BlkifResponse {
                id: x.id,
                operation: x.operation,
                status: x.status,
                ..Default::default()
            })),
        }
    }
    fn unconsumed_responses(&self) -> Result<u32, RingError> {
        each_ring!(self, r => r.unconsumed_responses())
    }
    fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        each_ring!(self, r => r.final_check_for_responses())
    }
}

/// Where a request's data goes.
#[derive(Debug, Clone, Copy)]
struct Layout {
    id: u32,
    operation: u8,
    sector: u64,
    /// Byte offset of the data in its first page.
    offset: usize,
    len: usize,
    indirect: bool,
}

/// Per-queue settings decided at Connected.
#[derive(Debug, Clone, Copy, Default)]
struct QueueCfg {
    handle: BlkifVdev,
    persistent: bool,
    max_indirect: usize,
    flush: bool,
    barrier: bool,
    discard: bool,
    discard_secure: bool,
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests submitted.
    pub submitted: u64,
    /// Responses consumed.
    pub completed: u64,
    /// Event-channel notifications sent to the backend.
    pub notifies: u64,
    /// Pushes that needed no notification (the backend was still polling).
    pub notifies_suppressed: u64,
    /// Grants made for data or indirect pages.
    pub grants: u64,
}

/// One ring of the device, with its event channel and page pool. Each queue can be driven
/// from its own thread.
#[derive(Debug)]
pub struct BlkQueue {
    guest: Guest,
    backend_id: DomId,
    index: u32,
    path: String,
    ring: Ring,
    ring_gfns: Vec<Gfn>,
    ring_grefs: Vec<GrantRef>,
    port: GuestPort,
    shadow: Vec<Shadow>,
    free_ids: Vec<u32>,
    pool: Vec<PoolPage>,
    /// Grants the backend kept mapped when they should have been released: never reused.
    leaked: Vec<PoolPage>,
    cfg: QueueCfg,
    broken: Option<String>,
    stats: QueueStats,
}

impl BlkQueue {
    fn new(
        guest: &Guest,
        backend_id: DomId,
        index: u32,
        order: u32,
        protocol: BlkProtocol,
        path: String,
    ) -> Result<BlkQueue, BlkFrontError> {
        let pages = 1usize << order;
        let mut ring_gfns = Vec::with_capacity(pages);
        let mut ring_grefs = Vec::with_capacity(pages);
        let cleanup = |gfns: &[Gfn], grefs: &[GrantRef]| {
            for g in grefs {
                let _ = guest.end_access(*g);
            }
            for f in gfns {
                guest.free_page(*f);
            }
        };
        for _ in 0..pages {
            let step = guest
                .alloc_page()
                .and_then(|gfn| {
                    ring_gfns.push(gfn);
                    guest.grant(backend_id, gfn, false)
                })
                .map(|gref| ring_grefs.push(gref));
            if let Err(e) = step {
                cleanup(&ring_gfns, &ring_grefs);
                return Err(e.into());
            }
        }
        let mapped = guest
            .host()
            .with_ram(guest.domid(), |ram| {
                crate::mem::map_frames(ram.fd(), &ring_gfns, true)
            })
            .map_err(|source| GuestError::Host {
                domid: guest.domid(),
                source,
            })
            .and_then(|r| {
                r.map_err(|source| GuestError::Io {
                    domid: guest.domid(),
                    source,
                })
            });
        let mem = match mapped {
            Ok(m) => m,
            Err(e) => {
                cleanup(&ring_gfns, &ring_grefs);
                return Err(e.into());
            }
        };
        let ring = match Ring::init(mem, protocol) {
            Ok(r) => r,
            Err(source) => {
                cleanup(&ring_gfns, &ring_grefs);
                return Err(BlkFrontError::Ring { path, source });
            }
        };
        let port = match guest.alloc_unbound(backend_id) {
            Ok(p) => p,
            Err(e) => {
                cleanup(&ring_gfns, &ring_grefs);
                return Err(e.into());
            }
        };
        let size = ring.size();
        Ok(BlkQueue {
            guest: guest.clone(),
            backend_id,
            index,
            path,
            ring,
            ring_gfns,
            ring_grefs,
            port,
            shadow: (0..size).map(|_| Shadow::default()).collect(),
            free_ids: (0..size).rev().collect(),
            pool: Vec::new(),
            leaked: Vec::new(),
            cfg: QueueCfg::default(),
            broken: None,
            stats: QueueStats::default(),
        })
    }

    /// The queue's index.
    pub fn index(&self) -> u32 {
        self.index
    }
    /// Grant references of the ring pages, in order.
    pub fn ring_refs(&self) -> &[GrantRef] {
        &self.ring_grefs
    }
    /// Guest frames of the ring pages.
    pub fn ring_gfns(&self) -> &[Gfn] {
        &self.ring_gfns
    }
    /// The event channel (the port the frontend published).
    pub fn port(&self) -> &GuestPort {
        &self.port
    }
    /// `RING_SIZE`.
    pub fn size(&self) -> u32 {
        self.ring.size()
    }
    /// Requests submitted and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.ring.size() - self.free_ids.len() as u32
    }
    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    /// Why the queue is broken, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }
    /// Pages in the pool (with persistent grants: the persistently granted pages).
    pub fn pool_pages(&self) -> usize {
        self.pool.len()
    }
    /// Whether this queue uses persistent grants.
    pub fn persistent(&self) -> bool {
        self.cfg.persistent
    }
    /// Segments an indirect request may carry (0: no indirect requests).
    pub fn max_indirect_segments(&self) -> usize {
        self.cfg.max_indirect
    }
    /// Largest data length of one request, in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.cfg.max_indirect.max(BLKIF_MAX_SEGMENTS_PER_REQUEST) * PAGE_SIZE
    }

    fn ring_err(&self, source: RingError) -> BlkFrontError {
        BlkFrontError::Ring {
            path: self.path.clone(),
            source,
        }
    }

    fn invalid(&self, why: String) -> BlkFrontError {
        BlkFrontError::InvalidRequest {
            path: self.path.clone(),
            why,
        }
    }

    fn check_usable(&self) -> Result<(), BlkFrontError> {
        match &self.broken {
            Some(why) => Err(BlkFrontError::Broken {
                path: self.path.clone(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }

    fn break_queue(&mut self, e: BlkFrontError) -> BlkFrontError {
        if self.broken.is_none() {
            self.broken = Some(e.to_string());
        }
        e
    }

    /// A pool page with a grant (taken from the pool, or newly allocated).
    fn get_page(&mut self) -> Result<PoolPage, BlkFrontError> {
        let mut p = match self.pool.pop() {
            Some(p) => p,
            None => PoolPage {
                gfn: self.guest.alloc_page()?,
                gref: None,
            },
        };
        if p.gref.is_none() {
            // gnttab_grant_foreign_access_ref(..., 0): read-write, as blkback maps persistent
            // grants read-write whatever the operation.
            match self.guest.grant(self.backend_id, p.gfn, false) {
                Ok(g) => {
                    p.gref = Some(g);
                    self.stats.grants += 1;
                }
                Err(e) => {
                    self.pool.push(p);
                    return Err(e.into());
                }
            }
        }
        Ok(p)
    }

    /// Returns a request's pages: kept granted with persistent grants, else revoked (a
    /// failure means the backend still maps the page: the page is never reused).
    fn put_pages(&mut self, pages: &mut Vec<PoolPage>) -> Vec<GrantRef> {
        let mut still_mapped = Vec::new();
        for mut p in pages.drain(..) {
            if !self.cfg.persistent {
                if let Some(g) = p.gref {
                    if self.guest.end_access(g).is_err() {
                        still_mapped.push(g);
                        self.leaked.push(p);
                        continue;
                    }
                    p.gref = None;
                }
            }
            self.pool.push(p);
        }
        still_mapped
    }

    /// Writes a request into the next ring slot (not yet visible: see [`BlkQueue::push`]) and
    /// returns its id. Data is copied into pool pages, as Linux does with persistent grants.
    pub fn submit(&mut self, op: BlkOp<'_>) -> Result<u64, BlkFrontError> {
        self.submit_at(op, 0)
    }

    /// Like [`BlkQueue::submit`], with the data starting at sector `first_sect` (0..=7) of its
    /// first page, as a bio whose first vector has an offset: the first segment covers
    /// `first_sect..`, the others start at 0, and the last may end before sector 7.
    pub fn submit_at(&mut self, op: BlkOp<'_>, first_sect: u8) -> Result<u64, BlkFrontError> {
        self.check_usable()?;
        if first_sect >= BLKIF_SECTORS_PER_PAGE {
            return Err(self.invalid(format!("first sector {first_sect} is not in a page")));
        }
        let (operation, sector, len, data) = match op {
            BlkOp::Read { sector, len } => (BLKIF_OP_READ, sector, len, None),
            BlkOp::Write { sector, data } => (BLKIF_OP_WRITE, sector, data.len(), Some(data)),
            BlkOp::WriteBarrier { sector, data } => {
                if !self.cfg.barrier {
                    return Err(BlkFrontError::Unsupported {
                        path: self.path.clone(),
                        op: "write barriers (feature-barrier)",
                    });
                }
                (BLKIF_OP_WRITE_BARRIER, sector, data.len(), Some(data))
            }
            BlkOp::Flush => {
                if !self.cfg.flush {
                    return Err(BlkFrontError::Unsupported {
                        path: self.path.clone(),
                        op: "cache flushes (feature-flush-cache)",
                    });
                }
                (BLKIF_OP_FLUSH_DISKCACHE, 0, 0, None)
            }
            BlkOp::Discard {
                sector,
                nr_sectors,
                secure,
            } => return self.submit_discard(sector, nr_sectors, secure),
        };
        if len % BLKIF_SECTOR_SIZE as usize != 0 {
            return Err(self.invalid(format!("{len} bytes is not a multiple of 512")));
        }
        if len == 0 && matches!(operation, BLKIF_OP_READ | BLKIF_OP_WRITE) {
            return Err(self.invalid("a read or write needs data".into()));
        }
        let offset = if len == 0 {
            0
        } else {
            usize::from(first_sect) * BLKIF_SECTOR_SIZE as usize
        };
        let nr_segs = (offset + len).div_ceil(PAGE_SIZE);
        let indirect = nr_segs > BLKIF_MAX_SEGMENTS_PER_REQUEST;
        if indirect {
            if nr_segs > self.cfg.max_indirect {
                return Err(self.invalid(format!(
                    "{nr_segs} segments exceed the {} a request may carry",
                    self.max_request_bytes() / PAGE_SIZE
                )));
            }
            if operation == BLKIF_OP_WRITE_BARRIER {
                return Err(self.invalid("a barrier cannot be indirect".into()));
            }
        }
        let Some(id) = self.free_ids.pop() else {
            return Err(BlkFrontError::QueueFull {
                path: self.path.clone(),
                in_flight: self.in_flight(),
            });
        };
        let mut sh = std::mem::take(&mut self.shadow[id as usize]);
        let layout = Layout {
            id,
            operation,
            sector,
            offset,
            len,
            indirect,
        };
        let r = self.fill(&mut sh, &layout, data);
        match r {
            Ok(()) => {
                sh.in_use = true;
                sh.op = operation;
                sh.offset = offset;
                sh.len = len;
                self.shadow[id as usize] = sh;
                self.stats.submitted += 1;
                Ok(u64::from(id))
            }
            Err(e) => {
                let _ = self.put_pages(&mut sh.data);
                let _ = self.put_pages(&mut sh.indirect);
                self.shadow[id as usize] = sh;
                self.free_ids.push(id);
                Err(e)
            }
        }
    }

    fn fill(
        &mut self,
        sh: &mut Shadow,
        l: &Layout,
        data: Option<&[u8]>,
    ) -> Result<(), BlkFrontError> {
        let Layout {
            id,
            operation,
            sector,
            offset,
            len,
            indirect,
        } = *l;
        let end = offset + len;
        let nr_segs = end.div_ceil(PAGE_SIZE);
        let mut segs = [BlkifRequestSegment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        let mut ind_page: Option<PoolPage> = None;
        let mut ind_buf = [BlkifRequestSegment::default(); BLKIF_SEGS_PER_INDIRECT_FRAME];
        for i in 0..nr_segs {
            let p = self.get_page()?;
            sh.data.push(p);
            // This page holds bytes [page_start, page_end) of the page, which are bytes
            // [i * PAGE_SIZE + page_start - offset, ..) of the data.
            let page_start = if i == 0 { offset } else { 0 };
            let page_end = (end - i * PAGE_SIZE).min(PAGE_SIZE);
            let data_start = i * PAGE_SIZE + page_start - offset;
            if let Some(d) = data {
                let bytes = &d[data_start..data_start + (page_end - page_start)];
                self.guest.write_page(p.gfn, page_start, bytes)?;
            }
            let sect = BLKIF_SECTOR_SIZE as usize;
            let seg = BlkifRequestSegment {
                gref: p.gref.unwrap_or(0),
                first_sect: (page_start / sect) as u8,
                last_sect: (page_end / sect - 1) as u8,
                _pad: [0; 2],
            };
            if indirect {
                let slot = i % BLKIF_SEGS_PER_INDIRECT_FRAME;
                if slot == 0 {
                    let ip = self.get_page()?;
                    sh.indirect.push(ip);
                    ind_page = Some(ip);
                }
                ind_buf[slot] = seg;
                let last_in_page = slot == BLKIF_SEGS_PER_INDIRECT_FRAME - 1 || i == nr_segs - 1;
                if let (true, Some(ip)) = (last_in_page, ind_page) {
                    let bytes = zerocopy::IntoBytes::as_bytes(&ind_buf[..=slot]);
                    self.guest.write_page(ip.gfn, 0, bytes)?;
                }
            } else if let Some(s) = segs.get_mut(i) {
                *s = seg;
            }
        }
        let pushed = if indirect {
            let mut grefs = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
            for (g, p) in grefs.iter_mut().zip(&sh.indirect) {
                *g = p.gref.unwrap_or(0);
            }
            let req = BlkifRequestIndirect {
                operation: BLKIF_OP_INDIRECT,
                indirect_op: operation,
                nr_segments: nr_segs as u16,
                id: u64::from(id),
                sector_number: sector,
                handle: self.cfg.handle,
                indirect_grefs: grefs,
                ..Default::default()
            };
            self.ring.push_indirect(&req)
        } else {
            let req = BlkifRequest {
                operation,
                nr_segments: nr_segs as u8,
                handle: self.cfg.handle,
                _pad: [0; 4],
                id: u64::from(id),
                sector_number: sector,
                seg: segs,
            };
            self.ring.push_rw(&req)
        };
        pushed.map_err(|e| self.ring_err(e))
    }

    fn submit_discard(
        &mut self,
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    ) -> Result<u64, BlkFrontError> {
        if !self.cfg.discard {
            return Err(BlkFrontError::Unsupported {
                path: self.path.clone(),
                op: "discard (feature-discard)",
            });
        }
        if secure && !self.cfg.discard_secure {
            return Err(BlkFrontError::Unsupported {
                path: self.path.clone(),
                op: "secure discard (discard-secure)",
            });
        }
        let Some(id) = self.free_ids.pop() else {
            return Err(BlkFrontError::QueueFull {
                path: self.path.clone(),
                in_flight: self.in_flight(),
            });
        };
        let req = BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            flag: if secure { BLKIF_DISCARD_SECURE } else { 0 },
            handle: self.cfg.handle,
            _pad: [0; 4],
            id: u64::from(id),
            sector_number: sector,
            nr_sectors,
        };
        if let Err(e) = self.ring.push_discard(&req) {
            self.free_ids.push(id);
            return Err(self.ring_err(e));
        }
        let sh = &mut self.shadow[id as usize];
        sh.in_use = true;
        sh.op = BLKIF_OP_DISCARD;
        sh.len = 0;
        self.stats.submitted += 1;
        Ok(u64::from(id))
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`, then notifies the backend if it asked; returns
    /// whether it notified.
    pub fn push(&mut self) -> Result<bool, BlkFrontError> {
        let notify = self
            .ring
            .push_requests_and_check_notify()
            .map_err(|e| self.ring_err(e))?;
        if notify {
            self.port.notify()?;
            self.stats.notifies += 1;
        } else {
            self.stats.notifies_suppressed += 1;
        }
        Ok(notify)
    }

    /// Consumes every response (as `blkif_interrupt`: until `RING_FINAL_CHECK_FOR_RESPONSES`
    /// finds none, which also re-arms `rsp_event`), calling `f` for each while the request's
    /// data pages can still be read. A response that matches no pending request, names the
    /// wrong operation or comes with impossible indices breaks the queue.
    pub fn reap(
        &mut self,
        mut f: impl FnMut(&Completion, &CompletedData<'_>),
    ) -> Result<usize, BlkFrontError> {
        self.check_usable()?;
        let mut n = 0;
        loop {
            while let Some(rsp) = self.next_response()? {
                let id = rsp.id;
                let Some(sh) = usize::try_from(id)
                    .ok()
                    .and_then(|i| self.shadow.get_mut(i))
                    .filter(|s| s.in_use)
                else {
                    let e = BlkFrontError::BadResponse {
                        path: self.path.clone(),
                        why: format!("response id {id} matches no pending request"),
                    };
                    return Err(self.break_queue(e));
                };
                if rsp.operation != sh.op {
                    let e = BlkFrontError::BadResponse {
                        path: self.path.clone(),
                        why: format!(
                            "response to request {id} names operation {} instead of {}",
                            rsp.operation, sh.op
                        ),
                    };
                    return Err(self.break_queue(e));
                }
                let c = Completion {
                    id,
                    operation: rsp.operation,
                    status: rsp.status,
                    len: sh.len,
                };
                f(
                    &c,
                    &CompletedData {
                        guest: &self.guest,
                        pages: &sh.data,
                        offset: sh.offset,
                        len: sh.len,
                    },
                );
                let mut sh = std::mem::take(&mut self.shadow[id as usize]);
                let mut still = self.put_pages(&mut sh.data);
                still.extend(self.put_pages(&mut sh.indirect));
                sh.in_use = false;
                self.shadow[id as usize] = sh;
                self.free_ids.push(id as u32);
                self.stats.completed += 1;
                n += 1;
                if !still.is_empty() {
                    let e = BlkFrontError::StillMapped {
                        path: self.path.clone(),
                        grefs: still,
                    };
                    return Err(self.break_queue(e));
                }
            }
            let more = self
                .ring
                .final_check_for_responses()
                .map_err(|e| self.ring_err(e));
            match more {
                Ok(true) => continue,
                Ok(false) => return Ok(n),
                Err(e) => return Err(self.break_queue(e)),
            }
        }
    }

    fn next_response(&mut self) -> Result<Option<BlkifResponse>, BlkFrontError> {
        match self.ring.get_response() {
            Ok(r) => Ok(r),
            Err(source) => {
                let e = self.ring_err(source);
                Err(self.break_queue(e))
            }
        }
    }

    /// Copies out every published response without validating or recycling anything (tests
    /// of hostile frontends that pushed raw requests through [`BlkQueue::ring_mut`]).
    pub fn reap_raw(&mut self, out: &mut Vec<BlkifResponse>) -> Result<usize, BlkFrontError> {
        let mut n = 0;
        while let Some(r) = self.ring.get_response().map_err(|e| self.ring_err(e))? {
            out.push(r);
            n += 1;
        }
        Ok(n)
    }

    /// Whether responses are waiting to be reaped (fails on impossible backend indices).
    pub fn has_responses(&self) -> Result<bool, BlkFrontError> {
        Ok(self
            .ring
            .unconsumed_responses()
            .map_err(|e| self.ring_err(e))?
            > 0)
    }

    /// Waits for the backend's event (or returns at once if responses are already there),
    /// up to `timeout`. Call [`BlkQueue::reap`] afterwards.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), BlkFrontError> {
        if self.has_responses()? {
            return Ok(());
        }
        if self
            .ring
            .final_check_for_responses()
            .map_err(|e| self.ring_err(e))?
        {
            return Ok(());
        }
        self.port.wait(timeout)?;
        Ok(())
    }

    /// Submits, pushes and waits for one request; returns its completion (and, for a read,
    /// copies the data into `read_into`).
    pub fn run_one(
        &mut self,
        op: BlkOp<'_>,
        read_into: Option<&mut [u8]>,
        timeout: Duration,
    ) -> Result<Completion, BlkFrontError> {
        let id = self.submit(op)?;
        self.push()?;
        let deadline = std::time::Instant::now() + timeout;
        let mut out = None;
        let mut buf = read_into;
        let mut copy_err = None;
        loop {
            self.reap(|c, d| {
                if c.id == id {
                    if let Some(b) = buf.as_deref_mut() {
                        if let Err(e) = d.copy_to(b) {
                            copy_err = Some(e);
                        }
                    }
                    out = Some(*c);
                }
            })?;
            if let Some(e) = copy_err.take() {
                return Err(e.into());
            }
            if let Some(c) = out {
                return Ok(c);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(GuestError::Timeout {
                    domid: self.guest.domid(),
                    port: self.port.port(),
                    timeout,
                }
                .into());
            }
            self.wait(left)?;
        }
    }

    // ------------------------------------------------------------ raw access (hostile tests)

    /// The front ring itself, for an `x86_64-abi` queue: push arbitrary requests with
    /// `push_request`/`push_request_as`.
    pub fn ring_mut(&mut self) -> Option<&mut FrontRing<BlkifRequest, BlkifResponse, SharedMem>> {
        match &mut self.ring {
            Ring::X86_64(r) => Some(r),
            Ring::X86_32(_) => None,
        }
    }

    /// The front ring of an `x86_32-abi` queue.
    pub fn ring32_mut(
        &mut self,
    ) -> Option<&mut FrontRing<BlkifX86_32Request, BlkifX86_32Response, SharedMem>> {
        match &mut self.ring {
            Ring::X86_32(r) => Some(r),
            Ring::X86_64(_) => None,
        }
    }

    /// The layout of this queue's ring.
    pub fn protocol(&self) -> BlkProtocol {
        match self.ring {
            Ring::X86_64(_) => BlkProtocol::X86_64,
            Ring::X86_32(_) => BlkProtocol::X86_32,
        }
    }

    /// The shared ring memory (header and slots).
    pub fn ring_mem(&self) -> &SharedMem {
        self.ring.memory()
    }

    /// Writes any plain value into ring slot `idx` (taken modulo the ring size) without
    /// touching the indices: a request no Linux frontend would build, or a slot rewritten
    /// after it was published (a double-fetch probe).
    pub fn write_slot<T: zerocopy::IntoBytes + zerocopy::Immutable>(
        &self,
        idx: u32,
        v: &T,
    ) -> Result<(), BlkFrontError> {
        let slot = self.ring.slot_size();
        if std::mem::size_of::<T>() > slot {
            return Err(self.ring_err(RingError::Oversized {
                size: std::mem::size_of::<T>(),
                slot,
            }));
        }
        let off = SRING_RING_OFFSET + (idx & (self.ring.size() - 1)) as usize * slot;
        self.ring
            .memory()
            .write_obj(off, v)
            .map_err(|e| self.ring_err(RingError::Mem(e)))
    }

    /// Reads ring slot `idx` (modulo the ring size) as `T`, whatever the indices say: the
    /// response to a request published with [`BlkQueue::write_slot`] and
    /// [`BlkQueue::set_req_prod`].
    pub fn read_slot<T: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        idx: u32,
    ) -> Result<T, BlkFrontError> {
        let slot = self.ring.slot_size();
        if std::mem::size_of::<T>() > slot {
            return Err(self.ring_err(RingError::Oversized {
                size: std::mem::size_of::<T>(),
                slot,
            }));
        }
        let off = SRING_RING_OFFSET + (idx & (self.ring.size() - 1)) as usize * slot;
        self.ring
            .memory()
            .read_obj(off)
            .map_err(|e| self.ring_err(RingError::Mem(e)))
    }

    /// The shared `rsp_prod` as the backend last wrote it.
    pub fn shared_rsp_prod(&self) -> Result<u32, BlkFrontError> {
        self.ring
            .memory()
            .load_u32(SRING_RSP_PROD, Ordering::Acquire)
            .map_err(|e| self.ring_err(RingError::Mem(e)))
    }

    /// Writes any value into the shared `req_prod`.
    pub fn set_req_prod(&self, v: u32) -> Result<(), BlkFrontError> {
        self.ring
            .memory()
            .store_u32(SRING_REQ_PROD, v, Ordering::Release)
            .map_err(|e| self.ring_err(RingError::Mem(e)))
    }

    /// Notifies the backend unconditionally.
    pub fn notify(&self) -> Result<(), BlkFrontError> {
        Ok(self.port.notify()?)
    }

    /// Revokes every grant (ring, pool, in flight, leaked) and, once none is left, frees
    /// every page. Returns the grants the backend still maps; calling it again retries
    /// exactly those.
    fn release(&mut self) -> Vec<GrantRef> {
        let guest = self.guest.clone();
        let mut still = Vec::new();
        let mut end = |g: GrantRef| {
            let ok = guest.end_access(g).is_ok();
            if !ok {
                still.push(g);
            }
            ok
        };
        self.ring_grefs.retain(|g| !end(*g));
        let pages = self.pool.iter_mut().chain(self.leaked.iter_mut()).chain(
            self.shadow
                .iter_mut()
                .flat_map(|s| s.data.iter_mut().chain(s.indirect.iter_mut())),
        );
        for p in pages {
            if let Some(g) = p.gref {
                if end(g) {
                    p.gref = None;
                }
            }
        }
        if still.is_empty() {
            let mut gfns: Vec<Gfn> = self.ring_gfns.drain(..).collect();
            gfns.extend(self.pool.drain(..).map(|p| p.gfn));
            gfns.extend(self.leaked.drain(..).map(|p| p.gfn));
            for s in &mut self.shadow {
                gfns.extend(s.data.drain(..).map(|p| p.gfn));
                gfns.extend(s.indirect.drain(..).map(|p| p.gfn));
                s.in_use = false;
            }
            for gfn in gfns {
                self.guest.free_page(gfn);
            }
        }
        still
    }
}

/// A block frontend: `device/vbd/<devid>` of a guest.
#[derive(Debug)]
pub struct BlkFront {
    link: FrontendLink,
    opts: BlkFrontOptions,
    handle: BlkifVdev,
    ring_order: u32,
    queues: Vec<BlkQueue>,
    features: BackendFeatures,
    disk: Option<DiskInfo>,
}

fn xs_err(path: &str) -> impl Fn(XsError) -> FrontError + '_ {
    move |source| FrontError::Xs {
        path: path.to_string(),
        source,
    }
}

/// `xenbus_read_unsigned`: a missing or unparsable value is `default`.
fn read_unsigned(link: &FrontendLink, key: &str, default: u64) -> Result<u64, FrontError> {
    let path = format!("{}/{key}", link.backend());
    let v = link.xs().try_read(&path).map_err(xs_err(link.path()))?;
    Ok(v.and_then(|v| parse_unsigned(&v)).unwrap_or(default))
}

/// Parses a decimal value as `%u`/`%llu` would, without a sign or trailing garbage.
fn parse_unsigned(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.trim_end_matches('\0');
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl BlkFront {
    /// Negotiates and connects `device/vbd/<devid>` of `guest`: [`BlkFront::init`] then
    /// [`BlkFront::wait_connected`].
    pub fn connect(
        guest: &Guest,
        devid: u32,
        opts: BlkFrontOptions,
    ) -> Result<BlkFront, BlkFrontError> {
        let mut f = BlkFront::init(guest, devid, opts)?;
        f.wait_connected()?;
        Ok(f)
    }

    /// `talk_to_blkback`: waits for the backend's InitWait, sets up the rings and event
    /// channels, writes the negotiation keys and switches to Initialised.
    pub fn init(
        guest: &Guest,
        devid: u32,
        opts: BlkFrontOptions,
    ) -> Result<BlkFront, BlkFrontError> {
        let link = FrontendLink::open(guest, "vbd", devid)?;
        let fe = link.path().to_string();
        let vdev = link
            .xs()
            .try_read(&format!("{fe}/virtual-device"))
            .map_err(xs_err(&fe))?;
        // Linux requires `virtual-device` but puts the device id (the last path component)
        // in each request's `handle`.
        let handle = devid as BlkifVdev;
        match vdev.as_deref().and_then(parse_unsigned) {
            Some(_) => {}
            None => {
                return Err(FrontError::Protocol {
                    path: fe,
                    why: "virtual-device is missing or not a number".into(),
                }
                .into())
            }
        }
        // A device closed earlier (resume, reconnect) starts over from Initialising; the
        // backend then leaves Closed for InitWait, so Closed is not a refusal there.
        let own = link
            .xs()
            .try_read(&format!("{fe}/state"))
            .map_err(xs_err(&fe))?
            .and_then(|v| XenbusState::parse(&v).ok());
        let reconnect = own.is_some_and(|s| s != XenbusState::Initialising);
        if reconnect {
            link.switch_state(XenbusState::Initialising)?;
        }
        let s = link.wait_backend("InitWait", opts.timeout, |s| {
            let ready = s >= XenbusState::InitWait && s <= XenbusState::Connected;
            ready || (!reconnect && (s == XenbusState::Closing || s == XenbusState::Closed))
        })?;
        if s >= XenbusState::Closing {
            return Err(FrontError::Protocol {
                path: fe,
                why: format!("backend went {s} instead of InitWait"),
            }
            .into());
        }
        let features = BackendFeatures {
            max_queues: clamp_u32(read_unsigned(&link, "multi-queue-max-queues", 0)?),
            max_ring_page_order: clamp_u32(read_unsigned(&link, "max-ring-page-order", 0)?),
            ..Default::default()
        };
        let ring_order = opts
            .max_ring_order
            .min(features.max_ring_page_order)
            .min(MAX_RING_PAGE_ORDER);
        let nr_queues = features.max_queues.min(opts.max_queues).max(1);
        let backend_id = link.backend_id();
        // No cap beyond the options: running out of pages, grants or ports fails cleanly.
        let mut queues = Vec::new();
        for i in 0..nr_queues {
            let path = format!("{fe} queue {i}");
            match BlkQueue::new(guest, backend_id, i, ring_order, opts.protocol, path) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    for mut q in queues {
                        q.release();
                    }
                    return Err(e);
                }
            }
        }
        let mut front = BlkFront {
            link,
            opts,
            handle,
            ring_order,
            queues,
            features,
            disk: None,
        };
        if let Err(e) = front.write_keys() {
            for q in &mut front.queues {
                q.release();
            }
            return Err(e);
        }
        front.link.switch_state(XenbusState::Initialised)?;
        Ok(front)
    }

    /// The keys `talk_to_blkback` writes, relative to the device directory, in its order.
    pub fn negotiation_keys(&self) -> Vec<(String, String)> {
        let mut keys = Vec::new();
        let pages = 1usize << self.ring_order;
        if pages > 1 {
            keys.push(("ring-page-order".to_string(), self.ring_order.to_string()));
        }
        let per_ring = |keys: &mut Vec<(String, String)>, prefix: &str, q: &BlkQueue| {
            if pages == 1 {
                if let Some(g) = q.ring_grefs.first() {
                    keys.push((format!("{prefix}ring-ref"), g.to_string()));
                }
            } else {
                for (i, g) in q.ring_grefs.iter().enumerate() {
                    keys.push((format!("{prefix}ring-ref{i}"), g.to_string()));
                }
            }
            keys.push((format!("{prefix}event-channel"), q.port.port().to_string()));
        };
        if self.queues.len() == 1 {
            per_ring(&mut keys, "", &self.queues[0]);
        } else {
            keys.push((
                "multi-queue-num-queues".to_string(),
                self.queues.len().to_string(),
            ));
            for q in &self.queues {
                per_ring(&mut keys, &format!("queue-{}/", q.index), q);
            }
        }
        keys.push((
            "protocol".to_string(),
            self.opts.protocol.as_str().to_string(),
        ));
        keys.push((
            "feature-persistent".to_string(),
            u8::from(self.opts.persistent).to_string(),
        ));
        keys
    }

    fn write_keys(&self) -> Result<(), BlkFrontError> {
        let fe = self.link.path().to_string();
        let mut keys = self.negotiation_keys();
        keys.retain(|(k, _)| !self.opts.omit.contains(k));
        let over = &self.opts.overrides;
        self.link
            .xs()
            .transaction(|tx| {
                for (k, v) in keys.iter().chain(over.iter()) {
                    tx.write(&format!("{fe}/{k}"), v.as_bytes())?;
                }
                Ok(())
            })
            .map_err(xs_err(&fe))?;
        Ok(())
    }

    /// `blkfront_connect`: waits for the backend's Connected, reads the disk and its
    /// features, and switches to Connected.
    pub fn wait_connected(&mut self) -> Result<DiskInfo, BlkFrontError> {
        let fe = self.link.path().to_string();
        let s = self
            .link
            .wait_backend("Connected", self.opts.timeout, |s| {
                s == XenbusState::Connected || s == XenbusState::Closing || s == XenbusState::Closed
            })?;
        if s != XenbusState::Connected {
            return Err(FrontError::Protocol {
                path: fe,
                why: format!("backend went {s} instead of Connected"),
            }
            .into());
        }
        let sectors = self.read_required("sectors")?;
        let info = clamp_u32(self.read_required("info")?);
        let sector_size = clamp_u32(self.read_required("sector-size")?);
        if sector_size < 512 || !sector_size.is_power_of_two() {
            return Err(BlkFrontError::BadBackendValue {
                path: fe,
                key: "sector-size".into(),
                value: sector_size.to_string(),
                why: "not a power of two of at least 512",
            });
        }
        let physical_sector_size = clamp_u32(read_unsigned(
            &self.link,
            "physical-sector-size",
            u64::from(sector_size),
        )?);
        let disk = DiskInfo {
            sectors,
            sector_size,
            physical_sector_size,
            info,
        };
        let flag = |k: &str| read_unsigned(&self.link, k, 0).map(|v| v != 0);
        let f = &mut self.features;
        f.persistent = flag("feature-persistent")?;
        f.flush_cache = flag("feature-flush-cache")?;
        f.barrier = flag("feature-barrier")?;
        f.discard = flag("feature-discard")?;
        if f.discard {
            f.discard_granularity = clamp_u32(read_unsigned(&self.link, "discard-granularity", 0)?);
            f.discard_alignment = clamp_u32(read_unsigned(&self.link, "discard-alignment", 0)?);
            f.discard_secure = flag("discard-secure")?;
        }
        f.max_indirect_segments = clamp_u32(read_unsigned(
            &self.link,
            "feature-max-indirect-segments",
            0,
        )?);
        // blkfront_setup_indirect: indirect only if the backend takes more than 11 segments.
        let max_indirect = if f.max_indirect_segments as usize > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            (f.max_indirect_segments.min(self.opts.max_indirect_segments) as usize)
                .min(BLKIF_MAX_INDIRECT_SEGMENTS)
        } else {
            0
        };
        let cfg = QueueCfg {
            handle: self.handle,
            persistent: self.opts.persistent && f.persistent,
            max_indirect: if max_indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST {
                max_indirect
            } else {
                0
            },
            flush: f.flush_cache,
            barrier: f.barrier,
            discard: f.discard,
            discard_secure: f.discard && f.discard_secure,
        };
        for q in &mut self.queues {
            q.cfg = cfg;
        }
        self.disk = Some(disk);
        self.link.switch_state(XenbusState::Connected)?;
        Ok(disk)
    }

    /// A backend value `xenbus_gather` must find: missing or not a number is an error.
    fn read_required(&self, key: &str) -> Result<u64, BlkFrontError> {
        let fe = self.link.path();
        let path = format!("{}/{key}", self.link.backend());
        let v = self.link.xs().try_read(&path).map_err(xs_err(fe))?;
        match v.as_deref().map(|b| (b, parse_unsigned(b))) {
            Some((_, Some(n))) => Ok(n),
            Some((b, None)) => Err(BlkFrontError::BadBackendValue {
                path: fe.to_string(),
                key: key.to_string(),
                value: xenbus::state::escape_for_log(b, 32),
                why: "not an unsigned number",
            }),
            None => Err(BlkFrontError::BadBackendValue {
                path: fe.to_string(),
                key: key.to_string(),
                value: String::new(),
                why: "missing",
            }),
        }
    }

    /// Re-reads `sectors`, as Linux's `blkfront_connect` does when an already connected
    /// backend writes its state again (online resize); returns the new size in sectors.
    pub fn refresh_sectors(&mut self) -> Result<u64, BlkFrontError> {
        let sectors = self.read_required("sectors")?;
        if let Some(d) = self.disk.as_mut() {
            d.sectors = sectors;
        }
        Ok(sectors)
    }

    /// The xenstore link (paths, state).
    pub fn link(&self) -> &FrontendLink {
        &self.link
    }
    /// The options negotiated with.
    pub fn options(&self) -> &BlkFrontOptions {
        &self.opts
    }
    /// The `virtual-device` handle put in every request.
    pub fn handle(&self) -> BlkifVdev {
        self.handle
    }
    /// The ring order in use.
    pub fn ring_order(&self) -> u32 {
        self.ring_order
    }
    /// What the backend advertised.
    pub fn features(&self) -> &BackendFeatures {
        &self.features
    }
    /// The disk, once connected.
    pub fn disk(&self) -> Option<DiskInfo> {
        self.disk
    }
    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }
    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> Option<&mut BlkQueue> {
        self.queues.get_mut(i)
    }
    /// All queues (one thread per queue: `std::thread::scope` over `iter_mut`).
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }
    /// All queues.
    pub fn queues(&self) -> &[BlkQueue] {
        &self.queues
    }

    /// Closes as `blkfront_closing`/`xenbus_frontend_closed` do: Closing, wait for the backend
    /// to be Closing or Closed, Closed, wait for the backend's Closed; then revokes every
    /// grant (ring, pool, in flight). Fails with [`BlkFrontError::StillMapped`] if the backend
    /// still maps any of them; [`BlkFront::release`] then retries those.
    pub fn close(&mut self) -> Result<(), BlkFrontError> {
        let timeout = self.opts.timeout;
        self.link.switch_state(XenbusState::Closing)?;
        self.link
            .wait_backend("Closing or Closed", timeout, |s| s >= XenbusState::Closing)?;
        self.link.switch_state(XenbusState::Closed)?;
        self.link.wait_backend("Closed", timeout, |s| {
            s == XenbusState::Closed || s == XenbusState::Unknown
        })?;
        self.release()
    }

    /// Revokes every grant without the XenBus handshake (after the backend is gone, or to
    /// check what a misbehaving backend kept mapped).
    pub fn release(&mut self) -> Result<(), BlkFrontError> {
        let mut still = Vec::new();
        for q in &mut self.queues {
            still.extend(q.release());
        }
        if still.is_empty() {
            Ok(())
        } else {
            Err(BlkFrontError::StillMapped {
                path: self.link.path().to_string(),
                grefs: still,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_unsigned_strict_decimal_only() {
        assert_eq!(parse_unsigned(b"32768"), Some(32768));
        assert_eq!(parse_unsigned(b"0"), Some(0));
        assert_eq!(parse_unsigned(b"-1"), None);
        assert_eq!(parse_unsigned(b" 1"), None);
        assert_eq!(parse_unsigned(b"1x"), None);
        assert_eq!(parse_unsigned(b""), None);
        assert_eq!(parse_unsigned(b"99999999999999999999999"), None);
    }
}

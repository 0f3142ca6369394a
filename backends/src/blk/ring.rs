//! One ring thread per queue: polls the event channel, the engine's completion fd and a
//! waker; copies each request once, validates it ([`Request::parse`]), maps its grants in one
//! batch (or takes them from the persistent cache, or grant-copies them), submits a batch to
//! the engine, and answers completions field by field.
//!
//! Nothing on the request path allocates once the ring is warm: request slots, their segment
//! vectors (recycled through the engine's completions), the indirect-segment buffers and the
//! grant-reference scratch are preallocated (grant-copy mode excepted, see [`GrantMode`]).

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, info, warn, Span};
use xen::abi::blkif::*;
use xen::ring::{BackRing, RingError};
use xen::{
    CopyDir, CopySegment, DomId, EventChannels, GrantMapping, GrantRef, GrantTables, Port,
    SharedMem, XenHost, PAGE_SIZE,
};
use xenbus::backend::DeviceCtx;

use super::engine::{Completion, Engine, EngineError, IoOp, IoRequest, IoSeg};
use super::grants::{Lookup, PersistentGrants};
use super::metrics::{add, sub, BlkMetrics};
use super::request::{BadRequest, DiskLimits, Op, Request, Seg, Segments, MAX_INDIRECT_SEGMENTS};
use super::{BlkError, DevShared, GrantMode, Protocol};
use crate::ratelimit::TokenBucket;

/// Grant-copy mode: writes whose data is copied in by one grant copy, at most.
const COPY_IN_BATCH: usize = 16;

/// Wakes a ring thread (stop, or a control message).
#[derive(Debug)]
pub(crate) struct Waker {
    fd: EventFd,
    stop: AtomicBool,
}

impl Waker {
    pub(crate) fn wake(&self) {
        let _ = self.fd.write(1);
    }
}

/// Messages to a ring thread.
pub(crate) enum Ctl {
    /// Re-read the disk size; answer with the new capacity in bytes.
    Refresh(mpsc::Sender<Result<u64, EngineError>>),
}

/// How the device reaches a running queue.
pub(crate) struct QueueHandle {
    pub(crate) waker: Arc<Waker>,
    pub(crate) ctl: mpsc::Sender<Ctl>,
    thread: Option<JoinHandle<()>>,
}

impl QueueHandle {
    /// Stops the thread after its in-flight I/O completes and a final flush; waits for it.
    pub(crate) fn stop(mut self) {
        self.waker.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything a queue needs to start.
pub(crate) struct QueueParams {
    pub host: Arc<dyn XenHost>,
    pub ctx: DeviceCtx,
    pub domid: DomId,
    pub queue: u32,
    pub ring_refs: Vec<GrantRef>,
    pub port: Port,
    pub protocol: Protocol,
    pub persistent: bool,
    pub grant_mode: GrantMode,
    pub max_persistent_grants: usize,
    /// Kick the engine after this many requests taken from the ring (and when it is empty).
    pub submit_batch: u32,
    /// Busy-poll window before sleeping (`BlkConfig::poll_us`), nanoseconds; 0: never.
    pub poll_ns: u64,
    pub limits: DiskLimits,
    pub engine: Box<dyn Engine>,
    pub shared: Arc<DevShared>,
    pub span: Span,
}

enum Ring {
    Native(BackRing<BlkifRequest, BlkifResponse, GrantMapping>),
    X86_32(BackRing<BlkifX86_32Request, BlkifX86_32Response, GrantMapping>),
}

impl Ring {
    /// Copies the next request once and validates it.
    fn next(
        &mut self,
        disk: &DiskLimits,
    ) -> Result<Option<Result<Request, BadRequest>>, RingError> {
        Ok(match self {
            Ring::Native(r) => r.copy_request()?.map(|raw| Request::parse(&raw, disk)),
            Ring::X86_32(r) => r
                .copy_request()?
                .map(|raw| Request::parse_x86_32(&raw, disk)),
        })
    }

    /// Writes a response field by field (explicit zero padding: XSA-216).
    fn respond(&mut self, id: u64, operation: u8, status: i16) -> Result<(), RingError> {
        let rsp = BlkifResponse {
            id,
            operation,
            _pad0: 0,
            status,
            _pad1: [0; 4],
        };
        match self {
            Ring::Native(r) => r.push_response(&rsp),
            Ring::X86_32(r) => r.push_response(&BlkifX86_32Response::from_native(&rsp)),
        }
    }

    fn push_and_check_notify(&mut self) -> Result<bool, RingError> {
        match self {
            Ring::Native(r) => r.push_responses_and_check_notify(),
            Ring::X86_32(r) => r.push_responses_and_check_notify(),
        }
    }

    fn final_check(&mut self) -> Result<bool, RingError> {
        match self {
            Ring::Native(r) => r.final_check_for_requests(),
            Ring::X86_32(r) => r.final_check_for_requests(),
        }
    }

    /// Whether the frontend has published requests we have not taken (one read of
    /// `req_prod`; impossible indices count as work, for the pass to deal with).
    fn has_requests(&self) -> bool {
        match self {
            Ring::Native(r) => r.unconsumed_requests().map_or(true, |n| n > 0),
            Ring::X86_32(r) => r.unconsumed_requests().map_or(true, |n| n > 0),
        }
    }

    fn size(&self) -> u32 {
        match self {
            Ring::Native(r) => r.size(),
            Ring::X86_32(r) => r.size(),
        }
    }
}

/// What a poll window found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Polled {
    /// Requests on the ring (seen in `req_prod`, with or without an event).
    Ring,
    /// A readable descriptor: an event, completions, the waker.
    Descriptor,
    /// Nothing: the window ran out.
    Nothing,
}

/// The most late events excused from the spurious count (a bound, so that a frontend cannot
/// bank an unlimited number).
const MAX_EARLY_TAKES: u32 = 64;

/// How long the ring thread waits before reaping again after a failed reap, milliseconds.
const REAP_RETRY_MS: u8 = 1;

/// One request slot, preallocated.
struct Slot {
    req: Option<Request>,
    /// Segment vector, recycled through the engine.
    segs: Vec<IoSeg>,
    /// Validated indirect segments.
    iseg: Vec<Seg>,
    /// The batch mapping of a non-persistent request (unmapped before the response).
    mapping: Option<Arc<GrantMapping>>,
    /// Grant-copy mode: bounce pages, one per segment.
    bounce: Vec<Arc<SharedMem>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Barrier {
    None,
    /// A barrier waits in this slot for everything before it to complete.
    Waiting(usize),
    /// The barrier in this slot is running; nothing else starts until it completes.
    Running(usize),
}

struct Queue {
    ring: Ring,
    gnttab: Box<dyn GrantTables>,
    evtchn: Box<dyn EventChannels>,
    local: Port,
    engine: Box<dyn Engine>,
    ctx: DeviceCtx,
    domid: DomId,
    queue: u32,
    limits: DiskLimits,
    persistent: Option<PersistentGrants>,
    grant_mode: GrantMode,
    shared: Arc<DevShared>,
    waker: Arc<Waker>,
    ctl: mpsc::Receiver<Ctl>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    submit_batch: u32,
    /// Busy-poll window, nanoseconds (0: sleep at once).
    poll_ns: u64,
    /// The last engine reap failed: reap again after a short timeout.
    reap_owed: bool,
    /// Batches of requests that polling took before their event was delivered: as many
    /// later events that find nothing are theirs, not spurious (at most MAX_EARLY_TAKES).
    early_takes: u32,
    /// Requests started since the last engine kick.
    unkicked: u32,
    /// Where the last request taken from the ring ended (a request starting there continues
    /// a sequential stream).
    next_sector: u64,
    /// Requests handed to the engine (or waiting in `backlog`) and not completed.
    submitted: usize,
    backlog: VecDeque<IoRequest>,
    barrier: Barrier,
    done: Vec<Completion>,
    grefs: Vec<GrantRef>,
    indirect_raw: Vec<u8>,
    indirect_segs: Vec<BlkifRequestSegment>,
    bounce_pool: Vec<Arc<SharedMem>>,
    scratch: Vec<u8>,
    /// Grant-copy mode: the reads a reap finished, and whether each one's copy went through.
    copy_reads: Vec<Completion>,
    copy_ok: Vec<bool>,
    /// Grant-copy mode: slots of writes whose data is still to be copied in from the guest
    /// (all of them in one grant copy at the next kick, then submitted in ring order).
    copy_in: Vec<usize>,
    /// Reused list of a request's uncached grant refs (large requests, batch map).
    miss_grefs: Vec<GrantRef>,
    responses: u32,
    /// Requests started, refused or completed (to tell spurious events).
    work: u64,
    rogue: bool,
    /// The last pass stopped at its budget with requests left on the ring: look again after
    /// one turn of the poll loop instead of sleeping.
    more: bool,
    log_bucket: TokenBucket,
}

/// Starts the ring thread of one queue: maps the ring (one batch of all its refs), binds the
/// event channel (on a handle restricted to the frontend's domain), attaches to the ring.
pub(crate) fn start(p: QueueParams) -> Result<QueueHandle, BlkError> {
    let (domid, devid, queue) = (p.domid, p.ctx.devid(), p.queue);
    let host_err = |source| BlkError::Host {
        domid,
        devid,
        source,
    };
    let gnttab = p.host.open_gnttab().map_err(host_err)?;
    let mapping = gnttab
        .map(domid, &p.ring_refs, true)
        .map_err(|source| BlkError::MapRing {
            domid,
            devid,
            queue,
            source,
        })?;
    add(&p.shared.metrics.grant_maps, 1);
    add(
        &p.shared.metrics.grant_pages_mapped,
        p.ring_refs.len() as u64,
    );
    let ring_err = |source| BlkError::Ring {
        domid,
        devid,
        queue,
        source,
    };
    let ring = match p.protocol {
        Protocol::Native | Protocol::X86_64 => {
            Ring::Native(BackRing::attach_shared(mapping).map_err(ring_err)?)
        }
        Protocol::X86_32 => Ring::X86_32(BackRing::attach_shared(mapping).map_err(ring_err)?),
    };
    let evtchn = p.host.open_evtchn().map_err(host_err)?;
    let bind_err = |source| BlkError::Bind {
        domid,
        devid,
        port: p.port,
        source,
    };
    evtchn.restrict(domid).map_err(bind_err)?;
    let local = evtchn.bind_interdomain(domid, p.port).map_err(bind_err)?;
    let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| {
        BlkError::Os {
            domid,
            devid,
            what: "eventfd",
            source: e.into(),
        }
    })?;
    let waker = Arc::new(Waker {
        fd,
        stop: AtomicBool::new(false),
    });
    let (ctl_tx, ctl_rx) = mpsc::channel();
    let n = ring.size() as usize;
    let slots = (0..n)
        .map(|_| Slot {
            req: None,
            segs: Vec::with_capacity(BLKIF_MAX_SEGMENTS_PER_REQUEST),
            iseg: Vec::new(),
            mapping: None,
            bounce: Vec::new(),
        })
        .collect();
    let mut q = Queue {
        ring,
        gnttab,
        evtchn,
        local,
        engine: p.engine,
        ctx: p.ctx,
        domid,
        queue,
        limits: p.limits,
        persistent: p
            .persistent
            .then(|| PersistentGrants::new(domid, p.max_persistent_grants)),
        grant_mode: p.grant_mode,
        shared: p.shared,
        waker: waker.clone(),
        ctl: ctl_rx,
        slots,
        free: (0..n).rev().collect(),
        submit_batch: p.submit_batch.max(1),
        poll_ns: p.poll_ns,
        reap_owed: false,
        early_takes: 0,
        unkicked: 0,
        next_sector: u64::MAX,
        submitted: 0,
        backlog: VecDeque::with_capacity(n),
        barrier: Barrier::None,
        done: Vec::with_capacity(n),
        grefs: Vec::with_capacity(usize::from(MAX_INDIRECT_SEGMENTS)),
        indirect_raw: vec![0u8; usize::from(MAX_INDIRECT_SEGMENTS) * 8],
        indirect_segs: vec![BlkifRequestSegment::default(); usize::from(MAX_INDIRECT_SEGMENTS)],
        bounce_pool: Vec::new(),
        scratch: Vec::new(),
        copy_reads: Vec::new(),
        copy_ok: Vec::new(),
        copy_in: Vec::new(),
        miss_grefs: Vec::with_capacity(256),
        responses: 0,
        work: 0,
        rogue: false,
        more: false,
        log_bucket: TokenBucket::new(5.0, 20.0),
    };
    let span = tracing::info_span!(parent: &p.span, "blk_queue", queue);
    let thread = std::thread::Builder::new()
        .name(format!("blk-d{domid}-{devid}-q{queue}"))
        .spawn(move || {
            let _g = span.enter();
            q.run();
        })
        .map_err(|source| BlkError::Os {
            domid,
            devid,
            what: "spawning the ring thread",
            source,
        })?;
    debug!(queue, port = p.port, local, "blk ring connected");
    Ok(QueueHandle {
        waker,
        ctl: ctl_tx,
        thread: Some(thread),
    })
}

/// Maps a batch of grants for one request (all or nothing).
fn map_batch(
    gnttab: &dyn GrantTables,
    domid: DomId,
    m: &BlkMetrics,
    refs: &[GrantRef],
    writable: bool,
) -> Result<Arc<GrantMapping>, ()> {
    add(&m.grant_maps, 1);
    match gnttab.map(domid, refs, writable) {
        Ok(map) => {
            add(&m.grant_pages_mapped, refs.len() as u64);
            Ok(Arc::new(map))
        }
        Err(e) => {
            debug!(error = %e, "grant map failed");
            Err(())
        }
    }
}

/// Decodes `blkif_request_segment`s from a private byte copy of an indirect page.
fn decode_segments(bytes: &[u8], out: &mut [BlkifRequestSegment]) {
    for (chunk, s) in bytes.chunks_exact(8).zip(out.iter_mut()) {
        *s = BlkifRequestSegment {
            gref: u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
            first_sect: chunk[4],
            last_sect: chunk[5],
            _pad: [0; 2],
        };
    }
}

impl Queue {
    fn run(&mut self) {
        let mut ports = [0 as Port; 8];
        loop {
            // Which descriptors are readable: only those are read (each read is a syscall on
            // the event path; the evtchn device, the engine's eventfd and the waker are all
            // level-triggered, so nothing readable is missed by the next poll).
            let (events, completions, polled) = {
                let mut fds = [
                    PollFd::new(self.evtchn.fd(), PollFlags::POLLIN),
                    PollFd::new(self.engine.completion_fd(), PollFlags::POLLIN),
                    PollFd::new(self.waker.fd.as_fd(), PollFlags::POLLIN),
                ];
                // Busy-poll first if asked: a request or a completion that comes within the
                // window is taken without the cost of sleeping and being woken.
                let polled = if self.poll_ns > 0 && !self.more {
                    self.spin(&mut fds)
                } else {
                    Polled::Nothing
                };
                // Work left over from a pass that hit its budget, or found by polling: look
                // at the descriptors without sleeping, then go on.
                let timeout = if self.more || polled != Polled::Nothing {
                    PollTimeout::ZERO
                } else if self.reap_owed {
                    PollTimeout::from(REAP_RETRY_MS)
                } else {
                    PollTimeout::NONE
                };
                let ready = match poll(&mut fds, timeout) {
                    Ok(_) => fds.map(|fd| fd.revents().is_some_and(|r| !r.is_empty())),
                    // Interrupted: look at everything.
                    Err(nix::errno::Errno::EINTR) => [true; 3],
                    Err(e) => {
                        warn!(error = %e, "blk ring poll failed; stopping");
                        break;
                    }
                };
                if ready[2] {
                    let _ = self.waker.fd.read();
                }
                (ready[0], ready[1] || self.reap_owed, polled)
            };
            self.more = false;
            if self.waker.stop.load(Ordering::SeqCst) {
                break;
            }
            while let Ok(ctl) = self.ctl.try_recv() {
                match ctl {
                    Ctl::Refresh(reply) => {
                        let r = self.engine.refresh_capacity();
                        if let Ok(bytes) = &r {
                            self.limits.sectors = bytes / BLKIF_SECTOR_SIZE;
                        }
                        let _ = reply.send(r);
                    }
                }
            }
            let mut delivered = false;
            if events {
                // Ports come a buffer at a time; a short read means there are no more.
                while let Ok(n) = self.evtchn.pending(&mut ports) {
                    add(&self.shared.metrics.events, n as u64);
                    delivered |= ports[..n].contains(&self.local);
                    if n < ports.len() {
                        break;
                    }
                }
            }
            let before = self.work;
            self.pass(completions);
            if polled == Polled::Ring && !delivered && self.work > before {
                // Taken before its event: that event may come later and find nothing.
                self.early_takes = self.early_takes.saturating_add(1).min(MAX_EARLY_TAKES);
            }
            if delivered {
                let _ = self.evtchn.unmask(self.local);
                // Requests published between the first pass's final check and the unmask
                // raised no new event: look again. (What finishes meanwhile signals the
                // engine's descriptor and is reaped after the next poll.)
                self.pass(false);
                if self.work == before {
                    if self.early_takes > 0 {
                        // The late event of requests that polling took without it.
                        self.early_takes -= 1;
                    } else {
                        // An event with nothing to do (XSA-332): counted; the port was
                        // unmasked only after the ring was drained, so a flood costs one pass
                        // per event.
                        add(&self.shared.metrics.spurious_events, 1);
                    }
                }
            }
            if self.rogue && self.submitted == 0 {
                break;
            }
        }
        self.shutdown();
    }

    /// Busy-polls for up to the poll window: the ring's producer index (a memory read: the
    /// frontend need not even notify) and the descriptors (an event, a completion, a stop
    /// request). True if something came. Requests only count when the queue can take them
    /// (not behind a barrier, a slot free, the ring not halted): else the thread would spin
    /// without a bound on requests it leaves where they are.
    fn spin(&self, fds: &mut [PollFd]) -> Polled {
        let window = Duration::from_nanos(self.poll_ns);
        let start = Instant::now();
        let takes = !self.rogue && !self.stalled();
        loop {
            let found = if takes && self.ring.has_requests() {
                Polled::Ring
            } else if matches!(poll(fds, PollTimeout::ZERO), Ok(n) if n > 0) {
                Polled::Descriptor
            } else {
                Polled::Nothing
            };
            if found != Polled::Nothing {
                add(&self.shared.metrics.poll_hits, 1);
                return found;
            }
            if start.elapsed() >= window {
                add(&self.shared.metrics.poll_misses, 1);
                return Polled::Nothing;
            }
            std::hint::spin_loop();
        }
    }

    /// Reap (when the engine's descriptor said completions wait), consume, kick, answer.
    fn pass(&mut self, completions: bool) {
        if completions {
            self.reap();
        }
        // Answer what completed before taking new requests, so the frontend can reuse those
        // slots while we submit (Linux's blkback pushes each response as its I/O completes).
        self.publish();
        if !self.rogue {
            self.consume();
        }
        self.publish();
    }

    fn stalled(&self) -> bool {
        self.barrier != Barrier::None || self.free.is_empty()
    }

    /// Takes requests until the ring is empty, every slot is busy, or one ring's worth has been
    /// taken in this call: a frontend that refills as fast as it is answered (with requests
    /// refused at once, which hold no slot) cannot keep the thread here, away from its stop
    /// flag, its completions and publishing responses (Linux's blkback checks
    /// `kthread_should_stop` in the same loop).
    fn consume(&mut self) {
        let budget = self.ring.size().max(1);
        let mut taken = 0u32;
        loop {
            while !self.stalled() {
                if taken >= budget {
                    self.kick();
                    self.more = true;
                    return;
                }
                taken += 1;
                match self.ring.next(&self.limits) {
                    Ok(Some(Ok(req))) => {
                        let follows = req.sector == self.next_sector
                            && matches!(req.op, Op::Read | Op::Write { .. });
                        self.next_sector = req.sector.saturating_add(req.nr_sectors);
                        self.start_request(req);
                        // Start the device on the first requests of a burst while the rest
                        // are still being read from the ring; but hold a request that
                        // continues the previous one, so the block layer can merge a
                        // sequential stream into larger I/Os at the next kick.
                        if !self.copy_in.is_empty() {
                            // A write waiting for its data (grant-copy mode): copied in with
                            // the others at the next kick, or now if enough are waiting.
                            if self.copy_in.len() >= COPY_IN_BATCH {
                                self.kick();
                            }
                        } else if !follows {
                            self.unkicked += 1;
                            if self.unkicked >= self.submit_batch {
                                self.kick();
                            }
                        }
                    }
                    Ok(Some(Err(bad))) => self.refuse(bad),
                    Ok(None) => break,
                    Err(e) => return self.go_rogue(e),
                }
            }
            self.kick();
            if self.stalled() {
                return;
            }
            match self.ring.final_check() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => return self.go_rogue(e),
            }
        }
    }

    fn go_rogue(&mut self, e: RingError) {
        // Requests taken before the ring broke are still served and answered.
        self.kick();
        self.rogue = true;
        add(&self.shared.metrics.rogue_rings, 1);
        warn!(
            queue = self.queue,
            error = %e,
            "frontend broke the ring protocol; halting this ring"
        );
        let _ = self.ctx.report_error(&format!(
            "queue {}: frontend broke the ring protocol ({e}); ring halted",
            self.queue
        ));
    }

    fn refuse(&mut self, bad: BadRequest) {
        add(&self.shared.metrics.bad_requests, 1);
        add(&self.shared.metrics.errors, 1);
        if self.log_bucket.take(1.0) {
            let suppressed = self.log_bucket.take_denied();
            warn!(queue = self.queue, error = %bad, suppressed, "refusing a malformed request");
        }
        self.respond(bad.id, bad.op, bad.status());
    }

    fn respond(&mut self, id: u64, op: u8, status: i16) {
        self.work += 1;
        // Only fails if no request is outstanding, which cannot happen here.
        if self.ring.respond(id, op, status).is_ok() {
            self.responses += 1;
        }
    }

    fn publish(&mut self) {
        if self.responses == 0 {
            return;
        }
        self.responses = 0;
        if let Ok(true) = self.ring.push_and_check_notify() {
            add(&self.shared.metrics.notifications, 1);
            let _ = self.evtchn.notify(self.local);
        }
    }

    fn fail_slot(&mut self, idx: usize, status: i16) {
        let slot = &mut self.slots[idx];
        slot.segs.clear();
        slot.mapping = None;
        self.bounce_pool.append(&mut slot.bounce);
        let req = slot.req.take();
        self.free.push(idx);
        if let Some(r) = req {
            add(&self.shared.metrics.errors, 1);
            self.respond(r.id, r.rsp_op, status);
        }
    }

    fn start_request(&mut self, mut req: Request) {
        self.work += 1;
        let Some(idx) = self.free.pop() else {
            // Unreachable (one slot per ring entry and `stalled()` checks), but never drop a
            // consumed request without an answer.
            return self.respond(req.id, req.rsp_op, BLKIF_RSP_ERROR);
        };
        // Indirect: copy the segment pages once into private memory, then validate.
        if let Segments::Indirect {
            pages,
            nr_pages,
            nr_segments,
        } = req.segments
        {
            add(&self.shared.metrics.indirect, 1);
            let bytes = usize::from(nr_segments) * 8;
            let pages = &pages[..usize::from(nr_pages)];
            if self.read_indirect(pages, bytes).is_err() {
                add(&self.shared.metrics.grant_errors, 1);
                self.slots[idx].req = Some(req);
                return self.fail_slot(idx, BLKIF_RSP_ERROR);
            }
            decode_segments(&self.indirect_raw[..bytes], &mut self.indirect_segs);
            let mut iseg = std::mem::take(&mut self.slots[idx].iseg);
            let r = req.parse_indirect(
                &self.indirect_segs[..usize::from(nr_segments)],
                &self.limits,
                &mut iseg,
            );
            self.slots[idx].iseg = iseg;
            if let Err(bad) = r {
                self.free.push(idx);
                return self.refuse(bad);
            }
        }
        let deferred = self.grant_mode == GrantMode::Copy && matches!(req.op, Op::Write { .. });
        if !deferred {
            // Writes waiting for their data go first: requests reach the engine in ring order.
            self.flush_copy_in();
        }
        self.slots[idx].req = Some(req);
        if let Err(status) = self.attach_memory(idx, &req) {
            add(&self.shared.metrics.grant_errors, 1);
            return self.fail_slot(idx, status);
        }
        if deferred {
            self.copy_in.push(idx);
            return;
        }
        if req.op == Op::Barrier && self.submitted > 0 {
            self.barrier = Barrier::Waiting(idx);
            return;
        }
        self.submit(idx);
    }

    /// Copies the first `bytes` of the indirect pages into `indirect_raw` (once).
    fn read_indirect(&mut self, pages: &[GrantRef], bytes: usize) -> Result<(), ()> {
        let per_page = PAGE_SIZE;
        if self.grant_mode == GrantMode::Copy {
            let mut segs: Vec<CopySegment<'_>> = Vec::with_capacity(pages.len());
            for (g, chunk) in pages
                .iter()
                .zip(self.indirect_raw[..bytes].chunks_mut(per_page))
            {
                segs.push(CopySegment {
                    domid: self.domid,
                    gref: *g,
                    offset: 0,
                    local: CopyDir::FromGuest(chunk),
                    status: 0,
                });
            }
            add(&self.shared.metrics.grant_copies, 1);
            self.gnttab.copy(&mut segs).map_err(|_| ())?;
            return if segs.iter().all(|s| s.status == 0) {
                Ok(())
            } else {
                Err(())
            };
        }
        for (i, g) in pages.iter().enumerate() {
            let start = i * per_page;
            let end = bytes.min(start + per_page);
            if start >= end {
                break;
            }
            let mapping = match self.persistent.as_mut() {
                Some(cache) => match cache.get(self.gnttab.as_ref(), *g) {
                    Ok((Lookup::Hit(m), _)) => {
                        add(&self.shared.metrics.persistent_hits, 1);
                        m
                    }
                    Ok((Lookup::Mapped(m), ev)) => {
                        add(&self.shared.metrics.persistent_misses, 1);
                        add(&self.shared.metrics.persistent_evictions, ev);
                        add(&self.shared.metrics.grant_maps, 1);
                        add(&self.shared.metrics.grant_pages_mapped, 1);
                        m
                    }
                    // Full, or a page granted read-only: map it for this request only.
                    Ok((Lookup::Full, _)) | Err(_) => map_batch(
                        self.gnttab.as_ref(),
                        self.domid,
                        &self.shared.metrics,
                        &[*g],
                        false,
                    )?,
                },
                None => map_batch(
                    self.gnttab.as_ref(),
                    self.domid,
                    &self.shared.metrics,
                    &[*g],
                    false,
                )?,
            };
            mapping
                .mem()
                .read(0, &mut self.indirect_raw[start..end])
                .map_err(|_| ())?;
        }
        Ok(())
    }

    /// Builds the slot's I/O segments over the guest's pages. On error nothing stays mapped
    /// for this request (persistent pages stay in the cache).
    fn attach_memory(&mut self, idx: usize, req: &Request) -> Result<(), i16> {
        let device_writes = req.op.device_writes_memory();
        let mut segs = std::mem::take(&mut self.slots[idx].segs);
        segs.clear();
        let iseg = std::mem::take(&mut self.slots[idx].iseg);
        let list: &[Seg] = match req.segments {
            Segments::Direct { .. } => req.direct_segments(),
            Segments::Indirect { .. } => &iseg,
            Segments::None => &[],
        };
        let r = if list.is_empty() {
            Ok(())
        } else {
            match self.grant_mode {
                GrantMode::Copy => {
                    let defer = matches!(req.op, Op::Write { .. });
                    self.attach_copy(idx, list, device_writes, defer, &mut segs)
                }
                GrantMode::Map => self.attach_map(idx, list, device_writes, &mut segs),
            }
        };
        let slot = &mut self.slots[idx];
        slot.segs = segs;
        slot.iseg = iseg;
        if r.is_err() {
            slot.segs.clear();
            slot.mapping = None;
        }
        r
    }

    fn attach_map(
        &mut self,
        idx: usize,
        list: &[Seg],
        device_writes: bool,
        segs: &mut Vec<IoSeg>,
    ) -> Result<(), i16> {
        let err = BLKIF_RSP_ERROR;
        if let Some(cache) = self.persistent.as_mut() {
            // A large request (indirect) whose uncached pages do not fit in the cache's free
            // room is not cached page by page: that would map one page per call and evict one
            // page per miss (a 1 MiB read at QD32 thrashed a 1056-page cache this way). Its
            // misses are mapped in one batch for this request only; hits are still used.
            let misses = list.iter().filter(|s| !cache.contains(s.gref)).count();
            if misses > BLKIF_MAX_SEGMENTS_PER_REQUEST && misses > cache.room() {
                let mut grefs = std::mem::take(&mut self.miss_grefs);
                grefs.clear();
                grefs.extend(
                    list.iter()
                        .filter(|s| !cache.contains(s.gref))
                        .map(|s| s.gref),
                );
                let batch = map_batch(
                    self.gnttab.as_ref(),
                    self.domid,
                    &self.shared.metrics,
                    &grefs,
                    device_writes,
                );
                let mut next = 0usize;
                let mut out = Ok(());
                if let Ok(batch) = &batch {
                    for s in list {
                        let seg = match cache.hit(s.gref) {
                            Some(m) => {
                                add(&self.shared.metrics.persistent_hits, 1);
                                IoSeg::new(m, s.offset(), s.len(), device_writes)
                            }
                            None => {
                                add(&self.shared.metrics.persistent_misses, 1);
                                let at = next * PAGE_SIZE + s.offset();
                                next += 1;
                                IoSeg::new(batch.clone(), at, s.len(), device_writes)
                            }
                        };
                        match seg {
                            Ok(seg) => segs.push(seg),
                            Err(_) => {
                                out = Err(err);
                                break;
                            }
                        }
                    }
                }
                self.miss_grefs = grefs;
                return batch.map_err(|_| err).and(out);
            }
            // Pages the full cache cannot take are mapped for this request only.
            for s in list {
                match cache.get(self.gnttab.as_ref(), s.gref) {
                    Ok((Lookup::Hit(m), _)) => {
                        add(&self.shared.metrics.persistent_hits, 1);
                        segs.push(
                            IoSeg::new(m, s.offset(), s.len(), device_writes).map_err(|_| err)?,
                        );
                    }
                    Ok((Lookup::Mapped(m), ev)) => {
                        add(&self.shared.metrics.persistent_misses, 1);
                        add(&self.shared.metrics.persistent_evictions, ev);
                        add(&self.shared.metrics.grant_maps, 1);
                        add(&self.shared.metrics.grant_pages_mapped, 1);
                        segs.push(
                            IoSeg::new(m, s.offset(), s.len(), device_writes).map_err(|_| err)?,
                        );
                    }
                    Ok((Lookup::Full, _)) => {
                        // Every cached page is in use: map this one for this request only.
                        let m = map_batch(
                            self.gnttab.as_ref(),
                            self.domid,
                            &self.shared.metrics,
                            &[s.gref],
                            device_writes,
                        )
                        .map_err(|_| err)?;
                        segs.push(
                            IoSeg::new(m, s.offset(), s.len(), device_writes).map_err(|_| err)?,
                        );
                    }
                    Err(e) => {
                        // Not mappable writable (a page granted read-only for a write, or a
                        // bad reference): try it for this request only, as the op needs.
                        debug!(error = %e, gref = s.gref, "persistent grant map failed");
                        let m = map_batch(
                            self.gnttab.as_ref(),
                            self.domid,
                            &self.shared.metrics,
                            &[s.gref],
                            device_writes,
                        )
                        .map_err(|_| err)?;
                        segs.push(
                            IoSeg::new(m, s.offset(), s.len(), device_writes).map_err(|_| err)?,
                        );
                    }
                }
            }
            return Ok(());
        }
        self.grefs.clear();
        self.grefs.extend(list.iter().map(|s| s.gref));
        let refs = std::mem::take(&mut self.grefs);
        let m = map_batch(
            self.gnttab.as_ref(),
            self.domid,
            &self.shared.metrics,
            &refs,
            device_writes,
        );
        self.grefs = refs;
        let m = m.map_err(|_| err)?;
        for (i, s) in list.iter().enumerate() {
            let off = i * PAGE_SIZE + s.offset();
            segs.push(IoSeg::new(m.clone(), off, s.len(), device_writes).map_err(|_| err)?);
        }
        self.slots[idx].mapping = Some(m);
        Ok(())
    }

    fn bounce_page(&mut self) -> Result<Arc<SharedMem>, i16> {
        match self.bounce_pool.pop() {
            Some(p) => Ok(p),
            None => SharedMem::anonymous(PAGE_SIZE)
                .map(Arc::new)
                .map_err(|_| BLKIF_RSP_ERROR),
        }
    }

    /// Bounce pages for the request in slot `idx`. The guest's data for a device read of
    /// memory (a write) is copied in now, or with `defer` by `flush_copy_in`.
    fn attach_copy(
        &mut self,
        idx: usize,
        list: &[Seg],
        device_writes: bool,
        defer: bool,
        segs: &mut Vec<IoSeg>,
    ) -> Result<(), i16> {
        let err = BLKIF_RSP_ERROR;
        let mut bounce = std::mem::take(&mut self.slots[idx].bounce);
        for _ in 0..list.len() {
            match self.bounce_page() {
                Ok(p) => bounce.push(p),
                Err(e) => {
                    self.bounce_pool.append(&mut bounce);
                    return Err(e);
                }
            }
        }
        let r = (|| {
            if !device_writes && !defer {
                self.copy_segments(list, &bounce, false)?;
            }
            for (s, b) in list.iter().zip(&bounce) {
                let mem: Arc<dyn super::engine::IoMem> = b.clone();
                segs.push(IoSeg::new(mem, s.offset(), s.len(), device_writes).map_err(|_| err)?);
            }
            Ok(())
        })();
        if r.is_err() {
            segs.clear();
            self.bounce_pool.append(&mut bounce);
        }
        self.slots[idx].bounce = bounce;
        r
    }

    /// Grant-copies between the guest's segments and the bounce pages, one batch.
    fn copy_segments(
        &mut self,
        list: &[Seg],
        bounce: &[Arc<SharedMem>],
        to_guest: bool,
    ) -> Result<(), i16> {
        let err = BLKIF_RSP_ERROR;
        let need = list.len() * PAGE_SIZE;
        if self.scratch.len() < need {
            self.scratch.resize(need, 0);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = (|| {
            if to_guest {
                for ((s, b), chunk) in list.iter().zip(bounce).zip(scratch.chunks_mut(PAGE_SIZE)) {
                    b.read(s.offset(), &mut chunk[..s.len()]).map_err(|_| err)?;
                }
            }
            let mut cs: Vec<CopySegment<'_>> = Vec::with_capacity(list.len());
            for (s, chunk) in list.iter().zip(scratch.chunks_mut(PAGE_SIZE)) {
                let local = &mut chunk[..s.len()];
                cs.push(CopySegment {
                    domid: self.domid,
                    gref: s.gref,
                    offset: s.offset() as u16,
                    local: if to_guest {
                        CopyDir::ToGuest(local)
                    } else {
                        CopyDir::FromGuest(local)
                    },
                    status: 0,
                });
            }
            add(&self.shared.metrics.grant_copies, 1);
            self.gnttab.copy(&mut cs).map_err(|_| err)?;
            if cs.iter().any(|c| c.status != 0) {
                return Err(err);
            }
            drop(cs);
            if !to_guest {
                for ((s, b), chunk) in list.iter().zip(bounce).zip(scratch.chunks(PAGE_SIZE)) {
                    b.write(s.offset(), &chunk[..s.len()]).map_err(|_| err)?;
                }
            }
            Ok(())
        })();
        self.scratch = scratch;
        r
    }

    fn submit(&mut self, idx: usize) {
        let slot = &mut self.slots[idx];
        let Some(req) = slot.req else {
            return;
        };
        let has_data = !slot.segs.is_empty();
        let (op, fua) = match req.op {
            Op::Read => (IoOp::Read, false),
            Op::Write { flush } => (IoOp::Write, flush),
            Op::Flush => (IoOp::Flush, false),
            Op::Barrier if has_data => (IoOp::Write, true),
            Op::Barrier => (IoOp::Flush, false),
            Op::Discard { secure: false } => (IoOp::Discard, false),
            Op::Discard { secure: true } => (IoOp::SecureDiscard, false),
        };
        if req.op == Op::Barrier {
            self.barrier = Barrier::Running(idx);
        }
        let io = IoRequest {
            tag: idx as u64,
            op,
            offset: req.sector.saturating_mul(BLKIF_SECTOR_SIZE),
            len: req.nr_sectors.saturating_mul(BLKIF_SECTOR_SIZE),
            segs: std::mem::take(&mut slot.segs),
            fua,
        };
        self.submitted += 1;
        add(&self.shared.metrics.in_flight, 1);
        if let Err(io) = self.engine.queue(io) {
            self.backlog.push_back(io);
        }
    }

    fn kick(&mut self) {
        self.flush_copy_in();
        self.unkicked = 0;
        if let Err(e) = self.engine.kick() {
            if self.log_bucket.take(1.0) {
                warn!(queue = self.queue, error = %e, "engine kick failed");
            }
        }
    }

    /// Takes what the engine finished: once per signal of its descriptor. What finishes
    /// meanwhile, or what the kernel keeps for a later batch (Linux 6.13+ runs at most 20
    /// deferred io_uring completions per enter), signals it again and is reaped after the
    /// next poll.
    fn reap(&mut self) {
        self.done.clear();
        // An error (resubmitting the rest of a short transfer failed) still hands over
        // what finished.
        // A failed reap may have consumed the descriptor's signal and left completions
        // behind (io_uring's deferred completion work signals only when it goes from none to
        // some): try again after REAP_RETRY_MS rather than wait for a signal.
        let r = self.engine.reap(&mut self.done);
        self.reap_owed = r.is_err();
        if let Err(e) = r {
            if self.log_bucket.take(1.0) {
                warn!(queue = self.queue, error = %e, "engine reap failed");
            }
        }
        if self.done.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        if self.grant_mode == GrantMode::Copy {
            // Every read this reap finished goes to the guest in one grant copy.
            let mut reads = std::mem::take(&mut self.copy_reads);
            for c in done.drain(..) {
                if self.is_copied_read(&c) {
                    reads.push(c);
                } else {
                    self.complete(c, None);
                }
            }
            if !reads.is_empty() {
                let mut ok = std::mem::take(&mut self.copy_ok);
                self.copy_reads_to_guest(&reads, &mut ok);
                for (c, good) in reads.drain(..).zip(ok.iter().copied()) {
                    self.complete(c, Some(good));
                }
                self.copy_ok = ok;
            }
            self.copy_reads = reads;
        } else {
            for c in done.drain(..) {
                self.complete(c, None);
            }
        }
        self.done = done;
        // Room in the engine again: move the backlog in.
        while let Some(io) = self.backlog.pop_front() {
            if let Err(io) = self.engine.queue(io) {
                self.backlog.push_front(io);
                break;
            }
        }
        if let Barrier::Waiting(idx) = self.barrier {
            if self.submitted == 0 {
                self.submit(idx);
            }
        }
        self.kick();
    }

    /// A read that completed well in grant-copy mode: its data still has to reach the guest.
    fn is_copied_read(&self, c: &Completion) -> bool {
        c.result.is_ok()
            && self
                .slots
                .get(c.tag as usize)
                .and_then(|s| s.req.as_ref())
                .is_some_and(|r| r.op == Op::Read)
    }

    /// Grant-copies the data of finished reads from their bounce pages to the guest, all in
    /// one batch; `ok[i]` says whether every segment of `reads[i]` arrived.
    fn copy_reads_to_guest(&mut self, reads: &[Completion], ok: &mut Vec<bool>) {
        ok.clear();
        let mut nsegs = 0usize;
        for c in reads {
            nsegs += self.request_segments(c.tag as usize).len();
        }
        let need = nsegs * PAGE_SIZE;
        if self.scratch.len() < need {
            self.scratch.resize(need, 0);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        // Out of the bounce pages first (a page that cannot be read fails its request).
        // (Every segment takes its chunk, so a failed request leaves the next ones aligned.)
        let mut chunks = scratch.chunks_mut(PAGE_SIZE);
        for c in reads {
            let idx = c.tag as usize;
            let bounce = &self.slots[idx].bounce;
            let mut good = true;
            for (j, s) in self.request_segments(idx).iter().enumerate() {
                let chunk = chunks.next();
                good = good
                    && match (chunk, bounce.get(j)) {
                        (Some(c), Some(b)) => b.read(s.offset(), &mut c[..s.len()]).is_ok(),
                        _ => false,
                    };
            }
            ok.push(good);
        }
        let mut cs: Vec<CopySegment<'_>> = Vec::with_capacity(nsegs);
        let mut chunks = scratch.chunks_mut(PAGE_SIZE);
        for c in reads {
            for s in self.request_segments(c.tag as usize) {
                let Some(chunk) = chunks.next() else { break };
                cs.push(CopySegment {
                    domid: self.domid,
                    gref: s.gref,
                    offset: s.offset() as u16,
                    local: CopyDir::ToGuest(&chunk[..s.len()]),
                    status: 0,
                });
            }
        }
        add(&self.shared.metrics.grant_copies, 1);
        let copied = self.gnttab.copy(&mut cs).is_ok();
        let mut at = 0usize;
        for (i, c) in reads.iter().enumerate() {
            let n = self.request_segments(c.tag as usize).len();
            let segs_ok = cs
                .get(at..at + n)
                .is_some_and(|v| v.iter().all(|x| x.status == 0));
            ok[i] = ok[i] && copied && segs_ok;
            at += n;
        }
        drop(cs);
        self.scratch = scratch;
    }

    /// Grant-copies the data of the writes in `copy_in` from the guest into their bounce pages,
    /// all in one batch, then submits each (or fails it: a segment the guest did not grant).
    fn flush_copy_in(&mut self) {
        if self.copy_in.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.copy_in);
        let nsegs: usize = pending
            .iter()
            .map(|&i| self.request_segments(i).len())
            .sum();
        let need = nsegs * PAGE_SIZE;
        if self.scratch.len() < need {
            self.scratch.resize(need, 0);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut cs: Vec<CopySegment<'_>> = Vec::with_capacity(nsegs);
        for (s, chunk) in pending
            .iter()
            .flat_map(|&i| self.request_segments(i))
            .zip(scratch.chunks_mut(PAGE_SIZE))
        {
            cs.push(CopySegment {
                domid: self.domid,
                gref: s.gref,
                offset: s.offset() as u16,
                local: CopyDir::FromGuest(&mut chunk[..s.len()]),
                status: 0,
            });
        }
        add(&self.shared.metrics.grant_copies, 1);
        let copied = self.gnttab.copy(&mut cs).is_ok();
        let mut ok = std::mem::take(&mut self.copy_ok);
        ok.clear();
        let mut at = 0usize;
        for &i in &pending {
            let n = self.request_segments(i).len();
            ok.push(
                copied
                    && cs
                        .get(at..at + n)
                        .is_some_and(|v| v.iter().all(|x| x.status == 0)),
            );
            at += n;
        }
        drop(cs);
        // Into the bounce pages the engine will read.
        // (Every segment takes its chunk, so a failed request leaves the next ones aligned.)
        let mut chunks = scratch.chunks(PAGE_SIZE);
        for (k, &i) in pending.iter().enumerate() {
            let bounce = &self.slots[i].bounce;
            let mut good = ok[k];
            for (j, s) in self.request_segments(i).iter().enumerate() {
                let chunk = chunks.next();
                good = good
                    && matches!((chunk, bounce.get(j)), (Some(c), Some(b))
                        if b.write(s.offset(), &c[..s.len()]).is_ok());
            }
            ok[k] = good;
        }
        self.scratch = scratch;
        for (k, &i) in pending.iter().enumerate() {
            if ok[k] {
                self.submit(i);
            } else {
                add(&self.shared.metrics.grant_errors, 1);
                self.fail_slot(i, BLKIF_RSP_ERROR);
            }
        }
        self.copy_ok = ok;
        let mut pending = pending;
        pending.clear();
        self.copy_in = pending;
    }

    /// The guest segments of the request in slot `idx` (its indirect list, or the direct one).
    fn request_segments(&self, idx: usize) -> &[Seg] {
        let slot = &self.slots[idx];
        match slot.req.as_ref().map(|r| &r.segments) {
            Some(Segments::Indirect { .. }) => &slot.iseg,
            Some(_) => slot.req.as_ref().map_or(&[], |r| r.direct_segments()),
            None => &[],
        }
    }

    /// Finishes the request of `c`. `copied`: for a read in grant-copy mode, whether its data
    /// already reached the guest (batched by `reap`); `None` copies here if needed.
    fn complete(&mut self, c: Completion, copied: Option<bool>) {
        let idx = c.tag as usize;
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        let Some(req) = slot.req.take() else {
            return;
        };
        self.submitted = self.submitted.saturating_sub(1);
        sub(&self.shared.metrics.in_flight, 1);
        let mut segs = c.segs;
        segs.clear();
        slot.segs = segs;
        let mut status = match c.result {
            Ok(_) => BLKIF_RSP_OKAY,
            Err(errno) if errno == libc::EOPNOTSUPP => BLKIF_RSP_EOPNOTSUPP,
            Err(_) => BLKIF_RSP_ERROR,
        };
        if let (Some(false), BLKIF_RSP_OKAY) = (copied, status) {
            add(&self.shared.metrics.grant_errors, 1);
            status = BLKIF_RSP_ERROR;
        }
        if copied.is_none()
            && status == BLKIF_RSP_OKAY
            && req.op == Op::Read
            && self.grant_mode == GrantMode::Copy
        {
            let bounce = std::mem::take(&mut self.slots[idx].bounce);
            let iseg = std::mem::take(&mut self.slots[idx].iseg);
            let list: &[Seg] = match req.segments {
                Segments::Indirect { .. } => &iseg,
                _ => req.direct_segments(),
            };
            if self.copy_segments(list, &bounce, true).is_err() {
                add(&self.shared.metrics.grant_errors, 1);
                status = BLKIF_RSP_ERROR;
            }
            self.slots[idx].bounce = bounce;
            self.slots[idx].iseg = iseg;
        }
        let slot = &mut self.slots[idx];
        // Unmap (non-persistent) before the response is visible (XSA-396 class).
        slot.mapping = None;
        self.bounce_pool.append(&mut slot.bounce);
        self.free.push(idx);
        let m = &self.shared.metrics;
        let bytes = req.nr_sectors.saturating_mul(BLKIF_SECTOR_SIZE);
        if status == BLKIF_RSP_OKAY {
            match req.op {
                Op::Read => {
                    add(&m.reads, 1);
                    add(&m.bytes_read, bytes);
                }
                Op::Write { .. } => {
                    add(&m.writes, 1);
                    add(&m.bytes_written, bytes);
                }
                Op::Flush => add(&m.flushes, 1),
                Op::Barrier => {
                    add(&m.barriers, 1);
                    add(&m.bytes_written, bytes);
                }
                Op::Discard { .. } => add(&m.discards, 1),
            }
        } else {
            add(&m.errors, 1);
        }
        if self.barrier == Barrier::Running(idx) {
            self.barrier = Barrier::None;
        }
        self.respond(req.id, req.rsp_op, status);
    }

    /// Waits for in-flight I/O, flushes, and releases every mapping.
    fn shutdown(&mut self) {
        self.kick();
        if let Barrier::Waiting(idx) = self.barrier {
            if self.submitted == 0 {
                self.submit(idx);
                self.kick();
            }
        }
        self.drain_in_flight();
        // A final flush so that what the guest wrote is durable once we report Closed.
        if !self.limits.read_only {
            let io = IoRequest {
                tag: u64::MAX,
                op: IoOp::Flush,
                offset: 0,
                len: 0,
                segs: Vec::new(),
                fua: false,
            };
            if self.engine.queue(io).is_ok() {
                self.kick();
                self.wait_engine_idle();
            }
        }
        self.publish();
        for s in &mut self.slots {
            s.segs.clear();
            s.mapping = None;
            s.bounce.clear();
        }
        self.bounce_pool.clear();
        if let Some(c) = self.persistent.as_mut() {
            c.clear();
        }
        info!(queue = self.queue, "blk ring stopped");
    }

    fn drain_in_flight(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.submitted > 0 && std::time::Instant::now() < deadline {
            if !self.wait_completion_fd() {
                break;
            }
            self.reap();
        }
        if self.submitted > 0 {
            warn!(
                queue = self.queue,
                in_flight = self.submitted,
                "I/O still in flight at disconnect"
            );
        }
    }

    fn wait_engine_idle(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.engine.in_flight() > 0 && std::time::Instant::now() < deadline {
            if !self.wait_completion_fd() {
                break;
            }
            self.done.clear();
            let _ = self.engine.reap(&mut self.done);
            self.done.clear();
        }
    }

    fn wait_completion_fd(&self) -> bool {
        let mut fds = [PollFd::new(self.engine.completion_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).is_ok()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let _ = self.evtchn.unbind(self.local);
    }
}

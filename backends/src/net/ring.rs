//! The vif thread: one per connected vif, serving all its queues' TX and RX rings, the
//! control ring and the engine queues from one poll loop.
//!
//! TX: every published request is copied once into a private queue ([`parse_tx`] then only
//! reads those copies). Packets are packed into a preallocated arena and their data fetched
//! with one batched grant copy per pass; each frame goes to its engine queue with a
//! `virtio_net_hdr` ([`offload::tx_header`]), then every slot is answered (extras NULL).
//!
//! RX: frames read from any engine queue are steered to a guest queue (the frontend's Toeplitz
//! mapping, else the engine queue's index), filtered (multicast control), and queued in a
//! backlog bounded in packets and bytes (XSA-392: a guest that posts no buffers costs drops,
//! not memory). A frame leaves the backlog only when the frontend has posted enough buffers
//! for all its slots; one batched grant copy per pass fills them, never beyond a page.
//!
//! Nothing is freed or called back under a lock (XSA-424): the thread owns all its state.
//! Nothing on the packet path allocates once warm: the TX queue, arena, copy batches, RX
//! buffers (recycled) and response plans are preallocated or reused.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, warn, Span};
use xen::abi::netif::*;
use xen::ring::{BackRing, RingError};
use xen::{CopyDir, CopySegment, DomId, EventChannels, GrantMapping, GrantTables, Port, XenHost};
use xenbus::backend::DeviceCtx;

use super::engine::{NetQueueIo, VirtioNetHdr};
use super::hash::{is_filtered_multicast, FrameHash, HashConfig, McastFilter};
use super::metrics::{add, set, NetMetrics};
use super::offload;
use super::request::{parse_tx, TxFatal, TxPacket, TxParse};
use super::xenbus::{FrontendChoice, Rate};
use super::NetError;
use crate::ratelimit::TokenBucket;

/// Bytes of TX frames fetched per grant-copy batch (one 64 KiB super-frame and more; xensim
/// carries a batch in one message of at most 160 KiB).
const TX_ARENA: usize = 128 * 1024;
/// Bytes of RX frames delivered per grant-copy batch (at least one frame).
const RX_BATCH_BYTES: usize = 128 * 1024;
/// The engine's receive buffer: one byte more than the largest frame (64 KiB of payload
/// plus an Ethernet header), so that a frame the kernel cut to fit fills it and is dropped.
const RX_MAX_FRAME: usize = super::tap::MAX_FRAME + 1;
/// Frames read from the engine per queue per pass (fairness between queues and TX).
const RX_PULL_BUDGET: usize = 256;
/// Engine queues the vif thread polls (at most `xenbus::MAX_QUEUES`).
const POLL_ENGINES: usize = super::xenbus::MAX_QUEUES as usize;
/// Frames delivered to the guest per batch.
const RX_BATCH: usize = 64;
/// Receive buffers of frames up to this size (an Ethernet frame of MTU 1500 with a VLAN tag)
/// are kept in their own size class, so a small frame never holds a large buffer.
const RX_SMALL: usize = 2048;

/// Limits of the RX backlog of each guest queue (XSA-392).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBacklogLimits {
    /// Frames.
    pub packets: usize,
    /// Bytes.
    pub bytes: usize,
}

impl Default for RxBacklogLimits {
    fn default() -> Self {
        // Linux: XENVIF_RX_QUEUE_BYTES, half a ring of pages.
        RxBacklogLimits {
            packets: 256,
            bytes: 512 * 1024,
        }
    }
}

/// Wakes the vif thread (stop, or a rate change).
#[derive(Debug)]
pub(crate) struct Waker {
    fd: EventFd,
    stop: AtomicBool,
}

impl Waker {
    pub(crate) fn new() -> std::io::Result<Arc<Waker>> {
        Ok(Arc::new(Waker {
            fd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            stop: AtomicBool::new(false),
        }))
    }
    pub(crate) fn wake(&self) {
        let _ = self.fd.write(1);
    }
}

/// What the device and the vif thread share.
#[derive(Debug, Default)]
pub(crate) struct VifShared {
    pub(crate) metrics: NetMetrics,
    /// The rate from xenstore, changed live by the `rate` watch.
    pub(crate) rate: Mutex<Option<Rate>>,
    pub(crate) rate_changed: AtomicBool,
    /// `request-multicast-control`, changed live by the frontend.
    pub(crate) mcast_control: AtomicBool,
    pub(crate) mcast_changed: AtomicBool,
}

/// The running thread.
pub(crate) struct VifHandle {
    pub(crate) waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl VifHandle {
    pub(crate) fn stop(mut self) {
        self.waker.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything the thread needs.
pub(crate) struct VifStart {
    pub host: Arc<dyn XenHost>,
    pub ctx: DeviceCtx,
    pub domid: DomId,
    pub choice: FrontendChoice,
    pub engines: Vec<Box<dyn NetQueueIo>>,
    pub shared: Arc<VifShared>,
    pub mac: [u8; 6],
    pub allow_spoofing: bool,
    pub rx_limits: RxBacklogLimits,
    pub span: Span,
}

/// The credit-based rate limit (Linux netback's `tx_credit_exceeded`).
#[derive(Debug)]
struct Credit {
    rate: Option<Rate>,
    remaining: u64,
    window_start: Instant,
}

impl Credit {
    fn new(rate: Option<Rate>, now: Instant) -> Credit {
        Credit {
            rate,
            remaining: rate.map_or(0, |r| r.bytes),
            window_start: now,
        }
    }

    fn set_rate(&mut self, rate: Option<Rate>) {
        self.rate = rate;
        if let Some(r) = rate {
            self.remaining = self.remaining.min(r.bytes);
        }
    }

    /// Takes `size` bytes of credit, replenishing once per interval. A packet larger than a
    /// whole interval's credit still passes once credit is full (the burst is at least
    /// 128 KiB, as in Linux).
    fn take(&mut self, size: u64, now: Instant) -> bool {
        let Some(r) = self.rate else { return true };
        if size > self.remaining {
            let next = self.window_start + r.interval;
            if now >= next {
                let max_burst = r.bytes.max(128 * 1024);
                self.remaining = self.remaining.saturating_add(r.bytes).min(max_burst);
                // Keep the windows back to back (no drift from a late wakeup) unless we were
                // idle for more than a window.
                self.window_start = if now < next + r.interval { next } else { now };
            }
            if size > self.remaining {
                return false;
            }
        }
        self.remaining -= size;
        true
    }

    fn next_window(&self) -> Option<Instant> {
        self.rate.map(|r| self.window_start + r.interval)
    }
}

struct TxRing {
    ring: BackRing<NetifTxRequest, NetifTxResponse, GrantMapping>,
    port: Port,
    /// Requests copied out of the ring, not yet answered.
    pending: VecDeque<NetifTxRequest>,
    responses: u32,
}

/// A frame waiting for the guest's buffers.
struct RxFrame {
    hdr: VirtioNetHdr,
    buf: Vec<u8>,
    hash: Option<FrameHash>,
}

struct RxRing {
    ring: BackRing<NetifRxRequest, NetifRxResponse, GrantMapping>,
    port: Port,
    backlog: VecDeque<RxFrame>,
    backlog_bytes: usize,
    responses: u32,
}

struct CtrlRing {
    ring: BackRing<XenNetifCtrlRequest, XenNetifCtrlResponse, GrantMapping>,
    port: Port,
}

struct Queue {
    tx: TxRing,
    rx: RxRing,
}

/// A TX packet planned into the current batch.
#[derive(Clone, Copy)]
enum TxPlan {
    Send {
        pos: usize,
        pkt: TxPacket,
        arena: usize,
        segs: (usize, usize),
        ok: bool,
    },
    Drop {
        pos: usize,
        slots: usize,
        extras: usize,
    },
    Mcast {
        pos: usize,
        pkt: TxPacket,
    },
}

/// One RX response planned into the current batch.
#[derive(Clone, Copy)]
enum RxPlan {
    Data { rsp: NetifRxResponse, seg: usize },
    Extra(NetifExtraInfo),
}

struct Vif {
    ctx: DeviceCtx,
    domid: DomId,
    gnttab: Box<dyn GrantTables>,
    evtchn: Box<dyn EventChannels>,
    queues: Vec<Queue>,
    ctrl: Option<CtrlRing>,
    engines: Vec<Box<dyn NetQueueIo>>,
    choice: FrontendChoice,
    shared: Arc<VifShared>,
    waker: Arc<Waker>,
    mac: [u8; 6],
    allow_spoofing: bool,
    rx_limits: RxBacklogLimits,
    credit: Credit,
    hash: HashConfig,
    mcast: McastFilter,
    tx_arena: Vec<u8>,
    tx_plan: Vec<TxPlan>,
    tx_segs: Vec<CopySegment<'static>>,
    rx_scratch: Vec<u8>,
    /// Spare receive buffers of `RX_SMALL` bytes.
    rx_free: Vec<Vec<u8>>,
    /// Spare receive buffers of larger frames, and the bytes they hold (their capacities).
    rx_free_large: Vec<Vec<u8>>,
    rx_free_large_bytes: usize,
    rx_reqs: Vec<NetifRxRequest>,
    rx_plan: Vec<RxPlan>,
    rx_segs: Vec<CopySegment<'static>>,
    /// Engine queues that may have frames to read (bit per queue): set when poll reports
    /// one readable, cleared when a read finds nothing.
    engine_ready: u64,
    /// Engine queues that failed for good (bit per queue): neither polled nor used again.
    engine_dead: u64,
    /// Frames, bytes and GSO frames sent to the engine in the current TX batch.
    tx_sent: (u64, u64, u64),
    /// Ports to notify after a pass (deduplicated: one notification per port per pass).
    notify: Vec<Port>,
    /// Requests answered, frames moved and control requests served (to tell spurious events).
    work: u64,
    /// `work` when the last event was taken: an event is spurious when nothing was done since
    /// then. (A pass answers as it goes, so a guest's next request and its event can arrive
    /// while that pass still runs; the pass takes the request, and the event then finds the
    /// ring empty though it brought work.)
    work_at_event: u64,
    dead: bool,
    /// A TX or control pass stopped at its budget with requests left: look again after one
    /// turn of the poll loop instead of sleeping.
    more: bool,
    log_bucket: TokenBucket,
}

/// The bit of engine queue `i` in a per-queue mask (none past 64: such queues are never
/// polled).
fn bit(i: usize) -> u64 {
    u32::try_from(i)
        .ok()
        .and_then(|i| 1u64.checked_shl(i))
        .unwrap_or(0)
}

/// Reuses a vector's allocation for segments borrowing something else (an empty vector of
/// the same layout: the in-place collect keeps the buffer).
#[allow(clippy::unnecessary_filter_map)] // the map changes the element type; filter cannot
fn recycle<'a>(mut v: Vec<CopySegment<'static>>) -> Vec<CopySegment<'a>> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

#[allow(clippy::unnecessary_filter_map)]
fn unrecycle(mut v: Vec<CopySegment<'_>>) -> Vec<CopySegment<'static>> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

/// Maps the rings, binds the event channels and starts the thread.
pub(crate) fn start(p: VifStart) -> Result<VifHandle, NetError> {
    let domid = p.domid;
    let devid = p.ctx.devid();
    let host_err = |source| NetError::Host {
        domid,
        devid,
        source,
    };
    let gnttab = p.host.open_gnttab().map_err(host_err)?;
    let evtchn = p.host.open_evtchn().map_err(host_err)?;
    let bind_err = |port: u32| {
        move |source| NetError::Bind {
            domid,
            devid,
            port,
            source,
        }
    };
    evtchn.restrict(domid).map_err(bind_err(0))?;
    let map = |what: &'static str, gref| {
        gnttab
            .map(domid, &[gref], true)
            .map_err(|source| NetError::MapRing {
                domid,
                devid,
                what,
                source,
            })
    };
    let ring_err = |what: &'static str| {
        move |source| NetError::Ring {
            domid,
            devid,
            what,
            source,
        }
    };
    let mut queues = Vec::with_capacity(p.choice.queues.len());
    for q in &p.choice.queues {
        let tx = BackRing::attach_shared(map("tx ring", q.tx_ref)?).map_err(ring_err("tx ring"))?;
        let rx = BackRing::attach_shared(map("rx ring", q.rx_ref)?).map_err(ring_err("rx ring"))?;
        let tx_port = evtchn
            .bind_interdomain(domid, q.tx_port)
            .map_err(bind_err(q.tx_port))?;
        let rx_port = if q.rx_port == q.tx_port {
            tx_port
        } else {
            evtchn
                .bind_interdomain(domid, q.rx_port)
                .map_err(bind_err(q.rx_port))?
        };
        let size = tx.size() as usize;
        queues.push(Queue {
            tx: TxRing {
                ring: tx,
                port: tx_port,
                pending: VecDeque::with_capacity(size),
                responses: 0,
            },
            rx: RxRing {
                ring: rx,
                port: rx_port,
                backlog: VecDeque::with_capacity(p.rx_limits.packets),
                backlog_bytes: 0,
                responses: 0,
            },
        });
    }
    let ctrl = match p.choice.ctrl {
        None => None,
        Some((gref, port)) => {
            let ring =
                BackRing::attach_shared(map("ctrl ring", gref)?).map_err(ring_err("ctrl ring"))?;
            let local = evtchn
                .bind_interdomain(domid, port)
                .map_err(bind_err(port))?;
            Some(CtrlRing { ring, port: local })
        }
    };
    let waker = Waker::new().map_err(|source| NetError::Os {
        domid,
        devid,
        what: "eventfd",
        source,
    })?;
    let rate = *p.shared.rate.lock().unwrap_or_else(|e| e.into_inner());
    let mut vif = Vif {
        ctx: p.ctx,
        domid,
        gnttab,
        evtchn,
        queues,
        ctrl,
        engines: p.engines,
        choice: p.choice,
        shared: p.shared,
        waker: waker.clone(),
        mac: p.mac,
        allow_spoofing: p.allow_spoofing,
        rx_limits: p.rx_limits,
        credit: Credit::new(rate, Instant::now()),
        hash: HashConfig::default(),
        mcast: McastFilter::default(),
        tx_arena: vec![0u8; TX_ARENA],
        tx_plan: Vec::with_capacity(256),
        tx_segs: Vec::with_capacity(512),
        rx_scratch: vec![0u8; RX_MAX_FRAME],
        rx_free: Vec::new(),
        rx_free_large: Vec::new(),
        rx_free_large_bytes: 0,
        rx_reqs: Vec::with_capacity(256),
        rx_plan: Vec::with_capacity(256),
        rx_segs: Vec::with_capacity(256),
        engine_ready: u64::MAX,
        engine_dead: 0,
        tx_sent: (0, 0, 0),
        notify: Vec::with_capacity(8),
        work: 0,
        work_at_event: 0,
        dead: false,
        more: false,
        log_bucket: TokenBucket::new(5.0, 20.0),
    };
    let span = tracing::info_span!(parent: &p.span, "vif");
    let thread = std::thread::Builder::new()
        .name(format!("vif-d{domid}-{devid}"))
        .spawn(move || {
            let _g = span.enter();
            vif.run();
        })
        .map_err(|source| NetError::Os {
            domid,
            devid,
            what: "spawning the vif thread",
            source,
        })?;
    Ok(VifHandle {
        waker,
        thread: Some(thread),
    })
}

impl Vif {
    fn run(&mut self) {
        set(
            &self.shared.metrics.mcast_filtering,
            u64::from(self.choice.multicast_control),
        );
        let mut ports = [0 as Port; 16];
        let mut delivered: Vec<Port> = Vec::with_capacity(16);
        let (mut evtchn_ready, mut waker_ready);
        // A first pass: the frontend may have queued work before we bound.
        self.pass();
        while !self.dead {
            // Work left over from a pass that hit its budget: look at the descriptors (a stop
            // request, engines with frames for the guest) without sleeping, then go on.
            let timeout = if self.more {
                PollTimeout::ZERO
            } else {
                self.poll_timeout()
            };
            {
                // A fixed array (no allocation per wakeup); unused entries repeat the waker.
                let n = 2 + self.engines.len().min(POLL_ENGINES);
                let mut fds: [PollFd<'_>; 2 + POLL_ENGINES] = std::array::from_fn(|i| {
                    let fd = match i {
                        0 => self.evtchn.fd(),
                        i if i >= 2
                            && i - 2 < self.engines.len()
                            && self.engine_dead & bit(i - 2) == 0 =>
                        {
                            self.engines[i - 2].fd()
                        }
                        _ => self.waker.fd.as_fd(),
                    };
                    PollFd::new(fd, PollFlags::POLLIN)
                });
                if let Err(e) = poll(&mut fds[..n], timeout) {
                    if e != nix::errno::Errno::EINTR {
                        warn!(error = %e, "vif poll failed; stopping");
                        break;
                    }
                }
                // Act only on what poll reported (no read that would find nothing).
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                evtchn_ready = ready(&fds[0]);
                waker_ready = ready(&fds[1]);
                for (i, f) in fds[2..n].iter().enumerate() {
                    if ready(f) && self.engine_dead & bit(i) == 0 {
                        self.engine_ready |= bit(i);
                    }
                }
            }
            if waker_ready {
                let _ = self.waker.fd.read();
            }
            if self.waker.stop.load(Ordering::SeqCst) {
                break;
            }
            self.more = false;
            if self.shared.rate_changed.swap(false, Ordering::SeqCst) {
                let r = *self.shared.rate.lock().unwrap_or_else(|e| e.into_inner());
                self.credit.set_rate(r);
                add(&self.shared.metrics.rate_updates, 1);
                debug!(rate = ?r, "rate changed");
            }
            if self.shared.mcast_changed.swap(false, Ordering::SeqCst) {
                self.choice.multicast_control = self.shared.mcast_control.load(Ordering::SeqCst);
                set(
                    &self.shared.metrics.mcast_filtering,
                    u64::from(self.choice.multicast_control),
                );
            }
            delivered.clear();
            if evtchn_ready {
                while let Ok(n) = self.evtchn.pending(&mut ports) {
                    if n == 0 {
                        break;
                    }
                    add(&self.shared.metrics.events, n as u64);
                    for p in ports.iter().take(n) {
                        if !delivered.contains(p) {
                            delivered.push(*p);
                        }
                    }
                }
            }
            let before = self.work;
            self.pass();
            if !delivered.is_empty() {
                // Unmask only after the rings are drained, then look once more: a flood of
                // events costs one pass each (XSA-332).
                for p in &delivered {
                    let _ = self.evtchn.unmask(*p);
                }
                self.pass();
                if self.work == self.work_at_event {
                    add(&self.shared.metrics.spurious_events, 1);
                }
                self.work_at_event = before;
            }
        }
    }

    fn poll_timeout(&self) -> PollTimeout {
        let throttled = self.queues.iter().any(|q| !q.tx.pending.is_empty());
        match (throttled, self.credit.next_window()) {
            (true, Some(at)) => {
                let left = at.saturating_duration_since(Instant::now());
                // Round up to the next millisecond so we wake after the window opens.
                let ms = left.as_micros().div_ceil(1000).clamp(1, 60_000) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
            _ => PollTimeout::NONE,
        }
    }

    fn pass(&mut self) {
        if self.dead {
            return;
        }
        self.ctrl_pass();
        for qi in 0..self.queues.len() {
            if self.dead {
                return;
            }
            self.tx_pass(qi);
        }
        self.rx_pull();
        for qi in 0..self.queues.len() {
            if self.dead {
                return;
            }
            self.rx_deliver(qi);
        }
        set(
            &self.shared.metrics.rx_backlog,
            self.queues.iter().map(|q| q.rx.backlog.len() as u64).sum(),
        );
        self.send_notifications();
    }

    fn fatal(&mut self, why: &str) {
        if self.dead {
            return;
        }
        self.dead = true;
        add(&self.shared.metrics.fatal_errors, 1);
        warn!(
            reason = why,
            "frontend broke the netif protocol; disabling the vif"
        );
        self.ctx
            .fatal(&format!("vif disabled: frontend broke the protocol: {why}"));
    }

    fn ring_fatal(&mut self, what: &str, e: RingError) {
        self.fatal(&format!("{what}: {e}"));
    }

    fn send_notifications(&mut self) {
        for i in 0..self.notify.len() {
            let p = self.notify[i];
            add(&self.shared.metrics.notifications, 1);
            let _ = self.evtchn.notify(p);
        }
        self.notify.clear();
    }

    fn want_notify(&mut self, port: Port) {
        if !self.notify.contains(&port) {
            self.notify.push(port);
        }
    }

    // ------------------------------------------------------------------ control ring

    fn ctrl_pass(&mut self) {
        let Some(mut ctrl) = self.ctrl.take() else {
            return;
        };
        let mut answered = 0;
        // One ring's worth a pass, as for TX (a frontend refilling the ring as fast as it is
        // answered must not keep the thread here).
        let budget = ctrl.ring.size().max(1);
        loop {
            if answered >= budget {
                self.more = true;
                break;
            }
            let req = match ctrl.ring.copy_request() {
                Ok(Some(r)) => r,
                Ok(None) => match ctrl.ring.final_check_for_requests() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.ctrl = Some(ctrl);
                        return self.ring_fatal("ctrl ring", e);
                    }
                },
                Err(e) => {
                    self.ctrl = Some(ctrl);
                    return self.ring_fatal("ctrl ring", e);
                }
            };
            add(&self.shared.metrics.ctrl_requests, 1);
            self.work += 1;
            let (status, data) = self.ctrl_request(&req);
            let rsp = XenNetifCtrlResponse {
                id: req.id,
                type_: req.type_,
                status,
                data,
            };
            if ctrl.ring.push_response(&rsp).is_ok() {
                answered += 1;
            }
        }
        if answered > 0 {
            if let Ok(true) = ctrl.ring.push_responses_and_check_notify() {
                self.want_notify(ctrl.port);
            }
        }
        self.ctrl = Some(ctrl);
    }

    /// Copies `len` bytes at offset 0 of a granted page into `out`.
    fn ctrl_copy(&mut self, gref: u32, out: &mut [u8]) -> bool {
        if out.is_empty() {
            return true;
        }
        let mut segs = [CopySegment {
            domid: self.domid,
            gref,
            offset: 0,
            local: CopyDir::FromGuest(out),
            status: 0,
        }];
        add(&self.shared.metrics.grant_copies, 1);
        self.gnttab.copy(&mut segs).is_ok() && segs[0].status == 0
    }

    fn ctrl_request(&mut self, r: &XenNetifCtrlRequest) -> (u32, u32) {
        use super::hash::SUPPORTED_HASH_FLAGS;
        const OK: u32 = XEN_NETIF_CTRL_STATUS_SUCCESS;
        const INVAL: u32 = XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        const UNSUP: u32 = XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED;
        match r.type_ {
            XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS => (OK, SUPPORTED_HASH_FLAGS),
            XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS => {
                let flags = r.data[0];
                if flags & !SUPPORTED_HASH_FLAGS != 0 || !self.hash.enabled() {
                    return (INVAL, 0);
                }
                self.hash.flags = flags;
                (OK, 0)
            }
            XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM => match r.data[0] {
                XEN_NETIF_CTRL_HASH_ALGORITHM_NONE | XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ => {
                    self.hash.algorithm = r.data[0];
                    if r.data[0] == XEN_NETIF_CTRL_HASH_ALGORITHM_NONE {
                        self.hash.flags = 0;
                    }
                    (OK, 0)
                }
                _ => (INVAL, 0),
            },
            XEN_NETIF_CTRL_TYPE_SET_HASH_KEY => {
                let (gref, len) = (r.data[0], r.data[1] as usize);
                if len > XEN_NETBK_MAX_HASH_KEY_SIZE {
                    return (INVAL, 0);
                }
                let mut key = [0u8; XEN_NETBK_MAX_HASH_KEY_SIZE];
                if !self.ctrl_copy(gref, &mut key[..len]) {
                    return (INVAL, 0);
                }
                self.hash.key = key;
                (OK, 0)
            }
            XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE => (OK, XEN_NETBK_MAX_HASH_MAPPING_SIZE),
            XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE => {
                let size = r.data[0];
                if size > XEN_NETBK_MAX_HASH_MAPPING_SIZE {
                    return (INVAL, 0);
                }
                self.hash.mapping.clear();
                self.hash.mapping.resize(size as usize, 0);
                (OK, 0)
            }
            XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING => {
                let (gref, len, off) = (r.data[0], r.data[1] as usize, r.data[2] as usize);
                let size = self.hash.mapping.len();
                if off.checked_add(len).is_none_or(|end| end > size) || len > 1024 {
                    return (INVAL, 0);
                }
                let mut raw = [0u8; 4 * XEN_NETBK_MAX_HASH_MAPPING_SIZE as usize];
                if !self.ctrl_copy(gref, &mut raw[..len * 4]) {
                    return (INVAL, 0);
                }
                let nq = self.queues.len() as u32;
                let vals = raw[..len * 4]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                if vals.clone().any(|q| q >= nq) {
                    return (INVAL, 0);
                }
                for (slot, v) in self.hash.mapping[off..off + len].iter_mut().zip(vals) {
                    *slot = v;
                }
                (OK, 0)
            }
            _ => (UNSUP, 0),
        }
    }

    // ------------------------------------------------------------------ TX

    /// Serves a TX ring until it is empty or one ring's worth of slots has been taken in this
    /// call (a NAPI-like budget, as Linux's netback has): a frontend that refills as fast as it
    /// is answered cannot keep the thread from its stop flag, RX and the other queues.
    fn tx_pass(&mut self, qi: usize) {
        let budget = self.queues[qi].tx.ring.size().max(1) as usize;
        let mut taken = 0usize;
        loop {
            // The budget is looked at only between batches, with nothing pending, so a packet
            // is never split between passes (and a throttled queue is not spun on).
            if taken >= budget && self.queues[qi].tx.pending.is_empty() {
                self.more = true;
                return;
            }
            // Copy every published request once (at most a ring's worth is outstanding).
            loop {
                match self.queues[qi].tx.ring.copy_request() {
                    Ok(Some(r)) => {
                        self.queues[qi].tx.pending.push_back(r);
                        taken += 1;
                    }
                    Ok(None) => break,
                    Err(e) => return self.ring_fatal("tx ring", e),
                }
            }
            if self.queues[qi].tx.pending.is_empty() {
                match self.queues[qi].tx.ring.final_check_for_requests() {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => return self.ring_fatal("tx ring", e),
                }
            }
            let progressed = self.tx_batch(qi);
            if self.dead || !progressed {
                return;
            }
        }
    }

    fn tx_publish(&mut self, qi: usize) {
        let tx = &mut self.queues[qi].tx;
        if tx.responses == 0 {
            return;
        }
        tx.responses = 0;
        if let Ok(true) = tx.ring.push_responses_and_check_notify() {
            let p = tx.port;
            self.want_notify(p);
        }
    }

    fn tx_respond(&mut self, qi: usize, id: u16, status: i16) {
        let tx = &mut self.queues[qi].tx;
        if tx
            .ring
            .push_response(&NetifTxResponse { id, status })
            .is_ok()
        {
            tx.responses += 1;
        }
    }

    /// Answers the `slots` requests at `pos`: the first and follow-ons `status`, the `extras`
    /// after the first NETIF_RSP_NULL (id 0, explicitly written).
    fn tx_respond_packet(&mut self, qi: usize, pos: usize, slots: usize, extras: usize, st: i16) {
        for i in 0..slots {
            let Some(req) = self.queues[qi].tx.pending.get(pos + i).copied() else {
                return;
            };
            if i >= 1 && i <= extras {
                self.tx_respond(qi, 0, NETIF_RSP_NULL);
            } else {
                self.tx_respond(qi, req.id, st);
            }
        }
    }

    /// Plans, copies and sends one batch of packets from the private queue. Returns whether
    /// any request was answered.
    fn tx_batch(&mut self, qi: usize) -> bool {
        let now = Instant::now();
        let mut plan = std::mem::take(&mut self.tx_plan);
        plan.clear();
        let mut segs = recycle(std::mem::take(&mut self.tx_segs));
        let mut pos = 0usize;
        let mut used = 0usize;
        let mut fatal: Option<TxFatal> = None;
        let mut throttled = false;
        {
            let q = &mut self.queues[qi];
            let reqs = q.tx.pending.make_contiguous();
            let mut rest: &mut [u8] = &mut self.tx_arena[..];
            while pos < reqs.len() {
                match parse_tx(&reqs[pos..]) {
                    TxParse::Incomplete => {
                        // All published requests are copied; if the ring had room for more and
                        // none are published, the frontend claimed slots it never sent.
                        let waiting = q.tx.ring.unconsumed_requests().unwrap_or(0);
                        if waiting == 0 && q.tx.ring.in_flight() < q.tx.ring.size() {
                            fatal = Some(TxFatal::Incomplete(reqs.len() - pos));
                        }
                        break;
                    }
                    TxParse::Fatal(f) => {
                        fatal = Some(f);
                        break;
                    }
                    TxParse::Drop { slots, extras, why } => {
                        add(&self.shared.metrics.tx_malformed, 1);
                        if self.log_bucket.take(1.0) {
                            let suppressed = self.log_bucket.take_denied();
                            warn!(queue = qi, error = %why, suppressed, "dropping a malformed packet");
                        }
                        plan.push(TxPlan::Drop { pos, slots, extras });
                        pos += slots;
                    }
                    TxParse::Packet(pkt) if pkt.mcast.is_some() => {
                        plan.push(TxPlan::Mcast { pos, pkt });
                        pos += pkt.slots;
                    }
                    TxParse::Packet(pkt) => {
                        if pkt.len > rest.len() {
                            break; // the next batch
                        }
                        if !self.credit.take(pkt.len as u64, now) {
                            throttled = true;
                            break;
                        }
                        let seg_start = segs.len();
                        let (frame, tail) = std::mem::take(&mut rest).split_at_mut(pkt.len);
                        rest = tail;
                        let mut dst: &mut [u8] = frame;
                        let first = reqs[pos];
                        let (a, b) = std::mem::take(&mut dst).split_at_mut(pkt.first_len);
                        dst = b;
                        segs.push(CopySegment {
                            domid: self.domid,
                            gref: first.gref,
                            offset: first.offset,
                            local: CopyDir::FromGuest(a),
                            status: 0,
                        });
                        for r in &reqs[pos + pkt.frags_start()..pos + pkt.slots] {
                            if r.size == 0 {
                                continue; // XSA-448: no empty segments
                            }
                            let (a, b) = std::mem::take(&mut dst).split_at_mut(usize::from(r.size));
                            dst = b;
                            segs.push(CopySegment {
                                domid: self.domid,
                                gref: r.gref,
                                offset: r.offset,
                                local: CopyDir::FromGuest(a),
                                status: 0,
                            });
                        }
                        plan.push(TxPlan::Send {
                            pos,
                            pkt,
                            arena: used,
                            segs: (seg_start, segs.len()),
                            ok: true,
                        });
                        used += pkt.len;
                        pos += pkt.slots;
                    }
                }
            }
            if !segs.is_empty() {
                add(&self.shared.metrics.grant_copies, 1);
                let batch_ok = self.gnttab.copy(&mut segs).is_ok();
                for p in plan.iter_mut() {
                    if let TxPlan::Send {
                        segs: (s, e), ok, ..
                    } = p
                    {
                        *ok = batch_ok && segs[*s..*e].iter().all(|x| x.status == 0);
                    }
                }
            }
        }
        self.tx_segs = unrecycle(segs);
        if throttled {
            add(&self.shared.metrics.tx_throttled, 1);
        }
        for p in plan.iter().copied() {
            match p {
                TxPlan::Drop { pos, slots, extras } => {
                    self.tx_respond_packet(qi, pos, slots, extras, NETIF_RSP_ERROR)
                }
                TxPlan::Mcast { pos, pkt } => {
                    add(&self.shared.metrics.mcast_ops, 1);
                    let ok = match pkt.mcast {
                        Some(m) if m.add => self.mcast.add(m.addr),
                        Some(m) => {
                            self.mcast.del(m.addr);
                            true
                        }
                        None => true,
                    };
                    set(
                        &self.shared.metrics.mcast_addresses,
                        self.mcast.len() as u64,
                    );
                    let st = if ok { NETIF_RSP_OKAY } else { NETIF_RSP_ERROR };
                    self.tx_respond_packet(qi, pos, pkt.slots, pkt.extras, st);
                }
                TxPlan::Send { pos, pkt, ok, .. } => {
                    let st = if ok {
                        NETIF_RSP_OKAY
                    } else {
                        add(&self.shared.metrics.tx_grant_errors, 1);
                        NETIF_RSP_ERROR
                    };
                    self.tx_respond_packet(qi, pos, pkt.slots, pkt.extras, st);
                }
            }
        }
        // The frames are in our arena now, so the slots go back to the guest before the
        // engine sees them (Linux answers each packet before it enters the stack): the guest
        // refills its ring while we write, instead of the two taking turns.
        self.tx_publish(qi);
        self.send_notifications();
        for p in plan.iter().copied() {
            if let TxPlan::Send {
                pkt,
                arena,
                ok: true,
                ..
            } = p
            {
                self.tx_send(qi, &pkt, arena);
            }
        }
        self.tx_plan = plan;
        self.queues[qi].tx.pending.drain(..pos);
        // Requests answered are work (an event that brought only TX is not spurious).
        self.work += pos as u64;
        add(&self.shared.metrics.tx_slots, pos as u64);
        let (packets, bytes, gso) = std::mem::take(&mut self.tx_sent);
        if packets > 0 {
            add(&self.shared.metrics.tx_packets, packets);
            add(&self.shared.metrics.tx_bytes, bytes);
            add(&self.shared.metrics.tx_gso_packets, gso);
        }
        if let Some(f) = fatal {
            self.fatal(&f.to_string());
        }
        pos > 0
    }

    /// Anti-spoofing, offload metadata, then the engine.
    fn tx_send(&mut self, qi: usize, pkt: &TxPacket, arena: usize) {
        let Some(frame) = self.tx_arena.get_mut(arena..arena + pkt.len) else {
            return;
        };
        if !self.allow_spoofing && frame.get(6..12) != Some(&self.mac[..]) {
            add(&self.shared.metrics.tx_spoofed, 1);
            return;
        }
        let gso = pkt.gso.map(|g| (g.type_, g.size));
        let hdr = match offload::tx_header(
            frame,
            pkt.flags & NETTXF_CSUM_BLANK != 0,
            pkt.flags & NETTXF_DATA_VALIDATED != 0,
            gso,
        ) {
            Ok(h) => h,
            Err(e) => {
                add(&self.shared.metrics.tx_offload_errors, 1);
                if self.log_bucket.take(1.0) {
                    debug!(queue = qi, error = %e, "dropping a frame whose offload cannot be set up");
                }
                return;
            }
        };
        let ei = qi % self.engines.len().max(1);
        let Some(engine) = self.engines.get(ei) else {
            return;
        };
        if self.engine_dead & bit(ei) != 0 {
            add(&self.shared.metrics.tx_engine_errors, 1);
            return;
        }
        match engine.send(&hdr, &[IoSlice::new(frame)]) {
            Ok(()) => {
                // Added to the shared counters once per batch, after its frames are written.
                self.tx_sent.0 += 1;
                self.tx_sent.1 += pkt.len as u64;
                self.tx_sent.2 += u64::from(pkt.gso.is_some());
            }
            Err(e) => {
                add(&self.shared.metrics.tx_engine_errors, 1);
                if self.log_bucket.take(1.0) {
                    debug!(queue = qi, error = %e, "engine refused a frame");
                }
            }
        }
    }

    // ------------------------------------------------------------------ RX

    fn rx_pull(&mut self) {
        for ei in 0..self.engines.len() {
            if self.engine_ready & bit(ei) == 0 {
                continue;
            }
            for _ in 0..RX_PULL_BUDGET {
                let got = match self.engines[ei].recv(&mut self.rx_scratch) {
                    Ok(Some((hdr, n))) => (hdr, n.min(self.rx_scratch.len())),
                    Ok(None) => {
                        self.engine_ready &= !bit(ei);
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        // One bad frame (cut short by the kernel, or shorter than its
                        // header): drop it and go on.
                        add(&self.shared.metrics.rx_truncated_drops, 1);
                        if self.log_bucket.take(1.0) {
                            let suppressed = self.log_bucket.take_denied();
                            warn!(queue = ei, error = %e, suppressed, "dropping a frame from the engine");
                        }
                        self.work += 1;
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.engine_failed(ei, &e);
                        break;
                    }
                };
                self.work += 1;
                self.rx_accept(ei, got.0, got.1);
            }
        }
    }

    /// An engine queue failed for good (its tap deleted under it: EBADFD, EIO...): stop
    /// polling and using it, once, and say so on the device's `error` node. The vif's other
    /// queues go on.
    fn engine_failed(&mut self, ei: usize, e: &std::io::Error) {
        if self.engine_dead & bit(ei) != 0 {
            return;
        }
        self.engine_dead |= bit(ei);
        self.engine_ready &= !bit(ei);
        warn!(queue = ei, error = %e, "engine queue failed; no longer serving it");
        let msg = format!("vif engine queue {ei} failed: {e}");
        if let Err(err) = self.ctx.report_error(&msg) {
            debug!(error = %err, "cannot write the error node");
        }
        // Counted once it is reported: whoever sees the counter can read the node.
        add(&self.shared.metrics.engine_failures, 1);
    }

    /// Steers, filters and queues one frame from `rx_scratch[..n]`.
    fn rx_accept(&mut self, ei: usize, mut hdr: VirtioNetHdr, n: usize) {
        let m = &self.shared.metrics;
        let frame = &self.rx_scratch[..n];
        if n < super::request::ETH_HLEN {
            add(&m.rx_unsupported_drops, 1);
            return;
        }
        if self.choice.multicast_control
            && is_filtered_multicast(&frame[..6])
            && !self.mcast.matches(&frame[..6])
        {
            add(&m.rx_mcast_drops, 1);
            return;
        }
        let gso = hdr.gso_type & !VirtioNetHdr::GSO_ECN;
        let gso_ok = match gso {
            VirtioNetHdr::GSO_NONE => true,
            VirtioNetHdr::GSO_TCPV4 => self.choice.gso_tcpv4 && hdr.gso_size > 0,
            VirtioNetHdr::GSO_TCPV6 => self.choice.gso_tcpv6 && hdr.gso_size > 0,
            _ => false,
        };
        let first_room = xen::PAGE_SIZE - usize::from(self.choice.xdp_headroom);
        if !gso_ok || (!self.choice.sg && n > first_room) {
            add(&m.rx_unsupported_drops, 1);
            return;
        }
        let hash = self.hash.hash(frame);
        let nq = self.queues.len() as u32;
        let qi = if self.hash.enabled() {
            self.hash.queue_for(hash, nq)
        } else {
            ei as u32 % nq.max(1)
        } as usize;
        let Some(q) = self.queues.get_mut(qi) else {
            return;
        };
        if q.rx.backlog.len() >= self.rx_limits.packets
            || q.rx.backlog_bytes + n > self.rx_limits.bytes
        {
            add(&m.rx_backlog_drops, 1);
            return;
        }
        // The backlog is charged the memory its buffers hold: a small frame a small buffer, a
        // large one a buffer of exactly its size (recycled large buffers keep the largest
        // size they held, which is what they cost).
        let mut buf = if n <= RX_SMALL {
            self.rx_free
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(RX_SMALL))
        } else {
            match self.rx_free_large.pop() {
                Some(b) => {
                    self.rx_free_large_bytes =
                        self.rx_free_large_bytes.saturating_sub(b.capacity());
                    b
                }
                None => Vec::new(),
            }
        };
        buf.clear();
        buf.reserve_exact(n);
        buf.extend_from_slice(frame);
        let cost = buf.capacity();
        if q.rx.backlog_bytes + cost > self.rx_limits.bytes {
            add(&m.rx_backlog_drops, 1);
            self.rx_recycle(buf);
            return;
        }
        if hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0
            && (!self.choice.csum || (!self.choice.ipv6_csum && offload::is_ipv6(&buf)))
        {
            // The frontend cannot take a blank checksum: complete it here.
            if offload::complete_checksum(&mut buf, hdr.csum_start, hdr.csum_offset) {
                hdr.flags = VirtioNetHdr::F_DATA_VALID;
            }
        }
        q.rx.backlog_bytes += buf.capacity();
        q.rx.backlog.push_back(RxFrame { hdr, buf, hash });
    }

    /// Keeps a receive buffer for reuse, in its size class: small ones up to the backlog's
    /// frame limit, large ones up to its byte limit; the rest are freed.
    fn rx_recycle(&mut self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap <= RX_SMALL {
            if self.rx_free.len() < self.rx_limits.packets {
                self.rx_free.push(buf);
            }
        } else if self.rx_free_large_bytes + cap <= self.rx_limits.bytes {
            self.rx_free_large_bytes += cap;
            self.rx_free_large.push(buf);
        }
    }

    /// Slots a frame needs: data slots, then a GSO extra and a hash extra.
    fn rx_slots(&self, f: &RxFrame) -> (usize, usize) {
        let first_room = xen::PAGE_SIZE - usize::from(self.choice.xdp_headroom);
        let len = f.buf.len();
        let data = if len <= first_room {
            1
        } else {
            1 + (len - first_room).div_ceil(xen::PAGE_SIZE)
        };
        let extras =
            usize::from(f.hdr.gso_type != VirtioNetHdr::GSO_NONE) + usize::from(f.hash.is_some());
        (data, extras)
    }

    fn rx_deliver(&mut self, qi: usize) {
        loop {
            if self.queues[qi].rx.backlog.is_empty() {
                return;
            }
            let delivered = self.rx_batch(qi);
            self.rx_publish(qi);
            if self.dead {
                return;
            }
            if delivered == 0 {
                // Ask for an event when the frontend posts more buffers; look once more.
                match self.queues[qi].rx.ring.final_check_for_requests() {
                    Ok(true) => {
                        let avail = self.queues[qi].rx.ring.unconsumed_requests().unwrap_or(0);
                        let need = self.queues[qi].rx.backlog.front().map_or(0, |f| {
                            let (d, e) = self.rx_slots(f);
                            d + e
                        });
                        if (avail as usize) < need {
                            // Some buffers, not enough: ask for an event on the next one
                            // posted (an event index at req_cons + 1 is already behind
                            // req_prod, so the frontend would never notify).
                            match self.queues[qi].rx.ring.request_event_after_prod() {
                                Ok(true) => continue,
                                Ok(false) => return,
                                Err(e) => return self.ring_fatal("rx ring", e),
                            }
                        }
                    }
                    Ok(false) => return,
                    Err(e) => return self.ring_fatal("rx ring", e),
                }
            }
        }
    }

    fn rx_publish(&mut self, qi: usize) {
        let rx = &mut self.queues[qi].rx;
        if rx.responses == 0 {
            return;
        }
        rx.responses = 0;
        if let Ok(true) = rx.ring.push_responses_and_check_notify() {
            let p = rx.port;
            self.want_notify(p);
        }
    }

    /// Delivers frames from the front of the backlog while the frontend has posted enough
    /// buffers. Returns how many.
    fn rx_batch(&mut self, qi: usize) -> usize {
        let mut plan = std::mem::take(&mut self.rx_plan);
        plan.clear();
        let mut reqs = std::mem::take(&mut self.rx_reqs);
        let mut segs = recycle(std::mem::take(&mut self.rx_segs));
        let headroom = usize::from(self.choice.xdp_headroom);
        let first_room = xen::PAGE_SIZE - headroom;
        let mut frames = 0usize;
        let mut bytes = 0usize;
        let mut errors = 0u64;
        let mut ring_err = None;
        {
            let q = &mut self.queues[qi];
            for f in q.rx.backlog.iter() {
                let len = f.buf.len();
                if frames >= RX_BATCH || (frames > 0 && bytes + len > RX_BATCH_BYTES) {
                    break;
                }
                bytes += len;
                let data = if len <= first_room {
                    1
                } else {
                    1 + (len - first_room).div_ceil(xen::PAGE_SIZE)
                };
                let gso = f.hdr.gso_type != VirtioNetHdr::GSO_NONE;
                let extras = usize::from(gso) + usize::from(f.hash.is_some());
                let need = data + extras;
                match q.rx.ring.unconsumed_requests() {
                    Ok(n) if n as usize >= need => {}
                    Ok(_) => break,
                    Err(e) => {
                        ring_err = Some(e);
                        break;
                    }
                }
                reqs.clear();
                for _ in 0..need {
                    match q.rx.ring.copy_request() {
                        Ok(Some(r)) => reqs.push(r),
                        Ok(None) => break,
                        Err(e) => {
                            ring_err = Some(e);
                            break;
                        }
                    }
                }
                if ring_err.is_some() || reqs.len() < need {
                    // Cannot happen after the check above; answer what was consumed.
                    for r in &reqs {
                        plan.push(RxPlan::Data {
                            rsp: NetifRxResponse {
                                id: r.id,
                                offset: 0,
                                flags: 0,
                                status: NETIF_RSP_ERROR,
                            },
                            seg: usize::MAX,
                        });
                    }
                    break;
                }
                let mut csum_flags = 0u16;
                if f.hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 {
                    csum_flags = NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED;
                } else if f.hdr.flags & VirtioNetHdr::F_DATA_VALID != 0 {
                    csum_flags = NETRXF_DATA_VALIDATED;
                }
                let mut at = 0usize;
                let mut ri = 0usize;
                for d in 0..data {
                    let (off, room) = if d == 0 {
                        (headroom, first_room)
                    } else {
                        (0, xen::PAGE_SIZE)
                    };
                    let chunk = (len - at).min(room);
                    let Some(r) = reqs.get(ri).copied() else {
                        break;
                    };
                    ri += 1;
                    let mut flags = if d == 0 { csum_flags } else { 0 };
                    if d + 1 < data {
                        flags |= NETRXF_MORE_DATA;
                    }
                    if d == 0 && extras > 0 {
                        flags |= NETRXF_EXTRA_INFO;
                    }
                    let seg = segs.len();
                    segs.push(CopySegment {
                        domid: self.domid,
                        gref: r.gref,
                        offset: off as u16,
                        local: CopyDir::ToGuest(&f.buf[at..at + chunk]),
                        status: 0,
                    });
                    plan.push(RxPlan::Data {
                        rsp: NetifRxResponse {
                            id: r.id,
                            offset: off as u16,
                            flags,
                            status: chunk as i16,
                        },
                        seg,
                    });
                    at += chunk;
                    if d == 0 {
                        // Extras follow the first data slot.
                        let mut left = extras;
                        if gso {
                            left -= 1;
                            let type_ = if f.hdr.gso_type & !VirtioNetHdr::GSO_ECN
                                == VirtioNetHdr::GSO_TCPV6
                            {
                                XEN_NETIF_GSO_TYPE_TCPV6
                            } else {
                                XEN_NETIF_GSO_TYPE_TCPV4
                            };
                            let more = if left > 0 {
                                XEN_NETIF_EXTRA_FLAG_MORE
                            } else {
                                0
                            };
                            plan.push(RxPlan::Extra(NetifExtraInfo::new_gso(
                                more,
                                &NetifExtraGso {
                                    size: f.hdr.gso_size,
                                    type_,
                                    pad: 0,
                                    features: 0,
                                },
                            )));
                            ri += 1;
                        }
                        if let Some(h) = f.hash {
                            plan.push(RxPlan::Extra(NetifExtraInfo::new_hash(
                                0,
                                &NetifExtraHash {
                                    type_: h.type_bit,
                                    algorithm: XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ as u8,
                                    value: h.value.to_le_bytes(),
                                },
                            )));
                            ri += 1;
                        }
                    }
                }
                frames += 1;
            }
            if !segs.is_empty() {
                add(&self.shared.metrics.grant_copies, 1);
                if self.gnttab.copy(&mut segs).is_err() {
                    for s in segs.iter_mut() {
                        s.status = -1;
                    }
                }
            }
            for p in plan.iter_mut() {
                if let RxPlan::Data { rsp, seg } = p {
                    if *seg == usize::MAX || segs.get(*seg).is_none_or(|s| s.status != 0) {
                        rsp.status = NETIF_RSP_ERROR;
                        errors += 1;
                    }
                }
            }
            self.rx_segs = unrecycle(segs);
        }
        // Write the responses in ring order, with each copy's outcome.
        for p in plan.iter() {
            let rx = &mut self.queues[qi].rx;
            let r = match p {
                RxPlan::Data { rsp, .. } => rx.ring.push_response(rsp),
                RxPlan::Extra(e) => rx.ring.push_response_as(e),
            };
            if r.is_ok() {
                rx.responses += 1;
            }
        }
        self.rx_plan = plan;
        self.rx_reqs = reqs;
        if errors > 0 {
            add(&self.shared.metrics.rx_grant_errors, errors);
        }
        self.work += frames as u64;
        for _ in 0..frames {
            let Some(f) = self.queues[qi].rx.backlog.pop_front() else {
                break;
            };
            let q = &mut self.queues[qi];
            q.rx.backlog_bytes = q.rx.backlog_bytes.saturating_sub(f.buf.capacity());
            add(&self.shared.metrics.rx_packets, 1);
            add(&self.shared.metrics.rx_bytes, f.buf.len() as u64);
            if f.hdr.gso_type != VirtioNetHdr::GSO_NONE {
                add(&self.shared.metrics.rx_gso_packets, 1);
            }
            self.rx_recycle(f.buf);
        }
        if let Some(e) = ring_err {
            self.ring_fatal("rx ring", e);
        }
        frames
    }
}

//! [`IoreqServer`]: one ioreq server of one HVM domain and its thread.
//!
//! Setup (as QEMU's xen-hvm-common.c and demu do): XEN_DMOP_create_ioreq_server with a
//! buffered ring, map the server's resource frames (0 = buffered page, 1 = synchronous page),
//! enable it (only then does Xen write each vCPU's port into its slot, `vp_eport`), bind one
//! event channel per vCPU and one for the buffered ring, let the machine register its ranges,
//! start the thread. On shutdown: disable, destroy.
//!
//! The synchronous protocol: see READY, an acquire (read barrier), set INPROCESS, copy the
//! `ioreq_t` out once, decode and dispatch the copy, write `data`, a release (write barrier),
//! set IORESP_READY, notify the vCPU's port. The state only moves forward (XSA-262).

use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use xen::abi::ioreq::*;
use xen::{
    BufIoreq as BufMode, DeviceModel, DmError, DomId, EventChannels, EvtchnError, ForeignError,
    HostError, IoRange, IoServId, Port, Resource, SharedMem, XenHost, PAGE_SIZE,
};

use crate::dispatch::{Dispatcher, IoreqStats};
use crate::guestmem::GuestMemory;
use crate::handler::{IoHandler, RangeError, RangeRegistry};
use crate::layout::RamLayout;

/// Errors setting up or running an ioreq server.
#[derive(Debug, thiserror::Error)]
pub enum IoreqError {
    /// Opening a handle on the host failed.
    #[error("ioreq server for dom{domid}: {source}")]
    Host {
        /// Domain.
        domid: DomId,
        /// The error.
        #[source]
        source: HostError,
    },
    /// A DMOP failed.
    #[error("ioreq server {id:?} of dom{domid}: {what}: {source}")]
    Dm {
        /// Domain.
        domid: DomId,
        /// Server, once created.
        id: Option<IoServId>,
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: DmError,
    },
    /// Mapping the server's pages failed.
    #[error("ioreq server {id} of dom{domid}: mapping its pages: {source}")]
    Map {
        /// Domain.
        domid: DomId,
        /// Server.
        id: IoServId,
        /// The error.
        #[source]
        source: ForeignError,
    },
    /// Binding an event channel failed.
    #[error("ioreq server {id} of dom{domid}: binding {what}: {source}")]
    Evtchn {
        /// Domain.
        domid: DomId,
        /// Server.
        id: IoServId,
        /// Which channel.
        what: String,
        /// The error.
        #[source]
        source: EvtchnError,
    },
    /// Bad configuration or a page that does not look like an ioreq page.
    #[error("ioreq server for dom{domid}: {why}")]
    Config {
        /// Domain.
        domid: DomId,
        /// Why.
        why: String,
    },
    /// The thread or its wakeup descriptor could not be made.
    #[error("ioreq server {id} of dom{domid}: {what}: {source}")]
    Os {
        /// Domain.
        domid: DomId,
        /// Server.
        id: IoServId,
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How to set up an ioreq server.
#[derive(Debug, Clone)]
pub struct IoreqConfig {
    /// The HVM guest.
    pub domid: DomId,
    /// Its vCPUs (slots in the synchronous page; at most 128).
    pub vcpus: u32,
    /// Where its RAM is (bounds for `data_is_ptr` buffers).
    pub ram: RamLayout,
    /// Buffered ring handling.
    pub bufioreq: BufMode,
    /// After handling requests, keep polling the pages this long before sleeping on the
    /// event channel (0: never spin).
    pub spin: Duration,
}

impl IoreqConfig {
    /// Defaults: atomic buffered ring, [`DEFAULT_POLL`] of polling before sleeping.
    pub fn new(domid: DomId, vcpus: u32, ram_bytes: u64) -> Self {
        IoreqConfig {
            domid,
            vcpus,
            ram: RamLayout::hvm(ram_bytes),
            bufioreq: BufMode::Atomic,
            spin: DEFAULT_POLL,
        }
    }
}

/// How long the ioreq thread keeps looking at its pages (yielding the CPU between looks)
/// after work before it sleeps on the event channel: a vCPU that comes back within that time
/// is answered without a wakeup. QEMU's iothreads poll for up to 32 us for the same reason.
pub const DEFAULT_POLL: Duration = Duration::from_micros(20);

/// The [`RangeRegistry`] of one server: checks each range, then XEN_DMOP_map_io_range.
#[derive(Clone)]
pub struct ServerRanges {
    dm: Arc<dyn DeviceModel>,
    domid: DomId,
    id: IoServId,
}

impl std::fmt::Debug for ServerRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRanges")
            .field("domid", &self.domid)
            .field("id", &self.id)
            .finish()
    }
}

/// Why a range is not one to hand to Xen (XSA-238: never send `end < start`; an all-ones
/// or zero-sized BAR is not a range).
pub fn check_range(range: IoRange) -> Result<(), RangeError> {
    let invalid = |why| Err(RangeError::Invalid { range, why });
    match range {
        IoRange::Port { start, end } | IoRange::Mmio { start, end } if start > end => {
            invalid("ends before it starts")
        }
        IoRange::Port { end, .. } if end > 0xffff => invalid("runs past port 0xffff"),
        IoRange::Mmio { end, .. } if end == u64::MAX => invalid("reaches the all-ones address"),
        IoRange::Mmio { start, end } if start == 0xffff_ffff || end == 0xffff_ffff => {
            invalid("an all-ones 32-bit BAR is not an address")
        }
        IoRange::Pci { dev, func, .. } if dev > 0x1f || func > 7 => {
            invalid("PCI device must be 0..=31 and function 0..=7")
        }
        _ => Ok(()),
    }
}

impl RangeRegistry for ServerRanges {
    fn map(&self, range: IoRange) -> Result<(), RangeError> {
        check_range(range)?;
        self.dm
            .map_io_range(self.domid, self.id, range)
            .map_err(|source| RangeError::Dm { range, source })
    }

    fn unmap(&self, range: IoRange) -> Result<(), RangeError> {
        check_range(range)?;
        self.dm
            .unmap_io_range(self.domid, self.id, range)
            .map_err(|source| RangeError::Dm { range, source })
    }
}

/// Everything the ioreq thread owns.
struct Core {
    domid: DomId,
    id: IoServId,
    vcpus: u32,
    evtchn: Box<dyn EventChannels>,
    pages: SharedMem,
    sync_off: usize,
    buf_off: Option<usize>,
    vcpu_ports: Vec<Port>,
    buf_port: Option<Port>,
    dispatch: Dispatcher,
    stats: Arc<IoreqStats>,
    spin: Duration,
    bad_ring_logged: bool,
    /// Per vCPU: its slot held an answer (IORESP_READY) at the last sweep.
    unconsumed: Vec<bool>,
    sweep_log: crate::ratelimit::RateLimit,
}

/// How long the ioreq thread sleeps without an event before it sweeps the slots anyway: a
/// request whose event was lost is served, and an answer the vCPU has not taken is notified
/// again, so that a lost notification costs a vCPU this long instead of hanging it for good.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// One ioreq server. Created enabled with no range; [`IoreqServer::run`] starts its thread.
/// Dropping it stops the thread, disables and destroys the server.
pub struct IoreqServer {
    domid: DomId,
    id: IoServId,
    dm: Arc<dyn DeviceModel>,
    stats: Arc<IoreqStats>,
    core: Option<Core>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<EventFd>,
    destroyed: bool,
}

impl std::fmt::Debug for IoreqServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoreqServer")
            .field("domid", &self.domid)
            .field("id", &self.id)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl IoreqServer {
    /// Creates the server on `host` for `cfg.domid`, maps its pages, enables it and binds its
    /// event channels. No range is registered yet: register them through
    /// [`IoreqServer::ranges`], then [`IoreqServer::run`].
    pub fn create(host: &dyn XenHost, cfg: IoreqConfig) -> Result<IoreqServer, IoreqError> {
        let domid = cfg.domid;
        if cfg.vcpus == 0 || cfg.vcpus as usize * IOREQ_SIZE > PAGE_SIZE {
            return Err(IoreqError::Config {
                domid,
                why: format!("{} vCPUs (one ioreq page holds 1..=128)", cfg.vcpus),
            });
        }
        let hosterr = |source| IoreqError::Host { domid, source };
        let dm: Arc<dyn DeviceModel> = Arc::from(host.open_devmodel().map_err(hosterr)?);
        let id = dm
            .create_ioreq_server(domid, cfg.bufioreq)
            .map_err(|source| IoreqError::Dm {
                domid,
                id: None,
                what: "create_ioreq_server",
                source,
            })?;
        let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| IoreqError::Os {
                domid,
                id,
                what: "eventfd",
                source: e.into(),
            })?;
        let mut server = IoreqServer {
            domid,
            id,
            dm: dm.clone(),
            stats: Arc::default(),
            core: None,
            thread: None,
            stop: Arc::new(stop),
            destroyed: false,
        };
        // On error from here on, dropping `server` destroys the Xen-side server.
        let (vcpus, bufioreq) = (cfg.vcpus, cfg.bufioreq);
        let core = server.setup(host, cfg)?;
        server.core = Some(core);
        tracing::info!(domid, server = id, vcpus, bufioreq = ?bufioreq, "ioreq server created");
        Ok(server)
    }

    fn setup(&self, host: &dyn XenHost, cfg: IoreqConfig) -> Result<Core, IoreqError> {
        let (domid, id) = (self.domid, self.id);
        let hosterr = |source| IoreqError::Host { domid, source };
        let info = self
            .dm
            .get_ioreq_server_info(domid, id, false)
            .map_err(|source| IoreqError::Dm {
                domid,
                id: Some(id),
                what: "get_ioreq_server_info",
                source,
            })?;
        let buffered = cfg.bufioreq != BufMode::Off;
        let foreign = host.open_foreign().map_err(hosterr)?;
        let (first, nr) = if buffered {
            (XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ, 2)
        } else {
            (xenmem_resource_ioreq_server_frame_ioreq(0), 1)
        };
        let pages = foreign
            .map_resource(domid, Resource::IoreqServer(id), first, nr)
            .map_err(|source| IoreqError::Map { domid, id, source })?;
        let sync_off = if buffered { PAGE_SIZE } else { 0 };
        let buf_off = buffered.then_some(0);
        // Xen writes each vCPU's `vp_eport` into its slot only when the server is enabled
        // (ioreq_server_enable): enable now, as QEMU does, then read the ports. No range is
        // registered yet, so no access reaches us before the thread runs.
        self.dm
            .set_ioreq_server_state(domid, id, true)
            .map_err(|source| IoreqError::Dm {
                domid,
                id: Some(id),
                what: "set_ioreq_server_state(enabled)",
                source,
            })?;
        // Xen fills `vp_eport` for every vCPU the guest has: a port in the slot after the
        // last one we serve means vCPUs we would never answer.
        let next = sync_off + cfg.vcpus as usize * IOREQ_SIZE + 24;
        if let Ok(port) = pages.load_u32(next, Ordering::Acquire) {
            if cfg.vcpus < (PAGE_SIZE / IOREQ_SIZE) as u32 && port != 0 {
                return Err(IoreqError::Config {
                    domid,
                    why: format!(
                        "the guest has more than the {} vCPUs configured (vcpu{} has port {port})",
                        cfg.vcpus, cfg.vcpus
                    ),
                });
            }
        }
        let evtchn = host.open_evtchn().map_err(hosterr)?;
        let mut vcpu_ports = Vec::with_capacity(cfg.vcpus as usize);
        for v in 0..cfg.vcpus {
            let remote = pages
                .load_u32(sync_off + v as usize * IOREQ_SIZE + 24, Ordering::Acquire)
                .map_err(|e| IoreqError::Config {
                    domid,
                    why: format!("reading vcpu{v}'s vp_eport: {e}"),
                })?;
            let local =
                evtchn
                    .bind_interdomain(domid, remote)
                    .map_err(|source| IoreqError::Evtchn {
                        domid,
                        id,
                        what: format!("vcpu{v}'s port {remote}"),
                        source,
                    })?;
            vcpu_ports.push(local);
        }
        let buf_port = if buffered {
            Some(
                evtchn
                    .bind_interdomain(domid, info.bufioreq_port)
                    .map_err(|source| IoreqError::Evtchn {
                        domid,
                        id,
                        what: format!("the buffered ring's port {}", info.bufioreq_port),
                        source,
                    })?,
            )
        } else {
            None
        };
        let mem = GuestMemory::with_layout(
            host.open_foreign().map_err(hosterr)?,
            domid,
            cfg.ram.clone(),
        );
        let stats = self.stats.clone();
        Ok(Core {
            domid,
            id,
            vcpus: cfg.vcpus,
            evtchn,
            pages,
            sync_off,
            buf_off,
            vcpu_ports,
            buf_port,
            dispatch: Dispatcher::new(domid, id, mem, stats.clone()),
            stats,
            spin: cfg.spin,
            bad_ring_logged: false,
            unconsumed: vec![false; cfg.vcpus as usize],
            sweep_log: crate::ratelimit::RateLimit::default(),
        })
    }

    /// The server id.
    pub fn id(&self) -> IoServId {
        self.id
    }

    /// The guest.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The counters.
    pub fn stats(&self) -> Arc<IoreqStats> {
        self.stats.clone()
    }

    /// The handle through which the machine maps and unmaps its ranges.
    pub fn ranges(&self) -> Arc<dyn RangeRegistry> {
        Arc::new(ServerRanges {
            dm: self.dm.clone(),
            domid: self.domid,
            id: self.id,
        })
    }

    /// Starts the ioreq thread, which calls `handler` for every access. Fails if already
    /// running.
    pub fn run(&mut self, handler: Box<dyn IoHandler>) -> Result<(), IoreqError> {
        let (domid, id) = (self.domid, self.id);
        let core = self.core.take().ok_or_else(|| IoreqError::Config {
            domid,
            why: format!("ioreq server {id} is already running"),
        })?;
        let stop = self.stop.clone();
        let dm = self.dm.clone();
        let t = std::thread::Builder::new()
            .name(format!("ioreq-d{domid}-s{id}"))
            .spawn(move || {
                if !core.run(handler, &stop) {
                    // The thread cannot go on: disable the server so that the guest's
                    // accesses become unclaimed (all ones) instead of waiting forever.
                    if let Err(e) = dm.set_ioreq_server_state(domid, id, false) {
                        tracing::error!(domid, server = id, error = %e, "disabling the ioreq server after its thread failed also failed");
                    }
                }
            })
            .map_err(|source| IoreqError::Os {
                domid,
                id,
                what: "spawning the ioreq thread",
                source,
            })?;
        self.thread = Some(t);
        Ok(())
    }

    /// Stops the thread, disables and destroys the server. Idempotent.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
        if !self.destroyed {
            self.destroyed = true;
            if let Err(e) = self.dm.set_ioreq_server_state(self.domid, self.id, false) {
                tracing::debug!(domid = self.domid, server = self.id, error = %e, "disabling the ioreq server failed");
            }
            match self.dm.destroy_ioreq_server(self.domid, self.id) {
                Ok(()) => tracing::info!(
                    domid = self.domid,
                    server = self.id,
                    "ioreq server destroyed"
                ),
                Err(e) => {
                    tracing::warn!(domid = self.domid, server = self.id, error = %e, "destroying the ioreq server failed")
                }
            }
        }
    }
}

impl Drop for IoreqServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Core {
    /// Serves until `stop` is signalled (true) or the thread cannot go on (false).
    fn run(mut self, mut handler: Box<dyn IoHandler>, stop: &EventFd) -> bool {
        let mut ports = [0 as Port; 64];
        tracing::debug!(domid = self.domid, server = self.id, vcpu_ports = ?self.vcpu_ports, buf_port = ?self.buf_port, "ioreq thread started");
        let mut more = self.scan(handler.as_mut()).1;
        // No polling right after a sweep: nothing had come for a whole interval.
        let mut swept = false;
        loop {
            if !more && !swept && !self.spin.is_zero() {
                let start = Instant::now();
                while start.elapsed() < self.spin {
                    if self.scan(handler.as_mut()).0 {
                        break;
                    }
                    // Yield rather than burn the core: the vCPU may need it.
                    std::thread::yield_now();
                }
            }
            let timeout = if more {
                PollTimeout::ZERO
            } else {
                PollTimeout::try_from(SWEEP_INTERVAL).unwrap_or(PollTimeout::MAX)
            };
            let mut fds = [
                PollFd::new(self.evtchn.fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(0) if !more => {
                    more = self.sweep(handler.as_mut());
                    swept = true;
                    continue;
                }
                Ok(_) => swept = false,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(domid = self.domid, server = self.id, error = %e, "ioreq thread: poll failed; stopping");
                    return false;
                }
            }
            if fds[1]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
            {
                break;
            }
            loop {
                match self.evtchn.pending(&mut ports) {
                    Ok(0) => break,
                    Ok(n) => {
                        for p in ports.get(..n).unwrap_or(&[]) {
                            if let Err(e) = self.evtchn.unmask(*p) {
                                tracing::warn!(domid = self.domid, server = self.id, port = p, error = %e, "unmask failed");
                            }
                        }
                        if n < ports.len() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(domid = self.domid, server = self.id, error = %e, "taking pending events failed");
                        break;
                    }
                }
            }
            // Each new request comes with its own event, so only a buffered ring left
            // unfinished (budget spent) calls for another pass without sleeping.
            more = self.scan(handler.as_mut()).1;
        }
        tracing::debug!(domid = self.domid, server = self.id, "ioreq thread stopped");
        true
    }

    /// Drains the buffered ring (bounded) and serves every vCPU slot that is READY. Returns
    /// whether work was done, and whether buffered work remains.
    fn scan(&mut self, handler: &mut dyn IoHandler) -> (bool, bool) {
        let mut worked = false;
        let mut more = false;
        // Buffered writes first (as QEMU does): a synchronous request a vCPU posted after
        // buffered ones must see them done. The budget covers a full ring.
        if self.buf_off.is_some() {
            let (w, m) = self.drain_buffered(handler);
            worked |= w;
            more |= m;
        }
        for v in 0..self.vcpus {
            worked |= self.serve_slot(v, handler);
        }
        (worked, more)
    }

    fn slot_state(&self, vcpu: u32) -> Option<u8> {
        let at = self.sync_off + vcpu as usize * IOREQ_SIZE + IOREQ_STATE_OFFSET;
        self.pages
            .load_u8(at, Ordering::Acquire)
            .ok()
            .map(|b| b & 0x0f)
    }

    /// The sweep after [`SWEEP_INTERVAL`] without events: drains the buffered ring, serves
    /// requests that came without an event (counted in `missed_events`), and notifies again a
    /// vCPU whose answer has waited since the previous sweep (`renotified`). Returns whether
    /// buffered work remains.
    fn sweep(&mut self, handler: &mut dyn IoHandler) -> bool {
        let more = match self.buf_off {
            Some(_) => self.drain_buffered(handler).1,
            None => false,
        };
        let (mut missed, mut renotified) = (0u64, 0u64);
        for v in 0..self.vcpus {
            let state = self.slot_state(v);
            let waited = self.unconsumed.get(v as usize).copied().unwrap_or(false);
            let answer_pending = match state {
                Some(STATE_IOREQ_READY) => {
                    missed += 1;
                    self.serve_slot(v, handler)
                }
                Some(STATE_IORESP_READY) => {
                    if waited {
                        if let Some(port) = self.vcpu_ports.get(v as usize) {
                            renotified += u64::from(self.evtchn.notify(*port).is_ok());
                        }
                    }
                    true
                }
                _ => false,
            };
            if let Some(flag) = self.unconsumed.get_mut(v as usize) {
                *flag = answer_pending;
            }
        }
        self.stats.sweeps.fetch_add(1, Ordering::Relaxed);
        if missed + renotified > 0 {
            self.stats
                .missed_events
                .fetch_add(missed, Ordering::Relaxed);
            self.stats
                .renotified
                .fetch_add(renotified, Ordering::Relaxed);
            if let Some(suppressed) = self.sweep_log.check() {
                tracing::warn!(
                    domid = self.domid,
                    server = self.id,
                    missed,
                    renotified,
                    suppressed,
                    "ioreq sweep: requests waiting without an event were served, answers not taken were notified again (a lost event-channel notification)"
                );
            }
        }
        more
    }

    fn serve_slot(&mut self, vcpu: u32, handler: &mut dyn IoHandler) -> bool {
        let off = self.sync_off + vcpu as usize * IOREQ_SIZE;
        let state_at = off + IOREQ_STATE_OFFSET;
        // Acquire: everything Xen wrote before READY is visible after this load.
        let Ok(bits) = self.pages.load_u8(state_at, Ordering::Acquire) else {
            return false;
        };
        if bits & 0x0f != STATE_IOREQ_READY {
            return false;
        }
        if self.buf_off.is_some() {
            // Writes this vCPU buffered before this request come first.
            self.drain_buffered(handler);
        }
        let _ = self.pages.store_u8(
            state_at,
            (bits & 0xf0) | STATE_IOREQ_INPROCESS,
            Ordering::Release,
        );
        // The one copy of the request (XSA-197): nothing below reads the slot again.
        // (The slot is inside the mapping, checked at setup; should the copy fail anyway, an
        // all-zero request is malformed and still gets completed below.)
        let snap: Ioreq = self.pages.read_obj(off).unwrap_or_default();
        let data = self.dispatch.handle(&snap, handler);
        let _ = self.pages.store_u64(off + 8, data, Ordering::Relaxed);
        // Release: `data` is visible before IORESP_READY.
        fence(Ordering::Release);
        let _ = self.pages.store_u8(
            state_at,
            (bits & 0xf0) | STATE_IORESP_READY,
            Ordering::Release,
        );
        self.stats.sync.fetch_add(1, Ordering::Relaxed);
        if let Some(port) = self.vcpu_ports.get(vcpu as usize) {
            if let Err(e) = self.evtchn.notify(*port) {
                tracing::warn!(domid = self.domid, server = self.id, vcpu, error = %e, "notifying the vCPU failed");
            }
        }
        true
    }

    /// Advances `read_pointer` by `n` with an atomic read-modify-write (Xen may subtract a
    /// multiple of the slot count from both pointers at any time).
    fn advance(&self, b: usize, n: u32) {
        for _ in 0..64 {
            let Ok(cur) = self
                .pages
                .load_u32(b + BUFIOREQ_READ_POINTER_OFFSET, Ordering::Acquire)
            else {
                return;
            };
            match self
                .pages
                .cmpxchg_u32(b + BUFIOREQ_READ_POINTER_OFFSET, cur, cur.wrapping_add(n))
            {
                Ok(found) if found == cur => return,
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    }

    fn drain_buffered(&mut self, handler: &mut dyn IoHandler) -> (bool, bool) {
        let Some(b) = self.buf_off else {
            return (false, false);
        };
        let mut worked = false;
        let mut budget = IOREQ_BUFFER_SLOT_NUM;
        while budget > 0 {
            // Both pointers in one load: in atomic mode Xen takes a multiple of the ring size
            // off both at once (a cmpxchg of the 64-bit pair), and two separate loads could
            // see the read pointer from before that and the write pointer from after it.
            const _: () =
                assert!(BUFIOREQ_WRITE_POINTER_OFFSET == BUFIOREQ_READ_POINTER_OFFSET + 4);
            let Ok(both) = self
                .pages
                .load_u64(b + BUFIOREQ_READ_POINTER_OFFSET, Ordering::Acquire)
            else {
                return (worked, false);
            };
            let (rp, wp) = (both as u32, (both >> 32) as u32);
            let avail = wp.wrapping_sub(rp);
            if avail == 0 {
                return (worked, false);
            }
            if avail > IOREQ_BUFFER_SLOT_NUM {
                if !self.bad_ring_logged {
                    self.bad_ring_logged = true;
                    tracing::warn!(
                        domid = self.domid,
                        server = self.id,
                        rp,
                        wp,
                        "buffered ioreq pointers are corrupt; skipping to the write pointer"
                    );
                }
                self.stats.bad.fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .pages
                    .cmpxchg_u32(b + BUFIOREQ_READ_POINTER_OFFSET, rp, wp);
                return (true, true);
            }
            let Ok(lo) = self
                .pages
                .read_obj::<BufIoreq>(b + buf_ioreq_slot_offset(rp))
            else {
                return (worked, false);
            };
            let qw = lo.size() == 3;
            if qw && avail < 2 {
                // Xen publishes both halves before moving the write pointer; wait for them.
                return (worked, false);
            }
            let mut data = u64::from(lo.data);
            if qw {
                let Ok(hi) = self
                    .pages
                    .read_obj::<BufIoreq>(b + buf_ioreq_slot_offset(rp.wrapping_add(1)))
                else {
                    return (worked, false);
                };
                data |= u64::from(hi.data) << 32;
            }
            let req = Ioreq {
                addr: u64::from(lo.addr()),
                data,
                count: 1,
                size: lo.size_bytes(),
                vp_eport: 0,
                _pad0: 0,
                bits: Ioreq::make_bits(STATE_IOREQ_READY, false, lo.dir(), false),
                type_: lo.type_(),
            };
            if lo.dir() == IOREQ_WRITE {
                self.dispatch.handle(&req, handler);
            } else {
                // Xen only posts writes; answer nothing, count it.
                self.stats.bad.fetch_add(1, Ordering::Relaxed);
            }
            let n = if qw { 2 } else { 1 };
            self.advance(b, n);
            self.stats.buffered.fetch_add(1, Ordering::Relaxed);
            worked = true;
            budget = budget.saturating_sub(n);
        }
        // Budget spent with entries left.
        (worked, true)
    }
}

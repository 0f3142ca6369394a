//! virtio-blk on the storage engines: read, write, flush, discard, write-zeroes and get-id,
//! with one or more queues served by one thread per disk (the engine is not shared between
//! threads; queue heads from all queues go to it in batches).
//!
//! Every request is copied out of guest RAM once and checked before it reaches the engine:
//! the chain must end (no loops, at most the queue size of descriptors), have a readable
//! 16-byte header first and a writable status byte last, data descriptors with the right
//! direction, non-zero lengths inside guest RAM, and a sector range inside the disk. A bad
//! request completes with VIRTIO_BLK_S_IOERR (or VIRTIO_BLK_S_UNSUPP), and the queue goes on.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backends::blk::engine::{Completion, Engine, IoOp, IoRequest, IoSeg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Descriptor, Queue, QueueT};

use super::poll::PollWindow;
use super::{Activation, Notifier, QueueConfig, VirtioBackend, VirtioError};
use crate::mem::{GuestRam, RamMap};
use crate::RateLog;

/// VIRTIO_BLK_F_SIZE_MAX.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_MQ.
pub const F_MQ: u64 = 1 << 12;
/// VIRTIO_BLK_F_DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get id.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;
/// Status OK.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported.
pub const S_UNSUPP: u8 = 2;

/// Largest single data descriptor (size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data descriptors per request (seg_max).
pub const SEG_MAX: u32 = 126;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most queues a disk has (`virtio_queues`).
pub const MAX_QUEUES: usize = 16;
const SECTOR: u64 = 512;

/// An engine tag: the activation it belongs to (high 32 bits), the queue and the chain head.
/// A reset whose drain timed out leaves requests in flight on the engine, which the next
/// activation keeps; their completions must not be taken for a new request on the same
/// queue and head.
fn make_tag(generation: u32, q: usize, head: u16) -> u64 {
    (u64::from(generation) << 32) | ((q as u64 & 0xffff) << 16) | u64::from(head)
}

/// The queue and head of a completion's tag, if it belongs to activation `generation`.
fn split_tag(tag: u64, generation: u32) -> Option<(usize, u16)> {
    ((tag >> 32) as u32 == generation).then_some((((tag >> 16) & 0xffff) as usize, tag as u16))
}

struct Pending {
    status_gpa: u64,
    used_len: u32,
}

struct Worker {
    engine: Box<dyn Engine>,
    queues: Vec<Option<Queue>>,
    kicks: Vec<Arc<EventFd>>,
    stop: Arc<EventFd>,
    /// Set by reset before it signals `stop`: the inner loop checks it, so a driver that
    /// keeps the ring full cannot delay a reset.
    stopping: Arc<AtomicBool>,
    ram: Arc<GuestRam>,
    notifier: Notifier,
    pending: Vec<Vec<Option<Pending>>>,
    backlog: VecDeque<(usize, IoRequest)>,
    seg_pool: Vec<Vec<IoSeg>>,
    completions: Vec<Completion>,
    descs: Vec<Descriptor>,
    to_notify: Vec<bool>,
    /// Doorbells are off on this queue (VRING_USED_F_NO_NOTIFY set).
    quiet: Vec<bool>,
    /// Requests queued on the engine since its last kick.
    unkicked: u32,
    /// Chains were taken from the driver rings since `after_pass` last looked, and interrupts
    /// sent so far: what drives `poll`.
    popped: bool,
    interrupts: u64,
    /// How long to poll the driver rings after an interrupt.
    poll: PollWindow,
    /// Which activation this is (see [`make_tag`]).
    generation: u32,
    /// The driver broke this queue's ring; it is not served until the device is reset.
    broken: Vec<bool>,
    serial: [u8; 20],
    capacity: u64,
    read_only: bool,
    name: String,
    log: Arc<RateLog>,
}

/// Errors of a virtio-blk disk, naming the domain and the disk.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The engine did not come back from the last queue thread (it panicked).
    #[error("dom{domid}: virtio-blk {name}: the storage engine was lost with its queue thread")]
    EngineGone {
        /// Domain.
        domid: xen::DomId,
        /// Disk.
        name: String,
    },
    /// A system call failed.
    #[error("dom{domid}: virtio-blk {name}: {what}: {source}")]
    Os {
        /// Domain.
        domid: xen::DomId,
        /// Disk.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Guest RAM could not be mapped.
    #[error("dom{domid}: virtio-blk {name}: {source}")]
    Mem {
        /// Domain.
        domid: xen::DomId,
        /// Disk.
        name: String,
        /// The error.
        #[source]
        source: crate::mem::MemMapError,
    },
    /// The storage engine failed.
    #[error("dom{domid}: virtio-blk {name}: engine: {source}")]
    Engine {
        /// Domain.
        domid: xen::DomId,
        /// Disk.
        name: String,
        /// The error.
        #[source]
        source: backends::blk::engine::EngineError,
    },
    /// [`serve_queue_once`]: the engine did not complete in time.
    #[error("dom{domid}: virtio-blk {name}: engine completion timed out")]
    Timeout {
        /// Domain.
        domid: xen::DomId,
        /// Disk.
        name: String,
    },
    /// [`serve_queue_once`]: the device ring cannot be read back.
    #[error("dom{domid}: virtio-blk {name}: device ring outside guest RAM")]
    UsedRing {
        /// Domain.
        domid: xen::DomId,
        /// Disk.
        name: String,
    },
}

/// The stop signal (eventfd and flag) and the queue thread, which hands the engine back when
/// it ends.
type Running = (Arc<EventFd>, Arc<AtomicBool>, JoinHandle<Box<dyn Engine>>);

/// The virtio-blk device.
pub struct VirtioBlk {
    name: String,
    engine: Option<Box<dyn Engine>>,
    capacity: u64,
    read_only: bool,
    discard: bool,
    queues: u16,
    serial: [u8; 20],
    running: Option<Running>,
    log: Arc<RateLog>,
    describe: String,
    poll: Duration,
    /// Activations so far (see [`make_tag`]).
    generation: u32,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("name", &self.name)
            .finish()
    }
}

impl VirtioBlk {
    /// A disk named `name` (the xl vdev, used as its serial) on `engine` with `queues` queues.
    pub fn new(name: &str, engine: Box<dyn Engine>, queues: u16) -> VirtioBlk {
        let info = engine.info().clone();
        let mut serial = [0u8; 20];
        let n = name.len().min(20);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        VirtioBlk {
            name: name.to_string(),
            capacity: info.capacity / SECTOR,
            read_only: info.read_only,
            discard: info.discard.is_some(),
            queues: queues.clamp(1, MAX_QUEUES as u16),
            serial,
            engine: Some(engine),
            running: None,
            log: Arc::new(RateLog::new()),
            poll: Duration::ZERO,
            generation: 0,
            describe: format!(
                "virtio-blk {name} {} ({} MiB{}, {} queue{})",
                info.describe,
                info.capacity >> 20,
                if info.read_only { ", read-only" } else { "" },
                queues.clamp(1, 16),
                if queues > 1 { "s" } else { "" }
            ),
        }
    }

    /// Polls the driver rings for up to `max` after each interrupt, with doorbells off,
    /// adapting the window to how fast the driver answers (see [`super::poll`]); zero (the
    /// default) never polls.
    pub fn with_poll(mut self, max: Duration) -> VirtioBlk {
        self.poll = max;
        self
    }
}

impl VirtioBackend for VirtioBlk {
    fn device_type(&self) -> u16 {
        2
    }
    fn class(&self) -> u32 {
        0x01_80_00
    }
    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_MQ;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_WRITE_ZEROES;
            if self.discard {
                f |= F_DISCARD;
            }
        }
        f
    }
    fn num_queues(&self) -> u16 {
        self.queues
    }
    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }
    fn config_read(&self, off: u64, size: u8) -> u64 {
        let mut c = [0u8; 64];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        c[36..40].copy_from_slice(&(u32::MAX >> 9).to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&(u32::MAX >> 9).to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        let (o, s) = (off as usize, usize::from(size));
        match c.get(o..o + s) {
            Some(b) => b
                .iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
            None => 0,
        }
    }
    fn activate(&mut self, act: Activation) -> Result<(), VirtioError> {
        let domid = act.domid;
        let os = |what: &'static str, name: &str| {
            let name = name.to_string();
            move |source: std::io::Error| BlkError::Os {
                domid,
                name,
                what,
                source,
            }
        };
        let engine = self.engine.take().ok_or_else(|| BlkError::EngineGone {
            domid,
            name: self.name.clone(),
        })?;
        let stop = match EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        ) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                self.engine = Some(engine);
                return Err(os("eventfd", &self.name)(e.into()).into());
            }
        };
        self.generation = self.generation.wrapping_add(1);
        let disk = DiskParams {
            serial: self.serial,
            capacity: self.capacity,
            read_only: self.read_only,
            name: self.name.clone(),
            poll: self.poll,
            generation: self.generation,
        };
        let mut w = match Worker::prepare(engine, act, stop.clone(), disk, self.log.clone()) {
            Ok(w) => w,
            Err((engine, e)) => {
                self.engine = Some(engine);
                return Err(e);
            }
        };
        let stopping = w.stopping.clone();
        let h = std::thread::Builder::new()
            .name(format!("vblk-{}", self.name))
            .spawn(move || {
                w.run();
                w.engine
            })
            .map_err(os("spawning the queue thread", &self.name))?;
        self.running = Some((stop, stopping, h));
        Ok(())
    }
    fn reset(&mut self) {
        if let Some((stop, stopping, h)) = self.running.take() {
            stopping.store(true, Ordering::SeqCst);
            let _ = stop.write(1);
            match h.join() {
                Ok(engine) => self.engine = Some(engine),
                Err(_) => self.log.warn(format_args!(
                    "virtio-blk {}: queue thread panicked; disk gone",
                    self.name
                )),
            }
        }
    }
    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// Why a request is refused.
enum Bad {
    /// Malformed: IOERR.
    Io(&'static str),
    /// Unknown type: UNSUPP.
    Unsupp,
}

/// What the queue thread knows about its disk.
struct DiskParams {
    serial: [u8; 20],
    capacity: u64,
    read_only: bool,
    name: String,
    poll: Duration,
    generation: u32,
}

/// Serves one queue synchronously on the calling thread with the same code as the queue
/// thread: every chain the driver made available is popped, checked and run on `engine`
/// until nothing is in flight. Returns the used entries (head, length) in order. For the
/// descriptor-chain fuzz target and tests; `ram` is guest RAM from guest-physical 0.
pub fn serve_queue_once(
    ram: Arc<xen::SharedMem>,
    qc: QueueConfig,
    engine: Box<dyn Engine>,
    irq: crate::irq::IrqSink,
) -> Result<Vec<(u32, u32)>, VirtioError> {
    let domid = irq.domid();
    let name = || "harness".to_string();
    let gram = GuestRam::new(
        domid,
        Box::new(crate::mem::FixedRam(vec![crate::mem::RamRegion {
            gpa: 0,
            mem: ram,
        }])),
    )
    .map_err(|source| BlkError::Mem {
        domid,
        name: name(),
        source,
    })?;
    let act = Activation {
        domid,
        features: 0,
        queues: vec![qc],
        kicks: Vec::new(),
        ram: Arc::new(gram),
        notifier: Notifier::new(irq, 0, 0, 1, 2),
    };
    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(
            |e| BlkError::Os {
                domid,
                name: name(),
                what: "eventfd",
                source: e.into(),
            },
        )?,
    );
    let disk_bytes = engine.info().capacity;
    let disk = DiskParams {
        serial: *b"fuzz\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        capacity: disk_bytes / SECTOR,
        read_only: engine.info().read_only,
        name: name(),
        poll: Duration::ZERO,
        generation: 0,
    };
    let mut w =
        Worker::prepare(engine, act, stop, disk, Arc::new(RateLog::new())).map_err(|(_, e)| e)?;
    let map = w.ram.get();
    let used_before = w.queues[0].as_ref().map_or(0, |q| q.next_used());
    loop {
        w.pop_queue(0);
        if let Err(source) = w.engine.kick() {
            return Err(BlkError::Engine {
                domid,
                name: name(),
                source,
            }
            .into());
        }
        if w.engine.in_flight() == 0 {
            break;
        }
        let mut fds = [PollFd::new(w.engine.completion_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(5000u16)).map_err(|e| BlkError::Os {
            domid,
            name: name(),
            what: "poll",
            source: e.into(),
        })?;
        if ready == 0 {
            return Err(BlkError::Timeout {
                domid,
                name: name(),
            }
            .into());
        }
        w.reap();
    }
    let Some(q) = w.queues[0].as_ref() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut i = used_before;
    while i != q.next_used() {
        let e = qc.used + 4 + 8 * u64::from(i % qc.size);
        let mut b = [0u8; 8];
        if !map.read(e, &mut b) {
            return Err(BlkError::UsedRing {
                domid,
                name: name(),
            }
            .into());
        }
        out.push((
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        ));
        i = i.wrapping_add(1);
    }
    Ok(out)
}

impl Worker {
    /// Builds the queues (checked) and the per-queue state; gives the engine back on error.
    fn prepare(
        engine: Box<dyn Engine>,
        act: Activation,
        stop: Arc<EventFd>,
        disk: DiskParams,
        log: Arc<RateLog>,
    ) -> Result<Worker, (Box<dyn Engine>, VirtioError)> {
        let map = act.ram.get();
        let mut queues = Vec::with_capacity(act.queues.len());
        let evi = act.features & super::F_EVENT_IDX != 0;
        let dev = format!("virtio-blk {}", disk.name);
        for (i, qc) in act.queues.iter().enumerate() {
            match super::make_queue((act.domid, &dev), i, qc, &map, evi) {
                Ok(q) => queues.push(q),
                Err(e) => return Err((engine, e)),
            }
        }
        let nq = queues.len();
        Ok(Worker {
            engine,
            queues,
            kicks: act.kicks,
            stop,
            stopping: Arc::new(AtomicBool::new(false)),
            ram: act.ram,
            notifier: act.notifier,
            pending: (0..nq)
                .map(|_| (0..QUEUE_SIZE).map(|_| None).collect())
                .collect(),
            backlog: VecDeque::with_capacity(usize::from(QUEUE_SIZE) * nq),
            seg_pool: (0..usize::from(QUEUE_SIZE) * nq)
                .map(|_| Vec::with_capacity(SEG_MAX as usize))
                .collect(),
            completions: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            to_notify: vec![false; nq],
            quiet: vec![false; nq],
            unkicked: 0,
            popped: false,
            interrupts: 0,
            poll: PollWindow::new(disk.poll),
            generation: disk.generation,
            broken: vec![false; nq],
            serial: disk.serial,
            capacity: disk.capacity,
            read_only: disk.read_only,
            name: disk.name,
            log,
        })
    }

    fn run(&mut self) {
        // While set, the driver rings are polled with doorbells off until then (an interrupt
        // went out and the driver has not answered yet).
        let mut poll_until: Option<Instant> = None;
        loop {
            let polling = poll_until.is_some_and(|t| Instant::now() < t);
            if poll_until.is_some() && !polling {
                // The window closed unanswered: doorbells back on, and one more look.
                poll_until = None;
                self.serve_available(false);
                self.after_pass(&mut poll_until, false);
            }
            let (stop_ready, kicked, done) = {
                // A fixed array, no allocation per wakeup; only the first 2 + queues entries
                // are polled.
                let nk = self.kicks.len().min(MAX_QUEUES);
                let stop_fd = self.stop.as_fd();
                let comp_fd = self.engine.completion_fd();
                let kicks = &self.kicks;
                let mut fds: [PollFd<'_>; 2 + MAX_QUEUES] = std::array::from_fn(|i| match i {
                    0 => PollFd::new(stop_fd, PollFlags::POLLIN),
                    1 => PollFd::new(comp_fd, PollFlags::POLLIN),
                    _ => match kicks.get(i - 2) {
                        Some(k) => PollFd::new(k.as_fd(), PollFlags::POLLIN),
                        None => PollFd::new(stop_fd, PollFlags::empty()),
                    },
                });
                let fds = &mut fds[..2 + nk];
                let timeout = if polling {
                    PollTimeout::ZERO
                } else {
                    PollTimeout::NONE
                };
                match poll(fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        self.log
                            .warn(format_args!("virtio-blk {}: poll: {e}", self.name));
                        return;
                    }
                }
                let r = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                let kicked: u64 = fds[2..]
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| r(f))
                    .fold(0, |a, (i, _)| a | 1 << i);
                (r(&fds[0]), kicked, r(&fds[1]))
            };
            if stop_ready {
                self.drain();
                return;
            }
            for q in 0..self.kicks.len() {
                if kicked & (1 << q) != 0 {
                    let _ = self.kicks[q].read();
                }
            }
            if done {
                self.reap();
            }
            // Doorbells stay off while polling, and also when this pass is about to interrupt
            // the driver and open a window: re-arming them first would have the driver ring
            // for the very requests the window is there to catch (with EVENT_IDX, re-arming
            // moves `avail_event` up to the ring's index).
            let suppress =
                poll_until.is_some() || (self.poll.may_poll() && self.to_notify.iter().any(|n| *n));
            self.serve_available(suppress);
            self.after_pass(&mut poll_until, suppress);
        }
    }

    /// Sends the interrupts a pass earned and moves the polling window: driver work closes
    /// it, an interrupt opens it. Doorbells left off by a pass (`suppressed`) are turned back
    /// on unless a window is open.
    fn after_pass(&mut self, poll_until: &mut Option<Instant>, suppressed: bool) {
        let interrupts = self.interrupts;
        self.notify();
        let now = Instant::now();
        let mut rearm = suppressed;
        if std::mem::take(&mut self.popped) {
            self.poll.driver_work(now);
            rearm |= poll_until.take().is_some();
        }
        if self.interrupts != interrupts {
            *poll_until = self.poll.interrupted(now);
        }
        if rearm && poll_until.is_none() {
            self.serve_available(false);
            self.notify();
        }
    }

    /// Takes every available chain on every queue (a kick may have been coalesced) and starts
    /// it. Once a queue's available ring is drained, doorbells are turned back on and the ring
    /// checked once more, so a chain made available in between is not missed, and a request
    /// the driver adds while others are in flight reaches the engine at once rather than at
    /// the next completion (as QEMU's and vhost's virtio-blk do, and as blkback's
    /// `req_event` does). Only while the engine is full (a backlog waits) is the driver told
    /// not to ring (VRING_USED_F_NO_NOTIFY): the next completion wakes this thread anyway.
    /// With `polling`, doorbells stay off on a drained ring too: this thread is looking.
    fn serve_available(&mut self, polling: bool) {
        while !self.stopping.load(Ordering::Relaxed) {
            for q in 0..self.queues.len() {
                self.pop_queue(q);
            }
            self.kick();
            let busy = !self.backlog.is_empty();
            let map = self.ram.get();
            let mut more = false;
            for (q, slot) in self.queues.iter_mut().enumerate() {
                let Some(queue) = slot.as_mut() else { continue };
                if self.broken.get(q).copied().unwrap_or(true) {
                    continue;
                }
                let quiet = self.quiet.get_mut(q);
                match (busy || polling, quiet) {
                    (true, Some(quiet)) if !*quiet => {
                        *quiet = super::suppress_doorbells(queue, map.memory());
                    }
                    // Drained: always re-arm, since with EVENT_IDX `avail_event` must move up to
                    // where we stopped even if doorbells were never turned off.
                    (false, Some(quiet)) => {
                        *quiet = false;
                        more |= queue.enable_notification(map.memory()).unwrap_or(true);
                    }
                    _ => {}
                }
            }
            if !more {
                return;
            }
        }
    }

    fn kick(&mut self) {
        self.unkicked = 0;
        if let Err(e) = self.engine.kick() {
            self.log
                .warn(format_args!("virtio-blk {}: engine kick: {e}", self.name));
        }
    }

    /// Waits for the engine's in-flight requests and drops their results (device reset).
    fn drain(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.engine.in_flight() > 0 {
            if std::time::Instant::now() > deadline {
                self.log.warn(format_args!(
                    "virtio-blk {}: {} requests still in flight 30 s after reset; leaving them",
                    self.name,
                    self.engine.in_flight()
                ));
                break;
            }
            let mut fds = [PollFd::new(self.engine.completion_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
                break;
            }
            self.completions.clear();
            if self.engine.reap(&mut self.completions).is_err() {
                break;
            }
        }
    }

    fn notify(&mut self) {
        let map = self.ram.get();
        for q in 0..self.to_notify.len() {
            if std::mem::take(&mut self.to_notify[q]) {
                let needs = match self.queues.get_mut(q).and_then(|o| o.as_mut()) {
                    Some(queue) => super::wants_interrupt(queue, map.memory()),
                    None => false,
                };
                if needs {
                    self.notifier.queue(q);
                    self.interrupts += 1;
                }
            }
        }
    }

    fn complete(
        &mut self,
        map: &RamMap,
        q: usize,
        head: u16,
        status: u8,
        used_len: u32,
        status_gpa: Option<u64>,
    ) {
        if let Some(gpa) = status_gpa {
            map.write(gpa, &[status]);
        }
        if let Some(Some(queue)) = self.queues.get_mut(q) {
            if let Err(e) = super::put_used(queue, map.memory(), head, used_len) {
                self.log.warn(format_args!(
                    "virtio-blk {}: queue {q}: add_used: {e}",
                    self.name
                ));
            }
            self.to_notify[q] = true;
        }
    }

    fn reap(&mut self) {
        self.completions.clear();
        if let Err(e) = self.engine.reap(&mut self.completions) {
            self.log
                .warn(format_args!("virtio-blk {}: reap: {e}", self.name));
            return;
        }
        let map = self.ram.get();
        let mut comps = std::mem::take(&mut self.completions);
        for c in comps.drain(..) {
            let mut segs = c.segs;
            segs.clear();
            self.seg_pool.push(segs);
            let Some((q, head)) = split_tag(c.tag, self.generation) else {
                self.log.warn(format_args!(
                    "virtio-blk {}: dropping the completion of a request from before the last reset",
                    self.name
                ));
                continue;
            };
            let Some(p) = self
                .pending
                .get_mut(q)
                .and_then(|v| v.get_mut(usize::from(head)))
                .and_then(|p| p.take())
            else {
                continue;
            };
            let status = if c.result.is_ok() { S_OK } else { S_IOERR };
            self.complete(&map, q, head, status, p.used_len, Some(p.status_gpa));
        }
        self.completions = comps;
        // Room freed: resubmit what the engine refused earlier.
        while let Some((q, req)) = self.backlog.pop_front() {
            if let Err(req) = self.engine.queue(req) {
                self.backlog.push_front((q, req));
                break;
            }
        }
    }

    fn pop_queue(&mut self, q: usize) {
        if !self.backlog.is_empty() || self.broken.get(q).copied().unwrap_or(true) {
            return;
        }
        let map = self.ram.get();
        while !self.stopping.load(Ordering::Relaxed) {
            let chain = match self.queues.get_mut(q) {
                Some(Some(queue)) => super::pop_chain(queue, map.memory()),
                _ => return,
            };
            let chain = match chain {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(why) => {
                    if let Some(b) = self.broken.get_mut(q) {
                        *b = true;
                    }
                    self.log.warn(format_args!(
                        "virtio-blk {}: queue {q}: {why}; queue stalled, device needs reset",
                        self.name
                    ));
                    self.notifier.needs_reset();
                    return;
                }
            };
            self.popped = true;
            let head = chain.head_index();
            self.descs.clear();
            let mut count = 0usize;
            let mut looped = false;
            for d in chain {
                count += 1;
                if count > usize::from(QUEUE_SIZE) {
                    looped = true;
                    break;
                }
                self.descs.push(d);
            }
            // virtio-queue stops a chain silently after queue-size hops or at an index past
            // the table; a last descriptor that still says NEXT means the chain never ended.
            if looped || self.descs.last().is_none_or(|d| d.has_next()) {
                self.log.warn(format_args!("virtio-blk {}: queue {q} head {head}: descriptor chain loops, is too long or points outside the table", self.name));
                self.complete(&map, q, head, S_IOERR, 0, None);
                continue;
            }
            match self.build(&map, q, head) {
                Ok(None) => {}
                Ok(Some(req)) => {
                    if let Err(req) = self.engine.queue(req) {
                        self.backlog.push_back((q, req));
                        return;
                    }
                    // Start the device on the first requests of a burst while the rest are
                    // still being read from the queue (blkback does the same): submitting 32
                    // O_DIRECT reads at once takes tens of microseconds.
                    self.unkicked += 1;
                    if self.unkicked >= backends::blk::DEFAULT_SUBMIT_BATCH {
                        self.kick();
                    }
                }
                Err((bad, status_gpa)) => {
                    let (st, why) = match bad {
                        Bad::Io(w) => (S_IOERR, w),
                        Bad::Unsupp => (S_UNSUPP, "unsupported request type"),
                    };
                    self.log.warn(format_args!(
                        "virtio-blk {}: queue {q} head {head}: {why}",
                        self.name
                    ));
                    let used = u32::from(status_gpa.is_some());
                    self.complete(&map, q, head, st, used, status_gpa);
                }
            }
        }
    }

    /// Turns the chain in `self.descs` into an engine request (or completes it at once).
    fn build(
        &mut self,
        map: &RamMap,
        q: usize,
        head: u16,
    ) -> Result<Option<IoRequest>, (Bad, Option<u64>)> {
        let n = self.descs.len();
        let last = self.descs[n - 1];
        let status_gpa = if last.is_write_only() && last.len() >= 1 {
            Some(
                last.addr()
                    .0
                    .checked_add(u64::from(last.len()) - 1)
                    .ok_or((Bad::Io("status address wraps"), None))?,
            )
        } else {
            None
        };
        let Some(status_gpa) = status_gpa.filter(|g| map.seg(*g, 1, true).is_some()) else {
            return Err((
                Bad::Io("no writable status byte in guest RAM at the end of the chain"),
                None,
            ));
        };
        let fail = |w: &'static str| Err((Bad::Io(w), Some(status_gpa)));
        if n < 2 {
            return fail("chain shorter than header + status");
        }
        let hd = self.descs[0];
        if hd.is_write_only() || hd.len() < 16 {
            return fail("header descriptor not readable or shorter than 16 bytes");
        }
        let mut h = [0u8; 16];
        if !map.read(hd.addr().0, &mut h) {
            return fail("header outside guest RAM");
        }
        let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        // The status descriptor may carry data bytes before the status (one descriptor for
        // both); we only accept the status byte alone to keep the direction checks simple.
        if last.len() != 1 {
            return fail("status descriptor longer than one byte");
        }
        let data = &self.descs[1..n - 1];
        if data.len() > SEG_MAX as usize {
            return fail("more data descriptors than seg_max");
        }
        let tag = make_tag(self.generation, q, head);
        let slot_free = self
            .pending
            .get(q)
            .and_then(|v| v.get(usize::from(head)))
            .is_some_and(|p| p.is_none());
        if !slot_free {
            return fail("head already in flight");
        }
        let (op, device_writes) = match ty {
            T_IN => (IoOp::Read, true),
            T_OUT => (IoOp::Write, false),
            T_FLUSH => (IoOp::Flush, false),
            T_DISCARD => (IoOp::Discard, false),
            T_WRITE_ZEROES => (IoOp::WriteZeroes, false),
            T_GET_ID => {
                let Some(d) = data
                    .first()
                    .filter(|d| d.is_write_only() && data.len() == 1)
                else {
                    return fail("get-id needs one writable data descriptor");
                };
                let len = (d.len() as usize).min(20);
                if len == 0 || !map.write(d.addr().0, &self.serial[..len]) {
                    return fail("get-id buffer outside guest RAM");
                }
                self.complete(map, q, head, S_OK, len as u32 + 1, Some(status_gpa));
                return Ok(None);
            }
            _ => return Err((Bad::Unsupp, Some(status_gpa))),
        };
        if self.read_only && op != IoOp::Read && op != IoOp::Flush {
            return fail("write to a read-only disk");
        }
        let mut segs = self.seg_pool.pop().unwrap_or_default();
        segs.clear();
        let mut total: u64 = 0;
        let mut used_len = 1u32;
        let mut offset = sector.checked_mul(SECTOR);
        let mut len = 0u64;
        match op {
            IoOp::Read | IoOp::Write => {
                for d in data {
                    if d.is_write_only() != device_writes {
                        self.seg_pool.push(segs);
                        return fail("data descriptor has the wrong direction");
                    }
                    if d.len() == 0 || d.len() > SIZE_MAX {
                        self.seg_pool.push(segs);
                        return fail("data descriptor length 0 or above size_max");
                    }
                    match map.seg(d.addr().0, d.len() as usize, device_writes) {
                        Some(s) => segs.push(s),
                        None => {
                            self.seg_pool.push(segs);
                            return fail("data descriptor outside guest RAM");
                        }
                    }
                    total += u64::from(d.len());
                }
                if total == 0 || !total.is_multiple_of(SECTOR) {
                    self.seg_pool.push(segs);
                    return fail("data length not a non-zero multiple of 512");
                }
                if device_writes {
                    used_len = used_len.saturating_add(total as u32);
                }
            }
            IoOp::Discard | IoOp::WriteZeroes => {
                let Some(d) = data
                    .first()
                    .filter(|d| data.len() == 1 && !d.is_write_only() && d.len() == 16)
                else {
                    self.seg_pool.push(segs);
                    return fail("discard/write-zeroes needs exactly one 16-byte segment");
                };
                let mut s = [0u8; 16];
                if !map.read(d.addr().0, &mut s) {
                    self.seg_pool.push(segs);
                    return fail("discard segment outside guest RAM");
                }
                let sec = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                let num = u64::from(u32::from_le_bytes([s[8], s[9], s[10], s[11]]));
                let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                if flags & !1 != 0 || (op == IoOp::Discard && flags != 0) {
                    self.seg_pool.push(segs);
                    return fail("reserved discard/write-zeroes flags set");
                }
                offset = sec.checked_mul(SECTOR);
                len = num * SECTOR;
                total = len;
                if len == 0 {
                    self.seg_pool.push(segs);
                    return fail("zero-length discard/write-zeroes");
                }
            }
            _ => {
                offset = Some(0);
            }
        }
        let end_ok = offset
            .and_then(|o| o.checked_add(total))
            .is_some_and(|end| end <= self.capacity * SECTOR);
        if !end_ok {
            self.seg_pool.push(segs);
            return fail("sector range past the end of the disk");
        }
        if let Some(p) = self
            .pending
            .get_mut(q)
            .and_then(|v| v.get_mut(usize::from(head)))
        {
            *p = Some(Pending {
                status_gpa,
                used_len,
            });
        }
        Ok(Some(IoRequest {
            tag,
            op,
            offset: offset.unwrap_or(0),
            len,
            segs,
            fua: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_completion_from_an_earlier_activation_is_not_matched() {
        let t = make_tag(7, 3, 0x1234);
        assert_eq!(split_tag(t, 7), Some((3, 0x1234)));
        // Same queue and head, one reset later: not ours.
        assert_eq!(split_tag(t, 8), None);
        assert_eq!(
            split_tag(make_tag(u32::MAX, 15, 255), u32::MAX),
            Some((15, 255))
        );
        assert_eq!(split_tag(make_tag(u32::MAX, 15, 255), 0), None);
    }
}

//! virtio-net on the network engine ([`NetQueueIo`]: a tap with a vnet header, or any queue
//! with the same semantics). Each queue pair has its own thread: transmit chains are copied
//! out of guest RAM once, checked (readable, inside RAM, at most a 12-byte header plus
//! 65,549 bytes of frame, a checksum range inside the frame) and sent with their header; received
//! frames go into the driver's receive buffers with their header (`num_buffers` 1). With
//! VERSION_1 the header is always the 12-byte `virtio_net_hdr_mrg_rxbuf`, which is what the
//! engine carries, so offloads pass through untouched.
//!
//! Offloads the tap may hand us follow what the driver accepted (GUEST_CSUM, GUEST_TSO4/6),
//! through [`NetHostControl`]. Without a host control, a partial checksum is completed in
//! software for a driver that did not accept GUEST_CSUM, and super-frames for a driver without
//! GUEST_TSO are dropped. With more than one pair the device offers MQ and a control queue
//! (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET attaches that many engine queues).

use std::io::IoSlice;
use std::num::Wrapping;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use backends::net::engine::{NetQueueIo, VirtioNetHdr};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Descriptor, Queue, QueueT};

use super::{make_queue, Activation, Notifier, VirtioBackend, VirtioError};
use crate::mem::{GuestRam, RamMap};
use crate::RateLog;

/// VIRTIO_NET_F_CSUM.
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MTU.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_GUEST_TSO4.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_HOST_TSO4.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// VIRTIO_NET_F_HOST_ECN (not offered: a frame with GSO_ECN is refused).
pub const F_HOST_ECN: u64 = 1 << 13;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_F_CTRL_VQ.
pub const F_CTRL_VQ: u64 = 1 << 17;
/// VIRTIO_NET_F_CTRL_RX.
pub const F_CTRL_RX: u64 = 1 << 18;
/// VIRTIO_NET_F_MQ.
pub const F_MQ: u64 = 1 << 22;

/// Largest frame (64 KiB of IP plus the Ethernet header).
pub const MAX_FRAME: usize = 65_535 + 14;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
const HDR: usize = VirtioNetHdr::LEN;

/// What the host side of the NIC can do besides carrying frames (a tap's TUNSETOFFLOAD and
/// queue attachment).
pub trait NetHostControl: Send + Sync {
    /// Lets the engine hand us partial checksums and TCP super-frames.
    fn set_offloads(&self, csum: bool, tso4: bool, tso6: bool) -> std::io::Result<()>;
    /// Steers traffic to the first `n` engine queues only.
    fn set_active_queues(&self, n: u16) -> std::io::Result<()>;
}

/// A [`NetHostControl`] for a tap. Every queue starts attached; the kernel refuses to attach
/// an attached queue (or detach a detached one), so the count in force is tracked.
#[derive(Debug)]
pub struct TapControl {
    tap: Arc<backends::net::tap::Tap>,
    attached: std::sync::Mutex<usize>,
}

impl TapControl {
    /// Control of `tap`.
    pub fn new(tap: Arc<backends::net::tap::Tap>) -> TapControl {
        let n = tap.queues().len();
        TapControl {
            tap,
            attached: std::sync::Mutex::new(n),
        }
    }
}

impl NetHostControl for TapControl {
    fn set_offloads(&self, csum: bool, tso4: bool, tso6: bool) -> std::io::Result<()> {
        self.tap
            .set_offloads(backends::net::tap::Offloads {
                csum,
                tso4,
                tso6,
                tso_ecn: false,
            })
            .map_err(std::io::Error::other)
    }
    fn set_active_queues(&self, n: u16) -> std::io::Result<()> {
        let qs = self.tap.queues();
        if qs.len() < 2 {
            return Ok(());
        }
        let mut cur = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let want = usize::from(n).clamp(1, qs.len());
        for (i, q) in qs.iter().enumerate() {
            let (was, will) = (i < *cur, i < want);
            if was != will {
                q.set_attached(will)?;
            }
        }
        *cur = want;
        Ok(())
    }
}

/// Errors of a virtio-net NIC, naming the domain and the NIC.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A host-side operation failed (the tap's TUNSETOFFLOAD or queue attachment, an
    /// eventfd, a thread).
    #[error("dom{domid}: virtio-net {name}: {what}: {source}")]
    Os {
        /// Domain.
        domid: xen::DomId,
        /// NIC.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The stop signal (eventfd to wake the thread, flag checked in every inner loop) and the
/// thread of one queue pair.
type Running = (Arc<EventFd>, Arc<AtomicBool>, JoinHandle<()>);

/// The virtio-net device.
pub struct VirtioNet {
    name: String,
    mac: [u8; 6],
    mtu: u16,
    engines: Vec<Arc<dyn NetQueueIo>>,
    host: Option<Arc<dyn NetHostControl>>,
    running: Vec<Running>,
    log: Arc<RateLog>,
    describe: String,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("name", &self.name)
            .finish()
    }
}

impl VirtioNet {
    /// A NIC named `name` with `mac` over one engine queue per pair (1..=16 pairs).
    pub fn new(
        name: &str,
        mac: [u8; 6],
        mtu: u16,
        engines: Vec<Arc<dyn NetQueueIo>>,
        host: Option<Arc<dyn NetHostControl>>,
        host_describe: &str,
    ) -> VirtioNet {
        let m = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        VirtioNet {
            describe: format!(
                "virtio-net {name} mac {m} mtu {mtu} {} queue pair{} on {host_describe}",
                engines.len(),
                if engines.len() > 1 { "s" } else { "" }
            ),
            name: name.to_string(),
            mac,
            mtu,
            engines,
            host,
            running: Vec::new(),
            log: Arc::new(RateLog::new()),
        }
    }

    fn pairs(&self) -> u16 {
        self.engines.len().clamp(1, 16) as u16
    }
}

impl VirtioBackend for VirtioNet {
    fn device_type(&self) -> u16 {
        1
    }
    fn class(&self) -> u32 {
        0x02_00_00
    }
    fn features(&self) -> u64 {
        let mut f = F_CSUM
            | F_GUEST_CSUM
            | F_MTU
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_STATUS;
        if self.pairs() > 1 {
            f |= F_CTRL_VQ | F_CTRL_RX | F_MQ;
        }
        f
    }
    fn num_queues(&self) -> u16 {
        let p = self.pairs();
        2 * p + u16::from(p > 1)
    }
    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }
    fn config_read(&self, off: u64, size: u8) -> u64 {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        c[8..10].copy_from_slice(&self.pairs().to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
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
        let f = act.features;
        let domid = act.domid;
        let host_err = |what: &'static str, name: &str| {
            let name = name.to_string();
            move |source: std::io::Error| NetError::Os {
                domid,
                name,
                what,
                source,
            }
        };
        let offl = Offl {
            guest_csum: f & F_GUEST_CSUM != 0,
            guest_tso4: f & F_GUEST_TSO4 != 0,
            guest_tso6: f & F_GUEST_TSO6 != 0,
            host_csum: f & F_CSUM != 0,
            host_tso4: f & F_HOST_TSO4 != 0,
            host_tso6: f & F_HOST_TSO6 != 0,
            host_ecn: f & F_HOST_ECN != 0,
        };
        if let Some(h) = &self.host {
            h.set_offloads(offl.guest_csum, offl.guest_tso4, offl.guest_tso6)
                .map_err(host_err("setting the host side's offloads", &self.name))?;
            h.set_active_queues(1)
                .map_err(host_err("attaching the first queue", &self.name))?;
        }
        let dev_name = format!("virtio-net {}", self.name);
        let dev = (domid, dev_name.as_str());
        let map = act.ram.get();
        let evi = f & super::F_EVENT_IDX != 0;
        let pairs = usize::from(self.pairs());
        let ctrl_q = if pairs > 1 && f & F_CTRL_VQ != 0 {
            act.queues.get(2 * pairs).copied()
        } else {
            None
        };
        for p in 0..pairs {
            let (Some(rxc), Some(txc)) = (act.queues.get(2 * p), act.queues.get(2 * p + 1)) else {
                break;
            };
            if !rxc.enabled && !txc.enabled {
                continue;
            }
            let rx = make_queue(dev, 2 * p, rxc, &map, evi)?;
            let tx = make_queue(dev, 2 * p + 1, txc, &map, evi)?;
            let ctrl = match (p, ctrl_q) {
                (0, Some(c)) if c.enabled => Some((
                    make_queue(dev, 2 * pairs, &c, &map, evi)?,
                    act.kicks.get(2 * pairs).cloned(),
                )),
                _ => None,
            };
            let stop = Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| host_err("eventfd", &self.name)(e.into()))?,
            );
            let (Some(rxk), Some(txk), Some(engine)) = (
                act.kicks.get(2 * p),
                act.kicks.get(2 * p + 1),
                self.engines.get(p),
            ) else {
                break;
            };
            let stopping = Arc::new(AtomicBool::new(false));
            let mut w = PairWorker {
                name: format!("{}.{p}", self.name),
                stopping: stopping.clone(),
                engine_dead: false,
                engine: engine.clone(),
                host: self.host.clone(),
                pairs: self.pairs(),
                rx,
                tx,
                rx_idx: 2 * p,
                tx_idx: 2 * p + 1,
                ctrl,
                ctrl_idx: 2 * pairs,
                rx_kick: rxk.clone(),
                tx_kick: txk.clone(),
                stop: stop.clone(),
                ram: act.ram.clone(),
                notifier: act.notifier.clone(),
                offl,
                // One byte more than the largest frame: the tap engine drops a read that
                // fills its buffer (it may have been cut), so a full-size frame needs room.
                buf: vec![0u8; HDR + MAX_FRAME + 1],
                pending: None,
                descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
                log: self.log.clone(),
                dropped: 0,
                mac: self.mac,
            };
            let h = std::thread::Builder::new()
                .name(format!("vnet-{}.{p}", self.name))
                .spawn(move || w.run())
                .map_err(host_err("spawning the queue thread", &self.name))?;
            self.running.push((stop, stopping, h));
        }
        Ok(())
    }
    fn reset(&mut self) {
        for (stop, stopping, _) in &self.running {
            stopping.store(true, Ordering::SeqCst);
            let _ = stop.write(1);
        }
        for (_, _, h) in self.running.drain(..) {
            if h.join().is_err() {
                self.log.warn(format_args!(
                    "virtio-net {}: a queue thread panicked",
                    self.name
                ));
            }
        }
    }
    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[derive(Debug, Clone, Copy)]
struct Offl {
    guest_csum: bool,
    guest_tso4: bool,
    guest_tso6: bool,
    host_csum: bool,
    host_tso4: bool,
    host_tso6: bool,
    host_ecn: bool,
}

struct PairWorker {
    name: String,
    /// Set by reset before it wakes the thread: every loop checks it.
    stopping: Arc<AtomicBool>,
    /// The engine failed for good (its tap deleted): it is no longer polled or used.
    engine_dead: bool,
    engine: Arc<dyn NetQueueIo>,
    host: Option<Arc<dyn NetHostControl>>,
    pairs: u16,
    rx: Option<Queue>,
    tx: Option<Queue>,
    rx_idx: usize,
    tx_idx: usize,
    ctrl: Option<(Option<Queue>, Option<Arc<EventFd>>)>,
    ctrl_idx: usize,
    rx_kick: Arc<EventFd>,
    tx_kick: Arc<EventFd>,
    stop: Arc<EventFd>,
    ram: Arc<GuestRam>,
    notifier: Notifier,
    offl: Offl,
    buf: Vec<u8>,
    pending: Option<(VirtioNetHdr, usize)>,
    descs: Vec<Descriptor>,
    log: Arc<RateLog>,
    dropped: u64,
    /// The NIC's MAC: frames with another source are not sent (anti-spoofing, as netback).
    mac: [u8; 6],
}

/// Whether a send error means the engine is gone (rather than one frame refused).
fn send_error_is_fatal(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::Interrupted | K::WouldBlock | K::InvalidData | K::InvalidInput => false,
        _ => matches!(
            e.raw_os_error(),
            Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO | libc::EPIPE)
        ),
    }
}

/// The GSO part of a transmit header against what the driver negotiated: TCPv4 only with
/// HOST_TSO4, TCPv6 only with HOST_TSO6, the ECN bit only with HOST_ECN (and only on a GSO
/// frame), and any GSO frame with a segment size and a partial checksum.
fn check_gso(offl: &Offl, h: &VirtioNetHdr) -> Result<(), &'static str> {
    let ecn = h.gso_type & VirtioNetHdr::GSO_ECN != 0;
    let negotiated = match h.gso_type & !VirtioNetHdr::GSO_ECN {
        VirtioNetHdr::GSO_NONE if ecn => return Err("GSO ECN bit without a GSO type"),
        VirtioNetHdr::GSO_NONE => return Ok(()),
        VirtioNetHdr::GSO_TCPV4 => offl.host_tso4,
        VirtioNetHdr::GSO_TCPV6 => offl.host_tso6,
        _ => false,
    };
    if !negotiated {
        return Err("GSO type not negotiated");
    }
    if ecn && !offl.host_ecn {
        return Err("GSO ECN without VIRTIO_NET_F_HOST_ECN");
    }
    if h.gso_size == 0 || h.flags & VirtioNetHdr::F_NEEDS_CSUM == 0 {
        return Err("GSO without a segment size or a partial checksum");
    }
    Ok(())
}

/// Reads a chain's descriptors into `descs`; false if it never ends (loop, too long, or
/// an index past the table).
fn read_chain(
    chain: virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>,
    descs: &mut Vec<Descriptor>,
) -> bool {
    descs.clear();
    for d in chain {
        if descs.len() >= usize::from(QUEUE_SIZE) {
            return false;
        }
        descs.push(d);
    }
    descs.last().is_some_and(|d| !d.has_next())
}

impl PairWorker {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn run(&mut self) {
        loop {
            if self.stopping() {
                return;
            }
            let rx_room = !self.engine_dead && self.rx_has_room();
            let ctrl_kick = self.ctrl.as_ref().and_then(|c| c.1.clone());
            {
                // A fixed set of descriptors, no allocation per wakeup: entries not wanted
                // this time repeat the stop eventfd with no events (an eventfd never reports
                // errors, so they stay quiet).
                let idle = |fd| PollFd::new(fd, PollFlags::empty());
                let mut fds = [
                    PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.tx_kick.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.rx_kick.as_fd(), PollFlags::POLLIN),
                    match &ctrl_kick {
                        Some(k) => PollFd::new(k.as_fd(), PollFlags::POLLIN),
                        None => idle(self.stop.as_fd()),
                    },
                    // Only listen to the engine while there is somewhere to put a frame.
                    if rx_room {
                        PollFd::new(self.engine.fd(), PollFlags::POLLIN)
                    } else {
                        idle(self.stop.as_fd())
                    },
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        self.log
                            .warn(format_args!("virtio-net {}: poll: {e}", self.name));
                        return;
                    }
                }
            }
            if self.stopping() {
                return;
            }
            if let Some(k) = ctrl_kick {
                let _ = k.read();
            }
            let _ = self.tx_kick.read();
            let _ = self.rx_kick.read();
            loop {
                self.ctrl_work();
                self.tx_work();
                self.rx_work();
                if self.stopping() || !self.rearm() {
                    break;
                }
            }
        }
    }

    /// Asks for doorbells again (with EVENT_IDX: `avail_event` = where we stopped) on every
    /// queue; true if the driver made more available meanwhile, to be served before sleeping.
    fn rearm(&mut self) -> bool {
        let map = self.ram.get();
        let mem = map.memory();
        let mut more = false;
        let ctrl = self.ctrl.as_mut().and_then(|c| c.0.as_mut());
        for q in [self.tx.as_mut(), ctrl].into_iter().flatten() {
            more |= q.enable_notification(mem).unwrap_or(false);
        }
        // Receive buffers matter only when a frame waits for one or the engine is idle for
        // lack of them; a doorbell then wakes us, and new buffers are looked at in rx_work.
        if let Some(q) = self.rx.as_mut() {
            let _ = q.enable_notification(mem);
        }
        more
    }

    /// The chain, or None (logged at a rate limit if the ring is broken).
    /// The chain, or None; a broken ring (queue 0 rx, 1 tx, 2 control) is dropped, so the
    /// queue is not served (nor spun on) until the driver resets the device.
    fn checked<T>(&mut self, which: usize, c: Result<Option<T>, &'static str>) -> Option<T> {
        match c {
            Ok(c) => c,
            Err(why) => {
                self.log.warn(format_args!(
                    "virtio-net {}: queue {which}: {why}; queue stalled, device needs reset",
                    self.name
                ));
                self.notifier.needs_reset();
                match which {
                    0 => self.rx = None,
                    1 => self.tx = None,
                    _ => {
                        if let Some(c) = self.ctrl.as_mut() {
                            c.0 = None;
                        }
                    }
                }
                None
            }
        }
    }

    fn rx_has_room(&self) -> bool {
        let Some(q) = &self.rx else { return false };
        if self.pending.is_some() {
            return false;
        }
        let map = self.ram.get();
        q.avail_idx(map.memory(), Ordering::Acquire)
            .is_ok_and(|i| i != Wrapping(q.next_avail()))
    }

    fn used(&mut self, map: &RamMap, which: usize, head: u16, len: u32) {
        let q = match which {
            0 => self.rx.as_mut(),
            1 => self.tx.as_mut(),
            _ => self.ctrl.as_mut().and_then(|c| c.0.as_mut()),
        };
        if let Some(q) = q {
            if let Err(e) = super::put_used(q, map.memory(), head, len) {
                self.log
                    .warn(format_args!("virtio-net {}: add_used: {e}", self.name));
            }
        }
    }

    fn notify(&mut self, map: &RamMap, which: usize) {
        let (q, idx) = match which {
            0 => (self.rx.as_mut(), self.rx_idx),
            1 => (self.tx.as_mut(), self.tx_idx),
            _ => (self.ctrl.as_mut().and_then(|c| c.0.as_mut()), self.ctrl_idx),
        };
        if let Some(q) = q {
            if super::wants_interrupt(q, map.memory()) {
                self.notifier.queue(idx);
            }
        }
    }

    fn drop_frame(&mut self, why: &'static str) {
        self.dropped += 1;
        self.log.warn(format_args!(
            "virtio-net {}: frame dropped: {why} ({} so far)",
            self.name, self.dropped
        ));
    }

    /// A frame the engine refused: dropped; the error is formatted only if logged.
    fn drop_frame_io(&mut self, why: &'static str, e: &std::io::Error) {
        self.dropped += 1;
        self.log.warn(format_args!(
            "virtio-net {}: frame dropped: {why}: {e} ({} so far)",
            self.name, self.dropped
        ));
    }

    /// The engine failed for good (a tap deleted under the NIC: EBADFD): stop polling and
    /// using it, say so once, and put the device in DEVICE_NEEDS_RESET. Transmit chains are
    /// still returned (dropped), so the driver is never left waiting.
    fn engine_failed(&mut self, op: &'static str, e: &std::io::Error) {
        if std::mem::replace(&mut self.engine_dead, true) {
            return;
        }
        tracing::warn!(
            "virtio-net {}: engine {op} failed: {e}; no longer using it, device needs reset",
            self.name
        );
        self.pending = None;
        self.notifier.needs_reset();
    }

    fn tx_work(&mut self) {
        let map = self.ram.get();
        let mut any = false;
        while !self.stopping() {
            let chain = match self.tx.as_mut() {
                Some(q) => super::pop_chain(q, map.memory()),
                None => return,
            };
            let Some(chain) = self.checked(1, chain) else {
                break;
            };
            let head = chain.head_index();
            any = true;
            let ok = read_chain(chain, &mut self.descs);
            let gathered = if ok {
                self.gather_tx(&map)
            } else {
                Err("chain never ends")
            };
            match gathered {
                Ok(len) => {
                    let hdr = match <&[u8; HDR]>::try_from(&self.buf[..HDR]) {
                        Ok(h) => VirtioNetHdr::from_bytes(h),
                        Err(_) => VirtioNetHdr::default(),
                    };
                    // (A frame too short to carry a source MAC has none of ours either.)
                    let spoofed =
                        len < HDR + 12 || self.buf.get(HDR + 6..HDR + 12) != Some(&self.mac[..]);
                    match self.check_tx_hdr(&hdr, len - HDR) {
                        Ok(()) if self.engine_dead => self.drop_frame("engine failed"),
                        Ok(()) if spoofed => {
                            self.drop_frame("source MAC is not the NIC's (anti-spoofing)")
                        }
                        Ok(()) => {
                            let frame = [IoSlice::new(&self.buf[HDR..len])];
                            if let Err(e) = self.engine.send(&hdr, &frame) {
                                if send_error_is_fatal(&e) {
                                    self.engine_failed("send", &e);
                                } else {
                                    self.drop_frame_io("engine send", &e);
                                }
                            }
                        }
                        Err(why) => self.drop_frame(why),
                    }
                }
                Err(why) => self.drop_frame(why),
            }
            self.used(&map, 1, head, 0);
        }
        if any {
            self.notify(&map, 1);
        }
    }

    /// Copies the chain in `self.descs` into `self.buf`; returns the length.
    fn gather_tx(&mut self, map: &RamMap) -> Result<usize, &'static str> {
        let mut len = 0usize;
        for d in &self.descs {
            if d.is_write_only() {
                return Err("device-writable descriptor in a transmit chain");
            }
            let n = d.len() as usize;
            let end = len.checked_add(n).filter(|e| *e <= HDR + MAX_FRAME);
            let Some(end) = end else {
                return Err("frame longer than 64 KiB + 14 plus its header");
            };
            if n > 0 && !map.read(d.addr().0, &mut self.buf[len..end]) {
                return Err("transmit buffer outside guest RAM");
            }
            len = end;
        }
        if len < HDR + 14 {
            return Err("shorter than a header and an Ethernet header");
        }
        Ok(len)
    }

    fn check_tx_hdr(&self, h: &VirtioNetHdr, frame_len: usize) -> Result<(), &'static str> {
        if h.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 {
            if !self.offl.host_csum {
                return Err("partial checksum without VIRTIO_NET_F_CSUM");
            }
            let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
            if end > frame_len {
                return Err("checksum field outside the frame");
            }
        }
        check_gso(&self.offl, h)
    }

    fn rx_work(&mut self) {
        let map = self.ram.get();
        let mut any = false;
        while !self.stopping() && !self.engine_dead {
            if self.pending.is_none() {
                if !self.rx_has_room() {
                    break;
                }
                match self.engine.recv(&mut self.buf[HDR..]) {
                    Ok(Some((h, n))) => self.pending = Some((h, n)),
                    Ok(None) => break,
                    // One bad frame (cut short, shorter than its header): dropped.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        self.drop_frame_io("engine recv", &e);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // Anything else does not go away by reading again (EBADFD once the
                    // tap is deleted): the engine is done for.
                    Err(e) => {
                        self.engine_failed("recv", &e);
                        break;
                    }
                }
            }
            let Some((mut h, n)) = self.pending else {
                break;
            };
            // Offloads the driver did not accept.
            let gso = h.gso_type & !VirtioNetHdr::GSO_ECN;
            let gso_ok = match gso {
                VirtioNetHdr::GSO_NONE => true,
                VirtioNetHdr::GSO_TCPV4 => self.offl.guest_tso4,
                VirtioNetHdr::GSO_TCPV6 => self.offl.guest_tso6,
                _ => false,
            };
            if !gso_ok {
                self.pending = None;
                self.drop_frame("super-frame for a driver without GUEST_TSO");
                continue;
            }
            if h.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 && !self.offl.guest_csum {
                let frame = &mut self.buf[HDR..HDR + n];
                if !backends::net::offload::complete_checksum(frame, h.csum_start, h.csum_offset) {
                    self.pending = None;
                    self.drop_frame("partial checksum outside the frame");
                    continue;
                }
                h.flags = VirtioNetHdr::F_DATA_VALID;
            }
            h.num_buffers = 1;
            let chain = match self.rx.as_mut() {
                Some(q) => super::pop_chain(q, map.memory()),
                None => break,
            };
            let Some(chain) = self.checked(0, chain) else {
                break;
            };
            let head = chain.head_index();
            self.pending = None;
            any = true;
            self.buf[..HDR].copy_from_slice(&h.to_bytes());
            let total = HDR + n;
            let written = if read_chain(chain, &mut self.descs) {
                self.scatter_rx(&map, total)
            } else {
                Err("chain never ends")
            };
            match written {
                Ok(()) => self.used(&map, 0, head, total as u32),
                Err(why) => {
                    self.drop_frame(why);
                    self.used(&map, 0, head, 0);
                }
            }
        }
        if any {
            self.notify(&map, 0);
        }
    }

    fn scatter_rx(&self, map: &RamMap, total: usize) -> Result<(), &'static str> {
        let mut off = 0usize;
        for d in &self.descs {
            if off == total {
                break;
            }
            if !d.is_write_only() {
                return Err("device-readable descriptor in a receive chain");
            }
            let n = (d.len() as usize).min(total - off);
            if !map.write(d.addr().0, &self.buf[off..off + n]) {
                return Err("receive buffer outside guest RAM");
            }
            off += n;
        }
        if off < total {
            return Err("receive buffers smaller than the frame");
        }
        Ok(())
    }

    fn ctrl_work(&mut self) {
        let Some((Some(_), _)) = &self.ctrl else {
            return;
        };
        let map = self.ram.get();
        let mut any = false;
        while !self.stopping() {
            let chain = match self.ctrl.as_mut().and_then(|c| c.0.as_mut()) {
                Some(q) => super::pop_chain(q, map.memory()),
                None => return,
            };
            let Some(chain) = self.checked(2, chain) else {
                break;
            };
            let head = chain.head_index();
            any = true;
            if !read_chain(chain, &mut self.descs) {
                self.used(&map, 2, head, 0);
                continue;
            }
            // Command: class, cmd, data (readable), then the ack byte (writable, last).
            let Some(ack) = self
                .descs
                .last()
                .copied()
                .filter(|d| d.is_write_only() && d.len() >= 1)
            else {
                self.used(&map, 2, head, 0);
                continue;
            };
            let mut cmd = [0u8; 4];
            let mut got = 0usize;
            for d in self.descs.iter().filter(|d| !d.is_write_only()) {
                let n = (d.len() as usize).min(cmd.len() - got);
                if n > 0 && !map.read(d.addr().0, &mut cmd[got..got + n]) {
                    break;
                }
                got += n;
            }
            let status: u8 = match (got, cmd[0], cmd[1]) {
                // VIRTIO_NET_CTRL_RX: promiscuous / all-multicast (the tap passes all).
                (3.., 0, 0 | 1) => 0,
                // VIRTIO_NET_CTRL_MAC: table set, address set.
                (2.., 1, 0 | 1) => 0,
                // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
                (4, 4, 0) => {
                    let n = u16::from_le_bytes([cmd[2], cmd[3]]);
                    if n == 0 || n > self.pairs {
                        1
                    } else {
                        match &self.host {
                            Some(h) => u8::from(h.set_active_queues(n).is_err()),
                            None => 0,
                        }
                    }
                }
                _ => 1,
            };
            map.write(ack.addr().0, &[status]);
            self.used(&map, 2, head, 1);
        }
        if any {
            self.notify(&map, 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offl(tso4: bool, tso6: bool, ecn: bool) -> Offl {
        Offl {
            guest_csum: true,
            guest_tso4: true,
            guest_tso6: true,
            host_csum: true,
            host_tso4: tso4,
            host_tso6: tso6,
            host_ecn: ecn,
        }
    }

    fn gso(t: u8) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: t,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn gso_types_follow_host_tso4_tso6_and_ecn_separately() {
        use VirtioNetHdr as H;
        let v4 = offl(true, false, false);
        assert!(check_gso(&v4, &gso(H::GSO_TCPV4)).is_ok());
        assert!(check_gso(&v4, &gso(H::GSO_TCPV6)).is_err());
        let v6 = offl(false, true, false);
        assert!(check_gso(&v6, &gso(H::GSO_TCPV6)).is_ok());
        assert!(check_gso(&v6, &gso(H::GSO_TCPV4)).is_err());
        let both = offl(true, true, false);
        assert!(check_gso(&both, &gso(H::GSO_TCPV4 | H::GSO_ECN)).is_err());
        assert!(check_gso(&both, &gso(H::GSO_ECN)).is_err());
        assert!(check_gso(&both, &gso(H::GSO_UDP)).is_err());
        let ecn = offl(true, true, true);
        assert!(check_gso(&ecn, &gso(H::GSO_TCPV6 | H::GSO_ECN)).is_ok());
        assert!(check_gso(&ecn, &gso(H::GSO_NONE)).is_ok());
        let mut no_size = gso(H::GSO_TCPV4);
        no_size.gso_size = 0;
        assert!(check_gso(&both, &no_size).is_err());
    }
}

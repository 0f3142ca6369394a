//! virtio-pci, modern (virtio 1.x) transport: the common, notify, ISR and device-specific
//! configuration structures in BAR0, announced by vendor capabilities, with MSI-X (table and
//! PBA also in BAR0), MSI (one vector for everything), or INTx with the ISR.
//!
//! BAR0 layout (32 KiB, 32-bit memory): common config at 0x0000, ISR at 0x1000, device config
//! at 0x2000, notify at 0x3000 (4 bytes per queue), MSI-X table at 0x4000, PBA at 0x5000.
//!
//! The transport runs on the ioreq thread; the device's queue work runs on its own thread,
//! started at DRIVER_OK. A doorbell (a write to the notify area) only signals that thread's
//! eventfd. Queue parameters are checked before the device starts (XSA-211): size zero, not a
//! power of two, or above the maximum is refused at the write; rings misaligned or outside
//! guest RAM put the device in DEVICE_NEEDS_RESET instead of starting it.

pub mod blk;
pub mod net;
pub mod poll;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::irq::IrqSink;
use crate::mem::GuestRam;
use crate::pci::{
    add_msi_capability, msi_message, ones, BarDef, BarKind, MsiMessage, Msix, PciConfig, PciDevice,
    PciId, CAP_ID_VNDR, CMD_INTX_DISABLE,
};
use crate::RateLog;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// No MSI-X vector.
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits.
pub const S_ACKNOWLEDGE: u8 = 1;
/// DRIVER.
pub const S_DRIVER: u8 = 2;
/// DRIVER_OK.
pub const S_DRIVER_OK: u8 = 4;
/// FEATURES_OK.
pub const S_FEATURES_OK: u8 = 8;
/// DEVICE_NEEDS_RESET.
pub const S_NEEDS_RESET: u8 = 0x40;
/// FAILED.
pub const S_FAILED: u8 = 0x80;

/// BAR0 regions.
pub const COMMON_OFF: u64 = 0x0000;
/// ISR.
pub const ISR_OFF: u64 = 0x1000;
/// Device config.
pub const DEVICE_OFF: u64 = 0x2000;
/// Notify.
pub const NOTIFY_OFF: u64 = 0x3000;
/// Notify multiplier.
pub const NOTIFY_MULT: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFF: u64 = 0x4000;
/// MSI-X PBA.
pub const MSIX_PBA_OFF: u64 = 0x5000;
/// BAR0 size.
pub const BAR0_SIZE: u64 = 0x8000;

/// Pops the next available chain. Everything virtio-queue would log about (with its own,
/// unthrottled `error!`) is checked here first and returned as an error for the caller's
/// rate-limited log: a driver ring at GPA 0, an unreadable ring index, an index more than
/// the queue size ahead, an unreadable ring entry, and a head outside the queue. Any of
/// these means the driver broke the ring: the caller stops serving the queue and sets
/// DEVICE_NEEDS_RESET.
pub(crate) fn pop_chain<'a>(
    q: &mut virtio_queue::Queue,
    mem: &'a vm_memory::GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'a vm_memory::GuestMemoryMmap>>, &'static str> {
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    // virtio-queue takes a driver ring at 0 for "not ready" and logs it on every pop. (The
    // transport refuses any ring at 0 at DRIVER_OK; this guards the other callers.)
    if q.avail_ring() == 0 {
        return Err("driver ring at guest-physical 0");
    }
    let idx = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| "driver ring unreadable")?;
    let ahead = (idx - std::num::Wrapping(q.next_avail())).0;
    if ahead == 0 {
        return Ok(None);
    }
    if ahead > q.size() {
        return Err("driver ring index is more than the queue size ahead");
    }
    let slot = u64::from(q.next_avail() % q.size().max(1));
    let entry = vm_memory::GuestAddress(q.avail_ring() + 4 + 2 * slot);
    let head = mem
        .load::<u16>(entry, Ordering::Acquire)
        .map(u16::from_le)
        .map_err(|_| "driver ring entry unreadable")?;
    if head >= q.size() {
        return Err("chain head outside the queue");
    }
    Ok(q.pop_descriptor_chain(mem))
}

/// Builds a queue the driver enabled, checked (size, alignment, rings inside guest RAM).
pub(crate) fn make_queue(
    dev: (xen::DomId, &str),
    i: usize,
    qc: &QueueConfig,
    map: &crate::mem::RamMap,
    event_idx: bool,
) -> Result<Option<virtio_queue::Queue>, VirtioError> {
    use virtio_queue::QueueT;
    if !qc.enabled {
        return Ok(None);
    }
    let (domid, name) = dev;
    let param = |what: &'static str| {
        move |source| VirtioError::QueueParam {
            domid,
            name: name.to_string(),
            queue: i,
            what,
            source,
        }
    };
    let mut q = virtio_queue::Queue::new(256).map_err(param("maximum size"))?;
    q.try_set_size(qc.size).map_err(param("size"))?;
    q.try_set_desc_table_address(vm_memory::GuestAddress(qc.desc))
        .map_err(param("descriptor table"))?;
    q.try_set_avail_ring_address(vm_memory::GuestAddress(qc.avail))
        .map_err(param("driver ring"))?;
    q.try_set_used_ring_address(vm_memory::GuestAddress(qc.used))
        .map_err(param("device ring"))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(map.memory()) {
        return Err(VirtioError::QueueRings {
            domid,
            name: name.to_string(),
            queue: i,
        });
    }
    Ok(Some(q))
}

/// Whether the driver wants an interrupt for what was just put on the device ring: with
/// EVENT_IDX, its `used_event`; without, the VRING_AVAIL_F_NO_INTERRUPT flag (which
/// virtio-queue does not look at).
pub(crate) fn wants_interrupt(
    q: &mut virtio_queue::Queue,
    mem: &vm_memory::GuestMemoryMmap,
) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    let by_event = q.needs_notification(mem).unwrap_or(true);
    if q.event_idx_enabled() {
        return by_event;
    }
    let flags: u16 = mem
        .load(vm_memory::GuestAddress(q.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .unwrap_or(0);
    flags & 1 == 0
}

/// Tells the driver not to ring for the chains it adds next. Without EVENT_IDX that is
/// VRING_USED_F_NO_NOTIFY; with it, `avail_event` is set one behind the index this device
/// has reached, which no publish crosses before the ring has wrapped (virtio-queue's
/// `disable_notification` leaves `avail_event` where the last re-arm put it, at that index,
/// so the driver's next publish rings). `enable_notification` undoes either.
pub(crate) fn suppress_doorbells(
    q: &mut virtio_queue::Queue,
    mem: &vm_memory::GuestMemoryMmap,
) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    if !q.event_idx_enabled() {
        return q.disable_notification(mem).is_ok();
    }
    // struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[size] (8 bytes
    // each); le16 avail_event; }
    let at = q.used_ring() + 4 + 8 * u64::from(q.size());
    let v = q.next_avail().wrapping_sub(1).to_le();
    mem.store(v, vm_memory::GuestAddress(at), Ordering::Release)
        .is_ok()
}

/// Puts `head` on the device ring, refusing a head outside the queue before virtio-queue
/// would log it.
pub(crate) fn put_used(
    q: &mut virtio_queue::Queue,
    mem: &vm_memory::GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), &'static str> {
    use virtio_queue::QueueT;
    if head >= q.size() {
        return Err("chain head outside the queue");
    }
    q.add_used(mem, head, len)
        .map_err(|_| "device ring unwritable")
}

/// What a queue thread gets for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Size (power of two, at most the maximum).
    pub size: u16,
    /// The driver enabled it.
    pub enabled: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Driver (available) ring.
    pub avail: u64,
    /// Device (used) ring.
    pub used: u64,
}

/// Raises a device's interrupts from any thread: MSI-X per queue, or INTx with the ISR.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<NotifierInner>,
}

struct NotifierInner {
    irq: IrqSink,
    bus: u8,
    dev: u8,
    msix: Mutex<Msix>,
    vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    intx_disabled: AtomicBool,
    intx_level: Mutex<bool>,
    /// The MSI message while MSI (not MSI-X) is enabled.
    msi: Mutex<Option<MsiMessage>>,
    /// DEVICE_NEEDS_RESET: set by the transport or a queue thread, cleared only by a reset.
    needs_reset: AtomicBool,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("dev", &self.inner.dev)
            .finish()
    }
}

impl Notifier {
    fn new(irq: IrqSink, bus: u8, dev: u8, queues: usize, vectors: usize) -> Notifier {
        Notifier {
            inner: Arc::new(NotifierInner {
                irq,
                bus,
                dev,
                msix: Mutex::new(Msix::new(vectors)),
                vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
                config_vector: AtomicU16::new(NO_VECTOR),
                isr: AtomicU8::new(0),
                intx_disabled: AtomicBool::new(false),
                intx_level: Mutex::new(false),
                msi: Mutex::new(None),
                needs_reset: AtomicBool::new(false),
            }),
        }
    }

    fn msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.inner.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, vector: u16, isr_bit: u8) {
        let msg = {
            let mut m = self.msix();
            if m.enabled {
                if vector == NO_VECTOR {
                    return;
                }
                match m.raise(vector) {
                    Some(msg) => Some(msg),
                    None => return,
                }
            } else {
                *self.inner.msi.lock().unwrap_or_else(|e| e.into_inner())
            }
        };
        match msg {
            Some(msg) => self.inner.irq.msi(msg),
            None => {
                self.inner.isr.fetch_or(isr_bit, Ordering::SeqCst);
                self.set_intx(true);
            }
        }
    }

    fn set_intx(&self, level: bool) {
        let level = level && !self.inner.intx_disabled.load(Ordering::SeqCst);
        let mut cur = self
            .inner
            .intx_level
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *cur != level {
            *cur = level;
            self.inner
                .irq
                .intx(self.inner.bus, self.inner.dev, 0, level);
        }
    }

    /// Signals that queue `q` has used buffers.
    pub fn queue(&self, q: usize) {
        let v = self
            .inner
            .vectors
            .get(q)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.raise(v, 1);
    }

    /// Signals a configuration change.
    pub fn config(&self) {
        self.raise(self.inner.config_vector.load(Ordering::SeqCst), 2);
    }

    /// The device is broken until the driver resets it (a ring the driver broke, a
    /// failed engine): sets DEVICE_NEEDS_RESET and signals a configuration change, once.
    pub fn needs_reset(&self) {
        if !self.inner.needs_reset.swap(true, Ordering::SeqCst) {
            self.config();
        }
    }

    /// Whether DEVICE_NEEDS_RESET is set.
    pub fn is_broken(&self) -> bool {
        self.inner.needs_reset.load(Ordering::SeqCst)
    }

    fn send_pending(&self) {
        let mut out: Vec<MsiMessage> = Vec::new();
        self.msix().unmasked_pending(&mut out);
        for m in out {
            self.inner.irq.msi(m);
        }
    }
}

/// What a device starts its queue work with at DRIVER_OK.
pub struct Activation {
    /// The guest.
    pub domid: xen::DomId,
    /// Negotiated features.
    pub features: u64,
    /// Queue parameters, by index.
    pub queues: Vec<QueueConfig>,
    /// One doorbell per queue.
    pub kicks: Vec<Arc<EventFd>>,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// Interrupts.
    pub notifier: Notifier,
}

/// A virtio device type behind the transport.
pub trait VirtioBackend: Send {
    /// VIRTIO_ID_* (2 = block, 1 = network).
    fn device_type(&self) -> u16;
    /// PCI class code.
    fn class(&self) -> u32;
    /// Offered features (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Queues.
    fn num_queues(&self) -> u16;
    /// Largest queue size.
    fn max_queue_size(&self) -> u16;
    /// Device-specific configuration read (`off` inside the structure).
    fn config_read(&self, off: u64, size: u8) -> u64;
    /// Device-specific configuration write.
    fn config_write(&mut self, _off: u64, _size: u8, _value: u64) {}
    /// Starts the queue work. An error puts the device into DEVICE_NEEDS_RESET.
    fn activate(&mut self, act: Activation) -> Result<(), VirtioError>;
    /// Stops the queue work (device reset): afterwards nothing touches the rings.
    fn reset(&mut self);
    /// One line for logs ("virtio-blk xvda raw /img 64 MiB").
    fn describe(&self) -> String;
}

/// A virtio-pci function.
pub struct VirtioPci {
    cfg: PciConfig,
    msi_cap: usize,
    msix_cap: usize,
    backend: Box<dyn VirtioBackend>,
    notifier: Notifier,
    ram: Arc<GuestRam>,
    kicks: Vec<Arc<EventFd>>,
    queues: Vec<QueueConfig>,
    queue_select: u16,
    dfselect: u32,
    gfselect: u32,
    driver_features: u64,
    status: u8,
    generation: u8,
    active: bool,
    name: String,
    log: RateLog,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("name", &self.name)
            .field("status", &self.status)
            .finish()
    }
}

/// Errors of the virtio transport and its devices, each naming the domain and the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Something could not be set up.
    #[error("dom{domid}: {name}: {why}")]
    Setup {
        /// Domain.
        domid: xen::DomId,
        /// Device.
        name: String,
        /// Why.
        why: String,
    },
    /// virtio-queue refused a queue parameter.
    #[error("dom{domid}: {name}: queue {queue}: {what}: {source}")]
    QueueParam {
        /// Domain.
        domid: xen::DomId,
        /// Device.
        name: String,
        /// Queue index.
        queue: usize,
        /// Which parameter.
        what: &'static str,
        /// virtio-queue's error.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue's rings are not inside guest RAM.
    #[error("dom{domid}: {name}: queue {queue}: rings outside guest RAM")]
    QueueRings {
        /// Domain.
        domid: xen::DomId,
        /// Device.
        name: String,
        /// Queue index.
        queue: usize,
    },
    /// virtio-blk.
    #[error(transparent)]
    Blk(#[from] blk::BlkError),
    /// virtio-net.
    #[error(transparent)]
    Net(#[from] net::NetError),
}

fn vndr_cap(cfg_type: u8, offset: u32, length: u32, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// A function at `bus:dev` for `backend`.
    pub fn new(
        name: String,
        backend: Box<dyn VirtioBackend>,
        irq: IrqSink,
        bus: u8,
        dev: u8,
        ram: Arc<GuestRam>,
    ) -> Result<VirtioPci, VirtioError> {
        let domid = irq.domid();
        let err = |why: String| VirtioError::Setup {
            domid,
            name: name.clone(),
            why,
        };
        let nq = usize::from(backend.num_queues());
        if nq == 0 || nq > 64 {
            return Err(err(format!("{nq} queues (1..=64 supported)")));
        }
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1040 + backend.device_type(),
            revision: 1,
            class: backend.class(),
            subsys_vendor: 0x1af4,
            subsys: 0x40,
            header_type: 0,
            int_pin: 1,
        });
        cfg.set_bar(
            0,
            BarDef {
                kind: BarKind::Mem32,
                size: BAR0_SIZE,
                prefetchable: false,
            },
        );
        let none = |n: usize| vec![0u8; n];
        let caps = [
            vndr_cap(1, COMMON_OFF as u32, 0x40, None),
            vndr_cap(3, ISR_OFF as u32, 1, None),
            vndr_cap(4, DEVICE_OFF as u32, 0x1000, None),
            vndr_cap(
                2,
                NOTIFY_OFF as u32,
                NOTIFY_MULT * nq as u32,
                Some(NOTIFY_MULT),
            ),
        ];
        for c in &caps {
            cfg.add_capability(CAP_ID_VNDR, c, &none(c.len()))
                .ok_or_else(|| err("no room for capabilities".into()))?;
        }
        let vectors = nq + 1;
        let notifier = Notifier::new(irq, bus, dev, nq, vectors);
        let msi_cap = add_msi_capability(&mut cfg).ok_or_else(|| err("no room for MSI".into()))?;
        let msix_cap = notifier
            .msix()
            .add_capability(&mut cfg, 0, MSIX_TABLE_OFF as u32, MSIX_PBA_OFF as u32)
            .ok_or_else(|| err("no room for MSI-X".into()))?;
        let mut kicks = Vec::with_capacity(nq);
        for _ in 0..nq {
            let e =
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| err(format!("eventfd: {e}")))?;
            kicks.push(Arc::new(e));
        }
        let q0 = QueueConfig {
            size: backend.max_queue_size(),
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        };
        tracing::info!(
            domid,
            "virtio-pci {:02x}:{:02x}.0 {}",
            bus,
            dev,
            backend.describe()
        );
        Ok(VirtioPci {
            cfg,
            msi_cap,
            msix_cap,
            queues: vec![q0; nq],
            backend,
            notifier,
            ram,
            kicks,
            queue_select: 0,
            dfselect: 0,
            gfselect: 0,
            driver_features: 0,
            status: 0,
            generation: 0,
            active: false,
            name,
            log: RateLog::new(),
        })
    }

    fn device_features(&self) -> u64 {
        self.backend.features() | F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX
    }

    fn reset(&mut self) {
        // Also after a failed activation, which may have started some queue threads.
        self.backend.reset();
        self.active = false;
        let max = self.backend.max_queue_size();
        for q in &mut self.queues {
            *q = QueueConfig {
                size: max,
                enabled: false,
                desc: 0,
                avail: 0,
                used: 0,
            };
        }
        for v in &self.notifier.inner.vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.notifier
            .inner
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
        self.notifier.inner.isr.store(0, Ordering::SeqCst);
        self.notifier.set_intx(false);
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        // Only now: the queue threads are gone, so none can set it again.
        self.notifier
            .inner
            .needs_reset
            .store(false, Ordering::SeqCst);
    }

    /// The status register as the driver reads it.
    fn status(&self) -> u8 {
        self.status
            | if self.notifier.is_broken() {
                S_NEEDS_RESET
            } else {
                0
            }
    }

    fn check_queue(&self, q: &QueueConfig) -> Result<(), String> {
        let n = u64::from(q.size);
        let map = self.ram.get();
        // A ring at 0 is what an unset address reads as (virtio-queue and QEMU treat it as
        // "not ready"), never where a driver puts one.
        // virtio-queue's own check (`is_valid`) also wants the address just past a ring to be
        // guest memory, and logs an error of its own (through `log`, no rate limit) for a ring
        // that ends exactly where RAM ends: refuse that here first, with our limited log.
        let inside = |gpa: u64, len: u64, align: u64| {
            gpa != 0 && gpa.is_multiple_of(align) && gpa.checked_add(len).is_some() && {
                use vm_memory::GuestMemory;
                let mut probe = [0u8; 1];
                map.read(gpa, &mut probe)
                    && map.read(gpa + len - 1, &mut probe)
                    && map.seg(gpa, len as usize, true).is_some()
                    && map
                        .memory()
                        .address_in_range(vm_memory::GuestAddress(gpa + len))
            }
        };
        if !inside(q.desc, 16 * n, 16) {
            return Err(format!(
                "descriptor table {:#x} misaligned or outside RAM",
                q.desc
            ));
        }
        if !inside(q.avail, 6 + 2 * n, 2) {
            return Err(format!(
                "driver ring {:#x} misaligned or outside RAM",
                q.avail
            ));
        }
        if !inside(q.used, 6 + 8 * n, 4) {
            return Err(format!(
                "device ring {:#x} misaligned or outside RAM",
                q.used
            ));
        }
        Ok(())
    }

    fn driver_ok(&mut self) {
        if self.active {
            return;
        }
        // A device that asked for a reset (DEVICE_NEEDS_RESET) stays down until the driver
        // writes 0: a driver repeating DRIVER_OK must not start anything in between.
        if self.notifier.is_broken() {
            self.log.warn(format_args!(
                "{}: DRIVER_OK while the device needs a reset; ignored",
                self.name
            ));
            return;
        }
        if self.status & S_FEATURES_OK == 0 {
            self.log
                .warn(format_args!("{}: DRIVER_OK without FEATURES_OK", self.name));
            self.notifier.needs_reset();
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.enabled {
                if let Err(e) = self.check_queue(q) {
                    self.log.warn(format_args!(
                        "{}: queue {i}: {e}; device needs reset",
                        self.name
                    ));
                    self.notifier.needs_reset();
                    return;
                }
            }
        }
        let act = Activation {
            domid: self.notifier.inner.irq.domid(),
            features: self.driver_features,
            queues: self.queues.clone(),
            kicks: self.kicks.clone(),
            ram: self.ram.clone(),
            notifier: self.notifier.clone(),
        };
        match self.backend.activate(act) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.log
                    .warn(format_args!("{}: activation failed: {e}", self.name));
                // Undo a partial activation (queue threads already started for the first
                // queues): nothing may keep running on a device that is not active.
                self.backend.reset();
                self.notifier.needs_reset();
            }
        }
    }

    fn common_read(&mut self, off: u64, size: u8) -> u64 {
        let qs = usize::from(self.queue_select);
        let q = self.queues.get(qs).copied();
        let v: u64 = match (off, size) {
            (0x00, 4) => u64::from(self.dfselect),
            (0x04, 4) => match self.dfselect {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.gfselect),
            (0x0c, 4) => match self.gfselect {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.notifier.inner.config_vector.load(Ordering::SeqCst)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status()),
            (0x15, 1) => u64::from(self.generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => self
                .notifier
                .inner
                .vectors
                .get(qs)
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => q.map_or(0, |_| qs as u64),
            (0x20, 4) | (0x20, 8) => {
                q.map_or(0, |q| q.desc) & if size == 4 { 0xffff_ffff } else { u64::MAX }
            }
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) | (0x28, 8) => {
                q.map_or(0, |q| q.avail) & if size == 4 { 0xffff_ffff } else { u64::MAX }
            }
            (0x2c, 4) => q.map_or(0, |q| q.avail >> 32),
            (0x30, 4) | (0x30, 8) => {
                q.map_or(0, |q| q.used) & if size == 4 { 0xffff_ffff } else { u64::MAX }
            }
            (0x34, 4) => q.map_or(0, |q| q.used >> 32),
            _ => {
                self.log.warn(format_args!(
                    "{}: common config read at {off:#x} size {size} refused",
                    self.name
                ));
                ones(size)
            }
        };
        v
    }

    fn set_addr(field: &mut u64, off: u64, size: u8, value: u64) {
        match (off % 8, size) {
            (0, 8) => *field = value,
            (0, 4) => *field = (*field & !0xffff_ffff) | (value & 0xffff_ffff),
            (4, 4) => *field = (*field & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    fn common_write(&mut self, off: u64, size: u8, value: u64) {
        let qs = usize::from(self.queue_select);
        let max = self.backend.max_queue_size();
        // Queue parameters cannot change while the device runs.
        let locked = self.active;
        match (off, size) {
            (0x00, 4) => self.dfselect = value as u32,
            (0x08, 4) => self.gfselect = value as u32,
            (0x0c, 4) if self.status & S_FEATURES_OK == 0 => match self.gfselect {
                0 => {
                    self.driver_features =
                        (self.driver_features & !0xffff_ffff) | (value & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
                _ => {}
            },
            (0x10, 2) => {
                let v = value as u16;
                let v = if usize::from(v) <= self.queues.len() {
                    v
                } else {
                    NO_VECTOR
                };
                self.notifier.inner.config_vector.store(v, Ordering::SeqCst);
            }
            (0x14, 1) => {
                // NEEDS_RESET is the device's: what the driver writes there is ignored.
                let v = value as u8 & !S_NEEDS_RESET;
                if value as u8 == 0 {
                    self.reset();
                    return;
                }
                // Status bits are only ever cleared by a full reset (as QEMU does): a write
                // that would clear DRIVER_OK or FEATURES_OK would leave the queue threads
                // running behind a driver that thinks they stopped.
                if self.status & !v != 0 {
                    self.log.warn(format_args!(
                        "{}: status write {v:#x} would clear bits of {:#x}; ignored (write 0 to reset)",
                        self.name, self.status
                    ));
                    return;
                }
                if v & S_FEATURES_OK != 0 && self.status & S_FEATURES_OK == 0 {
                    let bad = self.driver_features & !self.device_features();
                    if bad != 0 || self.driver_features & F_VERSION_1 == 0 {
                        self.log.warn(format_args!(
                            "{}: driver features {:#x} refused",
                            self.name, self.driver_features
                        ));
                        self.status = v & !S_FEATURES_OK;
                        return;
                    }
                }
                self.status = v;
                if v & S_DRIVER_OK != 0 {
                    self.driver_ok();
                }
            }
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if !locked => {
                let v = value as u16;
                if v == 0 || !v.is_power_of_two() || v > max {
                    self.log.warn(format_args!(
                        "{}: queue {qs} size {v} refused (power of two, 1..={max})",
                        self.name
                    ));
                } else if let Some(q) = self.queues.get_mut(qs) {
                    q.size = v;
                }
            }
            (0x1a, 2) => {
                let v = value as u16;
                let v = if usize::from(v) <= self.queues.len() {
                    v
                } else {
                    NO_VECTOR
                };
                if let Some(slot) = self.notifier.inner.vectors.get(qs) {
                    slot.store(v, Ordering::SeqCst);
                }
            }
            (0x1c, 2) if !locked => {
                if let Some(q) = self.queues.get_mut(qs) {
                    q.enabled = value & 1 == 1;
                }
            }
            (0x20..=0x37, 4) | (0x20, 8) | (0x28, 8) | (0x30, 8) if !locked => {
                if let Some(q) = self.queues.get_mut(qs) {
                    let field = match off {
                        0x20..=0x27 => &mut q.desc,
                        0x28..=0x2f => &mut q.avail,
                        _ => &mut q.used,
                    };
                    Self::set_addr(field, off, size, value);
                }
            }
            _ => self.log.warn(format_args!(
                "{}: common config write at {off:#x} size {size} ignored",
                self.name
            )),
        }
    }
}

impl PciDevice for VirtioPci {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn describe(&self) -> String {
        self.backend.describe()
    }
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn config_written(&mut self, off: usize, size: usize) {
        let mc = self.msi_cap;
        if off < mc + 14 && off + size > mc + 2 {
            *self
                .notifier
                .inner
                .msi
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = msi_message(&self.cfg, mc);
        }
        let cap = self.msix_cap;
        if off < cap + 4 && off + size > cap + 2 {
            self.notifier.msix().sync_from_config(&self.cfg, cap);
            self.notifier.send_pending();
        }
        let disabled = self.cfg.command() & CMD_INTX_DISABLE != 0;
        self.notifier
            .inner
            .intx_disabled
            .store(disabled, Ordering::SeqCst);
        if disabled {
            self.notifier.set_intx(false);
        }
    }
    fn bar_read(&mut self, bar: usize, off: u64, size: u8) -> u64 {
        if bar != 0 {
            return ones(size);
        }
        match off {
            0..0x40 => self.common_read(off, size),
            ISR_OFF => {
                // Reading the ISR acknowledges it and lowers INTx.
                let v = self.notifier.inner.isr.swap(0, Ordering::SeqCst);
                self.notifier.set_intx(false);
                u64::from(v)
            }
            0x2000..0x3000 => self.backend.config_read(off - DEVICE_OFF, size),
            0x4000..0x5000 => self.notifier.msix().table_read(off - MSIX_TABLE_OFF, size),
            0x5000..0x6000 => self.notifier.msix().pba_read(off - MSIX_PBA_OFF, size),
            _ => 0,
        }
    }
    fn bar_write(&mut self, bar: usize, off: u64, size: u8, value: u64) {
        if bar != 0 {
            return;
        }
        match off {
            0..0x40 => self.common_write(off, size, value),
            0x2000..0x3000 => self.backend.config_write(off - DEVICE_OFF, size, value),
            0x3000..0x4000 => {
                let q = ((off - NOTIFY_OFF) / u64::from(NOTIFY_MULT)) as usize;
                match self.kicks.get(q) {
                    Some(k) if self.active => {
                        let _ = k.write(1);
                    }
                    Some(_) => {}
                    None => self.log.warn(format_args!(
                        "{}: notify of queue {q} (no such queue)",
                        self.name
                    )),
                }
            }
            0x4000..0x5000 => {
                let changed = self
                    .notifier
                    .msix()
                    .table_write(off - MSIX_TABLE_OFF, size, value);
                if changed {
                    self.notifier.send_pending();
                }
            }
            _ => self.log.warn(format_args!(
                "{}: BAR0 write at {off:#x} ignored",
                self.name
            )),
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        // Always: a backend's reset is idempotent, and stops whatever it started.
        self.backend.reset();
    }
}

//! blkback: the PV block backend (io/blkif.h), and its storage engines.
//!
//! * [`BlkDriver`] serves `vbd` or `qdisk` backends (frontends live under `device/vbd`).
//!   Probe reads the toolstack's `params` (`[format:]path`), `mode`, `device-type` and
//!   `discard-enable`, opens the engine through an [`EngineFactory`] and advertises flush,
//!   barrier, discard, persistent grants, 256 indirect segments, multi-queue and ring order 4.
//! * Connect reads the frontend's rings (single or `ring-page-order` pages, one or
//!   `multi-queue-num-queues` queues, native / x86_32 / x86_64 layouts), bounded by what we
//!   advertised ([`xenbus`]), and starts one ring thread per queue ([`ring`]).
//! * Every request is copied once and validated in one place: [`request::Request::parse`].
//! * [`BlkDriver::resize`] re-reads the disk size and tells the frontend, as Linux's
//!   `xen_blkbk_resize` does (`sectors`, then the backend state written again).
//! * Counters per device: [`metrics`].
//!
//! Wiring (one process per guest):
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn wire(host: Arc<dyn xen::XenHost>, xs: ::xenbus::XsClient, domid: u32) {
//! use backends::blk::{default_engine_factory, BlkConfig, BlkDriver};
//! let vbd = BlkDriver::new(host.clone(), "vbd", BlkConfig::default(), default_engine_factory());
//! let qdisk = BlkDriver::new(host, "qdisk", BlkConfig::default(), default_engine_factory());
//! let w1 = ::xenbus::backend::BackendWatcher::start(xs.clone(), vbd.clone(), 0, domid);
//! let w2 = ::xenbus::backend::BackendWatcher::start(xs, qdisk, 0, domid);
//! // vbd.stats(), vbd.resize(domid, devid) for the control surface; stopping the watchers
//! // disconnects every device (in-flight I/O completes, then a flush, then every unmap).
//! # }
//! ```

pub mod engine;
pub mod grants;
pub mod metrics;
pub mod request;
mod ring;
pub mod xenbus;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::xenbus::backend::{BackendDriver, Device, DeviceCtx, DriverError};
use tracing::{info, warn};
use xen::{DomId, XenHost};

use engine::{Engine, EngineError};
pub use metrics::{BlkMetrics, BlkStats};
pub use xenbus::DiskParams;

/// Opens a storage engine for a disk (one per queue). Tests inject null or fake engines.
pub type EngineFactory =
    Arc<dyn Fn(&DiskParams) -> Result<Box<dyn Engine>, EngineError> + Send + Sync>;

/// The ring layout the frontend chose (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// No `protocol` key: the backend's native layout (x86_64 here).
    Native,
    /// `x86_32-abi`.
    X86_32,
    /// `x86_64-abi`.
    X86_64,
}

/// How data pages reach the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantMode {
    /// Map the granted pages (one batch per request, or the persistent cache) and let the
    /// engine do I/O straight into them. The default.
    Map,
    /// Grant-copy into private bounce pages (writes) or out of them (reads): no foreign page
    /// is ever mapped into dom0 for data. Costs a copy and, today, a small allocation per
    /// request for the copy batch.
    Copy,
}

/// Settings of the block backend.
#[derive(Debug, Clone, Copy)]
pub struct BlkConfig {
    /// Map or copy data grants.
    pub grant_mode: GrantMode,
    /// Advertise `feature-persistent` (used when the frontend agrees; map mode only).
    pub persistent_grants: bool,
    /// The most persistent grants kept mapped per queue (LRU beyond that). Each queue keeps
    /// enough for its ring full of the largest requests, within this cap (see
    /// [`grants::persistent_grants_for_ring`]).
    pub max_persistent_grants: usize,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `max-ring-page-order` (at most 4: 16 pages).
    pub max_ring_page_order: u32,
    /// `feature-max-indirect-segments` (at most 256).
    pub max_indirect_segments: u16,
    /// While reading a burst of requests from a ring, hand them to the storage engine (one
    /// `io_uring_enter` for io_uring) after every this many, rather than once at the end of
    /// the burst: the device starts on the first requests sooner. 1 submits each request
    /// alone; a value at least the ring size submits once per burst.
    pub submit_batch: u32,
    /// Before a ring thread sleeps, it busy-polls its ring and its engine for up to this
    /// many microseconds (0, the default: it sleeps at once, as Linux's blkback). A request
    /// or completion within the window is taken without a sleep and a wakeup, which on a
    /// virtual dom0 cost tens of microseconds each (QEMU's IOThreads poll the same way,
    /// `poll-max-ns`); the price is CPU time spent spinning, up to the window per wakeup.
    pub poll_us: u32,
}

/// The default [`BlkConfig::submit_batch`], chosen by measurement (docs/PERFORMANCE.md):
/// 4 KiB random reads at QD32 gain 10-30 % over one submission per burst, for a little
/// more CPU per request.
pub const DEFAULT_SUBMIT_BATCH: u32 = 2;

impl Default for BlkConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        BlkConfig {
            grant_mode: GrantMode::Map,
            persistent_grants: true,
            max_persistent_grants: grants::MAX_PERSISTENT_GRANTS_PER_QUEUE,
            max_queues: cpus.clamp(1, 4),
            max_ring_page_order: 4,
            max_indirect_segments: request::MAX_INDIRECT_SEGMENTS,
            submit_batch: DEFAULT_SUBMIT_BATCH,
            poll_us: 0,
        }
    }
}

/// Errors of the block backend, naming the domain and device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// Opening a Xen handle failed.
    #[error("dom{domid} vbd {devid}: {source}")]
    Host {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Error.
        #[source]
        source: xen::HostError,
    },
    /// Mapping the ring pages failed.
    #[error("dom{domid} vbd {devid} queue {queue}: mapping the ring: {source}")]
    MapRing {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Queue.
        queue: u32,
        /// Error.
        #[source]
        source: xen::GrantError,
    },
    /// The ring is unusable (too small, or its indices are impossible at attach).
    #[error("dom{domid} vbd {devid} queue {queue}: {source}")]
    Ring {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Queue.
        queue: u32,
        /// Error.
        #[source]
        source: xen::ring::RingError,
    },
    /// Binding the event channel failed.
    #[error("dom{domid} vbd {devid}: binding event channel {port}: {source}")]
    Bind {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Remote port.
        port: u32,
        /// Error.
        #[source]
        source: xen::EvtchnError,
    },
    /// The storage engine failed.
    #[error("dom{domid} vbd {devid}: engine: {source}")]
    Engine {
        /// Domain.
        domid: u32,
        /// Device.
        devid: u32,
        /// Error.
        #[source]
        source: EngineError,
    },
    /// An OS-level failure.
    #[error("dom{domid} vbd {devid}: {what}: {source}")]
    Os {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// What.
        what: &'static str,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// No such device, or it has no engine to act on.
    #[error("dom{domid} vbd {devid}: {why}")]
    NoDevice {
        /// Domain.
        domid: u32,
        /// Device.
        devid: u32,
        /// Why.
        why: &'static str,
    },
    /// Writing xenstore failed.
    #[error(transparent)]
    Xenstore(#[from] ::xenbus::backend::DeviceError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the device, its ring threads and the driver's registry share.
#[derive(Default)]
pub(crate) struct DevShared {
    pub(crate) metrics: BlkMetrics,
    /// Disk size in 512-byte sectors, as last advertised.
    pub(crate) sectors: AtomicU64,
    pub(crate) rt: Mutex<Runtime>,
}

#[derive(Default)]
pub(crate) struct Runtime {
    ctx: Option<DeviceCtx>,
    queues: Vec<ring::QueueHandle>,
    /// The engine opened at probe, until connect hands it to queue 0.
    idle_engine: Option<Box<dyn Engine>>,
    connected: bool,
}

/// The block backend type (`vbd` or `qdisk`).
pub struct BlkDriver {
    host: Arc<dyn XenHost>,
    backend_type: String,
    config: BlkConfig,
    factory: EngineFactory,
    devices: Mutex<BTreeMap<(u32, u32), Arc<DevShared>>>,
}

impl std::fmt::Debug for BlkDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDriver")
            .field("type", &self.backend_type)
            .field("host", &self.host.describe())
            .field("config", &self.config)
            .finish()
    }
}

/// The default engines: `engine::open_image` with default [`engine::EngineOptions`] (raw files
/// and block devices through io_uring or a thread pool, qcow2, and `null:<size>` for measuring
/// the protocol's own cost).
pub fn default_engine_factory() -> EngineFactory {
    engine_factory_with(engine::EngineOptions::default())
}

/// [`default_engine_factory`] with explicit engine options (queue depth, mechanism, O_DIRECT).
pub fn engine_factory_with(opts: engine::EngineOptions) -> EngineFactory {
    Arc::new(move |p: &DiskParams| {
        engine::open_image(p.format.as_deref(), &p.path, p.read_only, &opts)
    })
}

impl BlkDriver {
    /// A block backend of `backend_type` (`vbd` or `qdisk`) on `host`.
    pub fn new(
        host: Arc<dyn XenHost>,
        backend_type: &str,
        config: BlkConfig,
        factory: EngineFactory,
    ) -> Arc<Self> {
        Arc::new(BlkDriver {
            host,
            backend_type: backend_type.to_owned(),
            config,
            factory,
            devices: Mutex::new(BTreeMap::new()),
        })
    }

    /// Counters of every device this driver has seen: ((domid, devid), stats).
    pub fn stats(&self) -> Vec<((u32, u32), BlkStats)> {
        lock(&self.devices)
            .iter()
            .map(|(k, s)| (*k, s.metrics.snapshot()))
            .collect()
    }

    /// Online resize: re-reads the disk size from the engine(s) and, if it changed, writes
    /// `sectors` and (while connected) the backend state again in one transaction, so the
    /// frontend re-reads the size (Linux's `xen_blkbk_resize`). Returns the size in sectors.
    pub fn resize(&self, domid: u32, devid: u32) -> Result<u64, BlkError> {
        let no = |why| BlkError::NoDevice { domid, devid, why };
        let shared = lock(&self.devices)
            .get(&(domid, devid))
            .cloned()
            .ok_or(no("no such device"))?;
        let mut rt = lock(&shared.rt);
        let eng = |source| BlkError::Engine {
            domid,
            devid,
            source,
        };
        let capacity = if !rt.queues.is_empty() {
            let mut cap = None;
            for q in &rt.queues {
                let (tx, rx) = mpsc::channel();
                if q.ctl.send(ring::Ctl::Refresh(tx)).is_err() {
                    continue;
                }
                q.waker.wake();
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(r) => {
                        let c = r.map_err(eng)?;
                        cap.get_or_insert(c);
                    }
                    Err(_) => warn!(domid, devid, "a ring thread did not answer the resize"),
                }
            }
            cap.ok_or(no("no ring thread answered"))?
        } else if let Some(e) = rt.idle_engine.as_mut() {
            e.refresh_capacity().map_err(eng)?
        } else {
            return Err(no("the device has no open disk"));
        };
        let sectors = capacity / xen::abi::blkif::BLKIF_SECTOR_SIZE;
        let old = shared.sectors.swap(sectors, Ordering::SeqCst);
        if old != sectors {
            if let Some(ctx) = rt.ctx.as_ref() {
                let s = sectors.to_string();
                if rt.connected {
                    ctx.write_backend(&[("sectors", &s), ("state", "4")])?;
                } else {
                    ctx.write_backend(&[("sectors", &s)])?;
                }
            }
            metrics::add(&shared.metrics.resizes, 1);
            info!(domid, devid, old, sectors, "disk resized");
        }
        Ok(sectors)
    }
}

impl BackendDriver for BlkDriver {
    fn backend_type(&self) -> &str {
        &self.backend_type
    }

    fn frontend_type(&self) -> &str {
        "vbd"
    }

    fn probe(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DriverError> {
        let params = xenbus::read_params(ctx)?;
        let engine = (self.factory)(&params).map_err(|source| {
            DriverError::Other(Box::new(BlkError::Engine {
                domid: ctx.frontend_domid(),
                devid: ctx.devid(),
                source,
            }))
        })?;
        let adv = xenbus::advertise(ctx, &params, engine.info(), &self.config)?;
        let shared = lock(&self.devices)
            .entry((ctx.frontend_domid(), ctx.devid()))
            .or_default()
            .clone();
        shared.sectors.store(adv.limits.sectors, Ordering::SeqCst);
        {
            let mut rt = lock(&shared.rt);
            for q in rt.queues.drain(..) {
                q.stop();
            }
            rt.ctx = Some(ctx.clone());
            rt.idle_engine = Some(engine);
            rt.connected = false;
        }
        info!(
            path = %params.path,
            format = params.format.as_deref().unwrap_or("raw"),
            read_only = adv.limits.read_only,
            sectors = adv.limits.sectors,
            "vbd probed"
        );
        Ok(Box::new(BlkDevice {
            host: self.host.clone(),
            config: self.config,
            factory: self.factory.clone(),
            params,
            adv,
            shared,
        }))
    }
}

struct BlkDevice {
    host: Arc<dyn XenHost>,
    config: BlkConfig,
    factory: EngineFactory,
    params: DiskParams,
    adv: xenbus::Advertised,
    shared: Arc<DevShared>,
}

impl BlkDevice {
    fn stop_queues(&self) {
        let queues: Vec<ring::QueueHandle> = {
            let mut rt = lock(&self.shared.rt);
            rt.connected = false;
            rt.queues.drain(..).collect()
        };
        // Outside the lock: each stop waits for in-flight I/O and a flush.
        for q in queues {
            q.stop();
        }
    }
}

impl Device for BlkDevice {
    fn connect(&mut self, ctx: &DeviceCtx) -> Result<(), DriverError> {
        let domid = ctx.frontend_domid();
        let fdomid = DomId::try_from(domid)
            .map_err(|_| DriverError::Failed(format!("domid {domid} out of range")))?;
        // One worker per ring, always (XSA-350): a connect never adds to running queues.
        self.stop_queues();
        let choice = xenbus::read_frontend(ctx, &self.adv)?;
        let mut limits = self.adv.limits;
        limits.sectors = self.shared.sectors.load(Ordering::SeqCst);
        let persistent = choice.persistent && self.config.grant_mode == GrantMode::Map;
        for (q, qr) in choice.queues.iter().enumerate() {
            let q = q as u32;
            let engine = match lock(&self.shared.rt).idle_engine.take() {
                Some(e) => e,
                None => {
                    let p = DiskParams {
                        queue: q,
                        ..self.params.clone()
                    };
                    (self.factory)(&p).map_err(|source| {
                        DriverError::Other(Box::new(BlkError::Engine {
                            domid,
                            devid: ctx.devid(),
                            source,
                        }))
                    })?
                }
            };
            let handle = ring::start(ring::QueueParams {
                host: self.host.clone(),
                ctx: ctx.clone(),
                domid: fdomid,
                queue: q,
                ring_refs: qr.ring_refs.clone(),
                port: qr.port,
                protocol: choice.protocol,
                persistent,
                grant_mode: self.config.grant_mode,
                max_persistent_grants: grants::persistent_grants_for_ring(
                    ring_slots(qr.ring_refs.len()),
                    self.config.max_indirect_segments,
                    self.config.max_persistent_grants,
                ),
                submit_batch: self.config.submit_batch,
                poll_ns: u64::from(self.config.poll_us) * 1000,
                limits,
                engine,
                shared: self.shared.clone(),
                span: ctx.span().clone(),
            })
            .map_err(|e| DriverError::Other(Box::new(e)))?;
            lock(&self.shared.rt).queues.push(handle);
        }
        lock(&self.shared.rt).connected = true;
        info!(
            queues = choice.queues.len(),
            protocol = ?choice.protocol,
            persistent,
            ring_pages = choice.queues.first().map_or(0, |q| q.ring_refs.len()),
            "vbd connected"
        );
        Ok(())
    }

    fn disconnect(&mut self, _ctx: &DeviceCtx) {
        self.stop_queues();
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        self.stop_queues();
    }
}

/// Slots of a blkif ring of `pages` pages (the native and x86_32 layouts give the same count).
fn ring_slots(pages: usize) -> usize {
    xen::ring::ring_size_of::<xen::abi::blkif::BlkifRequest, xen::abi::blkif::BlkifResponse>(
        pages.saturating_mul(xen::PAGE_SIZE),
    ) as usize
}

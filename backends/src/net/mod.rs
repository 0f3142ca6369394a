//! netback: the PV network backend (io/netif.h) over a tap device.
//!
//! * [`NetDriver`] serves `vif` or `qnic` backends (frontends live under `device/vif`). Probe
//!   reads the toolstack's `mac`, `bridge`, `script`, `rate`, `ip` and `mtu`, opens the host
//!   side through a [`NetEngineFactory`] (the tap, the bridge or hotplug script) and
//!   advertises every feature of Linux's xen-netback ([`xenbus`]).
//! * Connect reads the frontend's rings (one or `multi-queue-num-queues` queues, shared or
//!   split event channels, the optional control ring), opens one engine queue per guest queue
//!   and starts the vif thread ([`ring`]).
//! * Every TX request is copied once and parsed in one place: [`request::parse_tx`].
//! * Checksum and GSO metadata to and from `virtio_net_hdr`: [`offload`]. Toeplitz steering
//!   and the multicast filter: [`hash`]. Counters: [`metrics`].
//! * `rate` is credit-based (bytes per interval) and follows the xenstore key live.
//!
//! * [`engine`]: the network engine contract (a queue that carries frames with a
//!   `virtio_net_hdr`), shared with devmodel's virtio-net.
//! * [`tap`]: the engine on a tap device, with offloads and multiple queues, and the host side
//!   (bridge, hotplug scripts).

pub mod engine;
pub mod hash;
pub mod metrics;
pub mod offload;
pub mod request;
mod ring;
pub mod tap;
pub mod xenbus;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ::xenbus::backend::{BackendDriver, Device, DeviceCtx, DriverError};
use ::xenbus::EventQueue;
use tracing::{info, warn};
use xen::{DomId, XenHost};

use engine::NetQueueIo;
pub use metrics::{NetMetrics, NetStats};
pub use ring::RxBacklogLimits;
pub use xenbus::{FrontendChoice, Rate, VifParams};

/// What the tap (or a test double) is asked to offload, from what the frontend negotiated:
/// the offloads set with TUNSETOFFLOAD, so the kernel hands us only frames the guest can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    /// Partial checksums (TUN_F_CSUM): the guest takes NETRXF_csum_blank.
    pub csum: bool,
    /// TCPv4 super-frames (TUN_F_TSO4).
    pub tso4: bool,
    /// TCPv6 super-frames (TUN_F_TSO6).
    pub tso6: bool,
}

/// The host side of one vif, opened at probe (tap created, bridge joined or hotplug script
/// run) and torn down when dropped (script `offline`, tap removed).
pub trait VifHost: Send {
    /// Opens `n` engine queues (IFF_MULTI_QUEUE) with these offloads. Called at each connect.
    fn open_queues(
        &mut self,
        n: u32,
        offloads: Offloads,
    ) -> std::io::Result<Vec<Box<dyn NetQueueIo>>>;
    /// For logs: e.g. the tap's name.
    fn describe(&self) -> String;
}

/// Opens the host side of a vif. Tests inject engine doubles.
pub type NetEngineFactory =
    Arc<dyn Fn(&VifParams) -> std::io::Result<Box<dyn VifHost>> + Send + Sync>;

/// Settings of the network backend.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// Let frames with another source MAC through (anti-spoofing off).
    pub allow_spoofing: bool,
    /// Bounds of each queue's RX backlog.
    pub rx_backlog: RxBacklogLimits,
}

impl Default for NetConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        NetConfig {
            max_queues: cpus.clamp(1, 8),
            allow_spoofing: false,
            rx_backlog: RxBacklogLimits::default(),
        }
    }
}

/// Errors of the network backend, naming the domain and device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening a Xen handle failed.
    #[error("dom{domid} vif {devid}: {source}")]
    Host {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Error.
        #[source]
        source: xen::HostError,
    },
    /// Mapping a ring page failed.
    #[error("dom{domid} vif {devid}: mapping the {what}: {source}")]
    MapRing {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Which ring.
        what: &'static str,
        /// Error.
        #[source]
        source: xen::GrantError,
    },
    /// A ring is unusable (too small, or impossible indices at attach).
    #[error("dom{domid} vif {devid}: {what}: {source}")]
    Ring {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Which ring.
        what: &'static str,
        /// Error.
        #[source]
        source: xen::ring::RingError,
    },
    /// Binding an event channel failed.
    #[error("dom{domid} vif {devid}: binding event channel {port}: {source}")]
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
    /// The host side (tap, bridge, script) failed.
    #[error("dom{domid} vif {devid}: host side: {what}: {source}")]
    Engine {
        /// Domain.
        domid: u32,
        /// Device.
        devid: u32,
        /// What.
        what: &'static str,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// An OS-level failure.
    #[error("dom{domid} vif {devid}: {what}: {source}")]
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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The network backend type (`vif` or `qnic`).
pub struct NetDriver {
    host: Arc<dyn XenHost>,
    backend_type: String,
    config: NetConfig,
    factory: NetEngineFactory,
    devices: Arc<Devices>,
    /// Host sides of devices dropped for a re-probe (the frontend restarted), kept so the tap
    /// survives frontend reconnects as Linux's vif netdev does.
    parked: Arc<Parked>,
}

/// The counters of the devices that exist: ((domid, devid), shared state).
type Devices = Mutex<BTreeMap<(u32, u32), Arc<ring::VifShared>>>;

/// Host sides waiting for their device's next probe: ((domid, devid), (params, host side)).
type Parked = Mutex<BTreeMap<(u32, u32), (VifParams, Box<dyn VifHost>)>>;

impl std::fmt::Debug for NetDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDriver")
            .field("type", &self.backend_type)
            .field("host", &self.host.describe())
            .field("config", &self.config)
            .finish()
    }
}

impl NetDriver {
    /// A network backend of `backend_type` (`vif` or `qnic`) on `host`.
    pub fn new(
        host: Arc<dyn XenHost>,
        backend_type: &str,
        config: NetConfig,
        factory: NetEngineFactory,
    ) -> Arc<Self> {
        Arc::new(NetDriver {
            host,
            backend_type: backend_type.to_owned(),
            config,
            factory,
            devices: Arc::new(Mutex::new(BTreeMap::new())),
            parked: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    /// Counters of every vif this driver serves: ((domid, devid), stats). A device's entry
    /// lives from its first probe until it is torn down (removed, or its domain destroyed),
    /// across frontend reconnects.
    pub fn stats(&self) -> Vec<((u32, u32), NetStats)> {
        lock(&self.devices)
            .iter()
            .map(|(k, s)| (*k, s.metrics.snapshot()))
            .collect()
    }
}

impl BackendDriver for NetDriver {
    fn backend_type(&self) -> &str {
        &self.backend_type
    }

    fn frontend_type(&self) -> &str {
        "vif"
    }

    fn connect_on_initialised(&self) -> bool {
        // Linux netfront writes its rings and goes Connected directly.
        false
    }

    fn probe(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DriverError> {
        let key = (ctx.frontend_domid(), ctx.devid());
        // Taken first: if anything below fails, the parked host side is torn down with it.
        let parked = lock(&self.parked).remove(&key);
        let params = xenbus::read_params(ctx)?;
        let host_side = match parked {
            // The same toolstack settings: keep the tap (and its bridge or script state).
            Some((p, h)) if p == params => h,
            _ => (self.factory)(&params).map_err(|source| {
                DriverError::Other(Box::new(NetError::Engine {
                    domid: ctx.frontend_domid(),
                    devid: ctx.devid(),
                    what: "opening the host side",
                    source,
                }))
            })?,
        };
        xenbus::advertise(ctx, self.config.max_queues)?;
        let shared = lock(&self.devices)
            .entry((ctx.frontend_domid(), ctx.devid()))
            .or_default()
            .clone();
        *lock(&shared.rate) = params.rate;
        info!(
            mac = ?params.mac,
            host = %host_side.describe(),
            rate = ?params.rate,
            "vif probed"
        );
        Ok(Box::new(NetDevice {
            host: self.host.clone(),
            config: self.config,
            params,
            host_side: Some(host_side),
            ctx: ctx.clone(),
            parked: self.parked.clone(),
            devices: self.devices.clone(),
            shared,
            running: None,
            key_watch: None,
        }))
    }
}

/// Follows the keys that change while connected: the backend's `rate` (the toolstack changes
/// it live) and the frontend's `request-multicast-control` (`feature-dynamic-multicast-control`).
/// One bounded, coalescing event queue: a frontend flooding its key costs nothing more.
struct KeyWatch {
    queue: EventQueue,
    thread: Option<JoinHandle<()>>,
}

impl KeyWatch {
    fn start(
        ctx: &DeviceCtx,
        shared: Arc<ring::VifShared>,
        waker: Arc<ring::Waker>,
    ) -> Option<KeyWatch> {
        let queue = EventQueue::new(4);
        let watch = |path: String, token: &str| match ctx.client().watch_into(&path, token, &queue)
        {
            Ok(g) => Some(g),
            Err(e) => {
                warn!(error = %e, path, "cannot watch; changes need a reconnect");
                None
            }
        };
        let rate_guard = watch(ctx.backend_key("rate"), "rate")?;
        let mcast_guard = watch(ctx.frontend_key("request-multicast-control"), "mcast")?;
        let q = queue.clone();
        let ctx = ctx.clone();
        let thread = std::thread::Builder::new()
            .name(format!(
                "vif-keys-d{}-{}",
                ctx.frontend_domid(),
                ctx.devid()
            ))
            .spawn(move || {
                let _guards = (rate_guard, mcast_guard);
                let mut log = crate::ratelimit::TokenBucket::new(1.0, 5.0);
                while let Some(ev) = q.recv() {
                    if ev.token == "mcast" {
                        match ctx.frontend_flag("request-multicast-control") {
                            Ok(on) => {
                                if shared.mcast_control.swap(on, Ordering::SeqCst) != on {
                                    info!(on, "multicast control changed");
                                    shared.mcast_changed.store(true, Ordering::SeqCst);
                                    waker.wake();
                                }
                            }
                            Err(e) => {
                                if log.take(1.0) {
                                    warn!(error = %e, "ignoring request-multicast-control");
                                }
                            }
                        }
                        continue;
                    }
                    let rate = match ctx.read_backend("rate") {
                        Ok(None) => None,
                        Ok(Some(s)) => match Rate::parse(&s) {
                            Ok(r) => r,
                            Err(e) => {
                                warn!(error = %e, "ignoring an invalid rate");
                                continue;
                            }
                        },
                        Err(_) => continue,
                    };
                    let mut cur = lock(&shared.rate);
                    if *cur != rate {
                        *cur = rate;
                        drop(cur);
                        info!(rate = ?rate, "rate changed");
                        shared.rate_changed.store(true, Ordering::SeqCst);
                        waker.wake();
                    }
                }
            })
            .ok()?;
        Some(KeyWatch {
            queue,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.queue.close("vif disconnected");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct NetDevice {
    host: Arc<dyn XenHost>,
    config: NetConfig,
    params: VifParams,
    /// Always `Some` until dropped.
    host_side: Option<Box<dyn VifHost>>,
    ctx: DeviceCtx,
    parked: Arc<Parked>,
    devices: Arc<Devices>,
    shared: Arc<ring::VifShared>,
    running: Option<ring::VifHandle>,
    key_watch: Option<KeyWatch>,
}

impl NetDevice {
    fn stop(&mut self) {
        if let Some(w) = self.key_watch.take() {
            w.stop();
        }
        if let Some(h) = self.running.take() {
            h.stop();
        }
    }
}

impl Device for NetDevice {
    fn connect(&mut self, ctx: &DeviceCtx) -> Result<(), DriverError> {
        let domid = ctx.frontend_domid();
        let fdomid = DomId::try_from(domid)
            .map_err(|_| DriverError::Failed(format!("domid {domid} out of range")))?;
        // One worker per vif, always (XSA-350).
        self.stop();
        let choice = xenbus::read_frontend(ctx, self.config.max_queues)?;
        let offloads = Offloads {
            csum: choice.csum,
            tso4: choice.csum && choice.sg && choice.gso_tcpv4,
            tso6: choice.csum && choice.sg && choice.gso_tcpv6 && choice.ipv6_csum,
        };
        let host_side = self.host_side.as_mut().ok_or_else(|| {
            DriverError::Failed(format!("domain {domid} vif {}: no host side", ctx.devid()))
        })?;
        let engines = host_side
            .open_queues(choice.queues.len() as u32, offloads)
            .map_err(|source| {
                DriverError::Other(Box::new(NetError::Engine {
                    domid,
                    devid: ctx.devid(),
                    what: "opening the engine queues",
                    source,
                }))
            })?;
        if engines.is_empty() {
            return Err(DriverError::Failed(format!(
                "domain {domid} vif {}: the host side opened no queue",
                ctx.devid()
            )));
        }
        self.shared
            .mcast_control
            .store(choice.multicast_control, Ordering::SeqCst);
        let nq = choice.queues.len();
        let split = choice.queues.iter().any(|q| q.tx_port != q.rx_port);
        let ctrl = choice.ctrl.is_some();
        let handle = ring::start(ring::VifStart {
            host: self.host.clone(),
            ctx: ctx.clone(),
            domid: fdomid,
            choice,
            engines,
            shared: self.shared.clone(),
            mac: self.params.mac,
            allow_spoofing: self.config.allow_spoofing,
            rx_limits: self.config.rx_backlog,
            span: ctx.span().clone(),
        })
        .map_err(|e| DriverError::Other(Box::new(e)))?;
        self.key_watch = KeyWatch::start(ctx, self.shared.clone(), handle.waker.clone());
        self.running = Some(handle);
        info!(queues = nq, split, ctrl, ?offloads, "vif connected");
        Ok(())
    }

    fn disconnect(&mut self, _ctx: &DeviceCtx) {
        self.stop();
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.stop();
        // Dropped for a re-probe (the backend is still there and online): park the host side
        // for the next probe. Removed or offline: let it go (script offline, tap removed).
        let online = matches!(self.ctx.read_backend("online"), Ok(Some(v)) if v.trim() == "1");
        let key = (self.ctx.frontend_domid(), self.ctx.devid());
        if let Some(h) = self.host_side.take() {
            if online {
                lock(&self.parked).insert(key, (self.params.clone(), h));
            }
        }
        if !online {
            // Torn down: its counters go too (a later device with the same domid and devid
            // starts from zero). Only our own entry: a newer probe may have replaced it.
            let mut devices = lock(&self.devices);
            if devices
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
            {
                devices.remove(&key);
            }
        }
    }
}

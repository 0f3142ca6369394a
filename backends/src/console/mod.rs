//! The PV console backend (`backend/console/<domid>/<devid>`; io/console.h).
//!
//! The frontend publishes `ring-ref` (one granted page holding `struct xencons_interface`)
//! and `port` (an unbound event channel). On connect we map the page, bind the port and run
//! one ring thread that copies the guest's output out of the ring once, validates the
//! indices, and hands complete lines to a [`ConsoleSink`] under a rate limit; input for the
//! guest is queued with [`ConsoleDriver::send_input`].

pub mod metrics;
mod ring;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::info;
use xen::XenHost;
use xenbus::backend::{BackendDriver, Device, DeviceCtx, DeviceError, DriverError};

pub use metrics::{ConsoleMetrics, ConsoleStats};
use ring::RingThread;

/// Where complete lines of guest output go.
pub trait ConsoleSink: Send + Sync + 'static {
    /// One line (without its newline; invalid UTF-8 replaced), already rate-limited.
    fn line(&self, domid: u32, devid: u32, line: &str);
}

/// Logs each line with `tracing` at info level.
#[derive(Debug, Default)]
pub struct LogSink;

impl ConsoleSink for LogSink {
    fn line(&self, domid: u32, devid: u32, line: &str) {
        info!(target: "domio::console", domid, devid, "guest: {line}");
    }
}

/// Limits on what a guest can make us do.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleLimits {
    /// Longest line logged (longer lines are split).
    pub max_line: usize,
    /// Lines per second logged per device; more are counted as suppressed.
    pub lines_per_sec: f64,
    /// Burst of lines.
    pub line_burst: f64,
    /// Most input bytes queued for a guest that does not read.
    pub max_input_queue: usize,
}

impl Default for ConsoleLimits {
    fn default() -> Self {
        ConsoleLimits {
            max_line: 1024,
            lines_per_sec: 200.0,
            line_burst: 400.0,
            max_input_queue: 64 * 1024,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared between a device, its ring thread and the driver's registry.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) metrics: ConsoleMetrics,
    pub(crate) input: Mutex<VecDeque<u8>>,
    pub(crate) waker: Mutex<Option<Arc<ring::Waker>>>,
}

/// The console backend type.
pub struct ConsoleDriver {
    host: Arc<dyn XenHost>,
    sink: Arc<dyn ConsoleSink>,
    limits: ConsoleLimits,
    devices: Mutex<BTreeMap<(u32, u32), Arc<Shared>>>,
}

impl std::fmt::Debug for ConsoleDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleDriver")
            .field("host", &self.host.describe())
            .finish()
    }
}

/// Errors of [`ConsoleDriver::send_input`].
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// No such device.
    #[error("dom{domid} console {devid}: no such device")]
    NoDevice {
        /// Domain.
        domid: u32,
        /// Device.
        devid: u32,
    },
    /// The guest is not reading its input.
    #[error("dom{domid} console {devid}: input queue full ({queued} bytes)")]
    Full {
        /// Domain.
        domid: u32,
        /// Device.
        devid: u32,
        /// Bytes queued.
        queued: usize,
    },
}

impl ConsoleDriver {
    /// A console backend on `host`, logging lines to `sink`.
    pub fn new(
        host: Arc<dyn XenHost>,
        sink: Arc<dyn ConsoleSink>,
        limits: ConsoleLimits,
    ) -> Arc<Self> {
        Arc::new(ConsoleDriver {
            host,
            sink,
            limits,
            devices: Mutex::new(BTreeMap::new()),
        })
    }

    /// Counters of every device this driver has seen: ((domid, devid), stats).
    pub fn stats(&self) -> Vec<((u32, u32), ConsoleStats)> {
        lock(&self.devices)
            .iter()
            .map(|(k, s)| (*k, s.metrics.snapshot()))
            .collect()
    }

    /// Queues `data` for the guest's input ring (delivered as the guest makes room).
    pub fn send_input(&self, domid: u32, devid: u32, data: &[u8]) -> Result<(), InputError> {
        let shared = lock(&self.devices)
            .get(&(domid, devid))
            .cloned()
            .ok_or(InputError::NoDevice { domid, devid })?;
        {
            let mut q = lock(&shared.input);
            if q.len() + data.len() > self.limits.max_input_queue {
                return Err(InputError::Full {
                    domid,
                    devid,
                    queued: q.len(),
                });
            }
            q.extend(data);
        }
        if let Some(w) = lock(&shared.waker).as_ref() {
            w.wake();
        }
        Ok(())
    }
}

impl BackendDriver for ConsoleDriver {
    fn backend_type(&self) -> &str {
        "console"
    }

    /// Only consoles the toolstack gave to a device model: libxl writes the frontend's
    /// `type` (a node the guest can read but not write) as `ioemu` for those and
    /// `xenconsoled` for the ones xenconsoled serves, such as console 0 of every PV guest.
    fn claims(&self, ctx: &DeviceCtx) -> Result<bool, DeviceError> {
        let Some(fe) = ctx.read_backend("frontend")? else {
            return Ok(false);
        };
        let expected = format!(
            "/local/domain/{}/device/console/{}",
            ctx.frontend_domid(),
            ctx.devid()
        );
        if fe != expected {
            return Ok(false);
        }
        Ok(ctx.read_frontend_raw("type")?.as_deref() == Some(&b"ioemu"[..]))
    }

    fn probe(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DriverError> {
        let shared = lock(&self.devices)
            .entry((ctx.frontend_domid(), ctx.devid()))
            .or_default()
            .clone();
        Ok(Box::new(ConsoleDevice {
            host: self.host.clone(),
            sink: self.sink.clone(),
            limits: self.limits,
            shared,
            ring: None,
        }))
    }
}

struct ConsoleDevice {
    host: Arc<dyn XenHost>,
    sink: Arc<dyn ConsoleSink>,
    limits: ConsoleLimits,
    shared: Arc<Shared>,
    ring: Option<RingThread>,
}

impl Device for ConsoleDevice {
    fn connect(&mut self, ctx: &DeviceCtx) -> Result<(), DriverError> {
        let domid = ctx.frontend_domid();
        let ring_ref = ctx.frontend_required_u32("ring-ref", 0..=u32::MAX)?;
        // Port 0 is never valid; the FIFO ABI allows ports up to 2^17, and the hypervisor
        // refuses any port that is not an unbound port of the frontend for us.
        let port = ctx.frontend_required_u32("port", 1..=u32::MAX)?;
        let fdomid = u16::try_from(domid)
            .map_err(|_| DriverError::Failed(format!("domid {domid} out of range")))?;
        let ring = RingThread::start(ring::Params {
            host: self.host.as_ref(),
            domid: fdomid,
            devid: ctx.devid(),
            ring_ref,
            port,
            sink: self.sink.clone(),
            limits: self.limits,
            shared: self.shared.clone(),
            span: ctx.span().clone(),
            ctx: ctx.clone(),
        })
        .map_err(|e| DriverError::Failed(e.to_string()))?;
        self.ring = Some(ring);
        Ok(())
    }

    fn disconnect(&mut self, _ctx: &DeviceCtx) {
        if let Some(r) = self.ring.take() {
            r.stop();
        }
    }
}

impl Drop for ConsoleDevice {
    fn drop(&mut self) {
        if let Some(r) = self.ring.take() {
            r.stop();
        }
    }
}

//! The backend side of the XenBus device lifecycle.
//!
//! A [`BackendWatcher`] serves one backend type (`vbd`, `qdisk`, `vif`, ...) for one frontend
//! domain. It watches `/local/domain/<own>/backend/<type>/<domid>` and each device's frontend
//! `state` node, and drives every device through the handshake of xen/io/xenbus.h, like
//! Linux's xenbus backend core with xen-blkback/netback's `frontend_changed`, and QEMU's
//! hw/xen/xen-bus.c:
//!
//! ```text
//!  toolstack writes backend/<type>/<domid>/<devid> (state=1)
//!    -> BackendDriver::probe, hotplug-status, backend InitWait(2)
//!  frontend Initialised(3) / Connected(4)       -> Device::connect -> backend Connected(4)
//!                                 connect fails -> `error` node, backend Closing(5)
//!  frontend Closing(5)                          -> Device::disconnect, backend Closing(5)
//!  frontend Closed(6)                           -> backend Closed(6); removed if online=0
//!  frontend Initialising(1) after a close       -> fresh probe, backend InitWait(2)
//!  frontend Reconfiguring(7) / Reconfigured(8)  -> Device::reconfigure
//!  backend node removed                         -> Device::disconnect, device dropped
//! ```
//!
//! The state machine is *level-triggered*: every watch event only says "look again", and the
//! watcher re-reads the current values (backend node, `online`, frontend `state`) before it
//! acts. Events are coalesced in a bounded queue, so a guest flooding its `state` node
//! (XSA-349) costs a bounded amount of memory, and the final state is still reached. Each
//! device tracks whether it is connected and whether a connect was attempted since its last
//! probe, so connect and disconnect are never doubled and no connect happens after a
//! disconnect without a fresh probe (XSA-350).
//!
//! Every value the frontend writes is hostile: the frontend's path is computed from the
//! domid, type and devid, and only compared with what the toolstack wrote; [`DeviceCtx`]
//! offers strict, bounded readers for frontend keys.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, info_span, warn, Span};

use crate::client::{Transaction, WatchGuard, XsClient, XsError, XsOps};
use crate::parse::{strict_bool, strict_u32, strict_u64};
use crate::state::{escape_for_log, XenbusState};
use crate::watch::{EventQueue, WatchEvent};

/// Errors about one device, naming the domain, type, device and node at fault.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A xenstore operation failed.
    #[error("domain {domid} {type_} device {devid}: {source}")]
    Xenstore {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// Device id.
        devid: u32,
        /// The error.
        #[source]
        source: XsError,
    },
    /// The frontend wrote a value we refuse.
    #[error(
        "domain {domid} {type_} device {devid}: frontend wrote invalid {path} = {value:?}: {why}"
    )]
    BadFrontendValue {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// Device id.
        devid: u32,
        /// The node.
        path: String,
        /// The value, escaped and truncated.
        value: String,
        /// What was expected.
        why: String,
    },
    /// A node the frontend must write is missing.
    #[error("domain {domid} {type_} device {devid}: frontend did not write {path}")]
    MissingFrontendValue {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// Device id.
        devid: u32,
        /// The node.
        path: String,
    },
    /// The toolstack's backend nodes are missing or inconsistent.
    #[error("domain {domid} {type_} device {devid}: bad backend node {path} = {value:?}: {why}")]
    BadBackendValue {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// Device id.
        devid: u32,
        /// The node.
        path: String,
        /// The value, escaped and truncated.
        value: String,
        /// What was expected.
        why: String,
    },
    /// The backend node was removed.
    #[error("domain {domid} {type_} device {devid}: backend node {path} is gone")]
    Gone {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// Device id.
        devid: u32,
        /// The backend path.
        path: String,
    },
}

/// Errors a driver returns from probe, connect or reconfigure.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Reading or writing the device's nodes failed (including invalid frontend values).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The driver refuses, with a message for the `error` node and the log.
    #[error("{0}")]
    Failed(String),
    /// The driver does not support this operation.
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    /// Another error from the driver.
    #[error(transparent)]
    Other(Box<dyn StdError + Send + Sync>),
}

/// Errors starting a [`BackendWatcher`].
#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    /// A backend type or name the watcher cannot use in a path.
    #[error("invalid backend type {0:?}: must be a non-empty name of [a-z0-9_-]")]
    BadType(String),
    /// Setting up the watch failed.
    #[error("domain {domid} {type_}: watching {path}: {source}")]
    Watch {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// Watched path.
        path: String,
        /// The error.
        #[source]
        source: Box<XsError>,
    },
    /// The watcher thread could not be started.
    #[error("domain {domid} {type_}: starting the watcher thread: {source}")]
    Spawn {
        /// Frontend domain.
        domid: u32,
        /// Backend type.
        type_: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What a device says about its hotplug step (the `hotplug-status` node libxl waits for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hotplug {
    /// Ready: the watcher writes `hotplug-status = connected` (the default, as QEMU does).
    Connected,
    /// Not yet (e.g. netback runs a script first): the driver later calls
    /// [`DeviceCtx::hotplug_connected`] or [`DeviceCtx::hotplug_failed`] itself.
    Deferred,
    /// Failed: the watcher writes `hotplug-status = error`, the message to the `error` node,
    /// and closes the device.
    Failed(String),
}

/// A backend type: creates a [`Device`] for each device the toolstack configures.
pub trait BackendDriver: Send + Sync + 'static {
    /// The backend directory name (`vbd`, `qdisk`, `vif`).
    fn backend_type(&self) -> &str;

    /// The frontend's directory name under `device/` (`vbd` for `qdisk`).
    fn frontend_type(&self) -> &str {
        self.backend_type()
    }

    /// Whether to connect when the frontend is Initialised (blkback) or only once it is
    /// Connected (netback).
    fn connect_on_initialised(&self) -> bool {
        true
    }

    /// Whether this backend serves the device at all. Called before anything is validated or
    /// written: a device declined here is left exactly as it is (for example the PV console
    /// that xl creates for every guest belongs to xenconsoled, not to a device model).
    /// A device declined once is not asked about again until its backend node is re-created.
    fn claims(&self, ctx: &DeviceCtx) -> Result<bool, DeviceError> {
        let _ = ctx;
        Ok(true)
    }

    /// Reads the toolstack's configuration (`params`, `mode`, ...), opens what the device
    /// needs and advertises its features (with [`DeviceCtx::write_backend`]). Called for a new
    /// device and again after each frontend restart; the watcher then writes InitWait.
    fn probe(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DriverError>;
}

/// One device of a [`BackendDriver`], from probe to removal. Methods run on the watcher
/// thread of its domain and type: they must not block for long (connect starts the ring
/// threads and returns).
pub trait Device: Send {
    /// Called once after a successful probe; see [`Hotplug`].
    fn hotplug(&mut self, ctx: &DeviceCtx) -> Hotplug {
        let _ = ctx;
        Hotplug::Connected
    }

    /// The frontend published its rings: read them (strictly, see [`DeviceCtx`]), map them and
    /// start serving. Called at most once per probe. On `Err` the watcher calls
    /// [`Device::disconnect`] to release whatever was acquired, writes the error to the
    /// backend's `error` node and moves the backend to Closing.
    fn connect(&mut self, ctx: &DeviceCtx) -> Result<(), DriverError>;

    /// Stop serving: stop the ring threads, unmap every grant, unbind event channels. Must be
    /// idempotent; called after every connect attempt before the device is probed again or
    /// dropped.
    fn disconnect(&mut self, ctx: &DeviceCtx);

    /// The frontend entered `frontend` (Reconfiguring or Reconfigured) while connected. On
    /// `Ok` the backend moves to Reconfigured (resp. Connected); on `Err` the device closes.
    fn reconfigure(&mut self, ctx: &DeviceCtx, frontend: XenbusState) -> Result<(), DriverError> {
        let _ = (ctx, frontend);
        Err(DriverError::Unsupported("reconfiguration"))
    }
}

struct CtxInner {
    client: XsClient,
    backend_type: String,
    own_domid: u32,
    domid: u32,
    devid: u32,
    backend_path: String,
    frontend_path: String,
    span: Span,
    /// A fatal error reported by the driver, waiting for the watcher.
    fatal: Mutex<Option<String>>,
    /// The watcher's queue, to wake it when the driver reports a fatal error.
    wake: OnceLock<EventQueue>,
}

/// Everything a driver needs about one device. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct DeviceCtx {
    inner: Arc<CtxInner>,
}

impl fmt::Debug for DeviceCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCtx")
            .field("backend", &self.inner.backend_path)
            .field("frontend", &self.inner.frontend_path)
            .finish()
    }
}

const MAX_LOGGED_VALUE: usize = 64;
const MAX_ERROR_NODE: usize = 1024;

impl DeviceCtx {
    /// A context for a device (the watcher makes these; public for drivers' own tests).
    pub fn new(
        client: XsClient,
        backend_type: &str,
        frontend_type: &str,
        own_domid: u32,
        domid: u32,
        devid: u32,
    ) -> DeviceCtx {
        let span = info_span!("xenbus_device", domid, r#type = %backend_type, devid);
        DeviceCtx {
            inner: Arc::new(CtxInner {
                client,
                backend_type: backend_type.to_owned(),
                own_domid,
                domid,
                devid,
                backend_path: format!(
                    "/local/domain/{own_domid}/backend/{backend_type}/{domid}/{devid}"
                ),
                frontend_path: format!("/local/domain/{domid}/device/{frontend_type}/{devid}"),
                span,
                fatal: Mutex::new(None),
                wake: OnceLock::new(),
            }),
        }
    }

    /// The xenstore client.
    pub fn client(&self) -> &XsClient {
        &self.inner.client
    }
    /// `/local/domain/<own>/backend/<type>/<domid>/<devid>`.
    pub fn backend_path(&self) -> &str {
        &self.inner.backend_path
    }
    /// `/local/domain/<domid>/device/<frontend type>/<devid>` (computed, never read).
    pub fn frontend_path(&self) -> &str {
        &self.inner.frontend_path
    }
    /// The frontend domain.
    pub fn frontend_domid(&self) -> u32 {
        self.inner.domid
    }
    /// The backend domain (ours).
    pub fn own_domid(&self) -> u32 {
        self.inner.own_domid
    }
    /// The device id.
    pub fn devid(&self) -> u32 {
        self.inner.devid
    }
    /// The backend type.
    pub fn backend_type(&self) -> &str {
        &self.inner.backend_type
    }
    /// A tracing span naming domain, type and device: enter it in ring threads.
    pub fn span(&self) -> &Span {
        &self.inner.span
    }

    /// The full path of a backend key.
    pub fn backend_key(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.backend_path)
    }
    /// The full path of a frontend key.
    pub fn frontend_key(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.frontend_path)
    }

    fn xs_err(&self, source: XsError) -> DeviceError {
        DeviceError::Xenstore {
            domid: self.inner.domid,
            type_: self.inner.backend_type.clone(),
            devid: self.inner.devid,
            source,
        }
    }

    fn bad_frontend(&self, key: &str, value: &[u8], why: String) -> DeviceError {
        DeviceError::BadFrontendValue {
            domid: self.inner.domid,
            type_: self.inner.backend_type.clone(),
            devid: self.inner.devid,
            path: self.frontend_key(key),
            value: escape_for_log(value, MAX_LOGGED_VALUE),
            why,
        }
    }

    fn missing_frontend(&self, key: &str) -> DeviceError {
        DeviceError::MissingFrontendValue {
            domid: self.inner.domid,
            type_: self.inner.backend_type.clone(),
            devid: self.inner.devid,
            path: self.frontend_key(key),
        }
    }

    fn bad_backend(&self, key: &str, value: &[u8], why: &str) -> DeviceError {
        DeviceError::BadBackendValue {
            domid: self.inner.domid,
            type_: self.inner.backend_type.clone(),
            devid: self.inner.devid,
            path: self.backend_key(key),
            value: escape_for_log(value, MAX_LOGGED_VALUE),
            why: why.to_owned(),
        }
    }

    fn gone(&self) -> DeviceError {
        DeviceError::Gone {
            domid: self.inner.domid,
            type_: self.inner.backend_type.clone(),
            devid: self.inner.devid,
            path: self.inner.backend_path.clone(),
        }
    }

    /// A backend key written by the toolstack (UTF-8); `None` if missing.
    pub fn read_backend(&self, key: &str) -> Result<Option<String>, DeviceError> {
        match self
            .client()
            .try_read(&self.backend_key(key))
            .map_err(|e| self.xs_err(e))?
        {
            None => Ok(None),
            Some(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|e| self.bad_backend(key, e.as_bytes(), "not UTF-8")),
        }
    }

    /// A frontend key's raw bytes; `None` if missing. Treat them as hostile.
    pub fn read_frontend_raw(&self, key: &str) -> Result<Option<Vec<u8>>, DeviceError> {
        self.client()
            .try_read(&self.frontend_key(key))
            .map_err(|e| self.xs_err(e))
    }

    /// A frontend number, strictly decimal and within `allowed` (what we advertised);
    /// `None` if missing.
    pub fn frontend_u64(
        &self,
        key: &str,
        allowed: RangeInclusive<u64>,
    ) -> Result<Option<u64>, DeviceError> {
        let Some(v) = self.read_frontend_raw(key)? else {
            return Ok(None);
        };
        let n = strict_u64(&v)
            .ok_or_else(|| self.bad_frontend(key, &v, "not a canonical decimal number".into()))?;
        if !allowed.contains(&n) {
            return Err(self.bad_frontend(
                key,
                &v,
                format!("out of range {}..={}", allowed.start(), allowed.end()),
            ));
        }
        Ok(Some(n))
    }

    /// A frontend `u32`, strictly decimal and within `allowed`; `None` if missing.
    pub fn frontend_u32(
        &self,
        key: &str,
        allowed: RangeInclusive<u32>,
    ) -> Result<Option<u32>, DeviceError> {
        let wide = u64::from(*allowed.start())..=u64::from(*allowed.end());
        // The range check bounds the value to u32.
        Ok(self
            .frontend_u64(key, wide)?
            .and_then(|n| u32::try_from(n).ok()))
    }

    /// A frontend `u32` that must be present.
    pub fn frontend_required_u32(
        &self,
        key: &str,
        allowed: RangeInclusive<u32>,
    ) -> Result<u32, DeviceError> {
        self.frontend_u32(key, allowed)?
            .ok_or_else(|| self.missing_frontend(key))
    }

    /// A frontend feature flag: missing means false; present must be exactly `0` or `1`.
    pub fn frontend_flag(&self, key: &str) -> Result<bool, DeviceError> {
        match self.read_frontend_raw(key)? {
            None => Ok(false),
            Some(v) => {
                strict_bool(&v).ok_or_else(|| self.bad_frontend(key, &v, "expected 0 or 1".into()))
            }
        }
    }

    /// A frontend string that must be one of `allowed` (e.g. `protocol`); `None` if missing.
    pub fn frontend_choice<'a>(
        &self,
        key: &str,
        allowed: &[&'a str],
    ) -> Result<Option<&'a str>, DeviceError> {
        let Some(v) = self.read_frontend_raw(key)? else {
            return Ok(None);
        };
        allowed
            .iter()
            .find(|a| a.as_bytes() == v.as_slice())
            .copied()
            .map(Some)
            .ok_or_else(|| self.bad_frontend(key, &v, format!("expected one of {allowed:?}")))
    }

    /// The frontend's state: Unknown if the node is missing, an error if it holds garbage.
    pub fn frontend_state(&self) -> Result<XenbusState, DeviceError> {
        match self.read_frontend_raw("state")? {
            None => Ok(XenbusState::Unknown),
            Some(v) => {
                XenbusState::parse(&v).map_err(|e| self.bad_frontend("state", &v, e.to_string()))
            }
        }
    }

    /// The backend's state as stored (Unknown if missing or invalid).
    pub fn backend_state(&self) -> Result<XenbusState, DeviceError> {
        Ok(self
            .client()
            .try_read(&self.backend_key("state"))
            .map_err(|e| self.xs_err(e))?
            .and_then(|v| XenbusState::parse(&v).ok())
            .unwrap_or(XenbusState::Unknown))
    }

    /// Runs `f` in a transaction (retried on conflicts) after checking that the backend node
    /// still exists, so a removed device is never re-created by a late write.
    pub fn transaction<T, F>(&self, mut f: F) -> Result<T, DeviceError>
    where
        F: FnMut(&Transaction<'_>) -> Result<T, XsError>,
    {
        let r = self.client().transaction(|tx| {
            if !tx.exists(self.backend_path())? {
                return Ok(None);
            }
            f(tx).map(Some)
        });
        match r {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(self.gone()),
            Err(e) => Err(self.xs_err(e)),
        }
    }

    /// Writes backend keys in one transaction (e.g. the features advertised at probe).
    pub fn write_backend(&self, entries: &[(&str, &str)]) -> Result<(), DeviceError> {
        self.transaction(|tx| {
            for (k, v) in entries {
                tx.write(&self.backend_key(k), v.as_bytes())?;
            }
            Ok(())
        })
    }

    /// Writes `hotplug-status = connected`.
    pub fn hotplug_connected(&self) -> Result<(), DeviceError> {
        self.write_backend(&[("hotplug-status", "connected")])
    }

    /// Writes `hotplug-status = error` and the message to the `error` node.
    pub fn hotplug_failed(&self, message: &str) -> Result<(), DeviceError> {
        let msg = truncate(message, MAX_ERROR_NODE);
        self.write_backend(&[("hotplug-status", "error"), ("error", msg)])
    }

    /// Writes a message to the backend's `error` node, where the toolstack and `xl` look.
    pub fn report_error(&self, message: &str) -> Result<(), DeviceError> {
        self.write_backend(&[("error", truncate(message, MAX_ERROR_NODE))])
    }

    /// Reports a fatal error from any thread (typically a ring thread that found the frontend
    /// rogue: XSA-39's impossible `req_prod`). The watcher then disconnects the device,
    /// writes `reason` to the `error` node and moves the backend to Closing; the device is not
    /// connected again until the frontend restarts and it is probed afresh. Reports made
    /// while one is pending, or during [`Device::disconnect`], are dropped.
    pub fn fatal(&self, reason: &str) {
        {
            let mut f = self
                .inner
                .fatal
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if f.is_some() {
                return;
            }
            *f = Some(truncate(reason, MAX_ERROR_NODE).to_owned());
        }
        if let Some(q) = self.inner.wake.get() {
            let token: Arc<str> = Arc::from(format!("{FATAL_TOKEN_PREFIX}{}", self.inner.devid));
            let path: Arc<str> = Arc::from(self.inner.backend_path.as_str());
            q.push(&token, &path, &self.inner.backend_path);
        }
    }

    fn take_fatal(&self) -> Option<String> {
        self.inner
            .fatal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Writes the backend's `state` (in a transaction, only if the node still exists).
    pub(crate) fn switch_state(&self, state: XenbusState) -> Result<(), DeviceError> {
        self.write_backend(&[("state", state.as_str())])
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A snapshot of one device, for the control socket and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub devid: u32,
    /// The backend state we last wrote.
    pub state: XenbusState,
    /// The frontend state we last read (None if it was invalid or never read).
    pub frontend_state: Option<XenbusState>,
    /// Whether the device is connected (connect succeeded, no disconnect since).
    pub connected: bool,
    /// Probes so far (1 + reconnects).
    pub probes: u32,
}

/// A per-device budget for log lines a guest can trigger (THREATS §5, XSA-180): at most
/// [`LogBudget::PER_WINDOW`] lines per [`LogBudget::WINDOW`]; the number suppressed is
/// reported when the next window opens.
struct LogBudget {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    const PER_WINDOW: u32 = 32;
    const WINDOW: Duration = Duration::from_secs(10);

    fn new() -> LogBudget {
        LogBudget {
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Self::WINDOW {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "guest-triggered log lines were suppressed by the rate limit"
                );
            }
            self.window = now;
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < Self::PER_WINDOW {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Logs through a device's [`LogBudget`].
macro_rules! limited {
    ($budget:expr, $lvl:ident!($($arg:tt)*)) => {
        if $budget.allow() {
            $lvl!($($arg)*);
        }
    };
}

struct Dev {
    ctx: DeviceCtx,
    device: Option<Box<dyn Device>>,
    /// The backend state we last wrote.
    state: XenbusState,
    connected: bool,
    /// connect() was called since the last probe.
    attempted: bool,
    /// The frontend state node was seen with a valid value.
    frontend_seen: bool,
    /// After a failed probe: wait until the frontend closes and restarts.
    await_restart: bool,
    frontend_state: Option<XenbusState>,
    bad_state_count: u64,
    probes: u32,
    log: LogBudget,
    _frontend_watch: Option<WatchGuard>,
}

impl Dev {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            devid: self.ctx.devid(),
            state: self.state,
            frontend_state: self.frontend_state,
            connected: self.connected,
            probes: self.probes,
        }
    }
}

#[derive(Default)]
struct Published {
    devices: BTreeMap<u32, DeviceInfo>,
    /// Events handled so far.
    events: u64,
    /// The watcher thread has finished.
    finished: bool,
}

struct WatcherShared {
    published: Mutex<Published>,
    changed: Condvar,
    stopping: AtomicBool,
}

impl WatcherShared {
    fn lock(&self) -> MutexGuard<'_, Published> {
        // Only plain map updates happen under this lock.
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Serves one backend type for one frontend domain. Stop it with [`BackendWatcher::stop`]
/// (also done on drop): every device is disconnected and its backend state set to Closed.
pub struct BackendWatcher {
    shared: Arc<WatcherShared>,
    queue: EventQueue,
    thread: Option<JoinHandle<()>>,
    backend_dir: String,
    span: Span,
}

impl fmt::Debug for BackendWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendWatcher")
            .field("backend_dir", &self.backend_dir)
            .finish()
    }
}

const BACKEND_TOKEN: &str = "backend";
const FRONTEND_TOKEN_PREFIX: &str = "frontend:";
const FATAL_TOKEN_PREFIX: &str = "fatal:";

fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl BackendWatcher {
    /// Starts serving `driver`'s backend type for domain `domid`, as backend domain
    /// `own_domid`. Events are queued in a bounded queue of `queue_capacity` (see
    /// [`crate::watch`]).
    pub fn start(
        client: XsClient,
        driver: Arc<dyn BackendDriver>,
        own_domid: u32,
        domid: u32,
    ) -> Result<BackendWatcher, WatcherError> {
        Self::start_with_capacity(
            client,
            driver,
            own_domid,
            domid,
            crate::watch::DEFAULT_WATCH_QUEUE_CAPACITY,
        )
    }

    /// [`BackendWatcher::start`] with an explicit event-queue capacity.
    pub fn start_with_capacity(
        client: XsClient,
        driver: Arc<dyn BackendDriver>,
        own_domid: u32,
        domid: u32,
        queue_capacity: usize,
    ) -> Result<BackendWatcher, WatcherError> {
        let type_ = driver.backend_type().to_owned();
        for t in [driver.backend_type(), driver.frontend_type()] {
            if !valid_type(t) {
                return Err(WatcherError::BadType(t.to_owned()));
            }
        }
        let backend_dir = format!("/local/domain/{own_domid}/backend/{type_}/{domid}");
        let span = info_span!("xenbus_backend", domid, r#type = %type_);
        let queue = EventQueue::new(queue_capacity);
        let watch = client
            .watch_into(&backend_dir, BACKEND_TOKEN, &queue)
            .map_err(|source| WatcherError::Watch {
                domid,
                type_: type_.clone(),
                path: backend_dir.clone(),
                source: Box::new(source),
            })?;
        let shared = Arc::new(WatcherShared {
            published: Mutex::new(Published::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let mut engine = Engine {
            client,
            driver,
            own_domid,
            domid,
            backend_dir: backend_dir.clone(),
            queue: queue.clone(),
            devices: BTreeMap::new(),
            rejected: BTreeSet::new(),
            shared: Arc::clone(&shared),
            _backend_watch: Some(watch),
        };
        let thread_span = span.clone();
        let thread = std::thread::Builder::new()
            .name(format!("xenbus-{type_}-{domid}"))
            .spawn(move || {
                let _e = thread_span.enter();
                engine.run();
            })
            .map_err(|source| WatcherError::Spawn {
                domid,
                type_: type_.clone(),
                source,
            })?;
        Ok(BackendWatcher {
            shared,
            queue,
            thread: Some(thread),
            backend_dir,
            span,
        })
    }

    /// `/local/domain/<own>/backend/<type>/<domid>`.
    pub fn backend_dir(&self) -> &str {
        &self.backend_dir
    }

    /// A snapshot of the devices.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.shared.lock().devices.values().cloned().collect()
    }

    /// Events handled so far.
    pub fn events_handled(&self) -> u64 {
        self.shared.lock().events
    }

    /// The event queue's counters (to check that floods stay bounded).
    pub fn queue_stats(&self) -> crate::watch::QueueStats {
        self.queue.stats()
    }

    /// Waits until `pred` holds for the device snapshot, or `timeout` passes; returns whether
    /// it held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[DeviceInfo]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.lock();
        loop {
            let snap: Vec<DeviceInfo> = p.devices.values().cloned().collect();
            if pred(&snap) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || p.finished {
                return false;
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Whether the watcher thread has ended (stopped, or its connection died).
    pub fn is_finished(&self) -> bool {
        self.shared.lock().finished
    }

    /// Stops: disconnects every device, sets each backend state to Closed, and waits for the
    /// watcher thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.queue.close("watcher stopped");
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                let _e = self.span.enter();
                error!("backend watcher thread panicked");
            }
        }
    }
}

impl Drop for BackendWatcher {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

struct Engine {
    client: XsClient,
    driver: Arc<dyn BackendDriver>,
    own_domid: u32,
    domid: u32,
    backend_dir: String,
    queue: EventQueue,
    devices: BTreeMap<u32, Dev>,
    /// Devices whose toolstack nodes were refused; retried only after their node goes away.
    rejected: BTreeSet<u32>,
    shared: Arc<WatcherShared>,
    _backend_watch: Option<WatchGuard>,
}

/// Most devices of one type per domain that we will track (toolstack data, but bounded).
const MAX_DEVICES: usize = 4096;

impl Engine {
    fn run(&mut self) {
        info!(dir = %self.backend_dir, "backend watcher started");
        self.rescan();
        self.publish();
        while !self.shared.stopping.load(Ordering::SeqCst) {
            let Some(ev) = self.queue.recv() else { break };
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            self.handle(ev);
            self.shared.lock().events += 1;
            self.publish();
        }
        if let Some(reason) = self.client.dead_reason() {
            error!(reason, "xenstore connection lost; shutting devices down");
        }
        self.shutdown();
        self._backend_watch = None;
        let mut p = self.shared.lock();
        p.devices.clear();
        p.finished = true;
        drop(p);
        self.shared.changed.notify_all();
        info!("backend watcher stopped");
    }

    fn publish(&self) {
        let mut p = self.shared.lock();
        p.devices = self.devices.iter().map(|(k, d)| (*k, d.info())).collect();
        drop(p);
        self.shared.changed.notify_all();
    }

    fn handle(&mut self, ev: WatchEvent) {
        if ev.token == BACKEND_TOKEN {
            if ev.overflowed {
                debug!("backend event queue overflowed; rescanning");
                self.rescan();
                return;
            }
            let rel = ev
                .path
                .strip_prefix(self.backend_dir.as_str())
                .map(|r| r.strip_prefix('/').unwrap_or(r));
            match rel {
                Some("") => self.rescan(),
                Some(rel) => {
                    let first = rel.split('/').next().unwrap_or("");
                    match strict_u32(first.as_bytes()) {
                        Some(devid) => self.reconcile(devid),
                        None => {
                            debug!(path = %escape_for_log(ev.path.as_bytes(), 128), "ignoring event for a non-device node")
                        }
                    }
                }
                None => {
                    debug!(path = %escape_for_log(ev.path.as_bytes(), 128), "event outside the backend directory")
                }
            }
        } else if let Some(devid) = ev
            .token
            .strip_prefix(FRONTEND_TOKEN_PREFIX)
            .or_else(|| ev.token.strip_prefix(FATAL_TOKEN_PREFIX))
        {
            match strict_u32(devid.as_bytes()) {
                Some(devid) => self.reconcile(devid),
                None => debug!(token = %ev.token, "event with an unknown token"),
            }
        }
    }

    fn rescan(&mut self) {
        let mut ids: BTreeSet<u32> = self.devices.keys().copied().collect();
        match self.client.directory(&self.backend_dir) {
            Ok(names) => {
                for n in names {
                    match strict_u32(n.as_bytes()) {
                        Some(id) if ids.len() < MAX_DEVICES + self.devices.len() => {
                            ids.insert(id);
                        }
                        Some(_) => {
                            warn!(
                                "too many devices under the backend directory; ignoring the rest"
                            );
                            break;
                        }
                        None => {
                            debug!(name = %escape_for_log(n.as_bytes(), 64), "ignoring a non-numeric backend entry")
                        }
                    }
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                warn!(error = %e, "listing the backend directory failed");
                return;
            }
        }
        self.rejected.retain(|id| ids.contains(id));
        for id in ids {
            self.reconcile(id);
        }
    }

    fn reconcile(&mut self, devid: u32) {
        let span = match self.devices.get(&devid) {
            Some(d) => d.ctx.span().clone(),
            None => {
                info_span!("xenbus_device", domid = self.domid, r#type = %self.driver.backend_type(), devid)
            }
        };
        let _e = span.enter();
        let bpath = format!("{}/{devid}", self.backend_dir);
        let present = match self.client.exists(&bpath) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "reading the backend node failed");
                return;
            }
        };
        if !present {
            self.rejected.remove(&devid);
            if let Some(dev) = self.devices.remove(&devid) {
                info!("backend node removed; dropping the device");
                self.teardown(dev, false);
            }
            return;
        }
        if !self.devices.contains_key(&devid) {
            if self.rejected.contains(&devid) || self.devices.len() >= MAX_DEVICES {
                return;
            }
            // Adopt only nodes the toolstack has set up for a new device (state
            // Initialising), as Linux's xenbus_probe_node does; a device we closed and
            // dropped is not picked up again until the toolstack re-creates it.
            match self.client.try_read(&format!("{bpath}/state")) {
                Ok(Some(v)) if v.as_slice() == b"1" => {}
                Ok(_) => return,
                Err(e) => {
                    warn!(error = %e, "reading the backend state failed");
                    return;
                }
            }
            let ctx = self.ctx(devid);
            match self.driver.claims(&ctx) {
                Ok(true) => {}
                Ok(false) => {
                    info!("not ours to serve; leaving it alone");
                    self.rejected.insert(devid);
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "cannot tell whether the device is ours; leaving it alone");
                    self.rejected.insert(devid);
                    return;
                }
            }
            match self.create(devid) {
                Ok(dev) => {
                    self.devices.insert(devid, dev);
                }
                Err(e) => {
                    error!(error = %e, "refusing the device");
                    self.rejected.insert(devid);
                    let ctx = self.ctx(devid);
                    // Best effort: the node may be gone already.
                    let _ = ctx.report_error(&e.to_string());
                    let _ = ctx.switch_state(XenbusState::Closed);
                    return;
                }
            }
        }
        self.step(devid);
    }

    fn ctx(&self, devid: u32) -> DeviceCtx {
        DeviceCtx::new(
            self.client.clone(),
            self.driver.backend_type(),
            self.driver.frontend_type(),
            self.own_domid,
            self.domid,
            devid,
        )
    }

    /// Validates the toolstack's nodes, watches the frontend state and probes.
    fn create(&mut self, devid: u32) -> Result<Dev, DeviceError> {
        let ctx = self.ctx(devid);
        let fid = ctx.read_backend("frontend-id")?.unwrap_or_default();
        if strict_u32(fid.as_bytes()) != Some(self.domid) {
            return Err(ctx.bad_backend(
                "frontend-id",
                fid.as_bytes(),
                &format!("expected {}", self.domid),
            ));
        }
        let fpath = ctx.read_backend("frontend")?.unwrap_or_default();
        if fpath != ctx.frontend_path() {
            return Err(ctx.bad_backend(
                "frontend",
                fpath.as_bytes(),
                &format!("expected {}", ctx.frontend_path()),
            ));
        }
        let watch = self
            .client
            .watch_into(
                &ctx.frontend_key("state"),
                &format!("{FRONTEND_TOKEN_PREFIX}{devid}"),
                &self.queue,
            )
            .map_err(|e| ctx.xs_err(e))?;
        info!(frontend = %ctx.frontend_path(), "new device");
        // Set once, just after the context was made, so it cannot be set already.
        let _ = ctx.inner.wake.set(self.queue.clone());
        let mut dev = Dev {
            ctx,
            device: None,
            state: XenbusState::Initialising,
            connected: false,
            attempted: false,
            frontend_seen: false,
            await_restart: false,
            frontend_state: None,
            bad_state_count: 0,
            probes: 0,
            log: LogBudget::new(),
            _frontend_watch: Some(watch),
        };
        self.probe(&mut dev, false);
        Ok(dev)
    }

    /// Probes the device and offers InitWait. `answering`: the probe answers a frontend
    /// state that a step read (a restart), and the frontend may have given up (Closing,
    /// Closed) during the probe, which can take a while: then InitWait would be a stale
    /// answer that a driver coming back next takes as its own, before the step for the close
    /// moves the backend to Closed under it. The state is left for that step.
    fn probe(&self, dev: &mut Dev, answering: bool) {
        dev.attempted = false;
        dev.device = None;
        // A report about the previous connection is moot now.
        let _ = dev.ctx.take_fatal();
        dev.probes += 1;
        match self.driver.probe(&dev.ctx) {
            Ok(mut device) => {
                match device.hotplug(&dev.ctx) {
                    Hotplug::Connected => {
                        if let Err(e) = dev.ctx.hotplug_connected() {
                            warn!(error = %e, "writing hotplug-status failed");
                        }
                    }
                    Hotplug::Deferred => debug!("hotplug deferred by the driver"),
                    Hotplug::Failed(msg) => {
                        limited!(dev.log, error!(error = %msg, "hotplug failed"));
                        let _ = dev.ctx.hotplug_failed(&msg);
                        dev.await_restart = true;
                        set_state(dev, XenbusState::Closed);
                        return;
                    }
                }
                dev.device = Some(device);
                if answering {
                    if let Ok(now @ (XenbusState::Closing | XenbusState::Closed)) =
                        dev.ctx.frontend_state()
                    {
                        debug!(frontend = %now, "frontend gave up during the probe; no InitWait");
                        return;
                    }
                }
                limited!(
                    dev.log,
                    info!(probe = dev.probes, "probed; waiting for the frontend")
                );
                set_state(dev, XenbusState::InitWait);
            }
            Err(e) => {
                limited!(dev.log, error!(error = %e, "probe failed"));
                let _ = dev.ctx.report_error(&format!("probe failed: {e}"));
                dev.await_restart = true;
                set_state(dev, XenbusState::Closed);
            }
        }
    }

    fn online(&self, dev: &Dev) -> bool {
        // Linux's xenbus_dev_is_online: a missing node means offline.
        match dev.ctx.read_backend("online") {
            Ok(Some(v)) => match strict_u32(v.as_bytes()) {
                Some(n) => n != 0,
                None => {
                    warn!(value = %escape_for_log(v.as_bytes(), 16), "invalid online value; treating as 0");
                    false
                }
            },
            Ok(None) => false,
            Err(e) => {
                warn!(error = %e, "reading online failed; treating as 1");
                true
            }
        }
    }

    fn step(&mut self, devid: u32) {
        let Some(mut dev) = self.devices.remove(&devid) else {
            return;
        };
        let keep = self.step_dev(&mut dev);
        if keep {
            self.devices.insert(devid, dev);
        } else {
            self.teardown(dev, true);
        }
    }

    /// One level-triggered step; returns false when the device is to be removed.
    fn step_dev(&self, dev: &mut Dev) -> bool {
        if let Some(reason) = dev.ctx.take_fatal() {
            if dev.connected {
                limited!(
                    dev.log,
                    error!(reason, "driver reported a fatal error; closing")
                );
                self.disconnect(dev);
                dev.attempted = true;
                if let Err(e) = dev.ctx.report_error(&reason) {
                    debug!(error = %e, "writing the error node failed");
                }
                if !matches!(dev.state, XenbusState::Closing | XenbusState::Closed) {
                    set_state(dev, XenbusState::Closing);
                }
            }
        }
        let fe = match dev.ctx.frontend_state() {
            Ok(s) => s,
            Err(e) => {
                dev.bad_state_count += 1;
                dev.frontend_state = None;
                // XSA-180: a guest must not be able to flood our log.
                limited!(
                    dev.log,
                    warn!(error = %e, count = dev.bad_state_count, "ignoring an invalid frontend state")
                );
                return true;
            }
        };
        dev.frontend_state = Some(fe);
        // The frontend closing ends the wait after a failed probe, even if Closing or Closed is
        // the first state we ever read (the guest may close before the watcher first looks);
        // a missing node counts only once the frontend has been seen.
        if matches!(fe, XenbusState::Closing | XenbusState::Closed)
            || (fe == XenbusState::Unknown && dev.frontend_seen)
        {
            dev.await_restart = false;
        }
        if fe != XenbusState::Unknown {
            dev.frontend_seen = true;
        }
        debug!(frontend = %fe, backend = %dev.state, "step");
        match fe {
            XenbusState::Unknown => {
                if dev.frontend_seen {
                    limited!(
                        dev.log,
                        info!("frontend state node vanished; closing the device")
                    );
                    self.disconnect(dev);
                    set_state(dev, XenbusState::Closed);
                    return false;
                }
            }
            XenbusState::Initialising => {
                let restarted = dev.attempted
                    || matches!(
                        dev.state,
                        XenbusState::Closing
                            | XenbusState::Closed
                            | XenbusState::Connected
                            | XenbusState::Reconfiguring
                            | XenbusState::Reconfigured
                    );
                if restarted && !dev.await_restart {
                    limited!(
                        dev.log,
                        info!(backend = %dev.state, "frontend restarted; probing again")
                    );
                    self.disconnect(dev);
                    self.probe(dev, true);
                }
            }
            XenbusState::InitWait => {}
            XenbusState::Initialised => {
                if self.driver.connect_on_initialised()
                    && self.restart_without_initialising(dev, fe)
                {
                    self.connect(dev);
                }
            }
            XenbusState::Connected => {
                if dev.state == XenbusState::Reconfigured && dev.connected {
                    set_state(dev, XenbusState::Connected);
                } else if self.restart_without_initialising(dev, fe) {
                    self.connect(dev);
                }
            }
            XenbusState::Closing => {
                self.disconnect(dev);
                if !matches!(dev.state, XenbusState::Closing | XenbusState::Closed) {
                    set_state(dev, XenbusState::Closing);
                }
            }
            XenbusState::Closed => {
                self.disconnect(dev);
                set_state(dev, XenbusState::Closed);
                if !self.online(dev) {
                    limited!(
                        dev.log,
                        info!("frontend closed and the device is offline; removing it")
                    );
                    return false;
                }
            }
            XenbusState::Reconfiguring => {
                if dev.connected && dev.state == XenbusState::Connected {
                    self.reconfigure(dev, fe, XenbusState::Reconfigured);
                }
            }
            XenbusState::Reconfigured => {
                if dev.connected && dev.state == XenbusState::Reconfigured {
                    self.reconfigure(dev, fe, XenbusState::Connected);
                }
            }
        }
        true
    }

    /// A frontend that comes back after a close may skip Initialising: Linux's blkfront,
    /// unbound and bound again, goes from Closed straight to Initialised with a new ring.
    /// Linux's blkback connects in that case (frontend_changed: Initialised or Connected while
    /// not Connected), and so do we, after a fresh probe: never a connect on a stale probe.
    ///
    /// Returns whether to go on and connect. After such a probe the frontend state is read
    /// again: the state this step acted on may be stale (read before the probe, which can
    /// take a while), and a driver that came back meanwhile (Initialising) would take the
    /// probe's InitWait as its answer and write new ring keys while we connected to the old
    /// ones. Its own state change brings another step.
    fn restart_without_initialising(&self, dev: &mut Dev, fe: XenbusState) -> bool {
        // Closed and not serving: after a session, or after a probe whose InitWait was
        // withheld (the frontend gave up during it) or that the frontend closed on before
        // connecting. Connecting needs InitWait from a fresh probe.
        let closed_after_a_session = dev.state == XenbusState::Closed && !dev.connected;
        if !closed_after_a_session || dev.await_restart {
            return true;
        }
        limited!(
            dev.log,
            info!(frontend = %fe, "frontend came back without Initialising; probing again")
        );
        self.probe(dev, true);
        match dev.ctx.frontend_state() {
            Ok(now) if now == fe => true,
            Ok(now) => {
                debug!(was = %fe, now = %now, "frontend moved on during the probe; not connecting");
                false
            }
            Err(_) => false,
        }
    }

    fn connect(&self, dev: &mut Dev) {
        if dev.state != XenbusState::InitWait || dev.attempted || dev.connected {
            return;
        }
        let Some(device) = dev.device.as_mut() else {
            return;
        };
        dev.attempted = true;
        let t0 = Instant::now();
        let r = device.connect(&dev.ctx);
        let took = t0.elapsed();
        if took > Duration::from_secs(1) {
            limited!(dev.log, warn!(?took, "connect blocked the watcher"));
        }
        match r {
            Ok(()) => {
                dev.connected = true;
                limited!(dev.log, info!("connected"));
                set_state(dev, XenbusState::Connected);
            }
            Err(e) => {
                limited!(dev.log, error!(error = %e, "connect failed"));
                device.disconnect(&dev.ctx);
                if let Err(we) = dev.ctx.report_error(&format!("connect failed: {e}")) {
                    debug!(error = %we, "writing the error node failed");
                }
                set_state(dev, XenbusState::Closing);
            }
        }
    }

    fn disconnect(&self, dev: &mut Dev) {
        if !dev.connected {
            return;
        }
        dev.connected = false;
        if let Some(device) = dev.device.as_mut() {
            device.disconnect(&dev.ctx);
            limited!(dev.log, info!("disconnected"));
        }
        // Ring threads stopping may have reported errors: they are moot now.
        let _ = dev.ctx.take_fatal();
    }

    fn reconfigure(&self, dev: &mut Dev, fe: XenbusState, next: XenbusState) {
        let Some(device) = dev.device.as_mut() else {
            return;
        };
        match device.reconfigure(&dev.ctx, fe) {
            Ok(()) => set_state(dev, next),
            Err(e) => {
                limited!(
                    dev.log,
                    error!(error = %e, "reconfiguration failed; closing")
                );
                let _ = dev.ctx.report_error(&format!("reconfigure failed: {e}"));
                self.disconnect(dev);
                set_state(dev, XenbusState::Closing);
            }
        }
    }

    /// Drops a device: disconnects it and removes its frontend watch. With `close`, the
    /// backend state is set to Closed if the node still exists.
    fn teardown(&self, mut dev: Dev, close: bool) {
        self.disconnect(&mut dev);
        if close {
            set_state(&mut dev, XenbusState::Closed);
        }
        dev.device = None;
        dev._frontend_watch = None;
        info!("device removed");
    }

    fn shutdown(&mut self) {
        let devs = std::mem::take(&mut self.devices);
        for (_, dev) in devs {
            let span = dev.ctx.span().clone();
            let _e = span.enter();
            self.teardown(dev, true);
        }
    }
}

fn set_state(dev: &mut Dev, state: XenbusState) {
    if dev.state == state {
        return;
    }
    debug!(from = %dev.state, to = %state, "backend state");
    dev.state = state;
    match dev.ctx.switch_state(state) {
        Ok(()) => {}
        Err(e @ DeviceError::Gone { .. }) => {
            debug!(error = %e, "backend node gone; state not written")
        }
        Err(e) => warn!(error = %e, "writing the backend state failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_public_handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<BackendWatcher>();
        send_sync::<DeviceCtx>();
        send_sync::<XsClient>();
        send_sync::<EventQueue>();
    }

    #[test]
    fn test_valid_type_rejects_path_characters() {
        assert!(valid_type("vbd"));
        assert!(valid_type("qdisk"));
        assert!(!valid_type(""));
        assert!(!valid_type("../x"));
        assert!(!valid_type("a/b"));
        assert!(!valid_type("VBD"));
    }

    #[test]
    fn test_log_budget_flood_is_cut_after_the_window_allowance() {
        let mut b = LogBudget::new();
        let allowed = (0..10_000).filter(|_| b.allow()).count();
        assert_eq!(allowed, LogBudget::PER_WINDOW as usize);
        assert_eq!(b.suppressed, 10_000 - u64::from(LogBudget::PER_WINDOW));
    }

    #[test]
    fn test_truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}

//! Helpers for the integration tests against xensim's xenstored: a simulated host with a
//! dom0 client, guests, a toolstack that writes device nodes the way libxl does, and a
//! driver that records every call the lifecycle makes.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use xenbus::wire::{Perm, PermKind};
use xenbus::{
    BackendDriver, Device, DeviceCtx, DriverError, Hotplug, XenbusState, XsClient, XsError, XsOps,
};
use xensim::xenstored::{Quotas, Xenstored};

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(20);

/// A xenstored with a dom0 client connected through its listening socket.
pub struct Sim {
    pub xs: Arc<Xenstored>,
    pub dom0: XsClient,
    // Dropped in this order: the listener needs its socket file to wake its accept loop.
    _listener: xensim::xenstored::Listener,
    _dir: tempfile::TempDir,
}

impl Sim {
    pub fn new() -> Sim {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let xs = Xenstored::new(Quotas::default());
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xenstored.sock");
        let listener = xs.listen(&sock).unwrap();
        let dom0 = XsClient::from_unix(UnixStream::connect(&sock).unwrap(), "sim dom0").unwrap();
        Sim {
            xs,
            dom0,
            _listener: listener,
            _dir: dir,
        }
    }

    /// Introduces a guest, sets up its home as libxl does, and returns its connection.
    pub fn guest(&self, domid: u16) -> XsClient {
        assert!(self.xs.introduce_domain(domid));
        let home = format!("/local/domain/{domid}");
        let d = u32::from(domid);
        let ro = [perm(PermKind::None, 0), perm(PermKind::Read, d)];
        self.dom0.mkdir(&home).unwrap();
        self.dom0.set_perms(&home, &ro).unwrap();
        self.dom0.mkdir(&format!("{home}/device")).unwrap();
        self.dom0.set_perms(&format!("{home}/device"), &ro).unwrap();
        XsClient::from_unix(
            self.xs.connect_as(domid).unwrap(),
            &format!("sim dom{domid}"),
        )
        .unwrap()
    }

    /// Adds a block device the way libxl does (one transaction; backend nodes owned by
    /// dom0 and readable by the guest, frontend nodes owned by the guest and readable by
    /// dom0; both `state` = 1).
    pub fn add_disk(&self, be_type: &str, domid: u32, devid: u32) {
        self.add_disk_with(be_type, domid, devid, |_, _| Ok(()));
    }

    /// [`Sim::add_disk`] with a hook to change nodes inside the same transaction.
    pub fn add_disk_with(
        &self,
        be_type: &str,
        domid: u32,
        devid: u32,
        hook: impl Fn(&xenbus::Transaction<'_>, &str) -> Result<(), XsError>,
    ) {
        let be = backend_path(be_type, domid, devid);
        let fe = frontend_path(domid, devid);
        self.dom0
            .transaction(|tx| -> Result<(), XsError> {
                for dir in [
                    format!("/local/domain/0/backend/{be_type}"),
                    format!("/local/domain/0/backend/{be_type}/{domid}"),
                ] {
                    tx.mkdir(&dir)?;
                    tx.set_perms(&dir, &[perm(PermKind::None, 0)])?;
                }
                tx.mkdir(&fe)?;
                tx.set_perms(&fe, &[perm(PermKind::None, domid), perm(PermKind::Read, 0)])?;
                for (k, v) in [
                    ("backend", be.as_str()),
                    ("backend-id", "0"),
                    ("state", "1"),
                    ("virtual-device", &devid.to_string()),
                    ("device-type", "disk"),
                ] {
                    tx.write(&format!("{fe}/{k}"), v.as_bytes())?;
                }
                tx.mkdir(&be)?;
                tx.set_perms(&be, &[perm(PermKind::None, 0), perm(PermKind::Read, domid)])?;
                for (k, v) in [
                    ("frontend", fe.as_str()),
                    ("params", "/root/disk.img"),
                    ("frontend-id", &domid.to_string()),
                    ("online", "1"),
                    ("removable", "0"),
                    ("bootable", "1"),
                    ("dev", "xvda"),
                    ("type", "phy"),
                    ("mode", "w"),
                    ("device-type", "disk"),
                    ("state", "1"),
                ] {
                    tx.write(&format!("{be}/{k}"), v.as_bytes())?;
                }
                hook(tx, &be)
            })
            .unwrap();
    }
}

pub fn perm(kind: PermKind, domid: u32) -> Perm {
    Perm { kind, domid }
}

pub fn backend_path(be_type: &str, domid: u32, devid: u32) -> String {
    format!("/local/domain/0/backend/{be_type}/{domid}/{devid}")
}

pub fn frontend_path(domid: u32, devid: u32) -> String {
    format!("/local/domain/{domid}/device/vbd/{devid}")
}

/// Waits (on a watch, never sleeping) until `pred` holds for the node's value; returns it.
pub fn wait_node(
    client: &XsClient,
    path: &str,
    what: &str,
    pred: impl Fn(Option<&[u8]>) -> bool,
) -> Option<Vec<u8>> {
    let w = client.watch(path, "wait").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let v = client.try_read(path).unwrap();
        if pred(v.as_deref()) {
            return v;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if w.recv_timeout(left).is_err() {
            panic!(
                "timed out waiting for {path} to be {what}; it is {:?}",
                v.map(|v| String::from_utf8_lossy(&v).into_owned())
            );
        }
    }
}

/// Waits until a node holds exactly `value`.
pub fn wait_value(client: &XsClient, path: &str, value: &str) {
    wait_node(client, path, value, |v| v == Some(value.as_bytes()));
}

/// Waits until a backend's state is `state`.
pub fn wait_state(client: &XsClient, be: &str, state: XenbusState) {
    wait_value(client, &format!("{be}/state"), state.as_str());
}

/// What the lifecycle asked of the test driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Probe(u32),
    Connect(u32, bool),
    Disconnect(u32),
    Reconfigure(u32, XenbusState),
    Drop(u32),
}

#[derive(Default)]
pub struct Log {
    calls: Mutex<Vec<Call>>,
    cond: Condvar,
}

impl Log {
    fn push(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
        self.cond.notify_all();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self, c: &Call) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|x| *x == c)
            .count()
    }

    /// Waits until `pred` holds for the calls so far.
    pub fn wait(&self, what: &str, pred: impl Fn(&[Call]) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut g = self.calls.lock().unwrap();
        while !pred(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; calls: {g:?}"
            );
            g = self.cond.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Checks the lifecycle's promises for each device: connect only once per probe,
    /// disconnect only after a connect, a fresh probe only after the previous connection is
    /// undone, every probed device dropped at the end when `finished`.
    pub fn check_invariants(&self, finished: bool) {
        use std::collections::BTreeMap;
        #[derive(Default)]
        struct D {
            live: usize,
            probed: bool,
            connect_tried: bool,
            connected: bool,
        }
        let mut devs: BTreeMap<u32, D> = BTreeMap::new();
        for (i, c) in self.calls().iter().enumerate() {
            let ctx = || format!("call #{i} {c:?} in {:?}", self.calls());
            match c {
                Call::Probe(d) => {
                    let e = devs.entry(*d).or_default();
                    assert!(!e.connected, "probe while connected: {}", ctx());
                    e.live += 1;
                    e.probed = true;
                    e.connect_tried = false;
                }
                Call::Connect(d, ok) => {
                    let e = devs.entry(*d).or_default();
                    assert!(e.probed, "connect without probe: {}", ctx());
                    assert!(!e.connect_tried, "second connect for one probe: {}", ctx());
                    e.connect_tried = true;
                    e.connected = *ok;
                }
                Call::Disconnect(d) => {
                    let e = devs.entry(*d).or_default();
                    assert!(e.connect_tried, "disconnect without connect: {}", ctx());
                    e.connected = false;
                }
                Call::Reconfigure(d, _) => {
                    let e = devs.entry(*d).or_default();
                    assert!(e.connected, "reconfigure while not connected: {}", ctx());
                }
                Call::Drop(d) => {
                    let e = devs.entry(*d).or_default();
                    assert!(!e.connected, "dropped while connected: {}", ctx());
                    assert!(e.live > 0, "drop without probe: {}", ctx());
                    e.live -= 1;
                }
            }
        }
        if finished {
            for (d, e) in devs {
                assert_eq!(e.live, 0, "device {d} leaked: {:?}", self.calls());
                assert!(!e.connected, "device {d} still connected");
            }
        }
    }
}

/// A driver that records calls. Its devices read `ring-ref` (1..=2^20), `event-channel`
/// (1..=4095) and `protocol` strictly at connect, as blkback would.
pub struct RecDriver {
    pub log: Arc<Log>,
    pub be_type: String,
    pub fail_probe: std::sync::atomic::AtomicBool,
    pub hotplug: Mutex<Hotplug>,
    /// The context of the last probed device (to report fatal errors as a ring would).
    pub last_ctx: Mutex<Option<DeviceCtx>>,
    /// Runs once, inside the next probe (what the guest does while a slow probe runs).
    pub during_probe: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The `ring-ref` each successful connect read.
    pub rings: Arc<Mutex<Vec<u32>>>,
}

impl RecDriver {
    pub fn new(be_type: &str) -> Arc<RecDriver> {
        Arc::new(RecDriver {
            log: Arc::new(Log::default()),
            be_type: be_type.to_owned(),
            fail_probe: Default::default(),
            hotplug: Mutex::new(Hotplug::Connected),
            last_ctx: Mutex::new(None),
            during_probe: Mutex::new(None),
            rings: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

impl BackendDriver for RecDriver {
    fn backend_type(&self) -> &str {
        &self.be_type
    }
    fn frontend_type(&self) -> &str {
        "vbd"
    }
    fn probe(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DriverError> {
        if self.fail_probe.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DriverError::Failed("cannot open /root/disk.img".into()));
        }
        let params = ctx.read_backend("params")?.unwrap_or_default();
        if params.is_empty() {
            return Err(DriverError::Failed("no params".into()));
        }
        ctx.write_backend(&[
            ("feature-flush-cache", "1"),
            ("max-ring-page-order", "4"),
            ("sectors", "32768"),
        ])?;
        self.log.push(Call::Probe(ctx.devid()));
        *self.last_ctx.lock().unwrap() = Some(ctx.clone());
        if let Some(f) = self.during_probe.lock().unwrap().take() {
            f();
        }
        Ok(Box::new(RecDevice {
            log: Arc::clone(&self.log),
            devid: ctx.devid(),
            hotplug: self.hotplug.lock().unwrap().clone(),
            rings: Arc::clone(&self.rings),
        }))
    }
}

pub struct RecDevice {
    log: Arc<Log>,
    devid: u32,
    hotplug: Hotplug,
    rings: Arc<Mutex<Vec<u32>>>,
}

impl Device for RecDevice {
    fn hotplug(&mut self, _ctx: &DeviceCtx) -> Hotplug {
        self.hotplug.clone()
    }
    fn connect(&mut self, ctx: &DeviceCtx) -> Result<(), DriverError> {
        let r = (|| -> Result<(), DriverError> {
            let ring = ctx.frontend_required_u32("ring-ref", 1..=(1 << 20))?;
            ctx.frontend_required_u32("event-channel", 1..=4095)?;
            ctx.frontend_choice("protocol", &["x86_64-abi", "x86_32-abi", "arm-abi"])?;
            self.rings.lock().unwrap().push(ring);
            Ok(())
        })();
        self.log.push(Call::Connect(self.devid, r.is_ok()));
        r
    }
    fn disconnect(&mut self, _ctx: &DeviceCtx) {
        self.log.push(Call::Disconnect(self.devid));
    }
    fn reconfigure(&mut self, _ctx: &DeviceCtx, fe: XenbusState) -> Result<(), DriverError> {
        self.log.push(Call::Reconfigure(self.devid, fe));
        Ok(())
    }
}

impl Drop for RecDevice {
    fn drop(&mut self) {
        self.log.push(Call::Drop(self.devid));
    }
}

/// The guest's side of blkfront's connect: ring details, then `state`.
pub fn frontend_publish(guest: &XsClient, domid: u32, devid: u32, ring_ref: &str) {
    let fe = frontend_path(domid, devid);
    guest
        .transaction(|tx| -> Result<(), XsError> {
            tx.write(&format!("{fe}/ring-ref"), ring_ref.as_bytes())?;
            tx.write(&format!("{fe}/event-channel"), b"8")?;
            tx.write(&format!("{fe}/protocol"), b"x86_64-abi")?;
            tx.write(&format!("{fe}/state"), b"3")
        })
        .unwrap();
}

pub fn fe_state(guest: &XsClient, domid: u32, devid: u32, state: &[u8]) {
    guest
        .write(&format!("{}/state", frontend_path(domid, devid)), state)
        .unwrap();
}

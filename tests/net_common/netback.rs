//! domio's netback serving a simulated guest on a real tap: the rig of the end-to-end tests
//! and of `domio bench net`.
//!
//! A xensim host and its daemon socket, a guest domain with the toolstack's vif (on `bridge`,
//! if any), domio's netback (`NetDriver` with the real tap engine behind a `BackendWatcher`,
//! attached through the daemon's socket as `domio serve --xen sim:PATH` attaches), and the
//! guest's netfront, connected.

use std::sync::Arc;

use backends::net::tap::tap_engine_factory;
use backends::net::{NetDriver, NetStats};
use xen::XenHost;
use xenbus::backend::BackendWatcher;
use xenbus::XsClient;
use xensim::client::SimHost;
use xensim::front::net::{NetFront, NetFrontOptions, NetQueue};
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::{DeviceSpec, VifNic};

use super::GUEST_MAC;

/// A simulated host and guest with one vif on the LAN's bridge, served by domio's netback on
/// a real tap, and the guest's netfront connected.
pub struct NetbackRig {
    /// The connected netfront.
    pub front: NetFront,
    driver: Arc<NetDriver>,
    _watcher: BackendWatcher,
    _guest: Guest,
    _server: Server,
    _host: Arc<Host>,
    _dir: SockDir,
}

/// A private directory for the daemon's socket, removed on drop.
struct SockDir(std::path::PathBuf);

impl SockDir {
    fn new() -> SockDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("domio-net-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).expect("socket directory");
        SockDir(d)
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The rig with the vif on `bridge` (none: the tap stands alone) and `rate`.
pub fn netback_rig(
    bridge: Option<&str>,
    rate: Option<(u64, u32)>,
    opts: NetFrontOptions,
) -> NetbackRig {
    let dir = SockDir::new();
    let host = Host::new().expect("xensim host");
    let server = Server::start(host.clone(), &dir.0.join("xensim.sock")).expect("server");
    let domid = host.create_domain("netguest", 16384).expect("domain");
    let ts = host.toolstack().expect("toolstack");
    let nic = VifNic {
        mac: GUEST_MAC,
        bridge: bridge.map(str::to_string),
        rate,
        ..VifNic::default()
    };
    ts.add_device(&DeviceSpec::vif(domid, 0, &nic))
        .expect("vif spec");
    let sim: Arc<dyn XenHost> = Arc::new(SimHost::connect(server.path(), 0).expect("attach"));
    let xs = XsClient::new(
        sim.open_xenstore(&xen::XsTransport::Socket(None))
            .expect("xenstore"),
    )
    .expect("xs client");
    let driver = NetDriver::new(
        sim,
        "vif",
        backends::net::NetConfig::default(),
        tap_engine_factory(),
    );
    let watcher = BackendWatcher::start(xs, driver.clone(), 0, u32::from(domid)).expect("watcher");
    let guest = Guest::new(host.clone(), domid).expect("guest");
    let front = NetFront::connect(&guest, 0, opts).expect("netfront connects to domio's netback");
    NetbackRig {
        front,
        driver,
        _watcher: watcher,
        _guest: guest,
        _server: server,
        _host: host,
        _dir: dir,
    }
}

impl NetbackRig {
    /// netback's counters of the vif.
    pub fn stats(&self) -> NetStats {
        self.driver
            .stats()
            .into_iter()
            .map(|(_, s)| s)
            .next()
            .unwrap_or_default()
    }

    /// Takes the first netfront queue.
    pub fn queue(&mut self) -> NetQueue {
        self.front.take_queues().remove(0)
    }
}

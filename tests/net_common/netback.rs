//! domio's netback serving a simulated guest on a real tap: the rig of the end-to-end tests
//! and of `domio bench net`.
//!
//! A xensim host and its daemon socket, a guest domain with the toolstack's vif (on `bridge`,
//! if any), domio's netback (`NetDriver` with the real tap engine behind a `BackendWatcher`,
//! attached through the daemon's socket as `domio serve --xen sim:PATH` attaches), and the
//! guest's netfront, connected.

use std::sync::Arc;
use std::time::Duration;

use backends::net::tap::tap_engine_factory;
use backends::net::{NetDriver, NetStats};
use xen::XenHost;
use xenbus::backend::BackendWatcher;
use xenbus::XsClient;
use xensim::client::SimHost;
use xensim::front::frame::{FrameDevice, FrameMeta};
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
    netback_rig_with(bridge, rate, opts, backends::net::NetConfig::default())
}

/// [`netback_rig`] with netback's settings.
pub fn netback_rig_with(
    bridge: Option<&str>,
    rate: Option<(u64, u32)>,
    opts: NetFrontOptions,
    config: backends::net::NetConfig,
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
    let driver = NetDriver::new(sim, "vif", config, tap_engine_factory());
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

    /// The simulated host (its xenstored, to read what netback wrote).
    pub fn host(&self) -> &Arc<Host> {
        &self._host
    }

    /// The guest's domain id.
    pub fn domid(&self) -> u16 {
        self._guest.domid()
    }

    /// Takes the first netfront queue.
    pub fn queue(&mut self) -> NetQueue {
        self.front.take_queues().remove(0)
    }
}

/// Several netfront queues as one guest NIC: frames go out on a queue chosen by their flow
/// (as a guest's transmit steering does), and come in from whichever queue has one.
pub struct MultiQueue {
    queues: Vec<NetQueue>,
    next_rx: usize,
}

impl MultiQueue {
    /// Over `queues` (at least one).
    pub fn new(queues: Vec<NetQueue>) -> MultiQueue {
        assert!(!queues.is_empty(), "a NIC needs a queue");
        MultiQueue { queues, next_rx: 0 }
    }

    /// The queues.
    pub fn queues(&self) -> &[NetQueue] {
        &self.queues
    }

    fn tx_queue(&self, frame: &[u8]) -> usize {
        let h = xensim::front::netstack::l4_offsets(frame)
            .and_then(|o| frame.get(o.l4_start..o.l4_start + 4))
            .map_or(0, |p| {
                p.iter().fold(0usize, |a, b| a * 31 + usize::from(*b))
            });
        h % self.queues.len()
    }
}

impl FrameDevice for MultiQueue {
    type Error = xensim::front::net::NetFrontError;

    fn max_frame(&self) -> usize {
        self.queues[0].max_frame()
    }

    fn offloads(&self) -> bool {
        self.queues[0].offloads()
    }

    fn send(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool, Self::Error> {
        let i = self.tx_queue(frame);
        self.queues[i].send(frame, meta)
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Option<FrameMeta>, Self::Error> {
        let n = self.queues.len();
        for k in 0..n {
            let i = (self.next_rx + k) % n;
            if let Some(m) = self.queues[i].recv(buf)? {
                self.next_rx = (i + 1) % n;
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), Self::Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        // A zero wait on each queue reaps TX, re-arms its rings' event indices and takes
        // pending events; then block on every queue's channels at once.
        for q in &mut self.queues {
            q.wait(Duration::ZERO)?;
        }
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.queues.len() * 2);
        for q in &self.queues {
            fds.push(PollFd::new(
                q.tx_port().event_fd().as_fd(),
                PollFlags::POLLIN,
            ));
            if let Some(p) = q.rx_port() {
                fds.push(PollFd::new(p.event_fd().as_fd(), PollFlags::POLLIN));
            }
        }
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(ms));
        Ok(())
    }
}

//! Shared rig for the netback tests: a xensim host and daemon, a `NetDriver` behind a
//! `BackendWatcher`, and an engine double with the tap's semantics: each queue is a
//! SOCK_SEQPACKET socketpair carrying `virtio_net_hdr` + frame per message, non-blocking on
//! netback's side. A collector thread on the host side timestamps every frame netback sends.
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backends::net::engine::{NetQueueIo, VirtioNetHdr};
use backends::net::{
    NetConfig, NetDriver, NetEngineFactory, NetStats, Offloads, VifHost, VifParams,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use xen::XenHost;
use xenbus::backend::BackendWatcher;
use xenbus::{XenbusState, XsClient, XsOps};
use xensim::client::SimHost;
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::{DeviceSpec, VifNic};

pub const T: Duration = Duration::from_secs(10);
pub const GUEST_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x01];

// ------------------------------------------------------------------ engine double

/// Netback's end of one queue.
pub struct SeqQueue {
    fd: OwnedFd,
}

impl NetQueueIo for SeqQueue {
    fn send(&self, hdr: &VirtioNetHdr, frame: &[IoSlice<'_>]) -> std::io::Result<()> {
        let h = hdr.to_bytes();
        let mut iov = Vec::with_capacity(1 + frame.len());
        iov.push(IoSlice::new(&h));
        iov.extend(frame.iter().map(|s| IoSlice::new(s)));
        nix::sys::uio::writev(&self.fd, &iov).map_err(std::io::Error::from)?;
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<(VirtioNetHdr, usize)>> {
        let mut h = [0u8; VirtioNetHdr::LEN];
        let mut iov = [IoSliceMut::new(&mut h), IoSliceMut::new(buf)];
        match nix::sys::uio::readv(&self.fd, &mut iov) {
            Ok(n) if n >= VirtioNetHdr::LEN => {
                Ok(Some((VirtioNetHdr::from_bytes(&h), n - VirtioNetHdr::LEN)))
            }
            Ok(_) => Ok(None),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A frame netback sent to the host.
#[derive(Debug, Clone)]
pub struct HostFrame {
    pub at: Instant,
    pub queue: usize,
    pub hdr: VirtioNetHdr,
    pub frame: Vec<u8>,
}

#[derive(Default)]
pub struct Sink {
    pub frames: Mutex<Vec<HostFrame>>,
    pub cond: Condvar,
}

/// The host's end of one queue.
pub struct HostQueue {
    fd: Arc<OwnedFd>,
    collector: Option<JoinHandle<()>>,
}

/// A vif's (domid, devid) and the host ends of its queues.
pub type VifQueues = ((u32, u32), Vec<Arc<OwnedFd>>);

/// The host side of every vif the rig opened: (domid, devid) -> its queues.
#[derive(Default)]
pub struct HostNet {
    pub queues: Mutex<Vec<VifQueues>>,
    pub sink: Arc<Sink>,
    pub opened: Mutex<Vec<(VifParams, u32, Offloads)>>,
    pub cond: Condvar,
    /// Host sides the factory created, and those dropped (torn down).
    pub hosts_created: std::sync::atomic::AtomicUsize,
    pub hosts_dropped: std::sync::atomic::AtomicUsize,
}

impl HostNet {
    /// Sends a frame to the guest through queue `q` of vif `devid`.
    pub fn inject(&self, devid: u32, q: usize, hdr: &VirtioNetHdr, frame: &[u8]) {
        let fd = self.queue_fd(devid, q);
        let h = hdr.to_bytes();
        nix::sys::uio::writev(&*fd, &[IoSlice::new(&h), IoSlice::new(frame)]).unwrap();
    }

    /// Like [`HostNet::inject`], but gives up when the socket is full (EAGAIN).
    pub fn try_inject(&self, devid: u32, q: usize, hdr: &VirtioNetHdr, frame: &[u8]) -> bool {
        let fd = self.queue_fd(devid, q);
        let h = hdr.to_bytes();
        nix::sys::socket::sendmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&*fd),
            &[IoSlice::new(&h), IoSlice::new(frame)],
            &[],
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            None,
        )
        .is_ok()
    }

    pub fn queue_fd(&self, devid: u32, q: usize) -> Arc<OwnedFd> {
        let end = Instant::now() + T;
        loop {
            {
                let g = self.queues.lock().unwrap();
                if let Some((_, v)) = g.iter().rev().find(|((_, d), _)| *d == devid) {
                    if let Some(fd) = v.get(q) {
                        return fd.clone();
                    }
                }
                let left = end.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "vif {devid} queue {q} never opened");
                let _ = self.cond.wait_timeout(g, left).unwrap();
            }
        }
    }

    /// Waits until `pred` holds over the frames received so far.
    pub fn wait_frames(&self, what: &str, pred: impl Fn(&[HostFrame]) -> bool) -> Vec<HostFrame> {
        let end = Instant::now() + T;
        let mut g = self.sink.frames.lock().unwrap();
        loop {
            if pred(&g) {
                return g.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}: {} frames",
                g.len()
            );
            g = self.sink.cond.wait_timeout(g, left).unwrap().0;
        }
    }

    pub fn frames(&self) -> Vec<HostFrame> {
        self.sink.frames.lock().unwrap().clone()
    }
}

struct TestVifHost {
    net: Arc<HostNet>,
    params: VifParams,
    collectors: Vec<JoinHandle<()>>,
}

impl VifHost for TestVifHost {
    fn open_queues(
        &mut self,
        n: u32,
        offloads: Offloads,
    ) -> std::io::Result<Vec<Box<dyn NetQueueIo>>> {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for qi in 0..n as usize {
            let (a, b) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )?;
            set_nonblocking(&a)?;
            // Large buffers: a GSO frame is 64 KiB.
            let _ = nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
            let _ = nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
            let b = Arc::new(b);
            let reader = b.clone();
            let sink = self.net.sink.clone();
            self.collectors
                .push(std::thread::spawn(move || collect(reader, qi, sink)));
            ours.push(Box::new(SeqQueue { fd: a }) as Box<dyn NetQueueIo>);
            theirs.push(b);
        }
        self.net
            .queues
            .lock()
            .unwrap()
            .push(((self.params.domid, self.params.devid), theirs));
        self.net
            .opened
            .lock()
            .unwrap()
            .push((self.params.clone(), n, offloads));
        self.net.cond.notify_all();
        Ok(ours)
    }

    fn describe(&self) -> String {
        format!("seqpacket double for {}", self.params.tap_name())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), FcntlArg::F_GETFL)?;
    let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
    fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), FcntlArg::F_SETFL(fl))?;
    Ok(())
}

/// Reads every frame netback sends on one queue until the socket closes.
fn collect(fd: Arc<OwnedFd>, queue: usize, sink: Arc<Sink>) {
    let mut h = [0u8; VirtioNetHdr::LEN];
    let mut buf = vec![0u8; 70000];
    loop {
        let n = {
            let mut iov = [IoSliceMut::new(&mut h), IoSliceMut::new(&mut buf)];
            match nix::sys::uio::readv(&*fd, &mut iov) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            }
        };
        let at = Instant::now();
        if n < VirtioNetHdr::LEN {
            continue;
        }
        let f = HostFrame {
            at,
            queue,
            hdr: VirtioNetHdr::from_bytes(&h),
            frame: buf[..n - VirtioNetHdr::LEN].to_vec(),
        };
        sink.frames.lock().unwrap().push(f);
        sink.cond.notify_all();
    }
}

impl Drop for TestVifHost {
    fn drop(&mut self) {
        self.net
            .hosts_dropped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub fn factory(net: Arc<HostNet>) -> NetEngineFactory {
    Arc::new(move |p: &VifParams| {
        net.hosts_created
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Box::new(TestVifHost {
            net: net.clone(),
            params: p.clone(),
            collectors: Vec::new(),
        }) as Box<dyn VifHost>)
    })
}

// ------------------------------------------------------------------ rig

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub _server: Server,
    pub host: Arc<Host>,
    pub guest: Guest,
    pub driver: Arc<NetDriver>,
    pub watcher: Option<BackendWatcher>,
    pub net: Arc<HostNet>,
    pub toolstack: xensim::toolstack::Toolstack,
}

pub fn nic(devid: u32) -> VifNic {
    let mut n = VifNic::default();
    n.mac[5] = devid as u8 + 1;
    n
}

pub fn mac_of(devid: u32) -> [u8; 6] {
    nic(devid).mac
}

pub fn rig(devids: &[u32]) -> Rig {
    rig_with(
        devids.iter().map(|d| nic(*d)).collect(),
        NetConfig::default(),
    )
}

pub fn rig_with(nics: Vec<VifNic>, config: NetConfig) -> Rig {
    rig_specs(config, |domid| {
        nics.iter()
            .enumerate()
            .map(|(i, n)| DeviceSpec::vif(domid, i as u32, n))
            .collect()
    })
}

/// A rig whose devices are exactly `specs(domid)`.
pub fn rig_specs(config: NetConfig, specs: impl FnOnce(u16) -> Vec<DeviceSpec>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("g", 8192).unwrap();
    let ts = host.toolstack().unwrap();
    for s in specs(domid) {
        ts.add_device(&s).unwrap();
    }
    let sim: Arc<dyn XenHost> = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let xs = XsClient::new(sim.open_xenstore(&xen::XsTransport::Socket(None)).unwrap()).unwrap();
    let net = Arc::new(HostNet::default());
    let driver = NetDriver::new(sim, "vif", config, factory(net.clone()));
    let watcher = BackendWatcher::start(xs, driver.clone(), 0, u32::from(domid)).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    Rig {
        _dir: dir,
        _server: server,
        host,
        guest,
        driver,
        watcher: Some(watcher),
        net,
        toolstack: ts,
    }
}

impl Rig {
    pub fn stats(&self, devid: u32) -> NetStats {
        self.driver
            .stats()
            .into_iter()
            .find(|((_, d), _)| *d == devid)
            .map(|(_, s)| s)
            .unwrap_or_default()
    }

    /// Waits until a counter condition holds (the vif thread updates atomics).
    pub fn wait_stats(&self, devid: u32, what: &str, pred: impl Fn(&NetStats) -> bool) -> NetStats {
        let end = Instant::now() + T;
        loop {
            let s = self.stats(devid);
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}: {s:?}");
            std::thread::yield_now();
        }
    }

    pub fn backend_path(&self, devid: u32) -> String {
        format!("/local/domain/0/backend/vif/{}/{devid}", self.guest.domid())
    }

    pub fn read_backend(&self, devid: u32, key: &str) -> Option<String> {
        self.toolstack
            .xs()
            .try_read(&format!("{}/{key}", self.backend_path(devid)))
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    pub fn write_backend(&self, devid: u32, key: &str, value: &str) {
        self.toolstack
            .xs()
            .write(
                &format!("{}/{key}", self.backend_path(devid)),
                value.as_bytes(),
            )
            .unwrap();
    }

    pub fn backend_state(&self, devid: u32) -> XenbusState {
        self.read_backend(devid, "state")
            .and_then(|s| XenbusState::parse(s.as_bytes()).ok())
            .unwrap_or(XenbusState::Unknown)
    }

    /// Waits (on the watcher's condition variable) until the device is connected or not.
    pub fn wait_connected(&self, devid: u32, connected: bool) -> bool {
        self.watcher.as_ref().unwrap().wait_until(T, |d| {
            d.iter()
                .any(|i| i.devid == devid && i.connected == connected)
        })
    }

    /// Waits until the backend wrote its `error` node.
    pub fn wait_error(&self, devid: u32) -> String {
        let end = Instant::now() + T;
        loop {
            if let Some(e) = self.read_backend(devid, "error") {
                return e;
            }
            assert!(Instant::now() < end, "no error node on vif {devid}");
            std::thread::yield_now();
        }
    }
}

// ------------------------------------------------------------------ frames

/// An Ethernet + IPv4 + UDP frame of `payload` bytes from `src` to `dst` MAC.
pub fn udp_frame(src: [u8; 6], dst: [u8; 6], payload: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + payload];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + 8 + payload) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 2]);
    f[30..34].copy_from_slice(&[10, 0, 0, 1]);
    f[34..36].copy_from_slice(&1234u16.to_be_bytes());
    f[36..38].copy_from_slice(&5678u16.to_be_bytes());
    f[38..40].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

/// An Ethernet + IPv4/IPv6 + TCP frame of `payload` bytes with the given ports.
pub fn tcp_frame(
    src: [u8; 6],
    dst: [u8; 6],
    v6: bool,
    ports: (u16, u16),
    payload: usize,
    seed: u8,
) -> Vec<u8> {
    let l3 = if v6 { 40 } else { 20 };
    let mut f = vec![0u8; 14 + l3 + 20 + payload];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    if v6 {
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        f[20] = 6;
        f[21] = 64;
        f[22..38].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f[38..54].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    } else {
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((20 + 20 + payload) as u16).to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 2]);
        f[30..34].copy_from_slice(&[10, 0, 0, 1]);
    }
    let t = 14 + l3;
    f[t..t + 2].copy_from_slice(&ports.0.to_be_bytes());
    f[t + 2..t + 4].copy_from_slice(&ports.1.to_be_bytes());
    f[t + 12] = 5 << 4;
    for (i, b) in f[t + 20..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(seed);
    }
    f
}

/// Waits until `f` returns Some, yielding between looks (for state another thread changes).
pub fn wait_for<R>(what: &str, mut f: impl FnMut() -> Option<R>) -> R {
    let end = Instant::now() + T;
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

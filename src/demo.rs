//! `domio demo`: a simulated host, a guest and domio in one command.
//!
//! domio attaches to the host exactly as `domio serve --xen sim:PATH` does (through the
//! daemon socket), so the demo runs the same code as a real deployment, minus Xen.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use backends::console::ConsoleSink;
use backends::net::engine::{NetQueueIo, VirtioNetHdr};
use backends::net::{NetConfig, NetDriver, NetEngineFactory, Offloads, VifHost, VifParams};
use clap::Args;
use xen::{DomId, XenHost};
use xensim::client::SimHost;
use xensim::front::blk::{BlkFront, BlkFrontOptions, BlkOp};
use xensim::front::console::ConsoleFront;
use xensim::front::frame::FrameMeta;
use xensim::front::net::{NetFront, NetFrontOptions};
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::{DeviceSpec, VifNic};

use crate::serve::{open_xenstore, Service, XsKind};

/// Arguments of `domio demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Interval between the guest's console lines, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub tick_ms: u64,
}

/// Adds console device 0 to `domid`, as the toolstack would.
pub fn add_console_device(host: &Host, domid: DomId) -> anyhow::Result<()> {
    let ts = host
        .toolstack()
        .map_err(|e| anyhow::anyhow!("toolstack connection: {e}"))?;
    ts.add_device(&DeviceSpec::console(domid, 0))
        .context("adding the console device")?;
    Ok(())
}

/// A simulated guest whose console frontend connects, writes a line per tick and echoes
/// any input it receives.
pub struct DemoGuest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<GuestReport>>>,
}

/// What a demo guest saw.
#[derive(Debug, Default, Clone)]
pub struct GuestReport {
    /// Lines the guest wrote.
    pub lines_written: u64,
    /// Input bytes the guest received.
    pub input_bytes: u64,
    /// Whether the frontend reached Connected.
    pub connected: bool,
    /// Whether the close handshake finished and the ring grant was revoked.
    pub closed_cleanly: bool,
}

impl DemoGuest {
    /// Starts the guest's frontend thread.
    pub fn start(host: Arc<Host>, domid: DomId, tick: Duration) -> anyhow::Result<DemoGuest> {
        let guest = Guest::new(host, domid).context("guest helpers")?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("guest-d{domid}"))
            .spawn(move || guest_main(guest, tick, s))
            .context("starting the guest thread")?;
        Ok(DemoGuest {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the guest (it closes its device first) and returns what it saw.
    pub fn stop(mut self) -> GuestReport {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(e))) => {
                eprintln!("demo guest failed: {e:#}");
                GuestReport::default()
            }
            _ => GuestReport::default(),
        }
    }
}

fn guest_main(guest: Guest, tick: Duration, stop: Arc<AtomicBool>) -> anyhow::Result<GuestReport> {
    let mut rep = GuestReport::default();
    let domid = guest.domid();
    let front = loop {
        match ConsoleFront::connect(&guest, 0, Duration::from_millis(200)) {
            Ok(f) => break f,
            Err(xensim::front::FrontError::Timeout { .. }) if !stop.load(Ordering::SeqCst) => {
                continue
            }
            Err(e) if stop.load(Ordering::SeqCst) => {
                tracing::debug!("guest stopped before connecting: {e}");
                return Ok(rep);
            }
            Err(e) => return Err(e).context("console frontend connect"),
        }
    };
    rep.connected = true;
    let mut n = 0u64;
    let mut input = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next {
            n += 1;
            let line = format!("dom{domid} says hello #{n} through the PV console\n");
            front.write(line.as_bytes()).context("console write")?;
            rep.lines_written += 1;
            next += tick;
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        let _ = front.wait_event(wait);
        input.clear();
        let got = front.read(&mut input).context("console read")?;
        if got > 0 {
            rep.input_bytes += got as u64;
            let text = String::from_utf8_lossy(&input).trim_end().to_string();
            front
                .write(format!("dom{domid} received input {text:?}\n").as_bytes())
                .context("console echo")?;
            rep.lines_written += 1;
        }
    }
    front
        .close(Duration::from_secs(5))
        .context("closing the console")?;
    rep.closed_cleanly = true;
    Ok(rep)
}

/// The demo disk: device 51712 (xvda), a raw image served as `qdisk`.
pub const DEMO_DISK_DEVID: u32 = 51712;

/// What the demo guest's disk driver saw.
#[derive(Debug, Default, Clone)]
pub struct DiskReport {
    /// The blkfront reached Connected.
    pub connected: bool,
    /// Write, flush, read-back rounds whose data matched.
    pub verified: u64,
    /// Rounds whose data did not match (must be 0).
    pub mismatches: u64,
    /// Requests that got an error response.
    pub errors: u64,
    /// The disk was closed and every grant revoked.
    pub closed_cleanly: bool,
}

/// A guest disk driver: write a 64 KiB pattern, flush, read it back and compare, per tick.
pub struct DemoDisk {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<DiskReport>>>,
}

impl DemoDisk {
    /// Starts the guest's disk thread.
    pub fn start(host: Arc<Host>, domid: DomId, tick: Duration) -> anyhow::Result<DemoDisk> {
        let guest = Guest::new(host, domid).context("guest helpers")?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("guest-d{domid}-disk"))
            .spawn(move || disk_main(guest, tick, s))
            .context("starting the guest disk thread")?;
        Ok(DemoDisk {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the guest's disk driver (it closes the disk first) and returns what it saw.
    pub fn stop(mut self) -> DiskReport {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(e))) => {
                eprintln!("demo disk failed: {e:#}");
                DiskReport::default()
            }
            _ => DiskReport::default(),
        }
    }
}

fn disk_main(guest: Guest, tick: Duration, stop: Arc<AtomicBool>) -> anyhow::Result<DiskReport> {
    let mut rep = DiskReport::default();
    let opts = BlkFrontOptions {
        max_ring_order: 1,
        timeout: Duration::from_millis(200),
        ..BlkFrontOptions::default()
    };
    let mut front = loop {
        match BlkFront::connect(&guest, DEMO_DISK_DEVID, opts.clone()) {
            Ok(f) => break f,
            Err(_) if !stop.load(Ordering::SeqCst) => continue,
            Err(e) => {
                tracing::debug!("disk stopped before connecting: {e}");
                return Ok(rep);
            }
        }
    };
    rep.connected = true;
    let sectors = front.disk().map_or(0, |d| d.sectors);
    const LEN: usize = 64 * 1024;
    let span = (LEN / 512) as u64;
    let mut data = vec![0u8; LEN];
    let mut back = vec![0u8; LEN];
    let mut round = 0u64;
    let timeout = Duration::from_secs(10);
    while !stop.load(Ordering::SeqCst) && sectors > span {
        round += 1;
        let sector = (round * span) % (sectors - span);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (round as usize).wrapping_mul(31).wrapping_add(i / 512) as u8;
        }
        let q = front.queue(0).context("queue 0")?;
        let w = q.run_one(
            BlkOp::Write {
                sector,
                data: &data,
            },
            None,
            timeout,
        )?;
        let f = q.run_one(BlkOp::Flush, None, timeout)?;
        let r = q.run_one(BlkOp::Read { sector, len: LEN }, Some(&mut back), timeout)?;
        let failed = [w.status, f.status, r.status]
            .iter()
            .filter(|s| **s != 0)
            .count() as u64;
        rep.errors += failed;
        if failed == 0 {
            if back == data {
                rep.verified += 1;
            } else {
                rep.mismatches += 1;
            }
        }
        // Pace the guest so the live counters are readable (this is a demo, not a benchmark:
        // `domio bench blk` drives the disk flat out).
        let end = std::time::Instant::now() + tick;
        while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    front.close().context("closing the disk")?;
    rep.closed_cleanly = true;
    Ok(rep)
}

/// The demo NIC: `vif` device 0 with this MAC, served by netback.
pub const DEMO_NIC_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x01];
/// The host end the guest talks to (the reflector answers as this MAC).
const DEMO_HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// netback's end of one engine queue: a SOCK_SEQPACKET socket carrying `virtio_net_hdr` +
/// frame per message, the semantics of a tap with IFF_VNET_HDR (the demo needs no root, so no
/// tap: `domio serve --backend-types vif` uses a real one).
struct SeqQueue {
    fd: std::os::fd::OwnedFd,
}

impl NetQueueIo for SeqQueue {
    fn send(&self, hdr: &VirtioNetHdr, frame: &[std::io::IoSlice<'_>]) -> std::io::Result<()> {
        let h = hdr.to_bytes();
        let mut iov = Vec::with_capacity(1 + frame.len());
        iov.push(std::io::IoSlice::new(&h));
        iov.extend(frame.iter().map(|s| std::io::IoSlice::new(s)));
        nix::sys::uio::writev(&self.fd, &iov)?;
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<(VirtioNetHdr, usize)>> {
        let mut h = [0u8; VirtioNetHdr::LEN];
        let mut iov = [
            std::io::IoSliceMut::new(&mut h),
            std::io::IoSliceMut::new(buf),
        ];
        match nix::sys::uio::readv(&self.fd, &mut iov) {
            Ok(n) if n >= VirtioNetHdr::LEN => {
                Ok(Some((VirtioNetHdr::from_bytes(&h), n - VirtioNetHdr::LEN)))
            }
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

/// The demo's host side: every frame the guest sends comes back with the Ethernet, IPv4 and
/// UDP source and destination swapped, like an echo server behind the bridge.
struct Reflector {
    params: VifParams,
}

impl VifHost for Reflector {
    fn open_queues(
        &mut self,
        n: u32,
        _offloads: Offloads,
    ) -> std::io::Result<Vec<Box<dyn NetQueueIo>>> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let mut out = Vec::new();
        for _ in 0..n {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            )?;
            // The reflector's end blocks; netback's stays non-blocking.
            let fl = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&theirs),
                nix::fcntl::FcntlArg::F_GETFL,
            )?;
            let fl = nix::fcntl::OFlag::from_bits_truncate(fl) & !nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&theirs),
                nix::fcntl::FcntlArg::F_SETFL(fl),
            )?;
            std::thread::Builder::new()
                .name(format!("demo-host-{}", self.params.tap_name()))
                .spawn(move || reflect(theirs))?;
            out.push(Box::new(SeqQueue { fd: ours }) as Box<dyn NetQueueIo>);
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("in-process reflector for {}", self.params.tap_name())
    }
}

/// Reflects frames until netback closes its end.
fn reflect(fd: std::os::fd::OwnedFd) {
    let mut h = [0u8; VirtioNetHdr::LEN];
    let mut buf = vec![0u8; 65550];
    loop {
        let n = {
            let mut iov = [
                std::io::IoSliceMut::new(&mut h),
                std::io::IoSliceMut::new(&mut buf),
            ];
            match nix::sys::uio::readv(&fd, &mut iov) {
                Ok(0) | Err(_) => return,
                Ok(n) => n.saturating_sub(VirtioNetHdr::LEN),
            }
        };
        let f = &mut buf[..n];
        if f.len() >= 42 && f[12..14] == [0x08, 0x00] {
            let (dst, src) = f[..12].split_at_mut(6);
            dst.swap_with_slice(src);
            let (a, b) = f[26..34].split_at_mut(4);
            a.swap_with_slice(b);
            let (a, b) = f[34..38].split_at_mut(2);
            a.swap_with_slice(b);
            let _ =
                nix::sys::uio::writev(&fd, &[std::io::IoSlice::new(&h), std::io::IoSlice::new(f)]);
        }
    }
}

fn reflector_factory() -> NetEngineFactory {
    Arc::new(|p: &VifParams| Ok(Box::new(Reflector { params: p.clone() }) as Box<dyn VifHost>))
}

/// What the demo guest's NIC driver saw.
#[derive(Debug, Default, Clone)]
pub struct NicReport {
    /// The netfront reached Connected.
    pub connected: bool,
    /// UDP datagrams sent and echoed back intact.
    pub echoed: u64,
    /// Echoes whose payload differed (must be 0).
    pub mismatches: u64,
    /// Datagrams with no echo within a second.
    pub lost: u64,
    /// The NIC was closed and every grant revoked.
    pub closed_cleanly: bool,
}

/// A guest NIC driver: per tick, a burst of UDP datagrams to the host, each echoed back.
pub struct DemoNic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<NicReport>>>,
}

impl DemoNic {
    /// Starts the guest's NIC thread.
    pub fn start(host: Arc<Host>, domid: DomId, tick: Duration) -> anyhow::Result<DemoNic> {
        let guest = Guest::new(host, domid).context("guest helpers")?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("guest-d{domid}-nic"))
            .spawn(move || nic_main(guest, tick, s))
            .context("starting the guest NIC thread")?;
        Ok(DemoNic {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the guest's NIC driver (it closes the NIC first) and returns what it saw.
    pub fn stop(mut self) -> NicReport {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(e))) => {
                eprintln!("demo NIC failed: {e:#}");
                NicReport::default()
            }
            _ => NicReport::default(),
        }
    }
}

/// An Ethernet + IPv4 + UDP datagram from the guest to the host.
fn demo_datagram(seq: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 42 + len];
    f[..6].copy_from_slice(&DEMO_HOST_MAC);
    f[6..12].copy_from_slice(&DEMO_NIC_MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((28 + len) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[169, 254, 0, 2]);
    f[30..34].copy_from_slice(&[169, 254, 0, 1]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&7u16.to_be_bytes());
    f[38..40].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(131).wrapping_add(i) as u8;
    }
    f
}

fn nic_main(guest: Guest, tick: Duration, stop: Arc<AtomicBool>) -> anyhow::Result<NicReport> {
    let mut rep = NicReport::default();
    let opts = NetFrontOptions {
        timeout: Duration::from_millis(200),
        ..NetFrontOptions::default()
    };
    let mut front = loop {
        match NetFront::connect(&guest, 0, opts.clone()) {
            Ok(f) => break f,
            Err(_) if !stop.load(Ordering::SeqCst) => continue,
            Err(e) => {
                tracing::debug!("NIC stopped before connecting: {e}");
                return Ok(rep);
            }
        }
    };
    rep.connected = true;
    let mut seq = 0u64;
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let q = front.queue(0).context("queue 0")?;
        for _ in 0..16 {
            seq += 1;
            let out = demo_datagram(seq, 64 + (seq as usize * 97) % 1400);
            let deadline = Instant::now() + Duration::from_secs(1);
            while !q.send_frame(&out, FrameMeta::default())? {
                if Instant::now() >= deadline {
                    break;
                }
                q.wait_event(Duration::from_millis(20))?;
            }
            let echoed = loop {
                if let Some(_meta) = q.recv_frame(&mut buf)? {
                    break true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break false;
                }
                q.wait_event(left.min(Duration::from_millis(50)))?;
            };
            if !echoed {
                rep.lost += 1;
            } else if buf.len() == out.len() && buf[42..] == out[42..] && buf[..6] == out[6..12] {
                rep.echoed += 1;
            } else {
                rep.mismatches += 1;
            }
        }
        // Pace the guest so the live counters are readable (`domio bench net` drives the NIC
        // flat out).
        let end = Instant::now() + tick;
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    front.close().context("closing the NIC")?;
    rep.closed_cleanly = true;
    Ok(rep)
}

/// Prints guest lines as domio receives them.
struct Narrator {
    start: Instant,
    lines: AtomicU64,
    out: Mutex<std::io::Stdout>,
}

impl ConsoleSink for Narrator {
    fn line(&self, domid: u32, devid: u32, line: &str) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            o,
            "[{:6.2}s] domio <- dom{domid} console/{devid}: {line}",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Runs `domio demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        anyhow::bail!(
            "--duration {} must be between 0 and 3600 seconds",
            args.duration
        );
    }
    if args.tick_ms == 0 {
        anyhow::bail!("--tick-ms must be at least 1");
    }
    let signals = crate::signals::termination()?;
    let start = Instant::now();
    let say = |msg: &str| println!("[{:6.2}s] {msg}", start.elapsed().as_secs_f64());
    let dir = std::env::temp_dir().join(format!("domio-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sock = dir.join("xensim.sock");

    let host = Host::new().context("creating the simulated host")?;
    let server = Server::start(host.clone(), &sock)
        .with_context(|| format!("listening on {}", sock.display()))?;
    say(&format!(
        "xensim host up on {} (dom0 + xenstored)",
        sock.display()
    ));
    let domid = host
        .create_domain("demo-guest", 64 * 256)
        .context("creating the guest")?;
    add_console_device(&host, domid)?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .with_context(|| format!("creating {}", image.display()))?;
    let disk = DeviceSpec::qdisk(domid, DEMO_DISK_DEVID, &image.display().to_string(), true);
    host.toolstack()
        .map_err(|e| anyhow::anyhow!("toolstack connection: {e}"))?
        .add_device(&disk)
        .context("adding the disk")?;
    let nic = VifNic {
        mac: DEMO_NIC_MAC,
        ..VifNic::default()
    };
    host.toolstack()
        .map_err(|e| anyhow::anyhow!("toolstack connection: {e}"))?
        .add_device(&DeviceSpec::vif(domid, 0, &nic))
        .context("adding the NIC")?;
    say(&format!(
        "guest dom{domid} created with a PV console (backend/console/{domid}/0), a 64 MiB raw disk as xvda (backend/qdisk/{domid}/{DEMO_DISK_DEVID}) and a NIC (backend/vif/{domid}/0)"
    ));

    // domio attaches through the socket, exactly as `domio serve --xen sim:PATH` does.
    let sim: Arc<dyn XenHost> =
        Arc::new(SimHost::connect(&sock, 0).context("attaching domio to the host")?);
    let xs = open_xenstore(sim.as_ref(), XsKind::Socket, None)?;
    // The NIC: netback as `domio serve --backend-types vif` runs it, but with an in-process
    // host side that echoes datagrams, so the demo needs no tap and no root.
    let netback = NetDriver::new(
        sim.clone(),
        "vif",
        NetConfig::default(),
        reflector_factory(),
    );
    let nic_watcher = xenbus::backend::BackendWatcher::start(
        open_xenstore(sim.as_ref(), XsKind::Socket, None)?,
        netback.clone(),
        0,
        u32::from(domid),
    )
    .context("watching vif backends")?;
    let narrator = Arc::new(Narrator {
        start,
        lines: AtomicU64::new(0),
        out: Mutex::new(std::io::stdout()),
    });
    let svc = Service::start(
        sim.clone(),
        xs,
        0,
        domid,
        &["console".to_string(), "qdisk".to_string()],
        narrator.clone(),
        backends::blk::BlkConfig::default(),
        backends::net::tap::tap_engine_factory(),
    )?;
    say(
        "domio serving dom{domid}: waiting for the frontend to connect"
            .replace("{domid}", &domid.to_string())
            .as_str(),
    );

    let guest = DemoGuest::start(host.clone(), domid, Duration::from_millis(args.tick_ms))?;
    let disk_guest = DemoDisk::start(host.clone(), domid, Duration::from_millis(args.tick_ms / 2))?;
    let nic_guest = DemoNic::start(host.clone(), domid, Duration::from_millis(args.tick_ms / 2))?;
    let deadline = start + Duration::from_secs_f64(args.duration);
    let mut last_report = Instant::now();
    let mut inputs = 0u32;
    let mut connected_said = false;
    let interrupted = loop {
        let now = Instant::now();
        if now >= deadline {
            break false;
        }
        if let Ok(s) = signals.recv_timeout(Duration::from_millis(100).min(deadline - now)) {
            say(&format!("{} received: stopping early", s.as_str()));
            break true;
        }
        let devs = svc.devices();
        let connected = devs.iter().flat_map(|(_, d)| d).any(|d| d.connected);
        if connected && !connected_said {
            connected_said = true;
            say(&format!("console/0 of dom{domid}: XenBus handshake done, backend Connected (ring mapped, event channel bound)"));
        }
        if connected && last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            inputs += 1;
            let text = format!("ping {inputs}\n");
            if let Some(c) = svc.console() {
                match c.send_input(u32::from(domid), 0, text.as_bytes()) {
                    Ok(()) => say(&format!(
                        "domio -> dom{domid} console/0: {:?}",
                        text.trim_end()
                    )),
                    Err(e) => say(&format!("input not sent: {e}")),
                }
            }
            for ((d, dev), s) in svc.console_stats() {
                say(&format!(
                    "stats dom{d} console/{dev}: out {} B, in {} B, lines {}, events {}, notifies {}, errors {}",
                    s.bytes_out, s.bytes_in, s.lines, s.events, s.notifies, s.errors
                ));
            }
            for ((d, dev), b) in svc.blk_stats() {
                say(&format!(
                    "stats dom{d} disk {dev}: reads {} ({} KiB), writes {} ({} KiB), flushes {}, persistent-grant hits {}, errors {}",
                    b.reads, b.bytes_read / 1024, b.writes, b.bytes_written / 1024, b.flushes, b.persistent_hits, b.errors
                ));
            }
            for ((d, dev), n) in netback.stats() {
                say(&format!(
                    "stats dom{d} nic {dev}: tx {} frames ({} KiB), rx {} frames ({} KiB), grant copies {}, spoofed {}, drops {}, fatal {}",
                    n.tx_packets, n.tx_bytes / 1024, n.rx_packets, n.rx_bytes / 1024, n.grant_copies, n.tx_spoofed,
                    n.tx_malformed + n.rx_backlog_drops + n.rx_unsupported_drops, n.fatal_errors
                ));
            }
        }
    };
    let _ = interrupted;
    say("guest closing its console (Closing -> Closed handshake)");
    let rep = guest.stop();
    say("guest closing its disk (every grant revoked once blkback has unmapped it)");
    let drep = disk_guest.stop();
    say("guest closing its NIC (netback unmaps its rings first)");
    let nrep = nic_guest.stop();
    let nstats = netback.stats();
    let ndevs = nic_watcher.devices();
    nic_watcher.stop();
    let stats = svc.console_stats();
    let bstats = svc.blk_stats();
    let devs = svc.devices();
    svc.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\n== domio demo summary ({:.1}s) ==",
        start.elapsed().as_secs_f64()
    );
    println!(
        "guest dom{domid}: connected={} lines written={} input bytes received={} closed cleanly={}",
        rep.connected, rep.lines_written, rep.input_bytes, rep.closed_cleanly
    );
    for (t, ds) in &devs {
        for d in ds {
            println!(
                "device {t}/{domid}/{}: backend state {} (probes {})",
                d.devid, d.state, d.probes
            );
        }
    }
    for d in &ndevs {
        println!(
            "device vif/{domid}/{}: backend state {} (probes {})",
            d.devid, d.state, d.probes
        );
    }
    for ((d, dev), s) in &stats {
        println!(
            "console dom{d}/{dev}: bytes out {} in {}, lines logged {} (suppressed {}), events {}, notifies {}, errors {}",
            s.bytes_out, s.bytes_in, s.lines, s.lines_suppressed, s.events, s.notifies, s.errors
        );
    }
    println!(
        "disk xvda: connected={} write+flush+read-back rounds verified={} mismatches={} errors={} closed cleanly={}",
        drep.connected, drep.verified, drep.mismatches, drep.errors, drep.closed_cleanly
    );
    for ((d, dev), b) in &bstats {
        println!(
            "blkback dom{d}/{dev}: reads {} writes {} flushes {}, {} KiB read, {} KiB written, grant maps {}, persistent hits {}, bad requests {}, errors {}",
            b.reads, b.writes, b.flushes, b.bytes_read / 1024, b.bytes_written / 1024, b.grant_maps, b.persistent_hits, b.bad_requests, b.errors
        );
    }
    println!(
        "nic vif0: connected={} datagrams echoed={} mismatches={} lost={} closed cleanly={}",
        nrep.connected, nrep.echoed, nrep.mismatches, nrep.lost, nrep.closed_cleanly
    );
    for ((d, dev), n) in &nstats {
        println!(
            "netback dom{d}/{dev}: tx {} frames {} KiB, rx {} frames {} KiB, grant copies {}, notifications {}, malformed {}, spoofed {}, fatal {}",
            n.tx_packets, n.tx_bytes / 1024, n.rx_packets, n.rx_bytes / 1024, n.grant_copies, n.notifications, n.tx_malformed, n.tx_spoofed, n.fatal_errors
        );
    }
    let logged = narrator.lines.load(Ordering::Relaxed);
    let disk_ok = drep.connected
        && drep.verified > 0
        && drep.mismatches == 0
        && drep.errors == 0
        && drep.closed_cleanly;
    let nic_ok = nrep.connected && nrep.echoed > 0 && nrep.mismatches == 0 && nrep.closed_cleanly;
    let ok = rep.connected && logged > 0 && rep.closed_cleanly && disk_ok && nic_ok;
    println!("result: {}", if ok { "OK" } else { "FAILED" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

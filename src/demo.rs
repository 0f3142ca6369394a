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
use clap::Args;
use xen::{DomId, XenHost};
use xensim::client::SimHost;
use xensim::front::blk::{BlkFront, BlkFrontOptions, BlkOp};
use xensim::front::console::ConsoleFront;
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::DeviceSpec;

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
    say(&format!(
        "guest dom{domid} created with a PV console (backend/console/{domid}/0) and a 64 MiB raw disk as xvda (backend/qdisk/{domid}/{DEMO_DISK_DEVID})"
    ));

    // domio attaches through the socket, exactly as `domio serve --xen sim:PATH` does.
    let sim: Arc<dyn XenHost> =
        Arc::new(SimHost::connect(&sock, 0).context("attaching domio to the host")?);
    let xs = open_xenstore(sim.as_ref(), XsKind::Socket, None)?;
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
    )?;
    say(
        "domio serving dom{domid}: waiting for the frontend to connect"
            .replace("{domid}", &domid.to_string())
            .as_str(),
    );

    let guest = DemoGuest::start(host.clone(), domid, Duration::from_millis(args.tick_ms))?;
    let disk_guest = DemoDisk::start(host.clone(), domid, Duration::from_millis(args.tick_ms / 2))?;
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
        }
    };
    let _ = interrupted;
    say("guest closing its console (Closing -> Closed handshake)");
    let rep = guest.stop();
    say("guest closing its disk (every grant revoked once blkback has unmapped it)");
    let drep = disk_guest.stop();
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
    let logged = narrator.lines.load(Ordering::Relaxed);
    let disk_ok = drep.connected
        && drep.verified > 0
        && drep.mismatches == 0
        && drep.errors == 0
        && drep.closed_cleanly;
    let ok = rep.connected && logged > 0 && rep.closed_cleanly && disk_ok;
    println!("result: {}", if ok { "OK" } else { "FAILED" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

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
    say(&format!(
        "guest dom{domid} created with a PV console (backend/console/{domid}/0)"
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
        &["console".to_string()],
        narrator.clone(),
    )?;
    say(
        "domio serving dom{domid}: waiting for the frontend to connect"
            .replace("{domid}", &domid.to_string())
            .as_str(),
    );

    let guest = DemoGuest::start(host.clone(), domid, Duration::from_millis(args.tick_ms))?;
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
        }
    };
    let _ = interrupted;
    say("guest closing its console (Closing -> Closed handshake)");
    let rep = guest.stop();
    let stats = svc.console_stats();
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
    let logged = narrator.lines.load(Ordering::Relaxed);
    let ok = rep.connected && logged > 0 && rep.closed_cleanly;
    println!("result: {}", if ok { "OK" } else { "FAILED" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

//! The PV console backend against xensim guests, including hostile ones.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backends::console::{ConsoleDriver, ConsoleLimits, ConsoleSink};
use xen::abi::console::{OUT_PROD_OFFSET, XENCONS_OUT_SIZE};
use xen::{XenHost, PAGE_SIZE};
use xenbus::backend::BackendWatcher;
use xenbus::XsClient;
use xensim::client::SimHost;
use xensim::front::console::ConsoleFront;
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::DeviceSpec;

#[derive(Default)]
struct Lines(Mutex<Vec<(u32, u32, String)>>);

impl ConsoleSink for Lines {
    fn line(&self, domid: u32, devid: u32, line: &str) {
        self.0
            .lock()
            .unwrap()
            .push((domid, devid, line.to_string()));
    }
}

impl Lines {
    fn has(&self, devid: u32, text: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, d, l)| *d == devid && l == text)
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    _server: Server,
    host: Arc<Host>,
    guest: Guest,
    driver: Arc<ConsoleDriver>,
    watcher: Option<BackendWatcher>,
    lines: Arc<Lines>,
}

fn rig(devids: &[u32], limits: ConsoleLimits) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("g", 256).unwrap();
    let ts = host.toolstack().unwrap();
    for d in devids {
        ts.add_device(&DeviceSpec::console(domid, *d)).unwrap();
    }
    let sim: Arc<dyn XenHost> = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let xs = XsClient::new(sim.open_xenstore(&xen::XsTransport::Socket(None)).unwrap()).unwrap();
    let lines = Arc::new(Lines::default());
    let driver = ConsoleDriver::new(sim, lines.clone(), limits);
    let watcher = BackendWatcher::start(xs, driver.clone(), 0, u32::from(domid)).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    Rig {
        _dir: dir,
        _server: server,
        host,
        guest,
        driver,
        watcher: Some(watcher),
        lines,
    }
}

/// Waits for a condition that another thread makes true, yielding between looks.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn test_console_output_and_input_flow_both_ways() {
    let r = rig(&[0], ConsoleLimits::default());
    let f = ConsoleFront::connect(&r.guest, 0, Duration::from_secs(10)).unwrap();

    f.write(b"hello backend\n").unwrap();
    wait_for("the line", || r.lines.has(0, "hello backend"));
    r.driver
        .send_input(u32::from(r.guest.domid()), 0, b"typed")
        .unwrap();
    let mut got = Vec::new();
    wait_for("input", || {
        let _ = f.wait_event(Duration::from_millis(50));
        f.read(&mut got).unwrap();
        got == b"typed"
    });

    let s = r.driver.stats()[0].1;
    assert_eq!(s.bytes_out, 14);
    assert_eq!(s.bytes_in, 5);
    assert_eq!(s.errors, 0);
}

#[test]
fn test_console_rogue_out_prod_cuts_off_that_device_only() {
    let r = rig(&[0, 1], ConsoleLimits::default());
    let bad = ConsoleFront::connect(&r.guest, 0, Duration::from_secs(10)).unwrap();
    let good = ConsoleFront::connect(&r.guest, 1, Duration::from_secs(10)).unwrap();

    // The guest claims far more output than the ring holds (XSA-39 class).
    let at = bad.ring_gfn() as usize * PAGE_SIZE + OUT_PROD_OFFSET;
    r.guest
        .ram()
        .store_u32(at, (10 * XENCONS_OUT_SIZE) as u32, Ordering::Release)
        .unwrap();
    bad.write(b"").unwrap(); // notify
    wait_for("the error to be counted", || {
        r.driver
            .stats()
            .iter()
            .any(|((_, d), s)| *d == 0 && s.errors == 1)
    });
    good.write(b"still here\n").unwrap();

    wait_for("the other device to keep working", || {
        r.lines.has(1, "still here")
    });
    assert!(
        !r.lines.0.lock().unwrap().iter().any(|(_, d, _)| *d == 0),
        "garbage from the rogue ring was logged"
    );
    // The rogue device is told: error node and backend Closing, as xenbus_dev_fatal does.
    let be = format!("/local/domain/0/backend/console/{}/0", r.guest.domid());
    let ts = r.host.toolstack().unwrap();
    let w = ts.xs().watch(&format!("{be}/state"), "t").unwrap();
    let state = || xenbus::XsOps::read(ts.xs(), &format!("{be}/state")).unwrap();
    while state() != b"5" {
        w.recv_timeout(Duration::from_secs(10))
            .expect("backend never went to Closing");
    }
    let err = xenbus::XsOps::read(ts.xs(), &format!("{be}/error")).unwrap();
    assert!(
        String::from_utf8_lossy(&err).contains("console ring"),
        "{}",
        String::from_utf8_lossy(&err)
    );
}

#[test]
fn test_xsa180_console_line_flood_is_rate_limited() {
    let limits = ConsoleLimits {
        lines_per_sec: 50.0,
        line_burst: 20.0,
        ..ConsoleLimits::default()
    };
    let r = rig(&[0], limits);
    let f = ConsoleFront::connect(&r.guest, 0, Duration::from_secs(10)).unwrap();
    let start = Instant::now();

    let mut sent = 0;
    while sent < 3000 {
        if f.write(b"x\n").unwrap() == 2 {
            sent += 1;
        } else {
            let _ = f.wait_event(Duration::from_millis(20));
        }
    }
    wait_for("the backend to consume everything", || f.unconsumed() == 0);
    wait_for("every line to be counted", || {
        let s = r.driver.stats()[0].1;
        s.lines + s.lines_suppressed == 3000
    });
    let elapsed = start.elapsed().as_secs_f64();
    let s = r.driver.stats()[0].1;

    let allowed = 20.0 + 50.0 * (elapsed + 0.5);
    assert!(
        (s.lines as f64) <= allowed,
        "{} lines logged in {elapsed:.2}s (allowed {allowed:.0})",
        s.lines
    );
    assert!(s.lines_suppressed > 0);
    assert_eq!(r.lines.count() as u64, s.lines);
}

#[test]
fn test_console_frontend_close_and_reconnect_is_served_again() {
    let r = rig(&[0], ConsoleLimits::default());
    let f = ConsoleFront::connect(&r.guest, 0, Duration::from_secs(10)).unwrap();
    f.write(b"first life\n").unwrap();
    wait_for("first line", || r.lines.has(0, "first life"));

    f.close(Duration::from_secs(10)).unwrap();
    // The guest comes back (reboot, resume): Initialising again, then a new ring.
    let fe_state = format!("/local/domain/{}/device/console/0/state", r.guest.domid());
    let ts = r.host.toolstack().unwrap();
    xenbus::XsOps::write(ts.xs(), &fe_state, b"1").unwrap();
    let f2 = ConsoleFront::connect(&r.guest, 0, Duration::from_secs(10)).unwrap();
    f2.write(b"second life\n").unwrap();

    wait_for("second line", || r.lines.has(0, "second life"));
    drop(r.watcher);
}

#[test]
fn test_console_of_xenconsoled_is_left_untouched() {
    // xl creates backend/console/<domid>/0 for every PV guest with its frontend at
    // /local/domain/<domid>/console, type xenconsoled: xenconsoled serves it, not us.
    let r = rig(&[], ConsoleLimits::default());
    let d = r.guest.domid();
    let ts = r.host.toolstack().unwrap();
    let xs = ts.xs();
    let be0 = format!("/local/domain/0/backend/console/{d}/0");
    let fe0 = format!("/local/domain/{d}/console");
    for (k, v) in [
        ("frontend", fe0.as_str()),
        ("frontend-id", &d.to_string()),
        ("online", "1"),
        ("protocol", "vt100"),
        ("state", "1"),
    ] {
        xenbus::XsOps::write(xs, &format!("{be0}/{k}"), v.as_bytes()).unwrap();
    }
    xenbus::XsOps::write(xs, &format!("{fe0}/type"), b"xenconsoled").unwrap();
    // A secondary console given to xenconsoled too, and one given to us.
    let mut theirs = DeviceSpec::console(d, 1);
    theirs.frontend_ro = vec![("type".into(), "xenconsoled".into())];
    ts.add_device(&theirs).unwrap();
    ts.add_device(&DeviceSpec::console(d, 2)).unwrap();

    let ours = ConsoleFront::connect(&r.guest, 2, Duration::from_secs(10)).unwrap();
    ours.write(b"ours\n").unwrap();
    wait_for("our console", || r.lines.has(2, "ours"));

    for be in [be0, theirs.backend_path()] {
        let keys = xenbus::XsOps::directory(xs, &be).unwrap();
        assert_eq!(
            xenbus::XsOps::read(xs, &format!("{be}/state")).unwrap(),
            b"1",
            "{be} state changed"
        );
        assert!(
            !keys.iter().any(|k| k == "error" || k == "hotplug-status"),
            "{be} was written to: {keys:?}"
        );
    }
}

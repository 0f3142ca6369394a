//! A second `domio` process attached to a xensim daemon serves a guest: it maps the guest's
//! grant, binds its event channel and consumes its console output, and on SIGTERM closes
//! the device and lets go of every grant and port.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use xen::abi::grant_table::{GTF_READING, GTF_WRITING};
use xenbus::{XenbusState, XsOps};
use xensim::front::blk::{BlkFront, BlkFrontOptions, BlkOp};
use xensim::front::console::ConsoleFront;
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::DeviceSpec;

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn test_second_process_serves_guest_console_and_cleans_up_on_sigterm() {
    // Arrange: a host with one guest that has a console device.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xensim.sock");
    let host = Host::new().unwrap();
    let _server = Server::start(host.clone(), &sock).unwrap();
    let domid = host.create_domain("g", 1024).unwrap();
    let spec = DeviceSpec::console(domid, 0);
    let ts = host.toolstack().unwrap();
    ts.add_device(&spec).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();

    // Act: a separate domio process attaches through the socket.
    let mut child = Command::new(env!("CARGO_BIN_EXE_domio"))
        .args([
            "--log-format",
            "json",
            "--log",
            "info",
            "serve",
            "--domid",
            &domid.to_string(),
            "--xen",
        ])
        .arg(format!("sim:{}", sock.display()))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let front = ConsoleFront::connect(&guest, 0, Duration::from_secs(20))
        .expect("domio connects the console");
    // The ring page is the guest's first grant; the other process has it mapped now.
    let ring_gref = xensim::guest::FIRST_FREE_GREF;
    let mapped_flags = guest.grant_flags(ring_gref).unwrap();
    front.write(b"marker-7f3a from the guest\n").unwrap();
    let bound_while_serving = front.backend_port();
    let mut seen = false;
    let mut non_json = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !seen && Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            match serde_json::from_str::<serde_json::Value>(&l) {
                Ok(v) => {
                    seen = v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("marker-7f3a from the guest"))
                        && v["fields"]["domid"] == domid;
                }
                Err(_) => non_json.push(l),
            }
        }
    }
    wait_for(
        "domio to consume the output ring",
        Duration::from_secs(10),
        || front.unconsumed() == 0,
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();

    // Assert
    assert!(
        seen,
        "domio's JSON log never showed the guest's console line"
    );
    assert!(
        non_json.is_empty(),
        "log lines that are not JSON: {non_json:?}"
    );
    assert_eq!(
        bound_while_serving.map(|(d, _)| d),
        Some(0),
        "domio had not bound the guest's port"
    );
    assert_eq!(
        front.backend_port(),
        None,
        "domio exited without closing its event channel"
    );
    assert_eq!(
        mapped_flags & (GTF_READING | GTF_WRITING),
        GTF_READING | GTF_WRITING,
        "the ring grant was not mapped writable"
    );
    assert!(status.success(), "domio exited with {status}");
    let be_state = ts
        .xs()
        .read(&format!("{}/state", spec.backend_path()))
        .unwrap();
    assert_eq!(XenbusState::parse(&be_state).unwrap(), XenbusState::Closed);
    assert_eq!(
        guest.grant_flags(ring_gref).unwrap() & (GTF_READING | GTF_WRITING),
        0,
        "domio left the ring grant mapped after exiting"
    );
}

struct Served {
    _dir: tempfile::TempDir,
    _server: Server,
    host: std::sync::Arc<Host>,
    domid: u16,
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

/// A host with one guest and a `domio serve` child that has logged "domio serving".
fn served() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xensim.sock");
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &sock).unwrap();
    let domid = host.create_domain("g", 64).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_domio"))
        .args(["serve", "--domid", &domid.to_string(), "--xen"])
        .arg(format!("sim:{}", sock.display()))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("domio serve never logged 'domio serving'");
        if l.contains("domio serving") {
            break;
        }
    }
    Served {
        _dir: dir,
        _server: server,
        host,
        domid,
        child,
        lines: rx,
    }
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < end, "domio serve did not exit");
        std::thread::sleep(Duration::from_millis(20)); // polling a child's exit; not synchronisation of our own threads
    }
}

#[test]
fn test_serve_exits_zero_when_its_domain_is_destroyed() {
    let mut s = served();

    s.host.destroy_domain(s.domid).unwrap();
    let status = wait_exit(&mut s.child);

    assert!(status.success(), "{status}");
    let log: Vec<String> = s.lines.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("was destroyed")), "{log:?}");
}

#[test]
fn test_serve_exits_nonzero_when_xenstore_goes_away() {
    let mut s = served();

    s.host.xenstored().close_all_connections();
    let status = wait_exit(&mut s.child);

    assert_eq!(status.code(), Some(1), "{status}");
}

/// A xensim host serving `sock` in `dir`, with one guest whose 4 MiB raw `image` is a
/// qdisk (device 51712, as xl writes it).
struct QdiskGuest {
    sock: std::path::PathBuf,
    image: std::path::PathBuf,
    domid: u16,
    guest: Guest,
    host: std::sync::Arc<Host>,
    _server: Server,
}

/// `domio serve` for `domid` on the daemon at `sock`, with `extra` arguments; output dropped.
fn spawn_serve(sock: &std::path::Path, domid: u16, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_domio"))
        .args(["serve", "--domid", &domid.to_string()])
        .args(extra)
        .arg("--xen")
        .arg(format!("sim:{}", sock.display()))
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn qdisk_guest(dir: &std::path::Path) -> QdiskGuest {
    let sock = dir.join("xensim.sock");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &sock).unwrap();
    let domid = host.create_domain("g", 1024).unwrap();
    let spec = DeviceSpec::qdisk(domid, 51712, &image.display().to_string(), true);
    host.toolstack().unwrap().add_device(&spec).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    QdiskGuest {
        sock,
        image,
        domid,
        guest,
        host,
        _server: server,
    }
}

#[test]
fn test_control_socket_reports_stats_resizes_a_disk_and_survives_garbage() {
    // Arrange: a guest with a 4 MiB raw disk (qdisk, as xl writes it) served by a domio
    // process with a control socket.
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("control.sock");
    let rig = qdisk_guest(dir.path());
    let (sock, image, domid, guest) = (&rig.sock, &rig.image, rig.domid, &rig.guest);
    let ctl_arg = ctl.display().to_string();
    let mut child = spawn_serve(sock, domid, &["--control", &ctl_arg]);
    let mut front =
        BlkFront::connect(guest, 51712, BlkFrontOptions::default()).expect("blkback connects");
    let q = front.queue(0).unwrap();
    let c = q
        .run_one(
            BlkOp::Write {
                sector: 8,
                data: &[0x5a; 4096],
            },
            None,
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(c.status, 0);
    let stream = std::os::unix::net::UnixStream::connect(&ctl).expect("control socket");
    let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
    let greeting: serde_json::Value =
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let mut ask = |req: &str| -> serde_json::Value {
        use std::io::Write;
        (&stream).write_all(format!("{req}\n").as_bytes()).unwrap();
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
    };

    // Act
    let devices = ask(r#"{"execute":"devices"}"#);
    let stats = ask(r#"{"execute":"stats"}"#);
    let garbage = ask("this is not json {{{");
    let unknown = ask(r#"{"execute":"self-destruct"}"#);
    std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let resized = ask(r#"{"execute":"resize","arguments":{"devid":51712}}"#);
    let seen_by_guest = front.refresh_sectors().unwrap();

    // Assert
    assert_eq!(greeting["domio"]["domid"], domid, "{greeting}");
    assert!(
        devices["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["type"] == "qdisk" && d["state"] == 4),
        "{devices}"
    );
    let blk = &stats["return"]["blk"][0];
    assert_eq!(blk["devid"], 51712, "{stats}");
    assert!(blk["stats"]["writes"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(garbage["error"]["class"], "GenericError", "{garbage}");
    assert_eq!(unknown["error"]["class"], "CommandNotFound", "{unknown}");
    assert_eq!(resized["return"]["sectors"], 16384, "{resized}");
    assert_eq!(seen_by_guest, 16384);
    front.close().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn test_serve_blk_grants_copy_serves_the_disk_without_mapping_guest_pages() {
    // Arrange: a 4 MiB raw disk served by `domio serve --blk-grants copy`.
    let dir = tempfile::tempdir().unwrap();
    let rig = qdisk_guest(dir.path());
    let (sock, image, domid, guest) = (&rig.sock, &rig.image, rig.domid, &rig.guest);
    let mut child = spawn_serve(sock, domid, &["--blk-grants", "copy"]);

    // Act: the guest writes a block, reads it back, and looks at what was offered.
    let mut front =
        BlkFront::connect(guest, 51712, BlkFrontOptions::default()).expect("blkback connects");
    let be = format!("/local/domain/0/backend/qdisk/{domid}/51712");
    let offered = front
        .link()
        .xs()
        .read(&format!("{be}/feature-persistent"))
        .unwrap();
    let q = front.queue(0).unwrap();
    let persistent = q.persistent();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let w = q
        .run_one(
            BlkOp::Write {
                sector: 16,
                data: &pattern,
            },
            None,
            Duration::from_secs(10),
        )
        .unwrap();
    let mut back = vec![0u8; 4096];
    let r = q
        .run_one(
            BlkOp::Read {
                sector: 16,
                len: 4096,
            },
            Some(&mut back),
            Duration::from_secs(10),
        )
        .unwrap();
    let _ = front.close();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();

    // Assert: no persistent grants offered (copy mode maps nothing), and the data went
    // through both ways.
    assert_eq!(offered, b"0");
    assert!(!persistent);
    assert_eq!((w.status, r.status), (0, 0));
    assert_eq!(back, pattern, "read back differs");
    assert_eq!(
        std::fs::read(image).unwrap()[16 * 512..16 * 512 + 4096],
        pattern[..]
    );
    assert!(status.success(), "{status:?}");
}

/// libxl 4.17's argv for a PV guest's device model, with the QMP sockets in `dir`.
fn libxl_pv_argv(domid: u16, dir: &std::path::Path) -> Vec<String> {
    let libxl = dir.join(format!("qmp-libxl-{domid}"));
    let stat = dir.join(format!("qmp-libxenstat-{domid}"));
    let mut v: Vec<String> = ["-xen-domid", &domid.to_string(), "-no-shutdown"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (id, p) in [("libxl-cmd", &libxl), ("libxenstat-cmd", &stat)] {
        v.push("-chardev".into());
        v.push(format!(
            "socket,id={id},path={},server=on,wait=off",
            p.display()
        ));
        v.push("-mon".into());
        v.push(format!("chardev={id},mode=control"));
    }
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-xen-attach",
        "-name",
        "g",
        "-vnc",
        "none",
        "-display",
        "none",
        "-nographic",
        "-machine",
        "xenpv",
        "-m",
        "4",
    ] {
        v.push(s.into());
    }
    v
}

/// Sends `req` lines on a fresh QMP connection and returns every JSON reply (greeting first).
fn qmp_session(path: &std::path::Path, reqs: &[&str]) -> Vec<serde_json::Value> {
    use std::io::Write;
    let s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    out.push(serde_json::from_str(&line).unwrap());
    for q in reqs {
        w.write_all(format!("{q}\r\n").as_bytes()).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        out.push(serde_json::from_str(&line).unwrap());
    }
    out
}

#[test]
fn test_qemu_style_device_model_serves_qdisk_answers_qmp_and_stops_on_sighup() {
    // Arrange: a guest with a qdisk, and domio started as libxl starts a PV device model.
    let dir = tempfile::tempdir().unwrap();
    let rig = qdisk_guest(dir.path());
    let domid = rig.domid;
    let mut child = Command::new(env!("CARGO_BIN_EXE_domio"))
        .args(libxl_pv_argv(domid, dir.path()))
        .env("DOMIO_XEN", format!("sim:{}", rig.sock.display()))
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let toolstack = rig.host.toolstack().unwrap();
    let xs = toolstack.xs();
    let state = format!("/local/domain/0/device-model/{domid}/state");

    // Act: wait for the readiness libxl waits for, talk QMP as libxl does, use the disk.
    wait_for(
        "device-model state running",
        Duration::from_secs(20),
        || xs.try_read(&state).ok().flatten().as_deref() == Some(&b"running"[..]),
    );
    let qmp = dir.path().join(format!("qmp-libxl-{domid}"));
    let replies = qmp_session(
        &qmp,
        &[
            r#"{"execute":"qmp_capabilities","id":1}"#,
            r#"{"execute":"query-chardev","id":2}"#,
            r#"{"execute":"query-status","id":3}"#,
            "{this is not json",
        ],
    );
    let mut front =
        BlkFront::connect(&rig.guest, 51712, BlkFrontOptions::default()).expect("qdisk connects");
    let q = front.queue(0).unwrap();
    let data = vec![0x5au8; 4096];
    let w = q
        .run_one(
            BlkOp::Write {
                sector: 8,
                data: &data,
            },
            None,
            Duration::from_secs(10),
        )
        .unwrap();
    let _ = front.close();
    let backends = xs
        .directory(&format!("/local/domain/0/device-model/{domid}/backends"))
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let status = wait_exit(&mut child);

    // Assert
    assert_eq!(replies[0]["QMP"]["version"]["qemu"]["major"], 7);
    assert_eq!(replies[1]["return"], serde_json::json!({}));
    let labels: Vec<&str> = replies[2]["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["libxl-cmd", "libxenstat-cmd"]);
    assert_eq!(replies[3]["return"]["status"], "running");
    assert_eq!(replies[4]["error"]["class"], "GenericError");
    assert!(backends.contains(&"qdisk".to_string()), "{backends:?}");
    assert_eq!(w.status, 0);
    assert_eq!(
        std::fs::read(&rig.image).unwrap()[8 * 512..8 * 512 + 4096],
        data[..]
    );
    assert!(status.success(), "{status:?}");
    assert!(!qmp.exists(), "the QMP socket is removed at exit");
}

#[test]
fn test_qemu_style_device_model_refuses_an_unknown_option_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_domio"))
        .args(["-xen-domid", "3", "-machine", "xenpv", "-frobnicate"])
        .env("DOMIO_XEN", "sim:/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown qemu option -frobnicate"), "{err}");
}

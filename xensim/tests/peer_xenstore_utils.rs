//! Peer tests: Debian's xenstore-utils (libxenstore 4.17) against our xenstored.
//!
//! The tools find the daemon through `XENSTORED_PATH` (libxenstore 4.17 uses it for both
//! the socket and the "domain device", so `/dev/xen/xenbus` is never tried); we also
//! remove `XENSTORED_RUNDIR` so nothing else is consulted. If the tools are missing the
//! tests fail: install them with `apt-get install -y xenstore-utils`.

mod xenstored_common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use xensim::xenstored::{Listener, Quotas, Xenstored, XsError};
use xenstored_common::Client;

const WAIT: Duration = Duration::from_secs(10);

fn tool(name: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&dirs).chain([PathBuf::from("/usr/bin")]) {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found: the peer tests need Debian's xenstore-utils \
         (apt-get install -y xenstore-utils)"
    );
}

struct Peer {
    xs: Arc<Xenstored>,
    listener: Listener,
    _dir: tempfile::TempDir,
}

impl Peer {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let xs = Xenstored::new(Quotas::default());
        let listener = xs.listen(dir.path().join("socket")).unwrap();
        Peer {
            xs,
            listener,
            _dir: dir,
        }
    }

    fn sock(&self) -> &Path {
        self.listener.path()
    }

    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(tool(name));
        c.env("XENSTORED_PATH", self.sock())
            .env_remove("XENSTORED_RUNDIR")
            .stdin(Stdio::null());
        c
    }

    /// Runs a tool to completion (bounded by WAIT).
    fn run(&self, name: &str, args: &[&str]) -> Output {
        let child = self
            .cmd(name)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        rx.recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{name} {args:?} did not finish"))
            .unwrap()
    }

    fn ok(&self, name: &str, args: &[&str]) -> String {
        let o = self.run(name, args);
        assert!(
            o.status.success(),
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

#[test]
fn test_peer_xenstore_write_then_read_roundtrips() {
    // Arrange
    let p = Peer::new();
    // Act
    p.ok("xenstore-write", &["/peer/a", "hello", "/peer/b", "world"]);
    let out = p.ok("xenstore-read", &["/peer/a", "/peer/b"]);
    // Assert
    assert_eq!(out, "hello\nworld\n");
    assert_eq!(p.xs.read(0, "/peer/a").unwrap(), b"hello");
}

#[test]
fn test_peer_xenstore_read_missing_fails() {
    let p = Peer::new();
    let o = p.run("xenstore-read", &["/peer/none"]);
    assert!(!o.status.success());
}

#[test]
fn test_peer_xenstore_ls_shows_tree_and_values() {
    // Arrange
    let p = Peer::new();
    p.xs.write(0, "/peer/dev/vif/0/state", b"4").unwrap();
    p.xs.write(0, "/peer/dev/name", b"guest one").unwrap();
    // Act
    let out = p.ok("xenstore-ls", &["/peer"]);
    // Assert
    let lines: Vec<String> = out.lines().map(|l| l.trim_end().to_owned()).collect();
    assert_eq!(
        lines,
        [
            "dev = \"\"",
            " vif = \"\"",
            "  0 = \"\"",
            "   state = \"4\"",
            " name = \"guest one\"",
        ],
        "{out}"
    );
    let list = p.ok("xenstore-list", &["/peer/dev"]);
    assert_eq!(list, "vif\nname\n");
}

#[test]
fn test_peer_xenstore_rm_removes_subtree() {
    let p = Peer::new();
    p.xs.write(0, "/peer/gone/a/b", b"x").unwrap();
    p.xs.write(0, "/peer/kept", b"y").unwrap();
    p.ok("xenstore-rm", &["/peer/gone"]);
    assert_eq!(p.xs.read(0, "/peer/gone/a/b").unwrap_err(), XsError::NoEnt);
    assert_eq!(p.xs.read(0, "/peer/kept").unwrap(), b"y");
    assert!(!p.run("xenstore-exists", &["/peer/gone"]).status.success());
    assert!(p.run("xenstore-exists", &["/peer/kept"]).status.success());
}

#[test]
fn test_peer_xenstore_chmod_then_domu_access_denied_and_granted() {
    // Arrange
    let p = Peer::new();
    p.xs.introduce_domain(5);
    p.ok("xenstore-write", &["/peer/cfg", "secret"]);
    let mut g = Client::new(p.xs.connect_as(5).unwrap());
    // Act: owner dom0, nobody else.
    p.ok("xenstore-chmod", &["/peer/cfg", "n0"]);
    let denied = g.read("/peer/cfg");
    // Then read access for domain 5 only.
    p.ok("xenstore-chmod", &["/peer/cfg", "n0", "r5"]);
    let granted = g.read("/peer/cfg");
    // Assert
    assert_eq!(denied.unwrap_err(), "EACCES");
    assert_eq!(granted.unwrap(), b"secret");
    assert_eq!(g.write("/peer/cfg", b"x").unwrap_err(), "EACCES");
    let perms: Vec<String> =
        p.xs.get_perms(0, "/peer/cfg")
            .unwrap()
            .iter()
            .map(|p| p.to_wire())
            .collect();
    assert_eq!(perms, ["n0", "r5"]);
}

#[test]
fn test_peer_xenstore_watch_sees_event() {
    // Arrange
    let p = Peer::new();
    p.xs.mkdir(0, "/peer/w").unwrap();
    let mut child = p
        .cmd("xenstore-watch")
        .args(["-n", "2", "/peer/w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first event is the watch's own registration: from then on it is active.
    let first = rx.recv_timeout(WAIT).expect("initial watch event").unwrap();
    // Act
    p.xs.write(0, "/peer/w/changed", b"1").unwrap();
    let second = rx.recv_timeout(WAIT).expect("change event").unwrap();
    // Assert
    assert_eq!(first, "/peer/w");
    assert_eq!(second, "/peer/w/changed");
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = etx.send(child.wait());
    });
    let status = erx
        .recv_timeout(WAIT)
        .expect("xenstore-watch -n 2 exits")
        .unwrap();
    assert!(status.success());
}

#[test]
fn test_peer_xenstore_list_large_directory_uses_directory_part() {
    // Arrange: a listing over 4096 bytes, which XS_DIRECTORY refuses with E2BIG;
    // libxenstore then pages through XS_DIRECTORY_PART.
    let p = Peer::new();
    let name = |i: usize| format!("entry-{i:03}-{}", "z".repeat(40));
    for i in 0..150 {
        p.xs.mkdir(0, &format!("/peer/big/{}", name(i))).unwrap();
    }
    // Act
    let out = p.ok("xenstore-list", &["/peer/big"]);
    // Assert
    let got: Vec<&str> = out.lines().collect();
    let want: Vec<String> = (0..150).map(name).collect();
    assert_eq!(got, want);
}

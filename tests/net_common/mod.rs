//! Network namespaces for the netback tests: real Linux networking, isolated per test.
//!
//! Every test runs on a thread in a fresh, anonymous network namespace ([`in_netns`]): the
//! tap, the bridge and one end of a veth pair live there, and interface names cannot clash
//! with other tests or the host. The "Linux host" the guest talks to is a second anonymous
//! namespace ([`Peer`]) holding the other veth end with a Linux address. Both namespaces
//! are held only by threads and file descriptors of the test, so they and every interface
//! in them disappear when the test ends, passes or fails; nothing is named in /run/netns.
//!
//! Threads inherit their creator's network namespace, and so do child processes (`ip`,
//! `domio serve`), which is what puts them in the test's namespace.

#![allow(dead_code)]

pub mod netback;
#[allow(unsafe_code)]
mod sys;
pub mod tapdev;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use xensim::front::netstack::{fill_pattern, StreamSum};

/// Runs `cmd args...` and panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} {args:?}: {e} (the test needs iproute2)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip args...` in the calling thread's network namespace.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `f` on a new thread in a fresh network namespace (loopback up), and returns what it
/// returns; a panic in `f` fails the caller.
pub fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let h = std::thread::Builder::new()
        .name("netns-test".into())
        .spawn(move || {
            sys::unshare_net().expect("unshare(CLONE_NEWNET): the tests run as root");
            ip(&["link", "set", "lo", "up"]);
            f()
        })
        .expect("spawn test thread");
    match h.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// A second, anonymous network namespace kept alive by a descriptor.
pub struct Peer {
    ns: File,
}

impl Peer {
    /// A fresh namespace with loopback up.
    pub fn new() -> Peer {
        let ns = std::thread::spawn(|| {
            sys::unshare_net().expect("unshare(CLONE_NEWNET)");
            ip(&["link", "set", "lo", "up"]);
            // Let ICMP datagram sockets (unprivileged ping) be used by everyone here.
            std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
                .expect("set ping_group_range");
            File::open("/proc/thread-self/ns/net").expect("open our netns")
        })
        .join()
        .expect("peer namespace thread");
        Peer { ns }
    }

    /// A path naming the namespace (for `ip link set ... netns <path>`).
    pub fn path(&self) -> String {
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.ns.as_fd().as_raw_fd()
        )
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> JoinHandle<R> {
        let ns = self.ns.try_clone().expect("dup netns fd");
        std::thread::spawn(move || {
            sys::setns_net(ns.as_fd()).expect("setns into the peer namespace");
            drop(ns);
            f()
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        match self.spawn(f).join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Runs `ip args...` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.run(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            ip(&a)
        })
    }
}

/// The guest's side of the test LAN.
pub const GUEST_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x01];
/// The Linux peer's MAC.
pub const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// A bridge in the test's namespace with a veth into a [`Peer`] that has a Linux address:
/// the LAN a vif's tap is attached to.
pub struct Lan {
    /// The peer namespace.
    pub peer: Peer,
    /// The bridge's name (in the test's namespace).
    pub bridge: String,
    /// The peer's IPv4 address (/24).
    pub peer_ip: Ipv4Addr,
    /// The guest's IPv4 address on the LAN.
    pub guest_ip: Ipv4Addr,
    /// The peer's IPv6 address (/64).
    pub peer_ip6: Ipv6Addr,
    /// The guest's IPv6 address.
    pub guest_ip6: Ipv6Addr,
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lan {
    /// Builds the LAN in the calling thread's namespace (call it inside [`in_netns`]).
    /// `mtu` is set on the bridge and veth (the tap gets its own).
    pub fn new(mtu: u32) -> Lan {
        let peer = Peer::new();
        let bridge = "dbr0".to_string();
        let mtu_s = mtu.to_string();
        ip(&["link", "add", &bridge, "type", "bridge", "stp_state", "0"]);
        ip(&["link", "set", &bridge, "mtu", &mtu_s, "up"]);
        ip(&[
            "link", "add", "dve0", "mtu", &mtu_s, "type", "veth", "peer", "name", "dve1", "mtu",
            &mtu_s,
        ]);
        ip(&["link", "set", "dve0", "master", &bridge, "up"]);
        ip(&["link", "set", "dve1", "netns", &peer.path()]);
        let mac = mac_str(PEER_MAC);
        peer.ip(&["link", "set", "dve1", "address", &mac, "up"]);
        peer.ip(&["addr", "add", "10.77.0.2/24", "dev", "dve1"]);
        peer.ip(&["addr", "add", "fd00:77::2/64", "dev", "dve1", "nodad"]);
        Lan {
            peer,
            bridge,
            peer_ip: Ipv4Addr::new(10, 77, 0, 2),
            guest_ip: Ipv4Addr::new(10, 77, 0, 1),
            peer_ip6: "fd00:77::2".parse().expect("v6"),
            guest_ip6: "fd00:77::1".parse().expect("v6"),
        }
    }

    /// Starts a TCP server in the peer that accepts one connection and either sends
    /// `send` bytes of the test pattern (then closes) or, with `send == 0`, reads until EOF.
    /// Returns the listening address and a handle giving the checksum of what it moved.
    pub fn tcp_server(&self, port: u16, send: u64) -> (SocketAddr, JoinHandle<StreamSum>) {
        self.tcp_server_with(port, send, true)
    }

    /// [`Lan::tcp_server`]; with `hash == false` it only counts bytes (sending zeros).
    pub fn tcp_server_with(
        &self,
        port: u16,
        send: u64,
        hash: bool,
    ) -> (SocketAddr, JoinHandle<StreamSum>) {
        let addr = SocketAddr::from((self.peer_ip, port));
        let (tx, rx) = std::sync::mpsc::channel();
        let h = self.peer.spawn(move || {
            let l = TcpListener::bind(addr).expect("bind the peer's server");
            tx.send(()).expect("report listening");
            let (s, _) = l.accept().expect("accept");
            match (send > 0, hash) {
                (true, true) => linux_send(s, send),
                (false, true) => linux_recv(s),
                (true, false) => linux_send_count(s, send),
                (false, false) => linux_recv_count(s),
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the peer's server listens");
        (addr, h)
    }

    /// Connects from the peer to `addr` and sends `n` pattern bytes, or receives to EOF
    /// when `n == 0`.
    pub fn tcp_client(&self, addr: SocketAddr, n: u64) -> JoinHandle<StreamSum> {
        self.peer.spawn(move || {
            let s = connect_retry(addr, Duration::from_secs(20));
            if n > 0 {
                linux_send(s, n)
            } else {
                linux_recv(s)
            }
        })
    }

    /// Pings `to` from the peer with an ICMP datagram socket; returns whether `count`
    /// replies came back within `timeout` each.
    pub fn peer_ping(&self, to: Ipv4Addr, count: u16, timeout: Duration) -> JoinHandle<u16> {
        self.peer.spawn(move || icmp_ping(to, count, timeout))
    }
}

fn connect_retry(addr: SocketAddr, timeout: Duration) -> TcpStream {
    let end = std::time::Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return s,
            // The guest's listener may not be up yet: a refused connection is retried; the
            // connect itself blocks on the network, never on a timer of ours.
            Err(e) if std::time::Instant::now() < end => {
                if e.kind() != std::io::ErrorKind::ConnectionRefused
                    && e.kind() != std::io::ErrorKind::TimedOut
                {
                    panic!("connect to {addr}: {e}");
                }
            }
            Err(e) => panic!("connect to {addr}: {e}"),
        }
    }
}

/// Sends `n` bytes of the pattern on a Linux socket, then shuts down writing and waits for
/// the peer to close.
pub fn linux_send(mut s: TcpStream, n: u64) -> StreamSum {
    let mut sum = StreamSum::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = buf.len().min((n - off) as usize);
        fill_pattern(off, &mut buf[..k]);
        s.write_all(&buf[..k]).expect("send to the guest");
        sum.update(&buf[..k]);
        off += k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    sum
}

/// Sends `n` zero bytes, counting only.
pub fn linux_send_count(mut s: TcpStream, n: u64) -> StreamSum {
    let buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = buf.len().min((n - off) as usize);
        s.write_all(&buf[..k]).expect("send to the guest");
        off += k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mut sum = StreamSum::default();
    sum.bytes = n;
    sum
}

/// Reads a Linux socket to EOF, counting only.
pub fn linux_recv_count(mut s: TcpStream) -> StreamSum {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = StreamSum::default();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => sum.bytes += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("receive from the guest: {e}"),
        }
    }
    sum
}

/// Reads a Linux socket to EOF and hashes what came.
pub fn linux_recv(mut s: TcpStream) -> StreamSum {
    let mut sum = StreamSum::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => sum.update(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("receive from the guest: {e}"),
        }
    }
    sum
}

/// Sends `count` echo requests to `to` (an ICMP datagram socket: the kernel fills in the
/// identifier and checksum) and counts the replies.
pub fn icmp_ping(to: Ipv4Addr, count: u16, timeout: Duration) -> u16 {
    let s = sys::icmp_socket().expect("ICMP datagram socket");
    s.set_read_timeout(Some(timeout)).expect("SO_RCVTIMEO");
    s.connect((to, 0)).expect("connect the ping socket");
    let mut got = 0;
    for seq in 1..=count {
        let mut req = vec![8u8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&seq.to_be_bytes());
        req.extend_from_slice(b"linux-peer-ping");
        s.send(&req).expect("send echo request");
        let mut buf = [0u8; 256];
        loop {
            match s.recv(&mut buf) {
                Ok(n) if n >= 8 && buf[0] == 0 && buf[6..8] == seq.to_be_bytes() => {
                    got += 1;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    got
}

//! End-to-end network tests against real Linux networking, in network namespaces each test
//! creates (tests/net_common): a bridge, the vif's tap on it, and a veth into a second
//! namespace where a Linux address and plain `std::net` servers live.
//!
//! * `guest_stack_over_tap_*`: the simulated guest's TCP/IP stack (xensim's smoltcp
//!   netstack) straight on the tap engine, no netback in between: ARP and ping both ways,
//!   and 100 MB of TCP in each direction with checksums compared at both ends, with and
//!   without offloads (GSO super-frames and blank checksums through the tap).
//! * `netback_*`: the full path. A xensim host and guest, the toolstack's vif (bridge
//!   `dbr0`), domio's netback (`NetDriver` with the real tap engine, behind a
//!   `BackendWatcher` attached through the simulated host's socket, as `domio serve --xen
//!   sim:PATH` attaches), xensim's netfront, and the guest stack on the netfront queue:
//!   ARP and ping both ways, 100 MB of TCP each way with checksums, multicast control,
//!   anti-spoofing, and the rate limit.

mod net_common;

use std::time::Duration;

use std::time::Instant;

use backends::net::tap::hotplug::{HostSetup, HostSide};
use backends::net::tap::{Offloads, Tap, TapOptions, VifId};
use backends::net::NetStats;
use net_common::netback::netback_rig;
use net_common::tapdev::TapFrameDevice;
use net_common::{in_netns, Lan, GUEST_MAC};
use xensim::front::frame::{FrameDevice, FrameMeta};
use xensim::front::net::{NetFrontOptions, NetQueue};
use xensim::front::netstack::{NetConfig, NetStack};

const T: Duration = Duration::from_secs(120);

/// Megabytes each TCP test moves per direction (`DOMIO_NET_E2E_MB`, default 100).
fn transfer_bytes() -> u64 {
    let mb = std::env::var("DOMIO_NET_E2E_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100u64);
    mb << 20
}

struct TapGuest {
    stack: NetStack<TapFrameDevice>,
    _host: HostSide,
    _tap: Tap,
}

fn guest_on_tap(lan: &Lan, offloads: bool) -> TapGuest {
    let vif = VifId { domid: 3, devid: 0 };
    let tap = Tap::open(
        vif,
        &TapOptions {
            offloads: if offloads {
                Offloads {
                    csum: true,
                    tso4: true,
                    tso6: true,
                    tso_ecn: false,
                }
            } else {
                Offloads::default()
            },
            ..TapOptions::default()
        },
    )
    .expect("open the tap");
    let host = HostSide::online(vif, tap.name(), HostSetup::Bridge(lan.bridge.clone()))
        .expect("attach to the bridge");
    let dev = TapFrameDevice::new(tap.queues()[0].clone(), offloads, 1500);
    let stack = NetStack::new(dev, &NetConfig::ipv4(GUEST_MAC, lan.guest_ip, 24)).expect("stack");
    TapGuest {
        stack,
        _host: host,
        _tap: tap,
    }
}

fn ping_both_ways(offloads: bool) {
    in_netns(move || {
        // Arrange
        let lan = Lan::new(1500);
        let mut g = guest_on_tap(&lan, offloads);

        // Act: the guest pings Linux (ARP first), then Linux pings the guest while the
        // guest's stack runs.
        let rtts = g
            .stack
            .ping(lan.peer_ip, 3, Duration::from_secs(10))
            .expect("Linux answers the guest's pings");
        let peer = lan.peer_ping(lan.guest_ip, 3, Duration::from_secs(10));
        g.stack
            .run_until("Linux's pings to finish", T, |_| {
                Ok(peer.is_finished().then_some(()))
            })
            .expect("guest stack runs");
        let replies = peer.join().expect("peer ping thread");

        // Assert
        assert_eq!(rtts.len(), 3);
        assert_eq!(replies, 3, "the guest answered every ping from Linux");
    });
}

fn tcp_both_ways(offloads: bool) {
    in_netns(move || {
        // Arrange
        let n = transfer_bytes();
        let lan = Lan::new(1500);
        let mut g = guest_on_tap(&lan, offloads);

        // Act 1: guest -> Linux.
        let (addr, server) = lan.tcp_server(5001, 0);
        let h = g.stack.tcp_connect(addr, T).expect("connect to Linux");
        let up = g.stack.tcp_send_pattern(h, n, T).expect("send to Linux");
        let _ = g.stack.tcp_recv_all(h, T);
        let got = server.join().expect("Linux receiver");
        // Assert 1
        assert_eq!(up.sum.bytes, n);
        assert_eq!(got, up.sum, "Linux received what the guest sent");

        // Act 2: Linux -> guest (the guest connects; Linux sends).
        let (addr, server) = lan.tcp_server(5002, n);
        let h = g.stack.tcp_connect(addr, T).expect("connect to Linux");
        let got = g.stack.tcp_recv_all(h, T).expect("receive from Linux");
        g.stack.tcp_close(h, T).expect("close");
        let sent = server.join().expect("Linux sender");
        // Assert 2
        assert_eq!(got.sum.bytes, n);
        assert_eq!(got.sum, sent, "the guest received what Linux sent");

        let st = g.stack.stats();
        eprintln!(
            "offloads={offloads}: guest->linux {:.0} Mbit/s, linux->guest {:.0} Mbit/s, {st:?}",
            n as f64 * 8.0 / up.elapsed.as_secs_f64() / 1e6,
            n as f64 * 8.0 / got.elapsed.as_secs_f64() / 1e6,
        );
        if offloads {
            assert!(st.tx_gso > 0, "the guest sent GSO super-frames: {st:?}");
            assert!(
                st.rx_gso > 0,
                "Linux sent GSO super-frames through the tap: {st:?}"
            );
        } else {
            assert_eq!(st.tx_gso + st.rx_gso + st.tx_csum_blank, 0, "{st:?}");
        }
    });
}

#[test]
fn test_guest_stack_over_tap_arp_and_ping_both_ways() {
    ping_both_ways(false);
}

#[test]
fn test_guest_stack_over_tap_arp_and_ping_both_ways_with_offloads() {
    ping_both_ways(true);
}

#[test]
fn test_guest_stack_over_tap_tcp_100mb_each_way_checksums_match() {
    tcp_both_ways(false);
}

#[test]
fn test_guest_stack_over_tap_tcp_100mb_each_way_with_gso_checksums_match() {
    tcp_both_ways(true);
}

// ------------------------------------------------------------------ through netback

fn guest_stack(q: NetQueue, lan: &Lan) -> NetStack<NetQueue> {
    NetStack::new(q, &NetConfig::ipv4(GUEST_MAC, lan.guest_ip, 24)).expect("guest stack")
}

#[test]
fn test_netback_arp_and_ping_both_ways() {
    in_netns(|| {
        // Arrange
        let lan = Lan::new(1500);
        let mut rig = netback_rig(Some(&lan.bridge), None, NetFrontOptions::default());
        let mut g = guest_stack(rig.queue(), &lan);

        // Act
        let rtts = g
            .ping(lan.peer_ip, 3, Duration::from_secs(10))
            .expect("Linux answers the guest through netback");
        let peer = lan.peer_ping(lan.guest_ip, 3, Duration::from_secs(10));
        g.run_until("Linux's pings to finish", T, |_| {
            Ok(peer.is_finished().then_some(()))
        })
        .expect("guest stack runs");
        let replies = peer.join().expect("peer ping");

        // Assert
        assert_eq!(rtts.len(), 3);
        assert_eq!(
            replies, 3,
            "the guest answered Linux's pings through netback"
        );
        let st = rig.stats();
        assert!(st.tx_packets >= 4 && st.rx_packets >= 4, "{st:?}");
    });
}

fn netback_tcp(opts: NetFrontOptions, n: u64) -> NetStats {
    in_netns(move || {
        // Arrange
        let lan = Lan::new(1500);
        let mut rig = netback_rig(Some(&lan.bridge), None, opts);
        let mut g = guest_stack(rig.queue(), &lan);

        // Act 1: guest -> Linux.
        let (addr, server) = lan.tcp_server(5001, 0);
        let h = g.tcp_connect(addr, T).expect("connect through netback");
        let up = g.tcp_send_pattern(h, n, T).expect("send through netback");
        let _ = g.tcp_recv_all(h, T);
        let got = server.join().expect("Linux receiver");
        // Assert 1
        assert_eq!(up.sum.bytes, n);
        assert_eq!(got, up.sum, "Linux received what the guest sent");

        // Act 2: Linux -> guest.
        let (addr, server) = lan.tcp_server(5002, n);
        let h = g.tcp_connect(addr, T).expect("connect through netback");
        let down = g.tcp_recv_all(h, T).expect("receive through netback");
        g.tcp_close(h, T).expect("close");
        let sent = server.join().expect("Linux sender");
        // Assert 2
        assert_eq!(down.sum.bytes, n);
        assert_eq!(down.sum, sent, "the guest received what Linux sent");
        let st = rig.stats();
        eprintln!(
            "netback: guest->linux {:.0} Mbit/s, linux->guest {:.0} Mbit/s, guest {:?}, netback {st:?}",
            n as f64 * 8.0 / up.elapsed.as_secs_f64() / 1e6,
            n as f64 * 8.0 / down.elapsed.as_secs_f64() / 1e6,
            g.stats()
        );
        st
    })
}

#[test]
fn test_netback_tcp_100mb_each_way_with_gso_checksums_match() {
    let st = netback_tcp(NetFrontOptions::default(), transfer_bytes());
    assert!(
        st.tx_gso_packets > 0,
        "the guest's GSO super-frames crossed netback: {st:?}"
    );
    assert!(
        st.rx_gso_packets > 0,
        "Linux's GSO frames reached the guest: {st:?}"
    );
}

#[test]
fn test_netback_tcp_without_offloads_checksums_match() {
    let opts = NetFrontOptions {
        sg: false,
        gso: false,
        csum_offload: false,
        ipv6_csum_offload: false,
        ..NetFrontOptions::default()
    };
    let st = netback_tcp(opts, transfer_bytes() / 4);
    assert_eq!(st.tx_gso_packets + st.rx_gso_packets, 0, "{st:?}");
}

/// Receives frames on a raw netfront queue until `stop` says so or `timeout` passes.
fn drain_until(q: &mut NetQueue, timeout: Duration, mut stop: impl FnMut(&[u8]) -> bool) -> bool {
    let end = Instant::now() + timeout;
    let mut buf = Vec::new();
    loop {
        while let Some(_m) = q.recv(&mut buf).expect("netfront recv") {
            if stop(&buf) {
                return true;
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        q.wait(left.min(Duration::from_millis(100)))
            .expect("netfront wait");
    }
}

#[test]
fn test_netback_multicast_control_delivers_only_subscribed_groups() {
    in_netns(|| {
        // Arrange: a frontend with multicast control, subscribed to 239.1.1.1 only.
        let lan = Lan::new(1500);
        lan.peer.ip(&["route", "add", "224.0.0.0/4", "dev", "dve1"]);
        let opts = NetFrontOptions {
            multicast_control: true,
            ..NetFrontOptions::default()
        };
        let mut rig = netback_rig(Some(&lan.bridge), None, opts);
        let mut q = rig.queue();
        let group_a = [0x01, 0x00, 0x5e, 0x01, 0x01, 0x01];
        let before = rig.stats();
        let end = Instant::now() + T;
        while !q.mcast(true, group_a).expect("multicast add") {
            assert!(Instant::now() < end, "TX ring never had room for the add");
            q.wait(Duration::from_millis(100)).expect("wait");
        }
        let end = Instant::now() + T;
        while rig.stats().mcast_ops == before.mcast_ops {
            assert!(Instant::now() < end, "netback never applied the add");
            q.wait(Duration::from_millis(10)).expect("wait");
        }

        // Act: Linux sends to both groups, then to the subscribed one as a marker.
        let peer_ip = lan.peer_ip;
        lan.peer.run(move || {
            let s = std::net::UdpSocket::bind((peer_ip, 0)).unwrap();
            for _ in 0..5 {
                s.send_to(b"to-b", ("239.1.1.2", 9)).unwrap();
                s.send_to(b"to-a", ("239.1.1.1", 9)).unwrap();
            }
            s.send_to(b"end-a", ("239.1.1.1", 9)).unwrap();
        });
        let mut a = 0;
        let mut b = 0;
        let done = drain_until(&mut q, T, |f| {
            if f.starts_with(&group_a) {
                a += 1;
            }
            if f.starts_with(&[0x01, 0x00, 0x5e, 0x01, 0x01, 0x02]) {
                b += 1;
            }
            f.ends_with(b"end-a")
        });

        // Assert
        assert!(done, "the subscribed group's frames arrive");
        assert_eq!(a, 6);
        assert_eq!(b, 0, "the unsubscribed group is filtered");
        let st = rig.stats();
        assert!(st.rx_mcast_drops >= 5, "{st:?}");
    });
}

#[test]
fn test_netback_drops_spoofed_source_macs_and_counts_them() {
    in_netns(|| {
        // Arrange: a Linux UDP receiver, and a guest that sends one frame with a forged
        // source MAC, then one with its own.
        let lan = Lan::new(1500);
        let mut rig = netback_rig(Some(&lan.bridge), None, NetFrontOptions::default());
        let mut q = rig.queue();
        let peer_ip = lan.peer_ip;
        let (tx, rx) = std::sync::mpsc::channel();
        let recv = lan.peer.spawn(move || {
            let s = std::net::UdpSocket::bind((peer_ip, 9999)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            tx.send(()).unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 2048];
            while let Ok((n, _)) = s.recv_from(&mut b) {
                got.push(b[..n].to_vec());
                if b[..n].ends_with(b"genuine") {
                    break;
                }
            }
            got
        });
        rx.recv().unwrap();
        let udp = |src: [u8; 6], payload: &[u8]| -> Vec<u8> {
            let mut f = Vec::new();
            f.extend_from_slice(&net_common::PEER_MAC);
            f.extend_from_slice(&src);
            f.extend_from_slice(&[0x08, 0x00]);
            let total = (20 + 8 + payload.len()) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2]);
            let mut s: u32 = ip
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            ip[10..12].copy_from_slice(&(!(s as u16)).to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&4000u16.to_be_bytes());
            f.extend_from_slice(&9999u16.to_be_bytes());
            f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
            f.extend_from_slice(payload);
            f
        };
        // Linux must know the guest's MAC to... not needed: UDP needs no reply.
        let forged = [0x00, 0x16, 0x3e, 0x66, 0x66, 0x66];

        // Act
        for (src, p) in [(forged, &b"forged"[..]), (GUEST_MAC, &b"genuine"[..])] {
            let f = udp(src, p);
            let end = Instant::now() + T;
            while !q.send(&f, FrameMeta::default()).expect("send") {
                assert!(Instant::now() < end, "TX ring full");
                q.wait(Duration::from_millis(100)).expect("wait");
            }
        }
        let got = recv.join().expect("receiver");

        // Assert
        assert_eq!(
            got,
            vec![b"genuine".to_vec()],
            "only the genuine frame reached Linux"
        );
        let st = rig.stats();
        assert_eq!(st.tx_spoofed, 1, "{st:?}");
    });
}

#[test]
fn test_netback_rate_limit_holds_within_10_percent() {
    in_netns(|| {
        // Arrange: rate = 200 kB per 50 ms (4 MB/s). The guest keeps its TX ring full of
        // full-size UDP frames (1514 bytes: the credit a frame cannot use at the end of an
        // interval is under 0.1%), so the limiter is the only bottleneck.
        let rate_bytes = 200_000u64;
        let rate_usec = 50_000u32;
        let limit = rate_bytes as f64 / (f64::from(rate_usec) / 1e6);
        let lan = Lan::new(1500);
        let mut rig = netback_rig(
            Some(&lan.bridge),
            Some((rate_bytes, rate_usec)),
            NetFrontOptions::default(),
        );
        let mut q = rig.queue();
        let mut f = Vec::with_capacity(1514);
        f.extend_from_slice(&net_common::PEER_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0x05, 0xdc, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&lan.guest_ip.octets());
        f.extend_from_slice(&lan.peer_ip.octets());
        f.extend_from_slice(&[0x0f, 0xa0, 0x00, 0x09, 0x05, 0xc8, 0, 0]);
        f.resize(1514, 0x5a);
        let send_for = |q: &mut NetQueue, d: Duration| {
            let end = Instant::now() + d;
            while Instant::now() < end {
                while q.send(&f, FrameMeta::default()).expect("send") {}
                q.wait(Duration::from_millis(5)).expect("wait");
            }
        };

        // Act: half a second to spend the initial burst, then three measured seconds.
        send_for(&mut q, Duration::from_millis(500));
        let (s0, t0) = (rig.stats(), Instant::now());
        send_for(&mut q, Duration::from_secs(3));
        let (s1, t1) = (rig.stats(), Instant::now());

        // Assert: what netback wrote to the tap in the measured span is within 10% of the
        // configured rate (one 50 ms window of slack at either end is under 2%).
        let rate = (s1.tx_bytes - s0.tx_bytes) as f64 / (t1 - t0).as_secs_f64();
        eprintln!("rate limit {limit:.0} B/s, measured {rate:.0} B/s, {s1:?}");
        assert!(s1.tx_throttled > s0.tx_throttled, "{s1:?}");
        assert!(
            (rate - limit).abs() <= 0.10 * limit,
            "measured {rate:.0} B/s against a limit of {limit:.0} B/s"
        );
    });
}

#[test]
fn test_netback_two_queues_on_a_multi_queue_tap_carry_tcp_both_ways() {
    in_netns(|| {
        // Arrange: a frontend with two queues (split event channels), the guest stack over
        // both, and flows on several ports so the tap and the guest spread them.
        let lan = Lan::new(1500);
        let opts = NetFrontOptions {
            max_queues: 2,
            ..NetFrontOptions::default()
        };
        let config = backends::net::NetConfig {
            max_queues: 2,
            ..backends::net::NetConfig::default()
        };
        let mut rig = net_common::netback::netback_rig_with(Some(&lan.bridge), None, opts, config);
        let queues = rig.front.take_queues();
        assert_eq!(queues.len(), 2, "netback offers two queues here");
        let dev = net_common::netback::MultiQueue::new(queues);
        let mut g = NetStack::new(dev, &NetConfig::ipv4(GUEST_MAC, lan.guest_ip, 24)).unwrap();
        let n = 8u64 << 20;

        // Act: four connections each way.
        for port in 5100..5104u16 {
            let (addr, server) = lan.tcp_server(port, 0);
            let h = g.tcp_connect(addr, T).expect("connect");
            let up = g.tcp_send_pattern(h, n, T).expect("send");
            let _ = g.tcp_recv_all(h, T);
            assert_eq!(server.join().expect("receiver"), up.sum, "port {port} up");
            let (addr, server) = lan.tcp_server(port + 100, n);
            let h = g.tcp_connect(addr, T).expect("connect");
            let down = g.tcp_recv_all(h, T).expect("recv");
            g.tcp_close(h, T).expect("close");
            assert_eq!(
                server.join().expect("sender"),
                down.sum,
                "port {} down",
                port + 100
            );
        }

        // Assert: both queues carried frames in both directions.
        let per_queue: Vec<_> = g.device().queues().iter().map(|q| q.stats()).collect();
        eprintln!("per queue: {per_queue:?}, netback {:?}", rig.stats());
        for (i, s) in per_queue.iter().enumerate() {
            assert!(s.tx_frames > 0, "queue {i} sent nothing: {per_queue:?}");
            assert!(s.rx_frames > 0, "queue {i} received nothing: {per_queue:?}");
        }
    });
}

#[test]
fn test_netback_tcp_over_ipv6_with_gso_checksums_match() {
    in_netns(|| {
        // Arrange: the guest also has fd00:77::1/64; Linux has fd00:77::2.
        let lan = Lan::new(1500);
        let mut rig = netback_rig(Some(&lan.bridge), None, NetFrontOptions::default());
        let mut cfg = NetConfig::ipv4(GUEST_MAC, lan.guest_ip, 24);
        cfg.ipv6 = Some((lan.guest_ip6, 64));
        let mut g = NetStack::new(rig.queue(), &cfg).expect("stack");
        let n = transfer_bytes() / 4;
        let peer6 = lan.peer_ip6;
        let serve = |port: u16, send: u64| {
            let (tx, rx) = std::sync::mpsc::channel();
            let h = lan.peer.spawn(move || {
                let l = std::net::TcpListener::bind((peer6, port)).expect("bind v6");
                tx.send(()).unwrap();
                let (s, _) = l.accept().expect("accept");
                if send > 0 {
                    net_common::linux_send(s, send)
                } else {
                    net_common::linux_recv(s)
                }
            });
            rx.recv().unwrap();
            h
        };

        // Act: NDP, then TCP each way over IPv6.
        let server = serve(5601, 0);
        let addr = std::net::SocketAddr::from((peer6, 5601));
        let h = g.tcp_connect(addr, T).expect("connect over IPv6");
        let up = g.tcp_send_pattern(h, n, T).expect("send");
        let _ = g.tcp_recv_all(h, T);
        let got_up = server.join().expect("receiver");
        let server = serve(5602, n);
        let h = g
            .tcp_connect(std::net::SocketAddr::from((peer6, 5602)), T)
            .expect("connect over IPv6");
        let down = g.tcp_recv_all(h, T).expect("recv");
        g.tcp_close(h, T).expect("close");
        let sent_down = server.join().expect("sender");

        // Assert
        assert_eq!(got_up, up.sum);
        assert_eq!(down.sum, sent_down);
        let st = rig.stats();
        assert!(
            st.tx_gso_packets > 0 && st.rx_gso_packets > 0,
            "TCPv6 GSO both ways: {st:?}"
        );
    });
}

/// A `domio serve` child process, killed if the test ends early.
struct Serve(Option<std::process::Child>);

impl Serve {
    /// SIGTERM, then its exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.0.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM domio");
        c.wait().expect("wait for domio")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn test_netback_in_a_domio_serve_process_ping_and_tcp_then_sigterm_removes_the_tap() {
    in_netns(|| {
        // Arrange: a xensim daemon, the guest's vif on the bridge, and a separate `domio
        // serve --backend-types vif` attached through the daemon's socket (it inherits the
        // test's network namespace).
        let lan = Lan::new(1500);
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xensim.sock");
        let host = xensim::host::Host::new().unwrap();
        let _server = xensim::server::Server::start(host.clone(), &sock).unwrap();
        let domid = host.create_domain("served", 16384).unwrap();
        let nic = xensim::toolstack::VifNic {
            mac: GUEST_MAC,
            bridge: Some(lan.bridge.clone()),
            ..xensim::toolstack::VifNic::default()
        };
        host.toolstack()
            .unwrap()
            .add_device(&xensim::toolstack::DeviceSpec::vif(domid, 0, &nic))
            .unwrap();
        let mut serve = Serve(Some(
            std::process::Command::new(env!("CARGO_BIN_EXE_domio"))
                .args(["--log", "warn", "serve", "--domid", &domid.to_string()])
                .args(["--backend-types", "vif", "--xen"])
                .arg(format!("sim:{}", sock.display()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn domio serve"),
        ));
        let guest = xensim::guest::Guest::new(host.clone(), domid).unwrap();
        let mut front =
            xensim::front::net::NetFront::connect(&guest, 0, NetFrontOptions::default())
                .expect("netfront connects to the domio process");
        let mut g = guest_stack(front.take_queues().remove(0), &lan);
        let tap = format!("vif{domid}.0");

        // Act
        let rtts = g
            .ping(lan.peer_ip, 2, Duration::from_secs(10))
            .expect("ping Linux");
        let peer = lan.peer_ping(lan.guest_ip, 2, Duration::from_secs(10));
        g.run_until("Linux's pings", T, |_| Ok(peer.is_finished().then_some(())))
            .unwrap();
        let replies = peer.join().unwrap();
        let n = transfer_bytes() / 5;
        let (addr, server) = lan.tcp_server(5701, 0);
        let h = g.tcp_connect(addr, T).expect("connect");
        let up = g.tcp_send_pattern(h, n, T).expect("send");
        let _ = g.tcp_recv_all(h, T);
        let got_up = server.join().unwrap();
        let (addr, server) = lan.tcp_server(5702, n);
        let h = g.tcp_connect(addr, T).expect("connect");
        let down = g.tcp_recv_all(h, T).expect("recv");
        g.tcp_close(h, T).expect("close");
        let sent_down = server.join().unwrap();
        let tap_was_there = backends::net::tap::interface_exists(&tap);
        let status = serve.stop();

        // Assert
        assert_eq!((rtts.len(), replies), (2, 2));
        assert_eq!(got_up, up.sum);
        assert_eq!(down.sum, sent_down);
        assert!(tap_was_there, "{tap} existed while served");
        assert!(status.success(), "domio serve exited with {status}");
        assert!(
            !backends::net::tap::interface_exists(&tap),
            "{tap} is gone once domio has exited"
        );
    });
}

/// CPU time (user + system, in clock ticks) of this process's thread named `name`.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        return Some(utime + stime);
    }
    None
}

#[test]
fn test_netback_tap_deleted_under_a_running_vif_stops_that_queue_without_spinning() {
    in_netns(|| {
        // Arrange: a connected vif on its tap (no bridge).
        let rig = netback_rig(None, None, NetFrontOptions::default());
        let domid = rig.domid();
        let tap = format!("vif{domid}.0");
        let thread = format!("vif-d{domid}-0");
        assert!(net_common::ip(&["-o", "link", "show"]).contains(&tap));

        // Act: delete the tap under it (its descriptor now fails with EBADFD, POLLERR).
        net_common::ip(&["link", "del", &tap]);

        // Assert: the queue is given up once, reported on the error node...
        let end = Instant::now() + Duration::from_secs(10);
        while rig.stats().engine_failures == 0 {
            assert!(Instant::now() < end, "no engine failure: {:?}", rig.stats());
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = format!("/local/domain/0/backend/vif/{domid}/0/error");
        let err = rig.host().xenstored().read(0, &path).expect("error node");
        let err = String::from_utf8_lossy(&err);
        assert!(err.contains("engine queue 0 failed"), "{err}");
        // ...and the vif thread does not spin on the dead descriptor: over a second it uses
        // well under a tenth of a CPU (a busy loop uses all of one).
        let t0 = thread_cpu_ticks(&thread).expect("vif thread");
        let w0 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let used = thread_cpu_ticks(&thread).expect("vif thread") - t0;
        let ticks_per_s = 100.0; // USER_HZ
        let share = used as f64 / ticks_per_s / w0.elapsed().as_secs_f64();
        assert!(
            share < 0.1,
            "vif thread used {share:.2} CPU after its tap went"
        );
        assert_eq!(rig.stats().engine_failures, 1);
        assert_eq!(rig.stats().fatal_errors, 0);
    });
}

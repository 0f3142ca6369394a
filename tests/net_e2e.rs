//! End-to-end network tests against real Linux networking, in network namespaces each test
//! creates (tests/net_common): a bridge, the vif's tap on it, and a veth into a second
//! namespace where a Linux address and plain `std::net` servers live.
//!
//! * `guest_stack_over_tap_*`: the simulated guest's TCP/IP stack (xensim's smoltcp
//!   netstack) straight on the tap engine, no netback in between: ARP and ping both ways,
//!   and 100 MB of TCP in each direction with checksums compared at both ends, with and
//!   without offloads (GSO super-frames and blank checksums through the tap).

mod net_common;

use std::time::Duration;

use backends::net::tap::hotplug::{HostSetup, HostSide};
use backends::net::tap::{Offloads, Tap, TapOptions, VifId};
use net_common::tapdev::TapFrameDevice;
use net_common::{in_netns, Lan, GUEST_MAC};
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

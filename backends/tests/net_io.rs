//! netback data paths with xensim's netfront: frames both ways with SG, GSO and checksum
//! metadata checked at the engine, anti-spoofing, Toeplitz steering over the control ring,
//! the multicast filter and the credit-based rate limit.

mod net_common;

use std::time::{Duration, Instant};

use backends::net::engine::VirtioNetHdr;
use backends::net::{NetConfig, RxBacklogLimits};
use net_common::*;
use xen::abi::netif::*;
use xensim::front::frame::{FrameMeta, Gso};
use xensim::front::net::{NetFront, NetFrontOptions, NetQueue};

fn recv_one(q: &mut NetQueue) -> (Vec<u8>, FrameMeta) {
    let end = Instant::now() + T;
    let mut buf = Vec::new();
    loop {
        if let Some(m) = q.recv_frame(&mut buf).unwrap() {
            return (buf, m);
        }
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no frame received");
        q.wait_event(left).unwrap();
    }
}

fn send(q: &mut NetQueue, frame: &[u8], meta: FrameMeta) {
    let end = Instant::now() + T;
    while !q.send_frame(frame, meta).unwrap() {
        assert!(Instant::now() < end, "TX ring stayed full");
        q.wait_event(Duration::from_millis(100)).unwrap();
    }
}

#[test]
fn test_tx_small_frame_reaches_the_engine_unchanged() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = udp_frame(mac_of(0), [0xff; 6], 100, 1);
    send(f.queue(0).unwrap(), &frame, FrameMeta::default());
    let got = rig.net.wait_frames("one frame", |f| !f.is_empty());
    assert_eq!(got[0].frame, frame);
    assert_eq!(got[0].hdr, VirtioNetHdr::default());
    let s = rig.wait_stats(0, "tx counted", |s| s.tx_packets == 1);
    assert_eq!(s.tx_bytes, frame.len() as u64);
}

#[test]
fn test_tx_gso_super_frame_over_17_slots_carries_gso_and_partial_checksum() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = tcp_frame(mac_of(0), [2; 6], false, (40000, 80), 65535 - 54, 3);
    let meta = FrameMeta {
        gso: Some(Gso::TcpV4 { mss: 1448 }),
        csum_blank: true,
        data_validated: true,
    };
    send(f.queue(0).unwrap(), &frame, meta);
    let got = rig.net.wait_frames("gso frame", |f| !f.is_empty());
    let h = got[0].hdr;
    assert_eq!(got[0].frame, frame);
    assert_eq!(h.gso_type, VirtioNetHdr::GSO_TCPV4);
    assert_eq!((h.gso_size, h.hdr_len), (1448, 54));
    assert_eq!(h.flags, VirtioNetHdr::F_NEEDS_CSUM);
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    rig.wait_stats(0, "gso counted", |s| s.tx_gso_packets == 1);
}

#[test]
fn test_tx_gso_v6_without_blank_checksum_gets_the_pseudo_header_fixup() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = tcp_frame(mac_of(0), [2; 6], true, (1, 2), 9000, 4);
    let meta = FrameMeta {
        gso: Some(Gso::TcpV6 { mss: 1440 }),
        ..Default::default()
    };
    send(f.queue(0).unwrap(), &frame, meta);
    let got = rig.net.wait_frames("gso v6 frame", |f| !f.is_empty());
    let h = got[0].hdr;
    assert_eq!(h.gso_type, VirtioNetHdr::GSO_TCPV6);
    assert_eq!((h.csum_start, h.hdr_len), (54, 74));
    // The checksum field now holds the pseudo-header sum, the rest is untouched.
    assert_ne!(got[0].frame[70..72], [0, 0]);
    assert_eq!(got[0].frame[..70], frame[..70]);
    assert_eq!(got[0].frame[72..], frame[72..]);
}

#[test]
fn test_tx_spoofed_source_mac_is_dropped_and_counted() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let q = f.queue(0).unwrap();
    send(
        q,
        &udp_frame([0x02, 0, 0, 0, 0, 9], [0xff; 6], 60, 0),
        FrameMeta::default(),
    );
    let good = udp_frame(mac_of(0), [0xff; 6], 60, 1);
    send(q, &good, FrameMeta::default());
    let got = rig.net.wait_frames("the good frame", |f| !f.is_empty());
    rig.wait_stats(0, "spoof and send counted", |s| {
        s.tx_spoofed == 1 && s.tx_packets == 1
    });
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, good);
}

#[test]
fn test_tx_spoofing_allowed_by_setting_passes() {
    let cfg = NetConfig {
        allow_spoofing: true,
        ..Default::default()
    };
    let rig = rig_with(vec![nic(0)], cfg);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = udp_frame([0x02, 0, 0, 0, 0, 9], [0xff; 6], 60, 0);
    send(f.queue(0).unwrap(), &frame, FrameMeta::default());
    let got = rig.net.wait_frames("frame", |f| !f.is_empty());
    assert_eq!(got[0].frame, frame);
    assert_eq!(rig.stats(0).tx_spoofed, 0);
}

#[test]
fn test_rx_small_frame_and_checksum_flags_reach_the_guest() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = tcp_frame([2; 6], mac_of(0), false, (80, 40000), 500, 5);
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    rig.net.inject(0, 0, &hdr, &frame);
    let (got, meta) = recv_one(f.queue(0).unwrap());
    assert_eq!(got, frame);
    assert!(meta.csum_blank && meta.data_validated);
    assert_eq!(meta.gso, None);
    rig.wait_stats(0, "rx counted", |s| s.rx_packets == 1);
}

#[test]
fn test_rx_gso_super_frame_spans_slots_with_a_gso_extra() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = tcp_frame([2; 6], mac_of(0), false, (80, 40000), 60000, 6);
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        gso_size: 1448,
        hdr_len: 54,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    rig.net.inject(0, 0, &hdr, &frame);
    let (got, meta) = recv_one(f.queue(0).unwrap());
    assert_eq!(got.len(), frame.len());
    assert_eq!(got, frame);
    assert_eq!(meta.gso, Some(Gso::TcpV4 { mss: 1448 }));
    rig.wait_stats(0, "rx gso counted", |s| s.rx_gso_packets == 1);
}

#[test]
fn test_rx_without_csum_offload_the_backend_completes_the_checksum() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        csum_offload: false,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    let mut frame = udp_frame([2; 6], mac_of(0), 33, 7);
    // Pseudo-header sum in the field, as a kernel leaves a partial checksum.
    let mut s: u32 = 0;
    for c in frame[26..34].chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    s += 17 + (frame.len() - 34) as u32;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    frame[40..42].copy_from_slice(&(s as u16).to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 6,
        ..Default::default()
    };
    rig.net.inject(0, 0, &hdr, &frame);
    let (got, meta) = recv_one(f.queue(0).unwrap());
    assert!(!meta.csum_blank && meta.data_validated);
    // The whole UDP segment plus pseudo-header now sums to 0xffff.
    let mut v: u32 = 0;
    for c in got[26..34].chunks(2) {
        v += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    v += 17 + (got.len() - 34) as u32;
    for c in got[34..].chunks(2) {
        let hi = c[0];
        let lo = c.get(1).copied().unwrap_or(0);
        v += u32::from(u16::from_be_bytes([hi, lo]));
    }
    while v >> 16 != 0 {
        v = (v & 0xffff) + (v >> 16);
    }
    assert_eq!(v, 0xffff);
}

#[test]
fn test_rx_without_sg_a_frame_beyond_one_page_is_dropped_and_counted() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        sg: false,
        gso: false,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    rig.net.inject(
        0,
        0,
        &VirtioNetHdr::default(),
        &udp_frame([2; 6], mac_of(0), 5000, 0),
    );
    let small = udp_frame([2; 6], mac_of(0), 100, 1);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &small);
    let (got, _) = recv_one(f.queue(0).unwrap());
    assert_eq!(got, small);
    assert_eq!(rig.stats(0).rx_unsupported_drops, 1);
}

#[test]
fn test_rx_xdp_headroom_places_data_after_the_headroom() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        xdp_headroom: 256,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    let frame = udp_frame([2; 6], mac_of(0), 5000, 2);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &frame);
    let (got, _) = recv_one(f.queue(0).unwrap());
    assert_eq!(got, frame);
}

#[test]
fn test_multiqueue_toeplitz_mapping_steers_rx_flows_to_the_configured_queue() {
    let cfg = NetConfig {
        max_queues: 2,
        ..Default::default()
    };
    let rig = rig_with(vec![nic(0)], cfg);
    let opts = NetFrontOptions {
        max_queues: 2,
        ctrl_ring: true,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    assert_eq!(f.num_queues(), 2);
    // Every hash maps to queue 1.
    let key: Vec<u8> = (0..40u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(1))
        .collect();
    let flags = XEN_NETIF_CTRL_HASH_TYPE_IPV4 | XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP;
    let st = f
        .ctrl()
        .unwrap()
        .configure_toeplitz(&key, flags, &[1; 8], T)
        .unwrap();
    assert_eq!(st, XEN_NETIF_CTRL_STATUS_SUCCESS);
    // A frame read from engine queue 0 goes to guest queue 1, with a hash extra.
    let frame = tcp_frame([2; 6], mac_of(0), false, (80, 4000), 100, 1);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &frame);
    let (got, _) = recv_one(f.queue(1).unwrap());
    assert_eq!(got, frame);
    let mut b = Vec::new();
    assert!(f.queue(0).unwrap().recv_frame(&mut b).unwrap().is_none());
    // Mapping entries name queues that exist.
    let st = f
        .ctrl()
        .unwrap()
        .configure_toeplitz(&key, flags, &[0, 2], T)
        .unwrap();
    assert_eq!(st, XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER);
}

#[test]
fn test_ctrl_ring_rejects_bad_parameters_like_linux() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        ctrl_ring: true,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    let c = f.ctrl().unwrap();
    let rq = |c: &mut xensim::front::net::CtrlQueue, t, d| c.request(t, d, T).unwrap();
    // Flags before an algorithm: invalid.
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS, [1, 0, 0]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM, [7, 0, 0]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    let g = c.data_gref();
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_KEY, [g, 41, 0]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE, [0; 3]),
        (XEN_NETIF_CTRL_STATUS_SUCCESS, 128)
    );
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE, [129, 0, 0]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE, [4, 0, 0]).0,
        XEN_NETIF_CTRL_STATUS_SUCCESS
    );
    // Offset + length beyond the size, and a wrapping offset.
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING, [g, 4, 1]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING, [g, 2, u32::MAX]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    // A grant that is not ours.
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_SET_HASH_KEY, [60000, 40, 0]).0,
        XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        rq(c, XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING, [0; 3]).0,
        XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED
    );
    assert_eq!(rig.stats(0).fatal_errors, 0);
}

#[test]
fn test_multicast_filter_drops_unlisted_groups_and_passes_added_ones() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        multicast_control: true,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    let q = f.queue(0).unwrap();
    let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x07];
    let other = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x08];
    assert!(q.mcast(true, group).unwrap());
    rig.wait_stats(0, "mcast add", |s| s.mcast_ops == 1);
    rig.net.inject(
        0,
        0,
        &VirtioNetHdr::default(),
        &udp_frame([2; 6], other, 64, 1),
    );
    let wanted = udp_frame([2; 6], group, 64, 2);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &wanted);
    let bcast = udp_frame([2; 6], [0xff; 6], 64, 3);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &bcast);
    let (a, _) = recv_one(q);
    let (b, _) = recv_one(q);
    assert_eq!(a, wanted);
    assert_eq!(b, bcast);
    assert_eq!(rig.stats(0).rx_mcast_drops, 1);
    // 64 addresses at most: the 65th is refused.
    for i in 0..70u8 {
        while !q.mcast(true, [0x01, 0, 0x5e, 1, 0, i]).unwrap() {
            q.wait_event(Duration::from_millis(50)).unwrap();
        }
    }
    rig.wait_stats(0, "mcast adds", |s| s.mcast_ops == 71);
    q.reap_tx().unwrap();
    wait_for("errors counted", || {
        q.reap_tx().unwrap();
        (q.stats().tx_errors == 7).then_some(())
    });
}

#[test]
fn test_rx_backlog_is_bounded_when_the_guest_posts_no_buffers() {
    let cfg = NetConfig {
        rx_backlog: RxBacklogLimits {
            packets: 32,
            bytes: 64 * 1024,
        },
        ..Default::default()
    };
    let rig = rig_with(vec![nic(0)], cfg);
    let opts = NetFrontOptions {
        rx_buffers: 0,
        ..Default::default()
    };
    let _f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    for i in 0..200u32 {
        rig.net.inject(
            0,
            0,
            &VirtioNetHdr::default(),
            &udp_frame([2; 6], mac_of(0), 1000, i as u8),
        );
    }
    let s = rig.wait_stats(0, "drops", |s| s.rx_backlog_drops + s.rx_backlog >= 200);
    assert!(s.rx_backlog <= 32, "{s:?}");
    assert!(s.rx_backlog_drops >= 168, "{s:?}");
}

#[test]
fn test_rate_limit_holds_within_ten_percent_and_follows_the_key_live() {
    // 2 MB/s as 100 KB per 50 ms.
    let mut n = nic(0);
    n.rate = Some((100_000, 50_000));
    let rig = rig_with(vec![n], NetConfig::default());
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    // 8 KB frames (three slots each): few enough per second that even a loaded debug build
    // keeps the limiter, not the sender, the bottleneck.
    let frame = udp_frame(mac_of(0), [2; 6], 8000, 1);
    let flen = frame.len();
    let q = f.queue(0).unwrap();
    // The limiter lets `initial` bytes through at once (the credit it holds when sending
    // starts), then `rate` bytes per second in back-to-back windows. Over a long stream
    // (seconds, dozens of windows), bytes - initial = rate * (last arrival - first arrival),
    // whatever the scheduling of single windows on a loaded machine.
    let measure = |frames: &[net_common::HostFrame], initial: usize| {
        let bytes: usize = frames.iter().map(|f| f.frame.len()).sum();
        let (Some(first), Some(last)) = (frames.first(), frames.last()) else {
            panic!("no frames");
        };
        let span = last.at.duration_since(first.at).as_secs_f64();
        assert!(
            span > 1.0,
            "a stream of {span:.2} s is too short to measure"
        );
        bytes.saturating_sub(initial) as f64 / span
    };
    // 3 MB at 2 MB/s: 1.5 s, 30 windows. The credit starts full: 100 KB.
    let total = 3_000_000 / flen;
    for _ in 0..total {
        send(q, &frame, FrameMeta::default());
    }
    let got = rig.net.wait_frames("all frames", |f| f.len() >= total);
    let rate = measure(&got, 100_000);
    eprintln!("rate limit 2 MB/s: measured {rate:.0} B/s");
    assert!(
        (1_800_000.0..=2_200_000.0).contains(&rate),
        "measured {rate:.0} B/s for 2 MB/s"
    );
    assert!(rig.stats(0).tx_throttled > 0);
    // Live change to 1 MB/s.
    rig.write_backend(0, "rate", "50000,50000");
    rig.wait_stats(0, "the new rate applied", |s| s.rate_updates == 1);
    let before = got.len();
    // 3 MB at 1 MB/s: 3 s, 60 windows. The credit left from the old rate is cut to the new
    // window's 50 KB, and one window's worth is added after the idle time: it starts
    // between 0 and 100 KB, so both bounds must hold.
    let more = 3_000_000 / flen;
    for _ in 0..more {
        send(q, &frame, FrameMeta::default());
    }
    let got = rig
        .net
        .wait_frames("second batch", |f| f.len() >= before + more);
    let (lo, hi) = (measure(&got[before..], 100_000), measure(&got[before..], 0));
    eprintln!("rate limit 1 MB/s (changed live): measured {lo:.0}..{hi:.0} B/s");
    assert!(
        lo >= 900_000.0 && hi <= 1_100_000.0,
        "measured {lo:.0}..{hi:.0} B/s for 1 MB/s"
    );
}

#[test]
fn test_dynamic_multicast_control_follows_the_frontend_key() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    assert_eq!(rig.stats(0).mcast_filtering, 0);
    let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x09];
    let m1 = udp_frame([2; 6], group, 64, 1);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &m1);
    assert_eq!(recv_one(f.queue(0).unwrap()).0, m1);
    // The frontend turns filtering on while connected.
    let key = format!("{}/request-multicast-control", f.link().path());
    xenbus::XsOps::write(f.link().xs(), &key, b"1").unwrap();
    rig.wait_stats(0, "filtering on", |s| s.mcast_filtering == 1);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &m1);
    let unicast = udp_frame([2; 6], mac_of(0), 64, 2);
    rig.net.inject(0, 0, &VirtioNetHdr::default(), &unicast);
    assert_eq!(recv_one(f.queue(0).unwrap()).0, unicast);
    assert_eq!(rig.stats(0).rx_mcast_drops, 1);
    // Garbage in the key changes nothing.
    xenbus::XsOps::write(f.link().xs(), &key, b"yes").unwrap();
    xenbus::XsOps::write(f.link().xs(), &key, b"0").unwrap();
    rig.wait_stats(0, "filtering off", |s| s.mcast_filtering == 0);
}

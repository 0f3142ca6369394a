//! The tap engine against real Linux networking, in network namespaces the tests create
//! (see tests/net_common): frames written with a vnet header reach a Linux peer behind a
//! bridge and a veth, the peer's replies come back with their header, GSO super-frames are
//! segmented by the kernel for a receiver without offloads, and the host side (bridge or
//! hotplug script) is set up and torn down.

#[path = "../../tests/net_common/mod.rs"]
mod net_common;

use std::io::IoSlice;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use backends::net::engine::{NetQueueIo, VirtioNetHdr};
use backends::net::tap::hotplug::{HostSetup, HostSide};
use backends::net::tap::{interface_exists, Offloads, Tap, TapOptions, TapQueue, VifId};
use net_common::{in_netns, Lan, GUEST_MAC, PEER_MAC};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xensim::front::netstack::{set_partial_csum, verify_frame};

const VIF: VifId = VifId { domid: 7, devid: 0 };

/// Waits (on the tap's descriptor) for a frame that `want` accepts.
fn recv_matching(
    q: &TapQueue,
    timeout: Duration,
    want: impl FnMut(&VirtioNetHdr, &[u8]) -> bool,
) -> (VirtioNetHdr, Vec<u8>) {
    request_reply(q, timeout, || {}, want)
}

/// Sends a request (`send`), then waits for a frame that `want` accepts, sending the request
/// again each second without an answer, as a stack retransmits ARP and echo requests (the
/// first frame on a link that just came up may be dropped).
fn request_reply(
    q: &TapQueue,
    timeout: Duration,
    mut send: impl FnMut(),
    mut want: impl FnMut(&VirtioNetHdr, &[u8]) -> bool,
) -> (VirtioNetHdr, Vec<u8>) {
    let end = Instant::now() + timeout;
    let mut buf = vec![0u8; 70_000];
    let mut resend = Instant::now();
    loop {
        if Instant::now() >= resend {
            send();
            resend = Instant::now() + Duration::from_secs(1);
        }
        while let Some((h, n)) = q.recv(&mut buf).expect("tap recv") {
            if want(&h, &buf[..n]) {
                return (h, buf[..n].to_vec());
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching frame within {timeout:?}");
        let left = left.min(resend.saturating_duration_since(Instant::now()));
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(q.fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(ms)).expect("poll");
    }
}

/// Whether interface `name` disappears within 10 s. Closing our last descriptor removes a
/// tap at once, unless a process another test thread is spawning right then still holds a
/// copy of our descriptor table (between its fork and its exec, where O_CLOEXEC applies).
fn gone_soon(name: &str) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while interface_exists(name) {
        if Instant::now() > end {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn ipv4(f: &mut Vec<u8>, proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) {
    let start = f.len();
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let c = csum(&f[start..start + 20]);
    f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(l4);
}

fn arp_request(guest_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = eth([0xff; 6], GUEST_MAC, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&guest_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn open_tap(queues: u16, offloads: Offloads) -> Tap {
    Tap::open(
        VIF,
        &TapOptions {
            queues,
            offloads,
            ..TapOptions::default()
        },
    )
    .expect("open the tap")
}

#[test]
fn test_tap_frames_with_vnet_header_reach_linux_and_replies_come_back_with_their_header() {
    in_netns(|| {
        // Arrange: a LAN with a Linux peer, the vif's tap on its bridge.
        let lan = Lan::new(1500);
        let tap = open_tap(1, Offloads::default());
        let _host = HostSide::online(VIF, tap.name(), HostSetup::Bridge(lan.bridge.clone()))
            .expect("attach to the bridge");
        let q = tap.queues()[0].clone();
        let udp_peer = lan.peer_ip;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let udp = lan.peer.spawn(move || {
            let s = UdpSocket::bind((udp_peer, 9999)).expect("bind udp");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut b = [0u8; 2048];
            let (n, from) = s.recv_from(&mut b).expect("the guest's datagram arrives");
            (b[..n].to_vec(), from)
        });
        ready_rx.recv().expect("udp server up");

        // Act 1: ARP for the peer.
        let arp = arp_request(lan.guest_ip, lan.peer_ip);
        let send_arp = || {
            q.send(&VirtioNetHdr::default(), &[IoSlice::new(&arp)])
                .expect("send ARP request")
        };
        let (h, reply) = request_reply(&q, Duration::from_secs(10), send_arp, |_, f| {
            f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
        });
        // Assert 1: Linux answered with its MAC, to ours, through the header-carrying tap.
        assert_eq!(h.gso_type, VirtioNetHdr::GSO_NONE);
        assert_eq!(&reply[0..6], &GUEST_MAC);
        assert_eq!(&reply[22..28], &PEER_MAC);

        // Act 2: an echo request with its checksum filled in.
        let mut icmp = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"domio tap test payload");
        let c = csum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = eth(PEER_MAC, GUEST_MAC, 0x0800);
        ipv4(&mut f, 1, lan.guest_ip, lan.peer_ip, &icmp);
        let send_echo = || {
            q.send(
                &VirtioNetHdr::default(),
                &[IoSlice::new(&f[..20]), IoSlice::new(&f[20..])],
            )
            .expect("send echo request in two slices")
        };
        let (_, reply) = request_reply(&q, Duration::from_secs(10), send_echo, |_, f| {
            f.len() > 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0
        });
        // Assert 2: the reply is well formed and carries our payload back.
        assert!(verify_frame(&reply), "the echo reply's checksums are valid");
        assert!(reply.ends_with(b"domio tap test payload"));

        // Act 3: UDP with a blank checksum, for the kernel to complete (NEEDS_CSUM).
        let mut udp_l4 = vec![0u8; 8];
        udp_l4[0..2].copy_from_slice(&4444u16.to_be_bytes());
        udp_l4[2..4].copy_from_slice(&9999u16.to_be_bytes());
        udp_l4.extend_from_slice(b"partial checksum datagram");
        let len = udp_l4.len() as u16;
        udp_l4[4..6].copy_from_slice(&len.to_be_bytes());
        let mut f = eth(PEER_MAC, GUEST_MAC, 0x0800);
        ipv4(&mut f, 17, lan.guest_ip, lan.peer_ip, &udp_l4);
        let o = set_partial_csum(&mut f).expect("UDP offsets");
        let h = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: o.l4_start as u16,
            csum_offset: o.csum_offset as u16,
            ..VirtioNetHdr::default()
        };
        q.send(&h, &[IoSlice::new(&f)]).expect("send UDP");
        // Assert 3: the Linux socket got it.
        let (data, from) = udp.join().expect("udp receiver");
        assert_eq!(data, b"partial checksum datagram");
        assert_eq!(from, (lan.guest_ip, 4444).into());
    });
}

#[test]
fn test_tap_gso_super_frame_is_segmented_by_the_kernel_for_a_receiver_without_offloads() {
    in_netns(|| {
        // Arrange: two taps on one bridge; B takes no offloads, so the kernel must segment
        // and checksum what A sends before B may read it.
        let lan = Lan::new(1500);
        let a = open_tap(1, Offloads::default());
        let b = Tap::open(
            VifId { domid: 8, devid: 0 },
            &TapOptions {
                ..TapOptions::default()
            },
        )
        .expect("second tap");
        let _ha = HostSide::online(VIF, a.name(), HostSetup::Bridge(lan.bridge.clone())).unwrap();
        let _hb =
            HostSide::online(b.vif(), b.name(), HostSetup::Bridge(lan.bridge.clone())).unwrap();
        let guest_b = [0x00, 0x16, 0x3e, 0, 0, 2];
        let mss = 1000usize;
        let payload_len = 10 * mss + 123;
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&5000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&6000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH|ACK
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        tcp.extend((0..payload_len).map(|i| (i * 7 % 251) as u8));
        let mut f = eth(guest_b, GUEST_MAC, 0x0800);
        ipv4(&mut f, 6, lan.guest_ip, Ipv4Addr::new(10, 77, 0, 3), &tcp);
        let o = set_partial_csum(&mut f).expect("tcp offsets");
        let h = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4,
            hdr_len: o.hdr_len as u16,
            gso_size: mss as u16,
            csum_start: o.l4_start as u16,
            csum_offset: o.csum_offset as u16,
            num_buffers: 0,
        };

        // Act
        a.queues()[0]
            .send(&h, &[IoSlice::new(&f)])
            .expect("send the super-frame");
        let qb = b.queues()[0].clone();
        let mut got = Vec::new();
        let mut bytes = 0;
        while bytes < payload_len {
            let (hb, seg) = recv_matching(&qb, Duration::from_secs(10), |_, f| {
                f.len() > 54 && f[12..14] == [8, 0] && f[23] == 6
            });
            assert_eq!(hb.gso_type, VirtioNetHdr::GSO_NONE, "B asked for no TSO");
            assert_eq!(
                hb.flags & VirtioNetHdr::F_NEEDS_CSUM,
                0,
                "B asked for no partial csums"
            );
            assert!(
                verify_frame(&seg),
                "segment {} has valid checksums",
                got.len()
            );
            bytes += seg.len() - 54;
            got.push(seg);
        }

        // Assert: 11 segments of at most the MSS carry the payload in order.
        assert_eq!(got.len(), 11);
        assert!(got.iter().all(|s| s.len() - 54 <= mss));
        let joined: Vec<u8> = got.iter().flat_map(|s| s[54..].to_vec()).collect();
        assert_eq!(joined, tcp[20..]);
        let seq0 = u32::from_be_bytes(got[1][38..42].try_into().unwrap());
        assert_eq!(seq0, 1_000_000 + mss as u32);
    });
}

#[test]
fn test_tap_multi_queue_settings_and_teardown_removes_the_tap() {
    in_netns(|| {
        // Arrange + Act
        let tap = Tap::open(
            VIF,
            &TapOptions {
                queues: 4,
                mtu: Some(9000),
                mac: Some([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]),
                offloads: Offloads {
                    csum: true,
                    tso4: true,
                    tso6: true,
                    tso_ecn: false,
                },
                ..TapOptions::default()
            },
        )
        .expect("4-queue tap");

        // Assert
        assert_eq!(tap.name(), "vif7.0");
        assert_eq!(tap.queues().len(), 4);
        assert_eq!(tap.vnet_hdr_len().unwrap(), 12);
        assert_eq!(tap.mtu().unwrap(), 9000);
        assert_eq!(tap.mac().unwrap(), [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(tap.is_up().unwrap());
        assert!(!tap.persistent());
        assert!(tap.ifindex().unwrap() > 0);
        let fds: std::collections::HashSet<_> = tap
            .queues()
            .iter()
            .map(|q| std::os::fd::AsRawFd::as_raw_fd(&q.fd().as_fd()))
            .collect();
        assert_eq!(fds.len(), 4, "one descriptor per queue");
        let queues = tap.queues().to_vec();
        drop(tap);
        assert!(interface_exists("vif7.0"), "a queue still holds it");
        drop(queues);
        assert!(gone_soon("vif7.0"), "the non-persistent tap is gone");
    });
}

#[test]
fn test_tap_bridge_attach_and_detach_and_errors_name_the_device() {
    in_netns(|| {
        let lan = Lan::new(1500);
        let tap = open_tap(1, Offloads::default());
        let master = || {
            let l = net_common::ip(&["-o", "link", "show", "vif7.0"]);
            l.split_whitespace()
                .skip_while(|w| *w != "master")
                .nth(1)
                .map(str::to_string)
        };

        let mut host =
            HostSide::online(VIF, tap.name(), HostSetup::Bridge(lan.bridge.clone())).unwrap();
        assert_eq!(master().as_deref(), Some("dbr0"));
        host.offline().unwrap();
        assert!(master().is_none(), "offline releases the tap");

        let e = HostSide::online(VIF, tap.name(), HostSetup::Bridge("nosuchbr".into()))
            .expect_err("no such bridge");
        let msg = e.to_string();
        assert!(
            msg.contains("dom7 vif 0") && msg.contains("nosuchbr"),
            "{msg}"
        );
    });
}

#[test]
fn test_hotplug_script_runs_with_the_environment_vif_bridge_expects() {
    in_netns(|| {
        // Arrange: a script that records its arguments and environment.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = dir.path().join("vif-test");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$1 $2 script=$script type=$XENBUS_TYPE path=$XENBUS_PATH \
                 base=$XENBUS_BASE_PATH vif=$vif netdev=[$netdev] bridge=$bridge\" >> {}\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let tap = open_tap(1, Offloads::default());
        let setup = HostSetup::from_keys(Some(script.to_str().unwrap()), Some("xenbr0"));

        // Act
        let host = HostSide::online(VIF, tap.name(), setup).expect("online");
        drop(host);

        // Assert
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let common = format!(
            "type_if=vif script={} type=vif path=backend/vif/7/0 base=backend vif=vif7.0 \
             netdev=[] bridge=xenbr0",
            script.display()
        );
        assert_eq!(
            lines,
            [format!("online {common}"), format!("offline {common}")]
        );
    });
}

#[test]
fn test_hotplug_script_of_a_qnic_gets_its_backend_type_and_path() {
    in_netns(|| {
        // Arrange: a script that records its environment, on a `qnic` backend's vif.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = dir.path().join("vif-test");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$1 type=$XENBUS_TYPE path=$XENBUS_PATH vif=$vif\" >> {}\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let params = backends::net::VifParams {
            backend_type: "qnic".into(),
            domid: 7,
            devid: 2,
            mac: GUEST_MAC,
            bridge: None,
            script: Some(script.to_str().unwrap().to_string()),
            rate: None,
            ip: None,
            mtu: 1500,
            backend_path: "/local/domain/0/backend/qnic/7/2".into(),
        };

        // Act
        let host = backends::net::tap::vif::TapVifHost::open(&params).expect("online");
        drop(host);

        // Assert: the script saw the qnic device, not a vif one.
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "online type=qnic path=backend/qnic/7/2 vif=vif7.2",
                "offline type=qnic path=backend/qnic/7/2 vif=vif7.2"
            ]
        );
    });
}

#[test]
fn test_hotplug_script_failure_reports_device_and_stderr() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("vif-fail");
        std::fs::write(&script, "#!/bin/sh\necho 'no bridge here' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let tap = open_tap(1, Offloads::default());
        let e = HostSide::online(
            VIF,
            tap.name(),
            HostSetup::from_keys(Some(script.to_str().unwrap()), None),
        )
        .expect_err("the script fails");
        let msg = e.to_string();
        assert!(msg.contains("dom7 vif 0"), "{msg}");
        assert!(msg.contains("no bridge here"), "{msg}");
        assert!(msg.contains("online"), "{msg}");
    });
}

#[test]
fn test_vif_host_creates_the_tap_on_the_bridge_opens_queues_per_connect_and_removes_it() {
    in_netns(|| {
        // Arrange
        let lan = Lan::new(1500);
        let params = backends::net::VifParams {
            backend_type: "vif".into(),
            domid: 9,
            devid: 1,
            mac: GUEST_MAC,
            bridge: Some(lan.bridge.clone()),
            script: None,
            rate: None,
            ip: None,
            mtu: 1500,
            backend_path: "backend/vif/9/1".into(),
        };
        let factory = backends::net::tap::tap_engine_factory();

        // Act: probe, then two connects (a frontend reconnecting).
        let mut host = factory(&params).expect("probe opens the host side");
        let first = host
            .open_queues(2, backends::net::Offloads::default())
            .expect("two queues");
        drop(first);
        let queues = host
            .open_queues(
                1,
                backends::net::Offloads {
                    csum: true,
                    tso4: true,
                    tso6: true,
                },
            )
            .expect("one queue after reconnect");

        // Assert: the tap is on the bridge and a broadcast from Linux reaches the live queue
        // (not the detached anchor).
        let link = net_common::ip(&["-o", "link", "show", "vif9.1"]);
        assert!(link.contains("master dbr0"), "{link}");
        assert!(host.describe().contains("vif9.1"));
        let peer_ip = lan.peer_ip;
        lan.peer.run(move || {
            let s = UdpSocket::bind((peer_ip, 0)).unwrap();
            s.set_broadcast(true).unwrap();
            s.send_to(b"hello vif", (Ipv4Addr::new(10, 77, 0, 255), 7))
                .unwrap();
        });
        let end = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 70_000];
        let mut seen = false;
        while !seen {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the broadcast never reached the vif's queue"
            );
            let mut fds = [PollFd::new(queues[0].fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).unwrap();
            while let Some((_, n)) = queues[0].recv(&mut buf).unwrap() {
                seen |= buf[..n].ends_with(b"hello vif");
            }
        }
        drop(queues);
        drop(host);
        assert!(gone_soon("vif9.1"), "teardown removes the tap");
    });
}

#[test]
fn test_hotplug_script_with_a_lot_of_stderr_never_blocks() {
    in_netns(|| {
        // A script that writes 256 KiB to stderr (more than a pipe holds) and succeeds.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("vif-chatty");
        std::fs::write(
            &script,
            "#!/bin/sh\nhead -c 262144 /dev/zero | tr '\\0' x >&2\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let tap = open_tap(1, Offloads::default());
        let start = Instant::now();
        let host = HostSide::online(
            VIF,
            tap.name(),
            HostSetup::from_keys(Some(script.to_str().unwrap()), None),
        );
        assert!(host.is_ok(), "{host:?}");
        assert!(start.elapsed() < Duration::from_secs(20));
    });
}

#[test]
fn test_tap_recv_of_a_frame_cut_to_a_small_buffer_is_an_error() {
    in_netns(|| {
        // Arrange: two taps on a bridge; A sends a 1000-byte broadcast frame to B.
        let lan = Lan::new(1500);
        let a = open_tap(1, Offloads::default());
        let b = Tap::open(VifId { domid: 8, devid: 0 }, &TapOptions::default()).unwrap();
        let _ha = HostSide::online(VIF, a.name(), HostSetup::Bridge(lan.bridge.clone())).unwrap();
        let _hb =
            HostSide::online(b.vif(), b.name(), HostSetup::Bridge(lan.bridge.clone())).unwrap();
        let mut f = eth([0xff; 6], GUEST_MAC, 0x88b5); // IEEE local experimental ethertype
        f.resize(1000, 0x42);
        let qb = b.queues()[0].clone();

        // Act: read B's frames into a 100-byte buffer until ours shows up as an error.
        let end = Instant::now() + Duration::from_secs(10);
        let mut small = [0u8; 100];
        let mut resend = Instant::now();
        let err = loop {
            if Instant::now() >= resend {
                a.queues()[0]
                    .send(&VirtioNetHdr::default(), &[IoSlice::new(&f)])
                    .unwrap();
                resend = Instant::now() + Duration::from_secs(1);
            }
            match qb.recv(&mut small) {
                Err(e) => break e,
                Ok(Some((_, n))) => assert!(n < small.len()),
                Ok(None) => {
                    assert!(Instant::now() < end, "the frame never reached B");
                    let mut fds = [PollFd::new(qb.fd(), PollFlags::POLLIN)];
                    poll(&mut fds, PollTimeout::from(100u16)).unwrap();
                }
            }
        };

        // Assert
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("may have been truncated"), "{err}");
    });
}

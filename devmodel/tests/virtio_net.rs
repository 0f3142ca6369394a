//! virtio-net through the machine: the guest OS library's driver under the guest's TCP/IP
//! stack exchanges TCP with Linux through a real tap, in a network namespace of the test's
//! own (so nothing touches the host's interfaces), with and without checksum/TSO offloads;
//! and hostile transmit chains are answered while the NIC goes on.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use common::{config, in_netns, ip, DirectBus};
use xensim::front::netstack::{fill_pattern, NetConfig, NetStack, StreamSum};
use xensim::guestos::net::VirtioNetDriver;
use xensim::guestos::pci::{self, BarWindow};
use xensim::guestos::RamAlloc;
use xensim::hvm::HvmBus;

const LINUX_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// The machine with one NIC on tap `dmtap0` (addressed 10.77.0.1/24 on the Linux side) and
/// the guest's driver brought up on it.
fn nic(offloads: bool) -> (Arc<DirectBus>, VirtioNetDriver<DirectBus>) {
    let bus = Arc::new(DirectBus::new(&config(
        "vif = [ 'mac=00:16:3e:4d:00:02,vifname=dmtap0' ]",
    )));
    ip(&["addr", "add", "10.77.0.1/24", "dev", "dmtap0"]);
    let mut fns = pci::enumerate(bus.as_ref()).unwrap();
    pci::assign_bars(bus.as_ref(), &mut fns, &mut BarWindow::default()).unwrap();
    let f = fns
        .iter()
        .find(|f| (f.vendor, f.device) == (0x1af4, 0x1041))
        .unwrap()
        .clone();
    assert_eq!(f.class, 0x020000);
    let ram = RamAlloc::new(1 << 20, bus.ram_size());
    let drv = VirtioNetDriver::new(bus.clone(), &f, &ram, 0x60, 256, offloads).unwrap();
    assert_eq!(drv.mac, [0x00, 0x16, 0x3e, 0x4d, 0x00, 0x02]);
    (bus, drv)
}

fn linux_send(mut s: std::net::TcpStream, n: u64) -> StreamSum {
    let mut sum = StreamSum::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = buf.len().min((n - off) as usize);
        fill_pattern(off, &mut buf[..k]);
        s.write_all(&buf[..k]).unwrap();
        sum.update(&buf[..k]);
        off += k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    sum
}

fn linux_recv(mut s: std::net::TcpStream) -> StreamSum {
    let mut sum = StreamSum::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return sum,
            Ok(k) => sum.update(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("receive from the guest: {e}"),
        }
    }
}

fn tcp_both_ways(offloads: bool) {
    in_netns(move || {
        let (_bus, drv) = nic(offloads);
        let mut stack = NetStack::new(
            drv,
            &NetConfig::ipv4([0x00, 0x16, 0x3e, 0x4d, 0x00, 0x02], GUEST_IP, 24),
        )
        .unwrap();
        assert_eq!(stack.offloads(), offloads);
        let n: u64 = 16 << 20;
        // Linux -> guest.
        let l = TcpListener::bind((LINUX_IP, 5001)).unwrap();
        let server = std::thread::spawn(move || linux_send(l.accept().unwrap().0, n));
        let h = stack
            .tcp_connect(SocketAddr::from((LINUX_IP, 5001)), Duration::from_secs(20))
            .unwrap();
        let got = stack.tcp_recv_all(h, Duration::from_secs(60)).unwrap();
        stack.tcp_close(h, Duration::from_secs(10)).unwrap();
        let sent = server.join().unwrap();
        assert_eq!(got.sum, sent, "Linux -> guest stream");
        // Guest -> Linux.
        let l = TcpListener::bind((LINUX_IP, 5002)).unwrap();
        let server = std::thread::spawn(move || linux_recv(l.accept().unwrap().0));
        let h = stack
            .tcp_connect(SocketAddr::from((LINUX_IP, 5002)), Duration::from_secs(20))
            .unwrap();
        let sent = stack
            .tcp_send_pattern(h, n, Duration::from_secs(60))
            .unwrap();
        let got = server.join().unwrap();
        assert_eq!(got, sent.sum, "guest -> Linux stream");
        let st = stack.stats();
        assert_eq!(st.rx_bad_csum, 0);
        if offloads {
            assert!(
                st.rx_gso > 0,
                "Linux sent TSO super-frames to the guest: {st:?}"
            );
        } else {
            assert_eq!(st.rx_gso, 0);
        }
    });
}

#[test]
fn virtio_net_tcp_with_a_linux_netns_through_the_tap_with_offloads() {
    tcp_both_ways(true);
}

#[test]
fn virtio_net_tcp_with_a_linux_netns_through_the_tap_without_offloads() {
    tcp_both_ways(false);
}

const GUEST_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x4d, 0x00, 0x02];

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&LINUX_IP.octets());
    f
}

/// Hostile transmit chains (a device-writable buffer, a frame above 64 KiB + 14, a buffer
/// outside guest RAM, a runt, a loop, a checksum offset past the frame) each come back used
/// and unsent; an ARP request after them still gets Linux's answer.
#[test]
fn virtio_net_hostile_tx_chains_are_answered_and_the_nic_goes_on() {
    use xensim::guestos::virtio::{Buf, VirtioPciDev};
    in_netns(|| {
        let bus = DirectBus::new(&config("vif = [ 'mac=00:16:3e:4d:00:02,vifname=dmtap0' ]"));
        ip(&["addr", "add", "10.77.0.1/24", "dev", "dmtap0"]);
        let mut fns = pci::enumerate(&bus).unwrap();
        pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
        let f = fns.iter().find(|f| f.device == 0x1041).unwrap().clone();
        let dev = VirtioPciDev::new(&bus, &f, 0x70).unwrap();
        dev.negotiate(&bus, 1 | (1 << 5)).unwrap();
        dev.enable_msix(&bus, 3).unwrap();
        let ram = RamAlloc::new(1 << 20, bus.ram_size());
        let mut rx = dev.setup_queue(&bus, 0, 16, 1, &ram).unwrap();
        let mut tx = dev.setup_queue(&bus, 1, 16, 2, &ram).unwrap();
        dev.driver_ok(&bus).unwrap();
        let rxbuf = ram.alloc(2048, 64).unwrap();
        rx.add(
            &bus,
            &[Buf {
                gpa: rxbuf,
                len: 2048,
                write: true,
            }],
        )
        .unwrap();
        rx.publish(&bus).unwrap();
        let frame = ram.alloc(80_000, 64).unwrap();
        let mut hdr_frame = vec![0u8; 12];
        hdr_frame.extend_from_slice(&arp_request());
        bus.ram_write(frame, &hdr_frame).unwrap();
        let wait_tx = |tx: &mut xensim::guestos::virtio::Virtqueue| {
            for _ in 0..100 {
                if let Some(u) = tx.pop_used(&bus).unwrap() {
                    return u;
                }
                bus.wait_irq(Duration::from_millis(100));
                bus.take_irqs();
            }
            panic!("transmit chain not answered");
        };
        let n = hdr_frame.len() as u32;
        let bad: Vec<Vec<Buf>> = vec![
            vec![Buf {
                gpa: frame,
                len: n,
                write: true,
            }],
            vec![Buf {
                gpa: frame,
                len: 12 + 65_550,
                write: false,
            }],
            vec![Buf {
                gpa: 1 << 40,
                len: n,
                write: false,
            }],
            vec![Buf {
                gpa: frame,
                len: 20,
                write: false,
            }],
            // XSA-162/135/140 (emulated NICs trusted guest lengths): 0 and u32::MAX bytes.
            vec![Buf {
                gpa: frame,
                len: 0,
                write: false,
            }],
            vec![Buf {
                gpa: frame,
                len: u32::MAX,
                write: false,
            }],
        ];
        for chain in bad {
            tx.add(&bus, &chain).unwrap();
            tx.publish(&bus).unwrap();
            assert_eq!(wait_tx(&mut tx).1, 0);
        }
        // A partial checksum whose field lies past the frame.
        let mut h = hdr_frame.clone();
        h[0] = 1;
        h[6..8].copy_from_slice(&30u16.to_le_bytes());
        h[8..10].copy_from_slice(&40u16.to_le_bytes());
        bus.ram_write(frame + 40_000, &h).unwrap();
        tx.add(
            &bus,
            &[Buf {
                gpa: frame + 40_000,
                len: n,
                write: false,
            }],
        )
        .unwrap();
        tx.publish(&bus).unwrap();
        assert_eq!(wait_tx(&mut tx).1, 0);
        // A loop: descriptors 14 -> 15 -> 14.
        tx.write_desc(&bus, 14, frame, 12, 1, 15).unwrap();
        tx.write_desc(&bus, 15, frame + 12, 42, 1, 14).unwrap();
        tx.push_head(&bus, 14).unwrap();
        tx.publish(&bus).unwrap();
        let mut got = None;
        for _ in 0..100 {
            if let Some(u) = tx.pop_used_raw(&bus).unwrap() {
                got = Some(u);
                break;
            }
            bus.wait_irq(Duration::from_millis(100));
            bus.take_irqs();
        }
        assert_eq!(got, Some((14, 0)));
        // Anti-spoofing: a frame whose source MAC is not the NIC's comes back used and never
        // reaches the tap (frames the device writes count as the tap's received packets).
        let tap_rx = || {
            // This thread's namespace (sysfs would show the one it was mounted in).
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            let line = dev
                .lines()
                .find_map(|l| l.trim_start().strip_prefix("dmtap0:"))
                .unwrap()
                .to_string();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let before = tap_rx();
        let mut spoofed = hdr_frame.clone();
        spoofed[12 + 6..12 + 12].copy_from_slice(&[0x00, 0x16, 0x3e, 0x00, 0x00, 0x01]);
        bus.ram_write(frame + 20_000, &spoofed).unwrap();
        tx.add(
            &bus,
            &[Buf {
                gpa: frame + 20_000,
                len: n,
                write: false,
            }],
        )
        .unwrap();
        tx.publish(&bus).unwrap();
        assert_eq!(wait_tx(&mut tx).1, 0);
        assert_eq!(tap_rx(), before, "the spoofed frame reached the tap");
        // Still working: the ARP request is answered.
        tx.add(
            &bus,
            &[Buf {
                gpa: frame,
                len: n,
                write: false,
            }],
        )
        .unwrap();
        tx.publish(&bus).unwrap();
        // Linux may send other frames first (IPv6 neighbour discovery when the link comes
        // up): look at each, give the buffer back, until the ARP reply arrives.
        let mut found = false;
        for _ in 0..100 {
            while let Some((_, len)) = rx.pop_used(&bus).unwrap() {
                let mut b = vec![0u8; len as usize];
                bus.ram_read(rxbuf, &mut b).unwrap();
                if b.len() >= 34 && b[24..26] == [0x08, 0x06] && b[32..34] == [0, 2] {
                    assert_eq!(&b[12..18], &GUEST_MAC, "an ARP reply to the guest");
                    found = true;
                }
                rx.add(
                    &bus,
                    &[Buf {
                        gpa: rxbuf,
                        len: 2048,
                        write: true,
                    }],
                )
                .unwrap();
                rx.publish(&bus).unwrap();
            }
            if found {
                break;
            }
            bus.wait_irq(Duration::from_millis(100));
            bus.take_irqs();
        }
        assert!(found, "an ARP reply from Linux");
        assert!(tap_rx() > before, "the NIC's own frames reach the tap");
        // A transmit ring index far ahead: that queue stops, the thread does not spin, and
        // a reset (which joins the queue thread) completes and clears the device.
        bus.ram_write(tx.avail + 2, &5000u16.to_le_bytes()).unwrap();
        bus.mmio_write(dev.notify + 4, 2, 1).unwrap();
        dev.reset(&bus).unwrap();
        assert_eq!(dev.status(&bus).unwrap(), 0);
    });
}

/// Two queue pairs: the device offers MQ with a control queue; VQ_PAIRS_SET 2 is acked, 3
/// (more than the device has) and an unknown class are refused.
#[test]
fn virtio_net_multiqueue_control_queue() {
    use xensim::guestos::virtio::{Buf, VirtioPciDev};
    in_netns(|| {
        let bus = DirectBus::new(&config("virtio_queues = 2\nvif = [ 'vifname=dmtap1' ]"));
        let mut fns = pci::enumerate(&bus).unwrap();
        pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
        let f = fns.iter().find(|f| f.device == 0x1041).unwrap().clone();
        let dev = VirtioPciDev::new(&bus, &f, 0x80).unwrap();
        let feats = dev.negotiate(&bus, (1 << 17) | (1 << 22)).unwrap();
        assert_eq!(feats & ((1 << 17) | (1 << 22)), (1 << 17) | (1 << 22));
        assert_eq!(dev.num_queues(&bus).unwrap(), 5);
        assert_eq!(
            bus.mmio_read(dev.device + 8, 2).unwrap(),
            2,
            "max_virtqueue_pairs"
        );
        dev.enable_msix(&bus, 6).unwrap();
        let ram = RamAlloc::new(1 << 20, bus.ram_size());
        let _rx = dev.setup_queue(&bus, 0, 16, 1, &ram).unwrap();
        let _tx = dev.setup_queue(&bus, 1, 16, 2, &ram).unwrap();
        let mut ctrl = dev.setup_queue(&bus, 4, 16, 5, &ram).unwrap();
        dev.driver_ok(&bus).unwrap();
        let cmd = ram.alloc(64, 64).unwrap();
        let mut send = |class: u8, code: u8, data: &[u8]| -> u8 {
            let mut c = vec![class, code];
            c.extend_from_slice(data);
            bus.ram_write(cmd, &c).unwrap();
            bus.ram_write(cmd + 32, &[0xee]).unwrap();
            ctrl.add(
                &bus,
                &[
                    Buf {
                        gpa: cmd,
                        len: c.len() as u32,
                        write: false,
                    },
                    Buf {
                        gpa: cmd + 32,
                        len: 1,
                        write: true,
                    },
                ],
            )
            .unwrap();
            ctrl.publish(&bus).unwrap();
            for _ in 0..100 {
                if ctrl.pop_used(&bus).unwrap().is_some() {
                    let mut a = [0u8];
                    bus.ram_read(cmd + 32, &mut a).unwrap();
                    return a[0];
                }
                bus.wait_irq(Duration::from_millis(100));
                bus.take_irqs();
            }
            panic!("control command not answered");
        };
        assert_eq!(send(4, 0, &2u16.to_le_bytes()), 0);
        assert_eq!(send(4, 0, &3u16.to_le_bytes()), 1);
        assert_eq!(send(4, 0, &0u16.to_le_bytes()), 1);
        assert_eq!(send(0, 0, &[1]), 0, "promiscuous mode is acked");
        assert_eq!(send(9, 9, &[]), 1);
    });
}

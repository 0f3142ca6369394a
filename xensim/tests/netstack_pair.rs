//! The guest TCP/IP stack between two simulated guests joined by a socket pair (one datagram
//! per frame, offload metadata in a 4-byte prefix): ARP, ping, TCP both ways with checksums,
//! GSO super-frames when offloads are on, and bad checksums dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use xensim::front::frame::{FrameDevice, FrameMeta, Gso};
use xensim::front::netstack::{NetConfig, NetStack, StreamSum};

/// One end of a frame wire: a datagram socket, a 4-byte metadata prefix per frame.
struct PairDevice {
    sock: UnixDatagram,
    offloads: bool,
    buf: Vec<u8>,
    /// Corrupt the checksum of the next `corrupt` TCP frames we send.
    corrupt: usize,
}

impl PairDevice {
    fn pair(offloads: bool) -> (PairDevice, PairDevice) {
        let (a, b) = UnixDatagram::pair().unwrap();
        for s in [&a, &b] {
            s.set_nonblocking(true).unwrap();
        }
        let mk = |sock| PairDevice {
            sock,
            offloads,
            buf: vec![0; 70_000],
            corrupt: 0,
        };
        (mk(a), mk(b))
    }
}

fn enc(m: FrameMeta) -> [u8; 4] {
    let (t, mss) = match m.gso {
        None => (0, 0u16),
        Some(Gso::TcpV4 { mss }) => (1, mss),
        Some(Gso::TcpV6 { mss }) => (2, mss),
    };
    let f = u8::from(m.csum_blank) | u8::from(m.data_validated) << 1;
    let b = mss.to_le_bytes();
    [t, f, b[0], b[1]]
}

fn dec(p: [u8; 4]) -> FrameMeta {
    let mss = u16::from_le_bytes([p[2], p[3]]);
    FrameMeta {
        gso: match p[0] {
            1 => Some(Gso::TcpV4 { mss }),
            2 => Some(Gso::TcpV6 { mss }),
            _ => None,
        },
        csum_blank: p[1] & 1 != 0,
        data_validated: p[1] & 2 != 0,
    }
}

impl FrameDevice for PairDevice {
    type Error = std::io::Error;
    fn max_frame(&self) -> usize {
        if self.offloads {
            65_549
        } else {
            1514
        }
    }
    fn offloads(&self) -> bool {
        self.offloads
    }
    fn send(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool, std::io::Error> {
        let mut d = enc(meta).to_vec();
        d.extend_from_slice(frame);
        if self.corrupt > 0 && frame.len() > 54 && frame[23] == 6 && !meta.csum_blank {
            self.corrupt -= 1;
            let last = d.len() - 1;
            d[last] ^= 0xff;
        }
        match self.sock.send(&d) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn recv(&mut self, out: &mut Vec<u8>) -> Result<Option<FrameMeta>, std::io::Error> {
        out.clear();
        match self.sock.recv(&mut self.buf) {
            Ok(n) if n >= 4 => {
                out.extend_from_slice(&self.buf[4..n]);
                Ok(Some(dec([
                    self.buf[0],
                    self.buf[1],
                    self.buf[2],
                    self.buf[3],
                ])))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), std::io::Error> {
        use std::os::fd::AsFd;
        let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            self.sock.as_fd(),
            nix::poll::PollFlags::POLLIN | nix::poll::PollFlags::POLLOUT,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))?;
        Ok(())
    }
}

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 5, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 5, 0, 2);
const T: Duration = Duration::from_secs(60);

fn stacks(offloads: bool) -> (NetStack<PairDevice>, NetStack<PairDevice>) {
    let (a, b) = PairDevice::pair(offloads);
    let sa = NetStack::new(a, &NetConfig::ipv4([0, 0x16, 0x3e, 0, 0, 1], A_IP, 24)).unwrap();
    let sb = NetStack::new(b, &NetConfig::ipv4([0, 0x16, 0x3e, 0, 0, 2], B_IP, 24)).unwrap();
    (sa, sb)
}

/// B serves: accepts on port 5001 and receives to EOF, then sends `back` bytes... A connects,
/// sends `n` bytes, closes. Returns (A's sent sum, B's received sum, A's stats).
fn transfer(
    offloads: bool,
    n: u64,
    corrupt: usize,
) -> (StreamSum, StreamSum, NetStack<PairDevice>) {
    let (mut a, mut b) = stacks(offloads);
    a.device().corrupt = corrupt;
    let server = std::thread::spawn(move || {
        let h = b.tcp_accept(5001, T).unwrap();
        let got = b.tcp_recv_all(h, T).unwrap();
        b.tcp_close(h, T).unwrap();
        (got.sum, b)
    });
    let h = a
        .tcp_connect(SocketAddr::from((B_IP, 5001)), T)
        .expect("connect");
    let sent = a.tcp_send_pattern(h, n, T).expect("send");
    let _ = a.tcp_recv_all(h, T);
    let (got, _b) = server.join().unwrap();
    (sent.sum, got, a)
}

#[test]
fn test_netstack_ping_resolves_arp_and_gets_replies() {
    let (mut a, mut b) = stacks(false);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let responder = std::thread::spawn(move || {
        // B answers ARP and echo requests from its poll loop.
        let _ = b.run_until("the test to end", T, |_| {
            Ok(s2.load(std::sync::atomic::Ordering::Relaxed).then_some(()))
        });
    });
    let rtts = a
        .ping(B_IP, 3, Duration::from_secs(10))
        .expect("three replies");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().unwrap();
    assert_eq!(rtts.len(), 3);
}

#[test]
fn test_netstack_tcp_transfer_checksums_match_without_offloads() {
    let (sent, got, a) = transfer(false, 8 << 20, 0);
    assert_eq!(sent.bytes, 8 << 20);
    assert_eq!(sent, got);
    let st = a.stats();
    assert_eq!(st.tx_gso, 0);
    assert_eq!(st.tx_csum_blank, 0);
}

#[test]
fn test_netstack_tcp_with_offloads_sends_64k_frames_with_blank_checksums() {
    // Both ends take 64 KiB frames, so each announces a 64 KiB MSS: frames are large but
    // need no GSO marking (that the MSS of a Linux peer leads to GSO frames is shown in
    // tests/net_e2e.rs).
    let (sent, got, a) = transfer(true, 8 << 20, 0);
    assert_eq!(sent, got);
    let st = a.stats();
    assert_eq!(st.tx_gso, 0, "{st:?}");
    assert!(st.tx_csum_blank > 0, "{st:?}");
    assert!(
        st.tx_bytes / st.tx_frames > 4000,
        "frames average {} bytes: {st:?}",
        st.tx_bytes / st.tx_frames
    );
}

#[test]
fn test_netstack_drops_frames_with_bad_checksums_and_tcp_recovers() {
    // Arrange + Act: A corrupts its first 5 data frames; B must drop them, A retransmits.
    let (a, b) = PairDevice::pair(false);
    let mut a = NetStack::new(a, &NetConfig::ipv4([0, 0x16, 0x3e, 0, 0, 1], A_IP, 24)).unwrap();
    let mut b = NetStack::new(b, &NetConfig::ipv4([0, 0x16, 0x3e, 0, 0, 2], B_IP, 24)).unwrap();
    let server = std::thread::spawn(move || {
        let h = b.tcp_accept(5002, T).unwrap();
        let got = b.tcp_recv_all(h, T).unwrap();
        (got.sum, b.stats())
    });
    let h = a.tcp_connect(SocketAddr::from((B_IP, 5002)), T).unwrap();
    a.device().corrupt = 5;
    let sent = a.tcp_send_pattern(h, 1 << 20, T).unwrap();
    let (got, bstats) = server.join().unwrap();

    // Assert
    assert_eq!(sent.sum, got);
    assert_eq!(bstats.rx_bad_csum, 5, "{bstats:?}");
}

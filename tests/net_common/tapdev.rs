//! A [`FrameDevice`] straight on a tap queue: the guest stack wired to the host without a
//! netback in between, for testing the stack and the tap against real Linux networking and
//! as the baseline of `domio bench net`.
//!
//! The mapping between [`FrameMeta`] and the vnet header is the one netback makes between
//! netif flags and the tap: `csum_blank` is VIRTIO_NET_HDR_F_NEEDS_CSUM with the L4 offsets,
//! `data_validated` is F_DATA_VALID, and GSO is GSO_TCPV4/TCPV6 with the segment size.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use backends::net::engine::{NetQueueIo, VirtioNetHdr};
use backends::net::tap::TapQueue;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xensim::front::frame::{FrameDevice, FrameMeta, Gso};
use xensim::front::netstack::l4_offsets;

/// Largest frame through a tap with GSO (64 KiB of IP plus the Ethernet header).
pub const TAP_MAX_FRAME: usize = 65_535 + 14;

/// A guest NIC that is a tap queue.
pub struct TapFrameDevice {
    q: Arc<TapQueue>,
    buf: Vec<u8>,
    offloads: bool,
    max_frame: usize,
}

impl TapFrameDevice {
    /// Over `q`; with `offloads`, frames may be GSO super-frames with blank checksums (the
    /// tap must have been given TUNSETOFFLOAD csum and TSO for the receive side).
    pub fn new(q: Arc<TapQueue>, offloads: bool, mtu: usize) -> TapFrameDevice {
        TapFrameDevice {
            q,
            buf: vec![0; TAP_MAX_FRAME],
            offloads,
            max_frame: if offloads { TAP_MAX_FRAME } else { mtu + 14 },
        }
    }
}

/// The vnet header netback would write for a frame with `meta`.
pub fn hdr_for(frame: &[u8], meta: FrameMeta) -> VirtioNetHdr {
    let mut h = VirtioNetHdr::default();
    let o = l4_offsets(frame);
    if meta.csum_blank {
        if let Some(o) = o {
            h.flags = VirtioNetHdr::F_NEEDS_CSUM;
            h.csum_start = o.l4_start as u16;
            h.csum_offset = o.csum_offset as u16;
        }
    } else if meta.data_validated {
        h.flags = VirtioNetHdr::F_DATA_VALID;
    }
    if let (Some(g), Some(o)) = (meta.gso, o) {
        let (t, mss) = match g {
            Gso::TcpV4 { mss } => (VirtioNetHdr::GSO_TCPV4, mss),
            Gso::TcpV6 { mss } => (VirtioNetHdr::GSO_TCPV6, mss),
        };
        h.gso_type = t;
        h.gso_size = mss;
        h.hdr_len = o.hdr_len as u16;
    }
    h
}

/// The frame metadata a vnet header from the tap means.
pub fn meta_for(h: &VirtioNetHdr) -> FrameMeta {
    let gso = match h.gso_type & !VirtioNetHdr::GSO_ECN {
        VirtioNetHdr::GSO_TCPV4 => Some(Gso::TcpV4 { mss: h.gso_size }),
        VirtioNetHdr::GSO_TCPV6 => Some(Gso::TcpV6 { mss: h.gso_size }),
        _ => None,
    };
    FrameMeta {
        gso,
        csum_blank: h.flags & VirtioNetHdr::F_NEEDS_CSUM != 0,
        data_validated: h.flags & VirtioNetHdr::F_DATA_VALID != 0,
    }
}

impl FrameDevice for TapFrameDevice {
    type Error = io::Error;

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn offloads(&self) -> bool {
        self.offloads
    }

    fn send(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool, io::Error> {
        let h = hdr_for(frame, meta);
        match self.q.send(&h, &[IoSlice::new(frame)]) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, out: &mut Vec<u8>) -> Result<Option<FrameMeta>, io::Error> {
        out.clear();
        match self.q.recv(&mut self.buf)? {
            Some((h, n)) => {
                out.extend_from_slice(&self.buf[..n]);
                Ok(Some(meta_for(&h)))
            }
            None => Ok(None),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), io::Error> {
        let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.q.fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => Ok(()),
            Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

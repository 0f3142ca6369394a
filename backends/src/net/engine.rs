//! The network engine contract: one queue of a host-side packet device that carries frames
//! with a `virtio_net_hdr` in front (a tap opened with IFF_VNET_HDR, or a test double with
//! the same semantics). netback and devmodel's virtio-net both sit on it.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;

/// `struct virtio_net_hdr_mrg_rxbuf` (linux/virtio_net.h): what the tap puts in front of each
/// frame once TUNSETVNETHDRSZ is 12. Little-endian on the wire (TUNSETVNETLE or a
/// little-endian host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM (1), VIRTIO_NET_HDR_F_DATA_VALID (2).
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_NONE (0), _TCPV4 (1), _UDP (3), _TCPV6 (4), | _ECN (0x80).
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts (NEEDS_CSUM).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers used (mergeable RX buffers); 0 or 1 here.
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Size on the wire.
    pub const LEN: usize = 12;
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// VIRTIO_NET_HDR_F_DATA_VALID.
    pub const F_DATA_VALID: u8 = 2;
    /// VIRTIO_NET_HDR_GSO_NONE.
    pub const GSO_NONE: u8 = 0;
    /// VIRTIO_NET_HDR_GSO_TCPV4.
    pub const GSO_TCPV4: u8 = 1;
    /// VIRTIO_NET_HDR_GSO_UDP.
    pub const GSO_UDP: u8 = 3;
    /// VIRTIO_NET_HDR_GSO_TCPV6.
    pub const GSO_TCPV6: u8 = 4;
    /// VIRTIO_NET_HDR_GSO_ECN.
    pub const GSO_ECN: u8 = 0x80;

    /// Encodes it.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Decodes it.
    pub fn from_bytes(b: &[u8; Self::LEN]) -> VirtioNetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }
}

/// One queue of a network engine. Non-blocking: the caller polls `fd` for readability.
pub trait NetQueueIo: Send + Sync {
    /// Sends one frame: `hdr`, then the frame gathered from `frame`. The frame is at most
    /// 64 KiB + 14 bytes.
    fn send(&self, hdr: &VirtioNetHdr, frame: &[IoSlice<'_>]) -> io::Result<()>;
    /// Receives one frame into `buf` (which should hold 64 KiB + 14 bytes). `Ok(None)` when
    /// nothing is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(VirtioNetHdr, usize)>>;
    /// A descriptor that becomes readable when a frame is waiting.
    fn fd(&self) -> BorrowedFd<'_>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 1,
        };
        let b = h.to_bytes();
        assert_eq!(b[2..4], [54, 0]);
        assert_eq!(b[4..6], 1448u16.to_le_bytes());
        assert_eq!(VirtioNetHdr::from_bytes(&b), h);
    }
}

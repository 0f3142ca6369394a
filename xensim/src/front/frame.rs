//! The contract between a guest NIC driver (netfront, or the HVM guest library's virtio-net
//! driver) and the guest's TCP/IP stack: whole Ethernet frames plus their offload metadata.

use std::time::Duration;

/// GSO of a transmitted or received super-frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// TCP over IPv4, segmented into `mss`-byte payloads.
    TcpV4 {
        /// Segment payload size.
        mss: u16,
    },
    /// TCP over IPv6.
    TcpV6 {
        /// Segment payload size.
        mss: u16,
    },
}

/// Offload metadata of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameMeta {
    /// The frame is larger than the MTU and must be segmented (TX) or was coalesced (RX).
    pub gso: Option<Gso>,
    /// The L4 checksum is not filled in (NETTXF_CSUM_BLANK / NETRXF_CSUM_BLANK).
    pub csum_blank: bool,
    /// The checksum was verified by someone we trust (NETTXF/NETRXF_DATA_VALIDATED).
    pub data_validated: bool,
}

/// A guest NIC queue as the guest's network stack sees it.
pub trait FrameDevice: Send {
    /// The error type of the driver.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Largest frame `send` takes (MTU + 14, or 64 KiB when GSO is negotiated).
    fn max_frame(&self) -> usize;
    /// Whether the backend takes GSO super-frames and blank checksums.
    fn offloads(&self) -> bool;
    /// Queues one frame for transmission. `Ok(false)` means the TX ring is full right now
    /// (try again after `wait`).
    fn send(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool, Self::Error>;
    /// Takes one received frame into `buf` (cleared first), if one is waiting.
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Option<FrameMeta>, Self::Error>;
    /// Blocks until the backend signals (RX arrived or TX slots freed) or `timeout` passes.
    fn wait(&mut self, timeout: Duration) -> Result<(), Self::Error>;
}

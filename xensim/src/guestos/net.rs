//! A virtio-net driver for one queue pair, as a [`FrameDevice`] so the guest's TCP/IP stack
//! (`crate::front::netstack`) runs over it: receive buffers posted up front, one transmit
//! buffer per descriptor, the 12-byte `virtio_net_hdr_mrg_rxbuf` carrying checksum and GSO
//! offloads both ways, completions by MSI-X.

use std::sync::Arc;
use std::time::Duration;

use super::pci::PciFunction;
use super::virtio::{Buf, VirtioPciDev, Virtqueue};
use super::{bus_err, GuestOsError, RamAlloc, Result};
use crate::front::frame::{FrameDevice, FrameMeta, Gso};
use crate::front::netstack::l4_offsets;
use crate::hvm::HvmBus;

/// VIRTIO_NET_F_CSUM.
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MTU.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_GUEST_TSO4.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_HOST_TSO4.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;

const HDR: usize = 12;
const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// Largest frame with GSO.
pub const MAX_FRAME: usize = 65_535 + 14;

/// A virtio-net device driven by the guest.
pub struct VirtioNetDriver<B: HvmBus> {
    bus: Arc<B>,
    /// The transport.
    pub dev: VirtioPciDev,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_of: Vec<u64>,
    tx_of: Vec<u64>,
    buf_len: u32,
    /// Negotiated features.
    pub features: u64,
    /// The MAC the device gave.
    pub mac: [u8; 6],
    /// The MTU the device gave.
    pub mtu: u16,
    scratch: Vec<u8>,
    /// Receive buffers given back but not yet published.
    rx_unposted: u32,
}

impl<B: HvmBus> std::fmt::Debug for VirtioNetDriver<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNetDriver")
            .field("mac", &self.mac)
            .finish()
    }
}

impl<B: HvmBus> VirtioNetDriver<B> {
    /// Brings up queue pair 0 with `qsize` entries; with `offloads`, checksum offload and
    /// TSO both ways are negotiated.
    pub fn new(
        bus: Arc<B>,
        f: &PciFunction,
        ram: &RamAlloc,
        vector_base: u32,
        qsize: u16,
        offloads: bool,
    ) -> Result<VirtioNetDriver<B>> {
        let b = bus.as_ref();
        let dev = VirtioPciDev::new(b, f, vector_base)?;
        let mut want = F_MAC | F_MTU | F_STATUS | super::virtio::F_EVENT_IDX;
        if offloads {
            want |= F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4 | F_GUEST_TSO6;
        }
        let features = dev.negotiate(b, want)?;
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = b.mmio_read(dev.device + i as u64, 1).map_err(bus_err)? as u8;
        }
        let mtu = if features & F_MTU != 0 {
            b.mmio_read(dev.device + 10, 2).map_err(bus_err)? as u16
        } else {
            1500
        };
        dev.enable_msix(b, 3)?;
        dev.set_config_vector(b, 0)?;
        let mut rx = dev.setup_queue(b, 0, qsize, 1, ram)?;
        let mut tx = dev.setup_queue(b, 1, qsize, 2, ram)?;
        let evi = features & super::virtio::F_EVENT_IDX != 0;
        rx.set_event_idx(evi);
        tx.set_event_idx(evi);
        let big = features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0;
        let buf_len = (HDR
            + if big {
                MAX_FRAME
            } else {
                usize::from(mtu) + 14
            }) as u32;
        let n = usize::from(rx.size);
        let mut rx_of = vec![0u64; n];
        for _ in 0..n {
            let gpa = ram.alloc(u64::from(buf_len), 64)?;
            let head = rx.peek_free();
            rx_of[usize::from(head)] = gpa;
            rx.add(
                b,
                &[Buf {
                    gpa,
                    len: buf_len,
                    write: true,
                }],
            )?;
        }
        let mut tx_of = vec![0u64; usize::from(tx.size)];
        for t in tx_of.iter_mut() {
            *t = ram.alloc(u64::from(buf_len.max((HDR + MAX_FRAME) as u32)), 64)?;
        }
        dev.driver_ok(b)?;
        rx.publish(b)?;
        Ok(VirtioNetDriver {
            bus,
            dev,
            rx,
            tx,
            rx_of,
            tx_of,
            buf_len,
            features,
            mac,
            mtu,
            scratch: vec![0u8; HDR + MAX_FRAME],
            rx_unposted: 0,
        })
    }

    fn reclaim_tx(&mut self) -> Result<()> {
        while self.tx.pop_used(self.bus.as_ref())?.is_some() {}
        Ok(())
    }
}

fn hdr_for(frame: &[u8], meta: FrameMeta) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    let o = l4_offsets(frame);
    if meta.csum_blank {
        if let Some(o) = o {
            h[0] = NEEDS_CSUM;
            h[6..8].copy_from_slice(&(o.l4_start as u16).to_le_bytes());
            h[8..10].copy_from_slice(&(o.csum_offset as u16).to_le_bytes());
        }
    } else if meta.data_validated {
        h[0] = DATA_VALID;
    }
    if let (Some(g), Some(o)) = (meta.gso, o) {
        let (t, mss) = match g {
            Gso::TcpV4 { mss } => (GSO_TCPV4, mss),
            Gso::TcpV6 { mss } => (GSO_TCPV6, mss),
        };
        h[1] = t;
        h[2..4].copy_from_slice(&(o.hdr_len as u16).to_le_bytes());
        h[4..6].copy_from_slice(&mss.to_le_bytes());
    }
    h
}

fn meta_for(h: &[u8]) -> FrameMeta {
    let gso_size = u16::from_le_bytes([h[4], h[5]]);
    FrameMeta {
        gso: match h[1] & 0x7f {
            GSO_TCPV4 => Some(Gso::TcpV4 { mss: gso_size }),
            GSO_TCPV6 => Some(Gso::TcpV6 { mss: gso_size }),
            _ => None,
        },
        csum_blank: h[0] & NEEDS_CSUM != 0,
        data_validated: h[0] & DATA_VALID != 0,
    }
}

impl<B: HvmBus + 'static> FrameDevice for VirtioNetDriver<B> {
    type Error = GuestOsError;

    fn max_frame(&self) -> usize {
        if self.offloads() {
            MAX_FRAME
        } else {
            usize::from(self.mtu) + 14
        }
    }

    fn offloads(&self) -> bool {
        let need = F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4;
        self.features & need == need
    }

    fn send(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool> {
        if frame.len() > self.max_frame() {
            return Err(GuestOsError::Device(format!(
                "frame of {} bytes is above {}",
                frame.len(),
                self.max_frame()
            )));
        }
        self.reclaim_tx()?;
        if self.tx.free() == 0 {
            return Ok(false);
        }
        let b = self.bus.as_ref();
        let head = self.tx.peek_free();
        let gpa = self.tx_of[usize::from(head)];
        let h = hdr_for(frame, meta);
        self.scratch[..HDR].copy_from_slice(&h);
        self.scratch[HDR..HDR + frame.len()].copy_from_slice(frame);
        b.ram_write(gpa, &self.scratch[..HDR + frame.len()])
            .map_err(bus_err)?;
        self.tx.add(
            b,
            &[Buf {
                gpa,
                len: (HDR + frame.len()) as u32,
                write: false,
            }],
        )?;
        self.tx.publish(b)?;
        Ok(true)
    }

    fn recv(&mut self, out: &mut Vec<u8>) -> Result<Option<FrameMeta>> {
        out.clear();
        let b = self.bus.as_ref();
        let Some((head, len)) = self.rx.pop_used(b)? else {
            // Nothing more for now: hand back the buffers taken so far in one doorbell.
            if self.rx_unposted > 0 {
                self.rx_unposted = 0;
                self.rx.publish(b)?;
            }
            return Ok(None);
        };
        let gpa = *self
            .rx_of
            .get(usize::from(head))
            .ok_or_else(|| GuestOsError::Device(format!("rx head {head}")))?;
        let len = len as usize;
        if len < HDR || len > self.buf_len as usize {
            return Err(GuestOsError::Device(format!("rx used length {len}")));
        }
        b.ram_read(gpa, &mut self.scratch[..len]).map_err(bus_err)?;
        let meta = meta_for(&self.scratch[..HDR]);
        out.extend_from_slice(&self.scratch[HDR..len]);
        // Post the buffer again.
        let nhead = self.rx.peek_free();
        self.rx_of[usize::from(nhead)] = gpa;
        self.rx.add(
            b,
            &[Buf {
                gpa,
                len: self.buf_len,
                write: true,
            }],
        )?;
        self.rx_unposted += 1;
        if self.rx_unposted >= u32::from(self.rx.size / 4).max(1) {
            self.rx_unposted = 0;
            self.rx.publish(b)?;
        }
        Ok(Some(meta))
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        let b = self.bus.as_ref();
        if b.wait_irq(timeout) {
            b.take_irqs();
        }
        Ok(())
    }
}

//! The guest side of virtio-pci (modern, virtio 1.x): finding the configuration structures
//! through the vendor capabilities, the status handshake (reset, ACKNOWLEDGE, DRIVER,
//! feature negotiation, FEATURES_OK, DRIVER_OK), split virtqueues in guest RAM, MSI-X vectors
//! and notification.

use std::time::{Duration, Instant};

use super::pci::PciFunction;
use super::{bus_err, ram_u16, ram_u32, GuestOsError, RamAlloc, Result};
use crate::hvm::{HvmBus, Irq};

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// Status bits.
pub const S_ACKNOWLEDGE: u8 = 1;
/// DRIVER.
pub const S_DRIVER: u8 = 2;
/// DRIVER_OK.
pub const S_DRIVER_OK: u8 = 4;
/// FEATURES_OK.
pub const S_FEATURES_OK: u8 = 8;
/// DEVICE_NEEDS_RESET.
pub const S_NEEDS_RESET: u8 = 0x40;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// The MSI address the drivers program (the local APIC window, destination 0).
pub const MSI_ADDR: u64 = 0xfee0_0000;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A virtio-pci function, its structures located.
#[derive(Debug, Clone)]
pub struct VirtioPciDev {
    /// The PCI function.
    pub pci: PciFunction,
    /// Common configuration.
    pub common: u64,
    /// Notify area.
    pub notify: u64,
    /// Notify multiplier.
    pub notify_mult: u32,
    /// ISR.
    pub isr: u64,
    /// Device configuration.
    pub device: u64,
    /// MSI-X table (guest-physical), if there is MSI-X.
    pub msix_table: Option<u64>,
    /// MSI-X table size.
    pub msix_vectors: u16,
    /// MSI-X capability offset.
    pub msix_cap: Option<u8>,
    /// First MSI data value this device's vectors use.
    pub vector_base: u32,
}

fn bar_addr(f: &PciFunction, bar: u8) -> Result<u64> {
    f.bars
        .get(usize::from(bar))
        .copied()
        .flatten()
        .filter(|b| !b.io && b.addr != 0)
        .map(|b| b.addr)
        .ok_or_else(|| GuestOsError::Device(format!("virtio structure in unassigned BAR{bar}")))
}

impl VirtioPciDev {
    /// Locates the structures of `f` (its BARs must be assigned). MSI data values start at
    /// `vector_base`.
    pub fn new<B: HvmBus>(b: &B, f: &PciFunction, vector_base: u32) -> Result<VirtioPciDev> {
        let (mut common, mut notify, mut isr, mut device, mut mult) = (None, None, None, None, 0);
        for c in f.caps.iter().filter(|c| c.id == 0x09) {
            let o = u16::from(c.off);
            let ty = f.read(b, o + 3, 1)? as u8;
            let bar = f.read(b, o + 4, 1)? as u8;
            let off = u64::from(f.read(b, o + 8, 4)?);
            let addr = || bar_addr(f, bar).map(|a| a + off);
            match ty {
                1 if common.is_none() => common = Some(addr()?),
                2 if notify.is_none() => {
                    notify = Some(addr()?);
                    mult = f.read(b, o + 16, 4)?;
                }
                3 if isr.is_none() => isr = Some(addr()?),
                4 if device.is_none() => device = Some(addr()?),
                _ => {}
            }
        }
        let missing = |w: &str| {
            GuestOsError::Device(format!(
                "virtio {:02x}:{:02x}: no {w} capability",
                f.bus, f.dev
            ))
        };
        let (mut msix_table, mut msix_vectors) = (None, 0);
        let msix_cap = f.cap(0x11);
        if let Some(mc) = msix_cap {
            let ctrl = f.read(b, u16::from(mc) + 2, 2)?;
            let tbl = f.read(b, u16::from(mc) + 4, 4)?;
            msix_vectors = (ctrl & 0x7ff) as u16 + 1;
            msix_table = Some(bar_addr(f, (tbl & 7) as u8)? + u64::from(tbl & !7));
        }
        Ok(VirtioPciDev {
            pci: f.clone(),
            common: common.ok_or_else(|| missing("common"))?,
            notify: notify.ok_or_else(|| missing("notify"))?,
            notify_mult: mult,
            isr: isr.ok_or_else(|| missing("ISR"))?,
            device: device.ok_or_else(|| missing("device"))?,
            msix_table,
            msix_vectors,
            msix_cap,
            vector_base,
        })
    }

    fn r<B: HvmBus>(&self, b: &B, off: u64, size: u8) -> Result<u64> {
        b.mmio_read(self.common + off, size).map_err(bus_err)
    }
    fn w<B: HvmBus>(&self, b: &B, off: u64, size: u8, v: u64) -> Result<()> {
        b.mmio_write(self.common + off, size, v).map_err(bus_err)
    }

    /// Device status.
    pub fn status<B: HvmBus>(&self, b: &B) -> Result<u8> {
        Ok(self.r(b, 0x14, 1)? as u8)
    }

    /// Writes device status.
    pub fn set_status<B: HvmBus>(&self, b: &B, s: u8) -> Result<()> {
        self.w(b, 0x14, 1, u64::from(s))
    }

    /// Resets the device and waits until status reads 0.
    pub fn reset<B: HvmBus>(&self, b: &B) -> Result<()> {
        self.set_status(b, 0)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.status(b)? != 0 {
            if Instant::now() > deadline {
                return Err(GuestOsError::Timeout("virtio reset".into()));
            }
        }
        Ok(())
    }

    /// The device's feature bits.
    pub fn device_features<B: HvmBus>(&self, b: &B) -> Result<u64> {
        self.w(b, 0x00, 4, 0)?;
        let lo = self.r(b, 0x04, 4)?;
        self.w(b, 0x00, 4, 1)?;
        let hi = self.r(b, 0x04, 4)?;
        Ok(lo | (hi << 32))
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then negotiates `wanted & offered` (VERSION_1 required)
    /// and sets FEATURES_OK. Returns the negotiated features.
    pub fn negotiate<B: HvmBus>(&self, b: &B, wanted: u64) -> Result<u64> {
        self.reset(b)?;
        self.set_status(b, S_ACKNOWLEDGE)?;
        self.set_status(b, S_ACKNOWLEDGE | S_DRIVER)?;
        let offered = self.device_features(b)?;
        if offered & F_VERSION_1 == 0 {
            return Err(GuestOsError::Device(
                "device does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let f = (wanted | F_VERSION_1) & offered;
        self.w(b, 0x08, 4, 0)?;
        self.w(b, 0x0c, 4, f & 0xffff_ffff)?;
        self.w(b, 0x08, 4, 1)?;
        self.w(b, 0x0c, 4, f >> 32)?;
        self.set_status(b, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)?;
        if self.status(b)? & S_FEATURES_OK == 0 {
            return Err(GuestOsError::Device(format!(
                "device refused features {f:#x}"
            )));
        }
        Ok(f)
    }

    /// Number of queues.
    pub fn num_queues<B: HvmBus>(&self, b: &B) -> Result<u16> {
        Ok(self.r(b, 0x12, 2)? as u16)
    }

    /// Turns MSI-X on and programs `n` vectors: vector `i` sends data `vector_base + i` to
    /// [`MSI_ADDR`], unmasked.
    pub fn enable_msix<B: HvmBus>(&self, b: &B, n: u16) -> Result<()> {
        let (Some(cap), Some(table)) = (self.msix_cap, self.msix_table) else {
            return Err(GuestOsError::Device("no MSI-X".into()));
        };
        let n = n.min(self.msix_vectors);
        let ctrl = self.pci.read(b, u16::from(cap) + 2, 2)?;
        // Enable with the function masked while the table is written.
        self.pci.write(b, u16::from(cap) + 2, 2, ctrl | 0xc000)?;
        for i in 0..u64::from(n) {
            let e = table + 16 * i;
            b.mmio_write(e, 4, MSI_ADDR & 0xffff_ffff)
                .map_err(bus_err)?;
            b.mmio_write(e + 4, 4, MSI_ADDR >> 32).map_err(bus_err)?;
            b.mmio_write(e + 8, 4, u64::from(self.vector_base) + i)
                .map_err(bus_err)?;
            b.mmio_write(e + 12, 4, 0).map_err(bus_err)?;
        }
        self.pci
            .write(b, u16::from(cap) + 2, 2, (ctrl | 0x8000) & !0x4000)?;
        Ok(())
    }

    /// Sets the configuration-change vector.
    pub fn set_config_vector<B: HvmBus>(&self, b: &B, v: u16) -> Result<()> {
        self.w(b, 0x10, 2, u64::from(v))
    }

    /// Allocates and registers queue `idx` with `size` entries and MSI-X vector `vector`.
    pub fn setup_queue<B: HvmBus>(
        &self,
        b: &B,
        idx: u16,
        size: u16,
        vector: u16,
        ram: &RamAlloc,
    ) -> Result<Virtqueue> {
        self.w(b, 0x16, 2, u64::from(idx))?;
        let max = self.r(b, 0x18, 2)? as u16;
        let size = size.min(max);
        if size == 0 || !size.is_power_of_two() {
            return Err(GuestOsError::Device(format!(
                "queue {idx}: device maximum {max}"
            )));
        }
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 4096)?;
        let avail = ram.alloc(6 + 2 * n, 2)?;
        let used = ram.alloc(6 + 8 * n, 4096)?;
        b.ram_write(desc, &vec![0u8; (16 * n) as usize])
            .map_err(bus_err)?;
        b.ram_write(avail, &vec![0u8; (6 + 2 * n) as usize])
            .map_err(bus_err)?;
        b.ram_write(used, &vec![0u8; (6 + 8 * n) as usize])
            .map_err(bus_err)?;
        self.w(b, 0x18, 2, n)?;
        self.w(b, 0x1a, 2, u64::from(vector))?;
        self.w(b, 0x20, 8, desc)?;
        self.w(b, 0x28, 8, avail)?;
        self.w(b, 0x30, 8, used)?;
        let notify_off = self.r(b, 0x1e, 2)?;
        self.w(b, 0x1c, 2, 1)?;
        Ok(Virtqueue {
            idx,
            size,
            desc,
            avail,
            used,
            notify: self.notify + notify_off * u64::from(self.notify_mult),
            free: (0..size).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            vector,
            doorbells: 0,
            doorbells_skipped: 0,
            event_idx: false,
            published: 0,
        })
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok<B: HvmBus>(&self, b: &B) -> Result<()> {
        let s = self.status(b)?;
        self.set_status(b, s | S_DRIVER_OK)?;
        if self.status(b)? & S_NEEDS_RESET != 0 {
            return Err(GuestOsError::Device(
                "device needs reset after DRIVER_OK".into(),
            ));
        }
        Ok(())
    }
}

/// A buffer in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

/// A split virtqueue the driver owns.
#[derive(Debug)]
pub struct Virtqueue {
    /// Index.
    pub idx: u16,
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Driver ring.
    pub avail: u64,
    /// Device ring.
    pub used: u64,
    notify: u64,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    /// MSI-X vector.
    pub vector: u16,
    doorbells: u64,
    doorbells_skipped: u64,
    event_idx: bool,
    published: u16,
}

impl Virtqueue {
    /// Uses `used_event`/`avail_event` (set when VIRTIO_RING_F_EVENT_IDX was negotiated).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn free_top(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Writes a raw descriptor (for hostile tests).
    pub fn write_desc<B: HvmBus>(
        &self,
        b: &B,
        i: u16,
        gpa: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&gpa.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        b.ram_write(self.desc + 16 * u64::from(i), &d)
            .map_err(bus_err)
    }

    /// Puts a chain on the driver ring (not yet visible: see [`Virtqueue::publish`]).
    /// Returns the head, or None if there are not enough free descriptors.
    pub fn add<B: HvmBus>(&mut self, b: &B, bufs: &[Buf]) -> Result<Option<u16>> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Ok(None);
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (k, buf) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT }
                | if buf.write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if last { 0 } else { ids[k + 1] };
            self.write_desc(b, ids[k], buf.gpa, buf.len, flags, next)?;
        }
        self.push_head(b, ids[0])?;
        Ok(Some(ids[0]))
    }

    /// Writes `head` into the next driver-ring slot (raw; used by hostile tests too).
    pub fn push_head<B: HvmBus>(&mut self, b: &B, head: u16) -> Result<()> {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        b.ram_write(slot, &head.to_le_bytes()).map_err(bus_err)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes added chains visible (driver ring index) and notifies the device, unless the
    /// device said it does not need the doorbell now (VRING_USED_F_NO_NOTIFY in the device
    /// ring's flags, read after the index is published).
    /// With EVENT_IDX, the doorbell rings only if the new index passed the device's
    /// `avail_event`.
    pub fn publish<B: HvmBus>(&mut self, b: &B) -> Result<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        b.ram_write(self.avail + 2, &self.avail_idx.to_le_bytes())
            .map_err(bus_err)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let (old, new) = (self.published, self.avail_idx);
        self.published = new;
        let skip = if self.event_idx {
            let event = ram_u16(b, self.used + 4 + 8 * u64::from(self.size))?;
            // vring_need_event: ring if `event` lies in (old, new].
            new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old)
        } else {
            ram_u16(b, self.used)? & 1 != 0
        };
        if skip {
            self.doorbells_skipped += 1;
            return Ok(());
        }
        self.doorbells += 1;
        b.mmio_write(self.notify, 2, u64::from(self.idx))
            .map_err(bus_err)
    }

    /// Doorbells rung and skipped (the device asked for none) so far.
    pub fn doorbell_counts(&self) -> (u64, u64) {
        (self.doorbells, self.doorbells_skipped)
    }

    /// Takes one used entry (head, bytes written) and frees its descriptors.
    pub fn pop_used<B: HvmBus>(&mut self, b: &B) -> Result<Option<(u16, u32)>> {
        let mut idx = ram_u16(b, self.used + 2)?;
        if idx == self.last_used && self.event_idx {
            // Ask for an interrupt on the next used entry (used_event), then look again in
            // case one arrived before the device could see the request.
            b.ram_write(
                self.avail + 4 + 2 * u64::from(self.size),
                &self.last_used.to_le_bytes(),
            )
            .map_err(bus_err)?;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            idx = ram_u16(b, self.used + 2)?;
        }
        if idx == self.last_used {
            return Ok(None);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = ram_u32(b, e)?;
        let len = ram_u32(b, e + 4)?;
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|h| *h < self.size)
            .ok_or_else(|| GuestOsError::Device(format!("used id {id} out of range")))?;
        // Free the chain.
        let mut i = head;
        for _ in 0..self.size {
            self.free.push(i);
            let flags = ram_u16(b, self.desc + 16 * u64::from(i) + 12)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            i = ram_u16(b, self.desc + 16 * u64::from(i) + 14)?;
        }
        Ok(Some((head, len)))
    }

    /// Takes a used entry without walking the chain (for chains the driver built by hand).
    pub fn pop_used_raw<B: HvmBus>(&mut self, b: &B) -> Result<Option<(u32, u32)>> {
        let idx = ram_u16(b, self.used + 2)?;
        if idx == self.last_used {
            return Ok(None);
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((ram_u32(b, e)?, ram_u32(b, e + 4)?)))
    }
}

/// Waits until an MSI with data `data` arrives (other interrupts are dropped) or `timeout`.
pub fn wait_msi<B: HvmBus>(b: &B, data: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if b.take_irqs()
            .iter()
            .any(|i| matches!(i, Irq::Msi { data: d, .. } if *d == data))
        {
            return true;
        }
        let now = Instant::now();
        if now >= deadline || !b.wait_irq(deadline - now) {
            return b
                .take_irqs()
                .iter()
                .any(|i| matches!(i, Irq::Msi { data: d, .. } if *d == data));
        }
    }
}

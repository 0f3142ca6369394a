//! PCI configuration cycles through the 0xcf8 address port and the 0xcfc data window, as a
//! guest kernel's `pci_conf1` access method does; enumeration of bus 0, BAR sizing (write all
//! ones, read back the mask) and assignment, and the capability list walk.

use super::{bus_err, GuestOsError, Result};
use crate::hvm::HvmBus;

/// A BAR as the guest found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// I/O space.
    pub io: bool,
    /// 64-bit memory BAR (takes the next slot too).
    pub is64: bool,
    /// Prefetchable.
    pub prefetchable: bool,
    /// Size in bytes.
    pub size: u64,
    /// Address assigned (0 until [`assign_bars`]).
    pub addr: u64,
}

/// A capability in the standard list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Capability id.
    pub id: u8,
    /// Offset in config space.
    pub off: u8,
}

/// A function found on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code 0xBBSSPP.
    pub class: u32,
    /// Header type.
    pub header_type: u8,
    /// Subsystem vendor.
    pub subsys_vendor: u16,
    /// Subsystem id.
    pub subsys: u16,
    /// Interrupt pin.
    pub int_pin: u8,
    /// BARs.
    pub bars: [Option<Bar>; 6],
    /// Capabilities, in list order.
    pub caps: Vec<Cap>,
}

/// The config-address value for a register.
pub fn conf1_addr(bus: u8, dev: u8, func: u8, off: u16) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(dev & 0x1f) << 11)
        | (u32::from(func & 7) << 8)
        | (u32::from(off) & 0xfc)
}

/// A config read of 1, 2 or 4 bytes.
pub fn cfg_read<B: HvmBus>(b: &B, bus: u8, dev: u8, func: u8, off: u16, size: u8) -> Result<u32> {
    b.pio_write(0xcf8, 4, conf1_addr(bus, dev, func, off))
        .map_err(bus_err)?;
    b.pio_read(0xcfc + (off & 3), size).map_err(bus_err)
}

/// A config write of 1, 2 or 4 bytes.
pub fn cfg_write<B: HvmBus>(
    b: &B,
    bus: u8,
    dev: u8,
    func: u8,
    off: u16,
    size: u8,
    v: u32,
) -> Result<()> {
    b.pio_write(0xcf8, 4, conf1_addr(bus, dev, func, off))
        .map_err(bus_err)?;
    b.pio_write(0xcfc + (off & 3), size, v).map_err(bus_err)
}

impl PciFunction {
    /// Config read on this function.
    pub fn read<B: HvmBus>(&self, b: &B, off: u16, size: u8) -> Result<u32> {
        cfg_read(b, self.bus, self.dev, self.func, off, size)
    }
    /// Config write on this function.
    pub fn write<B: HvmBus>(&self, b: &B, off: u16, size: u8, v: u32) -> Result<()> {
        cfg_write(b, self.bus, self.dev, self.func, off, size, v)
    }
    /// The first capability with `id`.
    pub fn cap(&self, id: u8) -> Option<u8> {
        self.caps.iter().find(|c| c.id == id).map(|c| c.off)
    }
}

fn probe<B: HvmBus>(b: &B, bus: u8, dev: u8, func: u8) -> Result<Option<PciFunction>> {
    let id = cfg_read(b, bus, dev, func, 0, 4)?;
    if id & 0xffff == 0xffff || id == 0 {
        return Ok(None);
    }
    let class_rev = cfg_read(b, bus, dev, func, 8, 4)?;
    let hdr = cfg_read(b, bus, dev, func, 0x0e, 1)? as u8;
    let sub = cfg_read(b, bus, dev, func, 0x2c, 4)?;
    let mut f = PciFunction {
        bus,
        dev,
        func,
        vendor: id as u16,
        device: (id >> 16) as u16,
        revision: class_rev as u8,
        class: class_rev >> 8,
        header_type: hdr,
        subsys_vendor: sub as u16,
        subsys: (sub >> 16) as u16,
        int_pin: cfg_read(b, bus, dev, func, 0x3d, 1)? as u8,
        bars: [None; 6],
        caps: Vec::new(),
    };
    if hdr & 0x7f == 0 {
        size_bars(b, &mut f)?;
    }
    walk_caps(b, &mut f)?;
    Ok(Some(f))
}

/// Finds every function on bus 0.
pub fn enumerate<B: HvmBus>(b: &B) -> Result<Vec<PciFunction>> {
    let mut out = Vec::new();
    for dev in 0..32u8 {
        let Some(f0) = probe(b, 0, dev, 0)? else {
            continue;
        };
        let multi = f0.header_type & 0x80 != 0;
        out.push(f0);
        if multi {
            for func in 1..8u8 {
                if let Some(f) = probe(b, 0, dev, func)? {
                    out.push(f);
                }
            }
        }
    }
    Ok(out)
}

/// Sizes the BARs: decoding off, all ones written, the mask read back, the value restored.
pub fn size_bars<B: HvmBus>(b: &B, f: &mut PciFunction) -> Result<()> {
    let cmd = f.read(b, 4, 2)?;
    f.write(b, 4, 2, cmd & !3)?;
    let mut i = 0usize;
    while i < 6 {
        let off = 0x10 + 4 * i as u16;
        let orig = f.read(b, off, 4)?;
        f.write(b, off, 4, 0xffff_ffff)?;
        let mask = f.read(b, off, 4)?;
        f.write(b, off, 4, orig)?;
        if mask == 0 {
            i += 1;
            continue;
        }
        let io = mask & 1 == 1;
        let is64 = !io && (mask >> 1) & 3 == 2;
        let size = if io {
            u64::from(!(mask & !3) & 0xffff) + 1
        } else if is64 {
            let hoff = off + 4;
            let horig = f.read(b, hoff, 4)?;
            f.write(b, hoff, 4, 0xffff_ffff)?;
            let hmask = f.read(b, hoff, 4)?;
            f.write(b, hoff, 4, horig)?;
            let m = (u64::from(hmask) << 32) | u64::from(mask & !0xf);
            (!m).wrapping_add(1)
        } else {
            u64::from((!(mask & !0xf)).wrapping_add(1))
        };
        f.bars[i] = Some(Bar {
            io,
            is64,
            prefetchable: !io && mask & 8 != 0,
            size,
            addr: 0,
        });
        i += if is64 { 2 } else { 1 };
    }
    f.write(b, 4, 2, cmd)?;
    Ok(())
}

/// Walks the capability list (bounded: at most 48 entries, each inside the header).
pub fn walk_caps<B: HvmBus>(b: &B, f: &mut PciFunction) -> Result<()> {
    f.caps.clear();
    let status = f.read(b, 6, 2)?;
    if status & 0x10 == 0 {
        return Ok(());
    }
    let mut off = f.read(b, 0x34, 1)? as u8 & 0xfc;
    while off >= 0x40 && f.caps.len() < 48 {
        let id = f.read(b, u16::from(off), 1)? as u8;
        f.caps.push(Cap { id, off });
        off = f.read(b, u16::from(off) + 1, 1)? as u8 & 0xfc;
    }
    Ok(())
}

/// Where BARs go: I/O from `io`, memory from `mem` (growing up), as firmware would.
#[derive(Debug, Clone, Copy)]
pub struct BarWindow {
    /// Next I/O port.
    pub io: u64,
    /// End of the I/O window.
    pub io_end: u64,
    /// Next memory address.
    pub mem: u64,
    /// End of the memory window.
    pub mem_end: u64,
}

impl Default for BarWindow {
    fn default() -> Self {
        BarWindow {
            io: 0xc000,
            io_end: 0x1_0000,
            mem: 0xf000_0000,
            mem_end: 0xfc00_0000,
        }
    }
}

/// Assigns every sized BAR (naturally aligned) and turns on I/O, memory decoding and bus
/// mastering.
pub fn assign_bars<B: HvmBus>(b: &B, fns: &mut [PciFunction], w: &mut BarWindow) -> Result<()> {
    for f in fns.iter_mut() {
        let mut any = false;
        for i in 0..6 {
            let Some(mut bar) = f.bars[i] else { continue };
            let (next, end) = if bar.io {
                (&mut w.io, w.io_end)
            } else {
                (&mut w.mem, w.mem_end)
            };
            let addr = (*next + bar.size - 1) & !(bar.size - 1);
            if addr + bar.size > end {
                return Err(GuestOsError::Device(format!(
                    "no room for BAR{i} of {:02x}:{:02x}.{} ({} bytes)",
                    f.bus, f.dev, f.func, bar.size
                )));
            }
            *next = addr + bar.size;
            let off = 0x10 + 4 * i as u16;
            f.write(b, off, 4, addr as u32)?;
            if bar.is64 {
                f.write(b, off + 4, 4, (addr >> 32) as u32)?;
            }
            bar.addr = addr;
            f.bars[i] = Some(bar);
            any = true;
        }
        if any {
            let cmd = f.read(b, 4, 2)?;
            f.write(b, 4, 2, cmd | 0x7)?;
        }
    }
    Ok(())
}

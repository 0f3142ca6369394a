//! A conventional PCI bus: type-0 configuration headers with per-byte write masks, BAR
//! sizing and relocation through the ioreq server's [`RangeRegistry`], a capability list,
//! and MSI-X state.
//!
//! Every configuration access is checked before it touches a header (XSA-126/131/120): the
//! size is 1, 2 or 4, the access is naturally aligned (so it never straddles two registers),
//! and it ends inside the 256-byte conventional space. Extended space (256..4096) reads as
//! zero, so a capability walk of the extended list ends at once; writes there are dropped.
//! A BAR is routed only when decoding is on and its range is sane (XSA-238: an all-ones
//! probe value, a wrap past the top of the space, or an overlap never becomes a range).

use std::sync::Arc;

use ioreq::{RangeRegistry, Sbdf};
use xen::IoRange;

use crate::RateLog;

/// Size of the conventional configuration space.
pub const CFG_SIZE: usize = 256;
/// Size of the extended configuration space an access may address.
pub const CFG_EXT_SIZE: u64 = 4096;

/// PCI_COMMAND bits.
pub const CMD_IO: u16 = 1 << 0;
/// PCI_COMMAND_MEMORY.
pub const CMD_MEM: u16 = 1 << 1;
/// PCI_COMMAND_MASTER.
pub const CMD_MASTER: u16 = 1 << 2;
/// PCI_COMMAND_INTX_DISABLE.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// PCI_STATUS_CAP_LIST.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// PCI_STATUS_INTERRUPT.
pub const STATUS_INTERRUPT: u16 = 1 << 3;

/// Capability ids.
pub const CAP_ID_MSI: u8 = 0x05;
/// Vendor-specific capability (virtio uses it).
pub const CAP_ID_VNDR: u8 = 0x09;
/// MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space (16-bit port addresses on x86).
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (takes this BAR and the next).
    Mem64,
}

/// A BAR a device implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarDef {
    /// Kind.
    pub kind: BarKind,
    /// Size in bytes, a power of two (at least 4 for I/O, 16 for memory).
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A type-0 configuration header with its write masks.
#[derive(Clone)]
pub struct PciConfig {
    data: [u8; CFG_SIZE],
    wmask: [u8; CFG_SIZE],
    w1c: [u8; CFG_SIZE],
    bars: [Option<BarDef>; 6],
    cap_end: usize,
    last_cap: Option<usize>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:04x}", self.read(0, 2)))
            .field("device", &format_args!("{:04x}", self.read(2, 2)))
            .field("bars", &self.bars)
            .finish()
    }
}

/// Identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciId {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code (base, sub, prog-if) as 0xBBSSPP.
    pub class: u32,
    /// Subsystem vendor id.
    pub subsys_vendor: u16,
    /// Subsystem id.
    pub subsys: u16,
    /// Header type byte (bit 7 = multi-function).
    pub header_type: u8,
    /// Interrupt pin (0 none, 1 INTA..4 INTD).
    pub int_pin: u8,
}

impl PciConfig {
    /// A header for `id` with the standard writable registers.
    pub fn new(id: PciId) -> PciConfig {
        let mut c = PciConfig {
            data: [0; CFG_SIZE],
            wmask: [0; CFG_SIZE],
            w1c: [0; CFG_SIZE],
            bars: [None; 6],
            cap_end: 0x40,
            last_cap: None,
        };
        c.set16(0x00, id.vendor);
        c.set16(0x02, id.device);
        c.data[0x08] = id.revision;
        c.data[0x09] = id.class as u8;
        c.data[0x0a] = (id.class >> 8) as u8;
        c.data[0x0b] = (id.class >> 16) as u8;
        c.data[0x0e] = id.header_type;
        c.set16(0x2c, id.subsys_vendor);
        c.set16(0x2e, id.subsys);
        c.data[0x3d] = id.int_pin;
        // Command: I/O, memory, bus master, parity, SERR, INTx disable.
        c.set_wmask16(
            0x04,
            CMD_IO | CMD_MEM | CMD_MASTER | (1 << 6) | (1 << 8) | CMD_INTX_DISABLE,
        );
        // Status: the error bits are write-one-to-clear; nothing here ever sets them.
        c.w1c[0x07] = 0xf9;
        // Cache line size, latency timer, interrupt line.
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        c.wmask[0x3c] = 0xff;
        c
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask16(&mut self, off: usize, v: u16) {
        self.wmask[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Declares BAR `idx` (0..6; a 64-bit BAR also takes `idx + 1`). Returns false if the
    /// definition is impossible (bad index, size not a power of two or too small).
    pub fn set_bar(&mut self, idx: usize, def: BarDef) -> bool {
        let min = if def.kind == BarKind::Io { 4 } else { 16 };
        let slots = if def.kind == BarKind::Mem64 { 2 } else { 1 };
        if idx + slots > 6 || !def.size.is_power_of_two() || def.size < min {
            return false;
        }
        if def.kind != BarKind::Mem64 && def.size > u64::from(u32::MAX) {
            return false;
        }
        let off = 0x10 + 4 * idx;
        let mask = !(def.size - 1);
        let low_flags: u32 = match def.kind {
            BarKind::Io => 1,
            BarKind::Mem32 => u32::from(def.prefetchable) << 3,
            BarKind::Mem64 => 0x4 | (u32::from(def.prefetchable) << 3),
        };
        let low_wmask = (mask as u32) & if def.kind == BarKind::Io { !0x3 } else { !0xf };
        self.data[off..off + 4].copy_from_slice(&low_flags.to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&low_wmask.to_le_bytes());
        if def.kind == BarKind::Mem64 {
            let hi = ((mask >> 32) as u32).to_le_bytes();
            self.wmask[off + 4..off + 8].copy_from_slice(&hi);
        }
        self.bars[idx] = Some(def);
        true
    }

    /// The BAR definitions.
    pub fn bars(&self) -> &[Option<BarDef>; 6] {
        &self.bars
    }

    /// Adds a capability with `body` (the bytes after the id and next pointer) and the write
    /// mask of the body. Returns the capability's offset, or None if there is no room.
    pub fn add_capability(&mut self, id: u8, body: &[u8], body_wmask: &[u8]) -> Option<usize> {
        let off = self.cap_end;
        let len = 2 + body.len();
        if off + len > CFG_SIZE || body_wmask.len() != body.len() {
            return None;
        }
        self.data[off] = id;
        self.data[off + 1] = 0;
        self.data[off + 2..off + len].copy_from_slice(body);
        self.wmask[off + 2..off + len].copy_from_slice(body_wmask);
        match self.last_cap {
            Some(prev) => self.data[prev + 1] = off as u8,
            None => {
                self.data[0x34] = off as u8;
                let st = u16::from_le_bytes([self.data[6], self.data[7]]) | STATUS_CAP_LIST;
                self.set16(0x06, st);
            }
        }
        self.last_cap = Some(off);
        self.cap_end = (off + len + 3) & !3;
        Some(off)
    }

    /// Reads `size` (1, 2, 4) bytes at `off`; the caller has validated the access.
    pub fn read(&self, off: usize, size: usize) -> u32 {
        let mut v = 0u32;
        for i in (0..size).rev() {
            v = (v << 8) | u32::from(self.data.get(off + i).copied().unwrap_or(0));
        }
        v
    }

    /// Writes through the masks.
    pub fn write(&mut self, off: usize, size: usize, value: u32) {
        for i in 0..size {
            let b = (value >> (8 * i)) as u8;
            let Some(old) = self.data.get(off + i).copied() else {
                return;
            };
            let wm = self.wmask[off + i];
            let w1c = self.w1c[off + i];
            self.data[off + i] = ((old & !wm) | (b & wm)) & !(b & w1c);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read(0x04, 2) as u16
    }

    /// Sets or clears PCI_STATUS_INTERRUPT (read-only to the guest).
    pub fn set_interrupt_status(&mut self, on: bool) {
        let st = self.read(0x06, 2) as u16;
        let st = if on {
            st | STATUS_INTERRUPT
        } else {
            st & !STATUS_INTERRUPT
        };
        self.set16(0x06, st);
    }

    /// Where BAR `idx` currently points (the value the guest programmed), if it is defined.
    pub fn bar_address(&self, idx: usize) -> Option<u64> {
        let def = self.bars.get(idx).copied().flatten()?;
        let off = 0x10 + 4 * idx;
        let low = u64::from(self.read(off, 4));
        Some(match def.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 => low & !0xf,
            BarKind::Mem64 => (low & !0xf) | (u64::from(self.read(off + 4, 4)) << 32),
        })
    }

    /// Sets a byte directly (device-private state such as MSI-X control bits).
    pub fn raw_mut(&mut self) -> &mut [u8; CFG_SIZE] {
        &mut self.data
    }
}

/// A function on the bus.
pub trait PciDevice: Send {
    /// A short name for logs ("virtio-blk xvda").
    fn name(&self) -> String;
    /// The header.
    fn config(&self) -> &PciConfig;
    /// The header, mutable.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Called after a guest write to the header (after the masks were applied).
    fn config_written(&mut self, _off: usize, _size: usize) {}
    /// A read of BAR `bar` at `off` (inside the BAR).
    fn bar_read(&mut self, bar: usize, off: u64, size: u8) -> u64;
    /// A write of BAR `bar` at `off`.
    fn bar_write(&mut self, bar: usize, off: u64, size: u8, value: u64);
    /// A one-line description for the log and the control socket.
    fn describe(&self) -> String {
        self.name()
    }
    /// The concrete device, for the machine's own queries.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// The concrete device, mutable.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// A BAR range routed to this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapped {
    io: bool,
    start: u64,
    end: u64,
}

impl Mapped {
    fn range(self) -> IoRange {
        if self.io {
            IoRange::Port {
                start: self.start,
                end: self.end,
            }
        } else {
            IoRange::Mmio {
                start: self.start,
                end: self.end,
            }
        }
    }
    fn overlaps(self, o: Mapped) -> bool {
        self.io == o.io && self.start <= o.end && o.start <= self.end
    }
}

struct Slot {
    sbdf: Sbdf,
    dev: Box<dyn PciDevice>,
    mapped: [Option<Mapped>; 6],
}

/// Errors building the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// Two functions at one address.
    #[error("dom{domid}: PCI function {sbdf:?} is taken ({name})")]
    Taken {
        /// Domain.
        domid: xen::DomId,
        /// Address.
        sbdf: Sbdf,
        /// The new device.
        name: String,
    },
    /// Registering the function's config space failed.
    #[error("dom{domid}: registering PCI function {sbdf:?} ({name}): {source}")]
    Register {
        /// Domain.
        domid: xen::DomId,
        /// Address.
        sbdf: Sbdf,
        /// Device.
        name: String,
        /// Cause.
        #[source]
        source: ioreq::RangeError,
    },
}

/// The bus: functions by SBDF and the BAR ranges they decode.
pub struct PciBus {
    domid: xen::DomId,
    slots: Vec<Slot>,
    registry: Arc<dyn RangeRegistry>,
    reserved: Vec<Mapped>,
    log: RateLog,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("domid", &self.domid)
            .field("functions", &self.slots.len())
            .finish()
    }
}

/// Why a BAR value is not routed.
fn bar_range_check(def: BarDef, base: u64) -> Result<Mapped, &'static str> {
    if base == 0 {
        return Err("base 0 (unassigned)");
    }
    let end = base
        .checked_add(def.size - 1)
        .ok_or("range wraps past the top of the address space")?;
    match def.kind {
        BarKind::Io if end > 0xffff => Err("I/O range past port 0xffff"),
        BarKind::Mem32 if end >= u64::from(u32::MAX) => {
            Err("32-bit BAR reaches 0xffffffff (all-ones probe value)")
        }
        BarKind::Mem64 if end == u64::MAX => Err("64-bit BAR reaches all ones"),
        _ => Ok(Mapped {
            io: def.kind == BarKind::Io,
            start: base,
            end,
        }),
    }
}

impl PciBus {
    /// An empty bus for domain `domid`.
    pub fn new(domid: xen::DomId, registry: Arc<dyn RangeRegistry>) -> PciBus {
        PciBus {
            domid,
            slots: Vec::new(),
            registry,
            reserved: Vec::new(),
            log: RateLog::new(),
        }
    }

    /// Ports a BAR may never cover (the machine's fixed devices and 0xcf8..0xcff).
    pub fn reserve_ports(&mut self, start: u64, end: u64) {
        self.reserved.push(Mapped {
            io: true,
            start,
            end,
        });
    }

    /// Adds a function and routes its config space to this server.
    pub fn add(&mut self, sbdf: Sbdf, dev: Box<dyn PciDevice>) -> Result<(), PciError> {
        if self.slots.iter().any(|s| s.sbdf == sbdf) {
            return Err(PciError::Taken {
                domid: self.domid,
                sbdf,
                name: dev.name(),
            });
        }
        let range = IoRange::Pci {
            seg: sbdf.seg,
            bus: sbdf.bus,
            dev: sbdf.dev,
            func: sbdf.func,
        };
        self.registry
            .map(range)
            .map_err(|source| PciError::Register {
                domid: self.domid,
                sbdf,
                name: dev.name(),
                source,
            })?;
        tracing::info!(
            domid = self.domid,
            "PCI {:02x}:{:02x}.{} {}",
            sbdf.bus,
            sbdf.dev,
            sbdf.func,
            dev.describe()
        );
        self.slots.push(Slot {
            sbdf,
            dev,
            mapped: [None; 6],
        });
        Ok(())
    }

    /// One line per function.
    pub fn describe(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| {
                format!(
                    "{:02x}:{:02x}.{} {}",
                    s.sbdf.bus,
                    s.sbdf.dev,
                    s.sbdf.func,
                    s.dev.describe()
                )
            })
            .collect()
    }

    fn slot(&mut self, sbdf: Sbdf) -> Option<usize> {
        self.slots.iter().position(|s| s.sbdf == sbdf)
    }

    /// Checks a config access: size 1/2/4, aligned, inside 4096 bytes.
    fn access_ok(&mut self, sbdf: Sbdf, off: u64, size: u8) -> bool {
        let ok = matches!(size, 1 | 2 | 4)
            && off.is_multiple_of(u64::from(size))
            && off + u64::from(size) <= CFG_EXT_SIZE;
        if !ok {
            self.log.warn(format_args!(
                "dom{}: PCI {:?} config access of {size} bytes at {off:#x} refused (straddles a register or leaves config space)",
                self.domid, sbdf
            ));
        }
        ok
    }

    /// A config read; None if no function is there. A refused access reads all ones.
    pub fn config_read(&mut self, sbdf: Sbdf, off: u64, size: u8) -> Option<u64> {
        let idx = self.slot(sbdf)?;
        if !self.access_ok(sbdf, off, size) {
            return Some(ones(size));
        }
        if off >= CFG_SIZE as u64 {
            return Some(0);
        }
        let v = self.slots[idx]
            .dev
            .config()
            .read(off as usize, usize::from(size));
        Some(u64::from(v))
    }

    /// A config write; false if no function is there.
    pub fn config_write(&mut self, sbdf: Sbdf, off: u64, size: u8, value: u64) -> bool {
        let Some(idx) = self.slot(sbdf) else {
            return false;
        };
        if !self.access_ok(sbdf, off, size) || off >= CFG_SIZE as u64 {
            return true;
        }
        let (o, s) = (off as usize, usize::from(size));
        let slot = &mut self.slots[idx];
        slot.dev.config_mut().write(o, s, value as u32);
        slot.dev.config_written(o, s);
        // Command register or a BAR: re-evaluate the routed ranges.
        if o < 0x06 && o + s > 0x04 || (0x10..0x28).contains(&o) {
            self.update_bars(idx);
        }
        true
    }

    fn update_bars(&mut self, idx: usize) {
        for bar in 0..6 {
            let (want, def) = {
                let slot = &self.slots[idx];
                let cfg = slot.dev.config();
                let Some(def) = cfg.bars()[bar] else { continue };
                let cmd = cfg.command();
                let enabled = if def.kind == BarKind::Io {
                    cmd & CMD_IO != 0
                } else {
                    cmd & CMD_MEM != 0
                };
                let base = cfg.bar_address(bar).unwrap_or(0);
                let want = if enabled {
                    match bar_range_check(def, base) {
                        Ok(m) => Some(m),
                        Err(why) => {
                            self.log.warn(format_args!(
                                "dom{}: {} BAR{bar} = {base:#x} not routed: {why}",
                                self.domid,
                                slot.dev.name()
                            ));
                            None
                        }
                    }
                } else {
                    None
                };
                (want, def)
            };
            let _ = def;
            let want = want.filter(|m| {
                let clash = self.reserved.iter().any(|r| r.overlaps(*m))
                    || self.slots.iter().enumerate().any(|(j, s)| {
                        s.mapped
                            .iter()
                            .enumerate()
                            .any(|(b, o)| (j, b) != (idx, bar) && o.is_some_and(|o| o.overlaps(*m)))
                    });
                if clash {
                    self.log.warn(format_args!(
                        "dom{}: {} BAR{bar} {:#x}..={:#x} overlaps another range; not routed",
                        self.domid,
                        self.slots[idx].dev.name(),
                        m.start,
                        m.end
                    ));
                }
                !clash
            });
            let cur = self.slots[idx].mapped[bar];
            if cur == want {
                continue;
            }
            if let Some(old) = cur {
                if let Err(e) = self.registry.unmap(old.range()) {
                    self.log
                        .warn(format_args!("dom{}: unmapping {:?}: {e}", self.domid, old));
                }
                self.slots[idx].mapped[bar] = None;
            }
            if let Some(new) = want {
                match self.registry.map(new.range()) {
                    Ok(()) => {
                        self.log.debug(format_args!(
                            "dom{}: {} BAR{bar} -> {:#x}..={:#x}",
                            self.domid,
                            self.slots[idx].dev.name(),
                            new.start,
                            new.end
                        ));
                        self.slots[idx].mapped[bar] = Some(new);
                    }
                    Err(e) => self
                        .log
                        .warn(format_args!("dom{}: mapping {:?}: {e}", self.domid, new)),
                }
            }
        }
    }

    fn find(&self, io: bool, addr: u64, size: u8) -> Option<(usize, usize, u64)> {
        let last = addr.checked_add(u64::from(size) - 1)?;
        for (i, s) in self.slots.iter().enumerate() {
            for (b, m) in s.mapped.iter().enumerate() {
                if let Some(m) = m {
                    if m.io == io && addr >= m.start && last <= m.end {
                        return Some((i, b, addr - m.start));
                    }
                }
            }
        }
        None
    }

    /// A port or MMIO read that a BAR decodes.
    pub fn bar_read(&mut self, io: bool, addr: u64, size: u8) -> Option<u64> {
        let (i, b, off) = self.find(io, addr, size)?;
        Some(self.slots[i].dev.bar_read(b, off, size))
    }

    /// A port or MMIO write that a BAR decodes.
    pub fn bar_write(&mut self, io: bool, addr: u64, size: u8, value: u64) -> bool {
        let Some((i, b, off)) = self.find(io, addr, size) else {
            return false;
        };
        self.slots[i].dev.bar_write(b, off, size, value);
        true
    }

    /// Every function (for invalidation and shutdown).
    pub fn devices_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn PciDevice>> {
        self.slots.iter_mut().map(|s| &mut s.dev)
    }

    /// The ranges currently routed, for tests and the control socket.
    pub fn routed(&self) -> Vec<IoRange> {
        self.slots
            .iter()
            .flat_map(|s| s.mapped.iter().flatten().map(|m| m.range()))
            .collect()
    }
}

/// All ones of `size` bytes.
pub fn ones(size: u8) -> u64 {
    match size {
        8 => u64::MAX,
        s => (1u64 << (8 * u32::from(s))) - 1,
    }
}

/// The i440FX host bridge (8086:1237) at 00:00.0: a header and nothing behind it.
#[derive(Debug)]
pub struct HostBridge {
    cfg: PciConfig,
}

impl HostBridge {
    /// A new one.
    pub fn new() -> HostBridge {
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x8086,
            device: 0x1237,
            revision: 2,
            class: 0x06_00_00,
            subsys_vendor: 0x5853,
            subsys: 0x0001,
            header_type: 0,
            int_pin: 0,
        });
        // The i440FX PAM and SMRAM registers (0x59..0x5f, 0x72) are writable bytes that
        // firmware programs; with no shadow RAM to manage they are only stored.
        for off in 0x59..=0x5f {
            cfg.wmask[off] = 0xff;
        }
        cfg.wmask[0x72] = 0xff;
        HostBridge { cfg }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> String {
        "i440FX host bridge".into()
    }
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn bar_read(&mut self, _bar: usize, _off: u64, size: u8) -> u64 {
        ones(size)
    }
    fn bar_write(&mut self, _bar: usize, _off: u64, _size: u8, _value: u64) {}
}

/// The PIIX3 PCI-to-ISA bridge (8086:7000) at 00:01.0 with its PIRQ route registers
/// (0x60..0x63), which hvmloader and SeaBIOS program.
#[derive(Debug)]
pub struct IsaBridge {
    cfg: PciConfig,
    domid: xen::DomId,
    log: RateLog,
}

/// PIRQ route register offset.
pub const PIIX_PIRQC: usize = 0x60;

impl IsaBridge {
    /// A new one; PIRQA..D start disabled (bit 7 set), as after reset.
    pub fn new(domid: xen::DomId) -> IsaBridge {
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x8086,
            device: 0x7000,
            revision: 0,
            class: 0x06_01_00,
            subsys_vendor: 0x5853,
            subsys: 0x0001,
            header_type: 0x80,
            int_pin: 0,
        });
        for i in 0..4 {
            cfg.data[PIIX_PIRQC + i] = 0x80;
            cfg.wmask[PIIX_PIRQC + i] = 0x8f;
        }
        IsaBridge {
            cfg,
            domid,
            log: RateLog::new(),
        }
    }

    /// The ISA IRQ PIRQ `link` (0..4) routes to, if enabled.
    pub fn pirq_route(&self, link: usize) -> Option<u8> {
        let v = *self.cfg.data.get(PIIX_PIRQC + link)?;
        (v & 0x80 == 0).then_some(v & 0x0f)
    }
}

impl PciDevice for IsaBridge {
    fn name(&self) -> String {
        "PIIX3 ISA bridge".into()
    }
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn config_written(&mut self, off: usize, size: usize) {
        for reg in off..off + size {
            if (PIIX_PIRQC..PIIX_PIRQC + 4).contains(&reg) {
                let link = reg - PIIX_PIRQC;
                // Real Xen needs XEN_DMOP_set_pci_link_route here; the xen crate's
                // DeviceModel does not expose it yet, so the route is recorded only.
                self.log.debug(format_args!(
                    "dom{}: PIRQ{} -> {:?}",
                    self.domid,
                    (b'A' + link as u8) as char,
                    self.pirq_route(link)
                ));
            }
        }
    }
    fn bar_read(&mut self, _bar: usize, _off: u64, size: u8) -> u64 {
        ones(size)
    }
    fn bar_write(&mut self, _bar: usize, _off: u64, _size: u8, _value: u64) {}
}

/// The MSI capability (one vector, 64-bit address): adds it to `cfg`, returning its offset.
pub fn add_msi_capability(cfg: &mut PciConfig) -> Option<usize> {
    // Message control: bit 0 enable and bits 4..6 (multiple message enable) writable;
    // 64-bit capable (bit 7); one message (multiple message capable 0).
    let body = [0x80u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let wmask = [
        0x71u8, 0, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    cfg.add_capability(CAP_ID_MSI, &body, &wmask)
}

/// The message an enabled MSI capability at `cap` sends, if it is enabled.
pub fn msi_message(cfg: &PciConfig, cap: usize) -> Option<MsiMessage> {
    let ctrl = cfg.read(cap + 2, 2);
    if ctrl & 1 == 0 {
        return None;
    }
    let addr = u64::from(cfg.read(cap + 4, 4)) | (u64::from(cfg.read(cap + 8, 4)) << 32);
    Some(MsiMessage {
        addr,
        data: cfg.read(cap + 12, 2),
    })
}

/// MSI-X state of one function: the table and pending bits live in a BAR.
#[derive(Debug, Clone)]
pub struct Msix {
    /// Table entries: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// Pending bits.
    pub pending: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub masked: bool,
}

/// What to do after an MSI-X state change or a vector raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address.
    pub addr: u64,
    /// Data.
    pub data: u32,
}

impl Msix {
    /// `n` vectors, all masked.
    pub fn new(n: usize) -> Msix {
        Msix {
            table: vec![[0, 0, 0, 1]; n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            masked: false,
        }
    }

    /// Table bytes.
    pub fn table_len(&self) -> u64 {
        16 * self.table.len() as u64
    }

    /// Raises vector `v`: the message to send now, or None (pending, or no such vector).
    pub fn raise(&mut self, v: u16) -> Option<MsiMessage> {
        let e = self.table.get(usize::from(v))?;
        if self.masked || e[3] & 1 != 0 {
            if let Some(p) = self.pending.get_mut(usize::from(v) / 64) {
                *p |= 1 << (v % 64);
            }
            return None;
        }
        Some(MsiMessage {
            addr: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        })
    }

    /// Messages for pending vectors that are now unmasked (clears their pending bits).
    pub fn unmasked_pending(&mut self, out: &mut Vec<MsiMessage>) {
        if self.masked || !self.enabled {
            return;
        }
        for v in 0..self.table.len() {
            let (w, bit) = (v / 64, 1u64 << (v % 64));
            let pend = self.pending.get(w).is_some_and(|p| p & bit != 0);
            if pend && self.table[v][3] & 1 == 0 {
                if let Some(p) = self.pending.get_mut(w) {
                    *p &= !bit;
                }
                let e = self.table[v];
                out.push(MsiMessage {
                    addr: u64::from(e[0]) | (u64::from(e[1]) << 32),
                    data: e[2],
                });
            }
        }
    }

    /// A read of the table at `off` (4 or 8 bytes, aligned; else all ones).
    pub fn table_read(&self, off: u64, size: u8) -> u64 {
        let Some(e) = self.table.get((off / 16) as usize) else {
            return ones(size);
        };
        let w = ((off % 16) / 4) as usize;
        match (size, off % 4) {
            (4, 0) => u64::from(e[w]),
            (8, 0) if w.is_multiple_of(2) => u64::from(e[w]) | (u64::from(e[w + 1]) << 32),
            _ => ones(size),
        }
    }

    /// A write of the table. Returns true if an entry's mask changed (check pending).
    pub fn table_write(&mut self, off: u64, size: u8, value: u64) -> bool {
        let Some(e) = self.table.get_mut((off / 16) as usize) else {
            return false;
        };
        let w = ((off % 16) / 4) as usize;
        let before = e[3];
        match (size, off % 4) {
            (4, 0) => e[w] = value as u32,
            (8, 0) if w.is_multiple_of(2) => {
                e[w] = value as u32;
                e[w + 1] = (value >> 32) as u32;
            }
            _ => return false,
        }
        e[3] &= 1;
        if w == 3 || (w == 2 && size == 8) {
            e[3] = (if w == 3 {
                value as u32
            } else {
                (value >> 32) as u32
            }) & 1;
        }
        before != e[3]
    }

    /// A read of the pending-bit array.
    pub fn pba_read(&self, off: u64, size: u8) -> u64 {
        let Some(p) = self.pending.get((off / 8) as usize) else {
            return ones(size);
        };
        match (size, off % 8) {
            (8, 0) => *p,
            (4, 0) => *p & 0xffff_ffff,
            (4, 4) => *p >> 32,
            _ => ones(size),
        }
    }

    /// Adds the MSI-X capability for this state to `cfg`: table at `table_off` and PBA at
    /// `pba_off`, both in BAR `bir`.
    pub fn add_capability(
        &self,
        cfg: &mut PciConfig,
        bir: u8,
        table_off: u32,
        pba_off: u32,
    ) -> Option<usize> {
        let ctrl = (self.table.len().saturating_sub(1) as u16) & 0x7ff;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        body[2..6].copy_from_slice(&(table_off | u32::from(bir)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_off | u32::from(bir)).to_le_bytes());
        let mut wm = [0u8; 10];
        wm[1] = 0xc0; // enable (bit 15) and function mask (bit 14)
        cfg.add_capability(CAP_ID_MSIX, &body, &wm)
    }

    /// Reads the enable and mask bits from the capability at `cap` after a config write.
    pub fn sync_from_config(&mut self, cfg: &PciConfig, cap: usize) {
        let ctrl = cfg.read(cap + 2, 2) as u16;
        self.enabled = ctrl & 0x8000 != 0;
        self.masked = ctrl & 0x4000 != 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_probe_returns_size_mask() {
        let mut c = HostBridge::new().cfg;
        assert!(c.set_bar(
            0,
            BarDef {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false
            }
        ));
        c.write(0x10, 4, 0xffff_ffff);
        assert_eq!(c.read(0x10, 4), 0xffff_f000);
        assert!(c.set_bar(
            1,
            BarDef {
                kind: BarKind::Io,
                size: 0x100,
                prefetchable: false
            }
        ));
        c.write(0x14, 4, 0xffff_ffff);
        assert_eq!(c.read(0x14, 4), 0xffff_ff01);
        assert!(bar_range_check(
            BarDef {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false
            },
            0xffff_f000
        )
        .is_err());
    }

    #[test]
    fn msix_masked_vector_pends_then_fires() {
        let mut m = Msix::new(2);
        m.enabled = true;
        m.table_write(0, 4, 0xfee0_0000);
        m.table_write(8, 4, 0x41);
        assert_eq!(m.raise(0), None);
        assert!(m.table_write(12, 4, 0));
        let mut out = Vec::new();
        m.unmasked_pending(&mut out);
        assert_eq!(
            out,
            vec![MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41
            }]
        );
    }
}

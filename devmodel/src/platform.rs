//! The Xen platform PCI device (5853:0001, class 0xff80): what PV drivers in an HVM guest
//! look for. BAR0 is 256 bytes of I/O, BAR1 16 MiB of prefetchable MMIO that the guest uses as
//! room for grant-table and shared-info frames (it is never backed by this device).
//!
//! The fixed ports 0x10..0x13 carry the emulated-device unplug protocol
//! (docs/misc/hvm-emulated-unplug.pandoc): magic 0x49d2 read at 0x10, protocol version read
//! at 0x12, product number written to 0x12 (16 bits), build number written to 0x10 (32 bits),
//! the magic read again (0xd249 if the product is blacklisted), then the unplug mask written
//! to 0x10 (16 bits). Byte writes to 0x12 are the driver's log port.

use crate::pci::{ones, BarDef, BarKind, PciConfig, PciDevice, PciId};
use crate::RateLog;

/// First fixed port.
pub const PORT_BASE: u16 = 0x10;
/// Last fixed port.
pub const PORT_LAST: u16 = 0x13;
/// The magic number.
pub const MAGIC: u16 = 0x49d2;
/// The magic number when the drivers are blacklisted.
pub const MAGIC_BLACKLISTED: u16 = 0xd249;
/// Protocol version we speak.
pub const PROTOCOL_VERSION: u8 = 1;
/// Unplug bits.
pub const UNPLUG_ALL_DISKS: u16 = 1;
/// All emulated NICs.
pub const UNPLUG_ALL_NICS: u16 = 2;
/// Auxiliary IDE disks.
pub const UNPLUG_AUX_IDE_DISKS: u16 = 4;
/// NVMe disks.
pub const UNPLUG_NVME_DISKS: u16 = 8;

const LOG_LINE_MAX: usize = 256;

/// What the guest's PV drivers told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnplugState {
    /// Product number written to 0x12.
    pub product: Option<u16>,
    /// Build number written to 0x10.
    pub build: Option<u32>,
    /// The product is blacklisted (the magic now reads 0xd249).
    pub blacklisted: bool,
    /// Union of unplug masks written.
    pub unplugged: u16,
    /// Platform flags byte (bit 0 = ROM lock, in QEMU's usage).
    pub flags: u8,
    /// Log lines received.
    pub log_lines: u64,
}

/// The platform device.
pub struct Platform {
    cfg: PciConfig,
    domid: xen::DomId,
    blacklist: Vec<u16>,
    state: UnplugState,
    line: Vec<u8>,
    log: RateLog,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("state", &self.state)
            .finish()
    }
}

impl Platform {
    /// The device; drivers whose product number is in `blacklist` are told not to load.
    pub fn new(domid: xen::DomId, blacklist: Vec<u16>) -> Platform {
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x5853,
            device: 0x0001,
            revision: 1,
            class: 0xff_80_00,
            subsys_vendor: 0x5853,
            subsys: 0x0001,
            header_type: 0,
            int_pin: 1,
        });
        cfg.set_bar(
            0,
            BarDef {
                kind: BarKind::Io,
                size: 0x100,
                prefetchable: false,
            },
        );
        cfg.set_bar(
            1,
            BarDef {
                kind: BarKind::Mem32,
                size: 16 << 20,
                prefetchable: true,
            },
        );
        Platform {
            cfg,
            domid,
            blacklist,
            state: UnplugState::default(),
            line: Vec::with_capacity(LOG_LINE_MAX),
            log: RateLog::new(),
        }
    }

    /// The protocol state.
    pub fn state(&self) -> &UnplugState {
        &self.state
    }

    fn log_byte(&mut self, b: u8) {
        if b == b'\n' || self.line.len() >= LOG_LINE_MAX {
            let s = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            self.state.log_lines += 1;
            self.log.warn(format_args!(
                "dom{} PV driver: {}",
                self.domid,
                s.escape_debug()
            ));
            if b == b'\n' {
                return;
            }
        }
        self.line.push(b);
    }

    fn unplug(&mut self, mask: u16) {
        self.state.unplugged |= mask;
        // This machine has no emulated IDE, SCSI, NVMe disks or NICs: every disk and NIC is
        // already a PV or virtio device, so there is nothing to take off the bus.
        self.log.info(format_args!(
            "dom{}: unplug request {mask:#x} (disks={} nics={} aux-ide={} nvme={}); no emulated devices to remove",
            self.domid,
            mask & UNPLUG_ALL_DISKS != 0,
            mask & UNPLUG_ALL_NICS != 0,
            mask & UNPLUG_AUX_IDE_DISKS != 0,
            mask & UNPLUG_NVME_DISKS != 0
        ));
    }

    /// A read of the fixed ports (`port` in 0x10..=0x13).
    pub fn port_read(&mut self, port: u16, size: u8) -> u64 {
        match (port - PORT_BASE, size) {
            (0, 2) => u64::from(if self.state.blacklisted {
                MAGIC_BLACKLISTED
            } else {
                MAGIC
            }),
            (0, 1) => u64::from(self.state.flags),
            (2, 1) => u64::from(PROTOCOL_VERSION),
            _ => ones(size),
        }
    }

    /// A write of the fixed ports.
    pub fn port_write(&mut self, port: u16, size: u8, value: u64) {
        match (port - PORT_BASE, size) {
            (0, 2) => self.unplug(value as u16),
            (0, 4) => {
                self.state.build = Some(value as u32);
                self.log.info(format_args!(
                    "dom{}: PV driver build {:#x}",
                    self.domid, value as u32
                ));
            }
            (0, 1) => self.state.flags = value as u8 & 1,
            (2, 2) => {
                let p = value as u16;
                self.state.product = Some(p);
                self.state.blacklisted = self.blacklist.contains(&p);
                self.log.info(format_args!(
                    "dom{}: PV driver product {p} (blacklisted: {})",
                    self.domid, self.state.blacklisted
                ));
            }
            (2, 1) => self.log_byte(value as u8),
            (off, s) => self.log.warn(format_args!(
                "dom{}: platform port {:#x} write of {s} bytes ignored",
                self.domid,
                PORT_BASE + off
            )),
        }
    }
}

impl PciDevice for Platform {
    fn name(&self) -> String {
        "xen-platform".into()
    }
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn bar_read(&mut self, bar: usize, off: u64, size: u8) -> u64 {
        match (bar, off, size) {
            (0, 0, 1) => u64::from(self.state.flags),
            (1, _, _) => 0,
            _ => ones(size),
        }
    }
    fn bar_write(&mut self, bar: usize, off: u64, size: u8, value: u64) {
        match (bar, off, size) {
            (0, 0, 1) => self.state.flags = value as u8 & 1,
            // Old drivers: writing 1 at offset 4 unplugs disks and NICs.
            (0, 4, _) if value == 1 => self.unplug(UNPLUG_ALL_DISKS | UNPLUG_ALL_NICS),
            (0, 8, 1) => self.log_byte(value as u8),
            _ => self.log.warn(format_args!(
                "dom{}: platform BAR{bar} write at {off:#x} size {size} ignored",
                self.domid
            )),
        }
    }
    fn describe(&self) -> String {
        "xen-platform 5853:0001".into()
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

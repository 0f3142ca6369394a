//! The machine: the PCI bus (i440FX host bridge at 00:00.0, PIIX3 ISA bridge at 00:01.0,
//! Xen platform device at 00:02.0, one virtio-blk function per disk from 00:03.0), COM1, and
//! the fixed ports, served to an ioreq server as one [`IoHandler`].

use std::sync::Arc;

use backends::blk::engine::{open_image, EngineOptions};
use ioreq::{IoAccess, IoHandler, IoSpace, RangeRegistry, Sbdf};
use xen::{DeviceModel, DomId, IoRange};

use backends::net::engine::NetQueueIo;
use backends::net::tap::hotplug::{HostSetup, HostSide};
use backends::net::tap::{Tap, TapOptions, VifId};

use crate::chipset::{Chipset, Request, RANGES as CHIPSET_PORTS};
use crate::config::{KernelBoot, MachineConfig, VifSpec};
use crate::fwcfg::{FwCfg, FwCfgError};
use crate::irq::IrqSink;
use crate::mem::{GuestRam, MemMapError, RamSource};
use crate::pci::{ones, HostBridge, IsaBridge, PciBus, PciError};
use crate::platform::{Platform, UnplugState, PORT_BASE, PORT_LAST};
use crate::uart::{Uart, UartError, COM1_BASE, COM1_IRQ};
use crate::virtio::blk::VirtioBlk;
use crate::virtio::net::{TapControl, VirtioNet};
use crate::virtio::{VirtioError, VirtioPci};
use crate::RateLog;

/// Errors assembling a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Guest RAM.
    #[error(transparent)]
    Mem(#[from] MemMapError),
    /// The bus.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The UART.
    #[error(transparent)]
    Uart(#[from] UartError),
    /// A virtio function.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// A disk image.
    #[error("dom{domid}: disk {vdev}: {source}")]
    Disk {
        /// Domain.
        domid: DomId,
        /// The disk.
        vdev: String,
        /// Cause.
        #[source]
        source: backends::blk::engine::EngineError,
    },
    /// Registering a fixed range.
    #[error("dom{domid}: registering {what}: {source}")]
    Range {
        /// Domain.
        domid: DomId,
        /// Which.
        what: &'static str,
        /// Cause.
        #[source]
        source: ioreq::RangeError,
    },
    /// A NIC's tap or host side.
    #[error("dom{domid}: vif[{index}]: {why}")]
    Vif {
        /// Domain.
        domid: DomId,
        /// The NIC.
        index: usize,
        /// What failed.
        why: String,
    },
    /// The direct kernel boot cannot be set up.
    #[error("dom{domid}: direct kernel boot: {source}")]
    Boot {
        /// Domain.
        domid: DomId,
        /// Why.
        #[source]
        source: crate::fwcfg::FwCfgError,
    },
    /// Something in the description this build cannot provide.
    #[error("dom{domid}: {key}: {why}")]
    Unsupported {
        /// Domain.
        domid: DomId,
        /// Config key.
        key: String,
        /// Why.
        why: &'static str,
    },
}

/// Opens the tap of NIC `devid` (named `vifname`, or `vif<domid>.<devid>-emu` as libxl names
/// an emulated NIC's tap), connects its host side (`bridge` or `script`), and builds the
/// virtio-net device on it. The MAC is the `mac` key, or 00:16:3e (Xen's OUI) followed by
/// the domain and device numbers.
fn open_vif(
    domid: DomId,
    devid: u32,
    v: &VifSpec,
    queues: u16,
) -> Result<(VirtioNet, HostSide), MachineError> {
    let index = devid as usize;
    let err = |why: String| MachineError::Vif { domid, index, why };
    let vif = VifId { domid, devid };
    let name = v
        .vifname
        .clone()
        .unwrap_or_else(|| format!("vif{domid}.{devid}-emu"));
    let mtu = v
        .other
        .iter()
        .find(|(k, _)| k == "mtu")
        .map(|(_, m)| m.parse::<u32>().map_err(|_| err(format!("mtu={m}"))))
        .transpose()?;
    let opts = TapOptions {
        name: Some(name.clone()),
        queues: queues.clamp(1, 16),
        mtu,
        ..TapOptions::default()
    };
    let tap = Arc::new(Tap::open(vif, &opts).map_err(|e| err(e.to_string()))?);
    let script = v
        .other
        .iter()
        .find(|(k, _)| k == "script")
        .map(|(_, s)| s.as_str());
    let host = HostSide::online(
        vif,
        tap.name(),
        HostSetup::from_keys(script, v.bridge.as_deref()),
    )
    .map_err(|e| err(e.to_string()))?;
    let mac = v.mac.unwrap_or([
        0x00,
        0x16,
        0x3e,
        (domid >> 8) as u8,
        domid as u8,
        devid as u8,
    ]);
    let engines: Vec<Arc<dyn NetQueueIo>> = tap
        .queues()
        .iter()
        .map(|q| q.clone() as Arc<dyn NetQueueIo>)
        .collect();
    let mtu = tap.mtu().map_err(|e| err(e.to_string()))?;
    let describe = format!("tap {name} ({:?})", host.setup());
    let nic = VirtioNet::new(
        &format!("vif{domid}.{devid}"),
        mac,
        mtu.min(65535) as u16,
        engines,
        Some(Arc::new(TapControl::new(tap))),
        &describe,
    );
    Ok((nic, host))
}

/// The PCI address of the platform device.
pub const PLATFORM_SBDF: Sbdf = Sbdf {
    seg: 0,
    bus: 0,
    dev: 2,
    func: 0,
};
/// The first virtio slot.
pub const FIRST_VIRTIO_DEV: u8 = 3;

/// An HVM machine.
pub struct Machine {
    domid: DomId,
    bus: PciBus,
    chipset: Chipset,
    dm: Arc<dyn DeviceModel>,
    uart: Option<Uart>,
    ram: Arc<GuestRam>,
    devices: Vec<String>,
    /// The NICs' host sides (bridge or hotplug script), taken offline on drop, after the bus.
    _hosts: Vec<HostSide>,
    log: RateLog,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("domid", &self.domid)
            .field("devices", &self.devices)
            .finish()
    }
}

impl Machine {
    /// Builds the machine for `domid` from `cfg`, registering its ranges with `registry`,
    /// raising interrupts through `dm`, and mapping guest RAM from `ram`.
    pub fn new(
        domid: DomId,
        cfg: &MachineConfig,
        registry: Arc<dyn RangeRegistry>,
        dm: Arc<dyn DeviceModel>,
        ram: Box<dyn RamSource>,
    ) -> Result<Machine, MachineError> {
        let irq = IrqSink::new(dm.clone(), domid);
        let ram = Arc::new(GuestRam::new(domid, ram)?);
        let fixed = |what, start: u64, end: u64| {
            registry
                .map(IoRange::Port { start, end })
                .map_err(|source| MachineError::Range {
                    domid,
                    what,
                    source,
                })
        };
        fixed(
            "platform ports 0x10-0x13",
            u64::from(PORT_BASE),
            u64::from(PORT_LAST),
        )?;
        let mut fw = FwCfg::new(cfg.vcpus.min(u32::from(u16::MAX)) as u16);
        if let Some(k) = &cfg.kernel {
            load_kernel(&mut fw, k, cfg.memory_mib << 20)
                .map_err(|source| MachineError::Boot { domid, source })?;
        }
        for (s, e, what) in CHIPSET_PORTS {
            fixed(what, u64::from(s), u64::from(e))?;
        }
        let chipset = Chipset::new(fw);
        let mut bus = PciBus::new(domid, registry.clone());
        for (s, e, _) in CHIPSET_PORTS {
            bus.reserve_ports(u64::from(s), u64::from(e));
        }
        bus.reserve_ports(u64::from(PORT_BASE), u64::from(PORT_LAST));
        bus.reserve_ports(u64::from(COM1_BASE), u64::from(COM1_BASE) + 7);
        bus.reserve_ports(0xcf8, 0xcff);
        bus.add(
            Sbdf {
                seg: 0,
                bus: 0,
                dev: 0,
                func: 0,
            },
            Box::new(HostBridge::new()),
        )?;
        bus.add(
            Sbdf {
                seg: 0,
                bus: 0,
                dev: 1,
                func: 0,
            },
            Box::new(IsaBridge::new(domid)),
        )?;
        bus.add(
            PLATFORM_SBDF,
            Box::new(Platform::new(domid, cfg.platform_blacklist.clone())),
        )?;
        for (i, d) in cfg.disks.iter().enumerate() {
            let dev = FIRST_VIRTIO_DEV + i as u8;
            if dev >= 32 {
                return Err(MachineError::Unsupported {
                    domid,
                    key: format!("disk[{i}]"),
                    why: "no PCI slot left",
                });
            }
            let engine = open_image(
                d.format.as_deref(),
                &d.target,
                d.read_only,
                &EngineOptions::default(),
            )
            .map_err(|source| MachineError::Disk {
                domid,
                vdev: d.vdev.clone(),
                source,
            })?;
            let blk = VirtioBlk::new(&d.vdev, engine, cfg.virtio_queues).with_poll(
                std::time::Duration::from_micros(u64::from(cfg.virtio_poll_us)),
            );
            let f = VirtioPci::new(
                format!("virtio-blk {}", d.vdev),
                Box::new(blk),
                irq.clone(),
                0,
                dev,
                ram.clone(),
            )?;
            bus.add(
                Sbdf {
                    seg: 0,
                    bus: 0,
                    dev,
                    func: 0,
                },
                Box::new(f),
            )?;
        }
        let mut hosts = Vec::new();
        for (i, v) in cfg.vifs.iter().enumerate() {
            let dev = FIRST_VIRTIO_DEV + (cfg.disks.len() + i) as u8;
            if dev >= 32 {
                return Err(MachineError::Unsupported {
                    domid,
                    key: format!("vif[{i}]"),
                    why: "no PCI slot left",
                });
            }
            let (nic, host) = open_vif(domid, i as u32, v, cfg.virtio_queues)?;
            hosts.push(host);
            let f = VirtioPci::new(
                format!("virtio-net {i}"),
                Box::new(nic),
                irq.clone(),
                0,
                dev,
                ram.clone(),
            )?;
            bus.add(
                Sbdf {
                    seg: 0,
                    bus: 0,
                    dev,
                    func: 0,
                },
                Box::new(f),
            )?;
        }
        let uart = match cfg.serial {
            crate::uart::SerialSpec::None => None,
            ref s => Some(Uart::new(s, irq.clone(), COM1_IRQ)?),
        };
        // With no console there is no UART: probes of 0x3f8 find nothing, as on a PC
        // without COM1.
        if uart.is_some() {
            fixed(
                "COM1 0x3f8-0x3ff",
                u64::from(COM1_BASE),
                u64::from(COM1_BASE) + 7,
            )?;
        }
        let mut devices = bus.describe();
        if let Some(u) = &uart {
            devices.push(format!(
                "COM1 16550A {:#x} IRQ {} console {}",
                COM1_BASE,
                COM1_IRQ,
                u.console()
            ));
        }
        for d in &devices {
            tracing::info!(domid, "device: {d}");
        }
        if let Some(k) = &cfg.kernel {
            devices.push(format!(
                "fw_cfg 0x510: direct boot of {} (initrd {}) through {}",
                k.kernel.display(),
                k.initrd
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
                k.rom.display()
            ));
        }
        Ok(Machine {
            domid,
            bus,
            chipset,
            dm,
            uart,
            ram,
            devices,
            _hosts: hosts,
            log: RateLog::new(),
        })
    }

    /// One line per device (for the log and the control socket).
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// The UART's console ("pty:/dev/pts/N", ...), if there is one.
    pub fn serial_console(&self) -> Option<&str> {
        self.uart.as_ref().map(|u| u.console())
    }

    /// The platform device's unplug-protocol state.
    pub fn unplug_state(&mut self) -> Option<UnplugState> {
        self.bus.devices_mut().find_map(|d| {
            d.as_any()
                .and_then(|a| a.downcast_ref::<Platform>())
                .map(|p| p.state().clone())
        })
    }

    /// The BAR ranges currently routed to this machine.
    pub fn routed_bars(&self) -> Vec<IoRange> {
        self.bus.routed()
    }

    fn platform(&mut self) -> Option<&mut Platform> {
        self.bus
            .devices_mut()
            .find_map(|d| d.as_any_mut().and_then(|a| a.downcast_mut::<Platform>()))
    }

    fn chipset_requests(&mut self) {
        for r in self.chipset.take_requests() {
            match r {
                Request::PowerOff => {
                    tracing::info!(domid = self.domid, "the guest powered off (ACPI S5)");
                    if let Err(e) = self
                        .dm
                        .remote_shutdown(self.domid, xen::abi::dm_op::SHUTDOWN_POWEROFF)
                    {
                        self.log.warn(format_args!(
                            "dom{}: shutting the domain down after its ACPI poweroff failed: {e}",
                            self.domid
                        ));
                    }
                }
            }
        }
    }

    fn port_read(&mut self, port: u64, size: u8) -> Option<u64> {
        if Chipset::claims(port) {
            return Some(self.chipset.read(port, size));
        }
        let last = port + u64::from(size) - 1;
        let com = u64::from(COM1_BASE)..=u64::from(COM1_BASE) + 7;
        let plat = u64::from(PORT_BASE)..=u64::from(PORT_LAST);
        if com.contains(&port) {
            let uart = self.uart.as_mut()?;
            let mut v = 0u64;
            for i in 0..u64::from(size) {
                let b = if com.contains(&(port + i)) {
                    uart.read((port + i - u64::from(COM1_BASE)) as u16)
                } else {
                    0xff
                };
                v |= u64::from(b) << (8 * i);
            }
            return Some(v);
        }
        if plat.contains(&port) {
            if !plat.contains(&last) {
                return Some(ones(size));
            }
            return Some(self.platform()?.port_read(port as u16, size));
        }
        self.bus.bar_read(true, port, size)
    }

    fn port_write(&mut self, port: u64, size: u8, value: u64) -> bool {
        if Chipset::claims(port) {
            self.chipset.write(port, size, value);
            self.chipset_requests();
            return true;
        }
        let last = port + u64::from(size) - 1;
        let com = u64::from(COM1_BASE)..=u64::from(COM1_BASE) + 7;
        let plat = u64::from(PORT_BASE)..=u64::from(PORT_LAST);
        if com.contains(&port) {
            let Some(uart) = self.uart.as_mut() else {
                return false;
            };
            for i in 0..u64::from(size) {
                if com.contains(&(port + i)) {
                    uart.write(
                        (port + i - u64::from(COM1_BASE)) as u16,
                        (value >> (8 * i)) as u8,
                    );
                }
            }
            return true;
        }
        if plat.contains(&port) {
            if plat.contains(&last) {
                if let Some(p) = self.platform() {
                    p.port_write(port as u16, size, value);
                }
            }
            return true;
        }
        self.bus.bar_write(true, port, size, value)
    }
}

/// Reads the files of a direct kernel boot and fills fw_cfg with them.
fn load_kernel(fw: &mut FwCfg, k: &KernelBoot, memory: u64) -> Result<(), FwCfgError> {
    let read = |what: &'static str, p: &std::path::Path| {
        std::fs::read(p).map_err(|source| FwCfgError::Read {
            what,
            path: p.display().to_string(),
            source,
        })
    };
    let kernel = read("kernel", &k.kernel)?;
    let initrd = match &k.initrd {
        Some(p) => Some(read("initrd", p)?),
        None => None,
    };
    let rom = read("option ROM", &k.rom)?;
    let kp = k.kernel.display().to_string();
    let ip = k
        .initrd
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    fw.load_linux(
        (&kp, &kernel),
        initrd.as_deref().map(|d| (ip.as_str(), d)),
        &k.cmdline,
        (&k.rom.display().to_string(), &rom),
        memory.min(crate::mem::LOW_RAM_END_MAX),
    )
}

impl IoHandler for Machine {
    fn read(&mut self, a: IoAccess) -> Option<u64> {
        match a.space {
            IoSpace::Port => self.port_read(a.addr, a.size),
            IoSpace::Mmio => self.bus.bar_read(false, a.addr, a.size),
            IoSpace::PciConfig(sbdf) => self.bus.config_read(sbdf, a.addr, a.size),
        }
    }

    fn write(&mut self, a: IoAccess, value: u64) -> bool {
        match a.space {
            IoSpace::Port => self.port_write(a.addr, a.size, value),
            IoSpace::Mmio => self.bus.bar_write(false, a.addr, a.size, value),
            IoSpace::PciConfig(sbdf) => self.bus.config_write(sbdf, a.addr, a.size, value),
        }
    }

    fn invalidate(&mut self) {
        // O(1): the mapping is dropped now and made again when a device next needs it.
        self.ram.invalidate();
    }

    fn time_offset(&mut self, offset: i64) {
        self.log.debug(format_args!(
            "dom{}: guest RTC offset {offset} s (no RTC here: Xen emulates it)",
            self.domid
        ));
    }
}

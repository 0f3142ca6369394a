//! A direct `HvmBus` for devmodel tests: guest port, MMIO and config accesses go straight
//! into a `Machine` (through `IoHandler`), routed only to the ranges the machine registered,
//! the way Xen routes ioreqs; 0xcf8/0xcfc become PCI_CONFIG accesses as Xen makes them;
//! guest RAM is one anonymous shared mapping that the machine also maps; interrupts are
//! recorded by a `DeviceModel` of our own.
#![allow(dead_code)]

#[allow(unsafe_code)]
pub mod sys;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devmodel::config::MachineConfig;
use devmodel::mem::{FixedRam, RamRegion};
use devmodel::Machine;
use ioreq::{IoAccess, IoHandler, IoSpace, RangeError, RangeRegistry, Sbdf};
use xen::{BufIoreq, DeviceModel, DmError, DomId, IoRange, IoServId, IoreqServerInfo, SharedMem};
use xensim::hvm::{HvmBus, Irq};

pub const DOMID: DomId = 7;

#[derive(Default)]
pub struct Irqs {
    q: Mutex<Vec<Irq>>,
    cv: Condvar,
    /// XEN_DMOP_remote_shutdown reasons, in order.
    pub shutdowns: Mutex<Vec<u32>>,
}

impl Irqs {
    fn push(&self, i: Irq) {
        self.q.lock().unwrap().push(i);
        self.cv.notify_all();
    }
}

/// Records DMOP interrupts.
pub struct RecordingDm(pub Arc<Irqs>);

fn unsupported(op: &'static str) -> DmError {
    DmError::Invalid {
        op,
        domid: DOMID,
        why: "not part of the direct test bus",
    }
}

impl DeviceModel for RecordingDm {
    fn create_ioreq_server(&self, _d: DomId, _b: BufIoreq) -> Result<IoServId, DmError> {
        Err(unsupported("create_ioreq_server"))
    }
    fn get_ioreq_server_info(
        &self,
        _d: DomId,
        _i: IoServId,
        _g: bool,
    ) -> Result<IoreqServerInfo, DmError> {
        Err(unsupported("get_ioreq_server_info"))
    }
    fn map_io_range(&self, _d: DomId, _i: IoServId, _r: IoRange) -> Result<(), DmError> {
        Err(unsupported("map_io_range"))
    }
    fn unmap_io_range(&self, _d: DomId, _i: IoServId, _r: IoRange) -> Result<(), DmError> {
        Err(unsupported("unmap_io_range"))
    }
    fn set_ioreq_server_state(&self, _d: DomId, _i: IoServId, _e: bool) -> Result<(), DmError> {
        Err(unsupported("set_ioreq_server_state"))
    }
    fn destroy_ioreq_server(&self, _d: DomId, _i: IoServId) -> Result<(), DmError> {
        Err(unsupported("destroy_ioreq_server"))
    }
    fn set_isa_irq_level(&self, _d: DomId, irq: u8, level: bool) -> Result<(), DmError> {
        self.0.push(Irq::Isa { irq, level });
        Ok(())
    }
    fn set_pci_intx_level(
        &self,
        _d: DomId,
        _s: u16,
        bus: u8,
        dev: u8,
        intx: u8,
        level: bool,
    ) -> Result<(), DmError> {
        self.0.push(Irq::PciIntx {
            bus,
            dev,
            intx,
            level,
        });
        Ok(())
    }
    fn inject_msi(&self, _d: DomId, addr: u64, data: u32) -> Result<(), DmError> {
        self.0.push(Irq::Msi { addr, data });
        Ok(())
    }
    fn remote_shutdown(&self, _d: DomId, reason: u32) -> Result<(), DmError> {
        self.0.shutdowns.lock().unwrap().push(reason);
        Ok(())
    }
    fn restrict(&self, _d: DomId) -> Result<(), DmError> {
        Ok(())
    }
}

/// The ranges the machine registered, checked as Xen checks them (end >= start).
#[derive(Default)]
pub struct Ranges(pub Mutex<Vec<IoRange>>);

impl RangeRegistry for Ranges {
    fn map(&self, range: IoRange) -> Result<(), RangeError> {
        let ok = match range {
            IoRange::Port { start, end } => start <= end && end <= 0xffff,
            IoRange::Mmio { start, end } => start <= end,
            IoRange::Pci { .. } => true,
        };
        if !ok {
            return Err(RangeError::Invalid {
                range,
                why: "end before start or past the space",
            });
        }
        self.0.lock().unwrap().push(range);
        Ok(())
    }
    fn unmap(&self, range: IoRange) -> Result<(), RangeError> {
        let mut v = self.0.lock().unwrap();
        match v.iter().position(|r| *r == range) {
            Some(i) => {
                v.remove(i);
                Ok(())
            }
            None => Err(RangeError::Invalid {
                range,
                why: "not mapped",
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("guest RAM access at {0:#x} outside RAM")]
    Ram(u64),
}

pub struct DirectBus {
    pub machine: Mutex<Machine>,
    cf8: Mutex<u32>,
    pub ram: Arc<SharedMem>,
    pub irqs: Arc<Irqs>,
    pub ranges: Arc<Ranges>,
}

impl DirectBus {
    pub fn new(cfg: &MachineConfig) -> DirectBus {
        let ram = Arc::new(SharedMem::anonymous((cfg.memory_mib << 20) as usize).unwrap());
        let irqs = Arc::new(Irqs::default());
        let ranges = Arc::new(Ranges::default());
        let src = FixedRam(vec![RamRegion {
            gpa: 0,
            mem: ram.clone(),
        }]);
        let machine = Machine::new(
            DOMID,
            cfg,
            ranges.clone(),
            Arc::new(RecordingDm(irqs.clone())),
            Box::new(src),
        )
        .unwrap();
        DirectBus {
            machine: Mutex::new(machine),
            cf8: Mutex::new(0),
            ram,
            irqs,
            ranges,
        }
    }

    fn routed(&self, io: bool, addr: u64, size: u8) -> bool {
        let last = addr + u64::from(size) - 1;
        self.ranges.0.lock().unwrap().iter().any(|r| match *r {
            IoRange::Port { start, end } => io && addr >= start && last <= end,
            IoRange::Mmio { start, end } => !io && addr >= start && last <= end,
            IoRange::Pci { .. } => false,
        })
    }

    fn pci_routed(&self, sbdf: Sbdf) -> bool {
        self.ranges.0.lock().unwrap().iter().any(|r| matches!(*r, IoRange::Pci { seg, bus, dev, func } if Sbdf { seg, bus, dev, func } == sbdf))
    }

    /// Xen's 0xcf8/0xcfc decoding: the config access a data-port access stands for.
    fn cfg_access(&self, port: u16, size: u8) -> Option<IoAccess> {
        let cf8 = *self.cf8.lock().unwrap();
        if cf8 & 0x8000_0000 == 0 {
            return None;
        }
        let sbdf = Sbdf::from_u32((cf8 >> 8) & 0xffff);
        if !self.pci_routed(sbdf) {
            return None;
        }
        Some(IoAccess {
            space: IoSpace::PciConfig(sbdf),
            addr: u64::from(cf8 & 0xfc) + u64::from(port & 3),
            size,
        })
    }

    /// A raw config access (as a PCI_CONFIG ioreq), for hostile tests.
    pub fn cfg_raw_write(&self, sbdf: Sbdf, off: u64, size: u8, v: u64) -> bool {
        self.machine.lock().unwrap().write(
            IoAccess {
                space: IoSpace::PciConfig(sbdf),
                addr: off,
                size,
            },
            v,
        )
    }

    pub fn cfg_raw_read(&self, sbdf: Sbdf, off: u64, size: u8) -> Option<u64> {
        self.machine.lock().unwrap().read(IoAccess {
            space: IoSpace::PciConfig(sbdf),
            addr: off,
            size,
        })
    }

    /// Waits for an interrupt matching `f` (consuming everything up to it).
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&Irq) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.irqs.q.lock().unwrap();
        loop {
            if let Some(i) = q.iter().position(&f) {
                q.drain(..=i);
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = self.irqs.cv.wait_timeout(q, deadline - now).unwrap().0;
        }
    }
}

fn ones(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(size))) - 1
    }
}

impl HvmBus for DirectBus {
    type Error = DirectError;

    fn pio_read(&self, port: u16, size: u8) -> Result<u32, DirectError> {
        if port == 0xcf8 && size == 4 {
            return Ok(*self.cf8.lock().unwrap());
        }
        if (0xcfc..=0xcff).contains(&port) {
            return Ok(match self.cfg_access(port, size) {
                Some(a) => self.machine.lock().unwrap().read(a).unwrap_or(ones(size)) as u32,
                None => ones(size) as u32,
            });
        }
        if !self.routed(true, u64::from(port), size) {
            return Ok(ones(size) as u32);
        }
        let a = IoAccess {
            space: IoSpace::Port,
            addr: u64::from(port),
            size,
        };
        Ok(self.machine.lock().unwrap().read(a).unwrap_or(ones(size)) as u32)
    }

    fn pio_write(&self, port: u16, size: u8, value: u32) -> Result<(), DirectError> {
        if port == 0xcf8 && size == 4 {
            *self.cf8.lock().unwrap() = value;
            return Ok(());
        }
        if (0xcfc..=0xcff).contains(&port) {
            if let Some(a) = self.cfg_access(port, size) {
                self.machine.lock().unwrap().write(a, u64::from(value));
            }
            return Ok(());
        }
        if self.routed(true, u64::from(port), size) {
            let a = IoAccess {
                space: IoSpace::Port,
                addr: u64::from(port),
                size,
            };
            self.machine.lock().unwrap().write(a, u64::from(value));
        }
        Ok(())
    }

    fn mmio_read(&self, gpa: u64, size: u8) -> Result<u64, DirectError> {
        if !self.routed(false, gpa, size) {
            return Ok(ones(size));
        }
        let a = IoAccess {
            space: IoSpace::Mmio,
            addr: gpa,
            size,
        };
        Ok(self.machine.lock().unwrap().read(a).unwrap_or(ones(size)))
    }

    fn mmio_write(&self, gpa: u64, size: u8, value: u64) -> Result<(), DirectError> {
        if self.routed(false, gpa, size) {
            let a = IoAccess {
                space: IoSpace::Mmio,
                addr: gpa,
                size,
            };
            self.machine.lock().unwrap().write(a, value);
        }
        Ok(())
    }

    fn ram_size(&self) -> u64 {
        self.ram.len() as u64
    }

    fn ram_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DirectError> {
        self.ram
            .read(gpa as usize, buf)
            .map_err(|_| DirectError::Ram(gpa))
    }

    fn ram_write(&self, gpa: u64, data: &[u8]) -> Result<(), DirectError> {
        self.ram
            .write(gpa as usize, data)
            .map_err(|_| DirectError::Ram(gpa))
    }

    fn take_irqs(&self) -> Vec<Irq> {
        std::mem::take(&mut *self.irqs.q.lock().unwrap())
    }

    fn wait_irq(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.irqs.q.lock().unwrap();
        while q.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = self.irqs.cv.wait_timeout(q, deadline - now).unwrap().0;
        }
        true
    }
}

/// A machine description for tests.
/// Builds a machine for `cfg` on plain memory, for tests of what it refuses.
#[allow(dead_code)]
pub fn try_machine(cfg: &MachineConfig) -> Result<Machine, devmodel::MachineError> {
    let ram = Arc::new(SharedMem::anonymous((cfg.memory_mib << 20) as usize).unwrap());
    Machine::new(
        DOMID,
        cfg,
        Arc::new(Ranges::default()),
        Arc::new(RecordingDm(Arc::new(Irqs::default()))),
        Box::new(FixedRam(vec![RamRegion { gpa: 0, mem: ram }])),
    )
}

pub fn config(extra: &str) -> MachineConfig {
    MachineConfig::parse(&format!(
        "name = \"t\"\ntype = \"hvm\"\nmemory = 80\n{extra}\n"
    ))
    .unwrap()
}

/// Runs `ip ARGS...` and panics with its output if it fails.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread in a fresh network namespace with loopback up.
pub fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        sys::unshare_netns().expect("unshare(CLONE_NEWNET)");
        ip(&["link", "set", "lo", "up"]);
        f()
    })
    .join()
    .unwrap()
}

/// A tracing subscriber that counts the events and message bytes that reach the log, and
/// notes whether a rate limiter reported suppressed lines.
#[derive(Clone, Default)]
pub struct LogCount {
    /// Events logged.
    pub events: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes of their messages.
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Whether a line reported suppressed lines.
    pub suppressed_note: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

struct MessageLen(usize, bool);

impl tracing::field::Visit for MessageLen {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let s = format!("{value:?}");
            self.0 += s.len();
            self.1 |= s.contains("similar lines suppressed");
        }
    }
}

impl tracing::Subscriber for LogCount {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut v = MessageLen(0, false);
        e.record(&mut v);
        self.events.fetch_add(1, Relaxed);
        self.bytes.fetch_add(v.0, Relaxed);
        if v.1 {
            self.suppressed_note.store(true, Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A raw image `d.raw` of `len` bytes (all zero) in `dir`.
pub fn raw_image(dir: &std::path::Path, len: u64) -> std::path::PathBuf {
    let img = dir.join("d.raw");
    std::fs::File::create(&img).unwrap().set_len(len).unwrap();
    img
}

//! The HVM side of xensim: what a guest's vCPUs do when they touch port I/O, MMIO or PCI
//! config space that an ioreq server claims, and the interrupts a device model raises.
//!
//! [`HvmBus`] is the contract that the guest OS test library (`crate::guestos`) is written
//! against. xensim's vCPUs implement it by issuing ioreqs exactly as Xen does; a test may
//! implement it by calling a device model directly.

use std::time::Duration;

pub mod domain;
pub mod vcpu;

pub use domain::{HvmDomain, HvmError, RangeSet, ServerInfo, XenIoreqServer};
pub use vcpu::{BufSpace, HvmGuest, Posted, VcpuIo, DEFAULT_IO_TIMEOUT};

use std::os::fd::OwnedFd;

use crate::host::Host;
use crate::proto::{DmOp, Response};

/// Runs one DMOP from a daemon client in domain `caller` (only dom0 is privileged).
pub fn serve_dm(host: &Host, caller: xen::DomId, domid: xen::DomId, op: DmOp) -> Response {
    let err = |e: HvmError| Response::Err {
        errno: e.errno(),
        msg: e.to_string(),
    };
    if caller != 0 {
        return Response::Err {
            errno: libc::EPERM,
            msg: format!("dom{caller} may not issue dm_ops"),
        };
    }
    let Some(d) = host.hvm_domain(domid) else {
        return Response::Err {
            errno: if host.has_domain(domid) {
                libc::EOPNOTSUPP
            } else {
                libc::ESRCH
            },
            msg: format!("dom{domid} is not an HVM domain"),
        };
    };
    let ok = |r: Result<(), HvmError>| r.map_or_else(err, |()| Response::Ok);
    match op {
        DmOp::CreateIoreqServer { handle_bufioreq } => d
            .create_server(host, caller, handle_bufioreq)
            .map_or_else(err, Response::IoServId),
        DmOp::GetIoreqServerInfo { id, want_gfns } => d
            .server_info(caller, id, want_gfns)
            .map_or_else(err, |i| Response::IoreqInfo {
                bufioreq_port: i.bufioreq_port,
            }),
        DmOp::MapIoRange {
            id,
            type_,
            start,
            end,
        } => ok(d.map_range(caller, id, type_, start, end)),
        DmOp::UnmapIoRange {
            id,
            type_,
            start,
            end,
        } => ok(d.unmap_range(caller, id, type_, start, end)),
        DmOp::SetIoreqServerState { id, enabled } => ok(d.set_state(caller, id, enabled)),
        DmOp::DestroyIoreqServer { id } => ok(d.destroy_server(host, caller, id)),
        DmOp::SetIsaIrqLevel { irq, level } => ok(d.set_isa_irq_level(irq, level)),
        DmOp::SetPciIntxLevel {
            seg,
            bus,
            dev,
            intx,
            level,
        } => ok(d.set_pci_intx_level(seg, bus, dev, intx, level)),
        DmOp::InjectMsi { addr, data } => ok(d.inject_msi(addr, data)),
        DmOp::RemoteShutdown { reason } => ok(d.remote_shutdown(reason)),
    }
}

/// XENMEM_acquire_resource from a daemon client: the ioreq server's pages memfd.
pub fn serve_map_resource(
    host: &Host,
    caller: xen::DomId,
    domid: xen::DomId,
    type_: u32,
    id: u32,
    frame: u64,
    nr_frames: u64,
) -> (Response, Vec<OwnedFd>) {
    let fail = |errno: i32, msg: String| (Response::Err { errno, msg }, Vec::new());
    if caller != 0 {
        return fail(libc::EPERM, format!("dom{caller} may not map resources"));
    }
    if type_ != 0 {
        return fail(
            libc::EOPNOTSUPP,
            format!("xensim maps only ioreq server resources, not type {type_}"),
        );
    }
    let Some(d) = host.hvm_domain(domid) else {
        return fail(libc::ESRCH, format!("dom{domid} is not an HVM domain"));
    };
    let Ok(id) = u16::try_from(id) else {
        return fail(libc::ENOENT, format!("no ioreq server {id}"));
    };
    match d.resource_fd(caller, id, frame, nr_frames) {
        Ok(fd) => (Response::Resource, vec![fd]),
        Err(e) => fail(e.errno(), e.to_string()),
    }
}

/// An interrupt raised by the device model (through DMOPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irq {
    /// XEN_DMOP_set_isa_irq_level.
    Isa {
        /// ISA IRQ (0..16).
        irq: u8,
        /// Asserted.
        level: bool,
    },
    /// XEN_DMOP_set_pci_intx_level.
    PciIntx {
        /// Bus.
        bus: u8,
        /// Device.
        dev: u8,
        /// 0..=3 for INTA..INTD.
        intx: u8,
        /// Asserted.
        level: bool,
    },
    /// XEN_DMOP_inject_msi.
    Msi {
        /// Message address.
        addr: u64,
        /// Message data.
        data: u32,
    },
}

/// What a guest OS can do on its virtual hardware.
pub trait HvmBus: Send + Sync {
    /// The error of the implementation.
    type Error: std::error::Error + Send + Sync + 'static;
    /// `in` of 1, 2 or 4 bytes.
    fn pio_read(&self, port: u16, size: u8) -> Result<u32, Self::Error>;
    /// `out` of 1, 2 or 4 bytes.
    fn pio_write(&self, port: u16, size: u8, value: u32) -> Result<(), Self::Error>;
    /// A load of 1, 2, 4 or 8 bytes from guest-physical `gpa`.
    fn mmio_read(&self, gpa: u64, size: u8) -> Result<u64, Self::Error>;
    /// A store of 1, 2, 4 or 8 bytes to guest-physical `gpa`.
    fn mmio_write(&self, gpa: u64, size: u8, value: u64) -> Result<(), Self::Error>;
    /// Guest RAM size in bytes (RAM starts at guest-physical 0).
    fn ram_size(&self) -> u64;
    /// Reads guest RAM.
    fn ram_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes guest RAM.
    fn ram_write(&self, gpa: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// Interrupts raised since the last call, oldest first.
    fn take_irqs(&self) -> Vec<Irq>;
    /// Blocks until an interrupt is raised or `timeout` passes; true if one is pending.
    fn wait_irq(&self, timeout: Duration) -> bool;
}

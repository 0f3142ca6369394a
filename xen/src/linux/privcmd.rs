//! [`LinuxForeign`] and [`LinuxDm`]: `/dev/xen/privcmd`.
//!
//! The device's semantics (drivers/xen/privcmd.c): foreign frames are mapped by first
//! `mmap`ping the privcmd file (an empty VMA) and then filling it with
//! IOCTL_PRIVCMD_MMAPBATCH_V2, which reports per-frame errors in `err[]` (the ioctl itself
//! returns 0, or ENOENT when some frames are paged out); IOCTL_PRIVCMD_MMAP_RESOURCE fills a
//! fresh VMA of exactly `num` pages the same way. IOCTL_PRIVCMD_DM_OP passes an array of
//! buffers to HYPERVISOR_dm_op (at most 16, each at most 4096 bytes). IOCTL_PRIVCMD_RESTRICT
//! limits the file to one domain (it may be repeated for the same domain only).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::Mutex;

use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::sys::{self, Mmap};
use super::uapi::PrivcmdMmapResource;
use crate::abi::dm_op::*;
use crate::abi::ioreq::{
    HVM_IOREQSRV_BUFIOREQ_ATOMIC, HVM_IOREQSRV_BUFIOREQ_LEGACY, HVM_IOREQSRV_BUFIOREQ_OFF,
};
use crate::dm::{BufIoreq, DeviceModel, DmError, IoRange, IoServId, IoreqServerInfo};
use crate::foreign::{ForeignError, ForeignMemory, Resource};
use crate::mem::SharedMem;
use crate::{DomId, Gfn, PAGE_SIZE};

/// Most frames mapped in one call: 16 GiB of guest memory (the frame and error arrays of
/// one IOCTL_PRIVCMD_MMAPBATCH_V2 are then 32 and 16 MiB). Callers split larger runs
/// ([`ForeignMemory::max_map_frames`]).
pub const MAX_MAP_FRAMES: usize = 1 << 22;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One open of `/dev/xen/privcmd` for foreign mapping.
#[derive(Debug)]
pub struct LinuxForeign {
    file: File,
    path: String,
    restricted: Mutex<Option<DomId>>,
}

impl LinuxForeign {
    /// Wraps an open privcmd device.
    pub(crate) fn from_file(file: File, path: String) -> Self {
        LinuxForeign {
            file,
            path,
            restricted: Mutex::new(None),
        }
    }

    /// The device path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check_domain(&self, domid: DomId) -> Result<(), ForeignError> {
        match *lock(&self.restricted) {
            Some(r) if r != domid => Err(ForeignError::Restricted {
                restricted: r,
                requested: domid,
            }),
            _ => Ok(()),
        }
    }

    fn os(op: &'static str, domid: DomId, source: io::Error) -> ForeignError {
        ForeignError::Os { op, domid, source }
    }

    fn invalid(op: &'static str, domid: DomId, why: &'static str) -> ForeignError {
        Self::os(op, domid, io::Error::new(io::ErrorKind::InvalidInput, why))
    }
}

/// The first failed frame of an MMAPBATCH_V2 result, as (gfn, positive errno).
pub(crate) fn first_frame_error(gfns: &[Gfn], errs: &[i32]) -> Option<(Gfn, i32)> {
    gfns.iter()
        .zip(errs)
        .find(|(_, e)| **e != 0)
        .map(|(g, e)| (*g, e.checked_neg().unwrap_or(libc::EINVAL)))
}

impl ForeignMemory for LinuxForeign {
    fn map(&self, domid: DomId, gfns: &[Gfn], writable: bool) -> Result<SharedMem, ForeignError> {
        self.check_domain(domid)?;
        if gfns.is_empty() {
            return Err(Self::invalid("mmapbatch", domid, "no frames to map"));
        }
        if gfns.len() > MAX_MAP_FRAMES {
            return Err(Self::invalid(
                "mmapbatch",
                domid,
                "too many frames in one mapping",
            ));
        }
        let map = Mmap::new(self.file.as_fd(), gfns.len() * PAGE_SIZE, writable, 0)
            .map_err(|e| Self::os("mmap", domid, e))?;
        let mut errs = vec![0i32; gfns.len()];
        let rc = sys::privcmd_mmapbatch_v2(self.file.as_fd(), domid, &map, gfns, &mut errs);
        match rc {
            Ok(()) => {}
            // Paged-out frames: err[] says which (-ENOENT); report the first below.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(Self::os("mmapbatch_v2", domid, e)),
        }
        if let Some((gfn, errno)) = first_frame_error(gfns, &errs) {
            return Err(ForeignError::Frame { domid, gfn, errno });
        }
        Ok(map.into_shared_mem())
    }

    fn map_resource(
        &self,
        domid: DomId,
        res: Resource,
        frame: u64,
        nr_frames: u64,
    ) -> Result<SharedMem, ForeignError> {
        self.check_domain(domid)?;
        let idx = u32::try_from(frame).map_err(|_| {
            Self::invalid(
                "mmap_resource",
                domid,
                "resource frame index beyond 32 bits",
            )
        })?;
        let pages = usize::try_from(nr_frames)
            .ok()
            .filter(|n| (1..=MAX_MAP_FRAMES).contains(n))
            .ok_or_else(|| {
                Self::invalid("mmap_resource", domid, "resource frame count out of range")
            })?;
        let map = Mmap::new(self.file.as_fd(), pages * PAGE_SIZE, true, 0)
            .map_err(|e| Self::os("mmap", domid, e))?;
        let (type_, id) = res.type_and_id();
        let arg = PrivcmdMmapResource {
            dom: domid,
            _pad: 0,
            type_,
            id,
            idx,
            num: nr_frames,
            addr: 0,
        };
        sys::privcmd_mmap_resource(self.file.as_fd(), &map, arg)
            .map_err(|e| Self::os("mmap_resource", domid, e))?;
        Ok(map.into_shared_mem())
    }

    fn max_map_frames(&self) -> usize {
        MAX_MAP_FRAMES
    }

    fn restrict(&self, domid: DomId) -> Result<(), ForeignError> {
        let mut r = lock(&self.restricted);
        sys::privcmd_restrict(self.file.as_fd(), domid)
            .map_err(|e| Self::os("restrict", domid, e))?;
        *r = Some(domid);
        Ok(())
    }
}

/// One open of `/dev/xen/privcmd` for device-model operations.
#[derive(Debug)]
pub struct LinuxDm {
    file: File,
    path: String,
    restricted: Mutex<Option<DomId>>,
}

/// The XEN_DMOP_IO_RANGE_* type and inclusive bounds of a range, or why it is invalid.
pub(crate) fn dmop_range(range: IoRange) -> Result<(u32, u64, u64), &'static str> {
    match range {
        IoRange::Port { start, end } => {
            if start > end {
                Err("port range ends before it starts")
            } else if end > 0xffff {
                Err("port range beyond port 0xffff")
            } else {
                Ok((XEN_DMOP_IO_RANGE_PORT, start, end))
            }
        }
        IoRange::Mmio { start, end } => {
            if start > end {
                Err("MMIO range ends before it starts")
            } else {
                Ok((XEN_DMOP_IO_RANGE_MEMORY, start, end))
            }
        }
        IoRange::Pci {
            seg,
            bus,
            dev,
            func,
        } => {
            if dev > 0x1f || func > 7 {
                Err("PCI device must be 0..=31 and function 0..=7")
            } else {
                let sbdf = xen_dmop_pci_sbdf(seg, bus, dev, func);
                Ok((XEN_DMOP_IO_RANGE_PCI, sbdf, sbdf))
            }
        }
    }
}

impl LinuxDm {
    /// Wraps an open privcmd device.
    pub(crate) fn from_file(file: File, path: String) -> Self {
        LinuxDm {
            file,
            path,
            restricted: Mutex::new(None),
        }
    }

    /// The device path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn invalid(op: &'static str, domid: DomId, why: &'static str) -> DmError {
        DmError::Invalid { op, domid, why }
    }

    /// Issues one dm_op carrying `payload`; returns the union as Xen left it.
    fn call<T: IntoBytes + FromBytes + Immutable>(
        &self,
        name: &'static str,
        domid: DomId,
        op: u32,
        payload: &T,
    ) -> Result<T, DmError> {
        if let Some(r) = *lock(&self.restricted) {
            if r != domid {
                return Err(DmError::Restricted {
                    restricted: r,
                    requested: domid,
                });
            }
        }
        let mut dm = XenDmOp::new(op, payload);
        let mut bufs = [dm.as_mut_bytes()];
        sys::privcmd_dm_op(self.file.as_fd(), domid, &mut bufs).map_err(|source| DmError::Op {
            op: name,
            domid,
            source,
        })?;
        dm.payload::<T>().ok_or(DmError::Invalid {
            op: name,
            domid,
            why: "payload larger than the dm_op union",
        })
    }

    fn range_op(
        &self,
        name: &'static str,
        op: u32,
        domid: DomId,
        id: IoServId,
        range: IoRange,
    ) -> Result<(), DmError> {
        let (type_, start, end) =
            dmop_range(range).map_err(|why| Self::invalid(name, domid, why))?;
        let arg = XenDmOpIoreqServerRange {
            id,
            pad: 0,
            type_,
            start,
            end,
        };
        self.call(name, domid, op, &arg).map(drop)
    }
}

impl DeviceModel for LinuxDm {
    fn create_ioreq_server(&self, domid: DomId, bufioreq: BufIoreq) -> Result<IoServId, DmError> {
        let handle_bufioreq = match bufioreq {
            BufIoreq::Off => HVM_IOREQSRV_BUFIOREQ_OFF,
            BufIoreq::Legacy => HVM_IOREQSRV_BUFIOREQ_LEGACY,
            BufIoreq::Atomic => HVM_IOREQSRV_BUFIOREQ_ATOMIC,
        };
        let arg = XenDmOpCreateIoreqServer {
            handle_bufioreq,
            pad: [0; 3],
            id: 0,
        };
        let out = self.call(
            "create_ioreq_server",
            domid,
            XEN_DMOP_CREATE_IOREQ_SERVER,
            &arg,
        )?;
        Ok(out.id)
    }

    fn get_ioreq_server_info(
        &self,
        domid: DomId,
        id: IoServId,
        want_gfns: bool,
    ) -> Result<IoreqServerInfo, DmError> {
        let flags = if want_gfns { 0 } else { XEN_DMOP_NO_GFNS };
        let arg = XenDmOpGetIoreqServerInfo {
            id,
            flags,
            ..Default::default()
        };
        let out = self.call(
            "get_ioreq_server_info",
            domid,
            XEN_DMOP_GET_IOREQ_SERVER_INFO,
            &arg,
        )?;
        Ok(IoreqServerInfo {
            bufioreq_port: out.bufioreq_port,
            ioreq_gfn: out.ioreq_gfn,
            bufioreq_gfn: out.bufioreq_gfn,
        })
    }

    fn map_io_range(&self, domid: DomId, id: IoServId, range: IoRange) -> Result<(), DmError> {
        self.range_op(
            "map_io_range_to_ioreq_server",
            XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER,
            domid,
            id,
            range,
        )
    }

    fn unmap_io_range(&self, domid: DomId, id: IoServId, range: IoRange) -> Result<(), DmError> {
        self.range_op(
            "unmap_io_range_from_ioreq_server",
            XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
            domid,
            id,
            range,
        )
    }

    fn set_ioreq_server_state(
        &self,
        domid: DomId,
        id: IoServId,
        enabled: bool,
    ) -> Result<(), DmError> {
        let arg = XenDmOpSetIoreqServerState {
            id,
            enabled: u8::from(enabled),
            pad: 0,
        };
        self.call(
            "set_ioreq_server_state",
            domid,
            XEN_DMOP_SET_IOREQ_SERVER_STATE,
            &arg,
        )
        .map(drop)
    }

    fn destroy_ioreq_server(&self, domid: DomId, id: IoServId) -> Result<(), DmError> {
        let arg = XenDmOpDestroyIoreqServer { id, pad: 0 };
        self.call(
            "destroy_ioreq_server",
            domid,
            XEN_DMOP_DESTROY_IOREQ_SERVER,
            &arg,
        )
        .map(drop)
    }

    fn set_isa_irq_level(&self, domid: DomId, isa_irq: u8, level: bool) -> Result<(), DmError> {
        if isa_irq > 15 {
            return Err(Self::invalid(
                "set_isa_irq_level",
                domid,
                "ISA IRQ must be 0..=15",
            ));
        }
        let arg = XenDmOpSetIsaIrqLevel {
            isa_irq,
            level: u8::from(level),
        };
        self.call("set_isa_irq_level", domid, XEN_DMOP_SET_ISA_IRQ_LEVEL, &arg)
            .map(drop)
    }

    fn set_pci_intx_level(
        &self,
        domid: DomId,
        seg: u16,
        bus: u8,
        dev: u8,
        intx: u8,
        level: bool,
    ) -> Result<(), DmError> {
        if intx > 3 {
            return Err(Self::invalid(
                "set_pci_intx_level",
                domid,
                "INTx must be 0..=3 (INTA..INTD)",
            ));
        }
        if dev > 0x1f {
            return Err(Self::invalid(
                "set_pci_intx_level",
                domid,
                "PCI device must be 0..=31",
            ));
        }
        let arg = XenDmOpSetPciIntxLevel {
            domain: seg,
            bus,
            device: dev,
            intx,
            level: u8::from(level),
        };
        self.call(
            "set_pci_intx_level",
            domid,
            XEN_DMOP_SET_PCI_INTX_LEVEL,
            &arg,
        )
        .map(drop)
    }

    fn inject_msi(&self, domid: DomId, addr: u64, data: u32) -> Result<(), DmError> {
        let arg = XenDmOpInjectMsi { data, pad: 0, addr };
        self.call("inject_msi", domid, XEN_DMOP_INJECT_MSI, &arg)
            .map(drop)
    }

    fn remote_shutdown(&self, domid: DomId, reason: u32) -> Result<(), DmError> {
        let arg = XenDmOpRemoteShutdown { reason };
        self.call("remote_shutdown", domid, XEN_DMOP_REMOTE_SHUTDOWN, &arg)
            .map(drop)
    }

    fn restrict(&self, domid: DomId) -> Result<(), DmError> {
        let mut r = lock(&self.restricted);
        sys::privcmd_restrict(self.file.as_fd(), domid).map_err(|source| DmError::Op {
            op: "restrict",
            domid,
            source,
        })?;
        *r = Some(domid);
        Ok(())
    }
}

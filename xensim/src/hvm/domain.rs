//! Xen's half of the ioreq protocol for one HVM domain: its ioreq servers (pages, per-vCPU
//! event channels, range sets, state), the DMOPs on them, resource mapping of their pages,
//! and the interrupts a device model raises.
//!
//! The rules follow Xen 4.17 `xen/common/ioreq.c`, `xen/arch/x86/hvm/ioreq.c` and
//! `xen/arch/x86/hvm/dm.c`: at most 8 servers per domain, ids allocated lowest-free, one
//! unbound event channel per vCPU (remote: the emulator domain) and one for the buffered ring,
//! servers created disabled, `end < start` refused with EINVAL (XSA-238), an overlapping
//! range refused with EEXIST, unmapping a range that is not wholly mapped refused with
//! ENOENT, only the creating (emulator) domain may operate a server (EPERM).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xen::abi::dm_op::{XEN_DMOP_IO_RANGE_MEMORY, XEN_DMOP_IO_RANGE_PCI, XEN_DMOP_IO_RANGE_PORT};
use xen::abi::ioreq::*;
use xen::{BufIoreq, DomId, IoServId, Port, SharedMem, PAGE_SIZE};

use super::Irq;
use crate::efd::EventFd;
use crate::host::{Host, HostError};
use crate::mem::{self, MemFile};

/// Xen's `MAX_NR_IOREQ_SERVERS`.
pub const MAX_NR_IOREQ_SERVERS: usize = 8;
/// Xen's `MAX_NR_IO_RANGES`: ranges per range set of one server.
pub const MAX_NR_IO_RANGES: usize = 256;
/// Most vCPUs: one synchronous ioreq page holds 128 `ioreq_t` (Xen's HVM limit).
pub const MAX_HVM_VCPUS: u32 = (PAGE_SIZE / IOREQ_SIZE) as u32;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of HVM operations, with the errno Xen would return.
#[derive(Debug, thiserror::Error)]
pub enum HvmError {
    /// A DMOP, resource mapping or guest operation was refused.
    #[error("dom{domid}: {op}: {why}")]
    Op {
        /// Target domain.
        domid: DomId,
        /// Operation.
        op: &'static str,
        /// Why.
        why: String,
        /// errno.
        errno: i32,
    },
    /// The device model broke the protocol; Xen would `domain_crash()` the guest.
    #[error("dom{domid} crashed: {why}")]
    Crashed {
        /// Domain.
        domid: DomId,
        /// What the device model did.
        why: String,
    },
    /// The device model did not answer (on Xen the vCPU would wait forever).
    #[error("dom{domid} vcpu{vcpu}: ioreq server {id} did not answer within {timeout:?}")]
    Timeout {
        /// Domain.
        domid: DomId,
        /// vCPU.
        vcpu: u32,
        /// Server.
        id: IoServId,
        /// How long we waited.
        timeout: Duration,
    },
    /// A hypervisor-level failure (event channels, memory).
    #[error("dom{domid}: {source}")]
    Host {
        /// Domain.
        domid: DomId,
        /// The error.
        #[source]
        source: HostError,
    },
    /// Guest RAM access outside the guest's memory.
    #[error("dom{domid}: guest RAM access: {source}")]
    Ram {
        /// Domain.
        domid: DomId,
        /// The error.
        #[source]
        source: xen::MemError,
    },
}

impl HvmError {
    /// The errno a hypercall would have returned.
    pub fn errno(&self) -> i32 {
        match self {
            HvmError::Op { errno, .. } => *errno,
            HvmError::Crashed { .. } => libc::ESHUTDOWN,
            HvmError::Timeout { .. } => libc::ETIMEDOUT,
            HvmError::Host { source, .. } => source.errno(),
            HvmError::Ram { .. } => libc::EFAULT,
        }
    }
}

fn op_err(domid: DomId, op: &'static str, errno: i32, why: impl Into<String>) -> HvmError {
    HvmError::Op {
        domid,
        op,
        why: why.into(),
        errno,
    }
}

/// Xen's `struct rangeset`: disjoint inclusive ranges, adjacent ones merged, with a limit.
#[derive(Debug, Default, Clone)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// Whether any address of `s..=e` is in the set.
    pub fn overlaps(&self, s: u64, e: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= e && s <= b)
    }
    /// Whether all of `s..=e` is in the set.
    pub fn contains(&self, s: u64, e: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= s && e <= b)
    }
    /// Adds `s..=e` (which must not overlap), merging neighbours; false when the limit is hit.
    fn add(&mut self, s: u64, e: u64) -> bool {
        let mut s = s;
        let mut e = e;
        self.ranges.retain(|&(a, b)| {
            let adjacent = (b < s && b.wrapping_add(1) == s) || (e < a && e.wrapping_add(1) == a);
            if adjacent {
                s = s.min(a);
                e = e.max(b);
            }
            !adjacent
        });
        if self.ranges.len() >= MAX_NR_IO_RANGES {
            return false;
        }
        let at = self.ranges.partition_point(|&(a, _)| a < s);
        self.ranges.insert(at, (s, e));
        true
    }
    /// Removes `s..=e` (wholly contained), splitting a range if needed.
    fn remove(&mut self, s: u64, e: u64) {
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b < s || e < a {
                out.push((a, b));
                continue;
            }
            if a < s {
                out.push((a, s - 1));
            }
            if e < b {
                out.push((e + 1, b));
            }
        }
        self.ranges = out;
    }
    /// The ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
}

#[derive(Debug, Default)]
struct ServerState {
    enabled: bool,
    /// Indexed by XEN_DMOP_IO_RANGE_{PORT,MEMORY,PCI}.
    ranges: [RangeSet; 3],
}

/// A vCPU's event channel of one server (a port of the guest domain).
#[derive(Debug)]
pub(crate) struct VcpuChannel {
    pub(crate) port: Port,
    pub(crate) incoming: Arc<EventFd>,
}

/// Xen's `struct ioreq_server`.
#[derive(Debug)]
pub struct XenIoreqServer {
    pub(crate) id: IoServId,
    emulator: DomId,
    pub(crate) bufioreq: BufIoreq,
    /// Frame 0: the buffered page; frame 1: the synchronous page.
    pages: MemFile,
    pub(crate) vcpus: Vec<VcpuChannel>,
    pub(crate) buf_port: Option<Port>,
    state: Mutex<ServerState>,
    /// Xen's `bufioreq_lock`.
    pub(crate) buf_lock: Mutex<()>,
    /// Set when destroyed, so a vCPU waiting on it completes (Xen: STATE_IOREQ_NONE).
    pub(crate) dead: AtomicBool,
}

/// Offset of the synchronous page in a server's pages.
pub const SYNC_PAGE_OFFSET: usize = PAGE_SIZE;

impl XenIoreqServer {
    /// The server's pages as Xen sees them (frame 0 buffered, frame 1 synchronous).
    pub fn pages(&self) -> &SharedMem {
        self.pages.mem()
    }
    /// Whether the server is enabled.
    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled
    }
    /// The server id.
    pub fn id(&self) -> IoServId {
        self.id
    }
    /// The ranges of one XEN_DMOP_IO_RANGE_* type.
    pub fn ranges(&self, type_: u32) -> Vec<(u64, u64)> {
        lock(&self.state)
            .ranges
            .get(type_ as usize)
            .map(|r| r.ranges().to_vec())
            .unwrap_or_default()
    }
}

/// What XEN_DMOP_get_ioreq_server_info answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerInfo {
    /// Buffered ring port (0 without a buffered ring).
    pub bufioreq_port: Port,
}

/// The HVM state of one domain.
#[derive(Debug)]
pub struct HvmDomain {
    pub(crate) domid: DomId,
    pub(crate) nr_vcpus: u32,
    servers: Mutex<BTreeMap<IoServId, Arc<XenIoreqServer>>>,
    /// `d->arch.hvm.pci_cf8`: latched by 4-byte writes to port 0xcf8.
    pub(crate) pci_cf8: AtomicU32,
    irqs: Mutex<VecDeque<Irq>>,
    irq_cv: Condvar,
    crashed: Mutex<Option<String>>,
    /// The reason of XEN_DMOP_remote_shutdown, once asked.
    shutdown: Mutex<Option<u32>>,
    /// One lock per vCPU: a vCPU has at most one ioreq in flight.
    pub(crate) vcpu_locks: Vec<Mutex<()>>,
}

impl HvmDomain {
    pub(crate) fn new(domid: DomId, nr_vcpus: u32) -> Result<HvmDomain, HostError> {
        if nr_vcpus == 0 || nr_vcpus > MAX_HVM_VCPUS {
            return Err(HostError::Invalid {
                domid,
                why: format!("{nr_vcpus} vCPUs (an HVM domain has 1..={MAX_HVM_VCPUS})"),
            });
        }
        Ok(HvmDomain {
            domid,
            nr_vcpus,
            servers: Mutex::new(BTreeMap::new()),
            pci_cf8: AtomicU32::new(0),
            irqs: Mutex::new(VecDeque::new()),
            irq_cv: Condvar::new(),
            crashed: Mutex::new(None),
            shutdown: Mutex::new(None),
            vcpu_locks: (0..nr_vcpus).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    /// Why the domain was crashed by a misbehaving device model, if it was.
    pub fn crashed(&self) -> Option<String> {
        lock(&self.crashed).clone()
    }

    pub(crate) fn crash(&self, why: String) -> HvmError {
        tracing::error!(domid = self.domid, %why, "domain_crash: device model misbehaved");
        let mut c = lock(&self.crashed);
        if c.is_none() {
            *c = Some(why.clone());
        }
        HvmError::Crashed {
            domid: self.domid,
            why,
        }
    }

    /// A server by id.
    pub fn server(&self, id: IoServId) -> Option<Arc<XenIoreqServer>> {
        lock(&self.servers).get(&id).cloned()
    }

    /// All servers, highest id first (Xen's FOR_EACH_IOREQ_SERVER order).
    pub(crate) fn servers_rev(&self) -> Vec<Arc<XenIoreqServer>> {
        lock(&self.servers).values().rev().cloned().collect()
    }

    fn owned(
        &self,
        op: &'static str,
        caller: DomId,
        id: IoServId,
    ) -> Result<Arc<XenIoreqServer>, HvmError> {
        let s = self.server(id).ok_or_else(|| {
            op_err(
                self.domid,
                op,
                libc::ENOENT,
                format!("no ioreq server {id}"),
            )
        })?;
        if s.emulator != caller {
            return Err(op_err(
                self.domid,
                op,
                libc::EPERM,
                format!("ioreq server {id} belongs to dom{}", s.emulator),
            ));
        }
        Ok(s)
    }

    /// XEN_DMOP_create_ioreq_server by `emulator`.
    pub fn create_server(
        &self,
        host: &Host,
        emulator: DomId,
        handle_bufioreq: u8,
    ) -> Result<IoServId, HvmError> {
        let op = "create_ioreq_server";
        let bufioreq = match handle_bufioreq {
            HVM_IOREQSRV_BUFIOREQ_OFF => BufIoreq::Off,
            HVM_IOREQSRV_BUFIOREQ_LEGACY => BufIoreq::Legacy,
            HVM_IOREQSRV_BUFIOREQ_ATOMIC => BufIoreq::Atomic,
            _ => {
                return Err(op_err(
                    self.domid,
                    op,
                    libc::EINVAL,
                    format!("handle_bufioreq {handle_bufioreq}"),
                ))
            }
        };
        let mut servers = lock(&self.servers);
        let id = (0..MAX_NR_IOREQ_SERVERS as IoServId)
            .find(|i| !servers.contains_key(i))
            .ok_or_else(|| op_err(self.domid, op, libc::ENOSPC, "8 ioreq servers exist"))?;
        let hosterr = |source| HvmError::Host {
            domid: self.domid,
            source,
        };
        let pages = MemFile::new(&format!("xensim-d{}-ioreq{id}", self.domid), 2)
            .map_err(|e| hosterr(HostError::Io(e)))?;
        let mut vcpus = Vec::with_capacity(self.nr_vcpus as usize);
        let undo = |vcpus: &Vec<VcpuChannel>| {
            for v in vcpus {
                let _ = host.evtchn_close(self.domid, v.port);
            }
        };
        for _ in 0..self.nr_vcpus {
            match host.evtchn_alloc_unbound(self.domid, emulator) {
                Ok((port, incoming)) => {
                    // Not in the page yet: Xen writes `vp_eport` when the server is enabled
                    // (ioreq_server_enable -> ioreq_server_update_evtchn), see set_state.
                    vcpus.push(VcpuChannel { port, incoming });
                }
                Err(e) => {
                    undo(&vcpus);
                    return Err(hosterr(e));
                }
            }
        }
        let buf_port = if bufioreq == BufIoreq::Off {
            None
        } else {
            match host.evtchn_alloc_unbound(self.domid, emulator) {
                Ok((p, _)) => Some(p),
                Err(e) => {
                    undo(&vcpus);
                    return Err(hosterr(e));
                }
            }
        };
        servers.insert(
            id,
            Arc::new(XenIoreqServer {
                id,
                emulator,
                bufioreq,
                pages,
                vcpus,
                buf_port,
                state: Mutex::new(ServerState::default()),
                buf_lock: Mutex::new(()),
                dead: AtomicBool::new(false),
            }),
        );
        tracing::debug!(domid = self.domid, id, ?bufioreq, "ioreq server created");
        Ok(id)
    }

    /// XEN_DMOP_get_ioreq_server_info. Legacy gfns are not simulated (EOPNOTSUPP).
    pub fn server_info(
        &self,
        caller: DomId,
        id: IoServId,
        want_gfns: bool,
    ) -> Result<ServerInfo, HvmError> {
        let op = "get_ioreq_server_info";
        let s = self.owned(op, caller, id)?;
        if want_gfns {
            return Err(op_err(
                self.domid,
                op,
                libc::EOPNOTSUPP,
                "xensim has no legacy ioreq gfns; map the resource (XEN_DMOP_no_gfns)",
            ));
        }
        Ok(ServerInfo {
            bufioreq_port: s.buf_port.unwrap_or(0),
        })
    }

    /// XEN_DMOP_map_io_range_to_ioreq_server (`type_` is XEN_DMOP_IO_RANGE_*).
    pub fn map_range(
        &self,
        caller: DomId,
        id: IoServId,
        type_: u32,
        start: u64,
        end: u64,
    ) -> Result<(), HvmError> {
        let op = "map_io_range_to_ioreq_server";
        if start > end {
            // XSA-238: argument check instead of an ASSERT.
            return Err(op_err(
                self.domid,
                op,
                libc::EINVAL,
                format!("range {start:#x}..={end:#x} ends before it starts"),
            ));
        }
        let s = self.owned(op, caller, id)?;
        let mut st = lock(&s.state);
        let r = st
            .ranges
            .get_mut(type_ as usize)
            .ok_or_else(|| op_err(self.domid, op, libc::EINVAL, format!("range type {type_}")))?;
        if r.overlaps(start, end) {
            return Err(op_err(
                self.domid,
                op,
                libc::EEXIST,
                format!("range {start:#x}..={end:#x} overlaps one already mapped"),
            ));
        }
        if !r.add(start, end) {
            return Err(op_err(
                self.domid,
                op,
                libc::ENOMEM,
                "range set limit (256) reached",
            ));
        }
        Ok(())
    }

    /// XEN_DMOP_unmap_io_range_from_ioreq_server.
    pub fn unmap_range(
        &self,
        caller: DomId,
        id: IoServId,
        type_: u32,
        start: u64,
        end: u64,
    ) -> Result<(), HvmError> {
        let op = "unmap_io_range_from_ioreq_server";
        if start > end {
            return Err(op_err(
                self.domid,
                op,
                libc::EINVAL,
                "range ends before it starts",
            ));
        }
        let s = self.owned(op, caller, id)?;
        let mut st = lock(&s.state);
        let r = st
            .ranges
            .get_mut(type_ as usize)
            .ok_or_else(|| op_err(self.domid, op, libc::EINVAL, format!("range type {type_}")))?;
        if !r.contains(start, end) {
            return Err(op_err(
                self.domid,
                op,
                libc::ENOENT,
                format!("range {start:#x}..={end:#x} is not mapped"),
            ));
        }
        r.remove(start, end);
        Ok(())
    }

    /// XEN_DMOP_set_ioreq_server_state.
    pub fn set_state(&self, caller: DomId, id: IoServId, enabled: bool) -> Result<(), HvmError> {
        let s = self.owned("set_ioreq_server_state", caller, id)?;
        if enabled {
            // ioreq_server_enable -> ioreq_server_update_evtchn: only now does the device
            // model find each vCPU's port in its slot (a DM that reads it before enabling
            // the server reads 0, as on Xen).
            for (v, ch) in s.vcpus.iter().enumerate() {
                let slot = SYNC_PAGE_OFFSET + v * IOREQ_SIZE;
                let _ = s
                    .pages
                    .mem()
                    .store_u32(slot + 24, ch.port, Ordering::Release);
            }
        }
        lock(&s.state).enabled = enabled;
        Ok(())
    }

    /// XEN_DMOP_destroy_ioreq_server: disables it, closes its event channels; a vCPU waiting
    /// on it completes (reads all ones), as when Xen sees STATE_IOREQ_NONE.
    pub fn destroy_server(&self, host: &Host, caller: DomId, id: IoServId) -> Result<(), HvmError> {
        let s = self.owned("destroy_ioreq_server", caller, id)?;
        lock(&self.servers).remove(&id);
        self.teardown(host, &s);
        Ok(())
    }

    fn teardown(&self, host: &Host, s: &XenIoreqServer) {
        lock(&s.state).enabled = false;
        s.dead.store(true, Ordering::SeqCst);
        for v in &s.vcpus {
            let _ = v.incoming.signal();
            let _ = host.evtchn_close(self.domid, v.port);
        }
        if let Some(p) = s.buf_port {
            let _ = host.evtchn_close(self.domid, p);
        }
    }

    /// Destroys every server (the domain is dying).
    pub(crate) fn destroy_all(&self, host: &Host) {
        let all: Vec<_> = std::mem::take(&mut *lock(&self.servers))
            .into_values()
            .collect();
        for s in all {
            self.teardown(host, &s);
        }
    }

    /// XENMEM_acquire_resource of an ioreq server: a new descriptor of its pages and the
    /// checked frame range (frame 0 = buffered page, ENOENT without one; frame 1 = the
    /// synchronous page; anything else EINVAL).
    pub fn resource_fd(
        &self,
        caller: DomId,
        id: IoServId,
        frame: u64,
        nr_frames: u64,
    ) -> Result<std::os::fd::OwnedFd, HvmError> {
        let op = "acquire_resource(ioreq_server)";
        let s = self.owned(op, caller, id)?;
        let last = frame
            .checked_add(nr_frames)
            .filter(|_| nr_frames > 0)
            .ok_or_else(|| op_err(self.domid, op, libc::EINVAL, "bad frame range"))?;
        if last > 2 {
            return Err(op_err(
                self.domid,
                op,
                libc::EINVAL,
                format!("frames {frame}..{last}: an ioreq server has frames 0 and 1"),
            ));
        }
        if frame == XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ && s.bufioreq == BufIoreq::Off {
            return Err(op_err(
                self.domid,
                op,
                libc::ENOENT,
                "the server has no buffered ioreq page",
            ));
        }
        s.pages
            .fd()
            .try_clone_to_owned()
            .map_err(|e| HvmError::Host {
                domid: self.domid,
                source: HostError::Io(e),
            })
    }

    /// Maps the resource frames in this process (what the daemon's client does with the fd).
    pub fn map_resource(
        &self,
        caller: DomId,
        id: IoServId,
        frame: u64,
        nr_frames: u64,
    ) -> Result<SharedMem, HvmError> {
        let fd = self.resource_fd(caller, id, frame, nr_frames)?;
        let hosterr = |e| HvmError::Host {
            domid: self.domid,
            source: HostError::Io(e),
        };
        let frames: Vec<u64> = (frame..frame + nr_frames).collect();
        mem::map_frames(std::os::fd::AsFd::as_fd(&fd), &frames, true).map_err(hosterr)
    }

    // ------------------------------------------------------------ interrupts

    fn raise(&self, irq: Irq) {
        lock(&self.irqs).push_back(irq);
        self.irq_cv.notify_all();
    }

    /// XEN_DMOP_remote_shutdown (dm.c: `domain_shutdown(d, reason)`): recorded for the
    /// toolstack; the domain is not destroyed here, as Xen leaves that to the toolstack's
    /// `on_poweroff` handling.
    pub fn remote_shutdown(&self, reason: u32) -> Result<(), HvmError> {
        let mut s = lock(&self.shutdown);
        if s.is_none() {
            *s = Some(reason);
        }
        Ok(())
    }

    /// The reason the domain was shut down with (XEN_DMOP_remote_shutdown), if it was.
    pub fn shutdown_reason(&self) -> Option<u32> {
        *lock(&self.shutdown)
    }

    /// XEN_DMOP_set_isa_irq_level (dm.c: irq <= 15, level 0 or 1).
    pub fn set_isa_irq_level(&self, irq: u8, level: u8) -> Result<(), HvmError> {
        if irq > 15 || level > 1 {
            return Err(op_err(
                self.domid,
                "set_isa_irq_level",
                libc::EINVAL,
                format!("irq {irq} level {level}"),
            ));
        }
        self.raise(Irq::Isa {
            irq,
            level: level == 1,
        });
        Ok(())
    }

    /// XEN_DMOP_set_pci_intx_level (dm.c: segment 0, bus 0, device <= 31, INTx <= 3,
    /// level 0 or 1).
    pub fn set_pci_intx_level(
        &self,
        seg: u16,
        bus: u8,
        dev: u8,
        intx: u8,
        level: u8,
    ) -> Result<(), HvmError> {
        if seg != 0 || bus != 0 || dev > 0x1f || intx > 3 || level > 1 {
            return Err(op_err(
                self.domid,
                "set_pci_intx_level",
                libc::EINVAL,
                format!("{seg:04x}:{bus:02x}:{dev:02x} INT{intx} level {level}"),
            ));
        }
        self.raise(Irq::PciIntx {
            bus,
            dev,
            intx,
            level: level == 1,
        });
        Ok(())
    }

    /// XEN_DMOP_inject_msi.
    pub fn inject_msi(&self, addr: u64, data: u32) -> Result<(), HvmError> {
        self.raise(Irq::Msi { addr, data });
        Ok(())
    }

    /// Interrupts raised since the last call.
    pub fn take_irqs(&self) -> Vec<Irq> {
        lock(&self.irqs).drain(..).collect()
    }

    /// Waits until an interrupt is pending or `timeout` passes.
    pub fn wait_irq(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.irqs);
        while q.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = match self.irq_cv.wait_timeout(q, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// Selects the server for an access (`hvm_select_ioreq_server`): turns a config-data
    /// access at 0xcfc..0xcff with CF8 enabled into IOREQ_TYPE_PCI_CONFIG (SBDF in the high
    /// 32 bits of `addr`), then picks the first enabled server, highest id first, whose
    /// ranges contain the whole access (for memory, all `count` elements in the DF
    /// direction).
    pub(crate) fn select(&self, p: &mut Ioreq) -> Option<Arc<XenIoreqServer>> {
        let servers = lock(&self.servers);
        if servers.is_empty() {
            return None;
        }
        let cf8 = self.pci_cf8.load(Ordering::Acquire);
        let (type_, addr) =
            if p.type_ == IOREQ_TYPE_PIO && (p.addr & !3) == 0xcfc && cf8 & 0x8000_0000 != 0 {
                // hvm_pci_decode_addr: bus and devfn from CF8, register = CF8[7:2] | port[1:0].
                let sbdf = u64::from((cf8 >> 8) & 0xffff);
                let reg = u64::from(cf8 & 0xfc) | (p.addr & 3);
                (XEN_DMOP_IO_RANGE_PCI, (sbdf << 32) | reg)
            } else if p.type_ == IOREQ_TYPE_PIO {
                (XEN_DMOP_IO_RANGE_PORT, p.addr)
            } else {
                (XEN_DMOP_IO_RANGE_MEMORY, p.addr)
            };
        for s in servers.values().rev() {
            let st = lock(&s.state);
            if !st.enabled {
                continue;
            }
            let hit = match type_ {
                XEN_DMOP_IO_RANGE_PORT => {
                    let end = addr.wrapping_add(u64::from(p.size)).wrapping_sub(1);
                    st.ranges[0].contains(addr, end)
                }
                XEN_DMOP_IO_RANGE_MEMORY => {
                    // ioreq_mmio_first_byte / ioreq_mmio_last_byte: a rep with DF set runs
                    // downwards from `addr`.
                    let size = u64::from(p.size);
                    let back = u64::from(p.count.saturating_sub(1)).wrapping_mul(size);
                    let (first, last) = if p.df() {
                        (
                            addr.wrapping_sub(back),
                            addr.wrapping_add(size).wrapping_sub(1),
                        )
                    } else {
                        let span = size.wrapping_mul(u64::from(p.count));
                        (addr, addr.wrapping_add(span).wrapping_sub(1))
                    };
                    first <= last && st.ranges[1].contains(first, last)
                }
                _ => {
                    let sbdf = addr >> 32;
                    if st.ranges[2].contains(sbdf, sbdf) {
                        p.type_ = IOREQ_TYPE_PCI_CONFIG;
                        p.addr = addr;
                        true
                    } else {
                        false
                    }
                }
            };
            if hit {
                return Some(s.clone());
            }
        }
        None
    }
}

//! A vCPU of an HVM domain issuing ioreqs as Xen does (`ioreq_send`, `ioreq_send_buffered`,
//! `wait_for_io`), and [`HvmGuest`], the [`HvmBus`] a guest OS test library drives.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::abi::ioreq::*;
use xen::{BufIoreq as BufMode, DomId, IoServId, SharedMem, PAGE_SIZE};

use super::domain::{lock, HvmDomain, HvmError, XenIoreqServer, SYNC_PAGE_OFFSET};
use super::{HvmBus, Irq};
use crate::host::Host;

/// How long a vCPU waits for a device model before giving up (Xen waits forever).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a buffered write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufSpace {
    /// Port I/O.
    Port,
    /// MMIO (below 1 MiB: the buffered slot has a 20-bit address).
    Mmio,
}

/// What happened to a buffered write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Went into a server's buffered ring.
    Buffered,
    /// Could not be buffered (no ring, ring full, address above 1 MiB); sent synchronously.
    Synchronous,
    /// No server claims it; dropped.
    Unclaimed,
}

fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// One ioreq as a vCPU issues it (before Xen selects a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuIo {
    /// IOREQ_TYPE_PIO or IOREQ_TYPE_COPY.
    pub type_: u8,
    /// Port or guest-physical address.
    pub addr: u64,
    /// Value (writes), or the guest-physical buffer address when `data_is_ptr`.
    pub data: u64,
    /// Repeat count (1 for a single access).
    pub count: u32,
    /// Bytes per access.
    pub size: u32,
    /// IOREQ_READ or IOREQ_WRITE.
    pub dir: u8,
    /// Decreasing addresses (string ops with EFLAGS.DF set).
    pub df: bool,
    /// `data` is a guest-physical address.
    pub data_is_ptr: bool,
}

impl VcpuIo {
    fn to_ioreq(self) -> Ioreq {
        Ioreq {
            addr: self.addr,
            data: self.data,
            count: self.count,
            size: self.size,
            vp_eport: 0,
            _pad0: 0,
            bits: Ioreq::make_bits(STATE_IOREQ_NONE, self.data_is_ptr, self.dir, self.df),
            type_: self.type_,
        }
    }
}

/// Posts `p` into vCPU `vcpu`'s slot of `s` (ioreq_send, synchronous part).
fn post(
    dom: &HvmDomain,
    host: &Host,
    s: &XenIoreqServer,
    vcpu: u32,
    p: &Ioreq,
) -> Result<(), HvmError> {
    let page = s.pages();
    let slot = SYNC_PAGE_OFFSET + vcpu as usize * IOREQ_SIZE;
    let ram = |source| HvmError::Ram {
        domid: dom.domid,
        source,
    };
    let state = page
        .load_u8(slot + IOREQ_STATE_OFFSET, Ordering::Acquire)
        .map_err(ram)?
        & 0xf;
    if state != STATE_IOREQ_NONE {
        return Err(dom.crash(format!(
            "device model set odd IO state {state} in vcpu{vcpu}'s slot of server {}",
            s.id
        )));
    }
    let ch = s.vcpus.get(vcpu as usize).ok_or_else(|| HvmError::Op {
        domid: dom.domid,
        op: "ioreq_send",
        why: format!("no vcpu{vcpu}"),
        errno: libc::EINVAL,
    })?;
    let mut q = *p;
    q.vp_eport = ch.port;
    q.set_state(STATE_IOREQ_NONE);
    page.write_obj(slot, &q).map_err(ram)?;
    // smp_wmb(): the request is visible before its state says READY.
    fence(Ordering::Release);
    q.set_state(STATE_IOREQ_READY);
    page.store_u8(slot + IOREQ_STATE_OFFSET, q.bits, Ordering::Release)
        .map_err(ram)?;
    host.evtchn_send(dom.domid, ch.port)
        .map_err(|source| HvmError::Host {
            domid: dom.domid,
            source,
        })
}

/// Waits for vCPU `vcpu`'s request on `s` to complete (`wait_for_io`): the state may only
/// move forward (XSA-262); IORESP_READY hands back `data` and frees the slot.
fn wait(
    dom: &HvmDomain,
    s: &XenIoreqServer,
    vcpu: u32,
    spin: Duration,
    timeout: Duration,
) -> Result<u64, HvmError> {
    let page = s.pages();
    let slot = SYNC_PAGE_OFFSET + vcpu as usize * IOREQ_SIZE;
    let ram = |source| HvmError::Ram {
        domid: dom.domid,
        source,
    };
    let incoming = &s.vcpus[vcpu as usize].incoming;
    let start = Instant::now();
    let mut prev = STATE_IOREQ_READY;
    loop {
        let bits = page
            .load_u8(slot + IOREQ_STATE_OFFSET, Ordering::Acquire)
            .map_err(ram)?;
        let state = bits & 0xf;
        if s.dead.load(Ordering::Acquire) || state == STATE_IOREQ_NONE {
            // The emulator is dying: complete with all ones.
            return Ok(u64::MAX);
        }
        if state < prev {
            return Err(dom.crash(format!(
                "weird HVM ioreq state transition {prev} -> {state} (vcpu{vcpu}, server {})",
                s.id
            )));
        }
        match state {
            STATE_IORESP_READY => {
                let data = page.load_u64(slot + 8, Ordering::Acquire).map_err(ram)?;
                page.store_u8(slot + IOREQ_STATE_OFFSET, bits & 0xf0, Ordering::Release)
                    .map_err(ram)?;
                return Ok(data);
            }
            STATE_IOREQ_READY | STATE_IOREQ_INPROCESS => {
                prev = state;
                let waited = start.elapsed();
                if waited < spin {
                    std::thread::yield_now();
                    continue;
                }
                if waited >= timeout {
                    return Err(HvmError::Timeout {
                        domid: dom.domid,
                        vcpu,
                        id: s.id,
                        timeout,
                    });
                }
                let left = (timeout - waited).min(Duration::from_millis(100));
                let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(100);
                let mut fds = [PollFd::new(
                    std::os::fd::AsFd::as_fd(&**incoming),
                    PollFlags::POLLIN,
                )];
                let _ = poll(&mut fds, PollTimeout::from(ms));
                let _ = incoming.take();
            }
            other => {
                return Err(dom.crash(format!(
                    "weird HVM iorequest state {other} (vcpu{vcpu}, server {})",
                    s.id
                )))
            }
        }
    }
}

/// Posts a buffered write into `s`'s ring (`ioreq_send_buffered`); false if it cannot be
/// buffered (no ring, address above 20 bits, size not 1/2/4/8, ring full).
fn post_buffered(
    dom: &HvmDomain,
    host: &Host,
    s: &XenIoreqServer,
    p: &Ioreq,
) -> Result<bool, HvmError> {
    if s.bufioreq == BufMode::Off || p.addr > 0xf_ffff || p.data_is_ptr() || p.dir() != IOREQ_WRITE
    {
        return Ok(false);
    }
    let size = match p.size {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        _ => return Ok(false),
    };
    let qw = size == 3;
    let pg = s.pages();
    let ram = |source| HvmError::Ram {
        domid: dom.domid,
        source,
    };
    let _g = lock(&s.buf_lock);
    let rp = pg
        .load_u32(BUFIOREQ_READ_POINTER_OFFSET, Ordering::Acquire)
        .map_err(ram)?;
    let wp = pg
        .load_u32(BUFIOREQ_WRITE_POINTER_OFFSET, Ordering::Relaxed)
        .map_err(ram)?;
    if wp.wrapping_sub(rp) >= IOREQ_BUFFER_SLOT_NUM - u32::from(qw) {
        return Ok(false);
    }
    let bp = BufIoreq::make(p.type_, 0, IOREQ_WRITE, size, p.addr as u32, p.data as u32);
    pg.write_obj(buf_ioreq_slot_offset(wp), &bp).map_err(ram)?;
    if qw {
        let hi = BufIoreq::make(
            p.type_,
            0,
            IOREQ_WRITE,
            size,
            p.addr as u32,
            (p.data >> 32) as u32,
        );
        pg.write_obj(buf_ioreq_slot_offset(wp.wrapping_add(1)), &hi)
            .map_err(ram)?;
    }
    // smp_wmb(): the slots are visible before the write pointer.
    fence(Ordering::Release);
    pg.store_u32(
        BUFIOREQ_WRITE_POINTER_OFFSET,
        wp.wrapping_add(if qw { 2 } else { 1 }),
        Ordering::Release,
    )
    .map_err(ram)?;
    if s.bufioreq == BufMode::Atomic {
        // Canonicalise both pointers with one 64-bit cmpxchg once read_pointer passes the
        // slot count, so they never overflow.
        let mut tries = u32::from(qw);
        loop {
            tries += 1;
            if tries >= IOREQ_BUFFER_SLOT_NUM {
                break;
            }
            let full = pg.load_u64(0, Ordering::Acquire).map_err(ram)?;
            let (r, w) = (full as u32, (full >> 32) as u32);
            if r < IOREQ_BUFFER_SLOT_NUM {
                break;
            }
            let n = r / IOREQ_BUFFER_SLOT_NUM;
            let new = u64::from(r - n * IOREQ_BUFFER_SLOT_NUM)
                | (u64::from(w.wrapping_sub(n * IOREQ_BUFFER_SLOT_NUM)) << 32);
            let _ = pg.cmpxchg_u64(0, full, new);
        }
    }
    if let Some(port) = s.buf_port {
        host.evtchn_send(dom.domid, port)
            .map_err(|source| HvmError::Host {
                domid: dom.domid,
                source,
            })?;
    }
    Ok(true)
}

/// A vCPU of an HVM guest: everything a guest OS does that reaches its device model.
#[derive(Debug)]
pub struct HvmGuest {
    host: Arc<Host>,
    dom: Arc<HvmDomain>,
    vcpu: u32,
    ram: SharedMem,
    spin: Duration,
    timeout: Duration,
}

impl HvmGuest {
    /// vCPU `vcpu` of HVM domain `domid`.
    pub fn new(host: Arc<Host>, domid: DomId, vcpu: u32) -> Result<HvmGuest, HvmError> {
        let dom = host.hvm_domain(domid).ok_or_else(|| HvmError::Op {
            domid,
            op: "hvm guest",
            why: "not an HVM domain".into(),
            errno: libc::ESRCH,
        })?;
        if vcpu >= dom.nr_vcpus() {
            return Err(HvmError::Op {
                domid,
                op: "hvm guest",
                why: format!("no vcpu{vcpu} (the domain has {})", dom.nr_vcpus()),
                errno: libc::EINVAL,
            });
        }
        let ram = host
            .map_ram(domid)
            .map_err(|source| HvmError::Host { domid, source })?;
        Ok(HvmGuest {
            host,
            dom,
            vcpu,
            ram,
            spin: Duration::ZERO,
            timeout: DEFAULT_IO_TIMEOUT,
        })
    }

    /// Another vCPU of the same guest.
    pub fn vcpu(&self, vcpu: u32) -> Result<HvmGuest, HvmError> {
        let mut g = HvmGuest::new(self.host.clone(), self.dom.domid(), vcpu)?;
        g.spin = self.spin;
        g.timeout = self.timeout;
        Ok(g)
    }

    /// Busy-polls the slot this long before blocking on the event channel.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// How long to wait for a device model (Xen waits forever; tests must not).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The domain.
    pub fn domain(&self) -> &Arc<HvmDomain> {
        &self.dom
    }

    /// This vCPU's index.
    pub fn vcpu_id(&self) -> u32 {
        self.vcpu
    }

    fn check_alive(&self) -> Result<(), HvmError> {
        match self.dom.crashed() {
            Some(why) => Err(HvmError::Crashed {
                domid: self.dom.domid(),
                why,
            }),
            None => Ok(()),
        }
    }

    /// Issues one ioreq as the vCPU's emulator does (`hvmemul_do_io` -> `ioreq_send`) and
    /// returns `data` as the vCPU sees it (reads of unclaimed addresses give all ones; a
    /// `data_is_ptr` read of nobody's range fills the buffer with ones).
    pub fn issue(&self, io: VcpuIo) -> Result<u64, HvmError> {
        self.check_alive()?;
        let _busy = lock(&self.dom.vcpu_locks[self.vcpu as usize]);
        if io.type_ == IOREQ_TYPE_PIO
            && io.addr == 0xcf8
            && io.size == 4
            && io.dir == IOREQ_WRITE
            && !io.data_is_ptr
        {
            // hvm_access_cf8 latches the address, then falls through to the ioreq servers.
            self.dom.pci_cf8.store(io.data as u32, Ordering::Release);
        }
        let mut p = io.to_ioreq();
        match self.dom.select(&mut p) {
            Some(s) => {
                post(&self.dom, &self.host, &s, self.vcpu, &p)?;
                wait(&self.dom, &s, self.vcpu, self.spin, self.timeout)
            }
            None => self.unclaimed(&io),
        }
    }

    fn unclaimed(&self, io: &VcpuIo) -> Result<u64, HvmError> {
        if io.dir == IOREQ_READ && io.data_is_ptr {
            let len = u64::from(io.size) * u64::from(io.count);
            let start = if io.df {
                io.data
                    .wrapping_sub(u64::from(io.count.saturating_sub(1)) * u64::from(io.size))
            } else {
                io.data
            };
            self.ram
                .fill(start as usize, len as usize, 0xff)
                .map_err(|source| HvmError::Ram {
                    domid: self.dom.domid(),
                    source,
                })?;
        }
        Ok(u64::MAX)
    }

    /// Posts `ioreq` as-is (state forced to READY) into this vCPU's slot of server `id` and
    /// waits for the answer, bypassing range selection: what a buggy hypervisor, or a guest
    /// that can write an ioreq page, would make the device model see. For hostile tests.
    pub fn send_raw(&self, id: IoServId, ioreq: Ioreq) -> Result<u64, HvmError> {
        self.check_alive()?;
        let _busy = lock(&self.dom.vcpu_locks[self.vcpu as usize]);
        let s = self.dom.server(id).ok_or_else(|| HvmError::Op {
            domid: self.dom.domid(),
            op: "send_raw",
            why: format!("no ioreq server {id}"),
            errno: libc::ENOENT,
        })?;
        post(&self.dom, &self.host, &s, self.vcpu, &ioreq)?;
        wait(&self.dom, &s, self.vcpu, self.spin, self.timeout)
    }

    /// A write Xen sends through the buffered ring when it can (as it does for the VGA
    /// window and other posted writes); 8-byte values take two slots. Falls back to a
    /// synchronous ioreq when the write cannot be buffered, as Xen's callers do.
    pub fn buffered_write(
        &self,
        space: BufSpace,
        addr: u64,
        size: u8,
        value: u64,
    ) -> Result<Posted, HvmError> {
        self.check_alive()?;
        let io = VcpuIo {
            type_: match space {
                BufSpace::Port => IOREQ_TYPE_PIO,
                BufSpace::Mmio => IOREQ_TYPE_COPY,
            },
            addr,
            data: value,
            count: 1,
            size: u32::from(size),
            dir: IOREQ_WRITE,
            df: false,
            data_is_ptr: false,
        };
        let mut p = io.to_ioreq();
        let Some(s) = self.dom.select(&mut p) else {
            return Ok(Posted::Unclaimed);
        };
        if post_buffered(&self.dom, &self.host, &s, &p)? {
            return Ok(Posted::Buffered);
        }
        self.issue(io).map(|_| Posted::Synchronous)
    }

    fn broadcast(&self, p: &Ioreq, buffered: bool) -> Result<usize, HvmError> {
        self.check_alive()?;
        let _busy = lock(&self.dom.vcpu_locks[self.vcpu as usize]);
        let mut failed = 0;
        let mut posted = Vec::new();
        for s in self.dom.servers_rev() {
            if !s.enabled() {
                continue;
            }
            if buffered {
                if !post_buffered(&self.dom, &self.host, &s, p)? {
                    failed += 1;
                }
            } else {
                post(&self.dom, &self.host, &s, self.vcpu, p)?;
                posted.push(s);
            }
        }
        for s in posted {
            wait(&self.dom, &s, self.vcpu, self.spin, self.timeout)?;
        }
        Ok(failed)
    }

    /// `send_invalidate_req`: IOREQ_TYPE_INVALIDATE to every enabled server, synchronously
    /// (Xen sends it after the guest gave memory back, e.g. decrease_reservation).
    pub fn mapcache_invalidate(&self) -> Result<(), HvmError> {
        let p = Ioreq {
            data: u64::MAX,
            count: 1,
            size: 4,
            bits: Ioreq::make_bits(STATE_IOREQ_NONE, false, IOREQ_WRITE, false),
            type_: IOREQ_TYPE_INVALIDATE,
            ..Default::default()
        };
        self.broadcast(&p, false).map(drop)
    }

    /// `send_timeoffset_req`: IOREQ_TYPE_TIMEOFFSET through every buffered ring (8 bytes,
    /// two slots). Returns how many servers could not take it.
    pub fn time_offset(&self, offset: i64) -> Result<usize, HvmError> {
        let p = Ioreq {
            data: offset as u64,
            count: 1,
            size: 8,
            bits: Ioreq::make_bits(STATE_IOREQ_NONE, false, IOREQ_WRITE, false),
            type_: IOREQ_TYPE_TIMEOFFSET,
            ..Default::default()
        };
        self.broadcast(&p, true)
    }

    fn single(&self, type_: u8, addr: u64, size: u8, dir: u8, data: u64) -> Result<u64, HvmError> {
        let size = u32::from(size);
        let v = self.issue(VcpuIo {
            type_,
            addr,
            data,
            count: 1,
            size,
            dir,
            df: false,
            data_is_ptr: false,
        })?;
        Ok(v & mask(size))
    }

    /// `rep ins`: `count` reads of `size` bytes from `port` into guest RAM at `gpa`
    /// (downwards when `df`).
    pub fn rep_ins(
        &self,
        port: u16,
        size: u8,
        count: u32,
        gpa: u64,
        df: bool,
    ) -> Result<(), HvmError> {
        self.rep(
            IOREQ_TYPE_PIO,
            u64::from(port),
            size,
            count,
            gpa,
            df,
            IOREQ_READ,
        )
    }

    /// `rep outs`: `count` writes of `size` bytes to `port` from guest RAM at `gpa`.
    pub fn rep_outs(
        &self,
        port: u16,
        size: u8,
        count: u32,
        gpa: u64,
        df: bool,
    ) -> Result<(), HvmError> {
        self.rep(
            IOREQ_TYPE_PIO,
            u64::from(port),
            size,
            count,
            gpa,
            df,
            IOREQ_WRITE,
        )
    }

    /// `rep movs` between MMIO at `mmio` and guest RAM at `gpa`; `dir` IOREQ_READ moves
    /// from MMIO into RAM.
    #[allow(clippy::too_many_arguments)]
    pub fn rep_movs_mmio(
        &self,
        mmio: u64,
        size: u8,
        count: u32,
        gpa: u64,
        df: bool,
        dir: u8,
    ) -> Result<(), HvmError> {
        self.rep(IOREQ_TYPE_COPY, mmio, size, count, gpa, df, dir)
    }

    #[allow(clippy::too_many_arguments)]
    fn rep(
        &self,
        type_: u8,
        addr: u64,
        size: u8,
        count: u32,
        gpa: u64,
        df: bool,
        dir: u8,
    ) -> Result<(), HvmError> {
        // As Xen's emulator: each ioreq carries at most 4096 repetitions and stays within one
        // page of the guest buffer (hvmemul_linear_to_phys); the instruction is resumed for
        // the rest.
        let step = u64::from(size);
        if step == 0 {
            return Err(HvmError::Op {
                domid: self.dom.domid(),
                op: "rep",
                why: "size 0".into(),
                errno: libc::EINVAL,
            });
        }
        let (mut addr, mut gpa, mut left) = (addr, gpa, count);
        while left > 0 {
            let off = gpa & (PAGE_SIZE as u64 - 1);
            let in_page = if df {
                off / step + 1
            } else {
                ((PAGE_SIZE as u64 - off) / step).max(1)
            };
            let n = in_page.min(u64::from(left)).min(4096) as u32;
            self.issue(VcpuIo {
                type_,
                addr,
                data: gpa,
                count: n,
                size: u32::from(size),
                dir,
                df,
                data_is_ptr: true,
            })?;
            let moved = u64::from(n) * step;
            gpa = if df {
                gpa.wrapping_sub(moved)
            } else {
                gpa.wrapping_add(moved)
            };
            if type_ == IOREQ_TYPE_COPY {
                addr = if df {
                    addr.wrapping_sub(moved)
                } else {
                    addr.wrapping_add(moved)
                };
            }
            left -= n;
        }
        Ok(())
    }
}

fn check_size(domid: DomId, size: u8, max: u8) -> Result<(), HvmError> {
    if matches!(size, 1 | 2 | 4 | 8) && size <= max {
        Ok(())
    } else {
        Err(HvmError::Op {
            domid,
            op: "access",
            why: format!("an x86 access is 1, 2, 4 (or 8 for memory) bytes, not {size}"),
            errno: libc::EINVAL,
        })
    }
}

impl HvmBus for HvmGuest {
    type Error = HvmError;

    fn pio_read(&self, port: u16, size: u8) -> Result<u32, HvmError> {
        check_size(self.dom.domid(), size, 4)?;
        Ok(self.single(IOREQ_TYPE_PIO, u64::from(port), size, IOREQ_READ, 0)? as u32)
    }

    fn pio_write(&self, port: u16, size: u8, value: u32) -> Result<(), HvmError> {
        check_size(self.dom.domid(), size, 4)?;
        let v = u64::from(value) & mask(u32::from(size));
        self.single(IOREQ_TYPE_PIO, u64::from(port), size, IOREQ_WRITE, v)
            .map(drop)
    }

    fn mmio_read(&self, gpa: u64, size: u8) -> Result<u64, HvmError> {
        check_size(self.dom.domid(), size, 8)?;
        self.single(IOREQ_TYPE_COPY, gpa, size, IOREQ_READ, 0)
    }

    fn mmio_write(&self, gpa: u64, size: u8, value: u64) -> Result<(), HvmError> {
        check_size(self.dom.domid(), size, 8)?;
        let v = value & mask(u32::from(size));
        self.single(IOREQ_TYPE_COPY, gpa, size, IOREQ_WRITE, v)
            .map(drop)
    }

    fn ram_size(&self) -> u64 {
        self.ram.len() as u64
    }

    fn ram_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HvmError> {
        let at = usize::try_from(gpa).unwrap_or(usize::MAX);
        self.ram.read(at, buf).map_err(|source| HvmError::Ram {
            domid: self.dom.domid(),
            source,
        })
    }

    fn ram_write(&self, gpa: u64, data: &[u8]) -> Result<(), HvmError> {
        let at = usize::try_from(gpa).unwrap_or(usize::MAX);
        self.ram.write(at, data).map_err(|source| HvmError::Ram {
            domid: self.dom.domid(),
            source,
        })
    }

    fn take_irqs(&self) -> Vec<Irq> {
        self.dom.take_irqs()
    }

    fn wait_irq(&self, timeout: Duration) -> bool {
        self.dom.wait_irq(timeout)
    }
}

const _: () = assert!(PAGE_SIZE == 4096);

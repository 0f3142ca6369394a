//! Handling one copied ioreq: decode, split rep transfers into single accesses to the
//! [`IoHandler`], move `data_is_ptr` data through guest RAM, and log what is wrong at a
//! rate limit. No shared memory is touched here except guest RAM through [`GuestMemory`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xen::abi::ioreq::{Ioreq, IOREQ_READ};
use xen::{DomId, IoServId};

use crate::decode::{decode_in, Data, Dir, Request, Transfer};
use crate::guestmem::GuestMemory;
use crate::handler::{IoAccess, IoHandler};
use crate::ratelimit::RateLimit;

/// Counters of one ioreq server (lock-free; read them any time).
#[derive(Debug, Default)]
pub struct IoreqStats {
    /// Synchronous ioreqs completed.
    pub sync: AtomicU64,
    /// Buffered ioreqs consumed.
    pub buffered: AtomicU64,
    /// Single accesses handed to the handler.
    pub accesses: AtomicU64,
    /// Malformed ioreqs (completed without touching a device).
    pub bad: AtomicU64,
    /// Accesses no device claimed.
    pub unclaimed: AtomicU64,
    /// Guest RAM failures in `data_is_ptr` transfers.
    pub ram_errors: AtomicU64,
    /// INVALIDATE requests.
    pub invalidates: AtomicU64,
    /// Log lines suppressed by the rate limit.
    pub suppressed_logs: AtomicU64,
    /// Requests whose device panicked (answered with all ones; the server goes on).
    pub handler_panics: AtomicU64,
    /// Requests the periodic sweep found waiting with no event received for them (a lost or
    /// late notification; served then).
    pub missed_events: AtomicU64,
    /// Answers the vCPU had not taken by the next sweep: its port was notified again.
    pub renotified: AtomicU64,
    /// Sweeps made (one per `SWEEP_INTERVAL` without events).
    pub sweeps: AtomicU64,
}

fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(size) * 8)) - 1
    }
}

/// The per-server request handler (owned by the ioreq thread).
#[derive(Debug)]
pub struct Dispatcher {
    domid: DomId,
    id: IoServId,
    mem: GuestMemory,
    stats: Arc<IoreqStats>,
    bad_log: RateLimit,
    unclaimed_log: RateLimit,
    ram_log: RateLimit,
}

impl Dispatcher {
    /// A dispatcher for server `id` of `domid`, reaching guest RAM through `mem`.
    pub fn new(domid: DomId, id: IoServId, mem: GuestMemory, stats: Arc<IoreqStats>) -> Self {
        Dispatcher {
            domid,
            id,
            mem,
            stats,
            bad_log: RateLimit::default(),
            unclaimed_log: RateLimit::default(),
            ram_log: RateLimit::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<IoreqStats> {
        &self.stats
    }

    /// The guest memory cache.
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn suppressed(&self) {
        let n =
            self.bad_log.suppressed() + self.unclaimed_log.suppressed() + self.ram_log.suppressed();
        self.stats.suppressed_logs.store(n, Ordering::Relaxed);
    }

    /// Handles one snapshot of an ioreq and returns the `data` to write back. Never fails:
    /// a malformed request is logged (rate-limited) and answered (reads: all ones).
    pub fn handle(&mut self, req: &Ioreq, handler: &mut dyn IoHandler) -> u64 {
        match decode_in(req, self.mem.layout()) {
            Err(bad) => {
                self.stats.bad.fetch_add(1, Ordering::Relaxed);
                match self.bad_log.check() {
                    Some(suppressed) => tracing::warn!(
                        domid = self.domid,
                        server = self.id,
                        type_ = req.type_,
                        addr = req.addr,
                        size = req.size,
                        count = req.count,
                        suppressed,
                        "malformed ioreq answered without a device: {bad}"
                    ),
                    None => self.suppressed(),
                }
                if req.dir() == IOREQ_READ && !req.data_is_ptr() {
                    u64::MAX
                } else {
                    req.data
                }
            }
            Ok(Request::Invalidate) => {
                self.stats.invalidates.fetch_add(1, Ordering::Relaxed);
                self.mem.invalidate();
                handler.invalidate();
                req.data
            }
            Ok(Request::TimeOffset(off)) => {
                handler.time_offset(off);
                req.data
            }
            Ok(Request::Access(t)) => {
                // A device bug must not take the ioreq thread (and every vCPU) down with it.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.transfer(&t, req.data, handler)
                }));
                r.unwrap_or_else(|_| {
                    self.stats.handler_panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        domid = self.domid,
                        server = self.id,
                        access = ?t,
                        "the device panicked serving this access; answered with all ones"
                    );
                    u64::MAX
                })
            }
        }
    }

    fn unclaimed(&mut self, access: &IoAccess, write: bool) {
        self.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
        match self.unclaimed_log.check() {
            Some(suppressed) => tracing::debug!(
                domid = self.domid,
                server = self.id,
                space = ?access.space,
                addr = access.addr,
                size = access.size,
                write,
                suppressed,
                "access to no device (reads give all ones, writes are dropped)"
            ),
            None => self.suppressed(),
        }
    }

    fn ram_error(&mut self, e: &crate::guestmem::GuestMemError) {
        self.stats.ram_errors.fetch_add(1, Ordering::Relaxed);
        match self.ram_log.check() {
            Some(suppressed) => tracing::warn!(
                domid = self.domid,
                server = self.id,
                suppressed,
                "rep transfer stopped: {e}"
            ),
            None => self.suppressed(),
        }
    }

    fn transfer(&mut self, t: &Transfer, raw_data: u64, handler: &mut dyn IoHandler) -> u64 {
        let size = t.size;
        let n = usize::from(size);
        let mut value = match t.data {
            Data::Value(v) => v,
            Data::Ptr(_) => raw_data,
        };
        for i in 0..t.count {
            let access = IoAccess {
                space: t.space,
                addr: t.element_addr(i),
                size,
            };
            self.stats.accesses.fetch_add(1, Ordering::Relaxed);
            match t.dir {
                Dir::Read => {
                    let v = match handler.read(access) {
                        Some(v) => v,
                        None => {
                            self.unclaimed(&access, false);
                            u64::MAX
                        }
                    } & mask(size);
                    match t.element_buf(i) {
                        Some(gpa) => {
                            let bytes = v.to_le_bytes();
                            if let Err(e) = self.mem.write(gpa, bytes.get(..n).unwrap_or(&bytes)) {
                                self.ram_error(&e);
                                break;
                            }
                        }
                        None => value = v,
                    }
                }
                Dir::Write => {
                    let v = match t.element_buf(i) {
                        Some(gpa) => {
                            let mut bytes = [0u8; 8];
                            if let Err(e) =
                                self.mem.read(gpa, bytes.get_mut(..n).unwrap_or(&mut []))
                            {
                                self.ram_error(&e);
                                break;
                            }
                            u64::from_le_bytes(bytes)
                        }
                        None => value & mask(size),
                    };
                    if !handler.write(access, v) {
                        self.unclaimed(&access, true);
                    }
                }
            }
        }
        value
    }
}

//! Guest-side helpers: what a guest kernel's grant, event-channel and page code does.
//!
//! Grants are written exactly as Linux's `gnttab_update_entry_v1` writes them (frame and
//! domid, a write barrier, then the flags) and revoked as `gnttab_end_foreign_access_ref_v1`
//! revokes them (a cmpxchg of the flags to 0 that fails while GTF_reading/GTF_writing is set,
//! so a guest cannot take back a page the backend still has mapped).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xen::abi::grant_table::*;
use xen::{DomId, Gfn, GrantRef, Port, SharedMem, PAGE_SIZE};

use crate::efd::EventFd;
use crate::host::{Host, HostError, GRANT_ENTRIES};

/// First grant reference a guest hands out (Linux reserves 0..8: console and xenstore).
pub const FIRST_FREE_GREF: GrantRef = 8;

/// Errors of guest-side operations.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The hypervisor refused.
    #[error("dom{domid}: {source}")]
    Host {
        /// Guest domain.
        domid: DomId,
        /// The hypervisor's error.
        #[source]
        source: HostError,
    },
    /// Out of guest pages or grant references.
    #[error("dom{domid}: out of {what}")]
    Exhausted {
        /// Guest domain.
        domid: DomId,
        /// What ran out.
        what: &'static str,
    },
    /// The grant is still mapped or being copied by the grantee.
    #[error("dom{domid}: grant ref {gref} is still in use by the grantee")]
    GrantInUse {
        /// Guest domain.
        domid: DomId,
        /// The grant.
        gref: GrantRef,
    },
    /// An access outside the guest's RAM.
    #[error("dom{domid}: {source}")]
    Mem {
        /// Guest domain.
        domid: DomId,
        /// The access error.
        #[source]
        source: xen::MemError,
    },
    /// Waiting for an event timed out.
    #[error("dom{domid}: no event on port {port} within {timeout:?}")]
    Timeout {
        /// Guest domain.
        domid: DomId,
        /// Port.
        port: Port,
        /// How long we waited.
        timeout: Duration,
    },
    /// An OS error.
    #[error("dom{domid}: {source}")]
    Io {
        /// Guest domain.
        domid: DomId,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub(crate) struct Alloc {
    free_pages: Vec<Gfn>,
    next_page: Gfn,
    free_refs: Vec<GrantRef>,
    next_ref: GrantRef,
}

impl Default for Alloc {
    fn default() -> Self {
        Alloc {
            free_pages: Vec::new(),
            next_page: 0,
            free_refs: Vec::new(),
            next_ref: FIRST_FREE_GREF,
        }
    }
}

/// A guest's view of itself: its RAM, its grant table, its event channels, its xenstore.
#[derive(Debug, Clone)]
pub struct Guest {
    inner: Arc<GuestInner>,
}

#[derive(Debug)]
struct GuestInner {
    host: Arc<Host>,
    domid: DomId,
    ram: SharedMem,
    pages: u64,
    gnttab: SharedMem,
    /// The domain's one page and grant-reference allocator (its "kernel's"), shared by every
    /// `Guest` handle of the domain, so that two drivers never get the same page or ref.
    alloc: Arc<Mutex<Alloc>>,
}

impl Guest {
    /// Attaches guest-side helpers to an existing domain.
    pub fn new(host: Arc<Host>, domid: DomId) -> Result<Guest, GuestError> {
        let herr = |source| GuestError::Host { domid, source };
        let ram = host.map_ram(domid).map_err(herr)?;
        let alloc = host.guest_alloc(domid).map_err(herr)?;
        let gnttab = host.map_grant_table(domid).map_err(herr)?;
        let pages = (ram.len() / PAGE_SIZE) as u64;
        Ok(Guest {
            inner: Arc::new(GuestInner {
                host,
                domid,
                ram,
                pages,
                gnttab,
                alloc,
            }),
        })
    }

    /// The guest's domain id.
    pub fn domid(&self) -> DomId {
        self.inner.domid
    }

    /// The host this guest runs on.
    pub fn host(&self) -> &Arc<Host> {
        &self.inner.host
    }

    /// The guest's own RAM.
    pub fn ram(&self) -> &SharedMem {
        &self.inner.ram
    }

    fn alloc(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.inner.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a zeroed page of guest RAM.
    pub fn alloc_page(&self) -> Result<Gfn, GuestError> {
        let gfn = {
            let mut a = self.alloc();
            match a.free_pages.pop() {
                Some(g) => g,
                None if a.next_page < self.inner.pages => {
                    a.next_page += 1;
                    a.next_page - 1
                }
                None => {
                    return Err(GuestError::Exhausted {
                        domid: self.domid(),
                        what: "guest pages",
                    })
                }
            }
        };
        self.page_fill(gfn, 0)?;
        Ok(gfn)
    }

    /// Returns a page to the allocator.
    pub fn free_page(&self, gfn: Gfn) {
        self.alloc().free_pages.push(gfn);
    }

    fn page_fill(&self, gfn: Gfn, byte: u8) -> Result<(), GuestError> {
        self.inner
            .ram
            .fill(gfn as usize * PAGE_SIZE, PAGE_SIZE, byte)
            .map_err(|source| GuestError::Mem {
                domid: self.domid(),
                source,
            })
    }

    /// Writes `data` into a guest page at `offset`.
    pub fn write_page(&self, gfn: Gfn, offset: usize, data: &[u8]) -> Result<(), GuestError> {
        self.check_in_page(gfn, offset, data.len())?;
        self.inner
            .ram
            .write(gfn as usize * PAGE_SIZE + offset, data)
            .map_err(|source| GuestError::Mem {
                domid: self.domid(),
                source,
            })
    }

    /// Reads a guest page at `offset` into `buf`.
    pub fn read_page(&self, gfn: Gfn, offset: usize, buf: &mut [u8]) -> Result<(), GuestError> {
        self.check_in_page(gfn, offset, buf.len())?;
        self.inner
            .ram
            .read(gfn as usize * PAGE_SIZE + offset, buf)
            .map_err(|source| GuestError::Mem {
                domid: self.domid(),
                source,
            })
    }

    fn check_in_page(&self, gfn: Gfn, offset: usize, len: usize) -> Result<(), GuestError> {
        if gfn >= self.inner.pages || offset.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
            return Err(GuestError::Mem {
                domid: self.domid(),
                source: xen::MemError::OutOfBounds {
                    offset,
                    len,
                    size: PAGE_SIZE,
                },
            });
        }
        Ok(())
    }

    /// Grants `to` access to page `gfn` (read-only if `readonly`) and returns the reference.
    pub fn grant(&self, to: DomId, gfn: Gfn, readonly: bool) -> Result<GrantRef, GuestError> {
        let gref = {
            let mut a = self.alloc();
            match a.free_refs.pop() {
                Some(r) => r,
                None if a.next_ref < GRANT_ENTRIES => {
                    a.next_ref += 1;
                    a.next_ref - 1
                }
                None => {
                    return Err(GuestError::Exhausted {
                        domid: self.domid(),
                        what: "grant references",
                    })
                }
            }
        };
        let frame = u32::try_from(gfn).map_err(|_| GuestError::Exhausted {
            domid: self.domid(),
            what: "32-bit frame numbers",
        })?;
        self.write_grant_entry(
            gref,
            to,
            frame,
            GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 },
        )?;
        Ok(gref)
    }

    /// Writes a raw grant entry as a guest would (frame and domid, barrier, flags). Tests of
    /// hostile guests use it to write entries no well-behaved guest would.
    pub fn write_grant_entry(
        &self,
        gref: GrantRef,
        to: DomId,
        frame: u32,
        flags: u16,
    ) -> Result<(), GuestError> {
        let off = gref as usize * GRANT_ENTRY_V1_SIZE;
        let merr = |source| GuestError::Mem {
            domid: self.domid(),
            source,
        };
        let gt = &self.inner.gnttab;
        gt.store_u32(off + 4, frame, Ordering::Relaxed)
            .map_err(merr)?;
        gt.store_u16(off + 2, to, Ordering::Relaxed).map_err(merr)?;
        fence(Ordering::Release); // wmb()
        gt.store_u16(off, flags, Ordering::Release).map_err(merr)?;
        Ok(())
    }

    /// The current flags of a grant entry (to observe GTF_reading/GTF_writing).
    pub fn grant_flags(&self, gref: GrantRef) -> Result<u16, GuestError> {
        self.inner
            .gnttab
            .load_u16(gref as usize * GRANT_ENTRY_V1_SIZE, Ordering::Acquire)
            .map_err(|source| GuestError::Mem {
                domid: self.domid(),
                source,
            })
    }

    /// Revokes a grant. Fails with [`GuestError::GrantInUse`] while the grantee has it mapped.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), GuestError> {
        let off = gref as usize * GRANT_ENTRY_V1_SIZE;
        let merr = |source| GuestError::Mem {
            domid: self.domid(),
            source,
        };
        let gt = &self.inner.gnttab;
        let mut flags = gt.load_u16(off, Ordering::Acquire).map_err(merr)?;
        loop {
            if flags & (GTF_READING | GTF_WRITING) != 0 {
                return Err(GuestError::GrantInUse {
                    domid: self.domid(),
                    gref,
                });
            }
            let prev = gt.cmpxchg_u16(off, flags, 0).map_err(merr)?;
            if prev == flags {
                break;
            }
            flags = prev;
        }
        self.alloc().free_refs.push(gref);
        Ok(())
    }

    /// Allocates an unbound event channel for `remote` to bind to.
    pub fn alloc_unbound(&self, remote: DomId) -> Result<GuestPort, GuestError> {
        let (port, incoming) = self
            .inner
            .host
            .evtchn_alloc_unbound(self.domid(), remote)
            .map_err(|source| GuestError::Host {
                domid: self.domid(),
                source,
            })?;
        Ok(GuestPort {
            guest: self.clone(),
            port,
            incoming,
        })
    }

    /// A new connection to xenstored as this domain.
    pub fn xenstore(&self) -> Result<UnixStream, GuestError> {
        self.inner
            .host
            .xenstored()
            .connect_as(self.domid())
            .map_err(|source| GuestError::Io {
                domid: self.domid(),
                source,
            })
    }
}

/// An event channel port owned by a guest.
#[derive(Debug)]
pub struct GuestPort {
    guest: Guest,
    port: Port,
    incoming: Arc<EventFd>,
}

impl GuestPort {
    /// The port number (what the guest writes to xenstore as `event-channel`).
    pub fn port(&self) -> Port {
        self.port
    }

    /// Sends an event to the remote end (nothing happens while unbound, as in Xen).
    pub fn notify(&self) -> Result<(), GuestError> {
        self.guest
            .inner
            .host
            .evtchn_send(self.guest.domid(), self.port)
            .map_err(|source| GuestError::Host {
                domid: self.guest.domid(),
                source,
            })
    }

    /// The remote (domain, port), once a backend has bound to us.
    pub fn remote(&self) -> Option<(DomId, Port)> {
        self.guest
            .inner
            .host
            .evtchn_status(self.guest.domid(), self.port)
            .ok()
            .flatten()
    }

    /// Waits up to `timeout` for an event; returns how many arrived (coalesced) since the last
    /// wait.
    pub fn wait(&self, timeout: Duration) -> Result<u64, GuestError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let domid = self.guest.domid();
        let mut fds = [PollFd::new(self.incoming.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let n = poll(&mut fds, ms).map_err(|e| GuestError::Io {
            domid,
            source: e.into(),
        })?;
        if n == 0 {
            return Err(GuestError::Timeout {
                domid,
                port: self.port,
                timeout,
            });
        }
        self.try_take().map(|c| c.max(1))
    }

    /// Takes pending events without blocking (0 if none).
    pub fn try_take(&self) -> Result<u64, GuestError> {
        self.incoming.take().map_err(|source| GuestError::Io {
            domid: self.guest.domid(),
            source,
        })
    }

    /// The eventfd signalled on delivery (for a frontend's own poll loop).
    pub fn event_fd(&self) -> &EventFd {
        &self.incoming
    }
}

impl Drop for GuestPort {
    fn drop(&mut self) {
        let _ = self
            .guest
            .inner
            .host
            .evtchn_close(self.guest.domid(), self.port);
    }
}

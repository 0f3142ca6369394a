//! A PV console frontend (io/console.h), negotiating as Linux's hvc_xen does for a secondary
//! console: it grants one ring page and allocates an event channel, publishes `ring-ref` and
//! `port`, goes to Initialised, and to Connected once the backend is Connected.

use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use xen::abi::console::*;
use xen::{Gfn, GrantRef, PAGE_SIZE};
use xenbus::{XenbusState, XsOps};

use super::{FrontError, FrontendLink};
use crate::guest::{Guest, GuestPort};

/// A connected console frontend.
#[derive(Debug)]
pub struct ConsoleFront {
    link: FrontendLink,
    gfn: Gfn,
    gref: GrantRef,
    port: GuestPort,
}

impl ConsoleFront {
    /// Connects `device/console/<devid>` of `guest` to its backend, waiting up to `timeout`.
    pub fn connect(
        guest: &Guest,
        devid: u32,
        timeout: Duration,
    ) -> Result<ConsoleFront, FrontError> {
        let link = FrontendLink::open(guest, "console", devid)?;
        let gfn = guest.alloc_page()?;
        let gref = guest.grant(link.backend_id(), gfn, false)?;
        let port = guest.alloc_unbound(link.backend_id())?;
        let fe = link.path().to_string();
        let xs_err = |source| FrontError::Xs {
            path: fe.clone(),
            source,
        };
        link.xs()
            .transaction(|tx| {
                tx.write(&format!("{fe}/ring-ref"), gref.to_string().as_bytes())?;
                tx.write(&format!("{fe}/port"), port.port().to_string().as_bytes())?;
                tx.write(
                    &format!("{fe}/state"),
                    XenbusState::Initialised.as_str().as_bytes(),
                )
            })
            .map_err(xs_err)?;
        link.wait_backend("Connected", timeout, |s| s == XenbusState::Connected)?;
        link.switch_state(XenbusState::Connected)?;
        Ok(ConsoleFront {
            link,
            gfn,
            gref,
            port,
        })
    }

    /// The guest frame of the ring page (tests of hostile frontends write it directly).
    pub fn ring_gfn(&self) -> Gfn {
        self.gfn
    }

    /// The backend's end of our event channel, while one is bound.
    pub fn backend_port(&self) -> Option<(xen::DomId, xen::Port)> {
        self.port.remote()
    }

    /// The frontend's xenstore link.
    pub fn link(&self) -> &FrontendLink {
        &self.link
    }

    fn base(&self) -> usize {
        self.gfn as usize * PAGE_SIZE
    }

    /// Writes as much of `data` as fits in the output ring and notifies; returns the count.
    pub fn write(&self, data: &[u8]) -> Result<usize, FrontError> {
        let ram = self.link.guest().ram();
        let b = self.base();
        let mem = |e| FrontError::Protocol {
            path: self.link.path().into(),
            why: format!("ring access: {e}"),
        };
        let cons = ram
            .load_u32(b + OUT_CONS_OFFSET, Ordering::Acquire)
            .map_err(mem)?;
        let mut prod = ram
            .load_u32(b + OUT_PROD_OFFSET, Ordering::Relaxed)
            .map_err(mem)?;
        let space = XENCONS_OUT_SIZE.saturating_sub(prod.wrapping_sub(cons) as usize);
        let n = space.min(data.len());
        for &byte in &data[..n] {
            let idx = prod as usize & (XENCONS_OUT_SIZE - 1);
            ram.write(b + OUT_OFFSET + idx, &[byte]).map_err(mem)?;
            prod = prod.wrapping_add(1);
        }
        fence(Ordering::Release); // wmb(): data before the index
        ram.store_u32(b + OUT_PROD_OFFSET, prod, Ordering::Release)
            .map_err(mem)?;
        self.port.notify()?;
        Ok(n)
    }

    /// Takes whatever input the backend has put in the input ring.
    pub fn read(&self, out: &mut Vec<u8>) -> Result<usize, FrontError> {
        let ram = self.link.guest().ram();
        let b = self.base();
        let mem = |e| FrontError::Protocol {
            path: self.link.path().into(),
            why: format!("ring access: {e}"),
        };
        let mut cons = ram
            .load_u32(b + IN_CONS_OFFSET, Ordering::Relaxed)
            .map_err(mem)?;
        let prod = ram
            .load_u32(b + IN_PROD_OFFSET, Ordering::Acquire)
            .map_err(mem)?;
        let avail = prod.wrapping_sub(cons) as usize;
        if avail > XENCONS_IN_SIZE {
            return Err(FrontError::Protocol {
                path: self.link.path().into(),
                why: format!("backend claims {avail} bytes of input"),
            });
        }
        for _ in 0..avail {
            let mut byte = [0u8];
            ram.read(
                b + IN_OFFSET + (cons as usize & (XENCONS_IN_SIZE - 1)),
                &mut byte,
            )
            .map_err(mem)?;
            out.push(byte[0]);
            cons = cons.wrapping_add(1);
        }
        fence(Ordering::SeqCst); // mb(): consume before publishing the index
        ram.store_u32(b + IN_CONS_OFFSET, cons, Ordering::Release)
            .map_err(mem)?;
        if avail > 0 {
            self.port.notify()?;
        }
        Ok(avail)
    }

    /// Waits for an event from the backend (input or output consumed).
    pub fn wait_event(&self, timeout: Duration) -> Result<u64, FrontError> {
        Ok(self.port.wait(timeout)?)
    }

    /// Bytes written but not yet consumed by the backend.
    pub fn unconsumed(&self) -> u32 {
        let ram = self.link.guest().ram();
        let b = self.base();
        let cons = ram
            .load_u32(b + OUT_CONS_OFFSET, Ordering::Acquire)
            .unwrap_or(0);
        let prod = ram
            .load_u32(b + OUT_PROD_OFFSET, Ordering::Acquire)
            .unwrap_or(0);
        prod.wrapping_sub(cons)
    }

    /// Closes the device as hvc_xen does on removal: Closing, wait for the backend to close,
    /// Closed, then revoke the grant (which fails if the backend still maps it).
    pub fn close(self, timeout: Duration) -> Result<(), FrontError> {
        self.link.switch_state(XenbusState::Closing)?;
        self.link
            .wait_backend("Closing or Closed", timeout, |s| s >= XenbusState::Closing)?;
        self.link.switch_state(XenbusState::Closed)?;
        self.link.wait_backend("Closed", timeout, |s| {
            s == XenbusState::Closed || s == XenbusState::Unknown
        })?;
        self.link.guest().end_access(self.gref)?;
        self.link.guest().free_page(self.gfn);
        Ok(())
    }
}

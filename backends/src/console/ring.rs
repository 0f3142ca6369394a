//! The console ring thread: maps the ring, binds the port, moves bytes both ways.

use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, warn, Span};
use xen::abi::console::*;
use xen::{DomId, EventChannels, GrantMapping, GrantRef, Port, SharedMem, XenHost};

use super::metrics::add;
use super::{lock, ConsoleLimits, ConsoleSink, Shared};
use crate::ratelimit::TokenBucket;

/// Errors setting up or running a console ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// Opening a Xen handle failed.
    #[error("dom{domid} console {devid}: {source}")]
    Host {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Error.
        #[source]
        source: xen::HostError,
    },
    /// Mapping the ring failed.
    #[error("dom{domid} console {devid}: mapping ring-ref {gref}: {source}")]
    Map {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// The ring's grant.
        gref: GrantRef,
        /// Error.
        #[source]
        source: xen::GrantError,
    },
    /// Binding the port failed.
    #[error("dom{domid} console {devid}: binding port {port}: {source}")]
    Bind {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// Remote port.
        port: Port,
        /// Error.
        #[source]
        source: xen::EvtchnError,
    },
    /// Something else at the OS level.
    #[error("dom{domid} console {devid}: {what}: {source}")]
    Os {
        /// Domain.
        domid: DomId,
        /// Device.
        devid: u32,
        /// What.
        what: &'static str,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

/// Wakes the ring thread (new input, or stop).
#[derive(Debug)]
pub(crate) struct Waker {
    fd: EventFd,
    stop: AtomicBool,
}

impl Waker {
    pub(crate) fn wake(&self) {
        let _ = self.fd.write(1);
    }
}

pub(crate) struct Params<'a> {
    pub host: &'a dyn XenHost,
    pub domid: DomId,
    pub devid: u32,
    pub ring_ref: GrantRef,
    pub port: Port,
    pub sink: Arc<dyn ConsoleSink>,
    pub limits: ConsoleLimits,
    pub shared: Arc<Shared>,
    pub span: Span,
    pub ctx: xenbus::backend::DeviceCtx,
}

/// A running ring thread.
pub(crate) struct RingThread {
    waker: Arc<Waker>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl RingThread {
    pub(crate) fn start(p: Params<'_>) -> Result<RingThread, RingError> {
        let (domid, devid) = (p.domid, p.devid);
        let host_err = |source| RingError::Host {
            domid,
            devid,
            source,
        };
        let gnttab = p.host.open_gnttab().map_err(host_err)?;
        let mapping = gnttab
            .map(domid, &[p.ring_ref], true)
            .map_err(|source| RingError::Map {
                domid,
                devid,
                gref: p.ring_ref,
                source,
            })?;
        let evtchn = p.host.open_evtchn().map_err(host_err)?;
        evtchn.restrict(domid).map_err(|source| RingError::Bind {
            domid,
            devid,
            port: p.port,
            source,
        })?;
        let local = evtchn
            .bind_interdomain(domid, p.port)
            .map_err(|source| RingError::Bind {
                domid,
                devid,
                port: p.port,
                source,
            })?;
        let fd =
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| {
                RingError::Os {
                    domid,
                    devid,
                    what: "eventfd",
                    source: e.into(),
                }
            })?;
        let waker = Arc::new(Waker {
            fd,
            stop: AtomicBool::new(false),
        });
        *lock(&p.shared.waker) = Some(waker.clone());
        // Our private copies of the indices we own; the guest's copies in shared memory are
        // written by us and never read back (a guest rewriting them cannot steer us).
        let mem = mapping.mem();
        let out_cons = mem
            .load_u32(OUT_CONS_OFFSET, Ordering::Acquire)
            .unwrap_or(0);
        let in_prod = mem.load_u32(IN_PROD_OFFSET, Ordering::Acquire).unwrap_or(0);
        let mut st = RingState {
            mapping,
            _gnttab: gnttab,
            evtchn,
            local,
            out_cons,
            in_prod,
            line: Vec::with_capacity(p.limits.max_line),
            bucket: TokenBucket::new(p.limits.lines_per_sec, p.limits.line_burst),
            sink: p.sink,
            limits: p.limits,
            shared: p.shared.clone(),
            waker: waker.clone(),
            domid,
            devid,
            ctx: p.ctx.clone(),
        };
        let span = p.span.clone();
        let thread = std::thread::Builder::new()
            .name(format!("console-d{domid}-{devid}"))
            .spawn(move || {
                let _g = span.enter();
                st.run();
            })
            .map_err(|source| RingError::Os {
                domid,
                devid,
                what: "spawning the ring thread",
                source,
            })?;
        debug!(
            domid,
            devid,
            ring_ref = p.ring_ref,
            port = p.port,
            local,
            "console ring connected"
        );
        Ok(RingThread {
            waker,
            shared: p.shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn stop(mut self) {
        self.waker.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *lock(&self.shared.waker) = None;
    }
}

struct RingState {
    mapping: GrantMapping,
    _gnttab: Box<dyn xen::GrantTables>,
    evtchn: Box<dyn EventChannels>,
    local: Port,
    out_cons: u32,
    in_prod: u32,
    line: Vec<u8>,
    bucket: TokenBucket,
    sink: Arc<dyn ConsoleSink>,
    limits: ConsoleLimits,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    domid: DomId,
    devid: u32,
    ctx: xenbus::backend::DeviceCtx,
}

/// What one pass over the rings did.
#[derive(Default)]
struct Pass {
    moved: bool,
    rogue: Option<String>,
}

impl RingState {
    fn run(&mut self) {
        let mut ports = [0 as Port; 8];
        loop {
            {
                let mut fds = [
                    PollFd::new(self.evtchn.fd(), PollFlags::POLLIN),
                    PollFd::new(self.waker.fd.as_fd(), PollFlags::POLLIN),
                ];
                if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
                    if e != nix::errno::Errno::EINTR {
                        warn!(error = %e, "console ring poll failed; stopping");
                        self.ctx.fatal(&format!("console ring poll failed: {e}"));
                        return;
                    }
                }
            }
            let _ = self.waker.fd.read();
            if self.waker.stop.load(Ordering::SeqCst) {
                self.flush_line();
                return;
            }
            let mut delivered = false;
            while let Ok(n) = self.evtchn.pending(&mut ports) {
                if n == 0 {
                    break;
                }
                add(&self.shared.metrics.events, n as u64);
                delivered |= ports[..n].contains(&self.local);
            }
            // Work, unmask, then look again: an event that came between the last look and
            // the unmask is not lost.
            let mut pass = self.pass();
            if delivered {
                let _ = self.evtchn.unmask(self.local);
                let again = self.pass();
                pass.moved |= again.moved;
                pass.rogue = pass.rogue.or(again.rogue);
            }
            if let Some(why) = pass.rogue {
                add(&self.shared.metrics.errors, 1);
                warn!(
                    domid = self.domid,
                    devid = self.devid,
                    "console frontend is misbehaving ({why}); no longer serving it"
                );
                // The watcher disconnects the device, writes `error` and moves it to Closing.
                self.ctx
                    .fatal(&format!("frontend broke the console ring protocol: {why}"));
                return;
            }
            if pass.moved {
                add(&self.shared.metrics.notifies, 1);
                let _ = self.evtchn.notify(self.local);
            }
        }
    }

    fn mem(&self) -> &SharedMem {
        self.mapping.mem()
    }

    fn pass(&mut self) -> Pass {
        let mut p = Pass::default();
        match self.drain_output() {
            Ok(moved) => p.moved |= moved,
            Err(why) => p.rogue = Some(why),
        }
        match self.push_input() {
            Ok(moved) => p.moved |= moved,
            Err(why) => p.rogue = p.rogue.or(Some(why)),
        }
        p
    }

    /// Copies the guest's output out of the ring once, then publishes the new consumer index.
    fn drain_output(&mut self) -> Result<bool, String> {
        let prod = self
            .mem()
            .load_u32(OUT_PROD_OFFSET, Ordering::Acquire)
            .map_err(|e| e.to_string())?;
        let avail = prod.wrapping_sub(self.out_cons) as usize;
        if avail == 0 {
            return Ok(false);
        }
        if avail > XENCONS_OUT_SIZE {
            return Err(format!("out_prod {prod} is {avail} bytes ahead of out_cons {} (ring holds {XENCONS_OUT_SIZE})", self.out_cons));
        }
        let mut buf = [0u8; XENCONS_OUT_SIZE];
        let start = self.out_cons as usize & (XENCONS_OUT_SIZE - 1);
        let first = avail.min(XENCONS_OUT_SIZE - start);
        self.mem()
            .read(OUT_OFFSET + start, &mut buf[..first])
            .map_err(|e| e.to_string())?;
        self.mem()
            .read(OUT_OFFSET, &mut buf[first..avail])
            .map_err(|e| e.to_string())?;
        fence(Ordering::SeqCst); // mb(): read the data before freeing the space
        self.out_cons = prod;
        self.mem()
            .store_u32(OUT_CONS_OFFSET, prod, Ordering::Release)
            .map_err(|e| e.to_string())?;
        add(&self.shared.metrics.bytes_out, avail as u64);
        for &b in &buf[..avail] {
            if b == b'\n' {
                self.flush_line();
            } else if b != b'\r' {
                self.line.push(b);
                if self.line.len() >= self.limits.max_line {
                    self.flush_line();
                }
            }
        }
        Ok(true)
    }

    fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        if self.bucket.take(1.0) {
            let suppressed = self.bucket.take_denied();
            if suppressed > 0 {
                warn!(
                    domid = self.domid,
                    devid = self.devid,
                    suppressed,
                    "console lines suppressed by the rate limit"
                );
            }
            add(&self.shared.metrics.lines, 1);
            // Guest bytes reach our log: keep control characters (terminal escapes) out.
            let text: String = String::from_utf8_lossy(&self.line)
                .chars()
                .map(|c| {
                    if c.is_control() && c != '\t' {
                        '\u{fffd}'
                    } else {
                        c
                    }
                })
                .collect();
            self.sink.line(u32::from(self.domid), self.devid, &text);
        } else {
            add(&self.shared.metrics.lines_suppressed, 1);
        }
        self.line.clear();
    }

    /// Moves queued input into the guest's input ring as far as it has room.
    fn push_input(&mut self) -> Result<bool, String> {
        let mut q = lock(&self.shared.input);
        if q.is_empty() {
            return Ok(false);
        }
        let cons = self
            .mem()
            .load_u32(IN_CONS_OFFSET, Ordering::Acquire)
            .map_err(|e| e.to_string())?;
        let used = self.in_prod.wrapping_sub(cons) as usize;
        if used > XENCONS_IN_SIZE {
            return Err(format!(
                "in_cons {cons} is {used} bytes behind in_prod {} (ring holds {XENCONS_IN_SIZE})",
                self.in_prod
            ));
        }
        let n = (XENCONS_IN_SIZE - used).min(q.len());
        if n == 0 {
            return Ok(false);
        }
        let mut prod = self.in_prod;
        for b in q.drain(..n) {
            self.mem()
                .write(IN_OFFSET + (prod as usize & (XENCONS_IN_SIZE - 1)), &[b])
                .map_err(|e| e.to_string())?;
            prod = prod.wrapping_add(1);
        }
        drop(q);
        fence(Ordering::Release); // wmb(): data before the index
        self.in_prod = prod;
        self.mem()
            .store_u32(IN_PROD_OFFSET, prod, Ordering::Release)
            .map_err(|e| e.to_string())?;
        add(&self.shared.metrics.bytes_in, n as u64);
        Ok(true)
    }
}

impl Drop for RingState {
    fn drop(&mut self) {
        let _ = self.evtchn.unbind(self.local);
    }
}

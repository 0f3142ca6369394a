//! Test-only stand-in for blkback: it plays the backend's XenBus handshake as dom0 and answers
//! every request OKAY without touching data (a null disk), through `SimHost` grant maps and
//! event channels as domio would. It exercises the bench's measurement loop without depending
//! on domio's blkback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::abi::blkif::*;
use xen::ring::BackRing;
use xen::{DomId, GrantRef, Port, XenHost};
use xenbus::{XenbusState, XsClient, XsOps};
use xensim::client::SimHost;

/// The running responder.
pub struct NullResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

fn read_u32(xs: &XsClient, path: &str) -> Option<u32> {
    xs.try_read(path)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
}

impl NullResponder {
    /// Starts serving the vbd at `backend`/`frontend` of `domid` with `sectors` sectors.
    pub fn start(
        sim: Arc<SimHost>,
        xs: XsClient,
        domid: DomId,
        backend: String,
        frontend: String,
        sectors: u64,
    ) -> NullResponder {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread =
            std::thread::spawn(move || serve(&sim, &xs, domid, &backend, &frontend, sectors, &st));
        NullResponder {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and reports what went wrong, if anything.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("null responder panicked"),
            None => Ok(()),
        }
    }
}

fn serve(
    sim: &SimHost,
    xs: &XsClient,
    domid: DomId,
    be: &str,
    fe: &str,
    sectors: u64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    for (k, v) in [
        ("max-ring-page-order", "4"),
        ("multi-queue-max-queues", "4"),
        ("feature-max-indirect-segments", "256"),
    ] {
        xs.write(&format!("{be}/{k}"), v.as_bytes())?;
    }
    xs.write(&format!("{be}/state"), b"2")?;
    let w = xs.watch(&format!("{fe}/state"), "null-responder")?;
    loop {
        let s = xs.try_read(&format!("{fe}/state"))?.unwrap_or_default();
        if XenbusState::parse(&s).ok() == Some(XenbusState::Initialised) {
            break;
        }
        w.recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow::anyhow!("frontend never Initialised"))?;
    }
    let order = read_u32(xs, &format!("{fe}/ring-page-order")).unwrap_or(0);
    let nq = read_u32(xs, &format!("{fe}/multi-queue-num-queues")).unwrap_or(1);
    let gt = sim.open_gnttab()?;
    let ev = sim.open_evtchn()?;
    let mut rings = Vec::new();
    for q in 0..nq {
        let dir = if nq == 1 {
            fe.to_string()
        } else {
            format!("{fe}/queue-{q}")
        };
        let refs: Vec<GrantRef> = if order == 0 {
            vec![read_u32(xs, &format!("{dir}/ring-ref")).unwrap_or(0)]
        } else {
            (0..1u32 << order)
                .map(|i| read_u32(xs, &format!("{dir}/ring-ref{i}")).unwrap_or(0))
                .collect()
        };
        let port = read_u32(xs, &format!("{dir}/event-channel")).unwrap_or(0);
        let ring = BackRing::<BlkifRequest, BlkifResponse, _>::new(gt.map(domid, &refs, true)?)?;
        let local = ev.bind_interdomain(domid, port)?;
        rings.push((ring, local));
    }
    for (k, v) in [
        ("sectors", sectors.to_string()),
        ("info", "0".into()),
        ("sector-size", "512".into()),
        ("feature-persistent", "1".into()),
        ("feature-flush-cache", "1".into()),
    ] {
        xs.write(&format!("{be}/{k}"), v.as_bytes())?;
    }
    xs.write(&format!("{be}/state"), b"4")?;
    let mut pending = [0 as Port; 16];
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(ev.fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(20u16))? > 0 {
            let n = ev.pending(&mut pending)?;
            for p in &pending[..n] {
                ev.unmask(*p)?;
            }
        }
        for (ring, local) in &mut rings {
            loop {
                while let Some(req) = ring.copy_request()? {
                    let (id, op) = match req.operation {
                        BLKIF_OP_INDIRECT => {
                            let i = req.as_indirect();
                            (i.id, i.indirect_op)
                        }
                        op => (req.id, op),
                    };
                    ring.push_response(&BlkifResponse {
                        id,
                        operation: op,
                        status: BLKIF_RSP_OKAY,
                        ..Default::default()
                    })?;
                }
                if ring.push_responses_and_check_notify()? {
                    ev.notify(*local)?;
                }
                if !ring.final_check_for_requests()? {
                    break;
                }
            }
        }
    }
    Ok(())
}

//! A PV network frontend (io/netif.h) that negotiates and moves frames as Linux's
//! `xen-netfront` does, with the control ring of the Windows PV drivers.
//!
//! Negotiation (`talk_to_netback`): once the backend is InitWait, read its features
//! (`feature-sg`, `feature-gso-*`, `feature-split-event-channels`, `multi-queue-max-queues`,
//! `feature-ctrl-ring`, `feature-xdp-headroom`, ...), set up each queue (one granted page per
//! ring, one event channel or a TX/RX pair), post the RX buffers, then in one transaction
//! write `tx-ring-ref`, `rx-ring-ref`, `event-channel` or `event-channel-tx`/`-rx` (under
//! `queue-N/` after `multi-queue-num-queues` when there is more than one queue),
//! `request-rx-copy`, `feature-rx-notify`, `feature-sg`, `feature-gso-tcpv4/6`,
//! `feature-ipv6-csum-offload`, `feature-no-csum-offload`, `request-multicast-control`,
//! `xdp-headroom` and the control ring's `ctrl-ring-ref` / `event-channel-ctrl`, and switch to
//! Connected; then wait for the backend's Connected.
//!
//! TX: each queue owns a pool of guest pages, each granted once read-only to the backend and
//! named by the TX request id. A frame is written into as many pages as it needs, the first
//! request carrying the whole size (NETTXF_more_data, NETTXF_extra_info with a GSO extra for
//! super-frames, NETTXF_csum_blank / data_validated from [`FrameMeta`]). Responses free the
//! pages; ids are checked (a backend answering an id twice or never issued breaks the queue).
//!
//! RX: every free RX page is posted (granted writable, id = page index). Responses are
//! reassembled across NETRXF_more_data slots, with the GSO extra after the first; the buffers
//! are posted again at once. The RX event index asks for an event per response batch.
//!
//! Each [`NetQueue`] implements [`FrameDevice`]. Tests of hostile frontends use the raw
//! helpers ([`NetQueue::push_tx_raw`], [`NetQueue::set_tx_req_prod`], [`NetQueue::tx_page`],
//! [`NetFrontOptions::overrides`] and [`NetFrontOptions::omit`]) to do what Linux never would.

use std::time::Duration;

use xen::abi::netif::*;
use xen::abi::ring::SRING_REQ_PROD;
use xen::ring::{FrontRing, RingError};
use xen::{DomId, Gfn, GrantRef, SharedMem, PAGE_SIZE};
use xenbus::{XenbusState, XsError, XsOps};

use super::frame::{FrameDevice, FrameMeta, Gso};
use super::{FrontError, FrontendLink};
use crate::guest::{Guest, GuestError, GuestPort};

/// Errors of the network frontend.
#[derive(Debug, thiserror::Error)]
pub enum NetFrontError {
    /// xenstore or state handshake.
    #[error(transparent)]
    Front(#[from] FrontError),
    /// Guest pages, grants or event channels.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A shared ring (including a backend that produced impossible indices).
    #[error("{path}: shared ring: {source}")]
    Ring {
        /// Device and queue.
        path: String,
        /// The ring error.
        #[source]
        source: RingError,
    },
    /// The backend answered something impossible; the queue is broken.
    #[error("{path}: backend protocol error: {why}")]
    Backend {
        /// Device and queue.
        path: String,
        /// What.
        why: String,
    },
    /// The caller asked for something this frontend cannot send.
    #[error("{path}: {why}")]
    Invalid {
        /// Device and queue.
        path: String,
        /// Why.
        why: String,
    },
}

/// What the frontend asks for (Linux netfront's module parameters and features).
#[derive(Debug, Clone)]
pub struct NetFrontOptions {
    /// Queues wanted (bounded by the backend's `multi-queue-max-queues`).
    pub max_queues: u32,
    /// Use split event channels when the backend offers them.
    pub split_event_channels: bool,
    /// `feature-sg`.
    pub sg: bool,
    /// `feature-gso-tcpv4` and `feature-gso-tcpv6` (accept GSO on RX, send it on TX).
    pub gso: bool,
    /// Take blank checksums on RX (else `feature-no-csum-offload`).
    pub csum_offload: bool,
    /// `feature-ipv6-csum-offload`.
    pub ipv6_csum_offload: bool,
    /// Set up the control ring when the backend offers it.
    pub ctrl_ring: bool,
    /// `request-multicast-control`.
    pub multicast_control: bool,
    /// `xdp-headroom` (0: not written).
    pub xdp_headroom: u16,
    /// RX buffers kept posted per queue (at most the ring size).
    pub rx_buffers: u32,
    /// The MTU for `max_frame` without GSO.
    pub mtu: usize,
    /// How long to wait for the backend.
    pub timeout: Duration,
    /// Keys written after ours (hostile values).
    pub overrides: Vec<(String, String)>,
    /// Keys not written.
    pub omit: Vec<String>,
}

impl Default for NetFrontOptions {
    fn default() -> Self {
        NetFrontOptions {
            max_queues: 1,
            split_event_channels: true,
            sg: true,
            gso: true,
            csum_offload: true,
            ipv6_csum_offload: true,
            ctrl_ring: false,
            multicast_control: false,
            xdp_headroom: 0,
            rx_buffers: 256,
            mtu: 1500,
            timeout: Duration::from_secs(10),
            overrides: Vec::new(),
            omit: Vec::new(),
        }
    }
}

/// The backend's advertised features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetBackendFeatures {
    /// `feature-sg`.
    pub sg: bool,
    /// `feature-gso-tcpv4`.
    pub gso_tcpv4: bool,
    /// `feature-gso-tcpv6`.
    pub gso_tcpv6: bool,
    /// `feature-ipv6-csum-offload`.
    pub ipv6_csum_offload: bool,
    /// `feature-rx-copy`.
    pub rx_copy: bool,
    /// `feature-split-event-channels`.
    pub split_event_channels: bool,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `feature-ctrl-ring`.
    pub ctrl_ring: bool,
    /// `feature-multicast-control`.
    pub multicast_control: bool,
    /// `feature-dynamic-multicast-control`.
    pub dynamic_multicast_control: bool,
    /// `feature-xdp-headroom`.
    pub xdp_headroom: bool,
}

/// Per-queue counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetQueueStats {
    /// Frames sent.
    pub tx_frames: u64,
    /// TX responses other than OKAY/NULL.
    pub tx_errors: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// RX frames with an error slot (dropped).
    pub rx_errors: u64,
    /// Notifications sent.
    pub notifies: u64,
}

fn xs_err(path: &str) -> impl Fn(XsError) -> FrontError + '_ {
    move |source| FrontError::Xs {
        path: path.to_string(),
        source,
    }
}

/// A page granted to the backend, kept for the queue's life.
#[derive(Debug, Clone, Copy)]
struct Page {
    gfn: Gfn,
    gref: GrantRef,
}

fn map_ring_page(guest: &Guest, gfn: Gfn) -> Result<SharedMem, GuestError> {
    guest
        .host()
        .with_ram(guest.domid(), |ram| {
            crate::mem::map_frames(ram.fd(), &[gfn], true)
        })
        .map_err(|source| GuestError::Host {
            domid: guest.domid(),
            source,
        })
        .and_then(|r| {
            r.map_err(|source| GuestError::Io {
                domid: guest.domid(),
                source,
            })
        })
}

/// Allocates and grants `n` pages.
fn grant_pages(
    guest: &Guest,
    to: DomId,
    n: usize,
    readonly: bool,
    out: &mut Vec<Page>,
) -> Result<(), GuestError> {
    for _ in 0..n {
        let gfn = guest.alloc_page()?;
        match guest.grant(to, gfn, readonly) {
            Ok(gref) => out.push(Page { gfn, gref }),
            Err(e) => {
                guest.free_page(gfn);
                return Err(e);
            }
        }
    }
    Ok(())
}

fn release_pages(guest: &Guest, pages: &mut Vec<Page>) {
    for p in pages.drain(..) {
        // A grant the backend still holds stays leaked rather than reused (XSA-396).
        if guest.end_access(p.gref).is_ok() {
            guest.free_page(p.gfn);
        }
    }
}

/// One queue: its TX and RX rings, event channels and buffer pools.
pub struct NetQueue {
    guest: Guest,
    index: u32,
    path: String,
    tx: FrontRing<NetifTxRequest, NetifTxResponse, SharedMem>,
    rx: FrontRing<NetifRxRequest, NetifRxResponse, SharedMem>,
    ring_pages: Vec<Page>,
    tx_port: GuestPort,
    rx_port: Option<GuestPort>,
    /// TX pool: id = index.
    tx_pages: Vec<Page>,
    tx_free: Vec<u16>,
    tx_busy: Vec<bool>,
    /// RX pool.
    rx_pages: Vec<Page>,
    /// Pages not posted.
    rx_free: Vec<u16>,
    /// The page posted at each RX ring slot (the request id is the slot index, as in Linux,
    /// so a slot consumed by an extra still names its buffer).
    rx_slot: Vec<Option<u16>>,
    rx_target: u32,
    /// Responses of a frame being reassembled.
    rx_partial: Vec<(NetifRxResponse, bool)>,
    max_frame: usize,
    offloads: bool,
    sg: bool,
    headroom: usize,
    stats: NetQueueStats,
    broken: Option<String>,
}

impl std::fmt::Debug for NetQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueue")
            .field("path", &self.path)
            .field("stats", &self.stats)
            .field("broken", &self.broken)
            .finish()
    }
}

impl NetQueue {
    fn new(
        guest: &Guest,
        backend: DomId,
        index: u32,
        split: bool,
        path: String,
    ) -> Result<NetQueue, NetFrontError> {
        let mut ring_pages = Vec::new();
        if let Err(e) = grant_pages(guest, backend, 2, false, &mut ring_pages) {
            release_pages(guest, &mut ring_pages);
            return Err(e.into());
        }
        let mapped = map_ring_page(guest, ring_pages[0].gfn)
            .and_then(|a| Ok((a, map_ring_page(guest, ring_pages[1].gfn)?)));
        let (tx_mem, rx_mem) = match mapped {
            Ok(m) => m,
            Err(e) => {
                release_pages(guest, &mut ring_pages);
                return Err(e.into());
            }
        };
        let rerr = |source| NetFrontError::Ring {
            path: path.clone(),
            source,
        };
        let tx = FrontRing::init(tx_mem).map_err(rerr)?;
        let rx = FrontRing::init(rx_mem).map_err(rerr)?;
        let tx_port = guest.alloc_unbound(backend)?;
        let rx_port = if split {
            Some(guest.alloc_unbound(backend)?)
        } else {
            None
        };
        let tx_size = tx.size() as usize;
        let rx_size = rx.size() as usize;
        let mut tx_pages = Vec::with_capacity(tx_size);
        grant_pages(guest, backend, tx_size, true, &mut tx_pages)?;
        let mut rx_pages = Vec::with_capacity(rx_size);
        grant_pages(guest, backend, rx_size, false, &mut rx_pages)?;
        Ok(NetQueue {
            guest: guest.clone(),
            index,
            path,
            tx,
            rx,
            ring_pages,
            tx_port,
            rx_port,
            tx_free: (0..tx_size as u16).rev().collect(),
            tx_busy: vec![false; tx_size],
            tx_pages,
            rx_free: (0..rx_size as u16).rev().collect(),
            rx_slot: vec![None; rx_size],
            rx_pages,
            rx_target: rx_size as u32,
            rx_partial: Vec::with_capacity(20),
            max_frame: 1514,
            offloads: false,
            sg: false,
            headroom: 0,
            stats: NetQueueStats::default(),
            broken: None,
        })
    }

    fn ring_err(&self) -> impl Fn(RingError) -> NetFrontError + '_ {
        |source| NetFrontError::Ring {
            path: self.path.clone(),
            source,
        }
    }

    /// The queue's index.
    pub fn index(&self) -> u32 {
        self.index
    }
    /// Counters.
    pub fn stats(&self) -> NetQueueStats {
        self.stats
    }
    /// Why the queue is broken, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }
    /// The TX (or shared) event channel.
    pub fn tx_port(&self) -> &GuestPort {
        &self.tx_port
    }
    /// The RX event channel when split.
    pub fn rx_port(&self) -> Option<&GuestPort> {
        self.rx_port.as_ref()
    }
    /// TX ring reference and RX ring reference.
    pub fn ring_refs(&self) -> (GrantRef, GrantRef) {
        (self.ring_pages[0].gref, self.ring_pages[1].gref)
    }
    /// The TX and RX ring pages (for a flipper that rewrites slots from another thread).
    pub fn ring_gfns(&self) -> (Gfn, Gfn) {
        (self.ring_pages[0].gfn, self.ring_pages[1].gfn)
    }
    /// RX buffers currently posted.
    pub fn rx_posted(&self) -> usize {
        self.rx_slot.iter().filter(|p| p.is_some()).count()
    }
    /// TX requests awaiting a response.
    pub fn tx_in_flight(&self) -> usize {
        self.tx_busy.iter().filter(|b| **b).count()
    }

    fn break_queue(&mut self, why: String) -> NetFrontError {
        self.broken = Some(why.clone());
        NetFrontError::Backend {
            path: self.path.clone(),
            why,
        }
    }

    fn check_broken(&self) -> Result<(), NetFrontError> {
        match &self.broken {
            Some(why) => Err(NetFrontError::Backend {
                path: self.path.clone(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }

    fn notify_tx(&mut self) -> Result<(), NetFrontError> {
        if self
            .tx
            .push_requests_and_check_notify()
            .map_err(self.ring_err())?
        {
            self.stats.notifies += 1;
            self.tx_port.notify()?;
        }
        Ok(())
    }

    fn rx_event_port(&self) -> &GuestPort {
        self.rx_port.as_ref().unwrap_or(&self.tx_port)
    }

    /// Posts free RX buffers up to the target (`xennet_alloc_rx_buffers`).
    pub fn post_rx(&mut self) -> Result<usize, NetFrontError> {
        let mut n = 0;
        let mask = self.rx.size() - 1;
        while self.rx_posted() < self.rx_target as usize && self.rx.free_requests() > 0 {
            let Some(page) = self.rx_free.pop() else {
                break;
            };
            let slot = self.rx.req_prod_pvt() & mask;
            let req = NetifRxRequest {
                id: slot as u16,
                pad: 0,
                gref: self.rx_pages[usize::from(page)].gref,
            };
            self.rx.push_request(&req).map_err(self.ring_err())?;
            self.rx_slot[slot as usize] = Some(page);
            n += 1;
        }
        if n > 0
            && self
                .rx
                .push_requests_and_check_notify()
                .map_err(self.ring_err())?
        {
            self.stats.notifies += 1;
            self.rx_event_port().notify()?;
        }
        Ok(n)
    }

    /// Changes how many RX buffers stay posted (0: none, to starve the backend).
    pub fn set_rx_target(&mut self, n: u32) {
        self.rx_target = n.min(self.rx_pages.len() as u32);
    }

    /// TX slots a frame of `len` bytes needs.
    fn tx_slots_for(&self, len: usize, extras: usize) -> usize {
        len.div_ceil(PAGE_SIZE).max(1) + extras
    }

    /// Reaps TX responses, freeing their pages.
    pub fn reap_tx(&mut self) -> Result<usize, NetFrontError> {
        let mut n = 0;
        loop {
            while let Some(r) = self.tx.get_response().map_err(self.ring_err())? {
                n += 1;
                if r.status == NETIF_RSP_NULL {
                    continue;
                }
                let id = usize::from(r.id);
                if !self.tx_busy.get(id).copied().unwrap_or(false) {
                    return Err(self.break_queue(format!("TX response for id {id} not in flight")));
                }
                self.tx_busy[id] = false;
                self.tx_free.push(r.id);
                if r.status != NETIF_RSP_OKAY {
                    self.stats.tx_errors += 1;
                }
            }
            if !self
                .tx
                .final_check_for_responses()
                .map_err(self.ring_err())?
            {
                return Ok(n);
            }
        }
    }

    fn take_tx_id(&mut self) -> Option<u16> {
        let id = self.tx_free.pop()?;
        if let Some(b) = self.tx_busy.get_mut(usize::from(id)) {
            *b = true;
        }
        Some(id)
    }

    /// Queues a frame (`xennet_start_xmit`). `Ok(false)`: no room right now.
    pub fn send_frame(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool, NetFrontError> {
        self.check_broken()?;
        if frame.len() > self.max_frame || frame.len() > usize::from(u16::MAX) || frame.len() < 14 {
            return Err(NetFrontError::Invalid {
                path: self.path.clone(),
                why: format!("frame of {} bytes (max {})", frame.len(), self.max_frame),
            });
        }
        self.reap_tx()?;
        let extras = usize::from(meta.gso.is_some());
        let slots = self.tx_slots_for(frame.len(), extras);
        if self.tx.free_requests() < slots as u32 || self.tx_free.len() < slots - extras {
            return Ok(false);
        }
        let mut flags = 0u16;
        if meta.csum_blank {
            flags |= NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED;
        } else if meta.data_validated {
            flags |= NETTXF_DATA_VALIDATED;
        }
        let nchunks = frame.len().div_ceil(PAGE_SIZE);
        for (i, chunk) in frame.chunks(PAGE_SIZE).enumerate() {
            let Some(id) = self.take_tx_id() else {
                return Err(self.break_queue("TX id pool exhausted".into()));
            };
            let page = self.tx_pages[usize::from(id)];
            self.guest.write_page(page.gfn, 0, chunk)?;
            let more = if i + 1 < nchunks { NETTXF_MORE_DATA } else { 0 };
            let req = if i == 0 {
                NetifTxRequest {
                    gref: page.gref,
                    offset: 0,
                    flags: flags | more | if extras > 0 { NETTXF_EXTRA_INFO } else { 0 },
                    id,
                    size: frame.len() as u16,
                }
            } else {
                NetifTxRequest {
                    gref: page.gref,
                    offset: 0,
                    flags: more,
                    id,
                    size: chunk.len() as u16,
                }
            };
            self.tx.push_request(&req).map_err(self.ring_err())?;
            if i == 0 {
                if let Some(g) = meta.gso {
                    let (type_, size) = match g {
                        Gso::TcpV4 { mss } => (XEN_NETIF_GSO_TYPE_TCPV4, mss),
                        Gso::TcpV6 { mss } => (XEN_NETIF_GSO_TYPE_TCPV6, mss),
                    };
                    let e = NetifExtraInfo::new_gso(
                        0,
                        &NetifExtraGso {
                            size,
                            type_,
                            pad: 0,
                            features: 0,
                        },
                    );
                    self.tx.push_request_as(&e).map_err(self.ring_err())?;
                }
            }
        }
        self.stats.tx_frames += 1;
        self.notify_tx()?;
        Ok(true)
    }

    /// Sends a multicast filter change (a TX request carrying an MCAST_ADD/DEL extra and no
    /// data). The response arrives with the other TX responses.
    pub fn mcast(&mut self, add: bool, addr: [u8; 6]) -> Result<bool, NetFrontError> {
        self.check_broken()?;
        self.reap_tx()?;
        if self.tx.free_requests() < 2 || self.tx_free.is_empty() {
            return Ok(false);
        }
        let Some(id) = self.take_tx_id() else {
            return Ok(false);
        };
        let page = self.tx_pages[usize::from(id)];
        let req = NetifTxRequest {
            gref: page.gref,
            offset: 0,
            flags: NETTXF_EXTRA_INFO,
            id,
            size: 0,
        };
        self.tx.push_request(&req).map_err(self.ring_err())?;
        let type_ = if add {
            XEN_NETIF_EXTRA_TYPE_MCAST_ADD
        } else {
            XEN_NETIF_EXTRA_TYPE_MCAST_DEL
        };
        let e = NetifExtraInfo::new_mcast(type_, 0, &NetifExtraMcast { addr });
        self.tx.push_request_as(&e).map_err(self.ring_err())?;
        self.notify_tx()?;
        Ok(true)
    }

    /// Takes one received frame into `buf`, if a whole one is waiting (`xennet_poll`).
    pub fn recv_frame(&mut self, buf: &mut Vec<u8>) -> Result<Option<FrameMeta>, NetFrontError> {
        self.check_broken()?;
        buf.clear();
        loop {
            let Some(first) = self.peek_rx()? else {
                self.post_rx()?;
                return Ok(None);
            };
            // Collect the whole frame: data slots, with extras after the first. Nothing is
            // consumed until every slot of the frame is published.
            self.rx_partial.clear();
            let mut meta = FrameMeta::default();
            let mut error = first.status < 0;
            let mut pending_extra = first.flags & NETRXF_EXTRA_INFO != 0;
            let mut more = first.flags & NETRXF_MORE_DATA != 0;
            meta.csum_blank = first.flags & NETRXF_CSUM_BLANK != 0;
            meta.data_validated = first.flags & NETRXF_DATA_VALIDATED != 0;
            self.rx_partial.push((first, false));
            let avail = self.rx.unconsumed_responses().map_err(self.ring_err())?;
            let mut idx = 1u32;
            let complete = loop {
                if !pending_extra && !more {
                    break true;
                }
                if idx >= avail {
                    break false;
                }
                if self.rx_partial.len() > 64 {
                    return Err(self.break_queue("RX frame spans more than 64 slots".into()));
                }
                let r = self.peek_rx_at(idx)?;
                idx += 1;
                if pending_extra {
                    let e = r.as_extra_info();
                    pending_extra = e.flags & XEN_NETIF_EXTRA_FLAG_MORE != 0;
                    if e.type_ == XEN_NETIF_EXTRA_TYPE_GSO {
                        let g = e.gso();
                        meta.gso = match g.type_ {
                            XEN_NETIF_GSO_TYPE_TCPV4 => Some(Gso::TcpV4 { mss: g.size }),
                            XEN_NETIF_GSO_TYPE_TCPV6 => Some(Gso::TcpV6 { mss: g.size }),
                            _ => None,
                        };
                    }
                    self.rx_partial.push((r, true));
                    continue;
                }
                error |= r.status < 0;
                more = r.flags & NETRXF_MORE_DATA != 0;
                self.rx_partial.push((r, false));
            };
            if !complete {
                return Ok(None);
            }
            let base = self.rx.rsp_cons();
            let mask = self.rx.size() - 1;
            for _ in 0..idx {
                let _ = self.rx.get_response().map_err(self.ring_err())?;
            }
            // Copy the data and take the buffers back, by ring slot.
            let slots = std::mem::take(&mut self.rx_partial);
            let mut bad = None;
            for (k, (r, is_extra)) in slots.iter().enumerate() {
                let slot = (base.wrapping_add(k as u32) & mask) as usize;
                let Some(page) = self.rx_slot.get_mut(slot).and_then(Option::take) else {
                    bad = Some(format!("RX response in slot {slot} with no buffer posted"));
                    break;
                };
                self.rx_free.push(page);
                if *is_extra || error || r.status <= 0 {
                    continue;
                }
                if usize::from(r.id) != slot {
                    bad = Some(format!("RX response id {} in slot {slot}", r.id));
                    break;
                }
                let (off, len) = (usize::from(r.offset), r.status as usize);
                if off + len > PAGE_SIZE {
                    bad = Some(format!("RX slot offset {off} + {len} beyond the page"));
                    break;
                }
                let at = buf.len();
                buf.resize(at + len, 0);
                self.guest
                    .read_page(self.rx_pages[usize::from(page)].gfn, off, &mut buf[at..])?;
            }
            self.rx_partial = slots;
            if let Some(why) = bad {
                return Err(self.break_queue(why));
            }
            self.post_rx()?;
            if error {
                self.stats.rx_errors += 1;
                buf.clear();
                continue;
            }
            self.stats.rx_frames += 1;
            return Ok(Some(meta));
        }
    }

    fn peek_rx(&mut self) -> Result<Option<NetifRxResponse>, NetFrontError> {
        let waiting = self.rx.unconsumed_responses().map_err(self.ring_err())? > 0
            || self
                .rx
                .final_check_for_responses()
                .map_err(self.ring_err())?;
        if !waiting {
            return Ok(None);
        }
        self.peek_rx_at(0).map(Some)
    }

    fn peek_rx_at(&self, i: u32) -> Result<NetifRxResponse, NetFrontError> {
        let size = self.rx.size();
        let idx = self.rx.rsp_cons().wrapping_add(i) & (size - 1);
        let off = xen::abi::ring::SRING_RING_OFFSET
            + idx as usize * std::mem::size_of::<NetifRxResponse>();
        self.rx
            .memory()
            .read_obj(off)
            .map_err(|e| self.ring_err()(RingError::Mem(e)))
    }

    /// Waits for an event on the queue's channels (or `timeout`).
    pub fn wait_event(&mut self, timeout: Duration) -> Result<(), NetFrontError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        // Ask for events on both rings first.
        let rx_ready = self
            .rx
            .final_check_for_responses()
            .map_err(self.ring_err())?;
        let tx_ready = self
            .tx
            .final_check_for_responses()
            .map_err(self.ring_err())?;
        if rx_ready || tx_ready {
            return Ok(());
        }
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let rx_fd = self
            .rx_port
            .as_ref()
            .unwrap_or(&self.tx_port)
            .event_fd()
            .as_fd();
        let mut fds = [
            PollFd::new(self.tx_port.event_fd().as_fd(), PollFlags::POLLIN),
            PollFd::new(rx_fd, PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, ms);
        let _ = self.tx_port.try_take();
        if let Some(p) = &self.rx_port {
            let _ = p.try_take();
        }
        Ok(())
    }

    // ------------------------------------------------------------------ raw (hostile) helpers

    /// The granted TX page with id `id` (gfn, gref), to place data for raw requests.
    pub fn tx_page(&self, id: u16) -> Option<(Gfn, GrantRef)> {
        self.tx_pages.get(usize::from(id)).map(|p| (p.gfn, p.gref))
    }

    /// Writes `reqs` into the TX ring as they are, publishes and notifies. Returns false if the
    /// ring has no room for them. Use [`NetQueue::reap_tx_raw`] for the responses (a queue
    /// driven raw must not also send frames).
    pub fn push_tx_raw(&mut self, reqs: &[NetifTxRequest]) -> Result<bool, NetFrontError> {
        if self.tx.free_requests() < reqs.len() as u32 {
            return Ok(false);
        }
        for r in reqs {
            self.tx.push_request(r).map_err(self.ring_err())?;
        }
        self.tx.push_requests().map_err(self.ring_err())?;
        self.tx_port.notify()?;
        Ok(true)
    }

    /// Reaps raw TX responses (id, status) without pool bookkeeping.
    pub fn reap_tx_raw(&mut self, out: &mut Vec<NetifTxResponse>) -> Result<usize, NetFrontError> {
        let mut n = 0;
        loop {
            while let Some(r) = self.tx.get_response().map_err(self.ring_err())? {
                out.push(r);
                n += 1;
            }
            if !self
                .tx
                .final_check_for_responses()
                .map_err(self.ring_err())?
            {
                return Ok(n);
            }
        }
    }

    /// Writes bytes into the shared TX ring at `offset` (a flipper rewriting slots, XSA-155).
    pub fn poke_tx_ring(&self, offset: usize, bytes: &[u8]) -> Result<(), NetFrontError> {
        self.tx
            .memory()
            .write(offset, bytes)
            .map_err(|e| self.ring_err()(RingError::Mem(e)))
    }

    /// The TX ring's size (slots).
    pub fn tx_ring_size(&self) -> u32 {
        self.tx.size()
    }

    /// Writes the shared TX `req_prod` directly and notifies (an impossible index, XSA-39).
    pub fn set_tx_req_prod(&self, v: u32) -> Result<(), NetFrontError> {
        self.tx
            .memory()
            .store_u32(SRING_REQ_PROD, v, std::sync::atomic::Ordering::Release)
            .map_err(|e| self.ring_err()(RingError::Mem(e)))?;
        self.tx_port.notify()?;
        Ok(())
    }

    /// The TX ring's shared response producer.
    pub fn tx_rsp_prod(&self) -> Result<u32, NetFrontError> {
        self.tx
            .memory()
            .load_u32(
                xen::abi::ring::SRING_RSP_PROD,
                std::sync::atomic::Ordering::Acquire,
            )
            .map_err(|e| self.ring_err()(RingError::Mem(e)))
    }

    fn release(&mut self) {
        release_pages(&self.guest, &mut self.tx_pages);
        release_pages(&self.guest, &mut self.rx_pages);
        release_pages(&self.guest, &mut self.ring_pages);
    }
}

impl FrameDevice for NetQueue {
    type Error = NetFrontError;

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn offloads(&self) -> bool {
        self.offloads
    }

    fn send(&mut self, frame: &[u8], meta: FrameMeta) -> Result<bool, Self::Error> {
        self.send_frame(frame, meta)
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Option<FrameMeta>, Self::Error> {
        self.recv_frame(buf)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), Self::Error> {
        self.reap_tx()?;
        self.wait_event(timeout)
    }
}

/// The control ring (a page and an event channel) and a data page for keys and mappings.
pub struct CtrlQueue {
    ring: FrontRing<XenNetifCtrlRequest, XenNetifCtrlResponse, SharedMem>,
    page: Page,
    data: Page,
    port: GuestPort,
    next_id: u16,
    path: String,
    guest: Guest,
}

impl std::fmt::Debug for CtrlQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrlQueue")
            .field("path", &self.path)
            .finish()
    }
}

impl CtrlQueue {
    fn new(guest: &Guest, backend: DomId, path: String) -> Result<CtrlQueue, NetFrontError> {
        let mut pages = Vec::new();
        grant_pages(guest, backend, 2, false, &mut pages)?;
        let mem = map_ring_page(guest, pages[0].gfn)?;
        let ring = FrontRing::init(mem).map_err(|source| NetFrontError::Ring {
            path: path.clone(),
            source,
        })?;
        Ok(CtrlQueue {
            ring,
            page: pages[0],
            data: pages[1],
            port: guest.alloc_unbound(backend)?,
            next_id: 0,
            path,
            guest: guest.clone(),
        })
    }

    /// One request, waiting for its response: (status, data).
    pub fn request(
        &mut self,
        type_: u16,
        data: [u32; 3],
        timeout: Duration,
    ) -> Result<(u32, u32), NetFrontError> {
        let rerr = |source| NetFrontError::Ring {
            path: self.path.clone(),
            source,
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.ring
            .push_request(&XenNetifCtrlRequest { id, type_, data })
            .map_err(rerr)?;
        if self.ring.push_requests_and_check_notify().map_err(rerr)? {
            self.port.notify()?;
        }
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self.ring.get_response().map_err(rerr)? {
                if r.id != id || r.type_ != type_ {
                    return Err(NetFrontError::Backend {
                        path: self.path.clone(),
                        why: format!("ctrl response {}/{} for {id}/{type_}", r.id, r.type_),
                    });
                }
                return Ok((r.status, r.data));
            }
            if self.ring.final_check_for_responses().map_err(rerr)? {
                continue;
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(NetFrontError::Backend {
                    path: self.path.clone(),
                    why: "no ctrl response".into(),
                });
            }
            let _ = self.port.wait(left);
        }
    }

    /// The data page's grant (for raw requests).
    pub fn data_gref(&self) -> GrantRef {
        self.data.gref
    }

    /// Writes bytes into the data page.
    pub fn write_data(&self, bytes: &[u8]) -> Result<(), NetFrontError> {
        Ok(self.guest.write_page(self.data.gfn, 0, bytes)?)
    }

    /// SET_HASH_ALGORITHM(TOEPLITZ), SET_HASH_FLAGS, SET_HASH_KEY, SET_HASH_MAPPING_SIZE and
    /// SET_HASH_MAPPING, as the Windows PV drivers configure RSS. Returns the first non-success
    /// status, or 0.
    pub fn configure_toeplitz(
        &mut self,
        key: &[u8],
        flags: u32,
        mapping: &[u32],
        timeout: Duration,
    ) -> Result<u32, NetFrontError> {
        let mut steps: Vec<(u16, [u32; 3])> = vec![
            (
                XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM,
                [XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ, 0, 0],
            ),
            (XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS, [flags, 0, 0]),
        ];
        for (t, d) in steps.drain(..) {
            let (st, _) = self.request(t, d, timeout)?;
            if st != XEN_NETIF_CTRL_STATUS_SUCCESS {
                return Ok(st);
            }
        }
        self.write_data(key)?;
        let (st, _) = self.request(
            XEN_NETIF_CTRL_TYPE_SET_HASH_KEY,
            [self.data.gref, key.len() as u32, 0],
            timeout,
        )?;
        if st != XEN_NETIF_CTRL_STATUS_SUCCESS {
            return Ok(st);
        }
        let (st, _) = self.request(
            XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE,
            [mapping.len() as u32, 0, 0],
            timeout,
        )?;
        if st != XEN_NETIF_CTRL_STATUS_SUCCESS {
            return Ok(st);
        }
        let bytes: Vec<u8> = mapping.iter().flat_map(|q| q.to_le_bytes()).collect();
        self.write_data(&bytes)?;
        let (st, _) = self.request(
            XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING,
            [self.data.gref, mapping.len() as u32, 0],
            timeout,
        )?;
        Ok(st)
    }

    fn release(&mut self) {
        let mut pages = vec![self.page, self.data];
        release_pages(&self.guest, &mut pages);
    }
}

/// A connected (or connecting) network frontend.
pub struct NetFront {
    link: FrontendLink,
    opts: NetFrontOptions,
    features: NetBackendFeatures,
    queues: Vec<NetQueue>,
    ctrl: Option<CtrlQueue>,
    split: bool,
}

impl std::fmt::Debug for NetFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetFront")
            .field("path", &self.link.path())
            .field("features", &self.features)
            .field("queues", &self.queues)
            .finish()
    }
}

fn read_flag(link: &FrontendLink, key: &str) -> Result<bool, NetFrontError> {
    let p = format!("{}/{key}", link.backend());
    let v = link.xs().try_read(&p).map_err(xs_err(link.path()))?;
    Ok(v.as_deref()
        .is_some_and(|v| v.trim_ascii() != b"0" && !v.is_empty()))
}

fn read_u32(link: &FrontendLink, key: &str) -> Result<u32, NetFrontError> {
    let p = format!("{}/{key}", link.backend());
    let v = link.xs().try_read(&p).map_err(xs_err(link.path()))?;
    Ok(
        v.and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok())
            .unwrap_or(0),
    )
}

impl NetFront {
    /// Negotiates and connects `device/vif/<devid>` of `guest`.
    pub fn connect(
        guest: &Guest,
        devid: u32,
        opts: NetFrontOptions,
    ) -> Result<NetFront, NetFrontError> {
        let mut f = NetFront::init(guest, devid, opts)?;
        f.wait_connected()?;
        Ok(f)
    }

    /// `talk_to_netback`: waits for InitWait, sets up the queues, writes the keys and switches
    /// to Connected (Linux netfront does not stop at Initialised).
    pub fn init(
        guest: &Guest,
        devid: u32,
        opts: NetFrontOptions,
    ) -> Result<NetFront, NetFrontError> {
        let link = FrontendLink::open(guest, "vif", devid)?;
        // A device closed earlier (resume, reconnect) starts over from Initialising; the
        // backend then leaves Closed for InitWait, so Closed is not a refusal there.
        let fe = link.path().to_string();
        let own = link
            .xs()
            .try_read(&format!("{fe}/state"))
            .map_err(xs_err(&fe))?
            .and_then(|v| XenbusState::parse(&v).ok());
        let reconnect = own.is_some_and(|s| s != XenbusState::Initialising);
        if reconnect {
            link.switch_state(XenbusState::Initialising)?;
        }
        let s = link.wait_backend("InitWait", opts.timeout, |s| {
            let ready = s >= XenbusState::InitWait && s <= XenbusState::Connected;
            ready || (!reconnect && (s == XenbusState::Closing || s == XenbusState::Closed))
        })?;
        if s >= XenbusState::Closing {
            return Err(FrontError::Protocol {
                path: link.path().to_string(),
                why: format!("backend went {s} instead of InitWait"),
            }
            .into());
        }
        let features = NetBackendFeatures {
            sg: read_flag(&link, "feature-sg")?,
            gso_tcpv4: read_flag(&link, "feature-gso-tcpv4")?,
            gso_tcpv6: read_flag(&link, "feature-gso-tcpv6")?,
            ipv6_csum_offload: read_flag(&link, "feature-ipv6-csum-offload")?,
            rx_copy: read_flag(&link, "feature-rx-copy")?,
            split_event_channels: read_flag(&link, "feature-split-event-channels")?,
            max_queues: read_u32(&link, "multi-queue-max-queues")?,
            ctrl_ring: read_flag(&link, "feature-ctrl-ring")?,
            multicast_control: read_flag(&link, "feature-multicast-control")?,
            dynamic_multicast_control: read_flag(&link, "feature-dynamic-multicast-control")?,
            xdp_headroom: read_flag(&link, "feature-xdp-headroom")?,
        };
        let nq = opts.max_queues.min(features.max_queues.max(1)).max(1);
        let split = opts.split_event_channels && features.split_event_channels;
        let backend = link.backend_id();
        let mut queues = Vec::new();
        let mut front_err = None;
        for i in 0..nq {
            match NetQueue::new(
                guest,
                backend,
                i,
                split,
                format!("{} queue {i}", link.path()),
            ) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    front_err = Some(e);
                    break;
                }
            }
        }
        let ctrl = if front_err.is_none() && opts.ctrl_ring && features.ctrl_ring {
            match CtrlQueue::new(guest, backend, format!("{} ctrl", link.path())) {
                Ok(c) => Some(c),
                Err(e) => {
                    front_err = Some(e);
                    None
                }
            }
        } else {
            None
        };
        let mut front = NetFront {
            link,
            opts,
            features,
            queues,
            ctrl,
            split,
        };
        if let Some(e) = front_err {
            front.release();
            return Err(e);
        }
        let sg = front.opts.sg && front.features.sg;
        let gso = sg && front.opts.gso && front.features.gso_tcpv4;
        let headroom = if front.features.xdp_headroom {
            usize::from(front.opts.xdp_headroom)
        } else {
            0
        };
        let max_frame = if gso {
            usize::from(u16::MAX)
        } else if sg {
            (front.opts.mtu + 14).max(1514)
        } else {
            (front.opts.mtu + 14).min(PAGE_SIZE - headroom)
        };
        for q in &mut front.queues {
            q.rx_target = front.opts.rx_buffers.min(q.rx_pages.len() as u32);
            q.max_frame = max_frame;
            q.offloads = gso;
            q.sg = sg;
            q.headroom = headroom;
            if let Err(e) = q.post_rx() {
                front.release();
                return Err(e);
            }
        }
        if let Err(e) = front.write_keys() {
            front.release();
            return Err(e);
        }
        front.link.switch_state(XenbusState::Connected)?;
        Ok(front)
    }

    /// The keys `talk_to_netback` writes, relative to the device directory, in its order.
    pub fn negotiation_keys(&self) -> Vec<(String, String)> {
        let mut keys = Vec::new();
        let one = |b: bool| u8::from(b).to_string();
        let per_queue = |keys: &mut Vec<(String, String)>, prefix: &str, q: &NetQueue| {
            let (t, r) = q.ring_refs();
            keys.push((format!("{prefix}tx-ring-ref"), t.to_string()));
            keys.push((format!("{prefix}rx-ring-ref"), r.to_string()));
            match &q.rx_port {
                Some(rx) => {
                    keys.push((
                        format!("{prefix}event-channel-tx"),
                        q.tx_port.port().to_string(),
                    ));
                    keys.push((format!("{prefix}event-channel-rx"), rx.port().to_string()));
                }
                None => keys.push((
                    format!("{prefix}event-channel"),
                    q.tx_port.port().to_string(),
                )),
            }
        };
        if self.queues.len() == 1 {
            per_queue(&mut keys, "", &self.queues[0]);
        } else {
            keys.push((
                "multi-queue-num-queues".into(),
                self.queues.len().to_string(),
            ));
            for q in &self.queues {
                per_queue(&mut keys, &format!("queue-{}/", q.index), q);
            }
        }
        if let Some(c) = &self.ctrl {
            keys.push(("ctrl-ring-ref".into(), c.page.gref.to_string()));
            keys.push(("event-channel-ctrl".into(), c.port.port().to_string()));
        }
        keys.push(("request-rx-copy".into(), "1".into()));
        keys.push(("feature-rx-notify".into(), "1".into()));
        keys.push(("feature-sg".into(), one(self.opts.sg)));
        keys.push(("feature-gso-tcpv4".into(), one(self.opts.gso)));
        keys.push(("feature-gso-tcpv6".into(), one(self.opts.gso)));
        keys.push((
            "feature-ipv6-csum-offload".into(),
            one(self.opts.ipv6_csum_offload),
        ));
        if !self.opts.csum_offload {
            keys.push(("feature-no-csum-offload".into(), "1".into()));
        }
        if self.opts.multicast_control && self.features.multicast_control {
            keys.push(("request-multicast-control".into(), "1".into()));
        }
        if self.features.xdp_headroom && self.opts.xdp_headroom > 0 {
            keys.push(("xdp-headroom".into(), self.opts.xdp_headroom.to_string()));
        }
        keys
    }

    fn write_keys(&self) -> Result<(), NetFrontError> {
        let fe = self.link.path().to_string();
        let mut keys = self.negotiation_keys();
        keys.retain(|(k, _)| !self.opts.omit.contains(k));
        let over = &self.opts.overrides;
        self.link
            .xs()
            .transaction(|tx| {
                for (k, v) in keys.iter().chain(over.iter()) {
                    tx.write(&format!("{fe}/{k}"), v.as_bytes())?;
                }
                Ok(())
            })
            .map_err(xs_err(&fe))?;
        Ok(())
    }

    /// Waits for the backend's Connected (an error if it closes instead).
    pub fn wait_connected(&mut self) -> Result<(), NetFrontError> {
        let s = self
            .link
            .wait_backend("Connected", self.opts.timeout, |s| {
                s == XenbusState::Connected || s >= XenbusState::Closing
            })?;
        if s != XenbusState::Connected {
            return Err(FrontError::Protocol {
                path: self.link.path().to_string(),
                why: format!("backend went {s} instead of Connected"),
            }
            .into());
        }
        // Kick: the backend may have bound after we posted.
        for q in &mut self.queues {
            q.tx_port.notify()?;
            if let Some(p) = &q.rx_port {
                p.notify()?;
            }
        }
        Ok(())
    }

    /// The xenstore link.
    pub fn link(&self) -> &FrontendLink {
        &self.link
    }
    /// The backend's features.
    pub fn features(&self) -> &NetBackendFeatures {
        &self.features
    }
    /// Whether split event channels are in use.
    pub fn split(&self) -> bool {
        self.split
    }
    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }
    /// One queue.
    pub fn queue(&mut self, i: usize) -> Option<&mut NetQueue> {
        self.queues.get_mut(i)
    }
    /// Takes the queues out (to drive them from other threads); `close` still works.
    pub fn take_queues(&mut self) -> Vec<NetQueue> {
        std::mem::take(&mut self.queues)
    }
    /// The control ring, if negotiated.
    pub fn ctrl(&mut self) -> Option<&mut CtrlQueue> {
        self.ctrl.as_mut()
    }

    /// Closes the device: Closing, wait for the backend to close, Closed; then revokes every
    /// grant it can.
    pub fn close(&mut self) -> Result<(), NetFrontError> {
        self.link.switch_state(XenbusState::Closing)?;
        self.link.wait_backend("Closing", self.opts.timeout, |s| {
            matches!(s, XenbusState::Closing | XenbusState::Closed)
        })?;
        self.link.switch_state(XenbusState::Closed)?;
        let _ = self
            .link
            .wait_backend("Closed", self.opts.timeout, |s| s == XenbusState::Closed);
        self.release();
        Ok(())
    }

    fn release(&mut self) {
        for q in &mut self.queues {
            q.release();
        }
        if let Some(c) = &mut self.ctrl {
            c.release();
        }
    }
}

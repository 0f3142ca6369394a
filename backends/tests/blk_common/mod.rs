//! Shared rig for the blkback tests: a xensim host and daemon, a `BlkDriver` behind a
//! `BackendWatcher`, a RAM disk engine whose completions a test can hold back, and a minimal
//! blkfront that writes raw ring slots (so hostile frontends are easy to express).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backends::blk::engine::{Completion, Engine, EngineError, EngineInfo, IoOp, IoRequest};
use backends::blk::{BlkConfig, BlkDriver, BlkStats, DiskParams, EngineFactory};
use nix::sys::eventfd::{EfdFlags, EventFd};
use xen::abi::blkif::*;
use xen::abi::grant_table::{GTF_READING, GTF_WRITING};
use xen::{Gfn, GrantRef, XenHost, PAGE_SIZE};
use xenbus::backend::BackendWatcher;
use xenbus::{XenbusState, XsClient, XsOps};
use xensim::client::SimHost;
use xensim::front::FrontendLink;
use xensim::guest::{Guest, GuestPort};
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::DeviceSpec;

pub const T: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ RAM disk engine

/// One operation the engine saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    pub op: IoOp,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
}

/// One engine's queues (each engine has its own completion eventfd).
struct EngQ {
    held: Mutex<VecDeque<IoRequest>>,
    done: Mutex<VecDeque<Completion>>,
    efd: EventFd,
    in_flight: AtomicU64,
}

/// The disk behind [`MemEngine`]s, shared with the test.
pub struct MemDisk {
    pub data: Mutex<Vec<u8>>,
    pub log: Mutex<Vec<Logged>>,
    hold: AtomicBool,
    queues: Mutex<Vec<Arc<EngQ>>>,
    capacity: AtomicU64,
    /// The most requests any one engine kick handed over.
    pub max_kick_batch: AtomicU64,
    /// Reaps that fail (after handing over what finished, as the raw engine's reap does
    /// when resubmitting the rest of a short transfer fails).
    pub reap_errors: AtomicU64,
    /// Reaps that fail before handing anything over, after taking the eventfd's signal (as
    /// io_uring's reap does when running the deferred completions fails).
    pub reap_failures_early: AtomicU64,
}

impl MemDisk {
    pub fn new(capacity: u64) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0u8; capacity as usize]),
            log: Mutex::new(Vec::new()),
            hold: AtomicBool::new(false),
            queues: Mutex::new(Vec::new()),
            capacity: AtomicU64::new(capacity),
            max_kick_batch: AtomicU64::new(0),
            reap_errors: AtomicU64::new(0),
            reap_failures_early: AtomicU64::new(0),
        })
    }

    /// Completions are held back until [`MemDisk::release`].
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Requests held now (all engines).
    pub fn held(&self) -> usize {
        self.queues
            .lock()
            .unwrap()
            .iter()
            .map(|q| q.held.lock().unwrap().len())
            .sum()
    }

    /// Performs and completes everything held, and stops holding.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        let queues = self.queues.lock().unwrap().clone();
        for q in queues {
            let reqs: Vec<IoRequest> = q.held.lock().unwrap().drain(..).collect();
            for r in reqs {
                self.execute(&q, r);
            }
            let _ = q.efd.write(1);
        }
    }

    pub fn set_capacity(&self, bytes: u64) {
        self.data.lock().unwrap().resize(bytes as usize, 0);
        self.capacity.store(bytes, Ordering::SeqCst);
    }

    pub fn ops(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    pub fn write_at(&self, offset: usize, bytes: &[u8]) {
        self.data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    pub fn read_at(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset..offset + len].to_vec()
    }

    fn execute(&self, q: &EngQ, mut r: IoRequest) {
        let cap = self.capacity.load(Ordering::SeqCst);
        let total: u64 = match r.op {
            IoOp::Read | IoOp::Write => r.segs.iter().map(|s| s.len() as u64).sum(),
            _ => r.len,
        };
        self.log.lock().unwrap().push(Logged {
            op: r.op,
            offset: r.offset,
            len: total,
            fua: r.fua,
        });
        let result = if r.offset.checked_add(total).is_none_or(|e| e > cap) {
            Err(libc::EIO)
        } else {
            let mut data = self.data.lock().unwrap();
            let mut at = r.offset as usize;
            let mut ok = true;
            for s in &r.segs {
                let dst = &mut data[at..at + s.len()];
                let res = match r.op {
                    IoOp::Read => s.mem().write(s.offset(), dst),
                    IoOp::Write => s.mem().read(s.offset(), dst),
                    _ => Ok(()),
                };
                ok &= res.is_ok();
                at += s.len();
            }
            if matches!(
                r.op,
                IoOp::Discard | IoOp::WriteZeroes | IoOp::SecureDiscard
            ) {
                data[r.offset as usize..(r.offset + r.len) as usize].fill(0);
            }
            if ok {
                Ok(total)
            } else {
                Err(libc::EFAULT)
            }
        };
        r.segs.clear();
        q.in_flight.fetch_sub(1, Ordering::SeqCst);
        q.done.lock().unwrap().push_back(Completion {
            tag: r.tag,
            result,
            segs: r.segs,
        });
    }
}

/// An engine over a [`MemDisk`] that completes at kick unless the disk holds completions.
pub struct MemEngine {
    disk: Arc<MemDisk>,
    q: Arc<EngQ>,
    info: EngineInfo,
    queued: Vec<IoRequest>,
}

impl MemEngine {
    pub fn new(disk: Arc<MemDisk>, read_only: bool) -> MemEngine {
        let q = Arc::new(EngQ {
            held: Mutex::new(VecDeque::new()),
            done: Mutex::new(VecDeque::new()),
            efd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap(),
            in_flight: AtomicU64::new(0),
        });
        disk.queues.lock().unwrap().push(q.clone());
        MemEngine {
            info: EngineInfo {
                capacity: disk.capacity.load(Ordering::SeqCst),
                logical_sector: 512,
                physical_sector: 4096,
                read_only,
                discard: Some(4096),
                secure_discard: false,
                volatile_cache: true,
                queue_depth: 1024,
                describe: "test RAM disk".into(),
            },
            disk,
            q,
            queued: Vec::new(),
        }
    }
}

impl Engine for MemEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }
    fn queue(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        self.q.in_flight.fetch_add(1, Ordering::SeqCst);
        self.queued.push(req);
        Ok(())
    }
    fn kick(&mut self) -> Result<(), EngineError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.disk
            .max_kick_batch
            .fetch_max(self.queued.len() as u64, Ordering::SeqCst);
        for r in self.queued.drain(..) {
            if self.disk.hold.load(Ordering::SeqCst) {
                self.q.held.lock().unwrap().push_back(r);
            } else {
                self.disk.execute(&self.q, r);
            }
        }
        let _ = self.q.efd.write(1);
        Ok(())
    }
    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.q.efd.as_fd()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, EngineError> {
        let _ = self.q.efd.read();
        if take_one(&self.disk.reap_failures_early) {
            return Err(reap_error(libc::EBADR));
        }
        let mut d = self.q.done.lock().unwrap();
        let n = d.len();
        out.extend(d.drain(..));
        if take_one(&self.disk.reap_errors) {
            return Err(reap_error(libc::EIO));
        }
        Ok(n)
    }
    fn in_flight(&self) -> usize {
        self.q.in_flight.load(Ordering::SeqCst) as usize
    }
    fn refresh_capacity(&mut self) -> Result<u64, EngineError> {
        self.info.capacity = self.disk.capacity.load(Ordering::SeqCst);
        Ok(self.info.capacity)
    }
}

/// Takes one from a counter of failures to inject: true if there was one.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| e.checked_sub(1))
        .is_ok()
}

fn reap_error(errno: i32) -> EngineError {
    EngineError::Io {
        op: "test reap",
        source: std::io::Error::from_raw_os_error(errno),
    }
}

/// A factory that serves every device from `disk`.
pub fn mem_factory(disk: Arc<MemDisk>) -> EngineFactory {
    Arc::new(move |p: &DiskParams| {
        Ok(Box::new(MemEngine::new(disk.clone(), p.read_only)) as Box<dyn Engine>)
    })
}

// ------------------------------------------------------------------ rig

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub _server: Server,
    pub host: Arc<Host>,
    pub guest: Guest,
    pub driver: Arc<BlkDriver>,
    pub watcher: Option<BackendWatcher>,
    pub disk: Arc<MemDisk>,
    pub toolstack: xensim::toolstack::Toolstack,
}

pub const DISK_BYTES: u64 = 4 << 20;

/// A vbd device spec for `devid` with the given mode.
pub fn vbd_spec(domid: u16, devid: u32, mode: &str) -> DeviceSpec {
    let mut s = DeviceSpec::new("vbd", domid, devid);
    s.backend = vec![
        ("params".into(), "/test/disk.img".into()),
        ("mode".into(), mode.into()),
        ("device-type".into(), "disk".into()),
    ];
    s
}

pub fn rig_with(devices: &[(u32, &str)], config: BlkConfig) -> Rig {
    let disk = MemDisk::new(DISK_BYTES);
    rig_with_factory(devices, config, disk.clone(), mem_factory(disk))
}

pub fn rig_with_factory(
    devices: &[(u32, &str)],
    config: BlkConfig,
    disk: Arc<MemDisk>,
    factory: EngineFactory,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("g", 2048).unwrap();
    let ts = host.toolstack().unwrap();
    for (devid, mode) in devices {
        ts.add_device(&vbd_spec(domid, *devid, mode)).unwrap();
    }
    let sim: Arc<dyn XenHost> = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let xs = XsClient::new(sim.open_xenstore(&xen::XsTransport::Socket(None)).unwrap()).unwrap();
    let driver = BlkDriver::new(sim, "vbd", config, factory);
    let watcher = BackendWatcher::start(xs, driver.clone(), 0, u32::from(domid)).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    Rig {
        _dir: dir,
        _server: server,
        host,
        guest,
        driver,
        watcher: Some(watcher),
        disk,
        toolstack: ts,
    }
}

pub fn rig(devices: &[(u32, &str)]) -> Rig {
    rig_with(devices, BlkConfig::default())
}

impl Rig {
    pub fn stats(&self, devid: u32) -> BlkStats {
        self.driver
            .stats()
            .into_iter()
            .find(|((_, d), _)| *d == devid)
            .map(|(_, s)| s)
            .unwrap_or_default()
    }

    pub fn backend_path(&self, devid: u32) -> String {
        format!("/local/domain/0/backend/vbd/{}/{devid}", self.guest.domid())
    }

    pub fn read_backend(&self, devid: u32, key: &str) -> Option<String> {
        self.toolstack
            .xs()
            .try_read(&format!("{}/{key}", self.backend_path(devid)))
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// Waits (on the watcher's condition variable) until the device is connected or not.
    pub fn wait_connected(&self, devid: u32, connected: bool) -> bool {
        self.watcher.as_ref().unwrap().wait_until(T, |d| {
            d.iter()
                .any(|i| i.devid == devid && i.connected == connected)
        })
    }
}

/// Waits for a condition another thread makes true, yielding between looks.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

// ------------------------------------------------------------------ a minimal blkfront

/// How the test frontend negotiates.
#[derive(Debug, Clone)]
pub struct FrontOpts {
    /// `ring-page-order` to write (None: single `ring-ref`).
    pub order: Option<u32>,
    /// Queues (>1 writes `multi-queue-num-queues` and `queue-N/`).
    pub queues: u32,
    /// `protocol` to write.
    pub protocol: Option<&'static str>,
    /// `feature-persistent`.
    pub persistent: bool,
    /// Extra frontend keys, written last (hostile values).
    pub extra: Vec<(String, String)>,
    /// `req_prod` written into the shared ring before it is published (hostile if > size).
    pub initial_req_prod: u32,
}

impl Default for FrontOpts {
    fn default() -> Self {
        FrontOpts {
            order: None,
            queues: 1,
            protocol: None,
            persistent: false,
            extra: Vec::new(),
            initial_req_prod: 0,
        }
    }
}

pub struct FrontQueue {
    pub base: usize,
    pub pages: Vec<Gfn>,
    pub refs: Vec<GrantRef>,
    pub port: GuestPort,
    pub size: u32,
    pub slot: usize,
    pub req_prod_pvt: u32,
    pub rsp_cons: u32,
}

pub struct TestFront {
    pub guest: Guest,
    pub link: FrontendLink,
    pub queues: Vec<FrontQueue>,
    pub x86_32: bool,
}

/// A response as the frontend reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rsp {
    pub id: u64,
    pub op: u8,
    pub status: i16,
}

impl TestFront {
    /// Publishes rings and waits for the backend to be Connected.
    pub fn connect(guest: &Guest, devid: u32, opts: FrontOpts) -> TestFront {
        let f = Self::publish(guest, devid, opts);
        f.link
            .wait_backend("Connected", T, |s| s == XenbusState::Connected)
            .unwrap();
        f.link.switch_state(XenbusState::Connected).unwrap();
        f
    }

    /// Publishes rings and goes Initialised, without waiting.
    pub fn publish(guest: &Guest, devid: u32, opts: FrontOpts) -> TestFront {
        let link = FrontendLink::open(guest, "vbd", devid).unwrap();
        let x86_32 = opts.protocol == Some(XEN_IO_PROTO_ABI_X86_32);
        let slot = if x86_32 {
            BLKIF_X86_32_SLOT_SIZE
        } else {
            BLKIF_SLOT_SIZE
        };
        let npages = 1usize << opts.order.unwrap_or(0);
        let mut queues = Vec::new();
        for _ in 0..opts.queues {
            let pages: Vec<Gfn> = (0..npages).map(|_| guest.alloc_page().unwrap()).collect();
            for w in pages.windows(2) {
                assert_eq!(w[1], w[0] + 1, "ring pages must be contiguous");
            }
            let refs = pages
                .iter()
                .map(|g| guest.grant(link.backend_id(), *g, false).unwrap())
                .collect();
            let base = pages[0] as usize * PAGE_SIZE;
            let ram = guest.ram();
            ram.store_u32(base + 4, 1, Ordering::Relaxed).unwrap(); // req_event
            ram.store_u32(base + 12, 1, Ordering::Release).unwrap(); // rsp_event
            ram.store_u32(base, opts.initial_req_prod, Ordering::Release)
                .unwrap(); // req_prod
            let size = xen::abi::ring::ring_entries(npages * PAGE_SIZE, slot);
            queues.push(FrontQueue {
                base,
                pages,
                refs,
                port: guest.alloc_unbound(link.backend_id()).unwrap(),
                size,
                slot,
                req_prod_pvt: 0,
                rsp_cons: 0,
            });
        }
        let fe = link.path().to_string();
        let nq = opts.queues;
        link.xs()
            .transaction(|tx| {
                if let Some(o) = opts.order {
                    tx.write(&format!("{fe}/ring-page-order"), o.to_string().as_bytes())?;
                }
                if nq > 1 {
                    tx.write(
                        &format!("{fe}/multi-queue-num-queues"),
                        nq.to_string().as_bytes(),
                    )?;
                }
                for (i, q) in queues.iter().enumerate() {
                    let pre = if nq > 1 {
                        format!("{fe}/queue-{i}")
                    } else {
                        fe.clone()
                    };
                    match opts.order {
                        None => {
                            tx.write(&format!("{pre}/ring-ref"), q.refs[0].to_string().as_bytes())?
                        }
                        Some(_) => {
                            for (j, r) in q.refs.iter().enumerate() {
                                tx.write(&format!("{pre}/ring-ref{j}"), r.to_string().as_bytes())?;
                            }
                        }
                    }
                    tx.write(
                        &format!("{pre}/event-channel"),
                        q.port.port().to_string().as_bytes(),
                    )?;
                }
                if let Some(p) = opts.protocol {
                    tx.write(&format!("{fe}/protocol"), p.as_bytes())?;
                }
                if opts.persistent {
                    tx.write(&format!("{fe}/feature-persistent"), b"1")?;
                }
                for (k, v) in &opts.extra {
                    tx.write(&format!("{fe}/{k}"), v.as_bytes())?;
                }
                tx.write(&format!("{fe}/state"), b"3")
            })
            .unwrap();
        TestFront {
            guest: guest.clone(),
            link,
            queues,
            x86_32,
        }
    }

    /// Allocates a page filled with `byte` and grants it to the backend.
    pub fn data_page(&self, byte: u8, readonly: bool) -> (Gfn, GrantRef) {
        let g = self.guest.alloc_page().unwrap();
        self.guest.write_page(g, 0, &[byte; PAGE_SIZE]).unwrap();
        let r = self
            .guest
            .grant(self.link.backend_id(), g, readonly)
            .unwrap();
        (g, r)
    }

    pub fn page(&self, g: Gfn) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        self.guest.read_page(g, 0, &mut b).unwrap();
        b
    }

    fn slot_offset(&self, q: usize, idx: u32) -> usize {
        let fq = &self.queues[q];
        fq.base + 64 + (idx & (fq.size - 1)) as usize * fq.slot
    }

    /// Writes a native request into the next slot (not yet published).
    pub fn put(&mut self, q: usize, req: &BlkifRequest) {
        let at = self.slot_offset(q, self.queues[q].req_prod_pvt);
        if self.x86_32 {
            let r32 = BlkifX86_32Request {
                operation: req.operation,
                nr_segments: req.nr_segments,
                handle: req.handle,
                id: req.id,
                sector_number: req.sector_number,
                seg: req.seg,
            };
            self.guest.ram().write_obj(at, &r32).unwrap();
        } else {
            self.guest.ram().write_obj(at, req).unwrap();
        }
        self.queues[q].req_prod_pvt = self.queues[q].req_prod_pvt.wrapping_add(1);
    }

    /// Writes raw slot bytes into the next slot.
    pub fn put_bytes(&mut self, q: usize, bytes: &[u8]) {
        let at = self.slot_offset(q, self.queues[q].req_prod_pvt);
        self.guest.ram().write(at, bytes).unwrap();
        self.queues[q].req_prod_pvt = self.queues[q].req_prod_pvt.wrapping_add(1);
    }

    /// Address of the slot of request index `idx` (to rewrite it behind the backend's back).
    pub fn slot_addr(&self, q: usize, idx: u32) -> usize {
        self.slot_offset(q, idx)
    }

    /// Publishes `req_prod` and notifies.
    pub fn push(&mut self, q: usize) {
        self.push_silent(q);
        self.queues[q].port.notify().unwrap();
    }

    /// Publishes `req_prod` without notifying (a backend that polls the ring still sees it).
    pub fn push_silent(&mut self, q: usize) {
        let fq = &self.queues[q];
        self.guest
            .ram()
            .store_u32(fq.base, fq.req_prod_pvt, Ordering::Release)
            .unwrap();
    }

    /// Writes `req_prod` directly (hostile).
    pub fn set_req_prod(&self, q: usize, v: u32) {
        self.guest
            .ram()
            .store_u32(self.queues[q].base, v, Ordering::Release)
            .unwrap();
        self.queues[q].port.notify().unwrap();
    }

    pub fn rsp_prod(&self, q: usize) -> u32 {
        self.guest
            .ram()
            .load_u32(self.queues[q].base + 8, Ordering::Acquire)
            .unwrap()
    }

    fn take_rsp(&mut self, q: usize) -> Option<Rsp> {
        let fq = &self.queues[q];
        if self.rsp_prod(q) == fq.rsp_cons {
            return None;
        }
        let at = self.slot_offset(q, fq.rsp_cons);
        let r = if self.x86_32 {
            let r: BlkifX86_32Response = self.guest.ram().read_obj(at).unwrap();
            Rsp {
                id: r.id,
                op: r.operation,
                status: r.status,
            }
        } else {
            let r: BlkifResponse = self.guest.ram().read_obj(at).unwrap();
            Rsp {
                id: r.id,
                op: r.operation,
                status: r.status,
            }
        };
        self.queues[q].rsp_cons = fq.rsp_cons.wrapping_add(1);
        Some(r)
    }

    /// Waits (on the event channel) for `n` responses.
    pub fn responses(&mut self, q: usize, n: usize) -> Vec<Rsp> {
        let mut out = Vec::new();
        let end = Instant::now() + T;
        while out.len() < n {
            while let Some(r) = self.take_rsp(q) {
                out.push(r);
            }
            if out.len() >= n {
                break;
            }
            let cons = self.queues[q].rsp_cons;
            self.guest
                .ram()
                .store_u32(
                    self.queues[q].base + 12,
                    cons.wrapping_add(1),
                    Ordering::SeqCst,
                )
                .unwrap();
            if self.rsp_prod(q) != cons {
                continue;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out: {} of {n} responses", out.len());
            let _ = self.queues[q].port.wait(left);
        }
        out
    }

    /// One request, one response.
    pub fn roundtrip(&mut self, q: usize, req: &BlkifRequest) -> Rsp {
        self.put(q, req);
        self.push(q);
        self.responses(q, 1)[0]
    }

    pub fn close(&self) {
        self.link.switch_state(XenbusState::Closing).unwrap();
        self.link
            .wait_backend("Closing", T, |s| {
                matches!(s, XenbusState::Closing | XenbusState::Closed)
            })
            .unwrap();
        self.link.switch_state(XenbusState::Closed).unwrap();
        self.link
            .wait_backend("Closed", T, |s| s == XenbusState::Closed)
            .unwrap();
    }
}

/// Whether the backend still has `gref` mapped (GTF_reading/GTF_writing).
pub fn mapped(guest: &Guest, gref: GrantRef) -> bool {
    guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING) != 0
}

/// A read/write request over `segs` = (gref, first, last).
pub fn rw(op: u8, id: u64, sector: u64, segs: &[(GrantRef, u8, u8)]) -> BlkifRequest {
    let mut r = BlkifRequest {
        operation: op,
        nr_segments: segs.len() as u8,
        handle: 0,
        id,
        sector_number: sector,
        ..Default::default()
    };
    for (i, (g, f, l)) in segs.iter().enumerate() {
        r.seg[i] = BlkifRequestSegment {
            gref: *g,
            first_sect: *f,
            last_sect: *l,
            _pad: [0; 2],
        };
    }
    r
}

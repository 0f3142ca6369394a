//! A fake blkback driven by the tests: it writes the backend's keys and states as dom0 and
//! serves the frontend's rings through `SimHost` (grant maps, event channels), against an
//! in-memory disk. It is deliberately simple (map per segment, one thread per ring) and can
//! misbehave on request (wrong response ids, keeping a grant mapped).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::abi::blkif::*;
use xen::ring::BackRing;
use xen::{DomId, GrantMapping, GrantRef, GrantTables, Port, XenHost, PAGE_SIZE};
use xenbus::{XenbusState, XsClient, XsOps};
use xensim::client::SimHost;
use xensim::front::blk::{BlkFront, BlkFrontOptions};
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::DeviceSpec;

/// Device id of xvda (what xl writes).
pub const DEVID: u32 = 51712;
/// Disk size of the fake backend, in sectors (1 MiB).
pub const SECTORS: u64 = 2048;
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub _server: Server,
    pub host: Arc<Host>,
    pub dom0: Arc<SimHost>,
    pub xs: XsClient,
    pub guest: Guest,
    pub spec: DeviceSpec,
}

/// A host with a guest and a `vbd` device as xl adds it (backend state 1).
pub fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("xensim.sock")).unwrap();
    let domid = host.create_domain("guest", 4096).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    let dom0 = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let ts = host.toolstack().unwrap();
    let mut spec = DeviceSpec::new("vbd", domid, DEVID);
    spec.backend = vec![
        ("params".into(), "/dev/null".into()),
        ("mode".into(), "w".into()),
        ("device-type".into(), "disk".into()),
    ];
    spec.frontend = vec![
        ("virtual-device".into(), DEVID.to_string()),
        ("device-type".into(), "disk".into()),
    ];
    ts.add_device(&spec).unwrap();
    Rig {
        _dir: dir,
        _server: server,
        host,
        dom0,
        xs: ts.xs().clone(),
        guest,
        spec,
    }
}

impl Rig {
    pub fn be(&self, key: &str) -> String {
        format!("{}/{key}", self.spec.backend_path())
    }
    pub fn fe(&self, key: &str) -> String {
        format!("{}/{key}", self.spec.frontend_path())
    }
    pub fn write_be(&self, key: &str, v: &str) {
        self.xs.write(&self.be(key), v.as_bytes()).unwrap();
    }
    pub fn read_fe(&self, key: &str) -> Option<String> {
        self.xs
            .try_read(&self.fe(key))
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }
    pub fn set_be_state(&self, s: XenbusState) {
        self.write_be("state", s.as_str());
    }

    /// Advertises features as blkback's probe does, then InitWait.
    pub fn backend_initwait(&self, keys: &[(&str, &str)]) {
        for (k, v) in keys {
            self.write_be(k, v);
        }
        self.set_be_state(XenbusState::InitWait);
    }

    /// Every key under the frontend directory, relative, recursively (sorted).
    pub fn frontend_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![String::new()];
        while let Some(rel) = todo.pop() {
            let path = if rel.is_empty() {
                self.spec.frontend_path()
            } else {
                self.fe(&rel)
            };
            for c in self.xs.directory(&path).unwrap() {
                let r = if rel.is_empty() {
                    c.clone()
                } else {
                    format!("{rel}/{c}")
                };
                let v = self.xs.read(&self.fe(&r)).unwrap();
                if !v.is_empty() {
                    out.push(r.clone());
                }
                todo.push(r);
            }
        }
        out.sort();
        out
    }
}

/// What the fake backend should do wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Misbehave {
    #[default]
    None,
    /// Answer with an id no request had.
    WrongId,
    /// Keep the first data grant it maps mapped forever.
    KeepMapping,
    /// Answer with another operation than the request's.
    WrongOp,
}

/// The disk and what the backend saw, shared by its ring threads.
#[derive(Debug, Default)]
pub struct Seen {
    pub ops: Mutex<Vec<(u8, u16)>>,
    /// (first_sect, last_sect) of every segment of the last read or write.
    pub last_segs: Mutex<Vec<(u8, u8)>>,
    pub requests: AtomicU64,
}

pub struct FakeBackend {
    pub disk: Arc<Mutex<Vec<u8>>>,
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    kept: Arc<Mutex<Vec<GrantMapping>>>,
}

/// Default features: as Linux blkback 6.x advertises at probe.
pub const LINUX_PROBE_KEYS: &[(&str, &str)] = &[
    ("feature-max-indirect-segments", "256"),
    ("multi-queue-max-queues", "4"),
    ("max-ring-page-order", "4"),
];

/// Keys Linux blkback writes in connect() before Connected.
pub const LINUX_CONNECT_KEYS: &[(&str, &str)] = &[
    ("feature-flush-cache", "1"),
    ("feature-barrier", "1"),
    ("feature-discard", "1"),
    ("discard-granularity", "4096"),
    ("discard-alignment", "0"),
    ("discard-secure", "0"),
    ("feature-persistent", "1"),
    ("sectors", "2048"),
    ("info", "0"),
    ("sector-size", "512"),
    ("physical-sector-size", "512"),
];

fn read_u32(xs: &XsClient, path: &str) -> Option<u32> {
    xs.try_read(path)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
}

impl FakeBackend {
    /// Reads the frontend's ring keys, maps every ring, binds every event channel, writes the
    /// connect keys and goes Connected.
    pub fn connect(rig: &Rig, connect_keys: &[(&str, &str)], mis: Misbehave) -> FakeBackend {
        let xs = &rig.xs;
        let fe = rig.spec.frontend_path();
        let order = read_u32(xs, &format!("{fe}/ring-page-order")).unwrap_or(0);
        let nq = read_u32(xs, &format!("{fe}/multi-queue-num-queues")).unwrap_or(1);
        let domid = rig.guest.domid();
        let disk = Arc::new(Mutex::new(vec![0u8; (SECTORS * 512) as usize]));
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let kept = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for q in 0..nq {
            let dir = if nq == 1 {
                fe.clone()
            } else {
                format!("{fe}/queue-{q}")
            };
            let refs: Vec<GrantRef> = if order == 0 {
                vec![read_u32(xs, &format!("{dir}/ring-ref")).unwrap()]
            } else {
                (0..1u32 << order)
                    .map(|i| read_u32(xs, &format!("{dir}/ring-ref{i}")).unwrap())
                    .collect()
            };
            let port = read_u32(xs, &format!("{dir}/event-channel")).unwrap();
            let gt: Arc<dyn GrantTables> = Arc::from(rig.dom0.open_gnttab().unwrap());
            let ring_map = gt.map(domid, &refs, true).unwrap();
            let ev = rig.dom0.open_evtchn().unwrap();
            let local = ev.bind_interdomain(domid, port).unwrap();
            let ring = BackRing::<BlkifRequest, BlkifResponse, _>::new(ring_map).unwrap();
            let mut srv = RingServer {
                domid,
                gt,
                ring,
                ev,
                local,
                disk: disk.clone(),
                seen: seen.clone(),
                mis,
                kept: kept.clone(),
            };
            let st = stop.clone();
            threads.push(std::thread::spawn(move || srv.run(&st)));
        }
        for (k, v) in connect_keys {
            rig.write_be(k, v);
        }
        rig.set_be_state(XenbusState::Connected);
        FakeBackend {
            disk,
            seen,
            stop,
            threads,
            kept,
        }
    }

    /// Stops serving and unmaps every ring (what blkback does on Closing); the kept mapping of
    /// [`Misbehave::KeepMapping`] stays.
    pub fn disconnect(mut self) -> Arc<Mutex<Vec<GrantMapping>>> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.kept.clone()
    }
}

struct RingServer {
    domid: DomId,
    gt: Arc<dyn GrantTables>,
    ring: BackRing<BlkifRequest, BlkifResponse, GrantMapping>,
    ev: Box<dyn xen::EventChannels>,
    local: Port,
    disk: Arc<Mutex<Vec<u8>>>,
    seen: Arc<Seen>,
    mis: Misbehave,
    kept: Arc<Mutex<Vec<GrantMapping>>>,
}

impl RingServer {
    fn run(&mut self, stop: &AtomicBool) {
        let mut ports = [0 as Port; 8];
        while !stop.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(self.ev.fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::from(50u16)).unwrap();
            if n > 0 {
                let got = self.ev.pending(&mut ports).unwrap();
                for p in &ports[..got] {
                    self.ev.unmask(*p).unwrap();
                }
            }
            loop {
                while let Some(req) = self.ring.copy_request().unwrap() {
                    let rsp = self.serve(&req);
                    self.ring.push_response(&rsp).unwrap();
                }
                if self.ring.push_responses_and_check_notify().unwrap() {
                    self.ev.notify(self.local).unwrap();
                }
                if !self.ring.final_check_for_requests().unwrap() {
                    break;
                }
            }
        }
        let _ = self.ev.unbind(self.local);
    }

    fn map(&self, gref: GrantRef, writable: bool) -> Option<GrantMapping> {
        let m = self.gt.map(self.domid, &[gref], writable).ok()?;
        if self.mis == Misbehave::KeepMapping {
            let mut k = self.kept.lock().unwrap();
            if k.is_empty() {
                k.push(self.gt.map(self.domid, &[gref], writable).ok()?);
            }
        }
        Some(m)
    }

    fn serve(&self, req: &BlkifRequest) -> BlkifResponse {
        self.seen.requests.fetch_add(1, Ordering::Relaxed);
        let (op, segs, sector, id) = match req.operation {
            BLKIF_OP_INDIRECT => {
                let ind = req.as_indirect();
                let n = usize::from(ind.nr_segments);
                let mut segs = Vec::new();
                for (i, g) in ind.indirect_grefs.iter().enumerate() {
                    if i * BLKIF_SEGS_PER_INDIRECT_FRAME >= n {
                        break;
                    }
                    let m = self.map(*g, false).unwrap();
                    let here = (n - i * BLKIF_SEGS_PER_INDIRECT_FRAME).min(512);
                    for s in 0..here {
                        segs.push(m.mem().read_obj::<BlkifRequestSegment>(s * 8).unwrap());
                    }
                }
                (ind.indirect_op, segs, ind.sector_number, ind.id)
            }
            BLKIF_OP_DISCARD => {
                let d = req.as_discard();
                self.seen.ops.lock().unwrap().push((d.operation, 0));
                let mut disk = self.disk.lock().unwrap();
                let start = (d.sector_number * 512) as usize;
                let end = start + (d.nr_sectors * 512) as usize;
                let status = if end <= disk.len() {
                    disk[start..end].fill(0);
                    BLKIF_RSP_OKAY
                } else {
                    BLKIF_RSP_ERROR
                };
                return self.response(d.id, d.operation, status);
            }
            op => {
                let n = usize::from(req.nr_segments).min(BLKIF_MAX_SEGMENTS_PER_REQUEST);
                (op, req.seg[..n].to_vec(), req.sector_number, req.id)
            }
        };
        self.seen
            .ops
            .lock()
            .unwrap()
            .push((req.operation, segs.len() as u16));
        *self.seen.last_segs.lock().unwrap() =
            segs.iter().map(|s| (s.first_sect, s.last_sect)).collect();
        let mut off = (sector * 512) as usize;
        let mut status = BLKIF_RSP_OKAY;
        let mut disk = self.disk.lock().unwrap();
        for s in &segs {
            let Some(m) = self.map(s.gref, true) else {
                status = BLKIF_RSP_ERROR;
                break;
            };
            let a = usize::from(s.first_sect) * 512;
            let len = (usize::from(s.last_sect) + 1) * 512 - a;
            if off + len > disk.len() || a + len > PAGE_SIZE {
                status = BLKIF_RSP_ERROR;
                break;
            }
            match op {
                BLKIF_OP_READ => m.mem().write(a, &disk[off..off + len]).unwrap(),
                BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER => {
                    m.mem().read(a, &mut disk[off..off + len]).unwrap()
                }
                _ => {}
            }
            off += len;
        }
        let id = if self.mis == Misbehave::WrongId {
            id + 1000
        } else {
            id
        };
        let op = if self.mis == Misbehave::WrongOp {
            op ^ 1
        } else {
            op
        };
        self.response(id, op, status)
    }

    fn response(&self, id: u64, operation: u8, status: i16) -> BlkifResponse {
        BlkifResponse {
            id,
            operation,
            status,
            ..Default::default()
        }
    }
}

/// Frontend options with everything Linux-default except what the test sets.
pub fn opts() -> BlkFrontOptions {
    BlkFrontOptions {
        timeout: TIMEOUT,
        ..Default::default()
    }
}

/// InitWait with Linux's probe keys, frontend init, fake backend connect, frontend connected.
pub fn connected(
    rig: &Rig,
    o: BlkFrontOptions,
    connect_keys: &[(&str, &str)],
    mis: Misbehave,
) -> (BlkFront, FakeBackend) {
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let mut front = BlkFront::init(&rig.guest, DEVID, o).unwrap();
    let be = FakeBackend::connect(rig, connect_keys, mis);
    front.wait_connected().unwrap();
    (front, be)
}

/// Drives the backend side of the close handshake once the frontend is Closing, from another
/// thread (the frontend's close blocks).
pub fn backend_follows_close(rig: &Rig) -> JoinHandle<()> {
    let xs = rig.xs.clone();
    let fe_state = rig.fe("state");
    let be_state = rig.be("state");
    std::thread::spawn(move || {
        let w = xs.watch(&fe_state, "t").unwrap();
        loop {
            let s = xs.read(&fe_state).unwrap();
            let s = XenbusState::parse(&s).unwrap_or(XenbusState::Unknown);
            if s == XenbusState::Closing {
                xs.write(&be_state, b"5").unwrap();
            }
            if s == XenbusState::Closed {
                xs.write(&be_state, b"6").unwrap();
                return;
            }
            w.recv_timeout(TIMEOUT).unwrap();
        }
    })
}

pub fn map_of(keys: &[(String, String)]) -> HashMap<String, String> {
    keys.iter().cloned().collect()
}

//! `domio bench blk`: block I/O through domio's blkback, driven by xensim's blkfront.
//!
//! One process holds everything: the simulated host (its daemon on a temporary socket, as
//! `domio demo` runs it), a guest with a `vbd` device added as xl adds one, domio's backends
//! attached through that socket and started by the same [`Service`] as `domio serve` (while
//! `serve` does not list `vbd` yet, blkback's `BlkDriver` on the `BackendWatcher` that
//! `Service` would start), and the guest's blkfront (xensim's, negotiating as Linux's
//! xen-blkfront) with one thread per queue keeping `--qd` requests in flight. Latency is
//! measured per request from submission to the reaped response, into a preallocated
//! log-linear histogram (nothing is allocated per request); CPU is the whole process's user +
//! system time over the measured interval divided by the requests completed in it, so it
//! covers the guest's frontend, domio's blkback and the simulated hypervisor together.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use backends::blk::engine::{open_engine, EngineOptions};
use backends::blk::{BlkConfig, BlkDriver, DiskParams, EngineFactory};
use backends::console::LogSink;
use clap::{Args, ValueEnum};
use xen::abi::blkif::{BLKIF_OP_READ, BLKIF_RSP_OKAY};
use xen::{DomId, XenHost};
use xenbus::BackendWatcher;
use xensim::client::SimHost;
use xensim::front::blk::{BlkFront, BlkFrontOptions, BlkOp, BlkProtocol, BlkQueue};
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::DeviceSpec;

use super::cpu::process_cpu_time;
use super::hist::Histogram;
use crate::serve::{open_xenstore, BlkGrants, Service, XsKind, AVAILABLE_TYPES};

/// xvda, as xl names the first disk.
const DEVID: u32 = 51712;
/// The backend type the bench adds (what xl writes for a `phy` or `file` disk).
const BACKEND_TYPE: &str = "vbd";
/// Protocol sector.
const SECTOR: u64 = 512;
/// Grant entries a guest has (64 v1 frames); the bench keeps a margin for rings.
const GRANT_BUDGET: u64 = xensim::host::GRANT_ENTRIES as u64 - 512;

/// Storage engine behind the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// Completes every request at once: the protocol's own cost.
    Null,
    /// A raw image file or block device.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random, half reads and half writes.
    Randrw,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randrw => "randrw",
        }
    }
    fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
    fn writes(self) -> bool {
        !matches!(self, Pattern::Randread | Pattern::Read)
    }
}

/// Arguments of `domio bench blk`.
#[derive(Debug, Clone, Args)]
pub struct BlkArgs {
    /// Storage engine.
    #[arg(long, value_enum, default_value_t = EngineKind::Null)]
    pub engine: EngineKind,
    /// Image file or block device (raw, qcow2).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Capacity of the null engine's disk (K, M, G, T suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub null_size: u64,
    /// Block size of each request: a multiple of 512 (K and M suffixes).
    #[arg(long, default_value = "4k", value_parser = parse_bs)]
    pub bs: u64,
    /// Requests in flight per queue (at most the ring size, 32 << ring order).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,
    /// Queues (rings) to ask for, each driven by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pub pattern: Pattern,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Ring page order to ask for (0..=4: 1 to 16 pages, 32 to 512 slots).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub ring_order: u32,
    /// Do not offer persistent grants (every request's pages are granted and revoked).
    #[arg(long)]
    pub no_persistent: bool,
    /// How blkback reaches the data pages (`domio serve --blk-grants`): `persistent`, `map`
    /// or `copy`.
    #[arg(long, value_enum, default_value_t = BlkGrants::Persistent)]
    pub blk_grants: BlkGrants,
    /// Segments per indirect request the frontend accepts (0 disables indirect requests;
    /// Linux's default is 32).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub indirect_segments: u32,
    /// The guest's ring ABI: a 64-bit guest (`x86_64-abi`) or a 32-bit one (`x86_32-abi`).
    #[arg(long, value_enum, default_value_t = Abi::X86_64)]
    pub abi: Abi,
    /// blkback's busy-poll window before its ring thread sleeps, microseconds (`domio serve
    /// --blk-poll-us`; 0: sleep at once).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub blk_poll_us: u32,
    /// The guest's busy-poll window for responses before it waits for the backend's event,
    /// microseconds (0: wait at once, as Linux's blkfront). Models a guest whose vCPU does
    /// not halt while its I/O is in flight; in xensim that vCPU is one of dom0's CPUs.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub guest_poll_us: u32,
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    pub json: bool,
}

/// `--abi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Abi {
    /// `x86_64-abi`.
    #[value(name = "x86_64")]
    X86_64,
    /// `x86_32-abi`.
    #[value(name = "x86_32")]
    X86_32,
}

impl Abi {
    fn protocol(self) -> BlkProtocol {
        match self {
            Abi::X86_64 => BlkProtocol::X86_64,
            Abi::X86_32 => BlkProtocol::X86_32,
        }
    }
}

/// Parses a size with an optional K/M/G/T suffix (binary units; `k` = 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.as_bytes().last() {
        Some(b'k' | b'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&t[..t.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&t[..t.len() - 1], 1 << 30),
        Some(b't' | b'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 1M, 1G)"))
}

/// `--bs`: a positive multiple of 512 bytes.
pub fn parse_bs(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n % SECTOR != 0 {
        return Err(format!(
            "{s} ({n} bytes) is not a multiple of the 512-byte sector"
        ));
    }
    if n > 16 << 20 {
        return Err(format!("{s} is larger than 16M"));
    }
    Ok(n)
}

impl BlkArgs {
    /// Checks what clap cannot, before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.duration > 0.0 && self.duration <= 86_400.0) {
            bail!(
                "--duration {} must be more than 0 and at most 86400 seconds",
                self.duration
            );
        }
        match (self.engine, &self.image) {
            (EngineKind::Null, Some(p)) => bail!(
                "--image {} is not used by --engine null (size it with --null-size)",
                p.display()
            ),
            (EngineKind::Raw | EngineKind::Qcow2, None) => {
                bail!("--engine {} needs --image PATH", self.engine_name())
            }
            (EngineKind::Raw | EngineKind::Qcow2, Some(p)) => {
                if !p.is_absolute() {
                    bail!("--image {} must be an absolute path", p.display());
                }
                if !p.exists() {
                    bail!("--image {} does not exist", p.display());
                }
            }
            (EngineKind::Null, None) => {}
        }
        let ring = 32u32 << self.ring_order;
        if self.qd > ring {
            bail!(
                "--qd {} exceeds the {ring} slots of a ring of order {} (raise --ring-order)",
                self.qd,
                self.ring_order
            );
        }
        let segs = self.bs.div_ceil(4096);
        if segs > 11 && self.indirect_segments == 0 {
            bail!(
                "--bs {} needs {segs} segments: more than 11 needs indirect requests (--indirect-segments)",
                self.bs
            );
        }
        if segs > 11 && segs > u64::from(self.indirect_segments) {
            bail!(
                "--bs {} needs {segs} segments but --indirect-segments is {}",
                self.bs,
                self.indirect_segments
            );
        }
        let grants = self.grants_needed();
        if grants > GRANT_BUDGET {
            bail!(
                "{} queues x {} requests x {} pages need {grants} grants; a guest has {GRANT_BUDGET} (lower --qd, --queues or --bs)",
                self.queues,
                self.qd,
                self.pages_per_request()
            );
        }
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        match self.engine {
            EngineKind::Null => "null",
            EngineKind::Raw => "raw",
            EngineKind::Qcow2 => "qcow2",
        }
    }

    /// Data pages plus indirect pages of one request.
    fn pages_per_request(&self) -> u64 {
        let segs = self.bs.div_ceil(4096);
        let ind = if segs > 11 { segs.div_ceil(512) } else { 0 };
        segs + ind
    }

    fn grants_needed(&self) -> u64 {
        u64::from(self.queues) * u64::from(self.qd) * self.pages_per_request()
            + u64::from(self.queues) * (1 << self.ring_order)
    }

    /// The `params` value, as xl/libxl writes it for a qdisk (`<format>:<path>`).
    pub fn params(&self) -> String {
        match (self.engine, &self.image) {
            (EngineKind::Null, _) => format!("null:{}", self.null_size),
            (EngineKind::Raw, Some(p)) => format!("aio:{}", p.display()),
            (EngineKind::Qcow2, Some(p)) => format!("qcow2:{}", p.display()),
            (_, None) => String::new(),
        }
    }
}

/// The device xl adds for `disk = ['<params>,raw,xvda,rw']` (see the lab's reference dumps):
/// backend keys `params`, `mode`, `device-type` and libxl's others, frontend
/// `virtual-device` and `device-type`.
pub fn vbd_spec(domid: DomId, params: &str, writable: bool) -> DeviceSpec {
    let mut spec = DeviceSpec::new(BACKEND_TYPE, domid, DEVID);
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    spec.backend = vec![
        kv("params", params),
        kv("removable", "0"),
        kv("bootable", "1"),
        kv("dev", "xvda"),
        kv("type", "phy"),
        kv("mode", if writable { "w" } else { "r" }),
        kv("device-type", "disk"),
        kv("discard-enable", "1"),
        kv("specification", "xen"),
    ];
    spec.frontend = vec![
        kv("virtual-device", &DEVID.to_string()),
        kv("device-type", "disk"),
        kv("trusted", "1"),
    ];
    spec
}

/// A simulated host with one guest and its vbd, served on a temporary socket.
pub struct SimRig {
    dir: PathBuf,
    server: Option<Server>,
    /// The guest's domain id.
    pub domid: DomId,
    /// The guest's own helpers.
    pub guest: Guest,
    /// The device added.
    pub spec: DeviceSpec,
}

impl SimRig {
    /// Starts the host's daemon, creates a guest of `ram_pages` pages and adds `spec_of(domid)`.
    pub fn start(
        ram_pages: u64,
        spec_of: impl FnOnce(DomId) -> DeviceSpec,
    ) -> anyhow::Result<SimRig> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "domio-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let sock = dir.join("xensim.sock");
        let host = Host::new().context("creating the simulated host")?;
        let server = Server::start(host.clone(), &sock)
            .with_context(|| format!("listening on {}", sock.display()))?;
        let domid = host
            .create_domain("bench-guest", ram_pages)
            .context("creating the guest")?;
        let spec = spec_of(domid);
        host.toolstack()
            .map_err(|e| anyhow::anyhow!("toolstack connection: {e}"))?
            .add_device(&spec)
            .context("adding the vbd")?;
        let guest = Guest::new(host.clone(), domid).context("guest helpers")?;
        Ok(SimRig {
            dir,
            server: Some(server),
            domid,
            guest,
            spec,
        })
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("xensim.sock")
    }
}

impl Drop for SimRig {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one queue's thread measured.
#[derive(Debug, Default)]
struct QueueResult {
    hist: Histogram,
    reads: Histogram,
    writes: Histogram,
    requests: u64,
    bytes: u64,
    errors: u64,
    notifies: u64,
}

/// xorshift64*: cheap, good enough to spread offsets.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Where a queue's next request goes.
#[derive(Debug)]
struct Offsets {
    pattern: Pattern,
    rng: Rng,
    blocks: u64,
    next_seq: u64,
    bs_sectors: u64,
}

impl Offsets {
    fn new(pattern: Pattern, queue: u32, queues: u32, blocks: u64, bs: u64) -> Offsets {
        Offsets {
            pattern,
            rng: Rng(
                0x9e37_79b9_7f4a_7c15 ^ (u64::from(queue) + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
            ),
            blocks,
            // Sequential queues start evenly spread over the disk.
            next_seq: blocks / u64::from(queues.max(1)) * u64::from(queue),
            bs_sectors: bs / SECTOR,
        }
    }

    /// (sector, is_write) of the next request.
    fn next(&mut self) -> (u64, bool) {
        let block = if self.pattern.random() {
            self.rng.next() % self.blocks
        } else {
            let b = self.next_seq % self.blocks;
            self.next_seq = b + 1;
            b
        };
        let write = match self.pattern {
            Pattern::Randrw => self.rng.next() & 1 == 1,
            p => p.writes(),
        };
        (block * self.bs_sectors, write)
    }
}

/// Keeps `qd` requests in flight on `q` until `stop`, then drains.
fn drive_queue(
    q: &mut BlkQueue,
    args: &BlkArgs,
    blocks: u64,
    stop: &AtomicBool,
) -> anyhow::Result<QueueResult> {
    let mut res = QueueResult::default();
    let bs = args.bs as usize;
    let data: Vec<u8> = (0..bs).map(|i| (i as u8) ^ 0x5a).collect();
    let mut read_buf = vec![0u8; bs];
    // With persistent grants the data lands in pool pages the guest copies from (Linux's
    // blkfront copies into the bio's pages); otherwise it lands in the guest's own pages.
    let copy_out = q.persistent();
    let mut offsets = Offsets::new(args.pattern, q.index(), args.queues, blocks, args.bs);
    let mut started = vec![Instant::now(); q.size() as usize];
    let stall = Duration::from_secs(10);
    let submit = |q: &mut BlkQueue, offsets: &mut Offsets, started: &mut [Instant]| {
        let (sector, write) = offsets.next();
        let op = if write {
            BlkOp::Write {
                sector,
                data: &data,
            }
        } else {
            BlkOp::Read { sector, len: bs }
        };
        let t = Instant::now();
        let id = q.submit(op)?;
        if let Some(s) = started.get_mut(id as usize) {
            *s = t;
        }
        anyhow::Ok(())
    };
    for _ in 0..args.qd {
        submit(q, &mut offsets, &mut started)?;
    }
    q.push()?;
    let mut stopping = false;
    let poll = Duration::from_micros(u64::from(args.guest_poll_us));
    while q.in_flight() > 0 {
        if !poll.is_zero() {
            let t = Instant::now();
            while !q.has_responses()? && t.elapsed() < poll {
                std::hint::spin_loop();
            }
        }
        q.wait(stall).with_context(|| {
            format!(
                "queue {}: no response for {stall:?} with {} requests in flight",
                q.index(),
                q.in_flight()
            )
        })?;
        let mut done = 0u32;
        let mut copy_failed = false;
        q.reap(|c, d| {
            let now = Instant::now();
            // The guest consumes what it read, as Linux copies out of persistent pages.
            if copy_out && c.operation == BLKIF_OP_READ && d.copy_to(&mut read_buf).is_err() {
                copy_failed = true;
            }
            let t0 = started.get(c.id as usize).copied().unwrap_or(now);
            let ns = u64::try_from((now - t0).as_nanos()).unwrap_or(u64::MAX);
            res.hist.record(ns);
            if c.operation == BLKIF_OP_READ {
                res.reads.record(ns);
            } else {
                res.writes.record(ns);
            }
            res.requests += 1;
            res.bytes += c.len as u64;
            if c.status != BLKIF_RSP_OKAY {
                res.errors += 1;
            }
            done += 1;
        })?;
        if copy_failed {
            bail!(
                "queue {}: copying read data out of guest pages failed",
                q.index()
            );
        }
        stopping = stopping || stop.load(Ordering::Relaxed);
        if !stopping {
            // As Linux's blkfront (`blkif_queue_rq` ends with `flush_requests`): each request
            // is pushed as it is queued, notifying only when the backend's `req_event` asks,
            // so a backend that drained the ring starts on the first while the rest follow.
            for _ in 0..done {
                submit(q, &mut offsets, &mut started)?;
                q.push()?;
            }
        }
    }
    res.notifies = q.stats().notifies;
    Ok(res)
}

/// The measured figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlkReport {
    /// Engine.
    pub engine: String,
    /// `params` the backend was given.
    pub params: String,
    /// The backend's xenstore directory.
    pub backend: String,
    /// Pattern.
    pub pattern: String,
    /// Block size, bytes.
    pub bs: u64,
    /// Queue depth per queue.
    pub qd: u32,
    /// Queues negotiated.
    pub queues: usize,
    /// Queues asked for (the backend may offer fewer).
    pub queues_requested: u32,
    /// Ring order negotiated.
    pub ring_order: u32,
    /// Ring order asked for.
    pub ring_order_requested: u32,
    /// Persistent grants in use.
    pub persistent: bool,
    /// blkback's grant handling (`--blk-grants`).
    pub blk_grants: String,
    /// blkback's busy-poll window, microseconds (`--blk-poll-us`).
    pub blk_poll_us: u32,
    /// The guest's busy-poll window, microseconds (`--guest-poll-us`).
    pub guest_poll_us: u32,
    /// blkback's poll windows in which work came.
    pub blk_poll_hits: u64,
    /// blkback's poll windows that ran out.
    pub blk_poll_misses: u64,
    /// Indirect segments in use (0: none).
    pub indirect_segments: usize,
    /// The ring ABI (`protocol`).
    pub abi: String,
    /// Measured seconds.
    pub seconds: f64,
    /// Requests completed.
    pub requests: u64,
    /// Requests that completed with an error status.
    pub errors: u64,
    /// Requests per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Latency percentiles, microseconds.
    pub lat_p50_us: f64,
    /// p99.
    pub lat_p99_us: f64,
    /// p99.9.
    pub lat_p999_us: f64,
    /// Mean.
    pub lat_mean_us: f64,
    /// Max.
    pub lat_max_us: f64,
    /// Reads completed.
    pub reads: u64,
    /// Read latency p50, microseconds.
    pub read_lat_p50_us: f64,
    /// Read latency p99.
    pub read_lat_p99_us: f64,
    /// Writes completed.
    pub writes: u64,
    /// Write latency p50, microseconds.
    pub write_lat_p50_us: f64,
    /// Write latency p99.
    pub write_lat_p99_us: f64,
    /// Process CPU (user + system) per request, nanoseconds.
    pub cpu_ns_per_req: f64,
    /// Event-channel notifications the frontend sent per request.
    pub notifies_per_req: f64,
    /// CPUs available to the process (threads are not pinned).
    pub cpus: usize,
}

/// Runs `domio bench blk`.
pub fn run(args: BlkArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let rep = measure(&args)?;
    print_report(&rep, args.json);
    Ok(if rep.errors == 0 && rep.requests > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The engines `params` names (`null:`, `aio:`/`raw:`, `qcow2:`), opened by blkback's own
/// opener with its default options.
fn engine_factory() -> EngineFactory {
    Arc::new(|p: &DiskParams| {
        let params = match &p.format {
            Some(f) => format!("{f}:{}", p.path),
            None => p.path.clone(),
        };
        open_engine(&params, p.read_only, &EngineOptions::default())
    })
}

/// domio's side of the bench: `serve`'s [`Service`] when this build's `serve` lists the vbd
/// type, else blkback's driver on the same [`BackendWatcher`] that `Service` starts per type.
pub(super) enum Backend {
    Service(Service),
    Watcher(BackendWatcher),
}

impl Backend {
    pub(super) fn start(
        sim: Arc<dyn XenHost>,
        domid: DomId,
        cfg: BlkConfig,
    ) -> anyhow::Result<Backend> {
        let xs = open_xenstore(sim.as_ref(), XsKind::Socket, None)?;
        if AVAILABLE_TYPES.contains(&BACKEND_TYPE) {
            let svc = Service::start(
                sim,
                xs,
                0,
                domid,
                &[BACKEND_TYPE.to_string()],
                Arc::new(LogSink),
                cfg,
                backends::net::tap::tap_engine_factory(),
            )?;
            return Ok(Backend::Service(svc));
        }
        tracing::warn!(
            "`domio serve` does not list {BACKEND_TYPE} in this build: starting backends::blk::BlkDriver on a BackendWatcher directly, as serve's Service does per type"
        );
        let driver = BlkDriver::new(sim, BACKEND_TYPE, cfg, engine_factory());
        let w = BackendWatcher::start(xs, driver, 0, u32::from(domid))
            .with_context(|| format!("watching {BACKEND_TYPE} backends of dom{domid}"))?;
        Ok(Backend::Watcher(w))
    }

    /// The busy-poll counters of blkback's disks (hits, misses); zeros where this build
    /// runs the driver without `serve`'s Service.
    pub(super) fn poll_counts(&self) -> (u64, u64) {
        match self {
            Backend::Service(s) => s.blk_stats().iter().fold((0, 0), |(h, m), (_, st)| {
                (h + st.poll_hits, m + st.poll_misses)
            }),
            Backend::Watcher(_) => (0, 0),
        }
    }

    pub(super) fn stop(self) {
        match self {
            Backend::Service(s) => s.stop(),
            Backend::Watcher(w) => w.stop(),
        }
    }
}

/// Sets everything up, measures, tears down.
pub fn measure(args: &BlkArgs) -> anyhow::Result<BlkReport> {
    // Guest RAM: the pools of every queue, the rings, and room for the guest's own use.
    let ram_pages = (args.grants_needed() + 4096).min(1 << 22);
    let params = args.params();
    let writable = true;
    let rig = SimRig::start(ram_pages, |d| vbd_spec(d, &params, writable))?;
    // domio attaches through the socket, exactly as `domio serve --xen sim:PATH` does.
    let sim: Arc<dyn XenHost> = Arc::new(
        SimHost::connect(rig.socket(), 0).context("attaching domio to the simulated host")?,
    );
    let backend = Backend::start(
        sim,
        rig.domid,
        BlkConfig {
            poll_us: args.blk_poll_us,
            ..args.blk_grants.config()
        },
    )?;
    let result = run_frontend(args, &rig);
    let (mut front, mut rep) = match result {
        Ok(x) => x,
        Err(e) => {
            backend.stop();
            return Err(e);
        }
    };
    (rep.blk_poll_hits, rep.blk_poll_misses) = backend.poll_counts();
    // The guest closes its disk as Linux does on shutdown; then domio stops.
    let closed = front.close();
    backend.stop();
    closed.context("closing the guest's disk (every grant must be revocable)")?;
    drop(rig);
    Ok(rep)
}

fn run_frontend(args: &BlkArgs, rig: &SimRig) -> anyhow::Result<(BlkFront, BlkReport)> {
    let opts = BlkFrontOptions {
        max_ring_order: args.ring_order,
        max_queues: args.queues,
        persistent: !args.no_persistent,
        max_indirect_segments: args.indirect_segments,
        protocol: args.abi.protocol(),
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let mut front = BlkFront::connect(&rig.guest, DEVID, opts)
        .context("connecting the guest's blkfront to domio's blkback")?;
    let disk = front
        .disk()
        .context("blkfront connected without disk information")?;
    let blocks = disk.sectors.saturating_mul(SECTOR) / args.bs;
    if blocks == 0 {
        bail!(
            "the disk ({} bytes) is smaller than --bs {}",
            disk.sectors * SECTOR,
            args.bs
        );
    }
    if !args.bs.is_multiple_of(u64::from(disk.sector_size)) {
        bail!(
            "--bs {} is not a multiple of the disk's {}-byte logical sector",
            args.bs,
            disk.sector_size
        );
    }
    if args.pattern.writes() && disk.read_only() {
        bail!(
            "the backend exports the disk read-only; --pattern {} writes",
            args.pattern.name()
        );
    }
    let (ring_order, queues) = (front.ring_order(), front.num_queues());
    let (persistent, indirect) = front
        .queues()
        .first()
        .map(|q| (q.persistent(), q.max_indirect_segments()))
        .unwrap_or_default();
    if let Some(q) = front.queues().first() {
        if args.bs as usize > q.max_request_bytes() {
            bail!(
                "--bs {} is larger than the {} bytes a request may carry with this backend",
                args.bs,
                q.max_request_bytes()
            );
        }
        if args.qd > q.size() {
            bail!(
                "--qd {} exceeds the negotiated ring of {} slots",
                args.qd,
                q.size()
            );
        }
    }
    let stop = AtomicBool::new(false);
    let duration = Duration::from_secs_f64(args.duration);
    let cpu0 = process_cpu_time()?;
    let t0 = Instant::now();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
    let results: Vec<anyhow::Result<QueueResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = front
            .queues_mut()
            .iter_mut()
            .map(|q| {
                let stop = &stop;
                let ended = ended_tx.clone();
                std::thread::Builder::new()
                    .name(format!("bench-q{}", q.index()))
                    .spawn_scoped(s, move || {
                        let r = drive_queue(q, args, blocks, stop);
                        let _ = ended.send(());
                        r
                    })
            })
            .collect();
        // Measure for the duration, or less if a queue thread ends early (it failed).
        let _ = ended_rx.recv_timeout(duration);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a queue thread panicked"))),
                Err(e) => Err(anyhow::Error::new(e).context("starting a queue thread")),
            })
            .collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_time()?.saturating_sub(cpu0);
    let mut total = QueueResult::default();
    for r in results {
        let r = r?;
        total.hist.merge(&r.hist);
        total.reads.merge(&r.reads);
        total.writes.merge(&r.writes);
        total.requests += r.requests;
        total.bytes += r.bytes;
        total.errors += r.errors;
        total.notifies += r.notifies;
    }
    let per_req = |x: f64| {
        if total.requests == 0 {
            0.0
        } else {
            x / total.requests as f64
        }
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    let rep = BlkReport {
        engine: args.engine_name().to_string(),
        params: args.params(),
        backend: rig.spec.backend_path(),
        pattern: args.pattern.name().to_string(),
        bs: args.bs,
        qd: args.qd,
        queues,
        queues_requested: args.queues,
        ring_order,
        ring_order_requested: args.ring_order,
        persistent,
        blk_grants: format!("{:?}", args.blk_grants).to_lowercase(),
        blk_poll_us: args.blk_poll_us,
        guest_poll_us: args.guest_poll_us,
        blk_poll_hits: 0,
        blk_poll_misses: 0,
        indirect_segments: indirect,
        abi: args.abi.protocol().as_str().to_string(),
        seconds,
        requests: total.hist.count(),
        errors: total.errors,
        iops: total.requests as f64 / seconds,
        mbps: total.bytes as f64 / seconds / 1e6,
        lat_p50_us: us(total.hist.percentile(50.0)),
        lat_p99_us: us(total.hist.percentile(99.0)),
        lat_p999_us: us(total.hist.percentile(99.9)),
        lat_mean_us: total.hist.mean() / 1000.0,
        lat_max_us: us(total.hist.max()),
        reads: total.reads.count(),
        read_lat_p50_us: us(total.reads.percentile(50.0)),
        read_lat_p99_us: us(total.reads.percentile(99.0)),
        writes: total.writes.count(),
        write_lat_p50_us: us(total.writes.percentile(50.0)),
        write_lat_p99_us: us(total.writes.percentile(99.0)),
        cpu_ns_per_req: per_req(cpu.as_nanos() as f64),
        notifies_per_req: per_req(total.notifies as f64),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Ok((front, rep))
}

fn print_report(r: &BlkReport, json: bool) {
    println!(
        "domio bench blk: engine {} ({} at {}), {} bs={} qd={} queues={} ring-order={} persistent={} blk-grants={} indirect={} abi={} blk-poll-us={} guest-poll-us={}",
        r.engine, r.params, r.backend, r.pattern, r.bs, r.qd, r.queues, r.ring_order, r.persistent, r.blk_grants, r.indirect_segments, r.abi, r.blk_poll_us, r.guest_poll_us
    );
    if r.queues < r.queues_requested as usize || r.ring_order < r.ring_order_requested {
        println!(
            "  note: asked for {} queues of ring order {}; the backend offered {} of order {}",
            r.queues_requested, r.ring_order_requested, r.queues, r.ring_order
        );
    }
    println!(
        "  {:.2} s, {} requests, {} errors: {:.0} IOPS, {:.1} MB/s",
        r.seconds, r.requests, r.errors, r.iops, r.mbps
    );
    println!(
        "  latency (us): p50 {:.1}  p99 {:.1}  p99.9 {:.1}  mean {:.1}  max {:.1}",
        r.lat_p50_us, r.lat_p99_us, r.lat_p999_us, r.lat_mean_us, r.lat_max_us
    );
    if r.reads > 0 && r.writes > 0 {
        println!(
            "  reads {} (p50 {:.1} us, p99 {:.1} us), writes {} (p50 {:.1} us, p99 {:.1} us)",
            r.reads,
            r.read_lat_p50_us,
            r.read_lat_p99_us,
            r.writes,
            r.write_lat_p50_us,
            r.write_lat_p99_us
        );
    }
    println!(
        "  CPU {:.0} ns/request (whole process: guest blkfront + domio blkback + simulated host); {:.3} notifications/request",
        r.cpu_ns_per_req, r.notifies_per_req
    );
    println!(
        "  threads: {} guest queue threads and domio's ring threads, unpinned, on {} CPUs",
        r.queues, r.cpus
    );
    if json {
        match serde_json::to_string(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("domio bench blk: JSON encoding failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use xenbus::XsOps;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        blk: BlkArgs,
    }

    fn parse(args: &[&str]) -> Result<BlkArgs, String> {
        let mut v = vec!["bench-blk"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map(|c| c.blk)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn test_bs_not_multiple_of_512_is_rejected_clearly() {
        let e = parse(&["--bs", "1000"]);
        let e2 = parse(&["--bs", "2500"]);
        let zero = parse(&["--bs", "0"]);

        // 3k is 6 sectors: valid for the protocol (a 4k-sector disk refuses it at connect).
        assert_eq!(parse(&["--bs", "3k"]).unwrap().bs, 3072);
        assert!(e
            .unwrap_err()
            .contains("not a multiple of the 512-byte sector"));
        assert!(e2.unwrap_err().contains("not a multiple"));
        assert!(zero.is_err());
    }

    #[test]
    fn test_qd_zero_and_bad_values_are_rejected() {
        assert!(parse(&["--qd", "0"]).is_err());
        assert!(parse(&["--queues", "0"]).is_err());
        assert!(parse(&["--ring-order", "5"]).is_err());
        assert!(parse(&["--pattern", "zigzag"]).is_err());
        assert!(parse(&["--engine", "vhd"]).is_err());
    }

    #[test]
    fn test_validate_catches_inconsistent_flags() {
        let qd_too_deep = parse(&["--qd", "64"]).unwrap().validate();
        let qd_ok_with_order = parse(&["--qd", "64", "--ring-order", "1"])
            .unwrap()
            .validate();
        let raw_without_image = parse(&["--engine", "raw"]).unwrap().validate();
        let null_with_image = parse(&["--image", "/tmp/x"]).unwrap().validate();
        let big_bs_no_indirect = parse(&["--bs", "64k", "--indirect-segments", "0"])
            .unwrap()
            .validate();
        let bad_duration = parse(&["--duration", "0"]).unwrap().validate();
        let too_many_grants = parse(&[
            "--bs",
            "1M",
            "--qd",
            "128",
            "--ring-order",
            "2",
            "--indirect-segments",
            "256",
        ])
        .unwrap()
        .validate();

        assert!(qd_too_deep
            .unwrap_err()
            .to_string()
            .contains("--ring-order"));
        assert!(qd_ok_with_order.is_ok());
        assert!(raw_without_image
            .unwrap_err()
            .to_string()
            .contains("needs --image"));
        assert!(null_with_image.is_err());
        assert!(big_bs_no_indirect
            .unwrap_err()
            .to_string()
            .contains("indirect"));
        assert!(bad_duration.is_err());
        assert!(too_many_grants.unwrap_err().to_string().contains("grants"));
    }

    #[test]
    fn test_params_follow_libxl_format_prefixes() {
        let null = parse(&["--null-size", "2G"]).unwrap();
        let raw = parse(&["--engine", "raw", "--image", "/img/a.raw"]).unwrap();
        let q = parse(&["--engine", "qcow2", "--image", "/img/a.qcow2"]).unwrap();

        assert_eq!(null.params(), format!("null:{}", 2u64 << 30));
        assert_eq!(raw.params(), "aio:/img/a.raw");
        assert_eq!(q.params(), "qcow2:/img/a.qcow2");
    }

    #[test]
    fn test_offsets_stay_on_disk_and_randrw_mixes() {
        let mut o = Offsets::new(Pattern::Randrw, 0, 1, 100, 4096);
        let mut seq = Offsets::new(Pattern::Read, 1, 2, 100, 4096);
        let mut writes = 0;

        for _ in 0..1000 {
            let (s, w) = o.next();
            assert!(s < 100 * 8 && s % 8 == 0);
            writes += u32::from(w);
        }
        let firsts: Vec<u64> = (0..3).map(|_| seq.next().0).collect();

        assert!((300..700).contains(&writes), "{writes}");
        assert_eq!(firsts, vec![400, 408, 416]);
    }

    #[test]
    fn test_sim_rig_adds_vbd_with_xl_keys() {
        let rig = SimRig::start(1024, |d| vbd_spec(d, "null:1048576", true)).unwrap();
        let ts = rig.guest.host().toolstack().unwrap();
        let be = rig.spec.backend_path();
        let fe = rig.spec.frontend_path();
        let read = |p: String| String::from_utf8(ts.xs().read(&p).unwrap()).unwrap();

        assert_eq!(
            be,
            format!("/local/domain/0/backend/vbd/{}/51712", rig.domid)
        );
        assert_eq!(read(format!("{be}/params")), "null:1048576");
        assert_eq!(read(format!("{be}/mode")), "w");
        assert_eq!(read(format!("{be}/device-type")), "disk");
        assert_eq!(read(format!("{be}/state")), "1");
        assert_eq!(read(format!("{fe}/virtual-device")), "51712");
        assert_eq!(read(format!("{fe}/backend")), be);
        assert!(rig.socket().exists());
    }

    #[test]
    fn test_measure_loop_against_null_responder_counts_every_request() {
        let args = parse(&[
            "--duration",
            "0.3",
            "--qd",
            "8",
            "--queues",
            "2",
            "--ring-order",
            "1",
            "--pattern",
            "randrw",
            "--bs",
            "64k",
        ])
        .unwrap();
        args.validate().unwrap();
        let rig = SimRig::start(8192, |d| vbd_spec(d, &args.params(), true)).unwrap();
        let sim = Arc::new(SimHost::connect(rig.socket(), 0).unwrap());
        let xs = open_xenstore(sim.as_ref(), XsKind::Socket, None).unwrap();
        let responder = super::super::fake::NullResponder::start(
            sim,
            xs,
            rig.domid,
            rig.spec.backend_path(),
            rig.spec.frontend_path(),
            1 << 21,
        );

        let (mut front, rep) = run_frontend(&args, &rig).unwrap();
        responder.stop().unwrap();
        let released = front.release();

        assert!(rep.requests > 16, "{rep:?}");
        assert_eq!(rep.errors, 0);
        assert_eq!((rep.queues, rep.ring_order), (2, 1));
        assert!(rep.persistent);
        assert_eq!(rep.indirect_segments, 32);
        assert!(rep.lat_p50_us > 0.0);
        assert!(rep.lat_p50_us <= rep.lat_p99_us && rep.lat_p99_us <= rep.lat_p999_us);
        assert!(rep.lat_p999_us <= rep.lat_max_us);
        assert_eq!(rep.reads + rep.writes, rep.requests);
        assert!(rep.reads > 0 && rep.writes > 0);
        assert!((rep.mbps - rep.iops * 65536.0 / 1e6).abs() < 1e-6 * rep.mbps.max(1.0));
        released.unwrap();
    }
}

//! `domio bench virtio-blk`: 4 KiB random reads through domio's HVM device model. A xensim HVM
//! guest (the guest-OS library's virtio-blk driver, negotiating EVENT_IDX and MSI-X as Linux's
//! does) rings its doorbells as MMIO writes, which reach domio's ioreq server as synchronous
//! ioreqs; the device's queue thread hands the requests to the raw engine, and completions come
//! back as MSIs injected with DMOPs. Guest RAM is foreign-mapped through the xensim daemon, as
//! a separate domio process would map it. The peer is `domio bench blk` on the same image at
//! the same depth (scripts/bench-hvm.sh runs both, alternating).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use devmodel::config::MachineConfig;
use devmodel::mem::ForeignRam;
use devmodel::Machine;
use ioreq::{IoreqConfig, IoreqServer};
use xen::{DeviceModel, XenHost};
use xensim::client::SimHost;
use xensim::guestos::blk::{Op, VirtioBlkDriver, T_IN};
use xensim::guestos::pci::{self, BarWindow};
use xensim::guestos::RamAlloc;
use xensim::host::Host;
use xensim::hvm::HvmGuest;
use xensim::server::Server;

/// Guest RAM of the benchmark's HVM guest.
const MEMORY_MIB: u64 = 80;
/// Where the data buffers start in guest RAM (above the driver's rings and scratch).
const BUFS_GPA: u64 = 0x200_0000;
/// Requests per driver run; the queue drains at the end of each, so keep it large.
const CHUNK: usize = 50_000;

/// Arguments of `domio bench virtio-blk`.
#[derive(Debug, Args)]
pub struct VirtioBlkArgs {
    /// Raw image to read (its whole size, 4 KiB aligned, is the random range).
    #[arg(long)]
    pub image: std::path::PathBuf,
    /// Requests in flight (the virtqueue has 4 entries per request, at most 256).
    #[arg(long, default_value_t = 32)]
    pub qd: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Microseconds the ioreq server polls before sleeping (`domio hvm --poll-us`).
    #[arg(long, default_value_t = ioreq::server::DEFAULT_POLL.as_micros() as u64)]
    pub poll_us: u64,
    /// Most microseconds the disk's queue thread polls its ring after an interrupt (the
    /// `.hvm` key `virtio_poll_us`; 0: never).
    #[arg(long, default_value_t = devmodel::config::DEFAULT_VIRTIO_POLL_US)]
    pub virtio_poll_us: u32,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Figures {
    reads: u64,
    elapsed: Duration,
    doorbells: u64,
    doorbells_skipped: u64,
}

/// Runs the benchmark.
pub fn run(a: VirtioBlkArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        a.duration.is_finite() && a.duration > 0.0 && a.duration <= 3600.0,
        "--duration must be between 0 and 3600 seconds"
    );
    anyhow::ensure!(
        (1..=256).contains(&a.qd),
        "--qd must be between 1 and 256 (got {})",
        a.qd
    );
    let size = std::fs::metadata(&a.image)
        .with_context(|| format!("--image {}", a.image.display()))?
        .len()
        & !4095;
    anyhow::ensure!(
        size >= 4096,
        "--image {}: smaller than one 4 KiB block",
        a.image.display()
    );
    let dir = std::env::temp_dir().join(format!("domio-bench-vblk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = measure(
        &dir,
        &a.image,
        size,
        a.qd,
        Duration::from_secs_f64(a.duration),
        Polling {
            ioreq: Duration::from_micros(a.poll_us),
            virtio_us: a.virtio_poll_us,
        },
        CHUNK,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let f = r?;
    let iops = f.reads as f64 / f.elapsed.as_secs_f64();
    println!(
        "virtio-blk 4 KiB random reads QD{} through ioreqs: {iops:.0} IOPS ({} reads in {:.2} s; \
         doorbells {}, skipped {})",
        a.qd,
        f.reads,
        f.elapsed.as_secs_f64(),
        f.doorbells,
        f.doorbells_skipped
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "iops": iops,
                "reads": f.reads,
                "seconds": f.elapsed.as_secs_f64(),
                "qd": a.qd,
                "doorbells": f.doorbells,
                "doorbells_skipped": f.doorbells_skipped,
                "poll_us": a.poll_us,
                "virtio_poll_us": a.virtio_poll_us,
                "image": a.image.display().to_string(),
                "path": "xensim HVM vCPU (virtio-blk driver) -> ioreq -> domio devmodel virtio-blk -> raw engine; MSI by DMOP",
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How long domio's threads poll before sleeping.
#[derive(Debug, Clone, Copy)]
struct Polling {
    /// The ioreq thread (`--poll-us`).
    ioreq: Duration,
    /// The disk's queue thread after an interrupt (`--virtio-poll-us`).
    virtio_us: u32,
}

fn measure(
    dir: &std::path::Path,
    image: &std::path::Path,
    size: u64,
    qd: u16,
    duration: Duration,
    polling: Polling,
    chunk: usize,
) -> anyhow::Result<Figures> {
    let (poll, virtio_poll_us) = (polling.ioreq, polling.virtio_us);
    let host = Host::new().context("creating the simulated host")?;
    let domid = host
        .create_hvm_domain("bench-vblk", MEMORY_MIB << 8, 2)
        .context("creating the HVM guest")?;
    let server = Server::start(host.clone(), &dir.join("xensim.sock"))
        .context("starting the xensim daemon")?;
    let sim = Arc::new(SimHost::connect(server.path(), 0).context("attaching domio to the host")?);
    let cfg = MachineConfig::parse(&format!(
        "name = \"bench-vblk\"\ntype = \"hvm\"\nmemory = {MEMORY_MIB}\nvcpus = 2\n\
         virtio_poll_us = {virtio_poll_us}\ndisk = [ '{},raw,xvda,r' ]\n",
        image.display()
    ))
    .context("machine configuration")?;
    let mut icfg = IoreqConfig::new(domid, 2, MEMORY_MIB << 20);
    icfg.spin = poll;
    let mut ioreq = IoreqServer::create(sim.as_ref() as &dyn XenHost, icfg)?;
    let dm: Arc<dyn DeviceModel> = Arc::from(sim.open_devmodel()?);
    let ram = ForeignRam::new(sim.open_foreign()?, domid, MEMORY_MIB << 20);
    let machine = Machine::new(domid, &cfg, ioreq.ranges(), dm, Box::new(ram))?;
    ioreq.run(Box::new(machine))?;
    let guest = HvmGuest::new(host.clone(), domid, 0)?;
    let mut fns = pci::enumerate(&guest)?;
    pci::assign_bars(&guest, &mut fns, &mut BarWindow::default())?;
    let f = fns
        .iter()
        .find(|f| f.vendor == 0x1af4 && f.device == 0x1042)
        .cloned()
        .context("no virtio-blk function on the guest's PCI bus")?;
    let alloc = RamAlloc::new(1 << 20, BUFS_GPA);
    // 4 descriptors' worth of entries per request in flight (3 used), rounded to a power of 2.
    let qsize = (u32::from(qd) * 4).next_power_of_two().min(1024) as u16;
    let mut drv = VirtioBlkDriver::new(&guest, &f, &alloc, 0x50, 1, qsize)?;
    drv.set_max_in_flight(usize::from(qd));
    let blocks = size / 4096;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut ops: Vec<Op> = Vec::with_capacity(chunk);
    let (mut reads, start) = (0u64, Instant::now());
    while start.elapsed() < duration {
        ops.clear();
        ops.extend((0..chunk).map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Op {
                ty: T_IN,
                sector: (x % blocks) * 8,
                gpa: BUFS_GPA + 4096 * (i as u64 % u64::from(qd)),
                len: 4096,
            }
        }));
        let st = drv.run(&guest, &ops, Duration::from_secs(120))?;
        let bad = st.iter().filter(|s| **s != 0).count();
        anyhow::ensure!(bad == 0, "{bad} of {chunk} reads failed");
        reads += chunk as u64;
    }
    let elapsed = start.elapsed();
    let (doorbells, doorbells_skipped) = drv.queues.first().map_or((0, 0), |q| q.doorbell_counts());
    ioreq.shutdown();
    drop(server);
    Ok(Figures {
        reads,
        elapsed,
        doorbells,
        doorbells_skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bench_virtio_blk_short_run_reads_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.raw");
        std::fs::write(&img, vec![0x5au8; 4 << 20]).unwrap();
        let work = dir.path().join("w");
        std::fs::create_dir_all(&work).unwrap();
        let f = measure(
            &work,
            &img,
            4 << 20,
            8,
            Duration::from_millis(1),
            Polling {
                ioreq: Duration::ZERO,
                virtio_us: devmodel::config::DEFAULT_VIRTIO_POLL_US,
            },
            2000,
        )
        .unwrap();
        assert_eq!(f.reads, 2000);
        assert!(f.doorbells > 0);
    }

    #[test]
    fn test_bench_virtio_blk_refuses_bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.raw");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let args = |qd, image: &std::path::Path| VirtioBlkArgs {
            image: image.to_path_buf(),
            qd,
            duration: 1.0,
            poll_us: 0,
            virtio_poll_us: 0,
            json: false,
        };
        let e = run(args(0, &img)).unwrap_err().to_string();
        assert!(e.contains("--qd"), "{e}");
        let e = run(args(8, &dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--image"), "{e}");
    }
}

//! `domio bench ioreq`: the PIO round trip of an HVM guest's vCPU through domio's ioreq
//! server, next to an eventfd ping-pong between two threads measured in the same run.
//!
//! The vCPU is xensim's: it posts each `in`/`out` into the server's synchronous page exactly
//! as Xen does and waits on its event channel; domio's [`ioreq::IoreqServer`], attached
//! through the xensim daemon as `domio serve` would be, answers from one register. Both
//! sides may busy-poll for `--spin-us` before sleeping on their event channel.

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ioreq::{IoAccess, IoHandler, IoSpace, IoreqConfig, IoreqServer};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use xen::{IoRange, XenHost};
use xensim::client::SimHost;
use xensim::host::Host;
use xensim::hvm::{HvmBus, HvmGuest};
use xensim::server::Server;

/// Arguments of `domio bench ioreq`.
#[derive(Debug, Args)]
pub struct IoreqArgs {
    /// Seconds to run each measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Microseconds the vCPU and the ioreq thread poll the page (yielding the CPU between
    /// looks) before sleeping on their event channel (0: always sleep; the ping-pong never
    /// polls).
    #[arg(long, default_value_t = 20)]
    pub spin_us: u64,
}

/// The port the benchmark device answers.
const PORT: u16 = 0x510;

/// One 32-bit register.
struct Reg(u32);

impl IoHandler for Reg {
    fn read(&mut self, a: IoAccess) -> Option<u64> {
        (a.space == IoSpace::Port && a.addr == u64::from(PORT)).then_some(u64::from(self.0))
    }
    fn write(&mut self, a: IoAccess, v: u64) -> bool {
        if a.space == IoSpace::Port && a.addr == u64::from(PORT) {
            self.0 = v as u32;
            true
        } else {
            false
        }
    }
}

fn wait_readable(fd: &EventFd) -> anyhow::Result<()> {
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll"),
        }
        match fd.read() {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(e).context("eventfd read"),
        }
    }
}

/// Round trips between two threads over two eventfds (the same wakeup primitive xensim's
/// event channels use); returns (round trips, elapsed).
fn pingpong(duration: Duration) -> anyhow::Result<(u64, Duration)> {
    let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
    let ping = Arc::new(EventFd::from_value_and_flags(0, flags)?);
    let pong = Arc::new(EventFd::from_value_and_flags(0, flags)?);
    let (p2, q2) = (ping.clone(), pong.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        loop {
            wait_readable(&p2)?;
            if s2.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(());
            }
            q2.write(1)?;
        }
    });
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        ping.write(1)?;
        wait_readable(&pong)?;
        n += 1;
    }
    let elapsed = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Release);
    ping.write(1)?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))??;
    Ok((n, elapsed))
}

/// Runs the benchmark.
pub fn run(a: IoreqArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        a.duration.is_finite() && a.duration > 0.0 && a.duration <= 3600.0,
        "--duration must be between 0 and 3600 seconds"
    );
    let duration = Duration::from_secs_f64(a.duration);
    let spin = Duration::from_micros(a.spin_us);
    let dir = std::env::temp_dir().join(format!("domio-bench-ioreq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure(&dir, duration, spin);
    let _ = std::fs::remove_dir_all(&dir);
    let (pio_ns, trips, ping_ns, pings) = result?;
    let ratio = pio_ns / ping_ns;
    println!("PIO round trip (xensim vCPU -> domio ioreq server -> vCPU): {pio_ns:.0} ns ({trips} round trips)");
    println!("eventfd ping-pong between two threads:                  {ping_ns:.0} ns ({pings} round trips)");
    println!(
        "ratio: {ratio:.2}x (target <= 1.5x); spin before sleeping: {} us",
        a.spin_us
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "pio_rtt_ns": pio_ns,
                "pingpong_rtt_ns": ping_ns,
                "ratio_vs_pingpong": ratio,
                "pio_round_trips": trips,
                "pingpong_round_trips": pings,
                "spin_us": a.spin_us,
                "duration_s": a.duration,
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(
    dir: &std::path::Path,
    duration: Duration,
    spin: Duration,
) -> anyhow::Result<(f64, u64, f64, u64)> {
    let host = Host::new().context("creating the simulated host")?;
    let domid = host
        .create_hvm_domain("bench-hvm", 4096, 1)
        .context("creating the HVM guest")?;
    let server = Server::start(host.clone(), &dir.join("xensim.sock"))
        .context("starting the xensim daemon")?;
    let sim = SimHost::connect(server.path(), 0).context("attaching domio to the host")?;
    let mut cfg = IoreqConfig::new(domid, 1, 4096 * 4096);
    cfg.spin = spin;
    let mut srv = IoreqServer::create(&sim as &dyn XenHost, cfg)?;
    srv.ranges().map(IoRange::Port {
        start: u64::from(PORT),
        end: u64::from(PORT) + 3,
    })?;
    srv.run(Box::new(Reg(0)))?;
    let mut guest = HvmGuest::new(host.clone(), domid, 0)?;
    guest.set_spin(spin);
    guest.pio_write(PORT, 4, 0x5a5a_5a5a)?;
    for _ in 0..1000 {
        guest.pio_read(PORT, 4)?;
    }
    // Interleave the two measurements in ten rounds so that both see the same machine load.
    let rounds = 10u32;
    let slice = duration / rounds;
    let (mut trips, mut pio_time) = (0u64, Duration::ZERO);
    let (mut pings, mut ping_time) = (0u64, Duration::ZERO);
    for _ in 0..rounds {
        let start = Instant::now();
        while start.elapsed() < slice {
            for _ in 0..64 {
                let v = guest.pio_read(PORT, 4)?;
                anyhow::ensure!(v == 0x5a5a_5a5a, "PIO read returned {v:#x}");
            }
            trips += 64;
        }
        pio_time += start.elapsed();
        let (n, t) = pingpong(slice)?;
        pings += n;
        ping_time += t;
    }
    let pio_ns = pio_time.as_nanos() as f64 / trips.max(1) as f64;
    let ping_ns = ping_time.as_nanos() as f64 / pings.max(1) as f64;
    srv.shutdown();
    drop(server);
    Ok((pio_ns, trips, ping_ns, pings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bench_ioreq_short_run_measures_both_paths() {
        let dir = std::env::temp_dir().join(format!("domio-bench-ioreq-t{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = measure(&dir, Duration::from_millis(200), Duration::ZERO);
        let _ = std::fs::remove_dir_all(&dir);
        let (pio_ns, trips, ping_ns, pings) = r.unwrap();
        assert!(trips >= 64 && pings > 0);
        assert!(pio_ns > 0.0 && ping_ns > 0.0);
    }
}

//! Costs of the simulated host itself, each next to its plain-Linux floor in the same run:
//! an event-channel round trip through xensim against an eventfd ping-pong between two
//! threads, and grant map+unmap through the daemon.
//!
//! Run: `cargo bench --bench sim` (figures in docs/PERFORMANCE.md).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::XenHost;
use xensim::client::SimHost;
use xensim::efd::EventFd;
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;

fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::NONE);
}

fn bench_notify(c: &mut Criterion) {
    let mut g = c.benchmark_group("notify_round_trip");
    g.measurement_time(Duration::from_secs(3));

    // Floor: two threads bouncing an eventfd signal.
    {
        let ping = Arc::new(EventFd::new().unwrap());
        let pong = Arc::new(EventFd::new().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let (pi, po, st) = (ping.clone(), pong.clone(), stop.clone());
        let t = std::thread::spawn(move || loop {
            wait_readable(pi.as_fd());
            let _ = pi.take();
            if st.load(Ordering::Relaxed) {
                break;
            }
            po.signal().unwrap();
        });
        g.bench_function("eventfd_pingpong", |b| {
            b.iter(|| {
                ping.signal().unwrap();
                wait_readable(pong.as_fd());
                pong.take().unwrap();
            })
        });
        stop.store(true, Ordering::Relaxed);
        ping.signal().unwrap();
        t.join().unwrap();
    }

    // xensim: guest notifies, a dom0 SimHost handle takes the port, unmasks and notifies back.
    {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new().unwrap();
        let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
        let domid = host.create_domain("b", 64).unwrap();
        let guest = Guest::new(host.clone(), domid).unwrap();
        let gp = guest.alloc_unbound(0).unwrap();
        let sim = SimHost::connect(server.path(), 0).unwrap();
        let h = sim.open_evtchn().unwrap();
        let local = h.bind_interdomain(domid, gp.port()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let t = std::thread::spawn(move || {
            let mut ports = [0u32; 8];
            loop {
                wait_readable(h.fd());
                let n = h.pending(&mut ports).unwrap();
                if st.load(Ordering::Relaxed) {
                    break;
                }
                if n > 0 {
                    h.unmask(local).unwrap();
                    h.notify(local).unwrap();
                }
            }
        });
        g.bench_function("xensim_evtchn_guest_to_dom0_and_back", |b| {
            b.iter(|| {
                gp.notify().unwrap();
                wait_readable(gp.event_fd().as_fd());
                gp.try_take().unwrap();
            })
        });
        stop.store(true, Ordering::Relaxed);
        gp.notify().unwrap();
        t.join().unwrap();
    }
    g.finish();
}

fn bench_grant_map(c: &mut Criterion) {
    let mut g = c.benchmark_group("grant_map_unmap");
    g.measurement_time(Duration::from_secs(3));
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("b", 1024).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    let refs: Vec<u32> = (0..11)
        .map(|_| guest.grant(0, guest.alloc_page().unwrap(), false).unwrap())
        .collect();
    let sim = SimHost::connect(server.path(), 0).unwrap();
    let gt = sim.open_gnttab().unwrap();
    for n in [1usize, 11] {
        g.bench_function(format!("xensim_{n}_pages"), |b| {
            b.iter(|| {
                let m = gt.map(domid, &refs[..n], true).unwrap();
                drop(m);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_notify, bench_grant_map);
criterion_main!(benches);

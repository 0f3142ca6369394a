//! `domio bench net`: network throughput and packet rate, with the plain-Linux paths measured
//! in the same run.
//!
//! Everything runs in network namespaces the benchmark creates (the test helpers of
//! tests/net_common, included here so that the benchmark and the tests build their networks
//! the same way), so it needs root and leaves nothing behind:
//!
//! * `veth`: TCP from one namespace to another over a veth pair, `std::net` at both ends:
//!   the kernel's own limit for one TCP stream on this machine.
//! * `tap raw`: 64-byte frames written to a tap (with their vnet header) as fast as one
//!   thread can: the ceiling for netback's TX path.
//! * `stack over tap`: the simulated guest's TCP/IP stack (xensim's smoltcp netstack) on a
//!   tap queue with GSO, against a Linux TCP peer behind a bridge: guest-to-host and
//!   host-to-guest.
//!
//! * `netback`: the same guest stack on xensim's netfront (one queue, GSO), served by
//!   domio's netback on a real tap on the bridge: `tcp_gbps` (guest to host) and
//!   `tcp_rx_gbps`; and 64-byte frames sent by the netfront as fast as its ring allows,
//!   through netback to a tap on no bridge: `tx_pps_64b`.
//!
//! CPU per packet is the process's CPU time (all threads: guest, netback and the Linux peer's
//! threads alike) over the frames moved.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

#[path = "../../tests/net_common/mod.rs"]
mod net_common;

use backends::net::engine::{NetQueueIo, VirtioNetHdr};
use backends::net::tap::hotplug::{HostSetup, HostSide};
use backends::net::tap::{Offloads, Tap, TapOptions, VifId};
use net_common::netback::netback_rig;
use net_common::tapdev::TapFrameDevice;
use net_common::{in_netns, ip, Lan, Peer, GUEST_MAC};
use xensim::front::frame::{FrameDevice, FrameMeta};
use xensim::front::net::NetFrontOptions;
use xensim::front::netstack::{NetConfig, NetStack, Transfer};

use super::cpu::process_cpu_time;

/// Arguments of `domio bench net`.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// Seconds to run each measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NetReport {
    /// Guest-to-host TCP through the path domio serves (Gbit/s).
    pub tcp_gbps: f64,
    /// Host-to-guest TCP through that path (Gbit/s).
    pub tcp_rx_gbps: f64,
    /// What `tcp_gbps` measured.
    pub tcp_path: String,
    /// CPU nanoseconds (whole process: guest, netback, Linux peer threads) per guest frame.
    pub tcp_cpu_ns_per_frame: f64,
    /// TCP over a veth pair between two namespaces (Gbit/s).
    pub veth_gbps: f64,
    /// `tcp_gbps / veth_gbps`.
    pub ratio_vs_veth: f64,
    /// 64-byte frames per second transmitted on the path domio serves.
    pub tx_pps_64b: f64,
    /// What `tx_pps_64b` measured.
    pub tx_pps_path: String,
    /// CPU nanoseconds per 64-byte frame on that path.
    pub tx_cpu_ns_per_packet: f64,
    /// Frames per netback grant-copy batch on that path.
    pub tx_frames_per_copy_64b: f64,
    /// Frames per netback event-channel wakeup on that path.
    pub tx_frames_per_event_64b: f64,
    /// 64-byte frames per second written straight to a tap (one thread).
    pub tap_raw_pps_64b: f64,
    /// CPU nanoseconds per frame of those writes.
    pub tap_raw_cpu_ns_per_packet: f64,
    /// Guest stack on a tap, no netback: guest to host (Gbit/s).
    pub stack_tap_tx_gbps: f64,
    /// Guest stack on a tap, no netback: host to guest (Gbit/s).
    pub stack_tap_rx_gbps: f64,
    /// CPU nanoseconds per received/sent frame of the guest stack runs.
    pub stack_tap_cpu_ns_per_frame: f64,
    /// Seconds per measurement.
    pub duration_s: f64,
    /// Logical CPUs of the machine.
    pub cpus: usize,
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64().max(1e-9) / 1e9
}

/// TCP between two namespaces over a veth pair.
fn veth_baseline(dur: Duration) -> anyhow::Result<f64> {
    in_netns(move || {
        let a = Peer::new();
        let b = Peer::new();
        ip(&["link", "add", "bv0", "type", "veth", "peer", "name", "bv1"]);
        ip(&["link", "set", "bv0", "netns", &a.path()]);
        ip(&["link", "set", "bv1", "netns", &b.path()]);
        a.ip(&["addr", "add", "10.88.0.1/24", "dev", "bv0"]);
        a.ip(&["link", "set", "bv0", "up"]);
        b.ip(&["addr", "add", "10.88.0.2/24", "dev", "bv1"]);
        b.ip(&["link", "set", "bv1", "up"]);
        let addr = SocketAddr::from((Ipv4Addr::new(10, 88, 0, 2), 5201));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = b.spawn(move || -> std::io::Result<u64> {
            let l = TcpListener::bind(addr)?;
            let _ = tx.send(());
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                match std::io::Read::read(&mut s, &mut buf)? {
                    0 => return Ok(n),
                    k => n += k as u64,
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .context("veth sink listening")?;
        let source = a.spawn(move || -> std::io::Result<(u64, Duration)> {
            let mut s = TcpStream::connect(addr)?;
            let buf = vec![0x5au8; 1 << 20];
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < dur {
                std::io::Write::write_all(&mut s, &buf)?;
                n += buf.len() as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok((n, start.elapsed()))
        });
        let (sent, elapsed) = source
            .join()
            .map_err(|_| anyhow::anyhow!("veth source panicked"))??;
        let got = sink
            .join()
            .map_err(|_| anyhow::anyhow!("veth sink panicked"))??;
        anyhow::ensure!(got == sent, "veth sink got {got} of {sent} bytes");
        Ok(gbps(sent, elapsed))
    })
}

/// A 64-byte Ethernet frame (IPv4/UDP) from the guest's MAC.
fn frame_64b() -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[6..12].copy_from_slice(&GUEST_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&50u16.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 77, 0, 1]);
    f[30..34].copy_from_slice(&[10, 77, 0, 99]);
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&30u16.to_be_bytes());
    f
}

/// 64-byte frames written straight to a tap: (frames per second, CPU ns per frame).
fn tap_raw(dur: Duration) -> anyhow::Result<(f64, f64)> {
    in_netns(move || {
        let tap = Tap::open(VifId { domid: 1, devid: 0 }, &TapOptions::default())?;
        let q = tap.queues()[0].clone();
        let f = frame_64b();
        let hdr = VirtioNetHdr::default();
        let cpu0 = process_cpu_time()?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            for _ in 0..1024 {
                q.send(&hdr, &[IoSlice::new(&f)])?;
            }
            n += 1024;
        }
        let el = start.elapsed();
        let cpu = process_cpu_time()?.saturating_sub(cpu0);
        Ok((
            n as f64 / el.as_secs_f64(),
            cpu.as_nanos() as f64 / n as f64,
        ))
    })
}

/// TCP both ways between the guest stack `g` and a Linux peer on `lan`, each transfer sized
/// from a short probe to take about `dur`: (guest-to-host, host-to-guest) in bytes and time.
/// Like the veth baseline, the streams are counted, not hashed (the tests compare checksums).
fn tcp_both_ways<D: FrameDevice>(
    g: &mut NetStack<D>,
    lan: &Lan,
    dur: Duration,
) -> anyhow::Result<(Transfer, Transfer)> {
    g.set_stream_hashing(false);
    let t = dur * 4 + Duration::from_secs(60);
    let probe = 8u64 << 20;
    let (addr, server) = lan.tcp_server_with(5301, 0, false);
    let h = g.tcp_connect(addr, t)?;
    let p = g.tcp_send_pattern(h, probe, t)?;
    let _ = g.tcp_recv_all(h, t);
    let _ = server.join();
    let n = (((probe as f64 / p.elapsed.as_secs_f64()) * dur.as_secs_f64()) as u64).max(probe);
    let (addr, server) = lan.tcp_server_with(5302, 0, false);
    let h = g.tcp_connect(addr, t)?;
    let up = g.tcp_send_pattern(h, n, t)?;
    let _ = g.tcp_recv_all(h, t);
    let got = server
        .join()
        .map_err(|_| anyhow::anyhow!("Linux receiver panicked"))?;
    anyhow::ensure!(
        got == up.sum,
        "guest-to-host: Linux got {} of {} bytes",
        got.bytes,
        up.sum.bytes
    );
    let (addr, server) = lan.tcp_server_with(5303, n, false);
    let h = g.tcp_connect(addr, t)?;
    let down = g.tcp_recv_all(h, t)?;
    g.tcp_close(h, t)?;
    let sent = server
        .join()
        .map_err(|_| anyhow::anyhow!("Linux sender panicked"))?;
    anyhow::ensure!(
        sent == down.sum,
        "host-to-guest: the guest got {} of {} bytes",
        down.sum.bytes,
        sent.bytes
    );
    Ok((up, down))
}

/// TCP figures of one path: Gbit/s each way and CPU ns per guest frame.
struct TcpFigures {
    tx_gbps: f64,
    rx_gbps: f64,
    cpu_ns_per_frame: f64,
}

fn tcp_figures<D: FrameDevice>(
    g: &mut NetStack<D>,
    lan: &Lan,
    dur: Duration,
) -> anyhow::Result<TcpFigures> {
    let cpu0 = process_cpu_time()?;
    let s0 = g.stats();
    let (up, down) = tcp_both_ways(g, lan, dur)?;
    let cpu = process_cpu_time()?.saturating_sub(cpu0);
    let s1 = g.stats();
    let frames = (s1.tx_frames + s1.rx_frames - s0.tx_frames - s0.rx_frames).max(1);
    Ok(TcpFigures {
        tx_gbps: gbps(up.sum.bytes, up.elapsed),
        rx_gbps: gbps(down.sum.bytes, down.elapsed),
        cpu_ns_per_frame: cpu.as_nanos() as f64 / frames as f64,
    })
}

/// The guest stack straight on a tap with GSO, against Linux.
fn stack_over_tap(dur: Duration) -> anyhow::Result<TcpFigures> {
    in_netns(move || {
        let lan = Lan::new(1500);
        let vif = VifId { domid: 2, devid: 0 };
        let tap = Tap::open(
            vif,
            &TapOptions {
                offloads: Offloads {
                    csum: true,
                    tso4: true,
                    tso6: true,
                    tso_ecn: false,
                },
                ..TapOptions::default()
            },
        )?;
        let _host = HostSide::online(vif, tap.name(), HostSetup::Bridge(lan.bridge.clone()))?;
        let dev = TapFrameDevice::new(tap.queues()[0].clone(), true, 1500);
        let mut g = NetStack::new(dev, &NetConfig::ipv4(GUEST_MAC, lan.guest_ip, 24))?;
        tcp_figures(&mut g, &lan, dur)
    })
}

/// The guest stack on xensim's netfront, served by domio's netback on a tap (one queue, GSO),
/// against Linux.
fn netback_tcp(dur: Duration) -> anyhow::Result<TcpFigures> {
    in_netns(move || {
        let lan = Lan::new(1500);
        let mut rig = netback_rig(Some(&lan.bridge), None, NetFrontOptions::default());
        let mut g = NetStack::new(rig.queue(), &NetConfig::ipv4(GUEST_MAC, lan.guest_ip, 24))?;
        tcp_figures(&mut g, &lan, dur)
    })
}

/// What [`netback_pps`] measured.
struct PpsFigures {
    pps: f64,
    cpu_ns: f64,
    /// Frames per grant-copy batch and per event-channel wakeup of netback.
    per_copy: f64,
    per_event: f64,
}

/// 64-byte frames from the guest's netfront through netback to a tap (one queue, the tap on
/// no bridge): frames per second netback wrote, CPU ns per frame for the whole process, and
/// netback's batching.
fn netback_pps(dur: Duration) -> anyhow::Result<PpsFigures> {
    in_netns(move || {
        let mut rig = netback_rig(None, None, NetFrontOptions::default());
        let mut q = rig.queue();
        let f = frame_64b();
        let meta = FrameMeta::default();
        let s0 = rig.stats();
        let cpu0 = process_cpu_time()?;
        let start = Instant::now();
        let mut sent = 0u64;
        let mut rx = Vec::with_capacity(65536);
        while start.elapsed() < dur {
            while q.send(&f, meta)? {
                sent += 1;
            }
            // Take what the host sends the guest (IPv6 neighbour discovery and the like), as a
            // guest does: an unread RX ring would make every wait return at once.
            while q.recv(&mut rx)?.is_some() {}
            q.wait(Duration::from_millis(10))?;
        }
        // Let netback finish what is on the ring (counted when written to the tap).
        let end = Instant::now() + Duration::from_secs(10);
        while rig.stats().tx_packets - s0.tx_packets < sent && Instant::now() < end {
            while q.recv(&mut rx)?.is_some() {}
            q.wait(Duration::from_millis(10))?;
        }
        let el = start.elapsed();
        let cpu = process_cpu_time()?.saturating_sub(cpu0);
        let done = rig.stats().tx_packets - s0.tx_packets;
        anyhow::ensure!(
            done == sent,
            "netback wrote {done} of the {sent} frames sent"
        );
        let s1 = rig.stats();
        Ok(PpsFigures {
            pps: done as f64 / el.as_secs_f64(),
            cpu_ns: cpu.as_nanos() as f64 / done.max(1) as f64,
            per_copy: done as f64 / (s1.grant_copies - s0.grant_copies).max(1) as f64,
            per_event: done as f64 / (s1.events - s0.events).max(1) as f64,
        })
    })
}

/// Runs the benchmark.
pub fn run(a: NetArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        a.duration > 0.0 && a.duration <= 3600.0,
        "--duration must be in (0, 3600] seconds"
    );
    let dur = Duration::from_secs_f64(a.duration);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let veth = veth_baseline(dur).context("veth baseline")?;
    println!("veth TCP (namespace to namespace): {veth:.2} Gbit/s");
    let (raw_pps, raw_cpu) = tap_raw(dur).context("raw tap writes")?;
    println!(
        "tap raw 64-byte writes: {:.3} Mpps, {raw_cpu:.0} ns CPU/frame",
        raw_pps / 1e6
    );
    let st = stack_over_tap(dur).context("guest stack over a tap")?;
    println!(
        "guest stack on tap (GSO, no netback): guest->host {:.2} Gbit/s, host->guest {:.2} Gbit/s, \
         {:.0} ns CPU/frame",
        st.tx_gbps, st.rx_gbps, st.cpu_ns_per_frame
    );
    let nb = netback_tcp(dur).context("TCP through netback")?;
    println!(
        "TCP through netback (GSO, 1 queue): guest->host {:.2} Gbit/s, host->guest {:.2} Gbit/s, \
         {:.0} ns CPU/frame",
        nb.tx_gbps, nb.rx_gbps, nb.cpu_ns_per_frame
    );
    let pf = netback_pps(dur).context("64-byte frames through netback")?;
    let (pps, pps_cpu) = (pf.pps, pf.cpu_ns);
    println!(
        "64-byte TX through netback: {:.3} Mpps, {pps_cpu:.0} ns CPU/frame, {:.1} frames per \
         grant copy, {:.1} per event",
        pps / 1e6,
        pf.per_copy,
        pf.per_event
    );
    let rep = NetReport {
        tcp_gbps: nb.tx_gbps,
        tcp_rx_gbps: nb.rx_gbps,
        tcp_path: "xensim netfront -> domio netback -> tap -> bridge -> veth -> Linux TCP".into(),
        tcp_cpu_ns_per_frame: nb.cpu_ns_per_frame,
        veth_gbps: veth,
        ratio_vs_veth: nb.tx_gbps / veth.max(1e-9),
        tx_pps_64b: pps,
        tx_pps_path: "xensim netfront -> domio netback -> tap".into(),
        tx_cpu_ns_per_packet: pps_cpu,
        tx_frames_per_copy_64b: pf.per_copy,
        tx_frames_per_event_64b: pf.per_event,
        tap_raw_pps_64b: raw_pps,
        tap_raw_cpu_ns_per_packet: raw_cpu,
        stack_tap_tx_gbps: st.tx_gbps,
        stack_tap_rx_gbps: st.rx_gbps,
        stack_tap_cpu_ns_per_frame: st.cpu_ns_per_frame,
        duration_s: a.duration,
        cpus,
    };
    println!(
        "TCP {:.2} Gbit/s = {:.2}x veth ({})",
        rep.tcp_gbps, rep.ratio_vs_veth, rep.tcp_path
    );
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    }
    Ok(ExitCode::SUCCESS)
}

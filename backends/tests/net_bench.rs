//! Packet rates through netback in xensim with the socketpair engine double (no tap, so this
//! measures netback, xensim's grant copies and the netfront, not the kernel). Ignored by
//! default; run with
//! `cargo test --release -p backends --test net_bench -- --ignored --nocapture`.
//! `domio bench net` measures the whole path with a tap and TCP.

mod net_common;

use std::time::{Duration, Instant};

use backends::net::engine::VirtioNetHdr;
use net_common::*;
use xensim::front::frame::FrameMeta;
use xensim::front::net::{NetFront, NetFrontOptions};

const FRAMES: usize = 50_000;

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn bench_tx_64_byte_frames_per_second() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let q = f.queue(0).unwrap();
    let frame = udp_frame(mac_of(0), [2; 6], 64 - 42, 1);
    let start = Instant::now();
    let mut sent = 0;
    while sent < FRAMES {
        while sent < FRAMES && q.send_frame(&frame, FrameMeta::default()).unwrap() {
            sent += 1;
        }
        q.wait_event(Duration::from_millis(5)).unwrap();
    }
    // Every frame is handed to the engine (the double's socket may refuse some when its
    // reader falls behind, as a full queue would: counted, not waited for).
    let s = rig.wait_stats(0, "every frame handed to the engine", |s| {
        s.tx_packets + s.tx_engine_errors >= FRAMES as u64
    });
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "netback TX 64 B: {:.0} frames/s ({} frames in {secs:.3} s, {:.1} frames per grant \
         copy, {} refused by the engine double)",
        FRAMES as f64 / secs,
        FRAMES,
        s.tx_packets as f64 / s.grant_copies.max(1) as f64,
        s.tx_engine_errors
    );
    assert_eq!(s.tx_packets + s.tx_engine_errors, FRAMES as u64);
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn bench_rx_64_byte_frames_per_second() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let q = f.queue(0).unwrap();
    let frame = udp_frame([2; 6], mac_of(0), 64 - 42, 1);
    let net = rig.net.clone();
    let injector = std::thread::spawn(move || {
        for _ in 0..FRAMES {
            while !net.try_inject(0, 0, &VirtioNetHdr::default(), &frame) {
                std::thread::yield_now();
            }
        }
    });
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut got = 0;
    let deadline = start + Duration::from_secs(60);
    // Until every frame was delivered or dropped (the guest cannot keep up: XSA-392's bound).
    while Instant::now() < deadline {
        let dropped = rig.stats(0).rx_backlog_drops as usize;
        if got + dropped >= FRAMES {
            break;
        }
        while q.recv_frame(&mut buf).unwrap().is_some() {
            got += 1;
        }
        if got < FRAMES {
            q.wait_event(Duration::from_millis(5)).unwrap();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    injector.join().unwrap();
    let s = rig.stats(0);
    eprintln!(
        "netback RX 64 B: {:.0} frames/s delivered ({got} of {FRAMES} in {secs:.3} s; backlog drops {})",
        got as f64 / secs,
        s.rx_backlog_drops
    );
    assert!(got > 0);
}

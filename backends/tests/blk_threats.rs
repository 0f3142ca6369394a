//! THREATS.md sections 1 and 2 against blkback: one test per row, named after its XSA, plus
//! the hardening table. Each test says what the hostile guest does and what must not happen.

mod blk_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::blk::BlkConfig;
use blk_common::*;
use xen::abi::blkif::*;
use xen::PAGE_SIZE;
use xenbus::{XenbusState, XsOps};

fn put_obj<T: zerocopy_free::Obj>(f: &mut TestFront, v: &T) {
    let at = f.slot_addr(0, f.queues[0].req_prod_pvt);
    v.write(&f.guest, at);
    f.queues[0].req_prod_pvt += 1;
}

/// Writing the discard and indirect variants into a slot without zerocopy in this crate.
mod zerocopy_free {
    use xen::abi::blkif::*;
    use xensim::guest::Guest;
    pub trait Obj {
        fn write(&self, g: &Guest, at: usize);
    }
    impl Obj for BlkifRequestDiscard {
        fn write(&self, g: &Guest, at: usize) {
            g.ram().write_obj(at, self).unwrap();
        }
    }
    impl Obj for BlkifRequestIndirect {
        fn write(&self, g: &Guest, at: usize) {
            g.ram().write_obj(at, self).unwrap();
        }
    }
}

fn indirect(op: u8, nr: u16, id: u64, sector: u64, page: u32) -> BlkifRequestIndirect {
    let mut grefs = [0u32; 8];
    grefs[0] = page;
    BlkifRequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: op,
        nr_segments: nr,
        id,
        sector_number: sector,
        indirect_grefs: grefs,
        ..Default::default()
    }
}

/// Reads, writes and discards the disk saw (the flush at disconnect excluded).
fn data_ops(r: &Rig) -> Vec<Logged> {
    r.disk
        .ops()
        .into_iter()
        .filter(|o| o.op != backends::blk::engine::IoOp::Flush)
        .collect()
}

fn seg_bytes(segs: &[(u32, u8, u8)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (g, f, l) in segs {
        b.extend_from_slice(&g.to_le_bytes());
        b.extend_from_slice(&[*f, *l, 0, 0]);
    }
    b
}

// ------------------------------------------------------------------ §1 rules for every backend

#[test]
fn test_xsa155_flipper_rewrites_operation_and_nr_segments_no_panic() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(3, false);
    let size = f.queues[0].size;
    let slots: Vec<usize> = (0..size).map(|i| f.slot_addr(0, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let ram = f.guest.clone();
    let st = stop.clone();
    let flipper = std::thread::spawn(move || {
        let mut x = 0u32;
        while !st.load(Ordering::Relaxed) {
            for at in &slots {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let b = x.to_le_bytes();
                // operation and nr_segments
                let _ = ram.ram().write(*at, &b[..2]);
                // first/last sect of segment 0
                let _ = ram.ram().write(*at + 28, &b[2..4]);
            }
        }
    });

    let mut answered = 0;
    for round in 0..40u64 {
        for i in 0..size {
            f.put(
                0,
                &rw(BLKIF_OP_READ, round * 1000 + u64::from(i), 0, &[(gr, 0, 7)]),
            );
        }
        f.push(0);
        let rsps = f.responses(0, size as usize);
        answered += rsps.len();
        assert!(rsps.iter().all(|x| matches!(
            x.status,
            BLKIF_RSP_OKAY | BLKIF_RSP_ERROR | BLKIF_RSP_EOPNOTSUPP
        )));
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let after = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, 0, &[(gr, 0, 7)]));

    assert_eq!(answered, 40 * size as usize);
    assert_eq!(after.status, BLKIF_RSP_OKAY, "the ring still serves");
    assert_eq!(r.stats(0).in_flight, 0);
    assert!(!mapped(&r.guest, gr));
}

#[test]
fn test_xsa39_req_prod_far_ahead_disconnects() {
    let r = rig(&[(0, "w"), (1, "w")]);
    let bad = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let mut good = TestFront::connect(&r.guest, 1, FrontOpts::default());
    let ring_ref = bad.queues[0].refs[0];
    let size = bad.queues[0].size;

    let t0 = Instant::now();
    bad.set_req_prod(0, 10 * size);
    wait_for("the rogue ring to be halted", || {
        r.stats(0).rogue_rings == 1
    });
    wait_for("the rogue ring to be unmapped", || {
        !mapped(&r.guest, ring_ref)
    });
    let took = t0.elapsed();
    let (_, gr) = good.data_page(0, false);
    let rsp = good.roundtrip(0, &rw(BLKIF_OP_READ, 9, 0, &[(gr, 0, 7)]));

    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(bad.rsp_prod(0), 0, "nothing consumed from the rogue ring");
    assert!(r
        .read_backend(0, "error")
        .unwrap()
        .contains("broke the ring protocol"));
    assert!(data_ops(&r).iter().all(|o| o.offset == 0 && o.len == 4096));
    assert_eq!(rsp.status, BLKIF_RSP_OKAY, "the other disk goes on");
    assert!(
        bad.queues[0].port.remote().is_none(),
        "event channel unbound"
    );
}

#[test]
fn test_xsa216_response_padding_is_zero() {
    for proto in [None, Some(XEN_IO_PROTO_ABI_X86_32)] {
        let r = rig(&[(0, "w")]);
        let mut f = TestFront::connect(
            &r.guest,
            0,
            FrontOpts {
                protocol: proto,
                ..FrontOpts::default()
            },
        );
        let (_, gr) = f.data_page(0, false);
        // Pre-fill the whole ring area after the header with 0xAA.
        let base = f.queues[0].base;
        f.guest.ram().fill(base + 64, PAGE_SIZE - 64, 0xaa).unwrap();

        let rsp = f.roundtrip(
            0,
            &rw(BLKIF_OP_READ, 0x0102_0304_0506_0708, 0, &[(gr, 0, 7)]),
        );
        let mut bytes = [0u8; 16];
        f.guest.ram().read(base + 64, &mut bytes).unwrap();

        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
        assert_eq!(&bytes[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(bytes[8], BLKIF_OP_READ);
        assert_eq!(bytes[9], 0, "pad0 ({proto:?})");
        assert_eq!(&bytes[10..12], &[0, 0], "status");
        if proto.is_none() {
            assert_eq!(
                &bytes[12..16],
                &[0, 0, 0, 0],
                "pad1 of the 16-byte response"
            );
        }
    }
}

#[test]
fn test_xsa332_notify_flood_other_device_latency_bounded() {
    let r = rig(&[(0, "w"), (1, "w")]);
    let noisy = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let mut quiet = TestFront::connect(&r.guest, 1, FrontOpts::default());
    let (_, gr) = quiet.data_page(0, false);
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::Relaxed) && n < 1_000_000 {
            noisy.queues[0].port.notify().unwrap();
            n += 1;
            // xensim's event channels share one host lock; let the other vCPU at it.
            std::thread::yield_now();
        }
        (noisy, n)
    });

    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let t = Instant::now();
        let rsp = quiet.roundtrip(0, &rw(BLKIF_OP_READ, i, 0, &[(gr, 0, 7)]));
        worst = worst.max(t.elapsed());
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    }
    stop.store(true, Ordering::Relaxed);
    let (_noisy, sent) = flood.join().unwrap();

    assert!(sent > 0);
    assert!(worst < Duration::from_secs(1), "worst round trip {worst:?}");
    assert_eq!(
        r.stats(0).reads + r.stats(0).errors,
        0,
        "no work from spurious events"
    );
}

#[test]
fn test_xsa362_segment_7_invalid_maps_undone() {
    for persistent in [false, true] {
        let r = rig(&[(0, "w")]);
        let mut f = TestFront::connect(
            &r.guest,
            0,
            FrontOpts {
                persistent,
                ..FrontOpts::default()
            },
        );
        let pages: Vec<_> = (0..11).map(|_| f.data_page(0, false)).collect();
        let mut segs: Vec<(u32, u8, u8)> = pages.iter().map(|(_, g)| (*g, 0, 7)).collect();
        segs[7].0 = 60_000; // never granted

        let rsp = f.roundtrip(0, &rw(BLKIF_OP_READ, 7, 0, &segs));
        let mapped_now = pages.iter().filter(|(_, g)| mapped(&r.guest, *g)).count();
        f.close();

        assert_eq!(rsp.status, BLKIF_RSP_ERROR);
        assert!(data_ops(&r).is_empty(), "nothing reached the disk");
        assert_eq!(r.stats(0).grant_errors, 1);
        if !persistent {
            assert_eq!(mapped_now, 0, "every other map of the batch undone");
        }
        assert!(
            pages.iter().all(|(_, g)| !mapped(&r.guest, *g)),
            "nothing mapped after close (persistent={persistent})"
        );
    }
}

#[test]
fn test_xsa349_frontend_state_flood_bounded_and_io_continues() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let state = format!("{}/state", f.link.path());

    for _ in 0..20_000 {
        f.link.xs().write(&state, b"4").unwrap();
    }
    let (_, gr) = f.data_page(0, false);
    let rsp = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, 0, &[(gr, 0, 7)]));
    let stats = r.watcher.as_ref().unwrap().queue_stats();

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert!(
        stats.max_pending <= xenbus::watch::DEFAULT_WATCH_QUEUE_CAPACITY,
        "{stats:?}"
    );
    assert!(r.wait_connected(0, true));
}

#[test]
fn test_xsa350_random_state_sequences() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let ring_ref = f.queues[0].refs[0];
    let state = format!("{}/state", f.link.path());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;

    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let s = 1 + (x % 6);
        f.link.xs().write(&state, s.to_string().as_bytes()).unwrap();
    }
    // Settle: close cleanly, then come back and do I/O.
    f.link.switch_state(XenbusState::Closed).unwrap();
    f.link
        .wait_backend("Closed", T, |s| s == XenbusState::Closed)
        .unwrap();
    let closed_mapped = mapped(&r.guest, ring_ref);
    f.link.switch_state(XenbusState::Initialising).unwrap();
    f.link
        .wait_backend("InitWait", T, |s| s == XenbusState::InitWait)
        .unwrap();
    // The rings are reused: reset the indices as a restarting frontend does.
    let base = f.queues[0].base;
    f.guest.ram().fill(base, 64, 0).unwrap();
    f.guest
        .ram()
        .store_u32(base + 4, 1, Ordering::SeqCst)
        .unwrap();
    f.guest
        .ram()
        .store_u32(base + 12, 1, Ordering::SeqCst)
        .unwrap();
    f.queues[0].req_prod_pvt = 0;
    f.queues[0].rsp_cons = 0;
    f.link.switch_state(XenbusState::Initialised).unwrap();
    f.link
        .wait_backend("Connected", T, |s| s == XenbusState::Connected)
        .unwrap();
    let (_, gr) = f.data_page(0, false);
    let rsp = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, 0, &[(gr, 0, 7)]));
    f.close();

    assert!(!closed_mapped, "no ring mapping survives Closed");
    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert!(!mapped(&r.guest, ring_ref));
    assert!(
        f.queues[0].port.remote().is_none(),
        "no bound event channel leaked"
    );
    assert_eq!(r.stats(0).in_flight, 0);
}

#[test]
fn test_xsa396_after_disconnect_no_grant_mapped() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let pages: Vec<_> = (0..8).map(|_| f.data_page(0, false)).collect();
    for (i, (_, g)) in pages.iter().enumerate() {
        f.roundtrip(0, &rw(BLKIF_OP_WRITE, i as u64, 0, &[(*g, 0, 7)]));
    }
    r.disk.hold();
    let (_, inflight) = f.data_page(0, false);
    f.put(0, &rw(BLKIF_OP_READ, 99, 0, &[(inflight, 0, 7)]));
    f.push(0);
    wait_for("the read to reach the disk", || r.disk.held() == 1);

    f.link.switch_state(XenbusState::Closing).unwrap();
    r.disk.release();
    f.link
        .wait_backend("Closing", T, |s| s >= XenbusState::Closing)
        .unwrap();
    assert!(r.wait_connected(0, false));

    assert!(pages.iter().all(|(_, g)| !mapped(&r.guest, *g)));
    assert!(!mapped(&r.guest, inflight));
    assert!(!mapped(&r.guest, f.queues[0].refs[0]));
}

// ------------------------------------------------------------------ §2 block backend

#[test]
fn test_xsa155_indirect_page_changed_after_read_is_read_once() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (ga, ra) = f.data_page(0xaa, true);
    let (_, rb) = f.data_page(0xbb, true);
    let (ig, ir) = f.data_page(0, true);
    let _ = ga;
    f.guest
        .write_page(ig, 0, &seg_bytes(&[(ra, 0, 7)]))
        .unwrap();
    r.disk.hold();

    put_obj(&mut f, &indirect(BLKIF_OP_WRITE, 1, 5, 0, ir));
    f.push(0);
    wait_for("the write to reach the disk", || r.disk.held() == 1);
    // After the backend read the page: point the segment elsewhere and claim more segments.
    f.guest
        .write_page(ig, 0, &seg_bytes(&[(rb, 0, 7), (rb, 0, 7)]))
        .unwrap();
    let at = f.slot_addr(0, 0);
    f.guest.ram().write(at + 2, &2u16.to_le_bytes()).unwrap();
    r.disk.release();
    let rsp = f.responses(0, 1)[0];

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(r.disk.read_at(0, PAGE_SIZE), vec![0xaa; PAGE_SIZE]);
    assert_eq!(
        r.disk.read_at(PAGE_SIZE, 16),
        vec![0; 16],
        "no second segment"
    );
    assert_eq!(r.disk.ops()[0].len, 4096);
}

#[test]
fn test_xsa155_indirect_nr_segments_0_max_plus_1_65535_error() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (ig, ir) = f.data_page(0, true);
    let (_, d) = f.data_page(0, false);
    let segs: Vec<(u32, u8, u8)> = (0..512).map(|_| (d, 0, 7)).collect();
    f.guest.write_page(ig, 0, &seg_bytes(&segs)).unwrap();

    for (i, nr) in [0u16, 257, 65535].into_iter().enumerate() {
        put_obj(&mut f, &indirect(BLKIF_OP_READ, nr, i as u64, 0, ir));
    }
    put_obj(&mut f, &indirect(BLKIF_OP_DISCARD, 1, 3, 0, ir));
    f.push(0);
    let rsps = f.responses(0, 4);

    assert!(rsps.iter().all(|x| x.status == BLKIF_RSP_ERROR), "{rsps:?}");
    assert!(r.disk.ops().is_empty());
    assert!(!mapped(&r.guest, ir));
    assert_eq!(r.stats(0).bad_requests, 4);
}

#[test]
fn test_blk_hardening_table_one_error_per_malformed_field_nothing_reaches_disk() {
    let r = rig(&[(0, "w"), (1, "r")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let mut ro = TestFront::connect(&r.guest, 1, FrontOpts::default());
    let (_, g) = f.data_page(0, false);
    let (_, g_ro) = ro.data_page(0, true);
    let last = DISK_BYTES / 512;
    let mut twelve = rw(BLKIF_OP_READ, 0, 0, &[(g, 0, 7)]);
    twelve.nr_segments = 12;
    let cases: Vec<(&str, BlkifRequest, i16)> = vec![
        (
            "first_sect > last_sect",
            rw(BLKIF_OP_READ, 1, 0, &[(g, 5, 4)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "last_sect >= 8",
            rw(BLKIF_OP_READ, 2, 0, &[(g, 0, 8)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "sector past the end",
            rw(BLKIF_OP_READ, 3, last, &[(g, 0, 0)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "range crosses the end",
            rw(BLKIF_OP_READ, 4, last - 1, &[(g, 0, 1)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "sector wraps u64",
            rw(BLKIF_OP_READ, 5, u64::MAX - 2, &[(g, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        ("nr_segments > 11", twelve, BLKIF_RSP_ERROR),
        (
            "read without segments",
            rw(BLKIF_OP_READ, 7, 0, &[]),
            BLKIF_RSP_ERROR,
        ),
        (
            "unknown op",
            rw(200, 8, 0, &[(g, 0, 7)]),
            BLKIF_RSP_EOPNOTSUPP,
        ),
        (
            "reserved op 4",
            rw(BLKIF_OP_RESERVED_1, 9, 0, &[(g, 0, 7)]),
            BLKIF_RSP_EOPNOTSUPP,
        ),
    ];
    for (_, req, _) in &cases {
        f.put(0, req);
    }
    let huge = BlkifRequestDiscard {
        operation: BLKIF_OP_DISCARD,
        id: 10,
        sector_number: 8,
        nr_sectors: u64::MAX - 4,
        ..Default::default()
    };
    put_obj(&mut f, &huge);
    f.push(0);
    let rsps = f.responses(0, cases.len() + 1);
    let ro_write = ro.roundtrip(0, &rw(BLKIF_OP_WRITE, 11, 0, &[(g_ro, 0, 7)]));

    for ((name, req, want), got) in cases.iter().zip(&rsps) {
        assert_eq!(got.id, req.id, "{name}");
        assert_eq!(got.status, *want, "{name}");
    }
    assert_eq!(rsps.last().unwrap().status, BLKIF_RSP_ERROR, "huge discard");
    assert_eq!(ro_write.status, BLKIF_RSP_ERROR, "write to read-only");
    assert!(r.disk.ops().is_empty(), "{:?}", r.disk.ops());
    assert!(!mapped(&r.guest, g));
}

#[test]
fn test_blk_grant_never_granted_or_granted_elsewhere_or_readonly_answers_error() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let other = f.guest.alloc_page().unwrap();
    let to_dom7 = f.guest.grant(7, other, false).unwrap();
    let (_, ro) = f.data_page(0, true);

    let a = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, 0, &[(50_000, 0, 7)]));
    let b = f.roundtrip(0, &rw(BLKIF_OP_READ, 2, 0, &[(to_dom7, 0, 7)]));
    let c = f.roundtrip(0, &rw(BLKIF_OP_READ, 3, 0, &[(ro, 0, 7)]));
    let d = f.roundtrip(0, &rw(BLKIF_OP_WRITE, 4, 0, &[(ro, 0, 7)]));

    assert_eq!(a.status, BLKIF_RSP_ERROR, "never granted");
    assert_eq!(b.status, BLKIF_RSP_ERROR, "granted to another domain");
    assert_eq!(
        c.status, BLKIF_RSP_ERROR,
        "disk read into a read-only grant"
    );
    assert_eq!(
        d.status, BLKIF_RSP_OKAY,
        "disk write from a read-only grant"
    );
    assert_eq!(r.stats(0).grant_errors, 3);
}

#[test]
fn test_xsa175_frontend_ring_page_order_30_fails_connect() {
    let r = rig(&[(0, "w"), (1, "w"), (2, "w"), (3, "w")]);
    let bad = [
        ("ring-page-order", "30"),
        ("multi-queue-num-queues", "4096"),
        ("protocol", "sparc64-abi"),
        ("feature-persistent", "yes"),
    ];

    let fronts: Vec<TestFront> = bad
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            TestFront::publish(
                &r.guest,
                i as u32,
                FrontOpts {
                    extra: vec![(k.to_string(), v.to_string())],
                    ..FrontOpts::default()
                },
            )
        })
        .collect();

    for (i, f) in fronts.iter().enumerate() {
        let s = f
            .link
            .wait_backend("Closing", T, |s| s >= XenbusState::Closing)
            .unwrap();
        assert!(s >= XenbusState::Closing, "{:?}", bad[i]);
        let err = r.read_backend(i as u32, "error").unwrap_or_default();
        assert!(err.contains(bad[i].0), "{:?}: {err}", bad[i]);
        assert!(!mapped(&r.guest, f.queues[0].refs[0]));
    }
    assert!(r.stats(0).grant_maps == 0);
}

#[test]
fn test_blk_malformed_event_channel_and_missing_ring_ref_fail_connect() {
    let r = rig(&[(0, "w"), (1, "w")]);
    let a = TestFront::publish(
        &r.guest,
        0,
        FrontOpts {
            extra: vec![("event-channel".into(), "0x10".into())],
            ..FrontOpts::default()
        },
    );
    let b = TestFront::publish(
        &r.guest,
        1,
        FrontOpts {
            order: Some(1),
            extra: vec![("ring-ref1".into(), "".into())],
            ..FrontOpts::default()
        },
    );

    for f in [&a, &b] {
        let s = f
            .link
            .wait_backend("Closing", T, |s| s >= XenbusState::Closing)
            .unwrap();
        assert!(s >= XenbusState::Closing);
    }
    assert!(r
        .read_backend(0, "error")
        .unwrap()
        .contains("event-channel"));
    assert!(r.read_backend(1, "error").unwrap().contains("ring-ref1"));
    let _ = BlkConfig::default();
}

#[test]
fn test_xsa39_req_prod_impossible_at_attach_fails_connect() {
    let r = rig(&[(0, "w")]);

    let f = TestFront::publish(
        &r.guest,
        0,
        FrontOpts {
            initial_req_prod: 1000,
            ..FrontOpts::default()
        },
    );
    let s = f
        .link
        .wait_backend("Closing", T, |s| s >= XenbusState::Closing)
        .unwrap();

    assert!(s >= XenbusState::Closing);
    assert!(r.read_backend(0, "error").unwrap().contains("1000"));
    assert!(
        !mapped(&r.guest, f.queues[0].refs[0]),
        "ring unmapped again"
    );
    assert!(
        f.queues[0].port.remote().is_none(),
        "no event channel bound"
    );
}

/// A frontend that refills its ring as fast as blkback answers it, with requests refused at
/// once (an unknown operation: no slot is held, so the ring never stalls), must not keep the
/// ring thread away from its stop flag: the device still disconnects when the frontend asks,
/// and the guest's other disk goes on meanwhile. (Linux's blkback checks
/// `kthread_should_stop` inside the same loop.)
#[test]
fn test_ring_flood_does_not_block_disconnect_or_other_disk() {
    let r = rig(&[(0, "w"), (1, "w")]);
    let mut bad = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let mut good = TestFront::connect(&r.guest, 1, FrontOpts::default());
    let closer = xensim::front::FrontendLink::open(&r.guest, "vbd", 0).unwrap();
    const MARK: u64 = 0x1111_1111_1111_1111;
    let stop = Arc::new(AtomicBool::new(false));
    let refilled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (st, n) = (stop.clone(), refilled.clone());
    let flood = std::thread::spawn(move || {
        let req = rw(0xff, MARK, 0, &[]);
        let size = bad.queues[0].size;
        for _ in 0..size {
            bad.put(0, &req);
        }
        bad.push(0);
        // Refill each slot as soon as its response overwrites it (the response's operation
        // byte lands on the request id's first byte), keeping exactly one ring outstanding,
        // and publish without notifying: blkback re-reads `req_prod` as it goes.
        let mut next = 0u32;
        let mut max_unpublished = 0u32;
        let end = Instant::now() + Duration::from_secs(30);
        while !st.load(Ordering::Relaxed) && Instant::now() < end {
            let mut refilled = 0;
            while refilled < size {
                let at = bad.slot_addr(0, next) + 8;
                let v = bad.guest.ram().load_u32(at, Ordering::Acquire).unwrap();
                if v == MARK as u32 {
                    break;
                }
                bad.put(0, &req);
                next = next.wrapping_add(1);
                refilled += 1;
            }
            // Responses written but not yet published: blkback publishes at least once per
            // ring's worth of requests it takes, so this stays within about a ring.
            // (`published` may be ahead of the responses seen so far: then nothing waits.)
            let published = bad.rsp_prod(0);
            let waiting = (next.wrapping_sub(published) as i32).max(0) as u32;
            max_unpublished = max_unpublished.max(waiting);
            if refilled == 0 {
                std::hint::spin_loop();
                continue;
            }
            // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: notify only if blkback asked (req_event).
            let q = &bad.queues[0];
            let (new, old) = (q.req_prod_pvt, q.req_prod_pvt.wrapping_sub(refilled));
            let ram = bad.guest.ram();
            ram.store_u32(q.base, new, Ordering::SeqCst).unwrap();
            let event = ram.load_u32(q.base + 4, Ordering::SeqCst).unwrap();
            if new.wrapping_sub(event) < new.wrapping_sub(old) {
                q.port.notify().unwrap();
            }
            n.fetch_add(u64::from(refilled), Ordering::Relaxed);
        }
        (bad, max_unpublished, size)
    });
    wait_for("the flood to be under way", || {
        refilled.load(Ordering::Relaxed) > 2_000
    });

    // The other disk is served during the flood.
    let (_, gr) = good.data_page(0, false);
    let rsp = good.roundtrip(0, &rw(BLKIF_OP_READ, 7, 0, &[(gr, 0, 7)]));
    assert_eq!(rsp.status, BLKIF_RSP_OKAY, "the other disk goes on");
    // The flooded device disconnects when its frontend asks, with the flood still running.
    let t0 = Instant::now();
    closer.switch_state(XenbusState::Closing).unwrap();
    let closed = closer.wait_backend("Closing", Duration::from_secs(10), |s| {
        matches!(s, XenbusState::Closing | XenbusState::Closed)
    });
    let took = t0.elapsed();
    let still_flooding = !flood.is_finished();
    stop.store(true, Ordering::Relaxed);
    let (_bad, max_unpublished, size) = flood.join().unwrap();

    assert!(
        closed.is_ok(),
        "backend did not reach Closing within 10 s: {closed:?}"
    );
    assert!(
        still_flooding,
        "the flood was still running when the backend closed"
    );
    assert!(took < Duration::from_secs(5), "closing took {took:?}");
    assert!(r.stats(0).bad_requests > 2_000);
    assert!(
        max_unpublished <= 2 * size,
        "{max_unpublished} responses written but not published (ring of {size}): the ring thread \
         stayed in its consume loop"
    );
    let rsp = good.roundtrip(0, &rw(BLKIF_OP_READ, 8, 0, &[(gr, 0, 7)]));
    assert_eq!(rsp.status, BLKIF_RSP_OKAY, "the other disk still goes on");
}

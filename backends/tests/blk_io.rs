//! blkback data paths against xensim guests: reads and writes through mapped, persistent and
//! copied grants, indirect requests, both ring layouts, multi-page rings, multi-queue, flush,
//! barrier, discard, resize, metrics.

mod blk_common;

use backends::blk::engine::IoOp;
use backends::blk::{BlkConfig, GrantMode};
use blk_common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use xen::abi::blkif::*;
use xen::PAGE_SIZE;
use xenbus::XenbusState;

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes two pages at sector 16, reads them back into fresh pages, compares.
fn write_read_roundtrip(r: &Rig, f: &mut TestFront, q: usize) {
    let (g1, r1) = f.data_page(0, true);
    let (g2, r2) = f.data_page(0, true);
    f.guest.write_page(g1, 0, &pattern(1)).unwrap();
    f.guest.write_page(g2, 0, &pattern(2)).unwrap();
    let w = f.roundtrip(q, &rw(BLKIF_OP_WRITE, 1, 16, &[(r1, 0, 7), (r2, 0, 7)]));
    assert_eq!(
        w,
        Rsp {
            id: 1,
            op: BLKIF_OP_WRITE,
            status: BLKIF_RSP_OKAY
        }
    );
    assert_eq!(r.disk.read_at(16 * 512, PAGE_SIZE), pattern(1));
    assert_eq!(r.disk.read_at(16 * 512 + PAGE_SIZE, PAGE_SIZE), pattern(2));

    let (g3, r3) = f.data_page(0xee, false);
    let (g4, r4) = f.data_page(0xee, false);
    let rd = f.roundtrip(q, &rw(BLKIF_OP_READ, 2, 16, &[(r3, 0, 7), (r4, 0, 7)]));
    assert_eq!(rd.status, BLKIF_RSP_OKAY);
    assert_eq!(f.page(g3), pattern(1));
    assert_eq!(f.page(g4), pattern(2));
}

#[test]
fn test_blk_write_then_read_round_trips_data() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());

    write_read_roundtrip(&r, &mut f, 0);

    let s = r.stats(0);
    assert_eq!((s.reads, s.writes, s.errors), (1, 1, 0));
    assert_eq!(s.bytes_written, 8192);
    assert_eq!(s.bytes_read, 8192);
    assert_eq!(s.in_flight, 0);
}

/// A write and a read with one reap failure injected through `failures`: both still get
/// their answers, and nothing stays in flight.
fn roundtrip_survives_a_reap_failure(failures: fn(&MemDisk) -> &AtomicU64) {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    failures(&r.disk).store(1, Ordering::SeqCst);

    write_read_roundtrip(&r, &mut f, 0);

    assert_eq!(failures(&r.disk).load(Ordering::SeqCst), 0);
    assert_eq!(r.stats(0).in_flight, 0);
}

#[test]
fn test_blk_completions_handed_over_by_a_failing_reap_are_answered() {
    // The reap that returns the write's completion also reports an error (a lost completion
    // would hang the request and its ring slot).
    roundtrip_survives_a_reap_failure(|d| &d.reap_errors);
}

#[test]
fn test_blk_a_reap_that_fails_before_handing_over_is_retried_without_a_new_signal() {
    // The first reap takes the eventfd's signal and fails with the write's completion still
    // in the engine; nothing signals again, so only a retry gets the guest its answer.
    roundtrip_survives_a_reap_failure(|d| &d.reap_failures_early);
}

/// One writable disk served with `config`, and a connected frontend.
fn disk_with(config: BlkConfig) -> (Rig, TestFront) {
    let r = rig_with(&[(0, "w")], config);
    let f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    (r, f)
}

/// A disk whose ring threads poll for `poll_us` before sleeping, and a connected frontend.
fn polling_rig(poll_us: u32) -> (Rig, TestFront) {
    disk_with(BlkConfig {
        poll_us,
        ..BlkConfig::default()
    })
}

#[test]
fn test_blk_poll_window_takes_requests_published_without_an_event() {
    // A window far longer than the test: the ring thread polls until work comes.
    let (r, mut f) = polling_rig(60_000_000);
    write_read_roundtrip(&r, &mut f, 0);
    let events = r.stats(0).events;

    // No event: only a ring thread that polls `req_prod` can see this request.
    let (g, gr) = f.data_page(0, true);
    f.guest.write_page(g, 0, &pattern(7)).unwrap();
    f.put(0, &rw(BLKIF_OP_WRITE, 3, 64, &[(gr, 0, 7)]));
    f.push_silent(0);
    let rsp = f.responses(0, 1)[0];

    assert_eq!((rsp.id, rsp.status), (3, BLKIF_RSP_OKAY));
    assert_eq!(r.disk.read_at(64 * 512, PAGE_SIZE), pattern(7));
    let s = r.stats(0);
    assert_eq!(s.events, events, "the request came without an event");
    assert!(s.poll_hits >= 1, "{s:?}");
}

#[test]
fn test_blk_poll_window_an_event_for_a_request_polling_took_is_not_spurious() {
    let (r, mut f) = polling_rig(60_000_000);
    write_read_roundtrip(&r, &mut f, 0);
    let (_, gr) = f.data_page(0, true);
    f.put(0, &rw(BLKIF_OP_WRITE, 3, 64, &[(gr, 0, 7)]));
    f.push_silent(0);
    assert_eq!(f.responses(0, 1)[0].status, BLKIF_RSP_OKAY);
    let before = r.stats(0);

    // The request's event comes after polling took and answered the request.
    f.queues[0].port.notify().unwrap();
    wait_for("the late event", || r.stats(0).events > before.events);
    // The ring thread answers a control request at the top of a turn: after the late
    // event's turn has ended, counted or not.
    r.driver.resize(u32::from(r.guest.domid()), 0).unwrap();

    // Not an event with nothing to do (the XSA-332 counter stays for floods).
    assert_eq!(r.stats(0).spurious_events, before.spurious_events);
}

#[test]
fn test_blk_poll_window_ends_and_events_still_wake_the_ring_thread() {
    let (r, mut f) = polling_rig(200);
    write_read_roundtrip(&r, &mut f, 0);

    // With nothing more to do the window runs out and the thread sleeps...
    wait_for("a poll window to run out", || r.stats(0).poll_misses >= 1);
    // ...and the next request's event wakes it.
    write_read_roundtrip(&r, &mut f, 0);
    let s = r.stats(0);
    assert_eq!((s.writes, s.reads, s.errors), (2, 2, 0));
}

#[test]
fn test_blk_poll_window_does_not_spin_on_requests_held_behind_a_barrier() {
    let (r, mut f) = polling_rig(500);
    let (_, gr) = f.data_page(1, true);
    r.disk.hold();
    wait_for("the ring thread to go to sleep", || {
        r.stats(0).poll_misses >= 1
    });
    let before = r.stats(0);
    f.put(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(gr, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE_BARRIER, 2, 8, &[(gr, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE, 3, 16, &[(gr, 0, 7)]));
    f.push(0);
    wait_for("the write before the barrier", || r.disk.held() == 1);

    // Request 3 waits on the ring behind the barrier. The thread does not count it as work
    // (it would go round without ever sleeping): its window runs out and it sleeps.
    wait_for("a poll window to run out behind the barrier", || {
        r.stats(0).poll_misses > before.poll_misses
    });
    let s = r.stats(0);
    // The event and the engine's signal are all the work there was.
    assert!(s.poll_hits <= before.poll_hits + 2, "{before:?} {s:?}");

    r.disk.release();
    let rsps = f.responses(0, 3);
    assert!(rsps.iter().all(|x| x.status == BLKIF_RSP_OKAY));
}

#[test]
fn test_blk_partial_sectors_move_only_those_sectors() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (g, gr) = f.data_page(0, true);
    f.guest.write_page(g, 0, &pattern(9)).unwrap();

    // Sectors 2..=4 of the page go to disk sectors 100..=102.
    let rsp = f.roundtrip(0, &rw(BLKIF_OP_WRITE, 5, 100, &[(gr, 2, 4)]));

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(
        r.disk.read_at(100 * 512, 1536),
        pattern(9)[1024..2560].to_vec()
    );
    assert_eq!(r.disk.read_at(99 * 512, 512), vec![0u8; 512]);
    assert_eq!(r.disk.read_at(103 * 512, 512), vec![0u8; 512]);
}

#[test]
fn test_blk_probe_advertises_features_and_geometry() {
    let r = rig(&[(0, "w")]);
    assert!(r
        .watcher
        .as_ref()
        .unwrap()
        .wait_until(T, |d| d.iter().any(|i| i.state == XenbusState::InitWait)));

    let k = |key: &str| r.read_backend(0, key);

    assert_eq!(k("feature-flush-cache").as_deref(), Some("1"));
    assert_eq!(k("feature-barrier").as_deref(), Some("1"));
    assert_eq!(k("feature-discard").as_deref(), Some("1"));
    assert_eq!(k("discard-granularity").as_deref(), Some("4096"));
    assert_eq!(k("discard-secure").as_deref(), Some("0"));
    assert_eq!(k("feature-persistent").as_deref(), Some("1"));
    assert_eq!(k("feature-max-indirect-segments").as_deref(), Some("256"));
    assert_eq!(k("max-ring-page-order").as_deref(), Some("4"));
    assert!(k("multi-queue-max-queues").unwrap().parse::<u32>().unwrap() >= 1);
    assert_eq!(k("sectors"), Some((DISK_BYTES / 512).to_string()));
    assert_eq!(k("sector-size").as_deref(), Some("512"));
    assert_eq!(k("physical-sector-size").as_deref(), Some("4096"));
    assert_eq!(k("info").as_deref(), Some("0"));
    assert_eq!(k("hotplug-status").as_deref(), Some("connected"));
}

#[test]
fn test_blk_read_only_mode_sets_info_and_hides_discard() {
    let r = rig(&[(0, "r")]);
    let _f = TestFront::connect(&r.guest, 0, FrontOpts::default());

    assert_eq!(r.read_backend(0, "info"), Some(VDISK_READONLY.to_string()));
    assert_eq!(r.read_backend(0, "feature-discard").as_deref(), Some("0"));
}

#[test]
fn test_blk_cdrom_device_type_sets_cdrom_removable_readonly() {
    let disk = MemDisk::new(DISK_BYTES);
    let r = rig_with_factory(&[], BlkConfig::default(), disk.clone(), mem_factory(disk));
    let mut spec = vbd_spec(r.guest.domid(), 3, "r");
    spec.backend[2].1 = "cdrom".into();
    r.toolstack.add_device(&spec).unwrap();
    let _f = TestFront::connect(&r.guest, 3, FrontOpts::default());

    let info: u32 = r.read_backend(3, "info").unwrap().parse().unwrap();

    assert_eq!(info, VDISK_READONLY | VDISK_CDROM | VDISK_REMOVABLE);
}

#[test]
fn test_blk_persistent_grants_hit_after_first_use_and_unmap_at_close() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let (g, gr) = f.data_page(0, false);
    f.guest.write_page(g, 0, &pattern(3)).unwrap();

    for id in 0..5 {
        let rsp = f.roundtrip(0, &rw(BLKIF_OP_WRITE, id, 8 * id, &[(gr, 0, 7)]));
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    }
    let s = r.stats(0);
    let still_mapped = mapped(&r.guest, gr);
    f.close();

    assert_eq!(s.persistent_misses, 1);
    assert_eq!(s.persistent_hits, 4);
    assert!(
        still_mapped,
        "a persistent grant stays mapped between requests"
    );
    assert!(
        !mapped(&r.guest, gr),
        "persistent grants are unmapped at disconnect"
    );
    assert_eq!(r.disk.read_at(32 * 512, PAGE_SIZE), pattern(3));
}

#[test]
fn test_blk_persistent_cache_is_bounded_lru() {
    let cfg = BlkConfig {
        max_persistent_grants: 4,
        ..BlkConfig::default()
    };
    let r = rig_with(&[(0, "w")], cfg);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let pages: Vec<_> = (0..10).map(|_| f.data_page(1, false)).collect();

    for (i, (_, gr)) in pages.iter().enumerate() {
        let rsp = f.roundtrip(0, &rw(BLKIF_OP_WRITE, i as u64, 0, &[(*gr, 0, 7)]));
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    }
    let still: usize = pages.iter().filter(|(_, g)| mapped(&r.guest, *g)).count();

    assert_eq!(still, 4);
    assert_eq!(r.stats(0).persistent_evictions, 6);
    assert!(
        mapped(&r.guest, pages[9].1),
        "the most recent page is cached"
    );
    assert!(!mapped(&r.guest, pages[0].1), "the oldest page was evicted");
}

#[test]
fn test_blk_persistent_cache_holds_a_full_ring_of_largest_requests_by_default() {
    // A one-page ring (32 slots) of 256-segment indirect requests keeps 32 × 257 pages
    // granted. Linux's 1056-page bound would evict on nearly every large request; domio's
    // default keeps them all, so reusing 1100 pages evicts nothing.
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let pages: Vec<_> = (0..1100).map(|_| f.data_page(1, false)).collect();
    for round in 0..2u64 {
        for (i, (_, gr)) in pages.iter().enumerate() {
            let rsp = f.roundtrip(
                0,
                &rw(BLKIF_OP_READ, round * 2000 + i as u64, 0, &[(*gr, 0, 7)]),
            );
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
        }
    }
    let s = r.stats(0);
    assert_eq!(s.persistent_evictions, 0);
    assert_eq!(s.persistent_misses, 1100);
    assert_eq!(s.persistent_hits, 1100);
}

/// Pushes 8 reads at once (scattered, or each continuing the previous one) and returns the
/// most requests one engine kick carried.
fn largest_kick_for_a_burst_of_8(submit_batch: u32, sequential: bool) -> u64 {
    let cfg = BlkConfig {
        submit_batch,
        ..BlkConfig::default()
    };
    let r = rig_with(&[(0, "w")], cfg);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let pages: Vec<_> = (0..8).map(|_| f.data_page(0, false)).collect();
    for (i, (_, gr)) in pages.iter().enumerate() {
        let sector = if sequential { 8 * i } else { 1000 - 64 * i } as u64;
        f.put(0, &rw(BLKIF_OP_READ, i as u64, sector, &[(*gr, 0, 7)]));
    }
    f.push(0);
    let rsps = f.responses(0, 8);
    assert!(rsps.iter().all(|r| r.status == BLKIF_RSP_OKAY));
    r.disk
        .max_kick_batch
        .load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn test_blk_submits_a_burst_to_the_engine_in_batches_of_submit_batch() {
    assert_eq!(largest_kick_for_a_burst_of_8(2, false), 2);
    assert_eq!(largest_kick_for_a_burst_of_8(1, false), 1);
    assert_eq!(
        largest_kick_for_a_burst_of_8(64, false),
        8,
        "one kick per burst"
    );
    // A sequential stream is held for the block layer to merge: the first request goes at
    // once, the 7 that continue it together.
    assert_eq!(largest_kick_for_a_burst_of_8(1, true), 7);
}

#[test]
fn test_blk_non_persistent_grants_unmapped_before_response() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(0, false);

    let rsp = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, 0, &[(gr, 0, 7)]));

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert!(
        !mapped(&r.guest, gr),
        "mapped after its response (XSA-396 class)"
    );
}

/// One writable disk served in grant-copy mode, and a connected frontend.
fn copy_mode_disk() -> (Rig, TestFront) {
    disk_with(BlkConfig {
        grant_mode: GrantMode::Copy,
        ..BlkConfig::default()
    })
}

#[test]
fn test_blk_grant_copy_mode_round_trips_without_mapping_data() {
    let (r, mut f) = copy_mode_disk();

    write_read_roundtrip(&r, &mut f, 0);

    let s = r.stats(0);
    assert!(s.grant_copies >= 2);
    assert_eq!(s.grant_maps, 1, "only the ring page is mapped");
}

#[test]
fn test_blk_grant_copy_mode_sends_the_reads_of_one_reap_in_one_copy() {
    // Three reads finish together; the middle one's page is not granted to dom0. The other
    // two arrive in one grant copy, the bad one alone fails.
    let (r, mut f) = copy_mode_disk();
    r.disk.write_at(0, &pattern(1));
    r.disk.write_at(2 * PAGE_SIZE, &pattern(3));
    let (g1, r1) = f.data_page(0xee, false);
    let (g3, r3) = f.data_page(0xee, false);
    let before = r.stats(0);
    r.disk.hold();
    f.put(0, &rw(BLKIF_OP_READ, 1, 0, &[(r1, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_READ, 2, 8, &[(0x7fff, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_READ, 3, 16, &[(r3, 0, 7)]));
    f.push(0);
    wait_for("the three reads held", || r.disk.held() == 3);
    r.disk.release();
    let mut rsps = f.responses(0, 3);
    rsps.sort_by_key(|x| x.id);

    let st: Vec<i16> = rsps.iter().map(|x| x.status).collect();
    assert_eq!(st, vec![BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY]);
    assert_eq!(f.page(g1), pattern(1));
    assert_eq!(f.page(g3), pattern(3));
    let s = r.stats(0);
    assert_eq!(s.grant_copies - before.grant_copies, 1, "{s:?}");
    assert_eq!(s.grant_errors - before.grant_errors, 1, "{s:?}");
}

#[test]
fn test_blk_grant_copy_mode_copies_in_the_writes_of_one_pass_in_one_copy() {
    // Three writes published together, the middle one's page not granted to dom0: their
    // data comes in by one grant copy, the good two reach the disk, the bad one alone fails.
    let (r, mut f) = copy_mode_disk();
    let (g1, r1) = f.data_page(0, true);
    let (g3, r3) = f.data_page(0, true);
    f.guest.write_page(g1, 0, &pattern(1)).unwrap();
    f.guest.write_page(g3, 0, &pattern(3)).unwrap();
    let before = r.stats(0);
    f.put(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(r1, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE, 2, 8, &[(0x7fff, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE, 3, 16, &[(r3, 0, 7)]));
    f.push(0);
    let mut rsps = f.responses(0, 3);
    rsps.sort_by_key(|x| x.id);

    let st: Vec<i16> = rsps.iter().map(|x| x.status).collect();
    assert_eq!(st, vec![BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY]);
    assert_eq!(r.disk.read_at(0, PAGE_SIZE), pattern(1));
    assert_eq!(r.disk.read_at(8 * 512, PAGE_SIZE), vec![0u8; PAGE_SIZE]);
    assert_eq!(r.disk.read_at(16 * 512, PAGE_SIZE), pattern(3));
    let s = r.stats(0);
    assert_eq!(s.grant_copies - before.grant_copies, 1, "{s:?}");
    assert_eq!(s.writes - before.writes, 2, "{s:?}");
}

fn indirect_request(
    f: &TestFront,
    op: u8,
    id: u64,
    sector: u64,
    segs: &[(u32, u8, u8)],
) -> (BlkifRequestIndirect, u32) {
    let (ig, ir) = f.data_page(0, true);
    let mut bytes = Vec::new();
    for (g, a, b) in segs {
        bytes.extend_from_slice(&g.to_le_bytes());
        bytes.extend_from_slice(&[*a, *b, 0, 0]);
    }
    f.guest.write_page(ig, 0, &bytes).unwrap();
    let mut grefs = [0u32; 8];
    grefs[0] = ir;
    (
        BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: op,
            nr_segments: segs.len() as u16,
            id,
            sector_number: sector,
            indirect_grefs: grefs,
            ..Default::default()
        },
        ir,
    )
}

#[test]
fn test_blk_indirect_write_of_64_segments_round_trips() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let pages: Vec<_> = (0..64).map(|i| f.data_page(i as u8, true)).collect();
    let segs: Vec<_> = pages.iter().map(|(_, g)| (*g, 0u8, 7u8)).collect();

    let (req, ir) = indirect_request(&f, BLKIF_OP_WRITE, 42, 0, &segs);
    let at = f.slot_addr(0, f.queues[0].req_prod_pvt);
    f.guest.ram().write_obj(at, &req).unwrap();
    f.queues[0].req_prod_pvt += 1;
    f.push(0);
    let rsp = f.responses(0, 1)[0];

    assert_eq!(
        rsp,
        Rsp {
            id: 42,
            op: BLKIF_OP_WRITE,
            status: BLKIF_RSP_OKAY
        }
    );
    for i in [0usize, 17, 63] {
        assert_eq!(r.disk.read_at(i * PAGE_SIZE, 4), vec![i as u8; 4]);
    }
    assert!(!mapped(&r.guest, ir));
    assert_eq!(r.stats(0).indirect, 1);
}

#[test]
fn test_blk_x86_32_protocol_round_trips_with_12_byte_responses() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            protocol: Some(XEN_IO_PROTO_ABI_X86_32),
            ..FrontOpts::default()
        },
    );

    write_read_roundtrip(&r, &mut f, 0);
    let bad = f.roundtrip(0, &rw(77, 0xdead_beef_0000_0001, 0, &[]));

    assert_eq!(
        bad,
        Rsp {
            id: 0xdead_beef_0000_0001,
            op: 77,
            status: BLKIF_RSP_EOPNOTSUPP
        }
    );
}

#[test]
fn test_blk_x86_64_protocol_and_order_2_ring_fill_whole_ring() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            protocol: Some(XEN_IO_PROTO_ABI_X86_64),
            order: Some(2),
            ..FrontOpts::default()
        },
    );
    let size = f.queues[0].size;
    let (_, gr) = f.data_page(5, false);
    assert_eq!(size, 128);

    for i in 0..size {
        f.put(0, &rw(BLKIF_OP_READ, u64::from(i), 0, &[(gr, 0, 0)]));
    }
    f.push(0);
    let rsps = f.responses(0, size as usize);

    assert!(rsps.iter().all(|r| r.status == BLKIF_RSP_OKAY));
    let mut ids: Vec<u64> = rsps.iter().map(|r| r.id).collect();
    ids.sort();
    assert_eq!(ids, (0..u64::from(size)).collect::<Vec<_>>());
}

#[test]
fn test_blk_multi_queue_each_queue_serves_its_ring() {
    let cfg = BlkConfig {
        max_queues: 3,
        ..BlkConfig::default()
    };
    let r = rig_with(&[(0, "w")], cfg);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            queues: 3,
            order: Some(1),
            ..FrontOpts::default()
        },
    );

    for q in 0..3 {
        let (g, gr) = f.data_page(0, true);
        f.guest.write_page(g, 0, &[q as u8 + 1; 512]).unwrap();
        let rsp = f.roundtrip(q, &rw(BLKIF_OP_WRITE, q as u64, q as u64, &[(gr, 0, 0)]));
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    }

    for q in 0..3usize {
        assert_eq!(r.disk.read_at(q * 512, 512), vec![q as u8 + 1; 512]);
    }
}

#[test]
fn test_blk_flush_with_and_without_data_reach_engine_durably() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(7, true);

    let a = f.roundtrip(0, &rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, &[]));
    let b = f.roundtrip(0, &rw(BLKIF_OP_FLUSH_DISKCACHE, 2, 8, &[(gr, 0, 7)]));

    assert_eq!((a.status, b.status), (BLKIF_RSP_OKAY, BLKIF_RSP_OKAY));
    let ops = r.disk.ops();
    assert_eq!(ops[0].op, IoOp::Flush);
    assert_eq!(
        (ops[1].op, ops[1].fua, ops[1].offset),
        (IoOp::Write, true, 8 * 512)
    );
    assert_eq!(r.disk.read_at(8 * 512, 4), vec![7; 4]);
}

#[test]
fn test_blk_barrier_waits_for_earlier_requests_then_runs_alone() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(1, true);
    r.disk.hold();

    f.put(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(gr, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE, 2, 8, &[(gr, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE_BARRIER, 3, 16, &[(gr, 0, 7)]));
    f.put(0, &rw(BLKIF_OP_WRITE, 4, 24, &[(gr, 0, 7)]));
    f.push(0);
    wait_for("the two writes before the barrier", || r.disk.held() == 2);
    let held_before = r.disk.held();
    r.disk.release();
    let rsps = f.responses(0, 4);

    assert_eq!(
        held_before, 2,
        "the barrier must not start while earlier writes run"
    );
    assert!(rsps.iter().all(|x| x.status == BLKIF_RSP_OKAY));
    let ops = r.disk.ops();
    let order: Vec<u64> = ops.iter().map(|o| o.offset / 512).collect();
    assert_eq!(order[2], 16, "barrier after the earlier writes: {order:?}");
    assert!(ops[2].fua);
    assert_eq!(order[3], 24, "later write after the barrier: {order:?}");
    assert_eq!(r.stats(0).barriers, 1);
}

#[test]
fn test_blk_discard_in_range_reaches_engine() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    r.disk.write_at(4096, &[9; 4096]);
    let d = BlkifRequestDiscard {
        operation: BLKIF_OP_DISCARD,
        flag: 0,
        id: 11,
        sector_number: 8,
        nr_sectors: 8,
        ..Default::default()
    };

    let at = f.slot_addr(0, f.queues[0].req_prod_pvt);
    f.guest.ram().write_obj(at, &d).unwrap();
    f.queues[0].req_prod_pvt += 1;
    f.push(0);
    let rsp = f.responses(0, 1)[0];

    assert_eq!(
        rsp,
        Rsp {
            id: 11,
            op: BLKIF_OP_DISCARD,
            status: BLKIF_RSP_OKAY
        }
    );
    assert_eq!(r.disk.read_at(4096, 4096), vec![0; 4096]);
    assert_eq!(r.stats(0).discards, 1);
}

#[test]
fn test_blk_resize_updates_sectors_and_rewrites_connected_state() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(0, false);
    let beyond = DISK_BYTES / 512;
    let before = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, beyond, &[(gr, 0, 7)]));
    let w = f
        .link
        .xs()
        .watch(&format!("{}/state", f.link.backend()), "resize")
        .unwrap();
    let _ = w.recv_timeout(T); // the initial event of a new watch
    r.disk.set_capacity(DISK_BYTES * 2);

    let sectors = r.driver.resize(u32::from(r.guest.domid()), 0).unwrap();
    let state_event = w.recv_timeout(T);
    let after = f.roundtrip(0, &rw(BLKIF_OP_READ, 2, beyond, &[(gr, 0, 7)]));

    assert_eq!(before.status, BLKIF_RSP_ERROR);
    assert_eq!(sectors, DISK_BYTES * 2 / 512);
    assert_eq!(r.read_backend(0, "sectors"), Some(sectors.to_string()));
    assert!(state_event.is_ok(), "the backend state is written again");
    assert_eq!(r.read_backend(0, "state").as_deref(), Some("4"));
    assert_eq!(after.status, BLKIF_RSP_OKAY);
    assert_eq!(r.stats(0).resizes, 1);
}

#[test]
fn test_blk_null_engine_from_default_factory_serves_io() {
    let disk = MemDisk::new(0);
    let r = rig_with_factory(
        &[],
        BlkConfig::default(),
        disk,
        backends::blk::default_engine_factory(),
    );
    let mut spec = vbd_spec(r.guest.domid(), 0, "w");
    spec.backend[0].1 = "null:64M".into();
    r.toolstack.add_device(&spec).unwrap();
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(0, false);

    let rsp = f.roundtrip(0, &rw(BLKIF_OP_READ, 1, 0, &[(gr, 0, 7)]));

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(
        r.read_backend(0, "sectors"),
        Some((64u64 << 11).to_string())
    );
}

/// A rig whose single device is served by the real engines from `params`.
fn real_engine_rig(params: &str) -> Rig {
    let r = rig_with_factory(
        &[],
        BlkConfig::default(),
        MemDisk::new(0),
        backends::blk::default_engine_factory(),
    );
    let mut spec = vbd_spec(r.guest.domid(), 0, "w");
    spec.backend[0].1 = params.into();
    r.toolstack.add_device(&spec).unwrap();
    r
}

/// Writes 3 pages and reads them back through the frontend.
fn guest_roundtrip(f: &mut TestFront) {
    let pages: Vec<_> = (0..3).map(|_| f.data_page(0, true)).collect();
    for (i, (g, _)) in pages.iter().enumerate() {
        f.guest.write_page(*g, 0, &pattern(i as u8 + 40)).unwrap();
    }
    let segs: Vec<_> = pages.iter().map(|(_, r)| (*r, 0u8, 7u8)).collect();
    let w = f.roundtrip(0, &rw(BLKIF_OP_WRITE, 1, 64, &segs));
    let fl = f.roundtrip(0, &rw(BLKIF_OP_FLUSH_DISKCACHE, 2, 0, &[]));
    let back: Vec<_> = (0..3).map(|_| f.data_page(0, false)).collect();
    let segs: Vec<_> = back.iter().map(|(_, r)| (*r, 0u8, 7u8)).collect();
    let rd = f.roundtrip(0, &rw(BLKIF_OP_READ, 3, 64, &segs));

    assert_eq!((w.status, fl.status, rd.status), (0, 0, 0));
    for (i, (g, _)) in back.iter().enumerate() {
        assert_eq!(f.page(*g), pattern(i as u8 + 40), "page {i}");
    }
}

#[test]
fn test_blk_raw_engine_image_round_trips_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let r = real_engine_rig(&format!("aio:{}", img.display()));
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());

    guest_roundtrip(&mut f);
    f.close();

    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[64 * 512..64 * 512 + PAGE_SIZE], &pattern(40)[..]);
    assert_eq!(r.read_backend(0, "sectors").as_deref(), Some("2048"));
}

#[test]
fn test_blk_qcow2_engine_image_round_trips_and_checks_clean() {
    let Ok(qemu_img) = which_qemu_img() else {
        eprintln!("qemu-img not installed; skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let ok = std::process::Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("4M")
        .status()
        .unwrap();
    assert!(ok.success());
    let r = real_engine_rig(&format!("qcow2:{}", img.display()));
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());

    guest_roundtrip(&mut f);
    f.close();
    let check = std::process::Command::new(&qemu_img)
        .args(["check", "-q"])
        .arg(&img)
        .status()
        .unwrap();

    assert!(check.success(), "qemu-img check found problems");
    assert_eq!(
        r.read_backend(0, "multi-queue-max-queues").as_deref(),
        Some("1"),
        "qcow2 engines are never opened twice"
    );
}

fn which_qemu_img() -> Result<std::path::PathBuf, ()> {
    for d in ["/usr/bin", "/usr/local/bin"] {
        let p = std::path::Path::new(d).join("qemu-img");
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}

#[test]
fn test_blk_persistent_frontend_write_from_read_only_grant_falls_back_to_one_shot_map() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let (_, ro) = f.data_page(0x42, true);

    let rsp = f.roundtrip(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(ro, 0, 7)]));

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(r.disk.read_at(0, 4), vec![0x42; 4]);
    assert!(!mapped(&r.guest, ro), "a one-shot map is undone at once");
}

#[test]
fn test_blk_config_above_protocol_limits_is_clamped_when_advertised() {
    let cfg = BlkConfig {
        max_ring_page_order: 9,
        max_indirect_segments: 4096,
        ..BlkConfig::default()
    };
    let r = rig_with(&[(0, "w")], cfg);
    assert!(r
        .watcher
        .as_ref()
        .unwrap()
        .wait_until(T, |d| d.iter().any(|i| i.state == XenbusState::InitWait)));

    assert_eq!(
        r.read_backend(0, "max-ring-page-order").as_deref(),
        Some("4")
    );
    assert_eq!(
        r.read_backend(0, "feature-max-indirect-segments")
            .as_deref(),
        Some("256")
    );
}

/// Protocol cost per request: full rings of 4 KiB reads through the null engine, for each
/// grant mode. Run with `cargo test --release -p backends --test blk_io -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_blk_null_engine_4k_reads_per_grant_mode() {
    for (name, mode, persistent) in [
        ("map", GrantMode::Map, false),
        ("persistent", GrantMode::Map, true),
        ("copy", GrantMode::Copy, false),
    ] {
        let cfg = BlkConfig {
            grant_mode: mode,
            ..BlkConfig::default()
        };
        let disk = MemDisk::new(0);
        let r = rig_with_factory(&[], cfg, disk, backends::blk::default_engine_factory());
        let mut spec = vbd_spec(r.guest.domid(), 0, "w");
        spec.backend[0].1 = "null:1G".into();
        r.toolstack.add_device(&spec).unwrap();
        let mut f = TestFront::connect(
            &r.guest,
            0,
            FrontOpts {
                persistent,
                ..FrontOpts::default()
            },
        );
        let size = f.queues[0].size;
        let pages: Vec<_> = (0..size).map(|_| f.data_page(0, false)).collect();
        let rounds = 2000u32;
        let t0 = std::time::Instant::now();
        for round in 0..rounds {
            for (i, (_, g)) in pages.iter().enumerate() {
                let id = u64::from(round) * 1000 + i as u64;
                f.put(0, &rw(BLKIF_OP_READ, id, i as u64 * 8, &[(*g, 0, 7)]));
            }
            f.push(0);
            let rsps = f.responses(0, size as usize);
            assert!(rsps.iter().all(|x| x.status == BLKIF_RSP_OKAY));
        }
        let n = f64::from(rounds * size);
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{name:>10}: {:.0} requests/s ({:.2} us/request), {:?}",
            n / secs,
            secs * 1e6 / n,
            r.stats(0)
        );
    }
}

#[test]
fn test_blk_x86_32_indirect_and_discard_use_the_packed_layouts() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            protocol: Some(XEN_IO_PROTO_ABI_X86_32),
            ..FrontOpts::default()
        },
    );
    let pages: Vec<_> = (0..20).map(|i| f.data_page(100 + i as u8, true)).collect();
    let (ig, ir) = f.data_page(0, true);
    let mut bytes = Vec::new();
    for (_, g) in &pages {
        bytes.extend_from_slice(&g.to_le_bytes());
        bytes.extend_from_slice(&[0, 7, 0, 0]);
    }
    f.guest.write_page(ig, 0, &bytes).unwrap();
    let mut grefs = [0u32; 8];
    grefs[0] = ir;
    let ind = BlkifX86_32RequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: BLKIF_OP_WRITE,
        nr_segments: 20,
        id: 0x1111_2222_3333_4444,
        sector_number: 8,
        indirect_grefs: grefs,
        ..Default::default()
    };
    let disc = BlkifX86_32RequestDiscard {
        operation: BLKIF_OP_DISCARD,
        flag: 0,
        id: 6,
        sector_number: 8,
        nr_sectors: 8,
        ..Default::default()
    };

    let at = f.slot_addr(0, 0);
    f.guest.ram().write_obj(at, &ind).unwrap();
    let at = f.slot_addr(0, 1);
    f.guest.ram().write_obj(at, &disc).unwrap();
    f.queues[0].req_prod_pvt = 2;
    f.push(0);
    let rsps = f.responses(0, 2);

    assert_eq!(
        rsps[0],
        Rsp {
            id: 0x1111_2222_3333_4444,
            op: BLKIF_OP_WRITE,
            status: BLKIF_RSP_OKAY
        }
    );
    assert_eq!(
        rsps[1],
        Rsp {
            id: 6,
            op: BLKIF_OP_DISCARD,
            status: BLKIF_RSP_OKAY
        }
    );
    assert_eq!(
        r.disk.read_at(8 * 512, 4),
        vec![0; 4],
        "discarded after the write"
    );
    assert_eq!(r.disk.read_at(8 * 512 + 19 * PAGE_SIZE, 4), vec![119; 4]);
}

#[test]
fn test_blk_full_order_4_ring_beyond_engine_queue_depth_completes_every_request() {
    let r = rig_with_factory(
        &[],
        BlkConfig::default(),
        MemDisk::new(0),
        backends::blk::default_engine_factory(),
    );
    let mut spec = vbd_spec(r.guest.domid(), 0, "w");
    spec.backend[0].1 = "null:64M".into();
    r.toolstack.add_device(&spec).unwrap();
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            order: Some(4),
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let size = f.queues[0].size;
    let (_, gr) = f.data_page(0, false);

    for i in 0..size {
        f.put(
            0,
            &rw(BLKIF_OP_READ, u64::from(i), u64::from(i), &[(gr, 0, 0)]),
        );
    }
    f.push(0);
    let rsps = f.responses(0, size as usize);

    assert_eq!(size, 512, "16 pages hold 512 native slots");
    assert!(rsps.iter().all(|x| x.status == BLKIF_RSP_OKAY));
    assert_eq!(r.stats(0).reads, 512);
    assert_eq!(r.stats(0).in_flight, 0);
}

//! blkback's device lifecycle: reconnect, disconnect with I/O in flight, stop (the SIGTERM
//! path), a frontend domain that disappears mid-I/O, neighbours unaffected, qdisk.

mod blk_common;

use std::sync::Arc;

use backends::blk::engine::IoOp;
use backends::blk::{BlkConfig, BlkDriver};
use blk_common::*;
use xen::abi::blkif::*;
use xen::XenHost;
use xenbus::backend::BackendWatcher;
use xenbus::{XenbusState, XsClient, XsOps};
use xensim::client::SimHost;
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;

#[test]
fn test_blk_frontend_restart_reconnects_and_serves_again() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(4, true);
    assert_eq!(
        f.roundtrip(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(gr, 0, 7)]))
            .status,
        BLKIF_RSP_OKAY
    );
    let old_ring = f.queues[0].refs[0];
    f.close();

    f.link.switch_state(XenbusState::Initialising).unwrap();
    f.link
        .wait_backend("InitWait", T, |s| s == XenbusState::InitWait)
        .unwrap();
    let mut f2 = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (g2, r2) = f2.data_page(0, false);
    let rsp = f2.roundtrip(0, &rw(BLKIF_OP_READ, 2, 0, &[(r2, 0, 7)]));

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(f2.page(g2)[..4], [4; 4]);
    assert!(!mapped(&r.guest, old_ring));
    assert_eq!(r.watcher.as_ref().unwrap().devices()[0].probes, 2);
}

#[test]
fn test_blk_disconnect_with_io_in_flight_answers_it_then_flushes_and_unmaps() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(6, true);
    r.disk.hold();
    f.put(0, &rw(BLKIF_OP_WRITE, 77, 8, &[(gr, 0, 7)]));
    f.push(0);
    wait_for("the write to be in flight", || r.disk.held() == 1);

    f.link.switch_state(XenbusState::Closing).unwrap();
    r.disk.release();
    f.link
        .wait_backend("Closing", T, |s| s >= XenbusState::Closing)
        .unwrap();
    let rsp = f.responses(0, 1)[0];

    assert_eq!(
        rsp,
        Rsp {
            id: 77,
            op: BLKIF_OP_WRITE,
            status: BLKIF_RSP_OKAY
        }
    );
    let ops = r.disk.ops();
    assert_eq!(ops.first().map(|o| o.op), Some(IoOp::Write));
    assert_eq!(ops.last().map(|o| o.op), Some(IoOp::Flush), "{ops:?}");
    assert!(!mapped(&r.guest, gr));
    assert!(!mapped(&r.guest, f.queues[0].refs[0]));
    assert_eq!(r.disk.read_at(8 * 512, 4), vec![6; 4]);
}

#[test]
fn test_blk_watcher_stop_flushes_unmaps_and_closes() {
    let mut r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(
        &r.guest,
        0,
        FrontOpts {
            persistent: true,
            ..FrontOpts::default()
        },
    );
    let (_, gr) = f.data_page(2, false);
    f.roundtrip(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(gr, 0, 7)]));

    r.watcher.take().unwrap().stop();

    assert_eq!(r.disk.ops().last().map(|o| o.op), Some(IoOp::Flush));
    assert!(!mapped(&r.guest, gr));
    assert!(!mapped(&r.guest, f.queues[0].refs[0]));
    assert_eq!(r.read_backend(0, "state").as_deref(), Some("6"));
}

#[test]
fn test_blk_frontend_domain_destroyed_mid_io_backend_survives() {
    let r = rig(&[(0, "w")]);
    let mut f = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let (_, gr) = f.data_page(0, false);
    r.disk.hold();
    for i in 0..4 {
        f.put(0, &rw(BLKIF_OP_READ, i, 0, &[(gr, 0, 7)]));
    }
    f.push(0);
    wait_for("the reads to be in flight", || r.disk.held() == 4);
    let domid = r.guest.domid();

    r.host.destroy_domain(domid).unwrap();
    r.disk.release();
    wait_for("in-flight I/O to drain", || r.stats(0).in_flight == 0);
    r.toolstack
        .remove_device_nodes(&vbd_spec(domid, 0, "w"))
        .unwrap();

    assert!(r.watcher.as_ref().unwrap().wait_until(T, |d| d.is_empty()));
    assert!(!r.watcher.as_ref().unwrap().is_finished());
    assert_eq!(r.stats(0).reads, 4);
}

#[test]
fn test_blk_second_disk_of_same_guest_unaffected_by_first_closing_mid_stream() {
    let r = rig(&[(0, "w"), (1, "w")]);
    let mut a = TestFront::connect(&r.guest, 0, FrontOpts::default());
    let mut b = TestFront::connect(&r.guest, 1, FrontOpts::default());
    let (_, ga) = a.data_page(0, false);
    let (_, gb) = b.data_page(0, false);
    for i in 0..8 {
        a.put(0, &rw(BLKIF_OP_READ, i, 0, &[(ga, 0, 7)]));
        a.put(0, &rw(99, i, 0, &[]));
    }
    a.push(0);
    a.link.switch_state(XenbusState::Closing).unwrap();

    let mut ok = 0;
    for i in 0..50 {
        ok += usize::from(
            b.roundtrip(0, &rw(BLKIF_OP_READ, i, 0, &[(gb, 0, 7)]))
                .status
                == BLKIF_RSP_OKAY,
        );
    }
    a.link
        .wait_backend("Closing", T, |s| s >= XenbusState::Closing)
        .unwrap();

    assert_eq!(ok, 50);
    assert!(r.wait_connected(1, true));
    assert!(!mapped(&r.guest, ga));
}

#[test]
fn test_blk_probe_without_params_reports_error_and_closes() {
    let disk = MemDisk::new(DISK_BYTES);
    let r = rig_with_factory(&[], BlkConfig::default(), disk.clone(), mem_factory(disk));
    let mut spec = vbd_spec(r.guest.domid(), 0, "w");
    spec.backend.remove(0);
    r.toolstack.add_device(&spec).unwrap();

    assert!(r
        .watcher
        .as_ref()
        .unwrap()
        .wait_until(T, |d| d.iter().any(|i| i.state == XenbusState::Closed)));
    assert!(r.read_backend(0, "error").unwrap().contains("params"));
}

#[test]
fn test_blk_qdisk_backend_type_serves_vbd_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("q", 1024).unwrap();
    let ts = host.toolstack().unwrap();
    let mut spec = vbd_spec(domid, 51712, "w");
    spec.kind = "qdisk".into();
    spec.frontend_kind = "vbd".into();
    spec.backend[0].1 = "aio:/images/q.img".into();
    ts.add_device(&spec).unwrap();
    let sim: Arc<dyn XenHost> = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let xs = XsClient::new(sim.open_xenstore(&xen::XsTransport::Socket(None)).unwrap()).unwrap();
    let disk = MemDisk::new(DISK_BYTES);
    let driver = BlkDriver::new(
        sim,
        "qdisk",
        BlkConfig::default(),
        mem_factory(disk.clone()),
    );
    let watcher = BackendWatcher::start(xs, driver.clone(), 0, u32::from(domid)).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();

    let mut f = TestFront::connect(&guest, 51712, FrontOpts::default());
    let (_, gr) = f.data_page(0x5a, true);
    let rsp = f.roundtrip(0, &rw(BLKIF_OP_WRITE, 1, 0, &[(gr, 0, 7)]));

    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(disk.read_at(0, 2), vec![0x5a; 2]);
    assert!(ts
        .xs()
        .try_read(&format!(
            "/local/domain/0/backend/qdisk/{domid}/51712/sectors"
        ))
        .unwrap()
        .is_some());
    watcher.stop();
}

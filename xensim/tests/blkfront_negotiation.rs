//! blkfront's XenBus negotiation against a fake backend driven by the test: the keys it
//! writes are exactly those Linux's xen-blkfront writes, for each ring order, queue count and
//! persistent-grant setting, and hostile backend values do not break it.

mod blkfront_common;

use blkfront_common::*;
use xenbus::{XenbusState, XsOps};
use xensim::front::blk::{BlkFront, BlkFrontError, BlkFrontOptions, BlkProtocol};

const TOOLSTACK_KEYS: &[&str] = &[
    "backend",
    "backend-id",
    "device-type",
    "state",
    "virtual-device",
];

fn expected(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = TOOLSTACK_KEYS
        .iter()
        .chain(extra.iter())
        .map(|s| s.to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn test_negotiation_order0_one_queue_writes_linux_keys() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);

    let front = BlkFront::init(&rig.guest, DEVID, opts()).unwrap();

    assert_eq!(
        rig.frontend_keys(),
        expected(&[
            "event-channel",
            "feature-persistent",
            "protocol",
            "ring-ref"
        ])
    );
    let q = &front.queues()[0];
    assert_eq!(rig.read_fe("ring-ref"), Some(q.ring_refs()[0].to_string()));
    assert_eq!(
        rig.read_fe("event-channel"),
        Some(q.port().port().to_string())
    );
    assert_eq!(rig.read_fe("protocol").as_deref(), Some("x86_64-abi"));
    assert_eq!(rig.read_fe("feature-persistent").as_deref(), Some("1"));
    assert_eq!(rig.read_fe("state").as_deref(), Some("3"));
    assert_eq!(front.ring_order(), 0);
    assert_eq!(q.size(), 32);
}

#[test]
fn test_negotiation_order2_two_queues_writes_queue_subtrees() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let o = BlkFrontOptions {
        max_ring_order: 2,
        max_queues: 2,
        ..opts()
    };

    let front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    let mut per_queue = Vec::new();
    for q in 0..2 {
        for i in 0..4 {
            per_queue.push(format!("queue-{q}/ring-ref{i}"));
        }
        per_queue.push(format!("queue-{q}/event-channel"));
    }
    let mut want: Vec<&str> = per_queue.iter().map(String::as_str).collect();
    want.extend([
        "feature-persistent",
        "multi-queue-num-queues",
        "protocol",
        "ring-page-order",
    ]);
    assert_eq!(rig.frontend_keys(), expected(&want));
    assert_eq!(rig.read_fe("ring-page-order").as_deref(), Some("2"));
    assert_eq!(rig.read_fe("multi-queue-num-queues").as_deref(), Some("2"));
    for q in front.queues() {
        let i = q.index();
        for (n, g) in q.ring_refs().iter().enumerate() {
            assert_eq!(
                rig.read_fe(&format!("queue-{i}/ring-ref{n}")),
                Some(g.to_string())
            );
        }
        assert_eq!(
            rig.read_fe(&format!("queue-{i}/event-channel")),
            Some(q.port().port().to_string())
        );
        assert_eq!(q.size(), 128);
    }
}

#[test]
fn test_negotiation_persistent_off_writes_zero() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let o = BlkFrontOptions {
        persistent: false,
        ..opts()
    };

    let _front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!(
        rig.frontend_keys(),
        expected(&[
            "event-channel",
            "feature-persistent",
            "protocol",
            "ring-ref"
        ])
    );
    assert_eq!(rig.read_fe("feature-persistent").as_deref(), Some("0"));
}

#[test]
fn test_negotiation_backend_limits_cap_order_and_queues() {
    let rig = rig();
    rig.backend_initwait(&[
        ("max-ring-page-order", "1"),
        ("multi-queue-max-queues", "1"),
    ]);
    let o = BlkFrontOptions {
        max_ring_order: 4,
        max_queues: 4,
        ..opts()
    };

    let front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!(front.ring_order(), 1);
    assert_eq!(front.num_queues(), 1);
    assert_eq!(
        rig.frontend_keys(),
        expected(&[
            "event-channel",
            "feature-persistent",
            "protocol",
            "ring-page-order",
            "ring-ref0",
            "ring-ref1"
        ])
    );
}

#[test]
fn test_negotiation_no_backend_features_uses_one_page_one_queue() {
    let rig = rig();
    rig.backend_initwait(&[]);
    let o = BlkFrontOptions {
        max_ring_order: 3,
        max_queues: 2,
        ..opts()
    };

    let front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!((front.ring_order(), front.num_queues()), (0, 1));
    assert!(rig.read_fe("ring-ref").is_some());
}

#[test]
fn test_negotiation_hostile_backend_values_fall_back_without_panic() {
    let rig = rig();
    rig.backend_initwait(&[
        ("max-ring-page-order", "99999999999999999999"),
        ("multi-queue-max-queues", "-1"),
    ]);
    let o = BlkFrontOptions {
        max_ring_order: 4,
        max_queues: 8,
        ..opts()
    };

    let front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!((front.ring_order(), front.num_queues()), (0, 1));
}

#[test]
fn test_negotiation_huge_backend_limits_are_capped_by_frontend() {
    let rig = rig();
    rig.backend_initwait(&[
        ("max-ring-page-order", "4000000000"),
        ("multi-queue-max-queues", "4000000000"),
    ]);
    let o = BlkFrontOptions {
        max_ring_order: 9,
        max_queues: 3,
        ..opts()
    };

    let front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!((front.ring_order(), front.num_queues()), (4, 3));
}

#[test]
fn test_negotiation_overrides_and_omit_write_hostile_keys() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let o = BlkFrontOptions {
        overrides: vec![
            ("ring-ref".into(), "99999".into()),
            ("protocol".into(), "x86_32-abi".into()),
        ],
        omit: vec!["event-channel".into()],
        ..opts()
    };

    let _front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!(rig.read_fe("ring-ref").as_deref(), Some("99999"));
    assert_eq!(rig.read_fe("protocol").as_deref(), Some("x86_32-abi"));
    assert_eq!(rig.read_fe("event-channel"), None);
}

#[test]
fn test_connect_reads_disk_and_features_then_goes_connected() {
    let rig = rig();

    let (front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);

    let disk = front.disk().unwrap();
    assert_eq!(disk.sectors, SECTORS);
    assert_eq!(disk.sector_size, 512);
    assert!(!disk.read_only());
    let f = front.features();
    assert!(f.persistent && f.flush_cache && f.barrier && f.discard);
    assert_eq!(f.discard_granularity, 4096);
    assert_eq!(f.max_indirect_segments, 256);
    assert_eq!(front.queues()[0].max_indirect_segments(), 32);
    assert!(front.queues()[0].persistent());
    assert_eq!(rig.read_fe("state").as_deref(), Some("4"));
}

#[test]
fn test_connect_missing_sectors_fails_clearly() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let mut front = BlkFront::init(&rig.guest, DEVID, opts()).unwrap();
    let _be = FakeBackend::connect(
        &rig,
        &[("info", "0"), ("sector-size", "512")],
        Misbehave::None,
    );

    let e = front.wait_connected().unwrap_err();

    assert!(
        matches!(&e, BlkFrontError::BadBackendValue { key, .. } if key == "sectors"),
        "{e}"
    );
    assert_ne!(rig.read_fe("state").as_deref(), Some("4"));
}

#[test]
fn test_connect_garbage_sector_size_fails_without_panic() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let mut front = BlkFront::init(&rig.guest, DEVID, opts()).unwrap();
    let _be = FakeBackend::connect(
        &rig,
        &[("sectors", "8"), ("info", "0"), ("sector-size", "0")],
        Misbehave::None,
    );

    let e = front.wait_connected().unwrap_err();

    assert!(matches!(e, BlkFrontError::BadBackendValue { .. }), "{e}");
}

#[test]
fn test_init_backend_closed_instead_of_initwait_fails() {
    let rig = rig();
    rig.set_be_state(XenbusState::Closed);

    let e = BlkFront::init(&rig.guest, DEVID, opts()).unwrap_err();

    assert!(e.to_string().contains("instead of InitWait"), "{e}");
}

#[test]
fn test_init_after_close_restarts_from_initialising_and_rewrites_keys() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let closer = backend_follows_close(&rig);
    drop(be.disconnect());
    front.close().unwrap();
    closer.join().unwrap();
    let xs = rig.xs.clone();
    let fe_state = rig.fe("state");
    let w = xs.watch(&fe_state, "reinit").unwrap();

    let guest = rig.guest.clone();
    let again = std::thread::spawn(move || BlkFront::init(&guest, DEVID, opts()));
    loop {
        if xs.read(&fe_state).unwrap() == b"1" {
            break;
        }
        w.recv_timeout(TIMEOUT).unwrap();
    }
    rig.set_be_state(XenbusState::InitWait);
    let second = again.join().unwrap().unwrap();

    assert_eq!(rig.read_fe("state").as_deref(), Some("3"));
    assert_eq!(
        rig.read_fe("ring-ref"),
        Some(second.queues()[0].ring_refs()[0].to_string())
    );
}

#[test]
fn test_negotiation_x86_32_protocol_writes_x86_32_abi_and_32bit_ring() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let o = BlkFrontOptions {
        protocol: BlkProtocol::X86_32,
        ..opts()
    };

    let mut front = BlkFront::init(&rig.guest, DEVID, o).unwrap();

    assert_eq!(rig.read_fe("protocol").as_deref(), Some("x86_32-abi"));
    let q = front.queue(0).unwrap();
    assert_eq!(q.protocol(), BlkProtocol::X86_32);
    assert!(q.ring_mut().is_none());
    assert_eq!(q.ring32_mut().unwrap().size(), 32);
}

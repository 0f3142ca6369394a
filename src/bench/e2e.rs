//! End to end: xensim's blkfront (negotiating as Linux's xen-blkfront) against domio's real
//! blkback (`backends::blk::BlkDriver` on a `BackendWatcher`, attached through the simulated
//! host's socket as `domio serve --xen sim:PATH` attaches), on a raw image file.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use xen::abi::blkif::*;
use xen::XenHost;
use xensim::client::SimHost;
use xensim::front::blk::{BlkFront, BlkFrontOptions, BlkOp, BlkProtocol};

use super::blk::{measure, vbd_spec, BlkArgs, SimRig};

const TIMEOUT: Duration = Duration::from_secs(20);
const DEVID: u32 = 51712;

struct Disk {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn disk(bytes: u64) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    Disk { _dir: dir, path }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn file_bytes(d: &Disk, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(&d.path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

/// The guest, its vbd on `params`, and domio's blkback serving it.
fn rig_with_blkback(params: &str) -> (SimRig, super::blk::Backend) {
    let rig = SimRig::start(16384, |d| vbd_spec(d, params, true)).unwrap();
    let sim: Arc<dyn XenHost> = Arc::new(SimHost::connect(rig.socket(), 0).unwrap());
    let be =
        super::blk::Backend::start(sim, rig.domid, backends::blk::BlkConfig::default()).unwrap();
    (rig, be)
}

fn opts(order: u32, queues: u32, persistent: bool) -> BlkFrontOptions {
    BlkFrontOptions {
        max_ring_order: order,
        max_queues: queues,
        persistent,
        timeout: TIMEOUT,
        ..Default::default()
    }
}

#[test]
fn test_blkback_order2_two_queues_persistent_round_trips_and_reaches_the_file() {
    let d = disk(8 << 20);
    let (rig, be) = rig_with_blkback(&format!("aio:{}", d.path.display()));
    let mut front = BlkFront::connect(&rig.guest, DEVID, opts(2, 2, true)).unwrap();

    let backs: Vec<(u64, Vec<u8>, Vec<u8>)> = std::thread::scope(|s| {
        let hs: Vec<_> = front
            .queues_mut()
            .iter_mut()
            .map(|q| {
                s.spawn(move || {
                    let i = u64::from(q.index());
                    let sector = 1024 * (i + 1);
                    let data = pattern(3 * 4096, i as u8);
                    let w = q
                        .run_one(
                            BlkOp::Write {
                                sector,
                                data: &data,
                            },
                            None,
                            TIMEOUT,
                        )
                        .unwrap();
                    assert_eq!(w.status, BLKIF_RSP_OKAY);
                    let mut back = vec![0u8; data.len()];
                    let r = q
                        .run_one(
                            BlkOp::Read {
                                sector,
                                len: data.len(),
                            },
                            Some(&mut back),
                            TIMEOUT,
                        )
                        .unwrap();
                    assert_eq!(r.status, BLKIF_RSP_OKAY);
                    (sector, data, back)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let negotiated = (front.ring_order(), front.num_queues());
    let persistent = front.queues()[0].persistent();
    let closed = front.close();
    be.stop();

    assert_eq!(negotiated, (2, 2));
    assert!(persistent);
    closed.unwrap();
    for (sector, data, back) in backs {
        assert_eq!(back, data);
        assert_eq!(file_bytes(&d, sector * 512, data.len()), data);
    }
}

#[test]
fn test_blkback_non_persistent_indirect_writes_reach_the_file_and_grants_are_released() {
    let d = disk(4 << 20);
    let (rig, be) = rig_with_blkback(&format!("aio:{}", d.path.display()));
    let mut front = BlkFront::connect(&rig.guest, DEVID, opts(0, 1, false)).unwrap();
    let q = front.queue(0).unwrap();
    let data = pattern(32 * 4096, 77);

    let w = q
        .run_one(
            BlkOp::Write {
                sector: 8,
                data: &data,
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    let f = q.run_one(BlkOp::Flush, None, TIMEOUT).unwrap();
    let mut back = vec![0u8; data.len()];
    let r = q
        .run_one(
            BlkOp::Read {
                sector: 8,
                len: data.len(),
            },
            Some(&mut back),
            TIMEOUT,
        )
        .unwrap();
    let indirect = q.max_indirect_segments();
    let persistent = q.persistent();
    let closed = front.close();
    be.stop();

    assert_eq!((w.status, f.status, r.status), (0, 0, 0));
    assert_eq!(indirect, 32);
    assert!(!persistent);
    assert_eq!(back, data);
    assert_eq!(file_bytes(&d, 8 * 512, data.len()), data);
    closed.unwrap();
}

#[test]
fn test_blkback_pipelined_full_ring_of_writes_all_complete() {
    let d = disk(4 << 20);
    let (rig, be) = rig_with_blkback(&format!("aio:{}", d.path.display()));
    let mut front = BlkFront::connect(&rig.guest, DEVID, opts(0, 1, true)).unwrap();
    let q = front.queue(0).unwrap();
    let n = q.size();

    for i in 0..n {
        let data = pattern(4096, i as u8);
        q.submit(BlkOp::Write {
            sector: u64::from(i) * 8,
            data: &data,
        })
        .unwrap();
    }
    q.push().unwrap();
    let mut statuses = Vec::new();
    while statuses.len() < n as usize {
        q.wait(TIMEOUT).unwrap();
        q.reap(|c, _| statuses.push(c.status)).unwrap();
    }
    let closed = front.close();
    be.stop();

    assert!(statuses.iter().all(|s| *s == BLKIF_RSP_OKAY));
    for i in [0u32, n / 2, n - 1] {
        assert_eq!(
            file_bytes(&d, u64::from(i) * 4096, 4096),
            pattern(4096, i as u8)
        );
    }
    closed.unwrap();
}

/// `domio bench blk` arguments for a short raw-engine run on `image`.
fn raw_args(image: &std::path::Path) -> BlkArgs {
    BlkArgs {
        engine: super::blk::EngineKind::Raw,
        image: Some(image.to_path_buf()),
        null_size: 1 << 30,
        bs: 4096,
        qd: 8,
        queues: 1,
        pattern: super::blk::Pattern::Randread,
        duration: 0.3,
        ring_order: 0,
        no_persistent: false,
        blk_grants: crate::serve::BlkGrants::Persistent,
        indirect_segments: 32,
        abi: super::blk::Abi::X86_64,
        blk_poll_us: 0,
        guest_poll_us: 0,
        json: false,
    }
}

#[test]
fn test_bench_measure_raw_randrw_against_blkback_has_no_errors() {
    let d = disk(16 << 20);
    let args = BlkArgs {
        queues: 2,
        pattern: super::blk::Pattern::Randrw,
        abi: super::blk::Abi::X86_32,
        ..raw_args(&d.path)
    };
    args.validate().unwrap();

    let rep = measure(&args).unwrap();

    assert!(rep.requests > 0);
    assert_eq!(rep.errors, 0);
    assert_eq!(rep.queues, 2);
    assert!(rep.cpu_ns_per_req > 0.0);
    assert_eq!((rep.blk_poll_hits, rep.blk_poll_misses), (0, 0));
}

#[test]
fn test_bench_measure_raw_randread_with_backend_and_guest_polling_has_no_errors() {
    let d = disk(16 << 20);
    let args = BlkArgs {
        blk_poll_us: 500,
        guest_poll_us: 500,
        ..raw_args(&d.path)
    };
    args.validate().unwrap();

    let rep = measure(&args).unwrap();

    assert!(rep.requests > 0);
    assert_eq!(rep.errors, 0);
    assert_eq!((rep.blk_poll_us, rep.guest_poll_us), (500, 500));
    // blkback's ring thread polled, and found work in its windows.
    assert!(rep.blk_poll_hits > 0, "{rep:?}");
}

#[test]
fn test_blkback_refuses_ring_order_above_its_advertised_maximum() {
    let d = disk(1 << 20);
    let (rig, be) = rig_with_blkback(&format!("aio:{}", d.path.display()));
    let o = BlkFrontOptions {
        overrides: vec![("ring-page-order".into(), "9".into())],
        timeout: Duration::from_secs(3),
        ..opts(2, 1, true)
    };

    let mut front = BlkFront::init(&rig.guest, DEVID, o).unwrap();
    let r = front.wait_connected();
    let state = front.link().backend_state().unwrap();
    be.stop();

    let why = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(why.contains("instead of Connected"), "{why}");
    assert_eq!(state, xenbus::XenbusState::Closing);
}

#[test]
fn test_blkback_reconnect_after_close_serves_the_same_disk() {
    let d = disk(1 << 20);
    let (rig, be) = rig_with_blkback(&format!("aio:{}", d.path.display()));
    let data = pattern(8192, 42);
    let mut first = BlkFront::connect(&rig.guest, DEVID, opts(0, 1, true)).unwrap();
    first
        .queue(0)
        .unwrap()
        .run_one(
            BlkOp::Write {
                sector: 64,
                data: &data,
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    first.close().unwrap();

    let mut second = BlkFront::connect(&rig.guest, DEVID, opts(1, 1, false)).unwrap();
    let mut back = vec![0u8; data.len()];
    let r = second
        .queue(0)
        .unwrap()
        .run_one(
            BlkOp::Read {
                sector: 64,
                len: data.len(),
            },
            Some(&mut back),
            TIMEOUT,
        )
        .unwrap();
    let order = second.ring_order();
    let closed = second.close();
    be.stop();

    assert_eq!(r.status, BLKIF_RSP_OKAY);
    assert_eq!(back, data);
    assert_eq!(order, 1);
    closed.unwrap();
}

#[test]
fn test_blkback_x86_32_guest_round_trips_rw_indirect_and_discard() {
    let d = disk(4 << 20);
    let (rig, be) = rig_with_blkback(&format!("aio:{}", d.path.display()));
    let o = BlkFrontOptions {
        protocol: BlkProtocol::X86_32,
        ..opts(1, 1, true)
    };
    let mut front = BlkFront::connect(&rig.guest, DEVID, o).unwrap();
    let q = front.queue(0).unwrap();
    let small = pattern(3 * 4096, 1);
    let big = pattern(20 * 4096, 2);

    let w1 = q
        .run_one(
            BlkOp::Write {
                sector: 0,
                data: &small,
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    let w2 = q
        .run_one(
            BlkOp::Write {
                sector: 512,
                data: &big,
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    let mut back = vec![0u8; big.len()];
    let r = q
        .run_one(
            BlkOp::Read {
                sector: 512,
                len: big.len(),
            },
            Some(&mut back),
            TIMEOUT,
        )
        .unwrap();
    let disc = q.run_one(
        BlkOp::Discard {
            sector: 0,
            nr_sectors: 8,
            secure: false,
        },
        None,
        TIMEOUT,
    );
    let closed = front.close();
    be.stop();

    assert_eq!((w1.status, w2.status, r.status), (0, 0, 0));
    assert_eq!(back, big);
    assert_eq!(file_bytes(&d, 0, small.len())[4096..], small[4096..]);
    assert_eq!(file_bytes(&d, 512 * 512, big.len()), big);
    assert_eq!(disc.unwrap().status, BLKIF_RSP_OKAY);
    closed.unwrap();
}

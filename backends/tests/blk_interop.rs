//! blkback against xensim's Linux-like blkfront (negotiation as `talk_to_blkback`, response
//! checks as `blkif_interrupt`, grants revoked at close as Linux does, which fails if the
//! backend still maps a page).

mod blk_common;

use std::time::Duration;

use backends::blk::BlkConfig;
use blk_common::*;
use xen::abi::blkif::*;
use xensim::front::blk::{BlkFront, BlkFrontOptions, BlkOp};

fn add_disk(r: &Rig, devid: u32) {
    let mut spec = vbd_spec(r.guest.domid(), devid, "w");
    spec.frontend
        .push(("virtual-device".into(), devid.to_string()));
    r.toolstack.add_device(&spec).unwrap();
}

fn linux_rig(cfg: BlkConfig) -> Rig {
    let disk = MemDisk::new(DISK_BYTES);
    let r = rig_with_factory(&[], cfg, disk.clone(), mem_factory(disk));
    add_disk(&r, 51712);
    r
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// Writes and reads back sizes from one sector to 128 KiB (indirect), on every queue.
fn exercise(f: &mut BlkFront) {
    let t = Duration::from_secs(10);
    for (qi, q) in f.queues_mut().iter_mut().enumerate() {
        for (i, len) in [512usize, 4096, 12 * 4096, 32 * 4096]
            .into_iter()
            .enumerate()
        {
            let sector = (qi as u64 * 1024) + i as u64 * 256;
            let bytes = data(len, (qi * 10 + i) as u8);
            let w = q
                .run_one(
                    BlkOp::Write {
                        sector,
                        data: &bytes,
                    },
                    None,
                    t,
                )
                .unwrap();
            assert_eq!(w.status, BLKIF_RSP_OKAY, "write {len} on queue {qi}");
            let mut back = vec![0u8; len];
            let rd = q
                .run_one(BlkOp::Read { sector, len }, Some(&mut back), t)
                .unwrap();
            assert_eq!(rd.status, BLKIF_RSP_OKAY, "read {len} on queue {qi}");
            assert!(back == bytes, "data of {len} bytes on queue {qi}");
        }
        let fl = q.run_one(BlkOp::Flush, None, t).unwrap();
        let bar = q
            .run_one(
                BlkOp::WriteBarrier {
                    sector: 4000,
                    data: &data(4096, 1),
                },
                None,
                t,
            )
            .unwrap();
        let dis = q
            .run_one(
                BlkOp::Discard {
                    sector: 6000,
                    nr_sectors: 64,
                    secure: false,
                },
                None,
                t,
            )
            .unwrap();
        assert_eq!((fl.status, bar.status, dis.status), (0, 0, 0));
        assert!(q.broken().is_none(), "{:?}", q.broken());
    }
}

#[test]
fn test_blk_linux_blkfront_persistent_order2_two_queues_round_trips_and_closes_clean() {
    let r = linux_rig(BlkConfig {
        max_queues: 2,
        ..BlkConfig::default()
    });
    let mut f = BlkFront::connect(
        &r.guest,
        51712,
        BlkFrontOptions {
            max_ring_order: 2,
            max_queues: 2,
            persistent: true,
            ..BlkFrontOptions::default()
        },
    )
    .unwrap();

    exercise(&mut f);
    let s = r.stats(51712);
    f.close().unwrap();

    assert_eq!(f.queues().len(), 2);
    assert!(s.persistent_hits > 0);
    assert!(s.indirect > 0);
    assert_eq!(s.errors, 0);
}

#[test]
fn test_blk_linux_blkfront_without_persistent_grants_closes_with_every_grant_revocable() {
    let r = linux_rig(BlkConfig {
        persistent_grants: false,
        ..BlkConfig::default()
    });
    let mut f = BlkFront::connect(
        &r.guest,
        51712,
        BlkFrontOptions {
            persistent: true,
            max_indirect_segments: 256,
            ..BlkFrontOptions::default()
        },
    )
    .unwrap();

    exercise(&mut f);
    let s = r.stats(51712);
    f.close().unwrap();

    assert_eq!(s.persistent_hits + s.persistent_misses, 0);
    assert_eq!(f.features().max_indirect_segments, 256);
    assert_eq!(s.errors, 0);
}

#[test]
fn test_blk_linux_blkfront_reads_disk_geometry() {
    let r = linux_rig(BlkConfig::default());

    let f = BlkFront::connect(&r.guest, 51712, BlkFrontOptions::default()).unwrap();
    let d = f.disk().unwrap();

    assert_eq!(d.sectors, DISK_BYTES / 512);
    assert_eq!((d.sector_size, d.physical_sector_size), (512, 4096));
    assert!(!d.read_only());
    assert!(f.features().flush_cache && f.features().barrier && f.features().discard);
}

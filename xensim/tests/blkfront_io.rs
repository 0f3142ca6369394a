//! blkfront's I/O path against a fake backend: reads and writes through normal and indirect
//! requests, pipelining up to the ring size, persistent-grant reuse, multi-queue, flush and
//! discard, the close handshake revoking every grant, and bad backends breaking a queue
//! instead of the frontend panicking.

mod blkfront_common;

use std::sync::atomic::Ordering;

use blkfront_common::*;
use xen::abi::blkif::*;
use xensim::front::blk::{BlkFrontError, BlkFrontOptions, BlkOp};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn test_write_then_read_order0_non_persistent_returns_same_data() {
    let rig = rig();
    let o = BlkFrontOptions {
        persistent: false,
        ..opts()
    };
    let (mut front, be) = connected(&rig, o, LINUX_CONNECT_KEYS, Misbehave::None);
    let data = pattern(8192, 7);
    let q = front.queue(0).unwrap();

    let w = q
        .run_one(
            BlkOp::Write {
                sector: 16,
                data: &data,
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    let mut back = vec![0u8; 8192];
    let r = q
        .run_one(
            BlkOp::Read {
                sector: 16,
                len: 8192,
            },
            Some(&mut back),
            TIMEOUT,
        )
        .unwrap();

    assert_eq!((w.status, w.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE));
    assert_eq!((r.status, r.operation), (BLKIF_RSP_OKAY, BLKIF_OP_READ));
    assert_eq!(back, data);
    assert_eq!(
        &be.disk.lock().unwrap()[16 * 512..16 * 512 + 8192],
        &data[..]
    );
    assert!(!q.persistent());
    // Non-persistent: every grant was revoked at completion.
    assert_eq!(q.stats().grants, 4);
}

#[test]
fn test_persistent_grants_are_reused_across_requests() {
    let rig = rig();
    let (mut front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();
    let data = pattern(4096, 1);

    for i in 0..20 {
        q.run_one(
            BlkOp::Write {
                sector: i * 8,
                data: &data,
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    }

    assert!(q.persistent());
    assert_eq!(q.stats().grants, 1, "one page granted once and reused");
    assert_eq!(q.pool_pages(), 1);
}

#[test]
fn test_pipelined_full_ring_completes_every_request() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();
    let size = q.size();
    let data = pattern(4096, 3);

    let mut ids = Vec::new();
    for i in 0..size {
        ids.push(
            q.submit(BlkOp::Write {
                sector: u64::from(i) * 8,
                data: &data,
            })
            .unwrap(),
        );
    }
    let full = q.submit(BlkOp::Write {
        sector: 0,
        data: &data,
    });
    q.push().unwrap();
    let mut done = Vec::new();
    while done.len() < size as usize {
        q.wait(TIMEOUT).unwrap();
        q.reap(|c, _| done.push((c.id, c.status))).unwrap();
    }

    assert!(matches!(full, Err(BlkFrontError::QueueFull { .. })));
    done.sort();
    ids.sort();
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), ids);
    assert!(done.iter().all(|d| d.1 == BLKIF_RSP_OKAY));
    assert_eq!(q.in_flight(), 0);
    assert_eq!(be.seen.requests.load(Ordering::Relaxed), u64::from(size));
}

#[test]
fn test_large_request_goes_indirect_and_round_trips() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();
    let data = pattern(32 * 4096, 9);

    q.run_one(
        BlkOp::Write {
            sector: 0,
            data: &data,
        },
        None,
        TIMEOUT,
    )
    .unwrap();
    let mut back = vec![0u8; data.len()];
    q.run_one(
        BlkOp::Read {
            sector: 0,
            len: data.len(),
        },
        Some(&mut back),
        TIMEOUT,
    )
    .unwrap();
    let too_big = q.submit(BlkOp::Read {
        sector: 0,
        len: 33 * 4096,
    });

    assert_eq!(back, data);
    let ops = be.seen.ops.lock().unwrap().clone();
    assert_eq!(ops, vec![(BLKIF_OP_INDIRECT, 32), (BLKIF_OP_INDIRECT, 32)]);
    assert!(matches!(too_big, Err(BlkFrontError::InvalidRequest { .. })));
}

#[test]
fn test_indirect_disabled_rejects_more_than_11_segments() {
    let rig = rig();
    let o = BlkFrontOptions {
        max_indirect_segments: 0,
        ..opts()
    };
    let (mut front, _be) = connected(&rig, o, LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();

    let ok = q.run_one(
        BlkOp::Read {
            sector: 0,
            len: 11 * 4096,
        },
        None,
        TIMEOUT,
    );
    let e = q.submit(BlkOp::Read {
        sector: 0,
        len: 12 * 4096,
    });

    assert_eq!(ok.unwrap().status, BLKIF_RSP_OKAY);
    assert!(matches!(e, Err(BlkFrontError::InvalidRequest { .. })));
}

#[test]
fn test_multi_queue_order2_each_queue_round_trips_from_its_thread() {
    let rig = rig();
    let o = BlkFrontOptions {
        max_ring_order: 2,
        max_queues: 2,
        ..opts()
    };
    let (mut front, _be) = connected(&rig, o, LINUX_CONNECT_KEYS, Misbehave::None);

    let results: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = front
            .queues_mut()
            .iter_mut()
            .map(|q| {
                s.spawn(move || {
                    let i = q.index() as u64;
                    let data = pattern(4096, i as u8);
                    q.run_one(
                        BlkOp::Write {
                            sector: i * 64,
                            data: &data,
                        },
                        None,
                        TIMEOUT,
                    )
                    .unwrap();
                    let mut back = vec![0u8; 4096];
                    q.run_one(
                        BlkOp::Read {
                            sector: i * 64,
                            len: 4096,
                        },
                        Some(&mut back),
                        TIMEOUT,
                    )
                    .unwrap();
                    back
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    assert_eq!(results.len(), 2);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r, &pattern(4096, i as u8));
    }
}

#[test]
fn test_flush_and_discard_complete_when_offered() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();
    q.run_one(
        BlkOp::Write {
            sector: 8,
            data: &[0xaa; 4096],
        },
        None,
        TIMEOUT,
    )
    .unwrap();

    let f = q.run_one(BlkOp::Flush, None, TIMEOUT).unwrap();
    let d = q
        .run_one(
            BlkOp::Discard {
                sector: 8,
                nr_sectors: 8,
                secure: false,
            },
            None,
            TIMEOUT,
        )
        .unwrap();

    assert_eq!(
        (f.operation, f.status),
        (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    );
    assert_eq!((d.operation, d.status), (BLKIF_OP_DISCARD, BLKIF_RSP_OKAY));
    assert!(be.disk.lock().unwrap()[8 * 512..16 * 512]
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn test_flush_and_discard_not_offered_are_refused_locally() {
    let rig = rig();
    let keys = [("sectors", "2048"), ("info", "0"), ("sector-size", "512")];
    let (mut front, _be) = connected(&rig, opts(), &keys, Misbehave::None);
    let q = front.queue(0).unwrap();

    let f = q.submit(BlkOp::Flush);
    let d = q.submit(BlkOp::Discard {
        sector: 0,
        nr_sectors: 8,
        secure: false,
    });
    let b = q.submit(BlkOp::WriteBarrier {
        sector: 0,
        data: &[0; 512],
    });

    assert!(matches!(f, Err(BlkFrontError::Unsupported { .. })));
    assert!(matches!(d, Err(BlkFrontError::Unsupported { .. })));
    assert!(matches!(b, Err(BlkFrontError::Unsupported { .. })));
    assert!(!q.persistent(), "backend did not offer feature-persistent");
}

#[test]
fn test_bad_request_lengths_are_refused() {
    let rig = rig();
    let (mut front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();

    let odd = q.submit(BlkOp::Read {
        sector: 0,
        len: 1000,
    });
    let empty = q.submit(BlkOp::Write {
        sector: 0,
        data: &[],
    });

    assert!(matches!(odd, Err(BlkFrontError::InvalidRequest { .. })));
    assert!(matches!(empty, Err(BlkFrontError::InvalidRequest { .. })));
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn test_close_after_io_revokes_every_grant() {
    let rig = rig();
    let o = BlkFrontOptions {
        max_ring_order: 1,
        max_queues: 2,
        ..opts()
    };
    let (mut front, be) = connected(&rig, o, LINUX_CONNECT_KEYS, Misbehave::None);
    for q in front.queues_mut() {
        q.run_one(
            BlkOp::Write {
                sector: 0,
                data: &pattern(16 * 4096, 2),
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    }
    let closer = backend_follows_close(&rig);
    let kept = be.disconnect();

    let r = front.close();

    closer.join().unwrap();
    r.unwrap();
    assert!(kept.lock().unwrap().is_empty());
}

#[test]
fn test_close_with_backend_still_mapping_reports_still_mapped_until_unmapped() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::KeepMapping);
    front
        .queue(0)
        .unwrap()
        .run_one(
            BlkOp::Write {
                sector: 0,
                data: &[1; 4096],
            },
            None,
            TIMEOUT,
        )
        .unwrap();
    let closer = backend_follows_close(&rig);
    let kept = be.disconnect();

    let r = front.close();
    closer.join().unwrap();
    kept.lock().unwrap().clear();
    let retry = front.release();

    assert!(
        matches!(r, Err(BlkFrontError::StillMapped { ref grefs, .. }) if grefs.len() == 1),
        "{r:?}"
    );
    retry.unwrap();
}

#[test]
fn test_non_persistent_backend_keeping_a_grant_breaks_the_queue() {
    let rig = rig();
    let o = BlkFrontOptions {
        persistent: false,
        ..opts()
    };
    let (mut front, _be) = connected(&rig, o, LINUX_CONNECT_KEYS, Misbehave::KeepMapping);
    let q = front.queue(0).unwrap();

    let r = q.run_one(
        BlkOp::Write {
            sector: 0,
            data: &[1; 4096],
        },
        None,
        TIMEOUT,
    );
    let next = q.submit(BlkOp::Read {
        sector: 0,
        len: 512,
    });

    assert!(matches!(r, Err(BlkFrontError::StillMapped { .. })), "{r:?}");
    assert!(matches!(next, Err(BlkFrontError::Broken { .. })));
    assert!(q.broken().is_some());
}

#[test]
fn test_response_with_unknown_id_breaks_queue_without_panic() {
    let rig = rig();
    let (mut front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::WrongId);
    let q = front.queue(0).unwrap();

    let r = q.run_one(
        BlkOp::Read {
            sector: 0,
            len: 4096,
        },
        None,
        TIMEOUT,
    );

    assert!(matches!(r, Err(BlkFrontError::BadResponse { .. })), "{r:?}");
    assert!(matches!(
        q.submit(BlkOp::Read {
            sector: 0,
            len: 512
        }),
        Err(BlkFrontError::Broken { .. })
    ));
}

#[test]
fn test_push_skips_notify_when_backend_event_index_not_crossed() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let mut front = xensim::front::blk::BlkFront::init(&rig.guest, DEVID, opts()).unwrap();
    let q = front.queue(0).unwrap();
    // The backend asked for an event only at request 5 (req_event = 5).
    q.ring_mem()
        .store_u32(xen::abi::ring::SRING_REQ_EVENT, 5, Ordering::SeqCst)
        .unwrap();

    let mut notified = Vec::new();
    for _ in 0..6 {
        q.ring_mut()
            .unwrap()
            .push_request(&BlkifRequest::default())
            .unwrap();
        notified.push(q.push().unwrap());
    }

    // Pushing request index 4 (new prod 5) crosses req_event 5: that push alone notifies.
    assert_eq!(notified, vec![false, false, false, false, true, false]);
    assert_eq!(q.stats().notifies, 1);
}

#[test]
fn test_raw_req_prod_is_written_verbatim() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let mut front = xensim::front::blk::BlkFront::init(&rig.guest, DEVID, opts()).unwrap();
    let q = front.queue(0).unwrap();

    q.set_req_prod(0xdead_beef).unwrap();

    assert_eq!(
        q.ring_mem()
            .load_u32(xen::abi::ring::SRING_REQ_PROD, Ordering::SeqCst)
            .unwrap(),
        0xdead_beef
    );
}

#[test]
fn test_submit_at_sector_offset_builds_partial_segments_and_round_trips() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();
    let data = pattern(4096 + 1024, 5);

    let id = q
        .submit_at(
            BlkOp::Write {
                sector: 100,
                data: &data,
            },
            3,
        )
        .unwrap();
    q.push().unwrap();
    let mut done = None;
    while done.is_none() {
        q.wait(TIMEOUT).unwrap();
        q.reap(|c, _| done = Some(*c)).unwrap();
    }
    let write_segs = be.seen.last_segs.lock().unwrap().clone();
    let rid = q
        .submit_at(
            BlkOp::Read {
                sector: 100,
                len: data.len(),
            },
            7,
        )
        .unwrap();
    q.push().unwrap();
    let mut back = vec![0u8; data.len()];
    let mut got = None;
    while got.is_none() {
        q.wait(TIMEOUT).unwrap();
        q.reap(|c, d| {
            d.copy_to(&mut back).unwrap();
            got = Some(c.id);
        })
        .unwrap();
    }
    let read_segs = be.seen.last_segs.lock().unwrap().clone();
    let bad = q.submit_at(
        BlkOp::Read {
            sector: 0,
            len: 512,
        },
        8,
    );

    assert_eq!(done.unwrap().id, id);
    assert_eq!(got, Some(rid));
    assert_eq!(write_segs, vec![(3, 7), (0, 4)]);
    assert_eq!(read_segs, vec![(7, 7), (0, 7), (0, 0)]);
    assert_eq!(back, data);
    assert_eq!(
        &be.disk.lock().unwrap()[100 * 512..100 * 512 + data.len()],
        &data[..]
    );
    assert!(matches!(bad, Err(BlkFrontError::InvalidRequest { .. })));
}

#[test]
fn test_secure_discard_refused_unless_backend_offers_it() {
    let rig = rig();
    let (mut front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();

    let r = q.submit(BlkOp::Discard {
        sector: 0,
        nr_sectors: 8,
        secure: true,
    });

    assert!(matches!(r, Err(BlkFrontError::Unsupported { .. })), "{r:?}");
}

#[test]
fn test_refresh_sectors_reads_resized_disk() {
    let rig = rig();
    let (mut front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    rig.write_be("sectors", "4096");

    let n = front.refresh_sectors().unwrap();

    assert_eq!(n, 4096);
    assert_eq!(front.disk().unwrap().sectors, 4096);
}

#[test]
fn test_response_with_wrong_operation_breaks_queue_without_panic() {
    let rig = rig();
    let (mut front, _be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::WrongOp);
    let q = front.queue(0).unwrap();

    let r = q.run_one(
        BlkOp::Read {
            sector: 0,
            len: 4096,
        },
        None,
        TIMEOUT,
    );

    assert!(matches!(r, Err(BlkFrontError::BadResponse { .. })), "{r:?}");
    assert!(q.broken().is_some());
}

#[test]
fn test_backend_rsp_prod_beyond_requests_breaks_queue_without_panic() {
    let rig = rig();
    rig.backend_initwait(LINUX_PROBE_KEYS);
    let mut front = xensim::front::blk::BlkFront::init(&rig.guest, DEVID, opts()).unwrap();
    let q = front.queue(0).unwrap();
    // A rogue backend claims 1000 responses to requests never sent.
    q.ring_mem()
        .store_u32(xen::abi::ring::SRING_RSP_PROD, 1000, Ordering::SeqCst)
        .unwrap();

    let r = q.reap(|_, _| panic!("no response may be delivered"));

    assert!(matches!(r, Err(BlkFrontError::Ring { .. })), "{r:?}");
    assert!(q.broken().is_some());
    assert!(matches!(
        q.submit(BlkOp::Read {
            sector: 0,
            len: 512
        }),
        Err(BlkFrontError::Broken { .. })
    ));
}

#[test]
fn test_write_slot_and_req_prod_publish_a_raw_request_the_backend_reads() {
    let rig = rig();
    let (mut front, be) = connected(&rig, opts(), LINUX_CONNECT_KEYS, Misbehave::None);
    let q = front.queue(0).unwrap();
    let raw = BlkifRequest {
        operation: BLKIF_OP_FLUSH_DISKCACHE,
        id: 4242,
        ..Default::default()
    };

    q.write_slot(0, &raw).unwrap();
    q.set_req_prod(1).unwrap();
    q.notify().unwrap();
    while q.shared_rsp_prod().unwrap() != 1 {
        q.port().wait(TIMEOUT).unwrap();
    }
    let rsp: BlkifResponse = q.read_slot(0).unwrap();

    assert_eq!(rsp.id, 4242);
    assert_eq!(rsp.operation, BLKIF_OP_FLUSH_DISKCACHE);
    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    assert_eq!(be.seen.requests.load(Ordering::Relaxed), 1);
}

/// xorshift64*, for reproducible random workloads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn test_random_pipelined_io_with_offsets_matches_a_model_disk() {
    for (seed, persistent) in [(1u64, true), (2, false)] {
        let rig = rig();
        let o = BlkFrontOptions {
            max_ring_order: 1,
            persistent,
            ..opts()
        };
        let (mut front, be) = connected(&rig, o, LINUX_CONNECT_KEYS, Misbehave::None);
        let q = front.queue(0).unwrap();
        let mut model = vec![0u8; (SECTORS * 512) as usize];
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut expect: std::collections::HashMap<u64, Vec<u8>> = Default::default();
        let mut mismatches = 0;

        for _round in 0..40 {
            // Up to 8 requests in flight; writes never overlap another in-flight request.
            let mut busy: Vec<(u64, u64)> = Vec::new();
            let batch = 1 + rng.below(8);
            for _ in 0..batch {
                let first_sect = rng.below(8) as u8;
                let sectors = 1 + rng.below(32 * 8 - u64::from(first_sect));
                let sector = rng.below(SECTORS - sectors);
                let span = (sector, sector + sectors);
                if busy.iter().any(|b| b.0 < span.1 && span.0 < b.1) {
                    continue;
                }
                busy.push(span);
                let (a, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                if rng.below(2) == 0 {
                    let data = pattern(len, rng.next() as u8);
                    model[a..a + len].copy_from_slice(&data);
                    q.submit_at(
                        BlkOp::Write {
                            sector,
                            data: &data,
                        },
                        first_sect,
                    )
                    .unwrap();
                } else {
                    let id = q
                        .submit_at(BlkOp::Read { sector, len }, first_sect)
                        .unwrap();
                    expect.insert(id, model[a..a + len].to_vec());
                }
            }
            q.push().unwrap();
            while q.in_flight() > 0 {
                q.wait(TIMEOUT).unwrap();
                q.reap(|c, d| {
                    assert_eq!(c.status, BLKIF_RSP_OKAY);
                    if let Some(want) = expect.remove(&c.id) {
                        let mut got = vec![0u8; want.len()];
                        d.copy_to(&mut got).unwrap();
                        mismatches += usize::from(got != want);
                    }
                })
                .unwrap();
            }
        }

        assert_eq!(mismatches, 0, "seed {seed}");
        assert!(expect.is_empty());
        assert_eq!(&be.disk.lock().unwrap()[..], &model[..], "seed {seed}");
    }
}

//! The full round trip: a xensim vCPU issues ioreqs into the server's pages exactly as Xen
//! does, domio's ioreq server (attached through the xensim daemon) answers through a
//! scratch device.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ioreq::IoSpace;
use xensim::hvm::{BufSpace, HvmBus, Posted};

#[test]
fn test_pio_1_2_4_byte_writes_read_back() {
    let r = rig();
    r.guest.pio_write(SCRATCH_PORT, 4, 0x1122_3344).unwrap();
    r.guest.pio_write(SCRATCH_PORT + 4, 2, 0xbeef).unwrap();
    r.guest.pio_write(SCRATCH_PORT + 6, 1, 0x7f).unwrap();
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 4).unwrap(), 0x1122_3344);
    assert_eq!(r.guest.pio_read(SCRATCH_PORT + 1, 2).unwrap(), 0x2233);
    assert_eq!(r.guest.pio_read(SCRATCH_PORT + 4, 2).unwrap(), 0xbeef);
    assert_eq!(r.guest.pio_read(SCRATCH_PORT + 6, 1).unwrap(), 0x7f);
    assert_eq!(
        r.dev.st().ports,
        [0x44, 0x33, 0x22, 0x11, 0xef, 0xbe, 0x7f, 0]
    );
}

#[test]
fn test_mmio_1_2_4_8_byte_accesses_round_trip() {
    let r = rig();
    r.guest
        .mmio_write(MMIO_BASE, 8, 0x0102_0304_0506_0708)
        .unwrap();
    r.guest.mmio_write(MMIO_BASE + 8, 4, 0xdead_beef).unwrap();
    r.guest.mmio_write(MMIO_BASE + 12, 2, 0xcafe).unwrap();
    r.guest.mmio_write(MMIO_BASE + 14, 1, 0x5a).unwrap();
    assert_eq!(
        r.guest.mmio_read(MMIO_BASE, 8).unwrap(),
        0x0102_0304_0506_0708
    );
    assert_eq!(r.guest.mmio_read(MMIO_BASE + 8, 4).unwrap(), 0xdead_beef);
    assert_eq!(r.guest.mmio_read(MMIO_BASE + 12, 2).unwrap(), 0xcafe);
    assert_eq!(r.guest.mmio_read(MMIO_BASE + 14, 1).unwrap(), 0x5a);
    assert_eq!(
        r.guest.mmio_read(MMIO_BASE + 8, 8).unwrap(),
        0x005a_cafe_dead_beef
    );
}

#[test]
fn test_pci_config_through_cf8_cfc_reaches_the_function() {
    let r = rig();
    // Enable bit, bus 0, device 3, function 0, register 0.
    let addr = 0x8000_0000u32 | (3 << 11);
    r.guest.pio_write(0xcf8, 4, addr).unwrap();
    assert_eq!(r.guest.pio_read(0xcfc, 4).unwrap(), 0x0001_5853);
    assert_eq!(r.guest.pio_read(0xcfe, 2).unwrap(), 0x0001);
    r.guest.pio_write(0xcf8, 4, addr | 0x10).unwrap();
    r.guest.pio_write(0xcfc, 4, 0xfebf_0000).unwrap();
    r.guest.pio_write(0xcfd, 1, 0x12).unwrap();
    assert_eq!(r.guest.pio_read(0xcfc, 4).unwrap(), 0xfebf_1200);
    let st = r.dev.st();
    let cfg: Vec<_> = st
        .accesses
        .iter()
        .filter(|(a, _, _)| matches!(a.space, IoSpace::PciConfig(_)))
        .map(|(a, w, _)| (a.addr, a.size, *w))
        .collect();
    assert_eq!(
        cfg,
        vec![
            (0, 4, false),
            (2, 2, false),
            (0x10, 4, true),
            (0x11, 1, true),
            (0x10, 4, false)
        ]
    );
    drop(st);
    // Another device on the bus: nobody claims it, so all ones.
    r.guest
        .pio_write(0xcf8, 4, 0x8000_0000 | (5 << 11))
        .unwrap();
    assert_eq!(r.guest.pio_read(0xcfc, 4).unwrap(), 0xffff_ffff);
}

#[test]
fn test_unclaimed_reads_all_ones_and_writes_dropped() {
    let r = rig();
    assert_eq!(r.guest.pio_read(0x300, 1).unwrap(), 0xff);
    assert_eq!(r.guest.pio_read(0x300, 2).unwrap(), 0xffff);
    assert_eq!(r.guest.pio_read(0x300, 4).unwrap(), 0xffff_ffff);
    assert_eq!(r.guest.mmio_read(0xfd00_0000, 8).unwrap(), u64::MAX);
    r.guest.pio_write(0x300, 4, 1).unwrap();
    r.guest.mmio_write(0xfd00_0000, 4, 1).unwrap();
    // Xen sent none of these to the server.
    assert!(r.dev.st().accesses.is_empty());
    assert_eq!(r.ioreq.stats().sync.load(Ordering::Relaxed), 0);
}

#[test]
fn test_rep_outs_and_ins_through_guest_ram_both_directions() {
    let r = rig();
    let data: Vec<u8> = (0..64u8).collect();
    r.guest.ram_write(0x10_0000, &data).unwrap();
    // rep outsw of 32 words, forwards.
    r.guest
        .rep_outs(FIFO_PORT, 2, 32, 0x10_0000, false)
        .unwrap();
    let want: Vec<u64> = data
        .chunks(2)
        .map(|c| u64::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    assert_eq!(r.dev.st().fifo_out, want);
    // rep outsb with df=1 from the last byte down.
    r.dev.st().fifo_out.clear();
    r.guest.rep_outs(FIFO_PORT, 1, 4, 0x10_0003, true).unwrap();
    assert_eq!(r.dev.st().fifo_out, vec![3, 2, 1, 0]);
    // rep insd of 4 dwords into RAM, forwards, then backwards.
    r.guest.rep_ins(FIFO_PORT, 4, 4, 0x20_0000, false).unwrap();
    let mut got = [0u8; 16];
    r.guest.ram_read(0x20_0000, &mut got).unwrap();
    let words: Vec<u32> = got
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(words, vec![1, 2, 3, 4]);
    r.guest.rep_ins(FIFO_PORT, 4, 3, 0x30_0008, true).unwrap();
    let mut got = [0u8; 12];
    r.guest.ram_read(0x30_0000, &mut got).unwrap();
    let words: Vec<u32> = got
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(words, vec![7, 6, 5]);
}

#[test]
fn test_rep_movs_mmio_moves_memory_both_ways() {
    let r = rig();
    let data: Vec<u8> = (0..32u8).map(|b| b ^ 0xa5).collect();
    r.guest.ram_write(0x40_0000, &data).unwrap();
    r.guest
        .rep_movs_mmio(
            MMIO_BASE + 0x100,
            8,
            4,
            0x40_0000,
            false,
            xen::abi::ioreq::IOREQ_WRITE,
        )
        .unwrap();
    assert_eq!(&r.dev.st().mmio[0x100..0x120], &data[..]);
    r.guest
        .rep_movs_mmio(
            MMIO_BASE + 0x100,
            4,
            8,
            0x50_0000,
            false,
            xen::abi::ioreq::IOREQ_READ,
        )
        .unwrap();
    let mut back = [0u8; 32];
    r.guest.ram_read(0x50_0000, &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);
}

#[test]
fn test_buffered_writes_reach_device_including_8_byte_split() {
    let r = rig();
    // The buffered slot has a 20-bit address: use ports, which always fit.
    assert_eq!(
        r.guest
            .buffered_write(BufSpace::Port, u64::from(FIFO_PORT), 4, 0xabcd)
            .unwrap(),
        Posted::Buffered
    );
    assert_eq!(
        r.guest
            .buffered_write(BufSpace::Port, u64::from(FIFO_PORT), 2, 0x1234)
            .unwrap(),
        Posted::Buffered
    );
    // An MMIO window above 1 MiB cannot be buffered: Xen sends it synchronously.
    assert_eq!(
        r.guest
            .buffered_write(BufSpace::Mmio, MMIO_BASE, 8, 0x1122_3344_5566_7788)
            .unwrap(),
        Posted::Synchronous
    );
    assert_eq!(
        r.guest.mmio_read(MMIO_BASE, 8).unwrap(),
        0x1122_3344_5566_7788
    );
    // TIMEOFFSET goes through every buffered ring as an 8-byte (two-slot) write.
    assert_eq!(r.guest.time_offset(-0x1_2345_6789).unwrap(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        {
            let st = r.dev.st();
            if st.fifo_out.len() == 2 && st.time_offsets.len() == 1 {
                assert_eq!(st.fifo_out, vec![0xabcd, 0x1234]);
                assert_eq!(st.time_offsets, vec![-0x1_2345_6789]);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "buffered writes never arrived"
        );
        std::thread::yield_now();
    }
    assert_eq!(r.ioreq.stats().buffered.load(Ordering::Relaxed), 3);
}

#[test]
fn test_buffered_ring_wraps_many_times_with_8_byte_writes() {
    let r = rig();
    let n = 3000u64;
    for i in 0..n {
        let size = if i.is_multiple_of(3) { 8 } else { 4 };
        // The VGA window below 1 MiB: what Xen buffers.
        let posted = r
            .guest
            .buffered_write(BufSpace::Mmio, VGA_BASE, size, i | (i << 40))
            .unwrap();
        assert_ne!(posted, Posted::Unclaimed);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (r.dev.st().fifo_out.len() as u64) < n {
        assert!(std::time::Instant::now() < deadline, "ring stalled");
        std::thread::yield_now();
    }
    let st = r.dev.st();
    for (i, v) in st.fifo_out.iter().enumerate() {
        let i = i as u64;
        let want = if i.is_multiple_of(3) {
            i | (i << 40)
        } else {
            (i | (i << 40)) & 0xffff_ffff
        };
        assert_eq!(*v, want, "write {i}");
    }
    // Xen's wrap adjustment (both pointers lowered in one cmpxchg) is never seen as a
    // corrupt pair.
    assert_eq!(r.ioreq.stats().bad.load(Ordering::Relaxed), 0);
}

#[test]
fn test_invalidate_empties_mapping_cache_and_tells_the_machine() {
    let r = rig();
    r.guest.ram_write(0x10_0000, &[1, 2, 3, 4]).unwrap();
    r.guest.rep_outs(FIFO_PORT, 1, 4, 0x10_0000, false).unwrap();
    r.guest.mapcache_invalidate().unwrap();
    assert_eq!(r.dev.st().invalidates, 1);
    assert_eq!(r.ioreq.stats().invalidates.load(Ordering::Relaxed), 1);
    // Guest RAM is mapped again on the next transfer.
    r.guest.ram_write(0x10_0000, &[9, 8, 7, 6]).unwrap();
    r.dev.st().fifo_out.clear();
    r.guest.rep_outs(FIFO_PORT, 1, 4, 0x10_0000, false).unwrap();
    assert_eq!(r.dev.st().fifo_out, vec![9, 8, 7, 6]);
}

#[test]
fn test_two_vcpus_issue_concurrently() {
    let r = rig();
    let g1 = r.guest.vcpu(1).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..500u32 {
                r.guest.pio_write(SCRATCH_PORT, 2, i).unwrap();
            }
        });
        s.spawn(|| {
            for i in 0..500u64 {
                g1.mmio_write(MMIO_BASE + 0x800, 8, i).unwrap();
                assert_eq!(g1.mmio_read(MMIO_BASE + 0x800, 8).unwrap(), i);
            }
        });
    });
    assert_eq!(r.ioreq.stats().sync.load(Ordering::Relaxed), 1500);
}

#[test]
fn test_range_unmapped_at_run_time_stops_routing() {
    let r = rig();
    r.guest.pio_write(SCRATCH_PORT, 1, 0x42).unwrap();
    r.ioreq
        .ranges()
        .unmap(xen::IoRange::Port {
            start: 0x100,
            end: 0x107,
        })
        .unwrap();
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 1).unwrap(), 0xff);
    r.ioreq
        .ranges()
        .map(xen::IoRange::Port {
            start: 0x100,
            end: 0x107,
        })
        .unwrap();
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 1).unwrap(), 0x42);
}

#[test]
fn test_dmop_interrupts_reach_the_guest() {
    let r = rig();
    let dm = xen::XenHost::open_devmodel(r.sim.as_ref()).unwrap();
    dm.set_isa_irq_level(r.domid, 4, true).unwrap();
    dm.set_pci_intx_level(r.domid, 0, 0, 3, 0, true).unwrap();
    dm.inject_msi(r.domid, 0xfee0_0000, 0x4041).unwrap();
    // inject_msi is posted to the simulated host: collect until all three have arrived.
    let mut irqs = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while irqs.len() < 3 && std::time::Instant::now() < deadline {
        r.guest.wait_irq(Duration::from_millis(100));
        irqs.extend(r.guest.take_irqs());
    }
    use xensim::hvm::Irq;
    assert_eq!(
        irqs,
        vec![
            Irq::Isa {
                irq: 4,
                level: true
            },
            Irq::PciIntx {
                bus: 0,
                dev: 3,
                intx: 0,
                level: true
            },
            Irq::Msi {
                addr: 0xfee0_0000,
                data: 0x4041
            },
        ]
    );
    assert!(!r.guest.wait_irq(Duration::from_millis(1)));
}

#[test]
fn test_shutdown_destroys_server_and_accesses_become_unclaimed() {
    let mut r = rig();
    r.guest.pio_write(SCRATCH_PORT, 1, 1).unwrap();
    r.ioreq.shutdown();
    assert!(r
        .host
        .hvm_domain(r.domid)
        .unwrap()
        .server(r.ioreq.id())
        .is_none());
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 1).unwrap(), 0xff);
}

#[test]
fn test_without_buffered_ring_posted_writes_go_synchronously() {
    let r = rig_with(|c| c.bufioreq = xen::BufIoreq::Off, 1);
    assert_eq!(
        r.guest
            .buffered_write(BufSpace::Port, u64::from(FIFO_PORT), 4, 7)
            .unwrap(),
        Posted::Synchronous
    );
    assert_eq!(r.dev.st().fifo_out, vec![7]);
    // TIMEOFFSET needs a buffered ring: this server cannot take it.
    assert_eq!(r.guest.time_offset(5).unwrap(), 1);
}

#[test]
fn test_legacy_buffered_ring_delivers_in_order() {
    let r = rig_with(|c| c.bufioreq = xen::BufIoreq::Legacy, 1);
    for i in 0..700u64 {
        assert_eq!(
            r.guest
                .buffered_write(BufSpace::Mmio, VGA_BASE, 8, i << 33)
                .unwrap(),
            Posted::Buffered
        );
        if i % 100 == 99 {
            // A synchronous access after buffered ones sees them done.
            r.guest.pio_read(SCRATCH_PORT, 1).unwrap();
            assert_eq!(r.dev.st().fifo_out.len() as u64, i + 1);
        }
    }
    let st = r.dev.st();
    assert!(st
        .fifo_out
        .iter()
        .enumerate()
        .all(|(i, v)| *v == (i as u64) << 33));
}

#[test]
fn test_two_servers_split_the_guest_and_both_get_invalidate() {
    let r = rig();
    let mut second = ioreq::IoreqServer::create(
        r.sim.as_ref() as &dyn xen::XenHost,
        ioreq::IoreqConfig::new(r.domid, 2, RAM_PAGES * 4096),
    )
    .unwrap();
    assert_ne!(second.id(), r.ioreq.id());
    second
        .ranges()
        .map(xen::IoRange::Port {
            start: 0x3f8,
            end: 0x3ff,
        })
        .unwrap();
    let dev2 = Scratch::new();
    second.run(Box::new(dev2.clone())).unwrap();
    r.guest.pio_write(SCRATCH_PORT, 1, 1).unwrap();
    // 0x3f8 is not one of the scratch device's registers: the second server's device
    // answers all ones through its handler, not Xen's unclaimed path.
    assert_eq!(r.guest.pio_read(0x3f8, 1).unwrap(), 0xff);
    assert_eq!(dev2.st().accesses.len(), 1);
    assert_eq!(r.dev.st().accesses.len(), 1);
    r.guest.mapcache_invalidate().unwrap();
    assert_eq!(r.dev.st().invalidates, 1);
    assert_eq!(dev2.st().invalidates, 1);
}

#[test]
fn test_rep_movs_mmio_with_df_runs_downwards_inside_the_window() {
    let r = rig();
    let data: Vec<u8> = (1..=16u8).collect();
    r.guest.ram_write(0x60_0000, &data).unwrap();
    // movsd with DF=1: from RAM 0x60000c down to 0x600000, into MMIO +0x20c down to +0x200.
    r.guest
        .rep_movs_mmio(
            MMIO_BASE + 0x20c,
            4,
            4,
            0x60_000c,
            true,
            xen::abi::ioreq::IOREQ_WRITE,
        )
        .unwrap();
    assert_eq!(&r.dev.st().mmio[0x200..0x210], &data[..]);
    // At the top of the window: claimed only because Xen checks the range downwards from
    // `addr` (upwards it would run 12 bytes past the window).
    let top = MMIO_BASE + MMIO_LEN - 4;
    r.guest
        .rep_movs_mmio(top, 4, 4, 0x60_000c, true, xen::abi::ioreq::IOREQ_WRITE)
        .unwrap();
    let len = MMIO_LEN as usize;
    assert_eq!(&r.dev.st().mmio[len - 16..], &data[..]);
}

#[test]
fn test_guest_destroyed_under_a_running_server_then_shutdown_is_clean() {
    let mut r = rig();
    r.guest.pio_write(SCRATCH_PORT, 1, 1).unwrap();
    r.host.destroy_domain(r.domid).unwrap();
    assert!(r.host.hvm_domain(r.domid).is_none());
    // The server's DMOPs now fail (no such domain); shutdown logs that and returns.
    r.ioreq.shutdown();
    assert_eq!(r.ioreq.stats().sync.load(Ordering::Relaxed), 1);
}

#[test]
fn test_server_configured_for_fewer_vcpus_than_the_guest_is_refused() {
    let dir = TempDir::new();
    let host = xensim::host::Host::new().unwrap();
    let domid = host.create_hvm_domain("hvm", RAM_PAGES, 3).unwrap();
    let server = xensim::server::Server::start(host.clone(), &dir.0.join("s")).unwrap();
    let sim = xensim::client::SimHost::connect(server.path(), 0).unwrap();
    let cfg = ioreq::IoreqConfig::new(domid, 2, RAM_PAGES * 4096);
    let e = ioreq::IoreqServer::create(&sim as &dyn xen::XenHost, cfg).unwrap_err();
    assert!(matches!(e, ioreq::IoreqError::Config { .. }), "{e}");
    // The failed setup destroyed the server it had created.
    let h = host.hvm_domain(domid).unwrap();
    assert!((0..8).all(|id| h.server(id).is_none()));
}

#[test]
fn test_long_rep_is_split_per_page_as_xen_does() {
    let r = rig();
    // 5000 bytes starting 100 bytes before a page boundary: Xen sends 100, 4096, 804.
    let gpa = 0x10_0000 - 100;
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    r.guest.ram_write(gpa, &data).unwrap();
    let before = r.ioreq.stats().sync.load(Ordering::Relaxed);
    r.guest.rep_outs(FIFO_PORT, 1, 5000, gpa, false).unwrap();
    assert_eq!(r.ioreq.stats().sync.load(Ordering::Relaxed) - before, 3);
    let st = r.dev.st();
    assert_eq!(st.fifo_out.len(), 5000);
    assert!(st
        .fifo_out
        .iter()
        .zip(&data)
        .all(|(a, b)| *a == u64::from(*b)));
}

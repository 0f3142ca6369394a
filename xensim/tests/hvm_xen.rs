//! Xen's half of ioreq in xensim, checked against Xen's rules with a device model written
//! by hand here (so these tests do not depend on domio's ioreq server).

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::abi::dm_op::{XEN_DMOP_IO_RANGE_MEMORY, XEN_DMOP_IO_RANGE_PCI, XEN_DMOP_IO_RANGE_PORT};
use xen::abi::ioreq::*;
use xen::{BufIoreq as BufMode, IoRange, Resource, XenHost};
use xensim::client::SimHost;
use xensim::host::{Bound, Host};
use xensim::hvm::{BufSpace, HvmBus, HvmError, HvmGuest, Posted};
use xensim::server::Server;

fn hvm(vcpus: u32) -> (Arc<Host>, u16) {
    let host = Host::new().unwrap();
    let d = host.create_hvm_domain("hvm", 256, vcpus).unwrap();
    (host, d)
}

fn errno(e: &HvmError) -> i32 {
    e.errno()
}

#[test]
fn test_hvm_domain_refuses_bad_vcpu_counts() {
    let host = Host::new().unwrap();
    assert!(host.create_hvm_domain("a", 16, 0).is_err());
    assert!(host.create_hvm_domain("b", 16, 129).is_err());
    let d = host.create_hvm_domain("c", 16, 128).unwrap();
    assert_eq!(host.hvm_domain(d).unwrap().nr_vcpus(), 128);
    assert!(host.hvm_domain(0).is_none());
}

#[test]
fn test_create_servers_up_to_eight_then_enospc_and_ids_reused() {
    let (host, d) = hvm(1);
    let h = host.hvm_domain(d).unwrap();
    let ids: Vec<u16> = (0..8)
        .map(|_| h.create_server(&host, 0, 2).unwrap())
        .collect();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
    assert_eq!(
        errno(&h.create_server(&host, 0, 2).unwrap_err()),
        libc::ENOSPC
    );
    h.destroy_server(&host, 0, 3).unwrap();
    assert_eq!(h.create_server(&host, 0, 0).unwrap(), 3);
    assert_eq!(
        errno(&h.create_server(&host, 0, 3).unwrap_err()),
        libc::EINVAL
    );
}

#[test]
fn xsa238_map_range_end_before_start_is_einval() {
    let (host, d) = hvm(1);
    let h = host.hvm_domain(d).unwrap();
    let id = h.create_server(&host, 0, 2).unwrap();
    for t in [
        XEN_DMOP_IO_RANGE_PORT,
        XEN_DMOP_IO_RANGE_MEMORY,
        XEN_DMOP_IO_RANGE_PCI,
    ] {
        assert_eq!(
            errno(&h.map_range(0, id, t, 0x20, 0x1f).unwrap_err()),
            libc::EINVAL
        );
        assert_eq!(
            errno(&h.unmap_range(0, id, t, 0x20, 0x1f).unwrap_err()),
            libc::EINVAL
        );
    }
    assert_eq!(
        errno(&h.map_range(0, id, 3, 0, 1).unwrap_err()),
        libc::EINVAL
    );
    assert!(h
        .server(id)
        .unwrap()
        .ranges(XEN_DMOP_IO_RANGE_PORT)
        .is_empty());
}

#[test]
fn test_ranges_follow_xen_rangeset_rules() {
    let (host, d) = hvm(1);
    let h = host.hvm_domain(d).unwrap();
    let id = h.create_server(&host, 0, 2).unwrap();
    let p = XEN_DMOP_IO_RANGE_PORT;
    h.map_range(0, id, p, 0x100, 0x107).unwrap();
    h.map_range(0, id, p, 0x108, 0x10f).unwrap();
    assert_eq!(h.server(id).unwrap().ranges(p), vec![(0x100, 0x10f)]);
    assert_eq!(
        errno(&h.map_range(0, id, p, 0x10f, 0x110).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(
        errno(&h.unmap_range(0, id, p, 0x10f, 0x110).unwrap_err()),
        libc::ENOENT
    );
    h.unmap_range(0, id, p, 0x104, 0x105).unwrap();
    assert_eq!(
        h.server(id).unwrap().ranges(p),
        vec![(0x100, 0x103), (0x106, 0x10f)]
    );
    // Another domain may not touch dom0's server.
    assert_eq!(
        errno(&h.map_range(5, id, p, 0x200, 0x200).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(errno(&h.set_state(5, id, true).unwrap_err()), libc::EPERM);
    assert_eq!(errno(&h.set_state(0, 7, true).unwrap_err()), libc::ENOENT);
    // At most 256 ranges per set.
    let m = XEN_DMOP_IO_RANGE_MEMORY;
    for i in 0..256u64 {
        h.map_range(0, id, m, i * 0x2000, i * 0x2000 + 0xfff)
            .unwrap();
    }
    assert_eq!(
        errno(&h.map_range(0, id, m, 0x100_0000, 0x100_0fff).unwrap_err()),
        libc::ENOMEM
    );
}

#[test]
fn test_interrupt_dmops_checked_as_xen_checks_them() {
    let (host, d) = hvm(1);
    let h = host.hvm_domain(d).unwrap();
    assert_eq!(
        errno(&h.set_isa_irq_level(16, 1).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(errno(&h.set_isa_irq_level(4, 2).unwrap_err()), libc::EINVAL);
    assert_eq!(
        errno(&h.set_pci_intx_level(0, 1, 3, 0, 1).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        errno(&h.set_pci_intx_level(1, 0, 3, 0, 1).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        errno(&h.set_pci_intx_level(0, 0, 3, 4, 1).unwrap_err()),
        libc::EINVAL
    );
    assert!(h.take_irqs().is_empty());
    h.set_isa_irq_level(4, 1).unwrap();
    assert!(h.wait_irq(Duration::from_secs(1)));
    assert_eq!(h.take_irqs().len(), 1);
}

#[test]
fn test_no_server_reads_all_ones_and_rep_ins_fills_ones() {
    let (host, d) = hvm(1);
    let g = HvmGuest::new(host.clone(), d, 0).unwrap();
    assert_eq!(g.pio_read(0x60, 1).unwrap(), 0xff);
    assert_eq!(g.mmio_read(0xfee0_0000, 8).unwrap(), u64::MAX);
    g.pio_write(0x60, 1, 0).unwrap();
    g.rep_ins(0x60, 2, 4, 0x1000, false).unwrap();
    let mut b = [0u8; 10];
    g.ram_read(0x1000, &mut b).unwrap();
    assert_eq!(b, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
    assert!(g.pio_read(0x60, 3).is_err());
}

/// A minimal device model: binds vCPU 0's port and answers one request with `answer`.
struct HandDm {
    bound: Bound,
    page: xen::SharedMem,
}

impl HandDm {
    fn new(host: &Host, d: u16, bufioreq: u8, ports: (u64, u64)) -> (HandDm, u16) {
        let h = host.hvm_domain(d).unwrap();
        let id = h.create_server(host, 0, bufioreq).unwrap();
        let page = h.map_resource(0, id, 1, 1).unwrap();
        // As QEMU: enable first, since Xen writes vp_eport only then.
        h.set_state(0, id, true).unwrap();
        let vp = page.load_u32(24, Ordering::Acquire).unwrap();
        let bound = host.evtchn_bind_interdomain(0, d, vp).unwrap();
        h.map_range(0, id, XEN_DMOP_IO_RANGE_PORT, ports.0, ports.1)
            .unwrap();
        (HandDm { bound, page }, id)
    }

    fn wait_ready(&self) -> Ioreq {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(std::time::Instant::now() < deadline, "no request arrived");
            let r: Ioreq = self.page.read_obj(0).unwrap();
            if r.state() == STATE_IOREQ_READY {
                return r;
            }
            let mut fds = [PollFd::new(self.bound.incoming.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u16));
            let _ = self.bound.incoming.take();
        }
    }

    fn set_state(&self, bits: u8, state: u8) {
        self.page
            .store_u8(IOREQ_STATE_OFFSET, (bits & 0xf0) | state, Ordering::Release)
            .unwrap();
        self.bound.peer.signal().unwrap();
    }
}

#[test]
fn test_vcpu_request_carries_xen_fields_and_takes_the_answer() {
    let (host, d) = hvm(2);
    let (dm, _) = HandDm::new(&host, d, 2, (0x70, 0x71));
    let g = HvmGuest::new(host.clone(), d, 0).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = dm.wait_ready();
            assert_eq!(
                (r.type_, r.addr, r.size, r.count, r.dir()),
                (IOREQ_TYPE_PIO, 0x71, 1, 1, IOREQ_READ)
            );
            assert_eq!(r.vp_eport, dm.page.load_u32(24, Ordering::Relaxed).unwrap());
            dm.set_state(r.bits, STATE_IOREQ_INPROCESS);
            dm.page
                .store_u64(8, 0x1234_5642, Ordering::Relaxed)
                .unwrap();
            dm.set_state(r.bits, STATE_IORESP_READY);
        });
        assert_eq!(g.pio_read(0x71, 1).unwrap(), 0x42);
    });
    assert_eq!(
        dm.page
            .load_u8(IOREQ_STATE_OFFSET, Ordering::Acquire)
            .unwrap()
            & 0xf,
        STATE_IOREQ_NONE
    );
}

#[test]
fn xsa262_rogue_dm_moving_state_backwards_crashes_the_domain() {
    let (host, d) = hvm(1);
    let (dm, _) = HandDm::new(&host, d, 0, (0x70, 0x71));
    let g = HvmGuest::new(host.clone(), d, 0).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = dm.wait_ready();
            dm.set_state(r.bits, STATE_IOREQ_INPROCESS);
            // Wait until the vCPU has seen INPROCESS... then go back to READY.
            std::thread::yield_now();
            dm.set_state(r.bits, STATE_IOREQ_READY);
            dm.set_state(r.bits, STATE_IOREQ_READY);
            // A state that does not exist, in case the vCPU missed INPROCESS.
            dm.set_state(r.bits, 9);
        });
        let e = g.pio_read(0x70, 1).unwrap_err();
        assert!(matches!(e, HvmError::Crashed { .. }), "{e}");
    });
    assert!(host.hvm_domain(d).unwrap().crashed().is_some());
    assert!(matches!(
        g.pio_read(0x70, 1).unwrap_err(),
        HvmError::Crashed { .. }
    ));
}

#[test]
fn test_silent_dm_times_out_and_destroy_completes_waiters_with_ones() {
    let (host, d) = hvm(1);
    let (_dm, id) = HandDm::new(&host, d, 0, (0x70, 0x71));
    let mut g = HvmGuest::new(host.clone(), d, 0).unwrap();
    g.set_timeout(Duration::from_millis(50));
    assert!(matches!(
        g.pio_read(0x70, 1).unwrap_err(),
        HvmError::Timeout { .. }
    ));
    // The slot is still READY (Xen would still be waiting): destroying the server lets the
    // next waiter complete with all ones.
    let h = host.hvm_domain(d).unwrap();
    let srv = h.server(id).unwrap();
    h.destroy_server(&host, 0, id).unwrap();
    assert!(srv
        .pages()
        .load_u8(4096 + IOREQ_STATE_OFFSET, Ordering::Acquire)
        .is_ok());
    g.set_timeout(Duration::from_secs(5));
    assert_eq!(g.pio_read(0x70, 1).unwrap(), 0xff);
}

#[test]
fn test_selection_skips_disabled_servers_and_routes_cf8_cfc_as_pci_config() {
    let (host, d) = hvm(1);
    let h = host.hvm_domain(d).unwrap();
    let a = h.create_server(&host, 0, 0).unwrap();
    let b = h.create_server(&host, 0, 0).unwrap();
    h.map_range(0, a, XEN_DMOP_IO_RANGE_PCI, 0x18, 0x18)
        .unwrap();
    h.map_range(0, b, XEN_DMOP_IO_RANGE_PCI, 0x18, 0x18)
        .unwrap();
    h.set_state(0, a, true).unwrap();
    let sa = h.server(a).unwrap();
    let g = HvmGuest::new(host.clone(), d, 0).unwrap();
    let mut g2 = g.vcpu(0).unwrap();
    g2.set_timeout(Duration::from_millis(20));
    // CF8 enabled, 00:03.0, register 0x40 + port offset 2.
    g2.pio_write(0xcf8, 4, 0x8000_1840).unwrap();
    let _ = g2.pio_read(0xcfe, 2);
    let r: Ioreq = sa.pages().read_obj(4096).unwrap();
    assert_eq!(r.type_, IOREQ_TYPE_PCI_CONFIG);
    assert_eq!(r.addr, (0x18u64 << 32) | 0x42);
    assert_eq!(r.size, 2);
    // CF8 disabled: a plain port access to 0xcfc (nobody claims it).
    h.destroy_server(&host, 0, a).unwrap();
    h.set_state(0, b, true).unwrap();
    g2.pio_write(0xcf8, 4, 0x0000_1840).unwrap();
    assert_eq!(g2.pio_read(0xcfc, 4).unwrap(), 0xffff_ffff);
}

#[test]
fn test_buffered_ring_atomic_canonicalises_pointers() {
    let (host, d) = hvm(1);
    let h = host.hvm_domain(d).unwrap();
    let id = h
        .create_server(&host, 0, HVM_IOREQSRV_BUFIOREQ_ATOMIC)
        .unwrap();
    h.map_range(0, id, XEN_DMOP_IO_RANGE_PORT, 0x80, 0x80)
        .unwrap();
    h.set_state(0, id, true).unwrap();
    let page = h.map_resource(0, id, 0, 1).unwrap();
    let g = HvmGuest::new(host.clone(), d, 0).unwrap();
    let mut seen = Vec::new();
    for i in 0..1200u32 {
        assert_eq!(
            g.buffered_write(BufSpace::Port, 0x80, 1, u64::from(i & 0xff))
                .unwrap(),
            Posted::Buffered
        );
        // Consume as a device model must: read the slot, then an atomic add of read_pointer.
        let rp = page.load_u32(0, Ordering::Acquire).unwrap();
        let s: BufIoreq = page.read_obj(buf_ioreq_slot_offset(rp)).unwrap();
        seen.push(s.data);
        loop {
            let cur = page.load_u32(0, Ordering::Acquire).unwrap();
            if page.cmpxchg_u32(0, cur, cur + 1).unwrap() == cur {
                break;
            }
        }
    }
    assert_eq!(seen, (0..1200u32).map(|i| i & 0xff).collect::<Vec<_>>());
    // Xen canonicalised at every send once read_pointer reached the slot count.
    let rp = page.load_u32(0, Ordering::Acquire).unwrap();
    let wp = page.load_u32(4, Ordering::Acquire).unwrap();
    assert!(
        rp <= IOREQ_BUFFER_SLOT_NUM && wp <= IOREQ_BUFFER_SLOT_NUM,
        "rp {rp} wp {wp}"
    );
    assert_eq!(rp, wp);
}

#[test]
fn test_buffered_ring_full_falls_back_to_synchronous() {
    let (host, d) = hvm(1);
    let (dm, id) = HandDm::new(&host, d, HVM_IOREQSRV_BUFIOREQ_LEGACY, (0x80, 0x80));
    let h = host.hvm_domain(d).unwrap();
    h.map_range(0, id, XEN_DMOP_IO_RANGE_MEMORY, 0x80, 0x87)
        .unwrap();
    let g = HvmGuest::new(host.clone(), d, 0).unwrap();
    for _ in 0..510 {
        assert_eq!(
            g.buffered_write(BufSpace::Port, 0x80, 1, 1).unwrap(),
            Posted::Buffered
        );
    }
    // One slot left: an 8-byte write needs two and goes synchronously; a 1-byte one fits.
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = dm.wait_ready();
            assert_eq!(
                (r.type_, r.size, r.data),
                (IOREQ_TYPE_COPY, 8, 0x1_0000_0001)
            );
            dm.set_state(r.bits, STATE_IORESP_READY);
        });
        assert_eq!(
            g.buffered_write(BufSpace::Mmio, 0x80, 8, 0x1_0000_0001)
                .unwrap(),
            Posted::Synchronous
        );
    });
    assert_eq!(
        g.buffered_write(BufSpace::Port, 0x80, 1, 2).unwrap(),
        Posted::Buffered
    );
}

#[test]
fn test_daemon_dmops_and_resource_mapping_match_the_host() {
    let dir = std::env::temp_dir().join(format!("xensim-hvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let host = Host::new().unwrap();
    let d = host.create_hvm_domain("hvm", 256, 2).unwrap();
    let pv = host.create_domain("pv", 16).unwrap();
    let server = Server::start(host.clone(), &dir.join("s")).unwrap();
    let sim = SimHost::connect(server.path(), 0).unwrap();
    let dm = sim.open_devmodel().unwrap();
    let fm = sim.open_foreign().unwrap();
    let id = dm.create_ioreq_server(d, BufMode::Off).unwrap();
    assert_eq!(
        dm.get_ioreq_server_info(d, id, false)
            .unwrap()
            .bufioreq_port,
        0
    );
    assert!(dm.get_ioreq_server_info(d, id, true).is_err());
    assert!(
        fm.map_resource(d, Resource::IoreqServer(id), 0, 1).is_err(),
        "no buffered page"
    );
    assert!(
        fm.map_resource(d, Resource::IoreqServer(id), 1, 2).is_err(),
        "past frame 1"
    );
    assert!(
        fm.map_resource(d, Resource::IoreqServer(9), 1, 1).is_err(),
        "no server 9"
    );
    assert!(fm.map_resource(d, Resource::GrantTable, 0, 1).is_err());
    let page = fm.map_resource(d, Resource::IoreqServer(id), 1, 1).unwrap();
    let h = host.hvm_domain(d).unwrap();
    let xen_view = h.server(id).unwrap();
    // Xen writes the vCPUs' ports into their slots when the server is enabled, not before
    // (ioreq_server_enable -> ioreq_server_update_evtchn; found when domio first ran on Xen).
    for v in 0..2usize {
        assert_eq!(page.load_u32(v * 32 + 24, Ordering::Relaxed).unwrap(), 0);
    }
    dm.set_ioreq_server_state(d, id, true).unwrap();
    for v in 0..2usize {
        let port = page.load_u32(v * 32 + 24, Ordering::Relaxed).unwrap();
        assert_ne!(port, 0);
        assert_eq!(
            xen_view
                .pages()
                .load_u32(4096 + v * 32 + 24, Ordering::Relaxed)
                .unwrap(),
            port
        );
    }
    page.store_u64(0, 0xabc, Ordering::Relaxed).unwrap();
    assert_eq!(
        xen_view.pages().load_u64(4096, Ordering::Relaxed).unwrap(),
        0xabc
    );
    dm.map_io_range(
        d,
        id,
        IoRange::Port {
            start: 0x10,
            end: 0x13,
        },
    )
    .unwrap();
    assert!(dm
        .map_io_range(
            d,
            id,
            IoRange::Port {
                start: 0x12,
                end: 0x14
            }
        )
        .is_err());
    assert!(dm
        .map_io_range(
            d,
            id,
            IoRange::Port {
                start: 0x14,
                end: 0x13
            }
        )
        .is_err());
    dm.set_ioreq_server_state(d, id, true).unwrap();
    assert!(xen_view.enabled());
    dm.set_pci_intx_level(d, 0, 0, 2, 1, true).unwrap();
    assert_eq!(h.take_irqs().len(), 1);
    assert!(
        dm.create_ioreq_server(pv, BufMode::Atomic).is_err(),
        "PV domains have no ioreq servers"
    );
    dm.destroy_ioreq_server(d, id).unwrap();
    assert!(h.server(id).is_none());
    // A guest's own handle may not issue DMOPs.
    let guest_sim = SimHost::connect(server.path(), d).unwrap();
    assert!(guest_sim
        .open_devmodel()
        .unwrap()
        .create_ioreq_server(d, BufMode::Off)
        .is_err());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    // XEN_DMOP_remote_shutdown through the daemon reaches the domain (the toolstack acts on it).
    assert_eq!(h.shutdown_reason(), None);
    dm.remote_shutdown(d, xen::abi::dm_op::SHUTDOWN_POWEROFF)
        .unwrap();
    assert_eq!(
        h.shutdown_reason(),
        Some(xen::abi::dm_op::SHUTDOWN_POWEROFF)
    );
}

#[test]
fn test_posted_inject_msi_keeps_replies_in_order_and_is_delivered() {
    // inject_msi is posted through the daemon (no round trip): a failing one must not shift
    // the replies of later calls, and a good one reaches the guest.
    let dir = std::env::temp_dir().join(format!("xensim-hvm-msi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let host = Host::new().unwrap();
    let d = host.create_hvm_domain("hvm", 256, 1).unwrap();
    let pv = host.create_domain("pv", 16).unwrap();
    let server = Server::start(host.clone(), &dir.join("s")).unwrap();
    let sim = SimHost::connect(server.path(), 0).unwrap();
    let dm = sim.open_devmodel().unwrap();
    for _ in 0..100 {
        dm.inject_msi(pv, 0xfee0_0000, 0x30).unwrap();
    }
    let id = dm.create_ioreq_server(d, BufMode::Off).unwrap();
    assert!(dm.get_ioreq_server_info(d, id, false).is_ok());
    assert!(
        dm.create_ioreq_server(pv, BufMode::Off).is_err(),
        "the reply is this call's, not a posted one's"
    );
    let h = host.hvm_domain(d).unwrap();
    dm.inject_msi(d, 0xfee0_0000, 0x41).unwrap();
    assert!(h.wait_irq(Duration::from_secs(5)));
    assert_eq!(
        h.take_irqs(),
        vec![xensim::hvm::Irq::Msi {
            addr: 0xfee0_0000,
            data: 0x41
        }]
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

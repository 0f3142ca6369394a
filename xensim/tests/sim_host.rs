//! The simulated host through `SimHost`, the client a domio process uses: grant-table rules
//! (Xen's GNTST codes), grant copy, event-channel delivery and masking, and what happens when
//! a client's handle goes away.

use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::abi::grant_table::*;
use xen::{CopyDir, CopySegment, GrantError, XenHost, PAGE_SIZE};
use xensim::client::SimHost;
use xensim::guest::{Guest, GuestError};
use xensim::host::Host;
use xensim::server::Server;

struct Rig {
    _dir: tempfile::TempDir,
    _server: Server,
    host: Arc<Host>,
    dom0: SimHost,
    guest: Guest,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("xensim.sock")).unwrap();
    let domid = host.create_domain("guest", 256).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    let dom0 = SimHost::connect(server.path(), 0).unwrap();
    Rig {
        _dir: dir,
        _server: server,
        host,
        dom0,
        guest,
    }
}

fn readable(fd: std::os::fd::BorrowedFd<'_>, ms: u16) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).unwrap() > 0
}

fn map_status(e: GrantError) -> i16 {
    match e {
        GrantError::Map { status, .. } => status,
        other => panic!("expected a GNTST failure, got {other}"),
    }
}

#[test]
fn test_grant_map_granted_page_shares_bytes_both_ways() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    r.guest.write_page(gfn, 100, b"from the guest").unwrap();
    let gref = r.guest.grant(0, gfn, false).unwrap();

    let gt = r.dom0.open_gnttab().unwrap();
    let m = gt.map(r.guest.domid(), &[gref], true).unwrap();

    let mut buf = [0u8; 14];
    m.mem().read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"from the guest");
    m.mem().write(200, b"from dom0").unwrap();
    let mut back = [0u8; 9];
    r.guest.read_page(gfn, 200, &mut back).unwrap();
    assert_eq!(&back, b"from dom0");
}

#[test]
fn test_grant_map_sets_reading_writing_and_unmap_clears_them() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    let gref = r.guest.grant(0, gfn, false).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();

    let m = gt.map(r.guest.domid(), &[gref], true).unwrap();
    let mapped = r.guest.grant_flags(gref).unwrap();
    drop(m);
    let unmapped = r.guest.grant_flags(gref).unwrap();

    assert_eq!(
        mapped & (GTF_READING | GTF_WRITING),
        GTF_READING | GTF_WRITING
    );
    assert_eq!(unmapped & (GTF_READING | GTF_WRITING), 0);
}

#[test]
fn test_grant_map_to_wrong_domid_fails_general_error() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    let gref = r.guest.grant(7, gfn, false).unwrap(); // granted to dom7, not dom0
    let gt = r.dom0.open_gnttab().unwrap();

    let e = gt.map(r.guest.domid(), &[gref], false).unwrap_err();

    assert_eq!(map_status(e), GNTST_GENERAL_ERROR);
    assert_eq!(
        r.guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
        0
    );
}

#[test]
fn test_grant_map_readonly_grant_refuses_writable_map_allows_readonly() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    let gref = r.guest.grant(0, gfn, true).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();

    let e = gt.map(r.guest.domid(), &[gref], true).unwrap_err();
    let ro = gt.map(r.guest.domid(), &[gref], false).unwrap();

    assert_eq!(map_status(e), GNTST_GENERAL_ERROR);
    assert!(
        ro.mem().write(0, &[1]).is_err(),
        "a read-only mapping must refuse writes"
    );
    assert_eq!(
        r.guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
        GTF_READING
    );
}

#[test]
fn test_grant_map_never_granted_or_out_of_range_ref_fails_like_xen() {
    let r = rig();
    let gt = r.dom0.open_gnttab().unwrap();

    let never = gt.map(r.guest.domid(), &[500], false).unwrap_err();
    let beyond = gt
        .map(r.guest.domid(), &[xensim::host::GRANT_ENTRIES], false)
        .unwrap_err();
    let no_dom = gt.map(999, &[8], false).unwrap_err();

    assert_eq!(map_status(never), GNTST_GENERAL_ERROR);
    assert_eq!(map_status(beyond), GNTST_BAD_GNTREF);
    assert_eq!(map_status(no_dom), GNTST_BAD_DOMAIN);
}

#[test]
fn test_grant_map_frame_outside_guest_ram_fails_bad_page() {
    let r = rig();
    r.guest
        .write_grant_entry(9, 0, 1_000_000, GTF_PERMIT_ACCESS)
        .unwrap();
    let gt = r.dom0.open_gnttab().unwrap();

    let e = gt.map(r.guest.domid(), &[9], false).unwrap_err();

    assert_eq!(map_status(e), GNTST_BAD_PAGE);
    assert_eq!(
        r.guest.grant_flags(9).unwrap() & (GTF_READING | GTF_WRITING),
        0
    );
}

#[test]
fn test_grant_revoke_while_mapped_is_refused_then_allowed_after_unmap() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    let gref = r.guest.grant(0, gfn, false).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();
    let m = gt.map(r.guest.domid(), &[gref], true).unwrap();

    let while_mapped = r.guest.end_access(gref);
    drop(m);
    let after = r.guest.end_access(gref);

    assert!(
        matches!(while_mapped, Err(GuestError::GrantInUse { .. })),
        "{while_mapped:?}"
    );
    assert!(after.is_ok(), "{after:?}");
    assert_eq!(r.guest.grant_flags(gref).unwrap(), 0);
}

#[test]
fn test_grant_batch_with_one_bad_ref_fails_and_unpins_the_others() {
    let r = rig();
    let mut refs = Vec::new();
    for _ in 0..11 {
        let gfn = r.guest.alloc_page().unwrap();
        refs.push(r.guest.grant(0, gfn, false).unwrap());
    }
    refs[7] = 3000; // never granted
    let gt = r.dom0.open_gnttab().unwrap();

    let e = gt.map(r.guest.domid(), &refs, true).unwrap_err();

    match e {
        GrantError::Map { gref, status, .. } => {
            assert_eq!(gref, 3000);
            assert_eq!(status, GNTST_GENERAL_ERROR);
        }
        other => panic!("{other}"),
    }
    for (i, r2) in refs.iter().enumerate().filter(|(i, _)| *i != 7) {
        assert_eq!(
            r.guest.grant_flags(*r2).unwrap() & (GTF_READING | GTF_WRITING),
            0,
            "ref {i} still pinned"
        );
    }
}

#[test]
fn test_grant_mapping_of_scattered_pages_is_contiguous_in_ref_order() {
    let r = rig();
    let pages: Vec<u64> = (0..4).map(|_| r.guest.alloc_page().unwrap()).collect();
    let order = [3usize, 0, 2, 1];
    let mut refs = Vec::new();
    for (i, &p) in order.iter().enumerate() {
        r.guest.write_page(pages[p], 0, &[i as u8 + 1]).unwrap();
        refs.push(r.guest.grant(0, pages[p], true).unwrap());
    }
    let gt = r.dom0.open_gnttab().unwrap();

    let m = gt.map(r.guest.domid(), &refs, false).unwrap();

    for i in 0..4 {
        let mut b = [0u8];
        m.mem().read(i * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], i as u8 + 1);
    }
    assert_eq!(m.pages(), 4);
}

#[test]
fn test_grant_copy_checks_each_segment_and_moves_bytes() {
    let r = rig();
    let a = r.guest.alloc_page().unwrap();
    let b = r.guest.alloc_page().unwrap();
    r.guest.write_page(a, 10, b"copy me").unwrap();
    let ra = r.guest.grant(0, a, true).unwrap();
    let rb = r.guest.grant(0, b, false).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();
    let mut got = [0u8; 7];
    let mut cross = [0u8; 16];

    let mut segs = [
        CopySegment {
            domid: r.guest.domid(),
            gref: ra,
            offset: 10,
            local: CopyDir::FromGuest(&mut got),
            status: 1,
        },
        CopySegment {
            domid: r.guest.domid(),
            gref: rb,
            offset: 5,
            local: CopyDir::ToGuest(b"written"),
            status: 1,
        },
        CopySegment {
            domid: r.guest.domid(),
            gref: ra,
            offset: 0,
            local: CopyDir::ToGuest(b"ro"),
            status: 1,
        },
        CopySegment {
            domid: r.guest.domid(),
            gref: rb,
            offset: 4090,
            local: CopyDir::FromGuest(&mut cross),
            status: 1,
        },
    ];
    gt.copy(&mut segs).unwrap();
    let statuses: Vec<i16> = segs.iter().map(|s| s.status).collect();

    assert_eq!(
        statuses,
        vec![
            GNTST_OKAY,
            GNTST_OKAY,
            GNTST_GENERAL_ERROR,
            GNTST_BAD_COPY_ARG
        ]
    );
    assert_eq!(&got, b"copy me");
    let mut w = [0u8; 7];
    r.guest.read_page(b, 5, &mut w).unwrap();
    assert_eq!(&w, b"written");
    assert_eq!(
        r.guest.grant_flags(ra).unwrap() & (GTF_READING | GTF_WRITING),
        0,
        "copy must not leave pins"
    );
}

#[test]
fn test_evtchn_notify_wakes_the_right_fd_and_only_it() {
    let r = rig();
    let gp1 = r.guest.alloc_unbound(0).unwrap();
    let gp2 = r.guest.alloc_unbound(0).unwrap();
    let h1 = r.dom0.open_evtchn().unwrap();
    let h2 = r.dom0.open_evtchn().unwrap();
    let l1 = h1.bind_interdomain(r.guest.domid(), gp1.port()).unwrap();
    let l2 = h2.bind_interdomain(r.guest.domid(), gp2.port()).unwrap();

    gp2.notify().unwrap();

    assert!(readable(h2.fd(), 2000));
    assert!(!readable(h1.fd(), 0));
    let mut ports = [0u32; 4];
    assert_eq!(h2.pending(&mut ports).unwrap(), 1);
    assert_eq!(ports[0], l2);
    assert_eq!(h1.pending(&mut ports).unwrap(), 0);
    // Backend to guest: only the guest port bound to l1 fires.
    h1.notify(l1).unwrap();
    assert_eq!(gp1.wait(Duration::from_secs(2)).unwrap(), 1);
    assert_eq!(gp2.try_take().unwrap(), 0);
}

#[test]
fn test_evtchn_delivered_port_stays_masked_until_unmask() {
    let r = rig();
    let gp = r.guest.alloc_unbound(0).unwrap();
    let h = r.dom0.open_evtchn().unwrap();
    let l = h.bind_interdomain(r.guest.domid(), gp.port()).unwrap();
    let mut ports = [0u32; 4];

    gp.notify().unwrap();
    assert!(readable(h.fd(), 2000));
    assert_eq!(h.pending(&mut ports).unwrap(), 1);
    gp.notify().unwrap(); // arrives while masked
    let while_masked = readable(h.fd(), 50);
    h.unmask(l).unwrap();
    let after_unmask = readable(h.fd(), 2000);

    assert!(!while_masked, "a masked port must not be delivered");
    assert!(
        after_unmask,
        "the event sent while masked must be delivered on unmask"
    );
    assert_eq!(h.pending(&mut ports).unwrap(), 1);
    assert_eq!(ports[0], l);
}

#[test]
fn test_evtchn_send_after_remote_close_is_dropped_not_an_error() {
    let r = rig();
    let gp = r.guest.alloc_unbound(0).unwrap();
    let h = r.dom0.open_evtchn().unwrap();
    let l = h.bind_interdomain(r.guest.domid(), gp.port()).unwrap();
    let remote_port = gp.port();

    drop(gp);
    let sent = h.notify(l);
    let bind_again = h.bind_interdomain(r.guest.domid(), remote_port);

    assert!(sent.is_ok());
    assert!(bind_again.is_err(), "a closed port cannot be bound");
}

#[test]
fn test_evtchn_restricted_handle_refuses_other_domains() {
    let r = rig();
    let other = r.host.create_domain("other", 16).unwrap();
    let og = Guest::new(r.host.clone(), other).unwrap();
    let op = og.alloc_unbound(0).unwrap();
    let h = r.dom0.open_evtchn().unwrap();

    h.restrict(r.guest.domid()).unwrap();
    let e = h.bind_interdomain(other, op.port()).unwrap_err();

    assert!(matches!(e, xen::EvtchnError::Restricted { .. }), "{e}");
}

#[test]
fn test_gnttab_unmap_clears_byte_and_notifies_the_guest() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    r.guest.write_page(gfn, 64, &[0xff]).unwrap();
    let gref = r.guest.grant(0, gfn, false).unwrap();
    let gp = r.guest.alloc_unbound(0).unwrap();
    let ev = r.dom0.open_evtchn().unwrap();
    let l = ev.bind_interdomain(r.guest.domid(), gp.port()).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();
    let m = gt.map(r.guest.domid(), &[gref], true).unwrap();
    gt.set_unmap_notify(&m, Some(64), Some(l)).unwrap();

    drop(m);

    assert_eq!(gp.wait(Duration::from_secs(2)).unwrap(), 1);
    let mut b = [0u8];
    r.guest.read_page(gfn, 64, &mut b).unwrap();
    assert_eq!(b[0], 0, "unmap notify must clear the byte");
    assert_eq!(
        r.guest.grant_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
        0
    );
}

#[test]
fn test_foreign_map_needs_dom0_and_ram_frames() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    r.guest.write_page(gfn, 0, b"ram").unwrap();
    let fm = r.dom0.open_foreign().unwrap();

    let ok = fm.map(r.guest.domid(), &[gfn], false).unwrap();
    let bad = fm.map(r.guest.domid(), &[gfn, 1 << 30], false).unwrap_err();

    let mut b = [0u8; 3];
    ok.read(0, &mut b).unwrap();
    assert_eq!(&b, b"ram");
    assert!(
        matches!(bad, xen::ForeignError::Frame { gfn: g, .. } if g == 1 << 30),
        "{bad}"
    );
}

#[test]
fn test_gnttab_unmap_notify_event_arrives_after_the_grant_is_released() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    let gref = r.guest.grant(0, gfn, false).unwrap();
    let gp = r.guest.alloc_unbound(0).unwrap();
    let ev = r.dom0.open_evtchn().unwrap();
    let l = ev.bind_interdomain(r.guest.domid(), gp.port()).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();
    let m = gt.map(r.guest.domid(), &[gref], true).unwrap();
    gt.set_unmap_notify(&m, None, Some(l)).unwrap();

    drop(m);
    gp.wait(Duration::from_secs(2)).unwrap();

    // By the time the event is seen the grant must be revocable (gntdev_put_map order).
    assert!(r.guest.end_access(gref).is_ok());
}

#[test]
fn test_gnttab_clear_byte_notify_on_readonly_mapping_is_refused() {
    let r = rig();
    let gfn = r.guest.alloc_page().unwrap();
    let gref = r.guest.grant(0, gfn, true).unwrap();
    let gt = r.dom0.open_gnttab().unwrap();
    let m = gt.map(r.guest.domid(), &[gref], false).unwrap();

    let e = gt.set_unmap_notify(&m, Some(0), None);

    assert!(e.is_err(), "gntdev refuses clear-byte on a read-only map");
}

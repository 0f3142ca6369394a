//! Tests of the Linux implementation that run without Xen: missing devices, argument
//! validation before any ioctl, error mapping, and the xenstore socket transport.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::gnttab::validate_copy;
use super::privcmd::{dmop_range, first_frame_error};
use super::*;
use crate::abi::dm_op::{XEN_DMOP_IO_RANGE_MEMORY, XEN_DMOP_IO_RANGE_PCI, XEN_DMOP_IO_RANGE_PORT};
use crate::dm::{BufIoreq, IoRange};
use crate::gnttab::{CopyDir, CopySegment, GrantError};
use crate::{DmError, EvtchnError, ForeignError};

/// A fresh, not yet existing path under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("domio-xen-linux-{}-{n}-{name}", std::process::id()))
}

/// /dev/null opened read/write: every ioctl on it fails with ENOTTY, reads give EOF.
fn dev_null() -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("/dev/null")
}

fn assert_no_device(r: Result<(), HostError>, path: &std::path::Path, module: &str) {
    match r {
        Err(HostError::NoDevice {
            path: p, module: m, ..
        }) => {
            assert_eq!(p, path.display().to_string());
            assert_eq!(m, module);
        }
        other => panic!("expected NoDevice for {}, got {other:?}", path.display()),
    }
}

#[test]
fn test_linux_host_missing_dev_dir_gives_no_device_naming_path_and_module() {
    let dir = scratch("no-dev-xen");
    let host = LinuxHost::with_dev_dir(&dir);

    let evtchn = host.open_evtchn().map(drop);
    let gnttab = host.open_gnttab().map(drop);
    let foreign = host.open_foreign().map(drop);
    let dm = host.open_devmodel().map(drop);
    let xenbus = host.open_xenstore(&XsTransport::Device).map(drop);

    assert_no_device(evtchn, &dir.join("evtchn"), "xen-evtchn");
    assert_no_device(gnttab, &dir.join("gntdev"), "xen-gntdev");
    assert_no_device(foreign, &dir.join("privcmd"), "xen-privcmd");
    assert_no_device(dm, &dir.join("privcmd"), "xen-privcmd");
    assert_no_device(xenbus, &dir.join("xenbus"), "xenbus (xenbus_dev_frontend)");
    assert_eq!(host.own_domid(), 0);
}

#[test]
fn test_linux_host_default_paths_without_dev_xen_give_no_device_message() {
    let host = LinuxHost::new();

    let r = host.open_evtchn().map(drop);

    if std::path::Path::new("/dev/xen/evtchn").exists() {
        // On a real dom0 the device opens, or fails for a reason other than absence.
        assert!(!matches!(r, Err(HostError::NoDevice { .. })), "{r:?}");
    } else {
        let err = r.expect_err("no /dev/xen here");
        let msg = err.to_string();
        assert!(msg.contains("/dev/xen/evtchn"), "{msg}");
        assert!(msg.contains("xen-evtchn"), "{msg}");
        assert!(msg.contains("not a Xen dom0"), "{msg}");
    }
}

#[test]
fn test_xenstore_socket_connects_and_carries_bytes_both_ways() {
    let path = scratch("xenstored.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let host = LinuxHost::new().with_xenstored_socket(&path);

    let mut stream = host.open_xenstore(&XsTransport::Socket(None)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    stream.file.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    server.write_all(b"pong").unwrap();
    let mut back = [0u8; 4];
    stream.file.read_exact(&mut back).unwrap();

    assert_eq!(&got, b"ping");
    assert_eq!(&back, b"pong");
    assert!(stream.describe.contains(&path.display().to_string()));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn test_xenstore_socket_missing_names_the_path() {
    let path = scratch("absent.sock");
    let host = LinuxHost::new();

    let err = host
        .open_xenstore(&XsTransport::Socket(Some(path.display().to_string())))
        .unwrap_err();

    assert!(matches!(err, HostError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn test_evtchn_unbound_port_is_refused_without_ioctl() {
    let ev = LinuxEvtchn::from_file(dev_null(), "/dev/null".into());

    let unmask = ev.unmask(5);
    let notify = ev.notify(5);
    let unbind = ev.unbind(5);

    assert!(matches!(unmask, Err(EvtchnError::NotBound(5))));
    assert!(matches!(notify, Err(EvtchnError::NotBound(5))));
    assert!(matches!(unbind, Err(EvtchnError::NotBound(5))));
}

#[test]
fn test_evtchn_failed_bind_reports_op_domain_and_port() {
    let ev = LinuxEvtchn::from_file(dev_null(), "/dev/null".into());

    let err = ev.bind_interdomain(7, 3).unwrap_err();

    match &err {
        EvtchnError::Op {
            op,
            remote,
            port,
            source,
        } => {
            assert_eq!(*op, "bind_interdomain");
            assert_eq!(*remote, Some(7));
            assert_eq!(*port, Some(3));
            assert_eq!(source.raw_os_error(), Some(libc::ENOTTY));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        ev.unmask(0).is_err(),
        "a failed bind must not record a port"
    );
}

#[test]
fn test_evtchn_pending_with_nothing_to_read_returns_zero() {
    let ev = LinuxEvtchn::from_file(dev_null(), "/dev/null".into());
    let mut out = [0u32; 8];

    let n = ev.pending(&mut out).unwrap();
    let none = ev.pending(&mut []).unwrap();

    assert_eq!(n, 0);
    assert_eq!(none, 0);
}

#[test]
fn test_gnttab_copy_segment_crossing_page_is_refused_before_ioctl() {
    let g = LinuxGnttab::from_file(dev_null(), "/dev/null".into());
    let mut buf = [0u8; 16];
    let mut segs = [CopySegment {
        domid: 3,
        gref: 8,
        offset: 4090,
        local: CopyDir::FromGuest(&mut buf),
        status: 0,
    }];

    let r = g.copy(&mut segs);

    assert!(matches!(r, Err(GrantError::Invalid(_))), "{r:?}");
}

#[test]
fn test_gnttab_copy_validation_accepts_exact_page_end() {
    let data = [1u8; 96];
    let segs = [CopySegment {
        domid: 3,
        gref: 8,
        offset: 4000,
        local: CopyDir::ToGuest(&data),
        status: 0,
    }];
    let empty: [u8; 0] = [];
    let zero = [CopySegment {
        domid: 3,
        gref: 8,
        offset: 0,
        local: CopyDir::ToGuest(&empty),
        status: 0,
    }];

    assert!(validate_copy(&segs).is_ok());
    assert!(matches!(validate_copy(&zero), Err(GrantError::Invalid(_))));
}

#[test]
fn test_gnttab_map_empty_or_failing_reports_domain_and_op() {
    let g = LinuxGnttab::from_file(dev_null(), "/dev/null".into());

    let empty = g.map(4, &[], true).unwrap_err();
    let failed = g.map(4, &[10, 11], true).unwrap_err();

    assert!(matches!(empty, GrantError::Invalid(_)), "{empty:?}");
    match failed {
        GrantError::Os { op, domid, source } => {
            assert_eq!((op, domid), ("map_grant_ref", 4));
            assert_eq!(source.raw_os_error(), Some(libc::ENOTTY));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_foreign_map_on_non_privcmd_fails_with_domain() {
    let f = LinuxForeign::from_file(dev_null(), "/dev/null".into());

    let empty = f.map(9, &[], false).unwrap_err();
    let failed = f.map(9, &[0x1000], false).unwrap_err();
    let far = f
        .map_resource(9, crate::Resource::IoreqServer(1), 1 << 32, 1)
        .unwrap_err();

    assert!(
        matches!(empty, ForeignError::Os { domid: 9, .. }),
        "{empty:?}"
    );
    assert!(
        matches!(failed, ForeignError::Os { domid: 9, .. }),
        "{failed:?}"
    );
    assert!(far.to_string().contains("32 bits"), "{far}");
}

#[test]
fn test_first_frame_error_reports_gfn_and_positive_errno() {
    let gfns = [0x10, 0x11, 0x12];

    let ok = first_frame_error(&gfns, &[0, 0, 0]);
    let bad = first_frame_error(&gfns, &[0, -libc::ENOENT, -libc::EINVAL]);
    let hostile = first_frame_error(&gfns[..1], &[i32::MIN]);

    assert_eq!(ok, None);
    assert_eq!(bad, Some((0x11, libc::ENOENT)));
    assert_eq!(hostile, Some((0x10, libc::EINVAL)));
}

#[test]
fn test_dmop_range_validates_and_encodes_each_kind() {
    let port = dmop_range(IoRange::Port {
        start: 0x3f8,
        end: 0x3ff,
    });
    let mmio = dmop_range(IoRange::Mmio {
        start: 0xfe00_0000,
        end: 0xfe00_0fff,
    });
    let pci = dmop_range(IoRange::Pci {
        seg: 0,
        bus: 0,
        dev: 3,
        func: 0,
    });

    assert_eq!(port, Ok((XEN_DMOP_IO_RANGE_PORT, 0x3f8, 0x3ff)));
    assert_eq!(
        mmio,
        Ok((XEN_DMOP_IO_RANGE_MEMORY, 0xfe00_0000, 0xfe00_0fff))
    );
    assert_eq!(pci, Ok((XEN_DMOP_IO_RANGE_PCI, 0x18, 0x18)));
    assert!(dmop_range(IoRange::Port { start: 2, end: 1 }).is_err());
    assert!(dmop_range(IoRange::Port {
        start: 0,
        end: 0x10000
    })
    .is_err());
    assert!(dmop_range(IoRange::Mmio { start: 2, end: 1 }).is_err());
    assert!(dmop_range(IoRange::Pci {
        seg: 0,
        bus: 0,
        dev: 32,
        func: 0
    })
    .is_err());
}

#[test]
fn test_dm_invalid_arguments_refused_and_ioctl_failure_names_op() {
    let dm = LinuxDm::from_file(dev_null(), "/dev/null".into());

    let intx = dm.set_pci_intx_level(5, 0, 0, 3, 4, true).unwrap_err();
    let irq = dm.set_isa_irq_level(5, 16, true).unwrap_err();
    let range = dm
        .map_io_range(5, 1, IoRange::Mmio { start: 10, end: 9 })
        .unwrap_err();
    let create = dm.create_ioreq_server(5, BufIoreq::Atomic).unwrap_err();

    assert!(
        matches!(
            intx,
            DmError::Invalid {
                op: "set_pci_intx_level",
                domid: 5,
                ..
            }
        ),
        "{intx:?}"
    );
    assert!(
        matches!(
            irq,
            DmError::Invalid {
                op: "set_isa_irq_level",
                ..
            }
        ),
        "{irq:?}"
    );
    assert!(
        matches!(
            range,
            DmError::Invalid {
                op: "map_io_range_to_ioreq_server",
                ..
            }
        ),
        "{range:?}"
    );
    match create {
        DmError::Op { op, domid, source } => {
            assert_eq!((op, domid), ("create_ioreq_server", 5));
            assert_eq!(source.raw_os_error(), Some(libc::ENOTTY));
        }
        other => panic!("{other:?}"),
    }
}

/// An evtchn handle whose "device" is one end of a non-blocking socket pair; the test plays
/// the driver on the other end.
fn evtchn_over_socketpair() -> (LinuxEvtchn, std::os::unix::net::UnixStream) {
    let (ours, driver) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let file = File::from(std::os::fd::OwnedFd::from(ours));
    (LinuxEvtchn::from_file(file, "socketpair".into()), driver)
}

#[test]
fn test_evtchn_pending_parses_native_u32_ports_and_stops_when_empty() {
    let (ev, mut driver) = evtchn_over_socketpair();
    let ports: [u32; 3] = [5, 70000, 1];
    let bytes: Vec<u8> = ports.iter().flat_map(|p| p.to_ne_bytes()).collect();
    driver.write_all(&bytes).unwrap();
    let mut out = [0u32; 2];

    let first = ev.pending(&mut out).unwrap();
    let first_ports = out;
    let second = ev.pending(&mut out).unwrap();
    let third = ev.pending(&mut out).unwrap();

    assert_eq!(first, 2);
    assert_eq!(first_ports, [5, 70000]);
    assert_eq!((second, out[0]), (1, 1));
    assert_eq!(
        third, 0,
        "an empty non-blocking device reads as no pending ports"
    );
}

#[test]
fn test_evtchn_unmask_writes_the_port_number_back() {
    let (ev, mut driver) = evtchn_over_socketpair();
    ev.assume_bound(70000);

    ev.unmask(70000).unwrap();
    let mut got = [0u8; 4];
    driver.read_exact(&mut got).unwrap();

    assert_eq!(u32::from_ne_bytes(got), 70000);
}

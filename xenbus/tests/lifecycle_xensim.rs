//! The backend device lifecycle against xensim's xenstored: a toolstack writing nodes as
//! libxl does, a guest connection playing the frontend, and a driver recording calls.

mod common;

use std::sync::Arc;

use common::*;
use xenbus::{BackendWatcher, XenbusState, XsOps};

const DOMID: u32 = 5;
const DEVID: u32 = 51712;

// Fields drop in order: the watcher before the store it talks to.
struct Setup {
    watcher: Option<BackendWatcher>,
    guest: xenbus::XsClient,
    driver: Arc<RecDriver>,
    be: String,
    sim: Sim,
}

fn setup(be_type: &str) -> Setup {
    let sim = Sim::new();
    let guest = sim.guest(DOMID as u16);
    let driver = RecDriver::new(be_type);
    let watcher = BackendWatcher::start(sim.dom0.clone(), driver.clone(), 0, DOMID).unwrap();
    Setup {
        be: backend_path(be_type, DOMID, DEVID),
        sim,
        guest,
        driver,
        watcher: Some(watcher),
    }
}

impl Setup {
    fn watcher(&self) -> &BackendWatcher {
        self.watcher.as_ref().unwrap()
    }

    /// Adds the disk and drives it to Connected.
    fn connected(&self) {
        self.sim.add_disk(&self.driver.be_type, DOMID, DEVID);
        wait_state(&self.sim.dom0, &self.be, XenbusState::InitWait);
        frontend_publish(&self.guest, DOMID, DEVID, "8");
        wait_state(&self.sim.dom0, &self.be, XenbusState::Connected);
        fe_state(&self.guest, DOMID, DEVID, b"4");
    }

    /// The frontend goes straight to Closed; waits for the backend to close and disconnect.
    fn closed(&self) {
        fe_state(&self.guest, DOMID, DEVID, b"6");
        wait_state(&self.sim.dom0, &self.be, XenbusState::Closed);
        self.driver
            .log
            .wait("disconnect", |c| c.contains(&Call::Disconnect(DEVID)));
    }

    fn stop(&mut self) {
        self.watcher.take().unwrap().stop();
        self.driver.log.check_invariants(true);
    }
}

#[test]
fn test_lifecycle_new_disk_probes_advertises_and_waits() {
    // Arrange
    let s = setup("vbd");
    // Act
    s.sim.add_disk("vbd", DOMID, DEVID);
    // Assert
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    let d = &s.sim.dom0;
    assert_eq!(
        d.read(&format!("{}/hotplug-status", s.be)).unwrap(),
        b"connected"
    );
    assert_eq!(
        d.read(&format!("{}/feature-flush-cache", s.be)).unwrap(),
        b"1"
    );
    assert_eq!(s.driver.log.calls(), vec![Call::Probe(DEVID)]);
    // The guest can read what we advertised (the node's permissions are the toolstack's).
    assert_eq!(
        s.guest
            .read(&format!("{}/max-ring-page-order", s.be))
            .unwrap(),
        b"4"
    );
}

#[test]
fn test_lifecycle_frontend_initialised_connects_once() {
    // Arrange
    let mut s = setup("vbd");
    // Act
    s.connected();
    // Assert
    s.driver
        .log
        .wait("connect", |c| c.contains(&Call::Connect(DEVID, true)));
    assert!(s.watcher().wait_until(WAIT, |d| d.len() == 1
        && d[0].connected
        && d[0].frontend_state == Some(XenbusState::Connected)));
    assert_eq!(s.driver.log.count(&Call::Connect(DEVID, true)), 1);
    s.stop();
}

#[test]
fn test_lifecycle_qdisk_type_uses_vbd_frontend_path() {
    let mut s = setup("qdisk");
    s.connected();
    assert_eq!(
        s.sim.dom0.read(&format!("{}/frontend", s.be)).unwrap(),
        frontend_path(DOMID, DEVID).into_bytes()
    );
    s.stop();
}

#[test]
fn test_lifecycle_frontend_close_then_restart_reprobes_and_reconnects() {
    // Arrange
    let mut s = setup("vbd");
    s.connected();
    // Act: the guest closes (blkfront on shutdown) ...
    fe_state(&s.guest, DOMID, DEVID, b"5");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closing);
    s.driver
        .log
        .wait("disconnect", |c| c.contains(&Call::Disconnect(DEVID)));
    fe_state(&s.guest, DOMID, DEVID, b"6");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    // ... and starts again (reboot, resume).
    fe_state(&s.guest, DOMID, DEVID, b"1");
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    frontend_publish(&s.guest, DOMID, DEVID, "9");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    // Assert
    assert_eq!(
        s.driver.log.calls(),
        vec![
            Call::Probe(DEVID),
            Call::Connect(DEVID, true),
            Call::Disconnect(DEVID),
            Call::Drop(DEVID),
            Call::Probe(DEVID),
            Call::Connect(DEVID, true),
        ]
    );
    assert!(s
        .watcher()
        .wait_until(WAIT, |d| d.len() == 1 && d[0].probes == 2 && d[0].connected));
    s.stop();
}

#[test]
fn test_lifecycle_frontend_back_from_closed_without_initialising_reconnects() {
    // Arrange: seen on real Xen: Linux 6.1's blkfront, unbound and bound again, goes from
    // Closed straight to Initialised with a new ring (no Initialising in between).
    let mut s = setup("vbd");
    s.connected();
    s.closed();
    // Act
    frontend_publish(&s.guest, DOMID, DEVID, "11");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    // Assert: a fresh probe before the second connect.
    assert_eq!(
        s.driver.log.calls(),
        vec![
            Call::Probe(DEVID),
            Call::Connect(DEVID, true),
            Call::Disconnect(DEVID),
            Call::Drop(DEVID),
            Call::Probe(DEVID),
            Call::Connect(DEVID, true),
        ]
    );
    s.stop();
}

#[test]
fn test_lifecycle_a_driver_back_during_a_probe_is_not_connected_to_its_old_ring() {
    // Arrange: a session ends (Closed) and the frontend's old keys are still there. A state
    // the backend reads as "back without Initialising" (here Initialised with ring 11, as
    // after a storm of state changes) makes it probe; while that probe runs, the guest's
    // driver comes back properly (Initialising), takes the probe's InitWait as its answer
    // and publishes ring 12.
    let mut s = setup("vbd");
    s.connected();
    s.closed();
    let guest = s.guest.clone();
    *s.driver.during_probe.lock().unwrap() = Some(Box::new(move || {
        fe_state(&guest, DOMID, DEVID, b"1");
    }));
    // Act
    frontend_publish(&s.guest, DOMID, DEVID, "11");
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    frontend_publish(&s.guest, DOMID, DEVID, "12");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    // Assert: connected once, to the ring the returning driver published.
    assert_eq!(*s.driver.rings.lock().unwrap(), vec![8, 12]);
    s.stop();
}

#[test]
fn test_lifecycle_frontend_closed_before_connecting_then_back_without_initialising_connects() {
    // Arrange: the device is offered (InitWait) and the frontend closes before it connects.
    let mut s = setup("vbd");
    s.sim.add_disk(&s.driver.be_type, DOMID, DEVID);
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    fe_state(&s.guest, DOMID, DEVID, b"6");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    // Act: it comes back straight to Initialised with a ring (as Linux's blkfront can).
    frontend_publish(&s.guest, DOMID, DEVID, "11");
    // Assert: a fresh probe, its InitWait, and a connect (before, the backend stayed Closed:
    // only a session that had connected counted as one to restart).
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    let probes = s.driver.log.calls();
    assert_eq!(
        probes.iter().filter(|c| **c == Call::Probe(DEVID)).count(),
        2,
        "{probes:?}"
    );
    assert_eq!(*s.driver.rings.lock().unwrap(), vec![11]);
    s.stop();
}

#[test]
fn test_lifecycle_a_frontend_that_closes_during_a_restart_probe_gets_no_initwait() {
    // Arrange: a session ended (Closed). The guest's driver starts again (Initialising) and,
    // while the backend probes for it, gives up again (Closed), as at the end of a storm of
    // states (XSA-350's test on netback).
    let mut s = setup("vbd");
    s.connected();
    s.closed();
    // Every write of the backend's state from here on raises an event on this watch.
    let w = s
        .sim
        .dom0
        .watch(&format!("{}/state", s.be), "count")
        .unwrap();
    let _ = w.recv_timeout(WAIT); // the initial event of a new watch
    let guest = s.guest.clone();
    *s.driver.during_probe.lock().unwrap() = Some(Box::new(move || {
        fe_state(&guest, DOMID, DEVID, b"6");
    }));
    // Act
    fe_state(&s.guest, DOMID, DEVID, b"1");
    // The backend has answered the close (its device list is published after each step).
    assert!(s.watcher().wait_until(WAIT, |d| d.len() == 1
        && d[0].probes == 2
        && d[0].frontend_state == Some(XenbusState::Closed)));
    // A driver that comes back now gets a fresh probe's InitWait and connects.
    fe_state(&s.guest, DOMID, DEVID, b"1");
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    frontend_publish(&s.guest, DOMID, DEVID, "12");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    // Assert: two writes, InitWait and Connected. Not a stale InitWait for the driver that
    // gave up, then Closed under the one that came back, as before. (Reading Connected on
    // the same connection means every earlier write's event has arrived.)
    let st = w.stats();
    let writes = st.delivered + st.pending as u64 + st.coalesced - 1;
    assert_eq!(writes, 2, "backend state writes: {st:?}");
    assert_eq!(*s.driver.rings.lock().unwrap(), vec![8, 12]);
    s.stop();
}

#[test]
fn test_lifecycle_backend_node_removed_disconnects_and_drops_device() {
    // Arrange
    let mut s = setup("vbd");
    s.connected();
    // Act: the toolstack force-removes the device.
    s.sim.dom0.rm(&s.be).unwrap();
    // Assert
    assert!(s.watcher().wait_until(WAIT, |d| d.is_empty()));
    s.driver
        .log
        .wait("drop", |c| c.contains(&Call::Drop(DEVID)));
    assert_eq!(
        s.driver.log.calls()[1..],
        [
            Call::Connect(DEVID, true),
            Call::Disconnect(DEVID),
            Call::Drop(DEVID)
        ]
    );
    // No late write may re-create the removed node.
    assert!(!s.sim.dom0.exists(&s.be).unwrap());
    s.stop();
    assert!(!s.sim.dom0.exists(&s.be).unwrap());
}

#[test]
fn test_lifecycle_online_zero_removes_device_after_frontend_closes() {
    // Arrange
    let mut s = setup("vbd");
    s.connected();
    // Act: `xl block-detach`: online=0 and backend state Closing, then the guest closes.
    s.sim.dom0.write(&format!("{}/online", s.be), b"0").unwrap();
    s.sim.dom0.write(&format!("{}/state", s.be), b"5").unwrap();
    assert!(s.watcher().wait_until(WAIT, |d| d.len() == 1));
    fe_state(&s.guest, DOMID, DEVID, b"5");
    fe_state(&s.guest, DOMID, DEVID, b"6");
    // Assert
    assert!(s.watcher().wait_until(WAIT, |d| d.is_empty()));
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    s.driver
        .log
        .wait("drop", |c| c.contains(&Call::Drop(DEVID)));
    // The toolstack's new device on the same node would be adopted again: state 1.
    s.stop();
}

#[test]
fn test_lifecycle_online_one_keeps_device_after_frontend_closes() {
    let mut s = setup("vbd");
    s.connected();
    fe_state(&s.guest, DOMID, DEVID, b"6");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    assert!(s
        .watcher()
        .wait_until(WAIT, |d| d.len() == 1 && !d[0].connected));
    assert_eq!(s.driver.log.count(&Call::Drop(DEVID)), 0);
    s.stop();
}

#[test]
fn test_lifecycle_invalid_ring_ref_writes_error_and_never_connects() {
    // Arrange
    let mut s = setup("vbd");
    s.sim.add_disk("vbd", DOMID, DEVID);
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    for bad in ["abc", "0", "99999999999", "-1", " 8", "08"] {
        // Act: each bad value against a freshly restarted frontend.
        frontend_publish(&s.guest, DOMID, DEVID, bad);
        // Assert
        wait_state(&s.sim.dom0, &s.be, XenbusState::Closing);
        let err = s.sim.dom0.read_string(&format!("{}/error", s.be)).unwrap();
        assert!(err.contains("ring-ref"), "{err}");
        assert!(err.contains("domain 5"), "{err}");
        fe_state(&s.guest, DOMID, DEVID, b"6");
        wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
        fe_state(&s.guest, DOMID, DEVID, b"1");
        wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    }
    assert!(!s.driver.log.calls().contains(&Call::Connect(DEVID, true)));
    assert!(s
        .watcher()
        .wait_until(WAIT, |d| d.len() == 1 && !d[0].connected));
    s.stop();
}

#[test]
fn test_lifecycle_bad_protocol_or_missing_event_channel_refused() {
    let mut s = setup("vbd");
    s.sim.add_disk("vbd", DOMID, DEVID);
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    let fe = frontend_path(DOMID, DEVID);
    s.guest.write(&format!("{fe}/ring-ref"), b"8").unwrap();
    s.guest
        .write(&format!("{fe}/protocol"), b"x86_64-abi\n")
        .unwrap();
    s.guest.write(&format!("{fe}/state"), b"4").unwrap();
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closing);
    let err = s.sim.dom0.read_string(&format!("{}/error", s.be)).unwrap();
    assert!(err.contains("event-channel"), "{err}");
    assert_eq!(s.driver.log.count(&Call::Connect(DEVID, false)), 1);
    s.stop();
}

#[test]
fn test_lifecycle_toolstack_frontend_path_mismatch_is_refused_not_probed() {
    // Arrange: the backend's `frontend` points into another domain.
    let mut s = setup("vbd");
    // Act
    s.sim.add_disk_with("vbd", DOMID, DEVID, |tx, be| {
        tx.write(
            &format!("{be}/frontend"),
            b"/local/domain/0/device/vbd/51712",
        )
    });
    // Assert
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    let err = s.sim.dom0.read_string(&format!("{}/error", s.be)).unwrap();
    assert!(err.contains("/local/domain/5/device/vbd/51712"), "{err}");
    assert!(s.driver.log.calls().is_empty());
    assert!(s.watcher().devices().is_empty());
    s.stop();
}

#[test]
fn test_lifecycle_frontend_id_mismatch_is_refused() {
    let mut s = setup("vbd");
    s.sim.add_disk_with("vbd", DOMID, DEVID, |tx, be| {
        tx.write(&format!("{be}/frontend-id"), b"6")
    });
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    assert!(s
        .sim
        .dom0
        .read_string(&format!("{}/error", s.be))
        .unwrap()
        .contains("frontend-id"));
    assert!(s.driver.log.calls().is_empty());
    s.stop();
}

#[test]
fn test_lifecycle_garbage_frontend_state_is_ignored() {
    // Arrange
    let mut s = setup("vbd");
    s.connected();
    // Act
    for bad in [&b"9"[..], b"-1", b"4\0", b"", b"Closed", b"06"] {
        fe_state(&s.guest, DOMID, DEVID, bad);
    }
    // A valid value after the garbage is still honoured.
    fe_state(&s.guest, DOMID, DEVID, b"5");
    // Assert
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closing);
    assert_eq!(s.driver.log.count(&Call::Connect(DEVID, true)), 1);
    s.stop();
}

#[test]
fn test_lifecycle_probe_failure_writes_error_and_closes() {
    let mut s = setup("vbd");
    s.driver
        .fail_probe
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.sim.add_disk("vbd", DOMID, DEVID);
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    let err = s.sim.dom0.read_string(&format!("{}/error", s.be)).unwrap();
    assert!(err.contains("cannot open"), "{err}");
    // The guest restarting its frontend retries the probe, which now works.
    s.driver
        .fail_probe
        .store(false, std::sync::atomic::Ordering::SeqCst);
    fe_state(&s.guest, DOMID, DEVID, b"6");
    assert!(s.watcher().wait_until(WAIT, |d| d.len() == 1
        && d[0].frontend_state == Some(XenbusState::Closed)));
    fe_state(&s.guest, DOMID, DEVID, b"1");
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    assert_eq!(s.driver.log.calls(), vec![Call::Probe(DEVID)]);
    s.stop();
}

#[test]
fn test_lifecycle_deferred_hotplug_is_left_to_the_driver() {
    let mut s = setup("vbd");
    *s.driver.hotplug.lock().unwrap() = xenbus::Hotplug::Deferred;
    s.sim.add_disk("vbd", DOMID, DEVID);
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    assert!(!s
        .sim
        .dom0
        .exists(&format!("{}/hotplug-status", s.be))
        .unwrap());
    s.stop();
}

#[test]
fn test_lifecycle_reconfiguring_calls_driver_and_returns_to_connected() {
    let mut s = setup("vbd");
    s.connected();
    fe_state(&s.guest, DOMID, DEVID, b"7");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Reconfigured);
    fe_state(&s.guest, DOMID, DEVID, b"4");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    assert_eq!(
        s.driver
            .log
            .count(&Call::Reconfigure(DEVID, XenbusState::Reconfiguring)),
        1
    );
    s.stop();
}

#[test]
fn test_lifecycle_frontend_state_removed_closes_device() {
    let mut s = setup("vbd");
    s.connected();
    s.guest
        .rm(&format!("{}/state", frontend_path(DOMID, DEVID)))
        .unwrap();
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    assert!(s.watcher().wait_until(WAIT, |d| d.is_empty()));
    s.stop();
}

#[test]
fn test_lifecycle_stop_disconnects_and_closes_every_device() {
    // Arrange: two connected disks.
    let mut s = setup("vbd");
    s.connected();
    let be2 = backend_path("vbd", DOMID, 51728);
    s.sim.add_disk("vbd", DOMID, 51728);
    wait_state(&s.sim.dom0, &be2, XenbusState::InitWait);
    frontend_publish(&s.guest, DOMID, 51728, "10");
    wait_state(&s.sim.dom0, &be2, XenbusState::Connected);
    // Act
    s.watcher.take().unwrap().stop();
    // Assert
    for be in [&s.be, &be2] {
        assert_eq!(s.sim.dom0.read(&format!("{be}/state")).unwrap(), b"6");
    }
    for d in [DEVID, 51728] {
        assert_eq!(s.driver.log.count(&Call::Disconnect(d)), 1);
        assert_eq!(s.driver.log.count(&Call::Drop(d)), 1);
    }
    s.driver.log.check_invariants(true);
}

#[test]
fn test_lifecycle_devices_of_other_domains_are_not_touched() {
    let mut s = setup("vbd");
    let _g6 = s.sim.guest(6);
    s.sim.add_disk("vbd", 6, DEVID);
    s.connected();
    assert_eq!(
        s.sim
            .dom0
            .read(&format!("{}/state", backend_path("vbd", 6, DEVID)))
            .unwrap(),
        b"1"
    );
    s.stop();
}

#[test]
fn test_lifecycle_xenstore_connection_lost_disconnects_every_device() {
    // Arrange: a watcher on its own dom0 connection, serving a connected disk.
    let sim = Sim::new();
    let guest = sim.guest(DOMID as u16);
    let driver = RecDriver::new("vbd");
    let sock = sim.xs.connect_as(0).unwrap();
    let shut = sock.try_clone().unwrap();
    let client = xenbus::XsClient::from_unix(sock, "watcher dom0").unwrap();
    let watcher = BackendWatcher::start(client, driver.clone(), 0, DOMID).unwrap();
    let be = backend_path("vbd", DOMID, DEVID);
    sim.add_disk("vbd", DOMID, DEVID);
    wait_state(&sim.dom0, &be, XenbusState::InitWait);
    frontend_publish(&guest, DOMID, DEVID, "8");
    wait_state(&sim.dom0, &be, XenbusState::Connected);
    // Act: xenstored goes away under the watcher.
    shut.shutdown(std::net::Shutdown::Both).unwrap();
    // Assert: the rings are stopped and the device dropped; the watcher ends, not hangs.
    driver.log.wait("disconnect and drop", |c| {
        c.contains(&Call::Disconnect(DEVID)) && c.contains(&Call::Drop(DEVID))
    });
    assert!(watcher.wait_until(WAIT, |d| d.is_empty()));
    assert!(watcher.is_finished());
    watcher.stop();
    driver.log.check_invariants(true);
}

#[test]
fn test_lifecycle_toolstack_churn_under_backend_still_connects() {
    // Arrange: XSA-206: two toolstack threads keep writing under the device's backend node,
    // so the watcher's transactions conflict (EAGAIN) and must be retried.
    let mut s = setup("vbd");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..2)
        .map(|t| {
            let c = s.sim.dom0.clone();
            let stop = Arc::clone(&stop);
            let be = s.be.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    c.write(
                        &format!("{be}/churn-{t}-{}", n % 4),
                        n.to_string().as_bytes(),
                    )
                    .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Act
    s.connected();
    // Assert
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes: u64 = churn.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(writes > 0);
    assert_eq!(s.driver.log.count(&Call::Connect(DEVID, true)), 1);
    s.stop();
}

#[test]
fn test_lifecycle_driver_fatal_error_closes_until_frontend_restarts() {
    // Arrange
    let mut s = setup("vbd");
    s.connected();
    let ctx = s.driver.last_ctx.lock().unwrap().clone().unwrap();
    // Act: a ring thread finds the frontend rogue (XSA-39) and reports it, twice.
    let ring = std::thread::spawn(move || {
        ctx.fatal("rogue frontend: req_prod 10 rings ahead");
        ctx.fatal("second report");
    });
    ring.join().unwrap();
    // Assert
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closing);
    let err = s.sim.dom0.read_string(&format!("{}/error", s.be)).unwrap();
    assert_eq!(err, "rogue frontend: req_prod 10 rings ahead");
    s.driver
        .log
        .wait("disconnect", |c| c.contains(&Call::Disconnect(DEVID)));
    // The frontend still says Connected: no reconnect without a restart.
    fe_state(&s.guest, DOMID, DEVID, b"4");
    assert!(s.watcher().wait_until(WAIT, |d| d.len() == 1
        && !d[0].connected
        && d[0].state == XenbusState::Closing));
    fe_state(&s.guest, DOMID, DEVID, b"6");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Closed);
    fe_state(&s.guest, DOMID, DEVID, b"1");
    wait_state(&s.sim.dom0, &s.be, XenbusState::InitWait);
    frontend_publish(&s.guest, DOMID, DEVID, "8");
    wait_state(&s.sim.dom0, &s.be, XenbusState::Connected);
    assert_eq!(s.driver.log.count(&Call::Connect(DEVID, true)), 2);
    s.stop();
}

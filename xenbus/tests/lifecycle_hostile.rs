//! A hostile frontend against the backend lifecycle (THREATS §1, XSA-350 and XSA-349).

mod common;

use common::*;
use proptest::prelude::*;
use xenbus::{BackendWatcher, XenbusState, XsClient, XsOps};

const DOMID: u32 = 7;
const DEVID: u32 = 51712;

/// One thing the guest (or, rarely, the toolstack) does.
#[derive(Debug, Clone)]
enum Act {
    /// Writes a state value 0..=8.
    State(u8),
    /// Writes garbage to the state node.
    Garbage(Vec<u8>),
    /// Removes its state node.
    RmState,
    /// Writes a bad ring-ref.
    BadRing,
    /// Writes a good ring-ref.
    GoodRing,
    /// The toolstack removes the backend node.
    RmBackend,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        12 => (0u8..=8).prop_map(Act::State),
        2 => proptest::collection::vec(any::<u8>(), 0..6).prop_map(Act::Garbage),
        1 => Just(Act::RmState),
        1 => Just(Act::BadRing),
        2 => Just(Act::GoodRing),
        1 => Just(Act::RmBackend),
    ]
}

fn apply(sim: &Sim, guest: &XsClient, be: &str, a: &Act) {
    let fe = frontend_path(DOMID, DEVID);
    match a {
        Act::State(n) => fe_state(guest, DOMID, DEVID, n.to_string().as_bytes()),
        Act::Garbage(v) => fe_state(guest, DOMID, DEVID, v),
        Act::RmState => guest.rm(&format!("{fe}/state")).unwrap(),
        Act::BadRing => guest.write(&format!("{fe}/ring-ref"), b"0x8").unwrap(),
        Act::GoodRing => guest.write(&format!("{fe}/ring-ref"), b"8").unwrap(),
        Act::RmBackend => sim.dom0.rm(be).unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// XSA-350: random frontend state sequences, written as fast as the guest can, never
    /// make the backend connect twice, connect after a disconnect without a fresh probe,
    /// drop a connected device, or leak one; and the device still closes, and reconnects
    /// after a clean restart.
    #[test]
    fn prop_lifecycle_random_frontend_states_keep_invariants_and_converge(
        acts in proptest::collection::vec(act(), 1..60),
        online in any::<bool>(),
    ) {
        // Arrange
        let sim = Sim::new();
        let guest = sim.guest(DOMID as u16);
        let driver = RecDriver::new("vbd");
        let be = backend_path("vbd", DOMID, DEVID);
        let watcher = BackendWatcher::start(sim.dom0.clone(), driver.clone(), 0, DOMID).unwrap();
        sim.add_disk_with("vbd", DOMID, DEVID, |tx, be| {
            tx.write(&format!("{be}/online"), if online { b"1" } else { b"0" })
        });
        wait_state(&sim.dom0, &be, XenbusState::InitWait);
        frontend_publish(&guest, DOMID, DEVID, "8");
        // Act
        for a in &acts {
            apply(&sim, &guest, &be, a);
        }
        // The guest now closes properly.
        let fe = frontend_path(DOMID, DEVID);
        guest.write(&format!("{fe}/ring-ref"), b"8").unwrap();
        fe_state(&guest, DOMID, DEVID, b"5");
        fe_state(&guest, DOMID, DEVID, b"6");
        // Assert: closed (or removed), disconnected. What must happen depends on the acts:
        // a removed backend node or online=0 drops the device; a removed (or Unknown) frontend
        // state may or may not be seen (a later write can hide it), so either outcome is fine.
        let removed = !online || acts.iter().any(|a| matches!(a, Act::RmBackend));
        // State 0 (Unknown) is a vanished frontend too, as in Linux's backends.
        let may_vanish = acts
            .iter()
            .any(|a| matches!(a, Act::RmState | Act::State(0)));
        let closed = |d: &[xenbus::DeviceInfo]| {
            d.len() == 1
                && d[0].frontend_state == Some(XenbusState::Closed)
                && d[0].state == XenbusState::Closed
                && !d[0].connected
        };
        let ok = if removed {
            watcher.wait_until(WAIT, |d| d.is_empty())
        } else if may_vanish {
            watcher.wait_until(WAIT, |d| d.is_empty() || closed(d))
        } else {
            watcher.wait_until(WAIT, closed)
        };
        prop_assert!(ok, "not closed: {:?} after {:?}", watcher.devices(), acts);
        driver.log.check_invariants(false);
        let present = !removed && !may_vanish;
        if present {
            // A clean restart reconnects.
            fe_state(&guest, DOMID, DEVID, b"1");
            wait_state(&sim.dom0, &be, XenbusState::InitWait);
            fe_state(&guest, DOMID, DEVID, b"3");
            wait_state(&sim.dom0, &be, XenbusState::Connected);
        }
        watcher.stop();
        driver.log.check_invariants(true);
        if present {
            prop_assert_eq!(sim.dom0.read(&format!("{be}/state")).unwrap(), b"6".to_vec());
        }
    }
}

#[test]
fn test_lifecycle_state_flood_100k_writes_stays_bounded_and_converges() {
    // Arrange: a connected device, watched through a queue of 64 events.
    let sim = Sim::new();
    let guest = sim.guest(DOMID as u16);
    let driver = RecDriver::new("vbd");
    let be = backend_path("vbd", DOMID, DEVID);
    let watcher =
        BackendWatcher::start_with_capacity(sim.dom0.clone(), driver.clone(), 0, DOMID, 64)
            .unwrap();
    sim.add_disk("vbd", DOMID, DEVID);
    wait_state(&sim.dom0, &be, XenbusState::InitWait);
    frontend_publish(&guest, DOMID, DEVID, "8");
    wait_state(&sim.dom0, &be, XenbusState::Connected);
    // Act: XSA-349: four guest threads write the state node 100,000 times in all, mixing
    // valid no-op states with garbage.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let g = guest.clone();
            std::thread::spawn(move || {
                let path = format!("{}/state", frontend_path(DOMID, DEVID));
                for i in 0..25_000u32 {
                    let v: &[u8] = match (i + t) % 3 {
                        0 => b"4",
                        1 => b"3",
                        _ => b"junk",
                    };
                    g.write(&path, v).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    fe_state(&guest, DOMID, DEVID, b"5");
    fe_state(&guest, DOMID, DEVID, b"6");
    // Assert: the final state is reached, memory stayed bounded, one connect only.
    wait_state(&sim.dom0, &be, XenbusState::Closed);
    assert!(watcher.wait_until(WAIT, |d| d.len() == 1 && !d[0].connected));
    let st = watcher.queue_stats();
    // At most the capacity plus one overflow marker per watch (backend dir, frontend state).
    assert!(st.max_pending <= 64 + 2, "{st:?}");
    assert_eq!(driver.log.count(&Call::Connect(DEVID, true)), 1);
    assert_eq!(driver.log.count(&Call::Disconnect(DEVID)), 1);
    watcher.stop();
    driver.log.check_invariants(true);
}

//! The xenstore client against xensim's xenstored.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use xenbus::wire::PermKind;
use xenbus::{XsClient, XsError, XsOps};

#[test]
fn test_xs_basic_operations_roundtrip() {
    // Arrange
    let sim = Sim::new();
    let c = &sim.dom0;
    // Act
    c.write("/t/a/b", b"hello").unwrap();
    c.mkdir("/t/dir").unwrap();
    c.set_perms(
        "/t/a/b",
        &[perm(PermKind::None, 0), perm(PermKind::Read, 3)],
    )
    .unwrap();
    // Assert
    assert_eq!(c.read("/t/a/b").unwrap(), b"hello");
    assert_eq!(c.read("/t/dir").unwrap(), b"");
    let mut names = c.directory("/t").unwrap();
    names.sort();
    assert_eq!(names, vec!["a", "dir"]);
    assert_eq!(
        c.get_perms("/t/a/b").unwrap(),
        vec![perm(PermKind::None, 0), perm(PermKind::Read, 3)]
    );
    assert_eq!(c.get_domain_path(5).unwrap(), "/local/domain/5");
    c.rm("/t/a").unwrap();
    assert!(!c.exists("/t/a/b").unwrap());
    assert_eq!(c.try_read("/t/a").unwrap(), None);
}

#[test]
fn test_xs_missing_node_error_names_errno_operation_and_path() {
    let sim = Sim::new();
    let e = sim
        .dom0
        .read("/local/domain/0/backend/vbd/5/51712/params")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "ENOENT reading /local/domain/0/backend/vbd/5/51712/params"
    );
    assert_eq!(e.errno(), Some(libc::ENOENT));
}

#[test]
fn test_xs_guest_reading_dom0_node_gets_eacces_with_path() {
    let sim = Sim::new();
    let guest = sim.guest(4);
    sim.dom0.write("/secret", b"x").unwrap();
    let e = guest.read("/secret").unwrap_err();
    assert_eq!(e.errno(), Some(libc::EACCES));
    assert_eq!(e.to_string(), "EACCES reading /secret");
    let e = guest.write("/secret", b"y").unwrap_err();
    assert_eq!(e.to_string(), "EACCES writing /secret");
}

#[test]
fn test_xs_many_threads_concurrent_requests_all_correct() {
    // Arrange
    let sim = Sim::new();
    // Act: 8 threads, each writing and reading back its own nodes on one connection.
    let hs: Vec<_> = (0..8)
        .map(|t| {
            let c = sim.dom0.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let p = format!("/conc/{t}/{i}");
                    c.write(&p, p.as_bytes()).unwrap();
                    assert_eq!(c.read(&p).unwrap(), p.as_bytes());
                }
            })
        })
        .collect();
    // Assert
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(sim.dom0.directory("/conc/3").unwrap().len(), 200);
}

#[test]
fn test_xs_watch_stream_delivers_changes_below_its_path() {
    // Arrange
    let sim = Sim::new();
    sim.dom0.mkdir("/w").unwrap();
    let w = sim.dom0.watch("/w", "tok").unwrap();
    let first = w.recv_timeout(WAIT).unwrap();
    assert_eq!((first.path.as_str(), first.token.as_str()), ("/w", "tok"));
    // Act
    sim.dom0.write("/w/x", b"1").unwrap();
    sim.dom0.write("/elsewhere", b"1").unwrap();
    sim.dom0.write("/w/y", b"1").unwrap();
    // Assert
    assert_eq!(w.recv_timeout(WAIT).unwrap().path, "/w/x");
    assert_eq!(w.recv_timeout(WAIT).unwrap().path, "/w/y");
}

#[test]
fn test_xs_dropped_watch_is_removed_from_xenstored() {
    // Arrange: two watches feeding one queue.
    let sim = Sim::new();
    let q = xenbus::EventQueue::new(16);
    let a = sim.dom0.watch_into("/a", "a", &q).unwrap();
    let _b = sim.dom0.watch_into("/b", "b", &q).unwrap();
    // The registration events.
    let mut tokens = vec![
        q.recv_timeout(WAIT).unwrap().token,
        q.recv_timeout(WAIT).unwrap().token,
    ];
    tokens.sort();
    assert_eq!(tokens, vec!["a", "b"]);
    // Act
    drop(a);
    sim.dom0.write("/a/x", b"1").unwrap();
    sim.dom0.write("/b/x", b"1").unwrap();
    // Assert: xenstored sends events in order, so a surviving /a watch would come first.
    let ev = q.recv_timeout(WAIT).unwrap();
    assert_eq!((ev.path.as_str(), ev.token.as_str()), ("/b/x", "b"));
}

#[test]
fn test_xs_watch_flood_is_coalesced_within_capacity() {
    // Arrange: a watch whose consumer does not read, with room for 8 events.
    let sim = Sim::new();
    let w = sim.dom0.watch_with_capacity("/flood", "f", 8).unwrap();
    // Act: 5,000 writes to 50 distinct nodes (the last write goes to /flood/done).
    for i in 0..5000 {
        sim.dom0
            .write(&format!("/flood/n{}", i % 50), b"v")
            .unwrap();
    }
    let marker = xenbus::EventQueue::new(1);
    let _m = sim.dom0.watch_into("/flood/done", "done", &marker).unwrap();
    marker.recv_timeout(WAIT).unwrap();
    // Our watch event for the last write was sent before the marker's registration
    // event, so it has been queued (or coalesced) by now.
    // Assert
    let st = w.stats();
    assert!(st.max_pending <= 9, "{st:?}");
    assert!(st.coalesced + st.overflowed >= 4990, "{st:?}");
    let first = w.try_recv().unwrap();
    assert!(first.overflowed);
    assert_eq!(first.path, "/flood");
}

#[test]
fn test_xs_transaction_conflict_with_second_connection_is_retried() {
    // Arrange
    let sim = Sim::new();
    let other = XsClient::from_unix(sim.xs.connect_as(0).unwrap(), "other dom0").unwrap();
    sim.dom0.write("/counter", b"1").unwrap();
    let runs = AtomicU32::new(0);
    // Act: during the first run, another connection changes the node we read.
    let r: Result<(), XsError> = sim.dom0.transaction(|tx| {
        let v: u32 = String::from_utf8(tx.read("/counter")?)
            .unwrap()
            .parse()
            .unwrap();
        if runs.fetch_add(1, Ordering::SeqCst) == 0 {
            other.write("/counter", b"10").unwrap();
        }
        tx.write("/counter", (v + 1).to_string().as_bytes())
    });
    // Assert
    r.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(sim.dom0.read("/counter").unwrap(), b"11");
    assert_eq!(sim.dom0.stats().tx_retries, 1);
}

#[test]
fn test_xs_transaction_error_aborts_and_leaves_nothing() {
    let sim = Sim::new();
    let r: Result<(), XsError> = sim.dom0.transaction(|tx| {
        tx.write("/txn/a", b"1")?;
        tx.read("/txn/missing").map(|_| ())
    });
    assert!(r.unwrap_err().is_not_found());
    assert!(!sim.dom0.exists("/txn/a").unwrap());
}

#[test]
fn test_xs_concurrent_transactions_on_one_counter_lose_no_update() {
    // Arrange: two connections, 4 threads each, incrementing one counter in transactions.
    let sim = Sim::new();
    let other = XsClient::from_unix(sim.xs.connect_as(0).unwrap(), "other dom0").unwrap();
    sim.dom0.write("/ctr", b"0").unwrap();
    // Act
    let hs: Vec<_> = (0..8)
        .map(|t| {
            let c = if t % 2 == 0 {
                sim.dom0.clone()
            } else {
                other.clone()
            };
            std::thread::spawn(move || {
                for _ in 0..10 {
                    c.transaction(|tx| -> Result<(), XsError> {
                        let v: u32 = String::from_utf8(tx.read("/ctr")?)
                            .unwrap()
                            .parse()
                            .unwrap();
                        tx.write("/ctr", (v + 1).to_string().as_bytes())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    // Assert
    assert_eq!(sim.dom0.read("/ctr").unwrap(), b"80");
}

#[test]
fn test_xs_large_directory_is_listed_in_parts() {
    // Arrange: children whose names take about 12 KiB, more than one reply can hold.
    let sim = Sim::new();
    sim.dom0
        .transaction(|tx| -> Result<(), XsError> {
            for i in 0..400 {
                tx.mkdir(&format!("/big/child-with-a-long-name-{i:04}"))?;
            }
            Ok(())
        })
        .unwrap();
    // Act
    let names = sim.dom0.directory("/big").unwrap();
    // Assert
    assert_eq!(names.len(), 400);
    assert!(names.contains(&"child-with-a-long-name-0399".to_owned()));
}

#[test]
fn test_xs_introduce_release_and_query_domains() {
    let sim = Sim::new();
    assert!(!sim.dom0.is_domain_introduced(9).unwrap());
    sim.dom0.introduce(9, 0x1234, 3).unwrap();
    assert!(sim.dom0.is_domain_introduced(9).unwrap());
    sim.dom0.release(9).unwrap();
    assert!(!sim.dom0.is_domain_introduced(9).unwrap());
}

#[test]
fn test_xs_control_print_answers_ok() {
    let sim = Sim::new();
    let r = sim
        .dom0
        .control(&[b"print", b"hello from the test"])
        .unwrap();
    assert_eq!(r.strip_suffix(b"\0").unwrap_or(&r), b"OK");
}

#[test]
fn test_xs_reset_watches_closes_local_streams() {
    let sim = Sim::new();
    let w = sim.dom0.watch("/r", "r").unwrap();
    w.recv_timeout(WAIT).unwrap();
    sim.dom0.reset_watches().unwrap();
    assert_eq!(w.recv(), None);
    // The connection stays usable.
    sim.dom0.write("/r/x", b"1").unwrap();
}

#[test]
fn test_xs_connection_closed_under_callers_gives_errors_not_hangs() {
    // Arrange: a guest connection whose socket we shut down behind the client's back.
    let sim = Sim::new();
    let _ = sim.guest(3);
    let sock = sim.xs.connect_as(3).unwrap();
    let shut = sock.try_clone().unwrap();
    let c = XsClient::from_unix(sock, "guest 3").unwrap();
    assert_eq!(c.read("/local/domain/3").unwrap(), b"");
    let w = c.watch("/local/domain/3", "d").unwrap();
    // Act
    shut.shutdown(std::net::Shutdown::Both).unwrap();
    // Assert: every call fails promptly, the watch stream ends.
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || c.read("/local/domain/3"))
        })
        .collect();
    for h in hs {
        let e = h.join().unwrap().unwrap_err();
        assert!(e.is_dead(), "{e}");
    }
    while w.recv().is_some() {}
    assert!(c.dead_reason().is_some());
}

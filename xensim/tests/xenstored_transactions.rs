//! Transactions: isolation, conflicts (EAGAIN), abort, events at commit, quotas.

mod xenstored_common;

use std::sync::Arc;

use xen::abi::xs_wire::msg;
use xensim::xenstored::{Quotas, Xenstored};
use xenstored_common::{ev, Client};

fn dom0() -> (Arc<Xenstored>, Client, Client) {
    let xs = Xenstored::new(Quotas::default());
    let a = Client::new(xs.connect_as(0).unwrap());
    let b = Client::new(xs.connect_as(0).unwrap());
    (xs, a, b)
}

#[test]
fn test_transaction_writes_invisible_until_commit() {
    let (_xs, mut a, mut b) = dom0();
    let t = a.tx_start().unwrap();
    a.write_tx(t, "/t/x", b"1").unwrap();
    assert_eq!(a.read_tx(t, "/t/x").unwrap(), b"1");
    assert_eq!(b.read("/t/x").unwrap_err(), "ENOENT");
    a.tx_end(t, true).unwrap();
    assert_eq!(b.read("/t/x").unwrap(), b"1");
}

#[test]
fn test_transaction_read_node_changed_by_other_commit_is_eagain() {
    // Arrange
    let (_xs, mut a, mut b) = dom0();
    a.write("/c", b"0").unwrap();
    let t = a.tx_start().unwrap();
    assert_eq!(a.read_tx(t, "/c").unwrap(), b"0");
    // Act
    b.write("/c", b"other").unwrap();
    a.write_tx(t, "/d", b"from-tx").unwrap();
    let r = a.tx_end(t, true);
    // Assert
    assert_eq!(r.unwrap_err(), "EAGAIN");
    assert_eq!(b.read("/d").unwrap_err(), "ENOENT");
    assert_eq!(b.read("/c").unwrap(), b"other");
}

#[test]
fn test_transaction_sees_its_first_read_copy() {
    let (_xs, mut a, mut b) = dom0();
    a.write("/s", b"old").unwrap();
    let t = a.tx_start().unwrap();
    assert_eq!(a.read_tx(t, "/s").unwrap(), b"old");
    b.write("/s", b"new").unwrap();
    assert_eq!(a.read_tx(t, "/s").unwrap(), b"old");
    assert_eq!(a.tx_end(t, true).unwrap_err(), "EAGAIN");
}

#[test]
fn test_transaction_absent_node_created_by_other_is_eagain() {
    let (_xs, mut a, mut b) = dom0();
    let t = a.tx_start().unwrap();
    assert_eq!(a.read_tx(t, "/absent").unwrap_err(), "ENOENT");
    b.write("/absent", b"x").unwrap();
    assert_eq!(a.tx_end(t, true).unwrap_err(), "EAGAIN");
}

#[test]
fn test_two_interfering_transactions_second_fails() {
    let (_xs, mut a, mut b) = dom0();
    a.write("/A", b"a").unwrap();
    a.write("/B", b"b").unwrap();
    let t1 = a.tx_start().unwrap();
    let t2 = b.tx_start().unwrap();
    a.read_tx(t1, "/A").unwrap();
    b.read_tx(t2, "/B").unwrap();
    a.write_tx(t1, "/B", b"1").unwrap();
    b.write_tx(t2, "/A", b"2").unwrap();
    assert!(a.tx_end(t1, true).is_ok());
    assert_eq!(b.tx_end(t2, true).unwrap_err(), "EAGAIN");
    assert_eq!(a.read("/A").unwrap(), b"a");
    assert_eq!(a.read("/B").unwrap(), b"1");
}

#[test]
fn test_transaction_abort_discards_changes() {
    let (_xs, mut a, _b) = dom0();
    a.write("/k", b"keep").unwrap();
    let t = a.tx_start().unwrap();
    a.write_tx(t, "/k", b"lost").unwrap();
    a.rm_tx(t, "/tool").unwrap();
    a.tx_end(t, false).unwrap();
    assert_eq!(a.read("/k").unwrap(), b"keep");
    assert!(a.read("/tool").is_ok());
    assert_eq!(a.tx_end(t, true).unwrap_err(), "ENOENT");
}

#[test]
fn test_transaction_watch_events_fire_at_commit() {
    let (_xs, mut a, mut w) = dom0();
    w.watch("/e", "t").unwrap();
    w.drain_events();
    let t = a.tx_start().unwrap();
    a.write_tx(t, "/e/1", b"").unwrap();
    a.write_tx(t, "/e/2", b"").unwrap();
    assert!(w.drain_events().is_empty());
    a.tx_end(t, true).unwrap();
    assert_eq!(w.drain_events(), [ev("/e/1", "t"), ev("/e/2", "t")]);
}

#[test]
fn test_transaction_errors_unknown_id_nested_and_bad_end() {
    let (_xs, mut a, _b) = dom0();
    assert_eq!(a.read_tx(4242, "/tool").unwrap_err(), "ENOENT");
    let t = a.tx_start().unwrap();
    assert_eq!(
        a.req(msg::XS_TRANSACTION_START, t, &[b""]).unwrap_err(),
        "EBUSY"
    );
    assert_eq!(
        a.req(msg::XS_TRANSACTION_END, t, &[b"X"]).unwrap_err(),
        "EINVAL"
    );
    assert_eq!(
        a.req(msg::XS_TRANSACTION_END, 0, &[b"T"]).unwrap_err(),
        "ENOENT"
    );
    assert!(a.tx_end(t, true).is_ok());
}

#[test]
fn test_transaction_directory_sees_own_changes() {
    let (_xs, mut a, _b) = dom0();
    let t = a.tx_start().unwrap();
    a.write_tx(t, "/dir/x", b"").unwrap();
    assert_eq!(a.directory_tx(t, "/dir").unwrap(), ["x"]);
    a.rm_tx(t, "/dir/x").unwrap();
    assert!(a.directory_tx(t, "/dir").unwrap().is_empty());
    a.tx_end(t, true).unwrap();
    assert!(a.directory("/dir").unwrap().is_empty());
}

#[test]
fn test_transaction_quota_domu_eleven_then_enospc() {
    let xs = Xenstored::new(Quotas::default());
    xs.introduce_domain(5);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    // cxenstored checks `started > quota` before starting: 11 fit with quota 10.
    for _ in 0..11 {
        g.tx_start().unwrap();
    }
    assert_eq!(g.tx_start().unwrap_err(), "ENOSPC");
    let mut d0 = Client::new(xs.connect_as(0).unwrap());
    for _ in 0..20 {
        d0.tx_start().unwrap();
    }
}

#[test]
fn test_transaction_node_quota_is_enospc_for_domu() {
    let q = Quotas {
        nodes_per_transaction: 8,
        ..Quotas::default()
    };
    let xs = Xenstored::new(q);
    xs.introduce_domain(5);
    xs.create_domain_home(5).unwrap();
    let mut g = Client::new(xs.connect_as(5).unwrap());
    let t = g.tx_start().unwrap();
    let mut results = Vec::new();
    for i in 0..10 {
        results.push(g.write_tx(t, &format!("n{i}"), b"x").is_ok());
    }
    assert!(results[0]);
    assert_eq!(g.write_tx(t, "zz", b"x").unwrap_err(), "ENOSPC");
    g.tx_end(t, false).unwrap();
}

#[test]
fn test_transaction_commit_checks_node_quota_like_cxenstored() {
    // Arrange: a domain 2 nodes below its quota (home + 7 nodes of 10).
    let q = Quotas {
        nodes_per_domain: 10,
        ..Quotas::default()
    };
    let xs = Xenstored::new(q);
    xs.introduce_domain(5);
    xs.create_domain_home(5).unwrap();
    let mut g = Client::new(xs.connect_as(5).unwrap());
    for i in 0..7 {
        g.write(&format!("n{i}"), b"").unwrap();
    }
    // Act: cxenstored's commit refuses a count that reaches the quota.
    let t = g.tx_start().unwrap();
    g.write_tx(t, "a", b"").unwrap();
    g.write_tx(t, "b", b"").unwrap();
    let full = g.tx_end(t, true);
    let t = g.tx_start().unwrap();
    g.write_tx(t, "a", b"").unwrap();
    let one = g.tx_end(t, true);
    // Assert
    assert_eq!(full.unwrap_err(), "ENOSPC");
    assert!(one.is_ok());
    assert_eq!(xs.domain_node_count(5), 9);
}

#[test]
fn test_transaction_read_node_deleted_by_other_is_eagain() {
    let (_xs, mut a, mut b) = dom0();
    a.write("/del", b"x").unwrap();
    let t = a.tx_start().unwrap();
    a.read_tx(t, "/del").unwrap();
    b.rm("/del").unwrap();
    a.write_tx(t, "/other", b"y").unwrap();
    assert_eq!(a.tx_end(t, true).unwrap_err(), "EAGAIN");
    assert_eq!(a.read("/other").unwrap_err(), "ENOENT");
}

#[test]
fn test_transaction_untouched_nodes_changed_by_others_do_not_conflict() {
    let (_xs, mut a, mut b) = dom0();
    a.write("/mine", b"0").unwrap();
    b.write("/theirs", b"0").unwrap();
    let t = a.tx_start().unwrap();
    a.write_tx(t, "/mine", b"1").unwrap();
    b.write("/theirs", b"2").unwrap();
    assert!(a.tx_end(t, true).is_ok());
    assert_eq!(b.read("/mine").unwrap(), b"1");
}

#[test]
fn test_transaction_creating_sibling_of_other_creation_is_eagain() {
    // Creating a node rewrites its parent's child list: two creations under one
    // parent conflict, as in cxenstored.
    let (_xs, mut a, mut b) = dom0();
    a.mkdir("/dir").unwrap();
    let t = a.tx_start().unwrap();
    a.write_tx(t, "/dir/mine", b"1").unwrap();
    b.write("/dir/theirs", b"2").unwrap();
    assert_eq!(a.tx_end(t, true).unwrap_err(), "EAGAIN");
}

#[test]
fn test_concurrent_transactional_increments_are_serializable() {
    // Arrange: 4 clients each increment a counter 50 times with read-modify-write
    // transactions, retrying on EAGAIN.
    let xs = Xenstored::new(Quotas::default());
    xs.write(0, "/counter", b"0").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let mut c = Client::new(xs.connect_as(0).unwrap());
            std::thread::spawn(move || {
                let mut retries = 0u32;
                for _ in 0..50 {
                    loop {
                        let t = c.tx_start().unwrap();
                        let v: u64 = String::from_utf8(c.read_tx(t, "/counter").unwrap())
                            .unwrap()
                            .parse()
                            .unwrap();
                        c.write_tx(t, "/counter", (v + 1).to_string().as_bytes())
                            .unwrap();
                        match c.tx_end(t, true) {
                            Ok(_) => break,
                            Err(e) => {
                                assert_eq!(e, "EAGAIN");
                                retries += 1;
                            }
                        }
                    }
                }
                retries
            })
        })
        .collect();
    // Act
    let retries: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // Assert: no lost update.
    assert_eq!(xs.read(0, "/counter").unwrap(), b"200", "{retries} retries");
}

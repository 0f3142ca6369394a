//! cxenstored 4.17 quotas with their default values and errors.

mod xenstored_common;

use std::sync::Arc;

use xen::abi::xs_wire::msg;
use xensim::xenstored::{Quotas, Xenstored};
use xenstored_common::Client;

fn domu(q: Quotas, d: u16) -> (Arc<Xenstored>, Client) {
    let xs = Xenstored::new(q);
    xs.introduce_domain(d);
    xs.create_domain_home(d).unwrap();
    let c = Client::new(xs.connect_as(d).unwrap());
    (xs, c)
}

#[test]
fn test_quotas_default_are_cxenstored_4_17_values() {
    let q = Quotas::default();
    assert_eq!(q.nodes_per_domain, 1000);
    assert_eq!(q.entry_size, 2048);
    assert_eq!(q.watches_per_domain, 128);
    assert_eq!(q.transactions_per_conn, 10);
    assert_eq!(q.perms_per_node, 5);
    assert_eq!(q.nodes_per_transaction, 1024);
    assert_eq!(q.path_max, 2048);
    assert_eq!(q.outstanding_requests, 20);
}

#[test]
fn test_node_quota_domu_stops_at_1000_with_enospc() {
    // Arrange: the home node already counts.
    let (xs, mut g) = domu(Quotas::default(), 5);
    assert_eq!(xs.domain_node_count(5), 1);
    // Act: 50 children per directory, so no node's record reaches the entry size.
    let mut i = 0;
    let err = loop {
        if let Err(e) = g.write(&format!("g{}/n{}", i / 50, i % 50), b"") {
            break e;
        }
        i += 1;
        assert!(i < 2000, "quota never hit");
    };
    // Assert
    assert_eq!(err, "ENOSPC");
    assert_eq!(xs.domain_node_count(5), 1000);
    // Removing one frees one.
    g.rm("g0/n0").unwrap();
    assert_eq!(xs.domain_node_count(5), 999);
    assert!(g.write("g0/n0", b"").is_ok());
    assert_eq!(g.write("g0/n1000", b"").unwrap_err(), "ENOSPC");
}

#[test]
fn test_node_quota_nested_create_is_all_or_nothing() {
    let q = Quotas {
        nodes_per_domain: 3,
        ..Quotas::default()
    };
    let (xs, mut g) = domu(q, 5);
    assert_eq!(g.write("a/b/c", b"").unwrap_err(), "ENOSPC");
    assert_eq!(g.read("a").unwrap_err(), "ENOENT");
    assert_eq!(xs.domain_node_count(5), 1);
}

#[test]
fn test_node_quota_dom0_is_exempt() {
    let q = Quotas {
        nodes_per_domain: 2,
        ..Quotas::default()
    };
    let xs = Xenstored::new(q);
    let mut c = Client::new(xs.connect_as(0).unwrap());
    for i in 0..10 {
        c.write(&format!("/x/{i}"), b"").unwrap();
    }
}

#[test]
fn test_entry_size_quota_domu_value_2048_is_enospc() {
    let (_xs, mut g) = domu(Quotas::default(), 5);
    assert!(g.write("small", &[b'a'; 1000]).is_ok());
    // 24-byte header + 8 per permission + value: 2000 fits, 2048 does not.
    assert!(g.write("fits", &[b'a'; 2000]).is_ok());
    assert_eq!(g.write("big", &[b'a'; 2048]).unwrap_err(), "ENOSPC");
    assert_eq!(g.write("small", &[b'a'; 2048]).unwrap_err(), "ENOSPC");
    assert_eq!(g.read("small").unwrap().len(), 1000);
}

#[test]
fn test_entry_size_quota_counts_child_names_of_parent() {
    // cxenstored charges a node's child names to its record: a domU directory of many
    // children stops growing before the node quota.
    let (_xs, mut g) = domu(Quotas::default(), 5);
    let mut n = 0;
    let err = loop {
        if let Err(e) = g.write(&format!("c{n:04}"), b"") {
            break e;
        }
        n += 1;
    };
    assert_eq!(err, "ENOSPC");
    // 24 + 8 (one permission) + 6 bytes per name < 2048.
    assert_eq!(n, (2048 - 32 - 1) / 6);
}

#[test]
fn test_entry_size_quota_dom0_is_exempt() {
    let xs = Xenstored::new(Quotas::default());
    let mut c = Client::new(xs.connect_as(0).unwrap());
    assert!(c.write("/big", &[b'a'; 4000]).is_ok());
    assert_eq!(c.read("/big").unwrap().len(), 4000);
}

#[test]
fn test_watch_quota_domu_129_then_e2big() {
    let (_xs, mut g) = domu(Quotas::default(), 5);
    // cxenstored checks `count > quota` before adding: 129 fit with quota 128.
    for i in 0..129 {
        g.watch(&format!("w{i}"), "t").unwrap();
    }
    assert_eq!(g.watch("one-too-many", "t").unwrap_err(), "E2BIG");
    g.unwatch("w0", "t").unwrap();
    assert!(g.watch("one-too-many", "t").is_ok());
}

#[test]
fn test_perms_per_node_quota_domu_six_entries_is_enospc() {
    let (_xs, mut g) = domu(Quotas::default(), 5);
    g.write("p", b"").unwrap();
    assert!(g.set_perms("p", &["n5", "r1", "r2", "r3", "r4"]).is_ok());
    assert_eq!(
        g.set_perms("p", &["n5", "r1", "r2", "r3", "r4", "r6"])
            .unwrap_err(),
        "ENOSPC"
    );
}

#[test]
fn test_path_quota_relative_2048_ok_2049_einval() {
    let (_xs, mut g) = domu(Quotas::default(), 5);
    // 2048 bytes in 100-byte components (a 2048-byte child name would hit the parent's
    // entry-size quota first).
    let comp = "a".repeat(99);
    let mut ok = vec![comp.as_str(); 20].join("/");
    ok.push('/');
    ok.push_str(&"b".repeat(2048 - ok.len()));
    assert_eq!(ok.len(), 2048);
    let bad = format!("{ok}c");
    assert!(g.write(&ok, b"").is_ok());
    assert_eq!(g.write(&bad, b"").unwrap_err(), "EINVAL");
    assert_eq!(g.read(&bad).unwrap_err(), "EINVAL");
    assert_eq!(g.watch(&bad, "t").unwrap_err(), "EINVAL");
}

#[test]
fn test_configured_quotas_apply() {
    let q = Quotas {
        watches_per_domain: 1,
        transactions_per_conn: 0,
        ..Quotas::default()
    };
    let (_xs, mut g) = domu(q, 5);
    g.watch("a", "t").unwrap();
    g.watch("b", "t").unwrap();
    assert_eq!(g.watch("c", "t").unwrap_err(), "E2BIG");
    g.tx_start().unwrap();
    assert_eq!(g.tx_start().unwrap_err(), "ENOSPC");
    assert_eq!(
        g.req(msg::XS_GET_DOMAIN_PATH, 0, &[b"x"]).unwrap_err(),
        "EINVAL"
    );
}

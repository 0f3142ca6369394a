//! One regression test per server-side row of THREATS.md section 4 (xenstore), named
//! after its XSA.

mod xenstored_common;

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use xen::abi::xs_wire::{msg, XsdSockmsg};
use xenbus::wire::{Message, WireError};
use xensim::xenstored::{Quotas, Xenstored};
use xenstored_common::{ev, Client};
use zerocopy::IntoBytes;

/// How long a write may make no progress before we look at whether the server stopped
/// reading.
const STALL: std::time::Duration = std::time::Duration::from_millis(500);

/// Writes the requests `make(0)`, `make(1)`, ... without reading any reply, until the
/// server has stopped reading: a write makes no progress and the server holds the
/// outstanding-request quota of replies. Returns how many requests were (at least
/// partly) sent and the unsent rest of the last one.
fn send_until_stalled(
    xs: &Xenstored,
    domid: u16,
    s: &mut UnixStream,
    max: u32,
    make: impl Fn(u32) -> Vec<u8>,
) -> (u32, Vec<u8>) {
    let limit = xs.quotas().outstanding_requests;
    s.set_write_timeout(Some(STALL)).unwrap();
    let mut sent = 0;
    while sent < max {
        let bytes = make(sent);
        let mut off = 0;
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(n) => off += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if xs.queued_output(domid).replies >= limit {
                        s.set_write_timeout(None).unwrap();
                        return if off > 0 {
                            (sent + 1, bytes[off..].to_vec())
                        } else {
                            (sent, Vec::new())
                        };
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        sent += 1;
    }
    s.set_write_timeout(None).unwrap();
    (sent, Vec::new())
}

fn server(q: Quotas, domus: &[u16]) -> (Arc<Xenstored>, Client) {
    let xs = Xenstored::new(q);
    for d in domus {
        xs.introduce_domain(*d);
        xs.create_domain_home(*d).unwrap();
    }
    let c = Client::new(xs.connect_as(0).unwrap());
    (xs, c)
}

fn header(type_: u32, len: u32) -> Vec<u8> {
    XsdSockmsg {
        type_,
        req_id: 1,
        tx_id: 0,
        len,
    }
    .as_bytes()
    .to_vec()
}

fn expect_closed(c: &mut Client) {
    match c.recv() {
        Err(WireError::Closed { .. }) => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

#[test]
fn test_xsa72_oversized_len_drops_connection() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (xs, mut other) = server(Quotas::default(), &[5]);
    let l = xs.listen(dir.path().join("s")).unwrap();
    let mut d0 = Client::new(UnixStream::connect(l.path()).unwrap());
    let mut g = Client::new(xs.connect_as(5).unwrap());
    other.sync();
    // Act: a header announcing 4 GiB, and nothing after it.
    d0.s.write_all(&header(msg::XS_READ, 0xffff_ffff)).unwrap();
    g.s.write_all(&header(msg::XS_WRITE, 4097)).unwrap();
    // Assert
    expect_closed(&mut d0);
    expect_closed(&mut g);
    assert!(other.read("/tool").is_ok(), "other clients are unaffected");
}

#[test]
fn test_xsa72_reply_over_4096_is_e2big() {
    let (xs, mut c) = server(Quotas::default(), &[]);
    for i in 0..100 {
        xs.mkdir(0, &format!("/wide/{i:03}-{}", "n".repeat(60)))
            .unwrap();
    }
    assert_eq!(c.directory("/wide").unwrap_err(), "E2BIG");
    assert!(c.read("/wide").is_ok());
}

#[test]
fn test_xsa206_transaction_retried_under_churn_commits() {
    // Arrange: another connection rewrites the node the transaction reads.
    let (xs, mut c) = server(Quotas::default(), &[]);
    c.write("/backend/x", b"0").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut churn = Client::new(xs.connect_as(0).unwrap());
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            churn.write("/backend/x", i.to_string().as_bytes()).unwrap();
            i += 1;
        }
        i
    });
    // Act: the toolstack's retry loop.
    let mut attempts = 0;
    let committed = loop {
        attempts += 1;
        let tx = c.tx_start().unwrap();
        let v = c.read_tx(tx, "/backend/x").unwrap();
        c.write_tx(tx, "/backend/y", &v).unwrap();
        match c.tx_end(tx, true) {
            Ok(_) => break true,
            Err(e) if e == "EAGAIN" && attempts < 10_000 => continue,
            Err(_) => break false,
        }
    };
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    // Assert
    assert!(
        committed,
        "the transaction committed after {attempts} attempts"
    );
    assert!(c.read("/backend/y").is_ok());
}

#[test]
fn test_xsa115_domu_watching_root_sees_nothing_from_other_domains() {
    // Arrange
    let (xs, mut c0) = server(Quotas::default(), &[5, 6]);
    let mut g5 = Client::new(xs.connect_as(5).unwrap());
    let mut g6 = Client::new(xs.connect_as(6).unwrap());
    g5.watch("/", "all").unwrap();
    assert_eq!(g5.drain_events(), [ev("/", "all")]);
    // Act
    g6.write("secret", b"1").unwrap();
    c0.write("/local/domain/6/by-dom0", b"1").unwrap();
    c0.write("/tool/x", b"1").unwrap();
    xs.introduce_domain(7);
    g5.write("mine", b"1").unwrap();
    // Assert: only its own node.
    assert_eq!(g5.drain_events(), [ev("/local/domain/5/mine", "all")]);
}

#[test]
fn test_xsa115_domu_introduce_domain_watch_gets_no_events() {
    let (xs, _c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.watch("@introduceDomain", "i").unwrap();
    g.drain_events();
    xs.introduce_domain(8);
    assert!(g.drain_events().is_empty());
}

#[test]
fn test_xsa322_recreated_domid_inherits_nothing() {
    // Arrange: domain 5 owns nodes and an exception elsewhere, then dies without the
    // toolstack cleaning up.
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.write("device/vif/0/state", b"4").unwrap();
    c0.write("/shared", b"s").unwrap();
    c0.set_perms("/shared", &["n0", "b5"]).unwrap();
    assert_eq!(xs.domain_node_count(5), 5);
    // Act
    assert!(xs.release_domain(5));
    expect_closed(&mut g);
    xs.introduce_domain(5);
    let mut g2 = Client::new(xs.connect_as(5).unwrap());
    // Assert
    assert_eq!(xs.domain_node_count(5), 0);
    assert_eq!(g2.read("device/vif/0/state").unwrap_err(), "EACCES");
    assert_eq!(g2.read("/shared").unwrap_err(), "EACCES");
    assert_eq!(c0.get_perms("/shared").unwrap(), ["n0"]);
    assert_eq!(
        c0.get_perms("/local/domain/5/device").unwrap(),
        ["n0"],
        "the dead domain's nodes now belong to dom0"
    );
}

#[test]
fn test_xsa323_relative_path_limits_checked_on_canonical_path() {
    let (xs, _c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    let comp = "p".repeat(99);
    let mut ok = vec![comp.as_str(); 20].join("/");
    ok.push('/');
    ok.push_str(&"q".repeat(2048 - ok.len()));
    assert!(g.write(&ok, b"").is_ok());
    assert_eq!(g.write(&format!("{ok}q"), b"").unwrap_err(), "EINVAL");
    // The absolute form of the same nodes obeys the same limit.
    assert!(g.read(&format!("/local/domain/5/{ok}")).is_ok());
    assert_eq!(
        g.read(&format!("/local/domain/5/{ok}q")).unwrap_err(),
        "EINVAL"
    );
}

#[test]
fn test_xsa324_huge_token_event_is_dropped_connection_survives() {
    // Arrange
    let (_xs, mut c) = server(Quotas::default(), &[]);
    let token = "t".repeat(4000);
    c.watch("/w", &token).unwrap();
    assert_eq!(c.drain_events(), [ev("/w", &token)]);
    // Act: path + token exceed the payload limit.
    c.write(&format!("/w/{}", "x".repeat(200)), b"").unwrap();
    c.write("/w", b"short path still fits").unwrap();
    // Assert
    assert_eq!(c.drain_events(), [ev("/w", &token)]);
}

#[test]
fn test_xsa325_release_with_half_sent_request_cleans_up() {
    // Arrange
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.watch("@releaseDomain", "r").unwrap();
    g.drain_events();
    let before = xs.connection_count();
    g.s.write_all(&header(msg::XS_WRITE, 100)[..10]).unwrap();
    // Act
    assert!(xs.release_domain(5));
    // Assert
    expect_closed(&mut g);
    assert_eq!(xs.connection_count(), before - 1);
    assert!(c0.read("/tool").is_ok());
    assert!(!xs.is_domain_introduced(5));
}

#[test]
fn test_xsa326_unread_replies_stay_bounded() {
    // Arrange
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    // Act: requests without reading a single reply, until the server stops reading.
    let (sent, rest) = send_until_stalled(&xs, 5, &mut g.s, 100_000, |i| {
        let mut p = b"x\0".to_vec();
        p.extend_from_slice(i.to_string().as_bytes());
        Message {
            type_: msg::XS_WRITE,
            req_id: i,
            tx_id: 0,
            payload: p,
        }
        .encode()
        .unwrap()
    });
    // Assert: the client was stopped, the server holds at most the quota of replies,
    // and it has not processed everything sent.
    assert!(sent < 100_000, "the server kept reading");
    let q = xs.queued_output(5);
    assert_eq!(
        q.replies, 20,
        "exactly the outstanding-request quota is held: {q:?}"
    );
    let done: u32 = String::from_utf8(c0.read("/local/domain/5/x").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert!(done + 1 < sent, "processed {done} of {sent}");
    assert!(
        c0.write("/tool/other", b"fine").is_ok(),
        "others are served"
    );
    // The client reads again: every request is answered, in order.
    // The rest of a partly sent request goes out while we read (the server reads
    // again only once we do).
    let mut w = g.s.try_clone().unwrap();
    let finish = std::thread::spawn(move || w.write_all(&rest));
    for i in 0..sent {
        let m = g.recv().unwrap();
        assert_eq!((m.type_, m.req_id), (msg::XS_WRITE, i));
    }
    finish.join().unwrap().unwrap();
    let last = (sent - 1).to_string();
    assert_eq!(c0.read("/local/domain/5/x").unwrap(), last.as_bytes());
}

#[test]
fn test_xsa326_watch_event_flood_is_bounded_by_dropping_events() {
    // Arrange: a small event budget, and a watcher that does not read.
    let q = Quotas {
        event_queue_bytes: 8192,
        ..Quotas::default()
    };
    let (xs, _c0) = server(q, &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    assert_eq!(g.watch("", "t").unwrap_err(), "EINVAL");
    g.watch("flood", "t").unwrap();
    g.drain_events();
    // Act: many distinct changes, plus many identical ones.
    for i in 0..20_000 {
        xs.write(
            0,
            &format!("/local/domain/5/flood/{}/{}", i / 100, i % 100),
            b"",
        )
        .unwrap();
    }
    for _ in 0..1000 {
        xs.write(0, "/local/domain/5/flood/0/0", b"same").unwrap();
    }
    // Assert
    let q = xs.queued_output(5);
    assert!(q.event_bytes <= 8192, "{q:?}");
    assert!(xs.dropped_events(5) > 0);
    let got = g.drain_events();
    assert!(!got.is_empty() && got.len() < 21_000, "{}", got.len());
    xs.write(0, "/local/domain/5/flood/after", b"").unwrap();
    assert_eq!(g.drain_events(), [ev("flood/after", "t")], "still served");
}

#[test]
fn test_xsa326_watch_on_deleted_subtree_flood_is_bounded() {
    let q = Quotas {
        event_queue_bytes: 4096,
        ..Quotas::default()
    };
    let (xs, _c0) = server(q, &[]);
    for i in 0..2000 {
        xs.write(0, &format!("/sub/{}/{}", i / 50, i % 50), b"")
            .unwrap();
    }
    let mut w = Client::new(xs.connect_as(0).unwrap());
    for i in 0..40 {
        w.watch(&format!("/sub/{i}"), "t").unwrap();
    }
    w.watch("/sub", "top").unwrap();
    w.drain_events();
    xs.rm(0, "/sub").unwrap();
    assert!(xs.queued_output(0).event_bytes <= 4096);
    let evs = w.drain_events();
    assert_eq!(evs.len(), 41);
    assert_eq!(evs.last().unwrap(), &ev("/sub", "top"));
}

#[test]
fn test_xsa414_quota_hit_during_nested_create_in_transaction_fails_commit() {
    // Arrange: room for exactly one more node.
    let q = Quotas {
        nodes_per_domain: 3,
        ..Quotas::default()
    };
    let (xs, _c0) = server(q, &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.write("one", b"").unwrap();
    let tx = g.tx_start().unwrap();
    // Act
    let w = g.write_tx(tx, "a/b/c", b"");
    let end = g.tx_end(tx, true);
    // Assert
    assert_eq!(w.unwrap_err(), "ENOSPC");
    assert_eq!(end.unwrap_err(), "ENOMEM");
    assert_eq!(g.read("a").unwrap_err(), "ENOENT");
    assert_eq!(xs.domain_node_count(5), 2);
}

#[test]
fn test_xsa416_unread_large_replies_stay_bounded() {
    // Arrange: a readable directory whose listing is about 3 KiB.
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    for i in 0..100 {
        c0.mkdir(&format!("/big/{i:03}-{}", "n".repeat(25)))
            .unwrap();
    }
    c0.set_perms("/big", &["r0"]).unwrap();
    let expected = c0.req(msg::XS_DIRECTORY, 0, &[b"/big"]).unwrap();
    let mut g = Client::new(xs.connect_as(5).unwrap());
    let req = Message::with_strings(msg::XS_DIRECTORY, 0, 0, &[b"/big"])
        .encode()
        .unwrap();
    // Act
    let (sent, rest) = send_until_stalled(&xs, 5, &mut g.s, 10_000, |_| req.clone());
    // Assert
    assert!(sent < 10_000, "the server kept reading");
    assert!(xs.queued_output(5).replies <= 20);
    // The rest of a partly sent request goes out while we read (the server reads
    // again only once we do).
    let mut w = g.s.try_clone().unwrap();
    let finish = std::thread::spawn(move || w.write_all(&rest));
    for _ in 0..sent {
        assert_eq!(g.recv().unwrap().payload, expected);
    }
    finish.join().unwrap().unwrap();
}

#[test]
fn test_xsa418_deep_tree_delete_root() {
    // Arrange: a 1000-deep path.
    let (xs, mut c) = server(Quotas::default(), &[]);
    let before = xs.node_count();
    let deep = format!("/deep{}", "/a".repeat(999));
    c.write(&deep, b"bottom").unwrap();
    assert_eq!(xs.node_count(), before + 1000);
    c.watch(&deep, "bottom").unwrap();
    c.drain_events();
    // Act
    c.rm("/deep").unwrap();
    // Assert
    assert_eq!(xs.node_count(), before);
    assert_eq!(c.drain_events(), [ev(&deep, "bottom")]);
    assert_eq!(c.read("/deep").unwrap_err(), "ENOENT");
}

#[test]
fn test_xsa420_negative_len_drops_connection() {
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.s.write_all(&header(msg::XS_WRITE, 0x8000_0000)).unwrap();
    expect_closed(&mut g);
    assert!(c0.read("/tool").is_ok());
}

#[test]
fn test_xsa421_create_and_delete_in_one_transaction_keeps_quota() {
    let (xs, _c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    let before = xs.domain_node_count(5);
    let tx = g.tx_start().unwrap();
    g.write_tx(tx, "tmp/a/b", b"").unwrap();
    g.rm_tx(tx, "tmp").unwrap();
    g.tx_end(tx, true).unwrap();
    assert_eq!(xs.domain_node_count(5), before);
    assert_eq!(g.read("tmp").unwrap_err(), "ENOENT");
}

#[test]
fn test_xsa425_reconnect_mid_request_cleans_up() {
    // Arrange
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.watch("x", "t").unwrap();
    g.drain_events();
    let before = xs.connection_count();
    // Act: half a request, then the guest's side goes away.
    g.s.write_all(&header(msg::XS_WRITE, 50)).unwrap();
    g.s.write_all(b"partial").unwrap();
    g.s.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut g);
    let mut g2 = Client::new(xs.connect_as(5).unwrap());
    // Assert
    assert_eq!(xs.connection_count(), before);
    assert!(g2.write("x", b"fresh").is_ok());
    assert_eq!(g2.read("x").unwrap(), b"fresh");
    assert!(c0.read("/tool").is_ok());
}

#[test]
fn test_xsa481_path_local_domain_slash_is_einval() {
    let (xs, mut c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    for c in [&mut c0, &mut g] {
        assert_eq!(c.read("/local/domain/").unwrap_err(), "EINVAL");
        assert_eq!(c.write("/local/domain/", b"x").unwrap_err(), "EINVAL");
        assert_eq!(c.rm("/local/domain/").unwrap_err(), "EINVAL");
        assert_eq!(c.directory("/local/domain/").unwrap_err(), "EINVAL");
        assert_eq!(c.watch("/local/domain/", "t").unwrap_err(), "EINVAL");
        assert_eq!(
            c.set_perms("/local/domain/", &["n0"]).unwrap_err(),
            "EINVAL"
        );
    }
    assert!(c0.read("/tool").is_ok());
}

#[test]
fn test_xsa484_reset_watches_inside_transaction_is_einval() {
    let (_xs, mut c) = server(Quotas::default(), &[]);
    c.watch("/w", "t").unwrap();
    let tx = c.tx_start().unwrap();
    c.write_tx(tx, "/in-tx", b"1").unwrap();
    // Act
    let r = c.req(msg::XS_RESET_WATCHES, tx, &[b""]);
    // Assert: refused, and the transaction is intact.
    assert_eq!(r.unwrap_err(), "EINVAL");
    assert!(c.tx_end(tx, true).is_ok());
    assert_eq!(c.read("/in-tx").unwrap(), b"1");
    c.drain_events();
    c.write("/w", b"still watched").unwrap();
    assert_eq!(c.drain_events(), [ev("/w", "t")]);
}

#[test]
fn test_xsa330_reset_watches_releases_watch_quota() {
    let (xs, _c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    for i in 0..129 {
        g.watch(&format!("w{i}"), "t").unwrap();
    }
    assert_eq!(g.watch("x", "t").unwrap_err(), "E2BIG");
    g.req(msg::XS_RESET_WATCHES, 0, &[b""]).unwrap();
    for i in 0..129 {
        g.watch(&format!("v{i}"), "t").unwrap();
    }
}

#[test]
fn test_xsa352_domu_cannot_make_another_domain_owner() {
    let (xs, mut c0) = server(Quotas::default(), &[5, 6]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    g.write("gift", b"").unwrap();
    assert_eq!(g.set_perms("gift", &["b6"]).unwrap_err(), "EPERM");
    assert_eq!(c0.get_perms("/local/domain/5/gift").unwrap(), ["n5"]);
    assert_eq!(xs.domain_node_count(6), 1);
}

#[test]
fn test_xsa353_root_node_is_permission_checked() {
    let (xs, _c0) = server(Quotas::default(), &[5]);
    let mut g = Client::new(xs.connect_as(5).unwrap());
    assert_eq!(g.read("/").unwrap_err(), "EACCES");
    assert_eq!(g.directory("/").unwrap_err(), "EACCES");
    assert_eq!(g.write("/newtop", b"").unwrap_err(), "EACCES");
    assert_eq!(g.set_perms("/", &["b5"]).unwrap_err(), "EACCES");
    assert_eq!(g.rm("/tool").unwrap_err(), "EACCES");
}

#[test]
fn test_xsa326_stale_watch_events_are_dropped_after_timeout() {
    // Arrange: every queued event is already older than the timeout when sent.
    let q = Quotas {
        watch_event_timeout: std::time::Duration::ZERO,
        ..Quotas::default()
    };
    let (xs, mut c) = server(q, &[]);
    c.watch("/stale", "t").unwrap();
    // Act
    xs.write(0, "/stale", b"1").unwrap();
    let evs = c.drain_events();
    // Assert: replies still flow, events are dropped and counted.
    assert!(evs.is_empty(), "{evs:?}");
    assert!(xs.dropped_events(0) >= 2);
    assert_eq!(c.read("/stale").unwrap(), b"1");
}

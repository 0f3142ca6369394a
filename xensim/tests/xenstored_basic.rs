//! Basic operations over the socket: read, write, mkdir, rm, directory, paths, and
//! watches.

mod xenstored_common;

use std::os::unix::net::UnixStream;

use xen::abi::xs_wire::msg;
use xensim::xenstored::{Quotas, Xenstored};
use xenstored_common::{ev, Client};

fn dom0() -> (std::sync::Arc<Xenstored>, Client) {
    let xs = Xenstored::new(Quotas::default());
    let c = Client::new(xs.connect_as(0).unwrap());
    (xs, c)
}

#[test]
fn test_listen_socket_connection_is_dom0_and_can_write() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket");
    let xs = Xenstored::new(Quotas::default());
    let _l = xs.listen(&path).unwrap();
    let mut c = Client::new(UnixStream::connect(&path).unwrap());
    // Act
    let w = c.write("/vm/x", b"hello");
    // Assert
    assert_eq!(w, Ok(b"OK\0".to_vec()));
    assert_eq!(c.read("/vm/x"), Ok(b"hello".to_vec()));
    assert_eq!(xs.read(0, "/vm/x").unwrap(), b"hello");
}

#[test]
fn test_write_then_read_returns_value_without_nul() {
    let (_xs, mut c) = dom0();
    c.write("/a/b", b"v\0w").unwrap();
    assert_eq!(c.read("/a/b").unwrap(), b"v\0w");
    assert_eq!(c.read("/a").unwrap(), b"");
}

#[test]
fn test_read_missing_node_is_enoent() {
    let (_xs, mut c) = dom0();
    assert_eq!(c.read("/nope").unwrap_err(), "ENOENT");
}

#[test]
fn test_directory_lists_children_in_creation_order() {
    let (_xs, mut c) = dom0();
    c.write("/d/zeta", b"").unwrap();
    c.write("/d/alpha", b"").unwrap();
    c.mkdir("/d/mid").unwrap();
    assert_eq!(c.directory("/d").unwrap(), ["zeta", "alpha", "mid"]);
    assert_eq!(c.directory("/").unwrap(), ["tool", "d"]);
}

#[test]
fn test_mkdir_existing_node_is_ok_and_keeps_value() {
    let (_xs, mut c) = dom0();
    c.write("/m", b"keep").unwrap();
    assert!(c.mkdir("/m").is_ok());
    assert_eq!(c.read("/m").unwrap(), b"keep");
}

#[test]
fn test_rm_removes_subtree_and_missing_child_of_existing_parent_is_ok() {
    let (_xs, mut c) = dom0();
    c.write("/r/a/b/c", b"x").unwrap();
    c.rm("/r/a").unwrap();
    assert_eq!(c.read("/r/a/b/c").unwrap_err(), "ENOENT");
    assert_eq!(c.directory("/r").unwrap(), Vec::<String>::new());
    assert!(c.rm("/r/never").is_ok());
    assert_eq!(c.rm("/r/never/deeper").unwrap_err(), "ENOENT");
    assert_eq!(c.rm("/").unwrap_err(), "EINVAL");
}

#[test]
fn test_invalid_paths_are_einval() {
    let (_xs, mut c) = dom0();
    for p in ["/a/", "/a//b", "/a b", "/a.b", "/local/domain/", ""] {
        assert_eq!(c.write(p, b"x").unwrap_err(), "EINVAL", "{p:?}");
    }
    let long = format!("/{}", "a".repeat(2048));
    assert_eq!(c.write(&long, b"x").unwrap_err(), "EINVAL");
}

#[test]
fn test_payload_without_nul_is_einval() {
    let (_xs, mut c) = dom0();
    assert_eq!(
        c.req_payload(msg::XS_READ, 0, b"/tool".to_vec())
            .unwrap_err(),
        "EINVAL"
    );
    assert_eq!(
        c.req_payload(msg::XS_READ, 0, b"/tool\0/x\0".to_vec())
            .unwrap_err(),
        "EINVAL"
    );
}

#[test]
fn test_unknown_message_type_is_einval_and_echoes_ids() {
    let (_xs, mut c) = dom0();
    let m = c.raw(999, 0, b"x\0".to_vec());
    assert_eq!(m.type_, msg::XS_ERROR);
    assert_eq!(m.payload, b"EINVAL\0");
    let m = c.raw(msg::XS_WATCH_EVENT, 0, b"x\0y\0".to_vec());
    assert_eq!(m.payload, b"EINVAL\0");
}

#[test]
fn test_relative_paths_resolve_to_domain_home() {
    // Arrange
    let (xs, mut c0) = dom0();
    xs.introduce_domain(3);
    xs.create_domain_home(3).unwrap();
    let mut g = Client::new(xs.connect_as(3).unwrap());
    // Act
    g.write("data/x", b"1").unwrap();
    // Assert
    assert_eq!(c0.read("/local/domain/3/data/x").unwrap(), b"1");
    assert_eq!(g.read("data/x").unwrap(), b"1");
    assert_eq!(
        g.req(msg::XS_GET_DOMAIN_PATH, 0, &[b"3"]).unwrap(),
        b"/local/domain/3\0"
    );
}

#[test]
fn test_directory_part_pages_with_generation_and_terminator() {
    // Arrange: enough children that the list does not fit in one reply.
    let (xs, mut c) = dom0();
    let name = |i: usize| format!("child-{i:04}-{}", "x".repeat(40));
    for i in 0..150 {
        xs.mkdir(0, &format!("/big/{}", name(i))).unwrap();
    }
    assert_eq!(c.directory("/big").unwrap_err(), "E2BIG");
    // Act
    let mut names = Vec::new();
    let mut off = 0usize;
    let mut gens = Vec::new();
    loop {
        let p = c
            .req(
                msg::XS_DIRECTORY_PART,
                0,
                &[b"/big", off.to_string().as_bytes()],
            )
            .unwrap();
        assert!(p.len() <= 4096);
        let gen_end = p.iter().position(|b| *b == 0).unwrap();
        gens.push(p[..gen_end].to_vec());
        let body = &p[gen_end + 1..];
        let done = body.ends_with(b"\0\0") || body == b"\0";
        let list = if done { &body[..body.len() - 1] } else { body };
        off += list.len();
        names.extend(
            xenbus::wire::split_nul(list)
                .into_iter()
                .map(|s| String::from_utf8_lossy(s).into_owned()),
        );
        if done {
            break;
        }
    }
    // Assert
    assert_eq!(names.len(), 150);
    assert_eq!(names[0], name(0));
    assert_eq!(names[149], name(149));
    assert!(gens.windows(2).all(|w| w[0] == w[1]), "same generation");
    let past = c
        .req(msg::XS_DIRECTORY_PART, 0, &[b"/big", b"999999"])
        .unwrap();
    assert_eq!(past, [gens[0].clone(), vec![0, 0]].concat());
}

#[test]
fn test_watch_fires_on_registration_and_changes_below() {
    // Arrange
    let (xs, mut w) = dom0();
    w.watch("/w", "tok").unwrap();
    assert_eq!(w.next_event(), ev("/w", "tok"));
    // Act
    xs.write(0, "/w/a", b"1").unwrap();
    xs.write(0, "/w", b"2").unwrap();
    xs.write(0, "/other", b"3").unwrap();
    xs.write(0, "/wx", b"3").unwrap();
    // Assert
    assert_eq!(w.drain_events(), [ev("/w/a", "tok"), ev("/w", "tok")]);
}

#[test]
fn test_watch_reply_comes_before_its_events() {
    // Arrange
    let (_xs, mut c) = dom0();
    c.watch("/self", "t").unwrap();
    c.drain_events();
    // Act: our own write fires our watch; the reply must come first.
    let payload = b"/self/x\0v".to_vec();
    c.send(&xenbus::wire::Message {
        type_: msg::XS_WRITE,
        req_id: 77,
        tx_id: 0,
        payload,
    });
    let first = c.recv().unwrap();
    let second = c.recv().unwrap();
    // Assert
    assert_eq!((first.type_, first.req_id), (msg::XS_WRITE, 77));
    assert_eq!(second.type_, msg::XS_WATCH_EVENT);
    assert_eq!(second.payload, b"/self/x\0t\0");
}

#[test]
fn test_rm_fires_exact_child_watches_and_parent_watch_once() {
    // Arrange
    let (xs, mut w) = dom0();
    xs.write(0, "/p/c1/g", b"").unwrap();
    xs.write(0, "/p/c2", b"").unwrap();
    w.watch("/p", "parent").unwrap();
    w.watch("/p/c1/g", "grandchild").unwrap();
    w.watch("/p/c2/missing", "missing").unwrap();
    w.drain_events();
    // Act
    xs.rm(0, "/p").unwrap();
    // Assert
    let evs = w.drain_events();
    assert_eq!(evs, [ev("/p/c1/g", "grandchild"), ev("/p", "parent")]);
}

#[test]
fn test_relative_watch_reports_relative_paths() {
    let xs = Xenstored::new(Quotas::default());
    xs.introduce_domain(4);
    xs.create_domain_home(4).unwrap();
    let mut g = Client::new(xs.connect_as(4).unwrap());
    g.watch("device", "d").unwrap();
    assert_eq!(g.next_event(), ev("device", "d"));
    xs.write(0, "/local/domain/4/device/vif/0/state", b"1")
        .unwrap();
    assert_eq!(g.drain_events(), [ev("device/vif/0/state", "d")]);
}

#[test]
fn test_unwatch_stops_events_and_unknown_is_enoent() {
    let (xs, mut w) = dom0();
    w.watch("/u", "t").unwrap();
    w.unwatch("/u", "t").unwrap();
    w.drain_events();
    xs.write(0, "/u", b"1").unwrap();
    assert!(w.drain_events().is_empty());
    assert_eq!(w.unwatch("/u", "t").unwrap_err(), "ENOENT");
}

#[test]
fn test_duplicate_watch_is_eexist() {
    let (_xs, mut w) = dom0();
    w.watch("/dup", "t").unwrap();
    assert_eq!(w.watch("/dup", "t").unwrap_err(), "EEXIST");
    assert!(w.watch("/dup", "t2").is_ok());
}

#[test]
fn test_reset_watches_removes_all_watches() {
    let (xs, mut w) = dom0();
    w.watch("/r1", "a").unwrap();
    w.watch("/r2", "b").unwrap();
    w.req(msg::XS_RESET_WATCHES, 0, &[b""]).unwrap();
    w.drain_events();
    xs.write(0, "/r1", b"").unwrap();
    assert!(w.drain_events().is_empty());
}

#[test]
fn test_control_print_ok_other_einval() {
    let (_xs, mut c) = dom0();
    assert!(c.req(msg::XS_CONTROL, 0, &[b"print", b"hello"]).is_ok());
    assert_eq!(c.req(msg::XS_CONTROL, 0, &[b"quux"]).unwrap_err(), "EINVAL");
}

#[test]
fn test_in_process_api_round_trips() {
    let xs = Xenstored::new(Quotas::default());
    xs.write(0, "/h/a", b"1").unwrap();
    xs.mkdir(0, "/h/b").unwrap();
    assert_eq!(xs.directory(0, "/h").unwrap(), ["a", "b"]);
    assert_eq!(xs.read(0, "/h/a").unwrap(), b"1");
    xs.rm(0, "/h").unwrap();
    assert_eq!(
        xs.read(0, "/h/a").unwrap_err(),
        xensim::xenstored::XsError::NoEnt
    );
}

#[test]
fn test_connect_as_unintroduced_domain_is_not_found() {
    let xs = Xenstored::new(Quotas::default());
    let e = xs.connect_as(9).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(xs.introduce_domain(9));
    assert!(!xs.introduce_domain(9), "second introduction is a no-op");
    assert!(xs.connect_as(9).is_ok());
    assert!(xs.release_domain(9));
    assert!(!xs.release_domain(9));
    assert!(!xs.introduce_domain(0), "dom0 is always there");
}

#[test]
fn test_listener_drop_removes_socket_and_keeps_connections() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket");
    let xs = Xenstored::new(Quotas::default());
    let l = xs.listen(&path).unwrap();
    let mut c = Client::new(UnixStream::connect(&path).unwrap());
    // Act
    drop(l);
    // Assert
    assert!(!path.exists());
    assert!(UnixStream::connect(&path).is_err());
    assert!(c.read("/tool").is_ok());
}

#[test]
fn test_domain_requests_from_dom0() {
    let (xs, mut c) = dom0();
    assert_eq!(
        c.req(msg::XS_IS_DOMAIN_INTRODUCED, 0, &[b"7"]).unwrap(),
        b"F\0"
    );
    c.req(msg::XS_INTRODUCE, 0, &[b"7", b"12345", b"3"])
        .unwrap();
    assert!(xs.is_domain_introduced(7));
    assert_eq!(
        c.req(msg::XS_IS_DOMAIN_INTRODUCED, 0, &[b"7"]).unwrap(),
        b"T\0"
    );
    assert!(c.req(msg::XS_RESUME, 0, &[b"7"]).is_ok());
    c.req(msg::XS_RELEASE, 0, &[b"7"]).unwrap();
    assert!(!xs.is_domain_introduced(7));
    assert_eq!(c.req(msg::XS_RELEASE, 0, &[b"7"]).unwrap_err(), "ENOENT");
    assert_eq!(c.req(msg::XS_RESUME, 0, &[b"7"]).unwrap_err(), "ENOENT");
    assert_eq!(
        c.req(msg::XS_INTRODUCE, 0, &[b"7", b"1", b"0"])
            .unwrap_err(),
        "EINVAL"
    );
    assert_eq!(
        c.req(msg::XS_SET_TARGET, 0, &[b"7", b"8"]).unwrap_err(),
        "ENOENT"
    );
}

#[test]
fn test_close_all_connections_closes_clients_and_keeps_data() {
    let (xs, mut c) = dom0();
    c.write("/kept", b"1").unwrap();
    c.watch("/kept", "t").unwrap();
    c.drain_events();
    xs.close_all_connections();
    assert!(matches!(
        c.recv(),
        Err(xenbus::wire::WireError::Closed { .. })
    ));
    assert_eq!(xs.connection_count(), 0);
    assert_eq!(xs.read(0, "/kept").unwrap(), b"1");
}

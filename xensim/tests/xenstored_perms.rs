//! The permission model of docs/misc/xenstore.txt, as cxenstored 4.17 applies it.

mod xenstored_common;

use std::sync::Arc;

use xen::abi::xs_wire::msg;
use xensim::xenstored::{Quotas, Xenstored};
use xenstored_common::{ev, Client};

fn setup(domids: &[u16]) -> (Arc<Xenstored>, Client) {
    let xs = Xenstored::new(Quotas::default());
    for d in domids {
        xs.introduce_domain(*d);
        xs.create_domain_home(*d).unwrap();
    }
    let c = Client::new(xs.connect_as(0).unwrap());
    (xs, c)
}

fn guest(xs: &Arc<Xenstored>, d: u16) -> Client {
    Client::new(xs.connect_as(d).unwrap())
}

#[test]
fn test_domu_read_of_dom0_node_without_access_is_eacces() {
    let (xs, mut c0) = setup(&[5]);
    c0.write("/secret", b"s").unwrap();
    let mut g = guest(&xs, 5);
    assert_eq!(g.read("/secret").unwrap_err(), "EACCES");
    assert_eq!(g.write("/secret", b"x").unwrap_err(), "EACCES");
    assert_eq!(g.read("/").unwrap_err(), "EACCES");
}

#[test]
fn test_default_read_access_allows_read_but_not_write() {
    let (xs, mut c0) = setup(&[5]);
    c0.write("/pub", b"p").unwrap();
    c0.set_perms("/pub", &["r0"]).unwrap();
    let mut g = guest(&xs, 5);
    assert_eq!(g.read("/pub").unwrap(), b"p");
    assert_eq!(g.write("/pub", b"x").unwrap_err(), "EACCES");
    assert_eq!(g.set_perms("/pub", &["b0"]).unwrap_err(), "EACCES");
}

#[test]
fn test_exception_entry_grants_that_domain_only() {
    let (xs, mut c0) = setup(&[5, 6]);
    c0.write("/shared", b"v").unwrap();
    c0.set_perms("/shared", &["n0", "b5"]).unwrap();
    let mut g5 = guest(&xs, 5);
    let mut g6 = guest(&xs, 6);
    assert!(g5.write("/shared", b"w").is_ok());
    assert_eq!(g6.read("/shared").unwrap_err(), "EACCES");
    assert_eq!(c0.read("/shared").unwrap(), b"w");
}

#[test]
fn test_new_node_inherits_parent_perms_and_domu_becomes_owner() {
    // Arrange
    let (xs, mut c0) = setup(&[5]);
    c0.mkdir("/local/domain/5/dev").unwrap();
    c0.set_perms("/local/domain/5/dev", &["n5", "r0", "r7"])
        .unwrap();
    let mut g = guest(&xs, 5);
    // Act
    g.write("dev/a/b", b"1").unwrap();
    c0.write("/local/domain/5/dev/by0", b"2").unwrap();
    // Assert: domU-created nodes are its own; dom0-created nodes keep the parent's owner.
    assert_eq!(g.get_perms("dev/a").unwrap(), ["n5", "r0", "r7"]);
    assert_eq!(g.get_perms("dev/a/b").unwrap(), ["n5", "r0", "r7"]);
    assert_eq!(
        c0.get_perms("/local/domain/5/dev/by0").unwrap(),
        ["n5", "r0", "r7"]
    );
    c0.mkdir("/tool/x").unwrap();
    assert_eq!(c0.get_perms("/tool/x").unwrap(), ["n0"]);
}

#[test]
fn test_domu_create_under_readonly_parent_is_eacces() {
    let (xs, mut c0) = setup(&[5]);
    c0.mkdir("/ro").unwrap();
    c0.set_perms("/ro", &["r0"]).unwrap();
    let mut g = guest(&xs, 5);
    assert_eq!(g.write("/ro/new", b"x").unwrap_err(), "EACCES");
    assert_eq!(g.write("/ro/a/b", b"x").unwrap_err(), "EACCES");
}

#[test]
fn test_missing_node_is_enoent_only_if_nearest_ancestor_is_readable() {
    let (xs, mut c0) = setup(&[5]);
    c0.mkdir("/hidden").unwrap();
    let mut g = guest(&xs, 5);
    assert_eq!(g.read("/hidden/x").unwrap_err(), "EACCES");
    assert_eq!(g.read("/hidden/x/y/z").unwrap_err(), "EACCES");
    assert_eq!(g.read("nothing").unwrap_err(), "ENOENT");
}

#[test]
fn test_set_perms_by_non_owner_is_eacces_and_owner_change_by_domu_is_eperm() {
    let (xs, mut c0) = setup(&[5, 6]);
    let mut g5 = guest(&xs, 5);
    let mut g6 = guest(&xs, 6);
    g5.write("mine", b"").unwrap();
    c0.set_perms("/local/domain/5/mine", &["n5", "b6"]).unwrap();
    // 6 can write but does not own it.
    assert_eq!(
        g6.set_perms("/local/domain/5/mine", &["b6"]).unwrap_err(),
        "EACCES"
    );
    // The owner may change the access list but not give the node away (XSA-352 class).
    assert!(g5.set_perms("mine", &["r5", "b6"]).is_ok());
    assert_eq!(g5.set_perms("mine", &["n6"]).unwrap_err(), "EPERM");
    assert_eq!(c0.get_perms("/local/domain/5/mine").unwrap(), ["r5", "b6"]);
    // dom0 may.
    assert!(c0.set_perms("/local/domain/5/mine", &["n6"]).is_ok());
}

#[test]
fn test_set_perms_malformed_list_is_einval() {
    let (_xs, mut c0) = setup(&[]);
    c0.mkdir("/m").unwrap();
    assert_eq!(c0.set_perms("/m", &["x0"]).unwrap_err(), "EINVAL");
    assert_eq!(c0.set_perms("/m", &["r"]).unwrap_err(), "EINVAL");
    assert_eq!(c0.set_perms("/m", &[]).unwrap_err(), "EINVAL");
}

#[test]
fn test_set_target_gives_device_model_the_target_access() {
    // Arrange: 6 is a stub domain device model for 5.
    let (xs, mut c0) = setup(&[5, 6]);
    c0.write("/local/domain/5/private", b"p").unwrap();
    let mut g6 = guest(&xs, 6);
    assert_eq!(g6.read("/local/domain/5/private").unwrap_err(), "EACCES");
    // Act
    c0.req(msg::XS_SET_TARGET, 0, &[b"6", b"5"]).unwrap();
    // Assert
    assert_eq!(g6.read("/local/domain/5/private").unwrap(), b"p");
}

#[test]
fn test_privileged_requests_from_domu_are_eacces() {
    let (xs, _c0) = setup(&[5]);
    let mut g = guest(&xs, 5);
    for (t, parts) in [
        (msg::XS_INTRODUCE, vec![&b"9"[..], b"1", b"1"]),
        (msg::XS_RELEASE, vec![&b"5"[..]]),
        (msg::XS_SET_TARGET, vec![&b"5"[..], b"5"]),
        (msg::XS_RESUME, vec![&b"5"[..]]),
        (msg::XS_CONTROL, vec![&b"print"[..], b"x"]),
    ] {
        assert_eq!(g.req(t, 0, &parts).unwrap_err(), "EACCES", "type {t}");
    }
}

#[test]
fn test_watch_event_only_for_readable_nodes() {
    // Arrange
    let (xs, mut c0) = setup(&[5]);
    c0.mkdir("/data").unwrap();
    c0.set_perms("/data", &["r0"]).unwrap();
    let mut g = guest(&xs, 5);
    g.watch("/data", "t").unwrap();
    g.drain_events();
    // Act
    c0.write("/data/visible", b"").unwrap();
    c0.write("/data/hidden", b"").unwrap();
    c0.set_perms("/data/hidden", &["n0"]).unwrap();
    c0.mkdir("/data/hidden/deeper").unwrap();
    // Assert: hidden is still announced through its readable parent, deeper is not.
    // (An event identical to one still queued is dropped, so the two "hidden" events
    // may arrive as one.)
    let mut evs = g.drain_events();
    evs.dedup();
    assert_eq!(evs, [ev("/data/visible", "t"), ev("/data/hidden", "t")]);
}

#[test]
fn test_special_watches_fire_for_dom0_not_domu() {
    // Arrange
    let (xs, mut c0) = setup(&[5]);
    let mut g = guest(&xs, 5);
    c0.watch("@introduceDomain", "i").unwrap();
    c0.watch("@releaseDomain", "r").unwrap();
    g.watch("@introduceDomain", "i").unwrap();
    g.watch("@releaseDomain", "r").unwrap();
    c0.drain_events();
    assert_eq!(
        g.drain_events(),
        [ev("@introduceDomain", "i"), ev("@releaseDomain", "r")]
    );
    // Act
    xs.introduce_domain(9);
    xs.release_domain(9);
    // Assert
    assert_eq!(
        c0.drain_events(),
        [ev("@introduceDomain", "i"), ev("@releaseDomain", "r")]
    );
    assert!(g.drain_events().is_empty());
}

#[test]
fn test_special_node_perms_can_grant_domu_release_events() {
    let (xs, mut c0) = setup(&[5]);
    let mut g = guest(&xs, 5);
    g.watch("@releaseDomain", "r").unwrap();
    g.drain_events();
    c0.set_perms("@releaseDomain", &["n0", "r5"]).unwrap();
    assert_eq!(c0.get_perms("@releaseDomain").unwrap(), ["n0", "r5"]);
    assert_eq!(
        g.set_perms("@releaseDomain", &["r5"]).unwrap_err(),
        "EACCES"
    );
    xs.introduce_domain(9);
    xs.release_domain(9);
    assert_eq!(g.drain_events(), [ev("@releaseDomain", "r")]);
}

#[test]
fn test_set_perms_event_reaches_watchers_that_could_read_before() {
    // Arrange
    let (xs, mut c0) = setup(&[5]);
    c0.mkdir("/top").unwrap();
    c0.set_perms("/top", &["n0"]).unwrap();
    c0.write("/top/n", b"").unwrap();
    c0.set_perms("/top/n", &["r0"]).unwrap();
    let mut g = guest(&xs, 5);
    g.watch("/top/n", "t").unwrap();
    g.drain_events();
    // Act: revoke the read access the watcher had.
    c0.set_perms("/top/n", &["n0"]).unwrap();
    c0.write("/top/n", b"after").unwrap();
    // Assert: it hears about the revocation, not about what follows.
    assert_eq!(g.drain_events(), [ev("/top/n", "t")]);
}

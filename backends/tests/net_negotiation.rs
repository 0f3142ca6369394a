//! netback negotiation: every feature advertised, the toolstack's keys read, the frontend's
//! keys strictly checked (a bad value: an `error` node naming it, never Connected), shared and
//! split event channels, multi-queue, the control ring, and the `qnic` alias.

mod net_common;

use std::time::Duration;

use backends::net::engine::VirtioNetHdr;
use backends::net::{NetConfig, NetDriver};
use net_common::*;
use xen::XenHost;
use xenbus::backend::BackendWatcher;
use xenbus::{XenbusState, XsClient};
use xensim::client::SimHost;
use xensim::front::frame::FrameMeta;
use xensim::front::net::{NetFront, NetFrontOptions};
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::{DeviceSpec, VifNic};

#[test]
fn test_probe_advertises_every_linux_netback_feature() {
    let rig = rig(&[0]);
    let _f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    for (k, v) in [
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-gso-tcpv6", "1"),
        ("feature-ipv6-csum-offload", "1"),
        ("feature-rx-copy", "1"),
        ("feature-rx-flip", "0"),
        ("feature-split-event-channels", "1"),
        ("feature-ctrl-ring", "1"),
        ("feature-multicast-control", "1"),
        ("feature-dynamic-multicast-control", "1"),
        ("feature-xdp-headroom", "1"),
        ("hotplug-status", "connected"),
    ] {
        assert_eq!(rig.read_backend(0, k).as_deref(), Some(v), "{k}");
    }
    let max: u32 = rig
        .read_backend(0, "multi-queue-max-queues")
        .unwrap()
        .parse()
        .unwrap();
    assert!(max >= 1);
    assert_eq!(rig.backend_state(0), XenbusState::Connected);
}

#[test]
fn test_probe_reads_the_toolstack_keys() {
    let mut n = nic(0);
    n.bridge = Some("xenbr0".into());
    n.ip = Some("10.0.0.2 fd00::2".into());
    n.rate = Some((125_000, 50_000));
    n.mtu = 9000;
    let rig = rig_with(vec![n], NetConfig::default());
    let _f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let opened = rig.net.opened.lock().unwrap().clone();
    let (p, queues, offloads) = &opened[0];
    assert_eq!(p.mac, mac_of(0));
    assert_eq!(p.bridge.as_deref(), Some("xenbr0"));
    assert_eq!(p.ip.as_deref(), Some("10.0.0.2 fd00::2"));
    assert_eq!(p.mtu, 9000);
    assert_eq!(p.rate.unwrap().bytes, 125_000);
    assert_eq!(p.rate.unwrap().interval, Duration::from_micros(50_000));
    assert_eq!(p.tap_name(), format!("vif{}.0", rig.guest.domid()));
    assert_eq!(*queues, 1);
    assert!(offloads.csum && offloads.tso4 && offloads.tso6);
}

#[test]
fn test_frontend_without_offloads_gets_a_tap_without_them() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        csum_offload: false,
        gso: false,
        ..Default::default()
    };
    let _f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    let (_, _, o) = rig.net.opened.lock().unwrap()[0].clone();
    assert!(!o.csum && !o.tso4 && !o.tso6);
}

#[test]
fn test_shared_event_channel_works_like_split_ones() {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        split_event_channels: false,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    assert!(!f.split());
    let keys = f.negotiation_keys();
    assert!(keys.iter().any(|(k, _)| k == "event-channel"));
    let q = f.queue(0).unwrap();
    let frame = udp_frame(mac_of(0), [2; 6], 64, 0);
    assert!(q.send_frame(&frame, FrameMeta::default()).unwrap());
    rig.net.wait_frames("frame", |f| !f.is_empty());
    rig.net.inject(
        0,
        0,
        &VirtioNetHdr::default(),
        &udp_frame([2; 6], mac_of(0), 64, 1),
    );
    let mut buf = Vec::new();
    wait_for("rx", || {
        let got = q.recv_frame(&mut buf).unwrap();
        if got.is_none() {
            q.wait_event(Duration::from_millis(100)).unwrap();
        }
        got
    });
}

#[test]
fn test_multiqueue_keys_under_queue_n_open_one_engine_queue_each() {
    let cfg = NetConfig {
        max_queues: 4,
        ..Default::default()
    };
    let rig = rig_with(vec![nic(0)], cfg);
    let opts = NetFrontOptions {
        max_queues: 3,
        ..Default::default()
    };
    let mut f = NetFront::connect(&rig.guest, 0, opts).unwrap();
    assert_eq!(f.num_queues(), 3);
    let keys = f.negotiation_keys();
    assert!(keys
        .iter()
        .any(|(k, v)| k == "multi-queue-num-queues" && v == "3"));
    assert!(keys.iter().any(|(k, _)| k == "queue-2/event-channel-rx"));
    assert_eq!(rig.net.opened.lock().unwrap()[0].1, 3);
    // Each guest queue transmits through its own engine queue.
    for qi in 0..3 {
        let frame = udp_frame(mac_of(0), [2; 6], 64, qi as u8);
        assert!(f
            .queue(qi)
            .unwrap()
            .send_frame(&frame, FrameMeta::default())
            .unwrap());
        let got = rig
            .net
            .wait_frames("frame", |fs| fs.iter().any(|x| x.frame == frame));
        assert_eq!(got.iter().find(|x| x.frame == frame).unwrap().queue, qi);
    }
}

/// A frontend that writes hostile keys: the backend refuses with an error node naming the
/// key and never goes Connected.
fn refused(over: &[(&str, &str)], omit: &[&str], expect: &str) {
    let rig = rig(&[0]);
    let opts = NetFrontOptions {
        overrides: over
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        omit: omit.iter().map(|k| k.to_string()).collect(),
        timeout: T,
        ..Default::default()
    };
    let _f = NetFront::init(&rig.guest, 0, opts).unwrap();
    let e = rig.wait_error(0);
    assert!(e.contains(expect), "expected {expect:?} in {e:?}");
    wait_for("backend closing", || {
        matches!(
            rig.backend_state(0),
            XenbusState::Closing | XenbusState::Closed
        )
        .then_some(())
    });
    assert!(rig.wait_connected(0, false));
}

#[test]
fn test_bad_frontend_request_rx_copy_is_refused() {
    refused(&[("request-rx-copy", "0")], &[], "request-rx-copy");
    refused(&[], &["request-rx-copy"], "request-rx-copy");
    refused(&[("request-rx-copy", "yes")], &[], "request-rx-copy");
}

#[test]
fn test_missing_feature_rx_notify_is_refused() {
    refused(&[], &["feature-rx-notify"], "feature-rx-notify");
}

#[test]
fn test_bad_ring_refs_and_event_channels_are_refused() {
    refused(&[], &["tx-ring-ref"], "tx-ring-ref");
    refused(&[("rx-ring-ref", "-1")], &[], "rx-ring-ref");
    refused(&[("event-channel-tx", "0")], &[], "event-channel-tx");
    refused(&[], &["event-channel-rx"], "event-channel-tx and -rx");
    // A ring reference that is not granted to dom0.
    refused(&[("tx-ring-ref", "9999")], &[], "tx ring");
}

#[test]
fn test_bad_feature_flags_and_queue_counts_are_refused() {
    refused(&[("feature-sg", "2")], &[], "feature-sg");
    refused(&[("feature-gso-tcpv4", "on")], &[], "feature-gso-tcpv4");
    refused(
        &[("feature-no-csum-offload", " 1")],
        &[],
        "feature-no-csum-offload",
    );
    refused(
        &[("multi-queue-num-queues", "999")],
        &[],
        "multi-queue-num-queues",
    );
    refused(
        &[("multi-queue-num-queues", "0")],
        &[],
        "multi-queue-num-queues",
    );
    refused(&[("xdp-headroom", "4096")], &[], "xdp-headroom");
    refused(&[("ctrl-ring-ref", "5")], &[], "event-channel-ctrl");
}

#[test]
fn test_invalid_toolstack_mac_fails_hotplug_with_an_error() {
    let rig = rig_specs(NetConfig::default(), |domid| {
        let mut s = DeviceSpec::vif(domid, 0, &nic(0));
        for (k, v) in s.backend.iter_mut() {
            if k == "mac" {
                *v = "zz:zz".into();
            }
        }
        vec![s]
    });
    let e = rig.wait_error(0);
    assert!(e.contains("mac"), "{e}");
    assert!(rig.net.opened.lock().unwrap().is_empty());
}

#[test]
fn test_qnic_backend_type_serves_device_vif() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("g", 4096).unwrap();
    let ts = host.toolstack().unwrap();
    let n = VifNic {
        backend_type: "qnic".into(),
        ..nic(0)
    };
    ts.add_device(&DeviceSpec::vif(domid, 0, &n)).unwrap();
    let sim: std::sync::Arc<dyn XenHost> =
        std::sync::Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let xs = XsClient::new(sim.open_xenstore(&xen::XsTransport::Socket(None)).unwrap()).unwrap();
    let net = std::sync::Arc::new(HostNet::default());
    let driver = NetDriver::new(sim, "qnic", NetConfig::default(), factory(net.clone()));
    let _w = BackendWatcher::start(xs, driver.clone(), 0, u32::from(domid)).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    let mut f = NetFront::connect(&guest, 0, NetFrontOptions::default()).unwrap();
    assert!(f.link().backend().contains("/backend/qnic/"));
    let frame = udp_frame(mac_of(0), [2; 6], 64, 0);
    assert!(f
        .queue(0)
        .unwrap()
        .send_frame(&frame, FrameMeta::default())
        .unwrap());
    net.wait_frames("frame", |fs| !fs.is_empty());
    assert_eq!(net.opened.lock().unwrap()[0].0.backend_type, "qnic");
}

#[test]
fn test_close_and_reconnect_serves_again() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    f.close().unwrap();
    assert!(rig.wait_connected(0, false));
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = udp_frame(mac_of(0), [2; 6], 64, 0);
    assert!(f
        .queue(0)
        .unwrap()
        .send_frame(&frame, FrameMeta::default())
        .unwrap());
    rig.net.wait_frames("frame after reconnect", |fs| {
        fs.iter().any(|x| x.frame == frame)
    });
}

#[test]
fn test_host_side_survives_frontend_reconnects_and_goes_with_the_device() {
    use std::sync::atomic::Ordering::SeqCst;
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    f.close().unwrap();
    assert!(rig.wait_connected(0, false));
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    // One tap for both connections, as Linux keeps its vif netdev.
    assert_eq!(rig.net.hosts_created.load(SeqCst), 1);
    assert_eq!(rig.net.hosts_dropped.load(SeqCst), 0);
    assert_eq!(rig.net.opened.lock().unwrap().len(), 2);
    f.close().unwrap();
    // The toolstack removes the device: the host side is torn down.
    let spec = DeviceSpec::vif(rig.guest.domid(), 0, &nic(0));
    rig.toolstack.remove_device_nodes(&spec).unwrap();
    wait_for("host side torn down", || {
        (rig.net.hosts_dropped.load(SeqCst) == 1).then_some(())
    });
}

#[test]
fn test_a_torn_down_device_leaves_the_stats_and_its_successor_starts_from_zero() {
    let rig = rig(&[0]);
    let mut f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let frame = udp_frame(mac_of(0), [2; 6], 64, 0);
    assert!(f
        .queue(0)
        .unwrap()
        .send_frame(&frame, FrameMeta::default())
        .unwrap());
    rig.wait_stats(0, "the frame sent", |s| s.tx_packets == 1);
    f.close().unwrap();

    // The toolstack removes the device: its counters go with it.
    let spec = DeviceSpec::vif(rig.guest.domid(), 0, &nic(0));
    rig.toolstack.remove_device_nodes(&spec).unwrap();
    wait_for("the device's stats removed", || {
        rig.driver.stats().is_empty().then_some(())
    });

    // A device with the same domid and devid starts from zero.
    rig.toolstack.add_device(&spec).unwrap();
    let _f = NetFront::connect(&rig.guest, 0, NetFrontOptions::default()).unwrap();
    let key = (u32::from(rig.guest.domid()), 0);
    wait_for("the new device in the stats", || {
        rig.driver
            .stats()
            .iter()
            .any(|(k, _)| *k == key)
            .then_some(())
    });
    assert_eq!(rig.stats(0).tx_packets, 0, "{:?}", rig.stats(0));
}

//! netfront's XenBus negotiation against a fake backend driven by the test (dom0 writes the
//! backend's features and states): the keys it writes are those Linux's xen-netfront writes
//! (plus the control ring), for one or several queues, split or shared event channels, and a
//! backend that closes instead of waiting is an error, not a hang. The data paths are tested
//! against the real netback in backends/tests/net_*.rs.

use std::time::Duration;

use xenbus::{XenbusState, XsOps};
use xensim::front::net::{NetFront, NetFrontOptions};
use xensim::guest::Guest;
use xensim::host::Host;
use xensim::server::Server;
use xensim::toolstack::{DeviceSpec, Toolstack, VifNic};

struct Rig {
    _dir: tempfile::TempDir,
    _server: Server,
    guest: Guest,
    ts: Toolstack,
    spec: DeviceSpec,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new().unwrap();
    let server = Server::start(host.clone(), &dir.path().join("s")).unwrap();
    let domid = host.create_domain("guest", 4096).unwrap();
    let ts = host.toolstack().unwrap();
    let spec = DeviceSpec::vif(domid, 0, &VifNic::default());
    ts.add_device(&spec).unwrap();
    let guest = Guest::new(host.clone(), domid).unwrap();
    Rig {
        _dir: dir,
        _server: server,
        guest,
        ts,
        spec,
    }
}

impl Rig {
    fn backend(&self, kv: &[(&str, &str)], state: XenbusState) {
        let be = self.spec.backend_path();
        self.ts
            .xs()
            .transaction(|tx| {
                for (k, v) in kv {
                    tx.write(&format!("{be}/{k}"), v.as_bytes())?;
                }
                tx.write(&format!("{be}/state"), state.as_str().as_bytes())
            })
            .unwrap();
    }

    fn fe(&self, key: &str) -> Option<String> {
        self.ts
            .xs()
            .try_read(&format!("{}/{key}", self.spec.frontend_path()))
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }
}

const LINUX_NETBACK: &[(&str, &str)] = &[
    ("feature-sg", "1"),
    ("feature-gso-tcpv4", "1"),
    ("feature-gso-tcpv6", "1"),
    ("feature-ipv6-csum-offload", "1"),
    ("feature-rx-copy", "1"),
    ("feature-rx-flip", "0"),
    ("feature-multicast-control", "1"),
    ("feature-dynamic-multicast-control", "1"),
    ("feature-split-event-channels", "1"),
    ("multi-queue-max-queues", "4"),
    ("feature-ctrl-ring", "1"),
    ("feature-xdp-headroom", "1"),
];

fn opts() -> NetFrontOptions {
    NetFrontOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[test]
fn test_one_queue_split_channels_writes_linux_keys_and_posts_rx_buffers() {
    let rig = rig();
    rig.backend(LINUX_NETBACK, XenbusState::InitWait);
    let mut f = NetFront::init(&rig.guest, 0, opts()).unwrap();
    assert!(f.split());
    assert_eq!(f.features().max_queues, 4);
    let q = f.queue(0).unwrap();
    let (tx, rx) = q.ring_refs();
    assert_eq!(rig.fe("tx-ring-ref"), Some(tx.to_string()));
    assert_eq!(rig.fe("rx-ring-ref"), Some(rx.to_string()));
    assert_eq!(
        rig.fe("event-channel-tx"),
        Some(q.tx_port().port().to_string())
    );
    assert_eq!(
        rig.fe("event-channel-rx"),
        Some(q.rx_port().unwrap().port().to_string())
    );
    assert_eq!(rig.fe("event-channel"), None);
    assert_eq!(q.rx_posted(), 256);
    for (k, v) in [
        ("request-rx-copy", "1"),
        ("feature-rx-notify", "1"),
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-gso-tcpv6", "1"),
        ("feature-ipv6-csum-offload", "1"),
        ("state", "4"),
    ] {
        assert_eq!(rig.fe(k).as_deref(), Some(v), "{k}");
    }
    assert_eq!(rig.fe("multi-queue-num-queues"), None);
    assert_eq!(rig.fe("ctrl-ring-ref"), None);
    assert_eq!(rig.fe("feature-no-csum-offload"), None);
}

#[test]
fn test_multi_queue_with_ctrl_ring_writes_queue_subtrees() {
    let rig = rig();
    rig.backend(LINUX_NETBACK, XenbusState::InitWait);
    let o = NetFrontOptions {
        max_queues: 8,
        ctrl_ring: true,
        multicast_control: true,
        xdp_headroom: 128,
        csum_offload: false,
        ..opts()
    };
    let f = NetFront::init(&rig.guest, 0, o).unwrap();
    // Bounded by the backend's maximum.
    assert_eq!(f.num_queues(), 4);
    assert_eq!(rig.fe("multi-queue-num-queues").as_deref(), Some("4"));
    for i in 0..4 {
        assert!(rig.fe(&format!("queue-{i}/tx-ring-ref")).is_some());
        assert!(rig.fe(&format!("queue-{i}/event-channel-rx")).is_some());
    }
    assert_eq!(rig.fe("tx-ring-ref"), None);
    assert!(rig.fe("ctrl-ring-ref").is_some());
    assert!(rig.fe("event-channel-ctrl").is_some());
    assert_eq!(rig.fe("request-multicast-control").as_deref(), Some("1"));
    assert_eq!(rig.fe("xdp-headroom").as_deref(), Some("128"));
    assert_eq!(rig.fe("feature-no-csum-offload").as_deref(), Some("1"));
}

#[test]
fn test_backend_without_split_channels_gets_one_event_channel() {
    let rig = rig();
    let kv: Vec<(&str, &str)> = LINUX_NETBACK
        .iter()
        .filter(|(k, _)| *k != "feature-split-event-channels" && *k != "feature-ctrl-ring")
        .copied()
        .collect();
    rig.backend(&kv, XenbusState::InitWait);
    let o = NetFrontOptions {
        ctrl_ring: true,
        ..opts()
    };
    let mut f = NetFront::init(&rig.guest, 0, o).unwrap();
    assert!(!f.split());
    assert!(f.ctrl().is_none());
    assert!(rig.fe("event-channel").is_some());
    assert_eq!(rig.fe("event-channel-tx"), None);
    assert_eq!(rig.fe("ctrl-ring-ref"), None);
}

#[test]
fn test_backend_that_closes_instead_of_initwait_is_an_error() {
    let rig = rig();
    rig.backend(&[], XenbusState::Closed);
    let e = NetFront::init(&rig.guest, 0, opts()).unwrap_err();
    assert!(e.to_string().contains("instead of InitWait"), "{e}");
}

#[test]
fn test_overrides_and_omissions_reach_xenstore_for_hostile_tests() {
    let rig = rig();
    rig.backend(LINUX_NETBACK, XenbusState::InitWait);
    let o = NetFrontOptions {
        overrides: vec![("request-rx-copy".into(), "0".into())],
        omit: vec!["feature-rx-notify".into()],
        ..opts()
    };
    let _f = NetFront::init(&rig.guest, 0, o).unwrap();
    assert_eq!(rig.fe("request-rx-copy").as_deref(), Some("0"));
    assert_eq!(rig.fe("feature-rx-notify"), None);
}

//! Layout test: the tap engine's ioctl numbers, flags and `struct ifreq` size against the
//! kernel's uapi headers (linux/if_tun.h, linux/sockios.h, linux/if.h, linux/if_arp.h),
//! compiled here with the system C compiler. Missing headers fail the test with the package
//! to install; nothing is skipped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use backends::net::engine::VirtioNetHdr;
use backends::net::tap::uapi::*;

const HINT: &str = "install the headers and a compiler: `apt-get install -y linux-libc-dev gcc`";

const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/if.h>
#include <linux/if_arp.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <linux/virtio_net.h>
#define P(x) printf("%s %lld\n", #x, (long long)(x))
int main(void) {
    P(TUNSETIFF); P(TUNSETPERSIST); P(TUNGETFEATURES); P(TUNSETOFFLOAD); P(TUNGETIFF);
    P(TUNGETVNETHDRSZ); P(TUNSETVNETHDRSZ); P(TUNSETVNETLE); P(TUNSETQUEUE);
    P(IFF_TAP); P(IFF_NO_PI); P(IFF_VNET_HDR); P(IFF_MULTI_QUEUE); P(IFF_PERSIST);
    P(IFF_ATTACH_QUEUE); P(IFF_DETACH_QUEUE);
    P(TUN_F_CSUM); P(TUN_F_TSO4); P(TUN_F_TSO6); P(TUN_F_TSO_ECN);
    P(SIOCGIFMTU); P(SIOCSIFMTU); P(SIOCGIFFLAGS); P(SIOCSIFFLAGS); P(SIOCGIFHWADDR);
    P(SIOCSIFHWADDR); P(SIOCGIFINDEX); P(SIOCBRADDIF); P(SIOCBRDELIF);
    P(IFF_UP); P(ARPHRD_ETHER); P(IFNAMSIZ);
    P(sizeof(struct ifreq));
    P(sizeof(struct virtio_net_hdr_mrg_rxbuf));
    P(offsetof(struct virtio_net_hdr_mrg_rxbuf, hdr.gso_size));
    P(offsetof(struct virtio_net_hdr_mrg_rxbuf, hdr.csum_start));
    P(offsetof(struct virtio_net_hdr_mrg_rxbuf, num_buffers));
    P(VIRTIO_NET_HDR_F_NEEDS_CSUM); P(VIRTIO_NET_HDR_F_DATA_VALID);
    P(VIRTIO_NET_HDR_GSO_TCPV4); P(VIRTIO_NET_HDR_GSO_TCPV6); P(VIRTIO_NET_HDR_GSO_UDP);
    P(VIRTIO_NET_HDR_GSO_ECN);
    return 0;
}
"#;

fn c_values() -> BTreeMap<String, i128> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tap-layout");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let src = dir.join("tap_uapi.c");
    let exe = dir.join("tap_uapi");
    std::fs::write(&src, PROBE).expect("write probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}; {HINT}"));
    assert!(
        out.status.success(),
        "compiling the probe failed:\n{}\n{HINT}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run probe");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn test_tap_uapi_constants_match_the_kernel_headers() {
    // Arrange
    let c = c_values();
    let ours: Vec<(&str, i128)> = vec![
        ("TUNSETIFF", TUNSETIFF.into()),
        ("TUNSETPERSIST", TUNSETPERSIST.into()),
        ("TUNGETFEATURES", TUNGETFEATURES.into()),
        ("TUNSETOFFLOAD", TUNSETOFFLOAD.into()),
        ("TUNGETIFF", TUNGETIFF.into()),
        ("TUNGETVNETHDRSZ", TUNGETVNETHDRSZ.into()),
        ("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ.into()),
        ("TUNSETVNETLE", TUNSETVNETLE.into()),
        ("TUNSETQUEUE", TUNSETQUEUE.into()),
        ("IFF_ATTACH_QUEUE", IFF_ATTACH_QUEUE.into()),
        ("IFF_DETACH_QUEUE", IFF_DETACH_QUEUE.into()),
        ("IFF_TAP", IFF_TAP.into()),
        ("IFF_NO_PI", IFF_NO_PI.into()),
        ("IFF_VNET_HDR", IFF_VNET_HDR.into()),
        ("IFF_MULTI_QUEUE", IFF_MULTI_QUEUE.into()),
        ("IFF_PERSIST", IFF_PERSIST.into()),
        ("TUN_F_CSUM", TUN_F_CSUM.into()),
        ("TUN_F_TSO4", TUN_F_TSO4.into()),
        ("TUN_F_TSO6", TUN_F_TSO6.into()),
        ("TUN_F_TSO_ECN", TUN_F_TSO_ECN.into()),
        ("SIOCGIFMTU", SIOCGIFMTU.into()),
        ("SIOCSIFMTU", SIOCSIFMTU.into()),
        ("SIOCGIFFLAGS", SIOCGIFFLAGS.into()),
        ("SIOCSIFFLAGS", SIOCSIFFLAGS.into()),
        ("SIOCGIFHWADDR", SIOCGIFHWADDR.into()),
        ("SIOCSIFHWADDR", SIOCSIFHWADDR.into()),
        ("SIOCGIFINDEX", SIOCGIFINDEX.into()),
        ("SIOCBRADDIF", SIOCBRADDIF.into()),
        ("SIOCBRDELIF", SIOCBRDELIF.into()),
        ("IFF_UP", IFF_UP.into()),
        ("ARPHRD_ETHER", ARPHRD_ETHER.into()),
        ("IFNAMSIZ", IFNAMSIZ as i128),
        ("sizeof(struct ifreq)", IFREQ_SIZE as i128),
        (
            "sizeof(struct virtio_net_hdr_mrg_rxbuf)",
            VNET_HDR_LEN.into(),
        ),
        (
            "sizeof(struct virtio_net_hdr_mrg_rxbuf)",
            VirtioNetHdr::LEN as i128,
        ),
        ("offsetof(struct virtio_net_hdr_mrg_rxbuf, hdr.gso_size)", 4),
        (
            "offsetof(struct virtio_net_hdr_mrg_rxbuf, hdr.csum_start)",
            6,
        ),
        ("offsetof(struct virtio_net_hdr_mrg_rxbuf, num_buffers)", 10),
        (
            "VIRTIO_NET_HDR_F_NEEDS_CSUM",
            VirtioNetHdr::F_NEEDS_CSUM.into(),
        ),
        (
            "VIRTIO_NET_HDR_F_DATA_VALID",
            VirtioNetHdr::F_DATA_VALID.into(),
        ),
        ("VIRTIO_NET_HDR_GSO_TCPV4", VirtioNetHdr::GSO_TCPV4.into()),
        ("VIRTIO_NET_HDR_GSO_TCPV6", VirtioNetHdr::GSO_TCPV6.into()),
        ("VIRTIO_NET_HDR_GSO_UDP", VirtioNetHdr::GSO_UDP.into()),
        ("VIRTIO_NET_HDR_GSO_ECN", VirtioNetHdr::GSO_ECN.into()),
    ];

    // Act
    let mut bad = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (name, v) in &ours {
        seen.insert(name.to_string());
        match c.get(*name) {
            Some(cv) if cv == v => {}
            Some(cv) => bad.push(format!("{name}: C {cv:#x}, Rust {v:#x}")),
            None => bad.push(format!("{name}: not printed by the C probe")),
        }
    }
    let unchecked: Vec<&String> = c.keys().filter(|k| !seen.contains(*k)).collect();

    // Assert
    assert!(bad.is_empty(), "mismatches against the C headers: {bad:#?}");
    assert!(
        unchecked.is_empty(),
        "C values no Rust check looked at: {unchecked:?}"
    );
}

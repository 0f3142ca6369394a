//! The kernel ABI the tap engine speaks: linux/if_tun.h, linux/sockios.h and linux/if.h.
//!
//! Spelled out here (not taken from a binding crate) so that `backends/tests/tap_layout.rs`
//! can check each value against the C headers of the machine it runs on.

/// `_IOC` with the generic Linux encoding (x86, arm, riscv): dir << 30 | size << 16 | type << 8 | nr.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const INT: usize = std::mem::size_of::<libc::c_int>();
const UINT: usize = std::mem::size_of::<libc::c_uint>();

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
pub const TUNSETIFF: u32 = ioc(IOC_WRITE, b'T', 202, INT);
/// `TUNSETPERSIST`: `_IOW('T', 203, int)`.
pub const TUNSETPERSIST: u32 = ioc(IOC_WRITE, b'T', 203, INT);
/// `TUNGETFEATURES`: `_IOR('T', 207, unsigned int)`.
pub const TUNGETFEATURES: u32 = ioc(IOC_READ, b'T', 207, UINT);
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
pub const TUNSETOFFLOAD: u32 = ioc(IOC_WRITE, b'T', 208, UINT);
/// `TUNGETIFF`: `_IOR('T', 210, unsigned int)`.
pub const TUNGETIFF: u32 = ioc(IOC_READ, b'T', 210, UINT);
/// `TUNGETVNETHDRSZ`: `_IOR('T', 215, int)`.
pub const TUNGETVNETHDRSZ: u32 = ioc(IOC_READ, b'T', 215, INT);
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
pub const TUNSETVNETHDRSZ: u32 = ioc(IOC_WRITE, b'T', 216, INT);
/// `TUNSETQUEUE`: `_IOW('T', 217, int)` (takes a `struct ifreq` with IFF_ATTACH_QUEUE or
/// IFF_DETACH_QUEUE).
pub const TUNSETQUEUE: u32 = ioc(IOC_WRITE, b'T', 217, INT);
/// `TUNSETVNETLE`: `_IOW('T', 220, int)`.
pub const TUNSETVNETLE: u32 = ioc(IOC_WRITE, b'T', 220, INT);

/// `IFF_TAP`: an Ethernet device.
pub const IFF_TAP: u16 = 0x0002;
/// `IFF_NO_PI`: no packet-information prefix.
pub const IFF_NO_PI: u16 = 0x1000;
/// `IFF_VNET_HDR`: a `virtio_net_hdr` in front of each frame.
pub const IFF_VNET_HDR: u16 = 0x4000;
/// `IFF_MULTI_QUEUE`: one queue per file descriptor.
pub const IFF_MULTI_QUEUE: u16 = 0x0100;
/// `IFF_ATTACH_QUEUE` (TUNSETQUEUE): steer frames to this queue again.
pub const IFF_ATTACH_QUEUE: u16 = 0x0200;
/// `IFF_DETACH_QUEUE` (TUNSETQUEUE): stop steering frames to this queue; the descriptor
/// still keeps the device alive.
pub const IFF_DETACH_QUEUE: u16 = 0x0400;
/// `IFF_PERSIST` (read back with TUNGETIFF): the device outlives its descriptors.
pub const IFF_PERSIST: u16 = 0x0800;

/// `TUN_F_CSUM`: we take frames with a partial checksum.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: we take TCPv4 GSO super-frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: we take TCPv6 GSO super-frames.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`: with the ECN bit.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// `SIOCGIFMTU`.
pub const SIOCGIFMTU: u32 = 0x8921;
/// `SIOCSIFMTU`.
pub const SIOCSIFMTU: u32 = 0x8922;
/// `SIOCGIFFLAGS`.
pub const SIOCGIFFLAGS: u32 = 0x8913;
/// `SIOCSIFFLAGS`.
pub const SIOCSIFFLAGS: u32 = 0x8914;
/// `SIOCGIFHWADDR`.
pub const SIOCGIFHWADDR: u32 = 0x8927;
/// `SIOCSIFHWADDR`.
pub const SIOCSIFHWADDR: u32 = 0x8924;
/// `SIOCGIFINDEX`.
pub const SIOCGIFINDEX: u32 = 0x8933;
/// `SIOCBRADDIF` (linux/sockios.h): enslave an interface (by index) to a bridge.
pub const SIOCBRADDIF: u32 = 0x89a2;
/// `SIOCBRDELIF`.
pub const SIOCBRDELIF: u32 = 0x89a3;

/// `IFF_UP` (linux/if.h, `net_device_flags`).
pub const IFF_UP: u16 = 0x1;
/// `ARPHRD_ETHER` (linux/if_arp.h): the `sa_family` of an Ethernet hardware address.
pub const ARPHRD_ETHER: u16 = 1;
/// `IFNAMSIZ`: interface names are at most 15 bytes plus the NUL.
pub const IFNAMSIZ: usize = 16;
/// `sizeof(struct ifreq)` on 64-bit Linux.
pub const IFREQ_SIZE: usize = std::mem::size_of::<libc::ifreq>();

/// The virtio_net_hdr size we configure (`struct virtio_net_hdr_mrg_rxbuf`).
pub const VNET_HDR_LEN: i32 = 12;

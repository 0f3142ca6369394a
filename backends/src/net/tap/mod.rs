//! The tap engine: netback's (and virtio-net's) host-side packet device.
//!
//! [`Tap::open`] creates (or attaches to) `vif<domid>.<devid>` through `/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` and one descriptor per queue
//! when more than one queue is asked for. Every descriptor is non-blocking and carries a
//! 12-byte `virtio_net_hdr_mrg_rxbuf` in front of each frame (TUNSETVNETHDRSZ), so GSO
//! super-frames and partial checksums cross the tap unsplit in both directions. What the
//! kernel may hand *us* (partial checksums, TSO super-frames) is set with
//! [`Tap::set_offloads`] once the frontend has said what it takes.
//!
//! Each [`TapQueue`] implements [`NetQueueIo`]: `send` is one `writev` of header and frame
//! slices (no copy, no allocation), `recv` one `readv` into the header and the caller's
//! buffer.
//!
//! Teardown: a tap we created is not persistent, so it disappears when its last descriptor
//! closes (dropping the [`Tap`] and every clone of its queues). A persistent tap the toolstack
//! made beforehand is left in place.
//!
//! The host side (hotplug script or bridge) is in [`hotplug`]; netback's per-vif host side
//! (tap + hotplug, the `VifHost` its driver asks for) is [`vif::TapVifHost`], made by
//! [`tap_engine_factory`].

pub mod hotplug;
#[allow(unsafe_code)]
mod sys;
pub mod uapi;
pub mod vif;

pub use vif::{tap_engine_factory, tap_engine_factory_toolstack_hotplug, TapVifHost};

use std::fs::OpenOptions;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::uio::{readv, writev};
use xen::DomId;

use super::engine::{NetQueueIo, VirtioNetHdr};

/// The most queues one tap gets (Linux's MAX_TAP_QUEUES is 256).
pub const MAX_QUEUES: u16 = 256;

/// The largest frame netback accepts from a tap: 64 KiB of IP (the IPv4 total length and the
/// GSO limit of a tap) plus the Ethernet header. A tap can carry longer ones (a VLAN tag on a
/// 64 KiB packet); `recv` refuses any frame that fills its buffer, so read into one of
/// `MAX_FRAME + 1` bytes.
pub const MAX_FRAME: usize = 65_535 + 14;

/// The most slices `send` gathers without allocating (netif allows 18 slots per packet).
const STACK_SLICES: usize = 64;

/// Which device a tap belongs to, for error messages and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VifId {
    /// The guest.
    pub domid: DomId,
    /// The device number (`backend/vif/<domid>/<devid>`).
    pub devid: u32,
}

impl std::fmt::Display for VifId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dom{} vif {}", self.domid, self.devid)
    }
}

impl VifId {
    /// Xen's default host interface name, `vif<domid>.<devid>`.
    pub fn default_name(&self) -> String {
        format!("vif{}.{}", self.domid, self.devid)
    }
}

/// Errors of the tap engine.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A system call on the tap failed.
    #[error("{vif}: {op} on tap {name}: {source}")]
    Io {
        /// The device.
        vif: VifId,
        /// The tap's name.
        name: String,
        /// What we were doing.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The configuration cannot be applied.
    #[error("{vif}: tap {name}: {why}")]
    Config {
        /// The device.
        vif: VifId,
        /// The tap's name.
        name: String,
        /// What is wrong.
        why: String,
    },
}

/// Offloads of frames the kernel hands to us (TUNSETOFFLOAD): what the frontend takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    /// Frames with a partial checksum (`TUN_F_CSUM`).
    pub csum: bool,
    /// TCPv4 super-frames (`TUN_F_TSO4`, needs `csum`).
    pub tso4: bool,
    /// TCPv6 super-frames (`TUN_F_TSO6`, needs `csum`).
    pub tso6: bool,
    /// TSO with ECN (`TUN_F_TSO_ECN`, needs a TSO flag).
    pub tso_ecn: bool,
}

impl Offloads {
    /// The TUNSETOFFLOAD bits. The kernel refuses TSO without CSUM, so TSO flags are only set
    /// with `csum`.
    pub fn bits(&self) -> u32 {
        let mut b = 0;
        if self.csum {
            b |= uapi::TUN_F_CSUM;
            if self.tso4 {
                b |= uapi::TUN_F_TSO4;
            }
            if self.tso6 {
                b |= uapi::TUN_F_TSO6;
            }
            if (self.tso4 || self.tso6) && self.tso_ecn {
                b |= uapi::TUN_F_TSO_ECN;
            }
        }
        b
    }
}

/// How to open a tap.
#[derive(Debug, Clone)]
pub struct TapOptions {
    /// Interface name; `vif<domid>.<devid>` when `None`.
    pub name: Option<String>,
    /// Number of queues (descriptors); more than one uses IFF_MULTI_QUEUE.
    pub queues: u16,
    /// MTU to set, if any.
    pub mtu: Option<u32>,
    /// Host-side MAC address to set, if any. Xen's scripts give vifs `fe:ff:ff:ff:ff:ff` so
    /// that a bridge never takes the vif's address as its own.
    pub mac: Option<[u8; 6]>,
    /// Bring the link up.
    pub up: bool,
    /// Initial offloads (see [`Tap::set_offloads`]).
    pub offloads: Offloads,
    /// Create the tap with IFF_MULTI_QUEUE even for one queue, so that queues can be added
    /// later ([`Tap::add_queues`]). Always on with more than one queue.
    pub multi_queue: bool,
}

impl Default for TapOptions {
    fn default() -> Self {
        TapOptions {
            name: None,
            queues: 1,
            mtu: None,
            mac: Some([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]),
            up: true,
            offloads: Offloads::default(),
            multi_queue: false,
        }
    }
}

/// One queue of a tap: a non-blocking descriptor with a vnet header on every frame.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    index: u16,
}

impl TapQueue {
    /// The queue number.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Steers frames to this queue (`true`) or stops (`false`) on a multi-queue tap; a
    /// detached queue still keeps the device alive.
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        let mut r = sys::ifreq("");
        r.ifr_ifru.ifru_flags = if attached {
            uapi::IFF_ATTACH_QUEUE
        } else {
            uapi::IFF_DETACH_QUEUE
        } as libc::c_short;
        sys::ioctl_ifreq(self.fd.as_fd(), uapi::TUNSETQUEUE, &mut r)
    }
}

/// Opens one more descriptor on tap `name` with `flags` and our vnet header size.
fn open_queue(
    name: &str,
    flags: u16,
    index: u16,
) -> Result<(TapQueue, String), (&'static str, io::Error)> {
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(Path::new("/dev/net/tun"))
        .map_err(|e| ("open /dev/net/tun", e))?
        .into();
    if index == 0 {
        let features = sys::ioctl_get_int(fd.as_fd(), uapi::TUNGETFEATURES)
            .map_err(|e| ("TUNGETFEATURES", e))?;
        let need = u32::from(flags);
        if features & need != need {
            return Err((
                "TUNGETFEATURES",
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the kernel's tun driver offers features {features:#x}, without {:#x}",
                        need & !features
                    ),
                ),
            ));
        }
    }
    let mut r = sys::ifreq(name);
    r.ifr_ifru.ifru_flags = flags as libc::c_short;
    sys::ioctl_ifreq(fd.as_fd(), uapi::TUNSETIFF, &mut r).map_err(|e| ("TUNSETIFF", e))?;
    let actual = sys::ifreq_name(&r);
    // The vnet header size is per device, but setting it on each queue is harmless and keeps
    // a queue usable on its own.
    sys::ioctl_set_int_ptr(fd.as_fd(), uapi::TUNSETVNETHDRSZ, uapi::VNET_HDR_LEN)
        .map_err(|e| ("TUNSETVNETHDRSZ", e))?;
    if cfg!(target_endian = "big") {
        sys::ioctl_set_int_ptr(fd.as_fd(), uapi::TUNSETVNETLE, 1)
            .map_err(|e| ("TUNSETVNETLE", e))?;
    }
    Ok((TapQueue { fd, index }, actual))
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl NetQueueIo for TapQueue {
    fn send(&self, hdr: &VirtioNetHdr, frame: &[IoSlice<'_>]) -> io::Result<()> {
        let hb = hdr.to_bytes();
        let want = VirtioNetHdr::LEN + frame.iter().map(|s| s.len()).sum::<usize>();
        let n = if frame.len() < STACK_SLICES {
            let mut iov = [IoSlice::new(&[]); STACK_SLICES];
            iov[0] = IoSlice::new(&hb);
            iov[1..=frame.len()].copy_from_slice(frame);
            writev(&self.fd, &iov[..=frame.len()])
        } else {
            // Not reachable through netif (at most 18 slots a packet); allowed, not fast.
            let mut iov = Vec::with_capacity(frame.len() + 1);
            iov.push(IoSlice::new(&hb));
            iov.extend_from_slice(frame);
            writev(&self.fd, &iov)
        }
        .map_err(io::Error::from)?;
        if n != want {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("tap took {n} of {want} bytes"),
            ));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(VirtioNetHdr, usize)>> {
        let mut hb = [0u8; VirtioNetHdr::LEN];
        let n = {
            let mut iov = [IoSliceMut::new(&mut hb), IoSliceMut::new(buf)];
            match readv(&self.fd, &mut iov) {
                Ok(n) => n,
                Err(e) => {
                    let e = io::Error::from(e);
                    if would_block(&e) {
                        return Ok(None);
                    }
                    return Err(e);
                }
            }
        };
        if n < VirtioNetHdr::LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tap read of {n} bytes is shorter than its vnet header"),
            ));
        }
        let len = n - VirtioNetHdr::LEN;
        if len >= buf.len() {
            // The kernel cuts a frame to the buffer and reports only what it copied, so a
            // frame that fills the buffer may have been cut: drop it. (Give a buffer one byte
            // larger than the largest frame you accept.)
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a frame filled the whole {}-byte buffer and may have been truncated",
                    buf.len()
                ),
            ));
        }
        Ok(Some((VirtioNetHdr::from_bytes(&hb), len)))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open tap device with its queues.
#[derive(Debug)]
pub struct Tap {
    vif: VifId,
    name: String,
    queues: Vec<Arc<TapQueue>>,
    ctl: OwnedFd,
    persistent: bool,
    flags: u16,
}

/// Checks an interface name the way the kernel does (dev_valid_name).
pub fn valid_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= uapi::IFNAMSIZ {
        return Err(format!(
            "an interface name has 1 to {} bytes",
            uapi::IFNAMSIZ - 1
        ));
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not interface names".into());
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err("an interface name has no `/`, `:`, NUL or white space".into());
    }
    Ok(())
}

impl Tap {
    /// Creates the tap (or attaches to an existing persistent one of that name) and
    /// configures it: vnet header size, offloads, MAC, MTU and link state.
    pub fn open(vif: VifId, opts: &TapOptions) -> Result<Tap, TapError> {
        let name = opts.name.clone().unwrap_or_else(|| vif.default_name());
        let cfg_err = |why: String| TapError::Config {
            vif,
            name: name.clone(),
            why,
        };
        valid_ifname(&name).map_err(&cfg_err)?;
        if opts.queues == 0 || opts.queues > MAX_QUEUES {
            return Err(cfg_err(format!(
                "{} queues asked for; a tap has 1 to {MAX_QUEUES}",
                opts.queues
            )));
        }
        let io_err = |op: &'static str, name: &str| {
            let name = name.to_string();
            move |source: io::Error| TapError::Io {
                vif,
                name,
                op,
                source,
            }
        };
        let ctl = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io_err("control socket", &name)(e.into()))?;

        let mut flags = uapi::IFF_TAP | uapi::IFF_NO_PI | uapi::IFF_VNET_HDR;
        if opts.queues > 1 || opts.multi_queue {
            flags |= uapi::IFF_MULTI_QUEUE;
        }
        let mut queues = Vec::with_capacity(usize::from(opts.queues));
        let mut actual = name.clone();
        for index in 0..opts.queues {
            let (q, n) = open_queue(&actual, flags, index)
                .map_err(|(op, source)| io_err(op, &actual)(source))?;
            actual = n;
            queues.push(Arc::new(q));
        }
        let first = queues
            .first()
            .map(|q| q.fd.as_fd())
            .ok_or_else(|| cfg_err("no queue opened".into()))?;
        let mut r = sys::ifreq(&actual);
        sys::ioctl_ifreq(first, uapi::TUNGETIFF, &mut r).map_err(io_err("TUNGETIFF", &actual))?;
        let persistent = sys::ifreq_flags(&r) & uapi::IFF_PERSIST != 0;

        let tap = Tap {
            vif,
            name: actual,
            queues,
            ctl,
            persistent,
            flags,
        };
        tap.set_offloads(opts.offloads)?;
        if let Some(mac) = opts.mac {
            tap.set_mac(mac)?;
        }
        if let Some(mtu) = opts.mtu {
            tap.set_mtu(mtu)?;
        }
        if opts.up {
            tap.set_up(true)?;
        }
        tracing::debug!(vif = %vif, tap = %tap.name, queues = opts.queues, persistent, "tap open");
        Ok(tap)
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Io {
            vif: self.vif,
            name: self.name.clone(),
            op,
            source,
        }
    }

    fn first_fd(&self) -> BorrowedFd<'_> {
        // `open` never builds a Tap without queues.
        self.queues[0].fd.as_fd()
    }

    /// The device.
    pub fn vif(&self) -> VifId {
        self.vif
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the tap existed as a persistent device (and so survives us).
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// The queues, shareable with the threads that serve them.
    pub fn queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }

    /// Opens `n` more queues on a tap created with `multi_queue` (numbered after the ones
    /// [`Tap::queues`] holds). The caller owns them; closing them detaches them.
    pub fn add_queues(&self, n: u16) -> Result<Vec<Arc<TapQueue>>, TapError> {
        if self.flags & uapi::IFF_MULTI_QUEUE == 0 {
            return Err(TapError::Config {
                vif: self.vif,
                name: self.name.clone(),
                why: "queues can only be added to a tap opened with multi_queue".into(),
            });
        }
        let base = self.queues.len() as u16;
        (0..n)
            .map(|i| {
                open_queue(&self.name, self.flags, base + i + 1)
                    .map(|(q, _)| Arc::new(q))
                    .map_err(|(op, source)| TapError::Io {
                        vif: self.vif,
                        name: self.name.clone(),
                        op,
                        source,
                    })
            })
            .collect()
    }

    /// Sets what the kernel may hand us: partial checksums and TSO super-frames.
    pub fn set_offloads(&self, o: Offloads) -> Result<(), TapError> {
        sys::ioctl_value(
            self.first_fd(),
            uapi::TUNSETOFFLOAD,
            libc::c_ulong::from(o.bits()),
        )
        .map_err(self.err("TUNSETOFFLOAD"))
    }

    /// The vnet header size the device uses (12 once opened).
    pub fn vnet_hdr_len(&self) -> Result<u32, TapError> {
        sys::ioctl_get_int(self.first_fd(), uapi::TUNGETVNETHDRSZ)
            .map_err(self.err("TUNGETVNETHDRSZ"))
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let mut r = sys::ifreq(&self.name);
        r.ifr_ifru.ifru_mtu = i32::try_from(mtu).map_err(|_| TapError::Config {
            vif: self.vif,
            name: self.name.clone(),
            why: format!("MTU {mtu} is out of range"),
        })?;
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCSIFMTU, &mut r).map_err(self.err("SIOCSIFMTU"))
    }

    /// The MTU.
    pub fn mtu(&self) -> Result<u32, TapError> {
        let mut r = sys::ifreq(&self.name);
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCGIFMTU, &mut r)
            .map_err(self.err("SIOCGIFMTU"))?;
        Ok(sys::ifreq_int(&r).max(0) as u32)
    }

    /// Sets the host-side MAC address.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), TapError> {
        let mut r = sys::ifreq(&self.name);
        let mut sa = libc::sockaddr {
            sa_family: uapi::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (d, m) in sa.sa_data.iter_mut().zip(mac) {
            *d = m as libc::c_char;
        }
        r.ifr_ifru.ifru_hwaddr = sa;
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCSIFHWADDR, &mut r)
            .map_err(self.err("SIOCSIFHWADDR"))
    }

    /// The host-side MAC address.
    pub fn mac(&self) -> Result<[u8; 6], TapError> {
        let mut r = sys::ifreq(&self.name);
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCGIFHWADDR, &mut r)
            .map_err(self.err("SIOCGIFHWADDR"))?;
        Ok(sys::ifreq_hwaddr(&r))
    }

    /// The interface index.
    pub fn ifindex(&self) -> Result<u32, TapError> {
        let mut r = sys::ifreq(&self.name);
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCGIFINDEX, &mut r)
            .map_err(self.err("SIOCGIFINDEX"))?;
        Ok(sys::ifreq_int(&r).max(0) as u32)
    }

    /// Brings the link up or down.
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let mut r = sys::ifreq(&self.name);
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCGIFFLAGS, &mut r)
            .map_err(self.err("SIOCGIFFLAGS"))?;
        let mut f = sys::ifreq_flags(&r);
        if up {
            f |= uapi::IFF_UP;
        } else {
            f &= !uapi::IFF_UP;
        }
        r.ifr_ifru.ifru_flags = f as libc::c_short;
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCSIFFLAGS, &mut r)
            .map_err(self.err("SIOCSIFFLAGS"))
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> Result<bool, TapError> {
        let mut r = sys::ifreq(&self.name);
        sys::ioctl_ifreq(self.ctl.as_fd(), uapi::SIOCGIFFLAGS, &mut r)
            .map_err(self.err("SIOCGIFFLAGS"))?;
        Ok(sys::ifreq_flags(&r) & uapi::IFF_UP != 0)
    }
}

/// Whether an interface of that name exists in the calling thread's network namespace (asked
/// with SIOCGIFINDEX on a socket: /sys/class/net shows the namespace sysfs was mounted in).
pub fn interface_exists(name: &str) -> bool {
    if valid_ifname(name).is_err() {
        return false;
    }
    let Ok(ctl) = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let mut r = sys::ifreq(name);
    sys::ioctl_ifreq(ctl.as_fd(), uapi::SIOCGIFINDEX, &mut r).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_bits_never_ask_for_tso_without_csum() {
        let o = Offloads {
            csum: false,
            tso4: true,
            tso6: true,
            tso_ecn: true,
        };
        assert_eq!(o.bits(), 0);
        let o = Offloads {
            csum: true,
            tso4: true,
            tso6: false,
            tso_ecn: true,
        };
        assert_eq!(
            o.bits(),
            uapi::TUN_F_CSUM | uapi::TUN_F_TSO4 | uapi::TUN_F_TSO_ECN
        );
    }

    #[test]
    fn interface_names_are_checked_like_the_kernel_does() {
        assert!(valid_ifname("vif1.0").is_ok());
        assert!(valid_ifname("").is_err());
        assert!(valid_ifname("0123456789abcdef").is_err());
        assert!(valid_ifname("a/b").is_err());
        assert!(valid_ifname("a b").is_err());
        assert!(valid_ifname("..").is_err());
    }
}

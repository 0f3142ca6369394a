//! Receive-side steering and filtering state that the frontend configures: the Toeplitz hash
//! (control ring, `XEN_NETIF_CTRL_TYPE_*_HASH_*`, as Linux netback's hash.c) and the multicast
//! filter (TX extra-info MCAST_ADD/DEL, Linux's `xenvif_mcast_*`, at most
//! [`MCAST_MAX`] addresses).

use xen::abi::netif::*;

use super::offload::locate_l4;

/// Most multicast addresses a frontend may add (`XEN_NETBK_MCAST_MAX`).
pub const MCAST_MAX: usize = 64;
/// The hash types netback computes.
pub const SUPPORTED_HASH_FLAGS: u32 = XEN_NETIF_CTRL_HASH_TYPE_IPV4
    | XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP
    | XEN_NETIF_CTRL_HASH_TYPE_IPV6
    | XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP;

/// The Toeplitz hash of `data` under `key` (the key must be at least 4 bytes longer than the
/// data for every bit to have key material; missing key bytes count as zero).
pub fn toeplitz(key: &[u8], data: &[u8]) -> u32 {
    let kb = |i: usize| key.get(i).copied().unwrap_or(0);
    let mut window = u32::from_be_bytes([kb(0), kb(1), kb(2), kb(3)]);
    let mut hash = 0u32;
    for (i, byte) in data.iter().enumerate() {
        let next = kb(i + 4);
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | u32::from((next >> (7 - bit)) & 1);
        }
    }
    hash
}

/// The hash configuration of one vif.
#[derive(Debug, Clone)]
pub struct HashConfig {
    /// XEN_NETIF_CTRL_HASH_ALGORITHM_*.
    pub algorithm: u32,
    /// XEN_NETIF_CTRL_HASH_TYPE_* bits.
    pub flags: u32,
    /// The key (zero-padded).
    pub key: [u8; XEN_NETBK_MAX_HASH_KEY_SIZE],
    /// The mapping table (hash % len -> queue); empty: hash % queues.
    pub mapping: Vec<u32>,
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig {
            algorithm: XEN_NETIF_CTRL_HASH_ALGORITHM_NONE,
            flags: 0,
            key: [0; XEN_NETBK_MAX_HASH_KEY_SIZE],
            mapping: Vec::with_capacity(XEN_NETBK_MAX_HASH_MAPPING_SIZE as usize),
        }
    }
}

/// A computed hash and its type (a `_XEN_NETIF_CTRL_HASH_TYPE_*` bit number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHash {
    /// The value.
    pub value: u32,
    /// Bit number of the type.
    pub type_bit: u8,
}

impl HashConfig {
    /// Whether hashing is on.
    pub fn enabled(&self) -> bool {
        self.algorithm == XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ
    }

    /// The hash of a frame under the configured types (Linux's `xenvif_set_skb_hash`): the
    /// 4-tuple for TCP when the `_TCP` type is on, else the address pair when the address type
    /// is on, else none.
    pub fn hash(&self, frame: &[u8]) -> Option<FrameHash> {
        if !self.enabled() {
            return None;
        }
        let h = locate_l4(frame)?;
        let mut buf = [0u8; 36];
        let (addrs, tcp_bit, ip_bit) = if h.ipv6 {
            (
                frame.get(h.l3 + 8..h.l3 + 40)?,
                _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP,
                _XEN_NETIF_CTRL_HASH_TYPE_IPV6,
            )
        } else {
            (
                frame.get(h.l3 + 12..h.l3 + 20)?,
                _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP,
                _XEN_NETIF_CTRL_HASH_TYPE_IPV4,
            )
        };
        let n = addrs.len();
        buf[..n].copy_from_slice(addrs);
        let ports = frame.get(h.l4..h.l4 + 4);
        if h.proto == 6 && self.flags & (1 << tcp_bit) != 0 {
            if let Some(p) = ports {
                buf[n..n + 4].copy_from_slice(p);
                return Some(FrameHash {
                    value: toeplitz(&self.key, &buf[..n + 4]),
                    type_bit: tcp_bit as u8,
                });
            }
        }
        if self.flags & (1 << ip_bit) != 0 {
            return Some(FrameHash {
                value: toeplitz(&self.key, &buf[..n]),
                type_bit: ip_bit as u8,
            });
        }
        None
    }

    /// The queue a frame goes to (Linux's `xenvif_select_queue`): `mapping[hash % size]`, or
    /// `hash % queues` with no mapping; no hash means hash 0.
    pub fn queue_for(&self, hash: Option<FrameHash>, queues: u32) -> u32 {
        let v = hash.map_or(0, |h| h.value);
        let q = match self.mapping.len() {
            0 => v % queues.max(1),
            n => self.mapping.get(v as usize % n).copied().unwrap_or(0),
        };
        if q < queues {
            q
        } else {
            0
        }
    }
}

/// The multicast filter.
#[derive(Debug, Clone, Default)]
pub struct McastFilter {
    addrs: Vec<[u8; 6]>,
}

impl McastFilter {
    /// Adds an address; false if the filter is full (the request is answered ERROR).
    pub fn add(&mut self, addr: [u8; 6]) -> bool {
        if self.addrs.contains(&addr) {
            return true;
        }
        if self.addrs.len() >= MCAST_MAX {
            return false;
        }
        self.addrs.push(addr);
        true
    }
    /// Removes an address (absent is fine).
    pub fn del(&mut self, addr: [u8; 6]) {
        self.addrs.retain(|a| *a != addr);
    }
    /// Whether `addr` is in the filter.
    pub fn matches(&self, addr: &[u8]) -> bool {
        self.addrs.iter().any(|a| a[..] == *addr)
    }
    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
    /// Forgets every address.
    pub fn clear(&mut self) {
        self.addrs.clear();
    }
}

/// Whether a destination address is multicast but not broadcast (Linux filters only
/// PACKET_MULTICAST).
pub fn is_filtered_multicast(dst: &[u8]) -> bool {
    dst.first().is_some_and(|b| b & 1 != 0) && dst.iter().take(6).any(|b| *b != 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Microsoft RSS verification key and the first IPv4 vector of its suite.
    const MS_KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    #[test]
    fn test_toeplitz_matches_the_rss_verification_suite() {
        // 66.9.149.187:2794 -> 161.142.100.80:1766
        let ip = [66, 9, 149, 187, 161, 142, 100, 80];
        assert_eq!(toeplitz(&MS_KEY, &ip), 0x323e_8fc2);
        let mut t = ip.to_vec();
        t.extend_from_slice(&2794u16.to_be_bytes());
        t.extend_from_slice(&1766u16.to_be_bytes());
        assert_eq!(toeplitz(&MS_KEY, &t), 0x51cc_c178);
    }

    #[test]
    fn test_mcast_filter_caps_at_64() {
        let mut f = McastFilter::default();
        for i in 0..64u8 {
            assert!(f.add([1, 0, 0x5e, 0, 0, i]));
        }
        assert!(!f.add([1, 0, 0x5e, 0, 1, 0]));
        f.del([1, 0, 0x5e, 0, 0, 0]);
        assert!(f.add([1, 0, 0x5e, 0, 1, 0]));
        assert!(!is_filtered_multicast(&[0xff; 6]));
        assert!(is_filtered_multicast(&[1, 0, 0x5e, 0, 0, 1]));
    }
}

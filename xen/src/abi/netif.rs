//! xen/io/netif.h: the network-device ring protocol (tx, rx and control rings).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Minimum number of slots a backend must accept in one packet (`XEN_NETIF_NR_SLOTS_MIN`).
pub const XEN_NETIF_NR_SLOTS_MIN: usize = 18;
/// Largest packet on the tx ring (`XEN_NETIF_MAX_TX_SIZE`).
pub const XEN_NETIF_MAX_TX_SIZE: u32 = 0xffff;

/// tx flag bit: the checksum is blank (to be computed by the backend / offload).
pub const _NETTXF_CSUM_BLANK: u16 = 0;
/// tx flag: checksum blank.
pub const NETTXF_CSUM_BLANK: u16 = 1 << _NETTXF_CSUM_BLANK;
/// tx flag bit: the data is already validated.
pub const _NETTXF_DATA_VALIDATED: u16 = 1;
/// tx flag: data validated.
pub const NETTXF_DATA_VALIDATED: u16 = 1 << _NETTXF_DATA_VALIDATED;
/// tx flag bit: more slots follow for this packet.
pub const _NETTXF_MORE_DATA: u16 = 2;
/// tx flag: more data.
pub const NETTXF_MORE_DATA: u16 = 1 << _NETTXF_MORE_DATA;
/// tx flag bit: an extra-info slot follows.
pub const _NETTXF_EXTRA_INFO: u16 = 3;
/// tx flag: extra info follows.
pub const NETTXF_EXTRA_INFO: u16 = 1 << _NETTXF_EXTRA_INFO;

/// rx flag bit: data validated.
pub const _NETRXF_DATA_VALIDATED: u16 = 0;
/// rx flag: data validated.
pub const NETRXF_DATA_VALIDATED: u16 = 1 << _NETRXF_DATA_VALIDATED;
/// rx flag bit: checksum blank.
pub const _NETRXF_CSUM_BLANK: u16 = 1;
/// rx flag: checksum blank.
pub const NETRXF_CSUM_BLANK: u16 = 1 << _NETRXF_CSUM_BLANK;
/// rx flag bit: more slots follow.
pub const _NETRXF_MORE_DATA: u16 = 2;
/// rx flag: more data.
pub const NETRXF_MORE_DATA: u16 = 1 << _NETRXF_MORE_DATA;
/// rx flag bit: an extra-info slot follows.
pub const _NETRXF_EXTRA_INFO: u16 = 3;
/// rx flag: extra info follows.
pub const NETRXF_EXTRA_INFO: u16 = 1 << _NETRXF_EXTRA_INFO;
/// rx flag bit: GSO prefix descriptor (feature-gso-*-prefix).
pub const _NETRXF_GSO_PREFIX: u16 = 4;
/// rx flag: GSO prefix.
pub const NETRXF_GSO_PREFIX: u16 = 1 << _NETRXF_GSO_PREFIX;

/// Extra type: none (invalid).
pub const XEN_NETIF_EXTRA_TYPE_NONE: u8 = 0;
/// Extra type: GSO (`u.gso`).
pub const XEN_NETIF_EXTRA_TYPE_GSO: u8 = 1;
/// Extra type: add a multicast address (`u.mcast`).
pub const XEN_NETIF_EXTRA_TYPE_MCAST_ADD: u8 = 2;
/// Extra type: delete a multicast address (`u.mcast`).
pub const XEN_NETIF_EXTRA_TYPE_MCAST_DEL: u8 = 3;
/// Extra type: hash value (`u.hash`).
pub const XEN_NETIF_EXTRA_TYPE_HASH: u8 = 4;
/// One past the last extra type.
pub const XEN_NETIF_EXTRA_TYPE_MAX: u8 = 5;
/// Extra flag bit: another extra-info slot follows.
pub const _XEN_NETIF_EXTRA_FLAG_MORE: u8 = 0;
/// Extra flag: more extras follow.
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << _XEN_NETIF_EXTRA_FLAG_MORE;

/// GSO type: none.
pub const XEN_NETIF_GSO_TYPE_NONE: u8 = 0;
/// GSO type: TCPv4.
pub const XEN_NETIF_GSO_TYPE_TCPV4: u8 = 1;
/// GSO type: TCPv6.
pub const XEN_NETIF_GSO_TYPE_TCPV6: u8 = 2;

/// Response status: dropped.
pub const NETIF_RSP_DROPPED: i16 = -2;
/// Response status: error.
pub const NETIF_RSP_ERROR: i16 = -1;
/// Response status: okay.
pub const NETIF_RSP_OKAY: i16 = 0;
/// Response status: null response (padding slot for an extra-info request).
pub const NETIF_RSP_NULL: i16 = 1;

/// Hash type bit: IPv4 addresses.
pub const _XEN_NETIF_CTRL_HASH_TYPE_IPV4: u32 = 0;
/// Hash type: IPv4.
pub const XEN_NETIF_CTRL_HASH_TYPE_IPV4: u32 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4;
/// Hash type bit: IPv4 + TCP ports.
pub const _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP: u32 = 1;
/// Hash type: IPv4 + TCP.
pub const XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP: u32 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP;
/// Hash type bit: IPv6 addresses.
pub const _XEN_NETIF_CTRL_HASH_TYPE_IPV6: u32 = 2;
/// Hash type: IPv6.
pub const XEN_NETIF_CTRL_HASH_TYPE_IPV6: u32 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6;
/// Hash type bit: IPv6 + TCP ports.
pub const _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP: u32 = 3;
/// Hash type: IPv6 + TCP.
pub const XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP: u32 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP;
/// Hash algorithm: none (hashing off).
pub const XEN_NETIF_CTRL_HASH_ALGORITHM_NONE: u32 = 0;
/// Hash algorithm: Toeplitz.
pub const XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ: u32 = 1;
/// Largest hash key Linux netback accepts (`XEN_NETBK_MAX_HASH_KEY_SIZE`; not in netif.h).
pub const XEN_NETBK_MAX_HASH_KEY_SIZE: usize = 40;
/// Largest hash mapping table Linux netback accepts (`XEN_NETBK_MAX_HASH_MAPPING_SIZE`).
pub const XEN_NETBK_MAX_HASH_MAPPING_SIZE: u32 = 128;

/// Control request type: invalid.
pub const XEN_NETIF_CTRL_TYPE_INVALID: u16 = 0;
/// Control request type: get hash flags.
pub const XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS: u16 = 1;
/// Control request type: set hash flags.
pub const XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS: u16 = 2;
/// Control request type: set hash key.
pub const XEN_NETIF_CTRL_TYPE_SET_HASH_KEY: u16 = 3;
/// Control request type: get hash mapping size.
pub const XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE: u16 = 4;
/// Control request type: set hash mapping size.
pub const XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE: u16 = 5;
/// Control request type: set hash mapping.
pub const XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING: u16 = 6;
/// Control request type: set hash algorithm.
pub const XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM: u16 = 7;
/// Control request type: get gref mapping size.
pub const XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE: u16 = 8;
/// Control request type: add gref mapping.
pub const XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING: u16 = 9;
/// Control request type: delete gref mapping.
pub const XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING: u16 = 10;

/// Control status: success.
pub const XEN_NETIF_CTRL_STATUS_SUCCESS: u32 = 0;
/// Control status: not supported.
pub const XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED: u32 = 1;
/// Control status: invalid parameter.
pub const XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER: u32 = 2;
/// Control status: buffer overflow.
pub const XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW: u32 = 3;
/// Gref flag bit: read-only.
pub const _XEN_NETIF_CTRLF_GREF_READONLY: u16 = 0;
/// Gref flag: read-only.
pub const XEN_NETIF_CTRLF_GREF_READONLY: u16 = 1 << _XEN_NETIF_CTRLF_GREF_READONLY;

/// `struct netif_tx_request`: one slot of a packet the frontend transmits.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifTxRequest {
    /// Grant of the page holding the data.
    pub gref: u32,
    /// Offset of the data within the page.
    pub offset: u16,
    /// NETTXF_*.
    pub flags: u16,
    /// Echoed in the response.
    pub id: u16,
    /// First slot: size of the whole packet; others: size of this slot's data.
    pub size: u16,
}

/// `struct netif_tx_response`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifTxResponse {
    /// From the request.
    pub id: u16,
    /// NETIF_RSP_*.
    pub status: i16,
}

/// `struct netif_rx_request`: a page the frontend offers for received data.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifRxRequest {
    /// Echoed in the response.
    pub id: u16,
    /// Padding.
    pub pad: u16,
    /// Grant of the page.
    pub gref: u32,
}

/// `struct netif_rx_response`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifRxResponse {
    /// From the request.
    pub id: u16,
    /// Offset of the data in the page.
    pub offset: u16,
    /// NETRXF_*.
    pub flags: u16,
    /// Negative: NETIF_RSP_*; otherwise bytes received.
    pub status: i16,
}

/// `struct netif_extra_info`: an extra slot in place of a tx request or rx response.
///
/// `u` is the C union; read it through [`NetifExtraInfo::gso`], [`NetifExtraInfo::mcast`] or
/// [`NetifExtraInfo::hash`] according to `type_`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifExtraInfo {
    /// XEN_NETIF_EXTRA_TYPE_*.
    pub type_: u8,
    /// XEN_NETIF_EXTRA_FLAG_*.
    pub flags: u8,
    /// The union (6 bytes, 2-byte aligned).
    pub u: [u16; 3],
}

/// `u.gso` of [`NetifExtraInfo`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifExtraGso {
    /// Maximum payload size of each segment (the MSS).
    pub size: u16,
    /// XEN_NETIF_GSO_TYPE_*.
    pub type_: u8,
    /// Future expansion.
    pub pad: u8,
    /// GSO features (none defined yet).
    pub features: u16,
}

/// `u.mcast` of [`NetifExtraInfo`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifExtraMcast {
    /// Ethernet multicast address.
    pub addr: [u8; 6],
}

/// `u.hash` of [`NetifExtraInfo`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetifExtraHash {
    /// _XEN_NETIF_CTRL_HASH_TYPE_* (a bit number).
    pub type_: u8,
    /// XEN_NETIF_CTRL_HASH_ALGORITHM_*.
    pub algorithm: u8,
    /// The hash value (little-endian bytes).
    pub value: [u8; 4],
}

/// Byte offset of the union `u` in [`NetifExtraInfo`].
pub const NETIF_EXTRA_INFO_U_OFFSET: usize = 2;

impl NetifExtraInfo {
    fn union_as<T: FromBytes>(&self) -> T {
        // All three views are exactly 6 bytes, the size of `u`; the fallback is unreachable
        // but keeps this panic-free.
        T::read_from_bytes(self.u.as_bytes()).unwrap_or_else(|_| T::new_zeroed())
    }
    fn with_union<T: IntoBytes + Immutable>(type_: u8, flags: u8, v: &T) -> Self {
        let mut e = NetifExtraInfo {
            type_,
            flags,
            u: [0; 3],
        };
        let src = v.as_bytes();
        let dst = e.u.as_mut_bytes();
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        e
    }
    /// The union viewed as `u.gso`.
    pub fn gso(&self) -> NetifExtraGso {
        self.union_as()
    }
    /// The union viewed as `u.mcast`.
    pub fn mcast(&self) -> NetifExtraMcast {
        self.union_as()
    }
    /// The union viewed as `u.hash`.
    pub fn hash(&self) -> NetifExtraHash {
        self.union_as()
    }
    /// An extra of type GSO.
    pub fn new_gso(flags: u8, gso: &NetifExtraGso) -> Self {
        Self::with_union(XEN_NETIF_EXTRA_TYPE_GSO, flags, gso)
    }
    /// An extra of type MCAST_ADD or MCAST_DEL (`type_`).
    pub fn new_mcast(type_: u8, flags: u8, mcast: &NetifExtraMcast) -> Self {
        Self::with_union(type_, flags, mcast)
    }
    /// An extra of type HASH.
    pub fn new_hash(flags: u8, hash: &NetifExtraHash) -> Self {
        Self::with_union(XEN_NETIF_EXTRA_TYPE_HASH, flags, hash)
    }
}

impl NetifTxRequest {
    /// This tx slot read as a `netif_extra_info` (it follows a request with
    /// NETTXF_extra_info, or an extra with XEN_NETIF_EXTRA_FLAG_MORE).
    pub fn as_extra_info(&self) -> NetifExtraInfo {
        NetifExtraInfo::read_from_prefix(self.as_bytes())
            .map(|(v, _)| v)
            .unwrap_or_default()
    }
}

impl NetifRxResponse {
    /// This rx slot read as a `netif_extra_info` (it follows a response with
    /// NETRXF_extra_info).
    pub fn as_extra_info(&self) -> NetifExtraInfo {
        NetifExtraInfo::read_from_prefix(self.as_bytes())
            .map(|(v, _)| v)
            .unwrap_or_default()
    }
}

/// `struct xen_netif_ctrl_request`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenNetifCtrlRequest {
    /// Echoed in the response.
    pub id: u16,
    /// XEN_NETIF_CTRL_TYPE_*.
    pub type_: u16,
    /// Type-specific arguments.
    pub data: [u32; 3],
}

/// `struct xen_netif_ctrl_response`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenNetifCtrlResponse {
    /// From the request.
    pub id: u16,
    /// From the request.
    pub type_: u16,
    /// XEN_NETIF_CTRL_STATUS_*.
    pub status: u32,
    /// Type-specific result.
    pub data: u32,
}

/// `struct xen_netif_gref`: an entry of an ADD/DEL_GREF_MAPPING page.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XenNetifGref {
    /// Grant reference.
    pub ref_: u32,
    /// XEN_NETIF_CTRLF_GREF_*.
    pub flags: u16,
    /// GNTST_* (written by the backend).
    pub status: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_extra_info_gso_roundtrip_through_union() {
        let g = NetifExtraGso {
            size: 1448,
            type_: XEN_NETIF_GSO_TYPE_TCPV4,
            pad: 0,
            features: 0,
        };
        let e = NetifExtraInfo::new_gso(XEN_NETIF_EXTRA_FLAG_MORE, &g);
        assert_eq!(e.type_, XEN_NETIF_EXTRA_TYPE_GSO);
        assert_eq!(e.gso(), g);
        assert_eq!(&e.as_bytes()[2..4], &1448u16.to_le_bytes());
    }

    #[test]
    fn test_extra_info_mcast_and_hash_views_share_bytes() {
        let m = NetifExtraMcast {
            addr: [0x01, 0x00, 0x5e, 1, 2, 3],
        };
        let e = NetifExtraInfo::new_mcast(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, &m);
        assert_eq!(e.mcast(), m);
        assert_eq!(e.hash().type_, 0x01);
        assert_eq!(e.hash().value, [0x5e, 1, 2, 3]);
    }
}

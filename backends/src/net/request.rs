//! TX request parsing: the one place where the slots of a packet the frontend transmits become
//! a validated [`TxPacket`]. A pure function over requests already copied out of the ring
//! ([`parse_tx`]), so the ring thread, the fuzz target and the tests share it.
//!
//! The rules are Linux xen-netback's (`xenvif_get_extras`, `xenvif_count_requests`,
//! `xenvif_tx_build_gops`, `xenvif_set_skb_gso`), slot for slot:
//!
//! * The first slot's `size` is the whole packet; each follow-on slot (NETTXF_more_data)
//!   carries its own size, and the first slot holds what remains.
//! * Extra-info slots (NETTXF_extra_info, then XEN_NETIF_EXTRA_FLAG_MORE) follow the first
//!   slot. A type of 0 or beyond XEN_NETIF_EXTRA_TYPE_MAX is fatal. A multicast add/delete
//!   makes the request a control message: the first slot and its extras, no data.
//! * More than [`MAX_SLOTS_DROP`] follow-on slots: the packet is consumed and dropped (ERROR);
//!   more than [`MAX_SLOTS_FATAL`]: the frontend is malicious (fatal). A follow-on slot larger
//!   than what remains of the packet: consumed and dropped (buggy frontends do this).
//! * Any slot with `offset + size > 4096` is fatal, the first slot included.
//! * A first slot shorter than an Ethernet header: dropped (ERROR), as Linux does.
//! * A GSO extra with `size == 0` or a type other than TCPv4/TCPv6 is fatal.
//! * Zero-size follow-on slots (XSA-448) are accepted, answered OKAY and carry no data.
//! * A packet whose slots are not all published is [`TxParse::Incomplete`]; the ring thread
//!   treats it as fatal once the frontend has nothing more published ("Asked for N slots").

use xen::abi::netif::*;
use xen::PAGE_SIZE;

/// Ethernet header length: the least the first slot must hold.
pub const ETH_HLEN: usize = 14;
/// Follow-on slots beyond which a packet is dropped (`XEN_NETBK_LEGACY_SLOTS_MAX`, which is
/// `XEN_NETIF_NR_SLOTS_MIN`): a packet may have this many follow-on slots, 19 in all.
pub const MAX_SLOTS_DROP: usize = XEN_NETIF_NR_SLOTS_MIN;
/// Follow-on slots at which the frontend is declared malicious (`fatal_skb_slots`, 20).
pub const MAX_SLOTS_FATAL: usize = 20;
/// Most extra-info slots one packet may carry (one per type).
pub const MAX_EXTRAS: usize = (XEN_NETIF_EXTRA_TYPE_MAX - 1) as usize;
/// The most slots one packet can consume (first, extras, follow-ons up to the fatal limit).
pub const MAX_PACKET_SLOTS: usize = 1 + MAX_EXTRAS + MAX_SLOTS_FATAL;

/// GSO of a transmitted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxGso {
    /// XEN_NETIF_GSO_TYPE_TCPV4 or _TCPV6.
    pub type_: u8,
    /// Segment payload size (never 0).
    pub size: u16,
}

/// A multicast filter change carried by a TX request (no data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McastOp {
    /// Add (true) or delete.
    pub add: bool,
    /// The address.
    pub addr: [u8; 6],
}

/// A validated packet: `slots` requests starting at the one parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPacket {
    /// Requests consumed: the first, `extras`, then the follow-on slots.
    pub slots: usize,
    /// Extra-info slots after the first (answered NETIF_RSP_NULL).
    pub extras: usize,
    /// Whole frame length (the first slot's `size`).
    pub len: usize,
    /// Bytes of the frame in the first slot (at least [`ETH_HLEN`]).
    pub first_len: usize,
    /// NETTXF_* of the first slot.
    pub flags: u16,
    /// GSO, if a GSO extra was given.
    pub gso: Option<TxGso>,
    /// A multicast add/delete: then the packet has no data and `slots == 1 + extras`.
    pub mcast: Option<McastOp>,
}

impl TxPacket {
    /// Index (within the parsed slice) of the first follow-on slot.
    pub fn frags_start(&self) -> usize {
        1 + self.extras
    }
}

/// Why a packet is dropped (all its slots answered NETIF_RSP_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    /// More follow-on slots than [`MAX_SLOTS_DROP`].
    #[error("packet uses more than {MAX_SLOTS_DROP} follow-on slots")]
    TooManySlots,
    /// A follow-on slot claims more bytes than remain of the packet.
    #[error("slot size {size} exceeds the {remaining} bytes remaining of the packet")]
    SlotTooLarge {
        /// The slot's size.
        size: u16,
        /// What remained.
        remaining: u16,
    },
    /// The first slot holds less than an Ethernet header.
    #[error("first slot holds {0} bytes, less than an Ethernet header")]
    Runt(usize),
}

/// A protocol violation after which Linux disables the interface (`xenvif_fatal_tx_err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxFatal {
    /// `fatal_skb_slots` follow-on slots.
    #[error("malicious frontend using {0} slots for one packet")]
    MaliciousSlots(usize),
    /// A slot crosses its page.
    #[error("slot offset {offset} + size {size} crosses the page boundary")]
    CrossPage {
        /// Offset.
        offset: u16,
        /// Size.
        size: usize,
    },
    /// Extra-info type 0 or unknown.
    #[error("invalid extra-info type {0}")]
    BadExtraType(u8),
    /// GSO size 0.
    #[error("GSO size must not be zero")]
    GsoSizeZero,
    /// GSO type unknown.
    #[error("bad GSO type {0}")]
    BadGsoType(u8),
    /// The packet claims more slots than the frontend published.
    #[error("packet needs more slots than the {0} the frontend published")]
    Incomplete(usize),
}

/// What [`parse_tx`] found at the head of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxParse {
    /// A valid packet (or multicast control message).
    Packet(TxPacket),
    /// Consume `slots` requests (the first `extras` after the first answered NULL) and answer
    /// the rest NETIF_RSP_ERROR.
    Drop {
        /// Requests consumed.
        slots: usize,
        /// Extra slots among them.
        extras: usize,
        /// Why.
        why: TxDrop,
    },
    /// The packet's slots run past the requests given.
    Incomplete,
    /// Disable the interface.
    Fatal(TxFatal),
}

fn crosses_page(offset: u16, size: usize) -> bool {
    usize::from(offset) + size > PAGE_SIZE
}

/// Parses the packet at the head of `reqs` (private copies of consecutive ring slots).
/// Never panics, whatever the requests hold.
pub fn parse_tx(reqs: &[NetifTxRequest]) -> TxParse {
    let Some(first) = reqs.first().copied() else {
        return TxParse::Incomplete;
    };
    // Extras (xenvif_get_extras).
    let mut extras = 0usize;
    let mut gso_extra: Option<NetifExtraGso> = None;
    let mut mcast = None;
    if first.flags & NETTXF_EXTRA_INFO != 0 {
        loop {
            let Some(slot) = reqs.get(1 + extras) else {
                return TxParse::Incomplete;
            };
            let e = slot.as_extra_info();
            if e.type_ == XEN_NETIF_EXTRA_TYPE_NONE || e.type_ >= XEN_NETIF_EXTRA_TYPE_MAX {
                return TxParse::Fatal(TxFatal::BadExtraType(e.type_));
            }
            extras += 1;
            match e.type_ {
                XEN_NETIF_EXTRA_TYPE_GSO => gso_extra = Some(e.gso()),
                XEN_NETIF_EXTRA_TYPE_MCAST_ADD => {
                    mcast = Some(McastOp {
                        add: true,
                        addr: e.mcast().addr,
                    })
                }
                XEN_NETIF_EXTRA_TYPE_MCAST_DEL => {
                    // Linux applies ADD when both are present; keep the first seen.
                    mcast.get_or_insert(McastOp {
                        add: false,
                        addr: e.mcast().addr,
                    });
                }
                _ => {} // HASH: the frontend's own hash, not needed by the tap.
            }
            if e.flags & XEN_NETIF_EXTRA_FLAG_MORE == 0 {
                break;
            }
            if extras >= MAX_EXTRAS {
                // Each type at most once: a longer chain repeats a type; Linux overwrites and
                // goes on, bounded by the ring. We bound it here.
                return TxParse::Fatal(TxFatal::BadExtraType(e.type_));
            }
        }
    }
    if let Some(op) = mcast {
        return TxParse::Packet(TxPacket {
            slots: 1 + extras,
            extras,
            len: 0,
            first_len: 0,
            flags: first.flags,
            gso: None,
            mcast: Some(op),
        });
    }
    // Follow-on slots (xenvif_count_requests).
    let frags = 1 + extras;
    let mut remaining = first.size;
    let mut drop: Option<TxDrop> = None;
    let mut n = 0usize;
    let mut more = first.flags & NETTXF_MORE_DATA != 0;
    while more {
        if n >= MAX_SLOTS_FATAL {
            return TxParse::Fatal(TxFatal::MaliciousSlots(n + 1));
        }
        if drop.is_none() && n >= MAX_SLOTS_DROP {
            drop = Some(TxDrop::TooManySlots);
        }
        let Some(txp) = reqs.get(frags + n).copied() else {
            return TxParse::Incomplete;
        };
        if drop.is_none() && txp.size > remaining {
            drop = Some(TxDrop::SlotTooLarge {
                size: txp.size,
                remaining,
            });
        }
        remaining = remaining.wrapping_sub(txp.size);
        n += 1;
        if crosses_page(txp.offset, usize::from(txp.size)) {
            return TxParse::Fatal(TxFatal::CrossPage {
                offset: txp.offset,
                size: usize::from(txp.size),
            });
        }
        more = txp.flags & NETTXF_MORE_DATA != 0;
    }
    let slots = frags + n;
    if let Some(why) = drop {
        return TxParse::Drop { slots, extras, why };
    }
    let first_len = usize::from(remaining);
    if first_len < ETH_HLEN {
        return TxParse::Drop {
            slots,
            extras,
            why: TxDrop::Runt(first_len),
        };
    }
    if crosses_page(first.offset, first_len) {
        return TxParse::Fatal(TxFatal::CrossPage {
            offset: first.offset,
            size: first_len,
        });
    }
    let gso = match gso_extra {
        None => None,
        Some(g) => {
            if g.size == 0 {
                return TxParse::Fatal(TxFatal::GsoSizeZero);
            }
            if g.type_ != XEN_NETIF_GSO_TYPE_TCPV4 && g.type_ != XEN_NETIF_GSO_TYPE_TCPV6 {
                return TxParse::Fatal(TxFatal::BadGsoType(g.type_));
            }
            Some(TxGso {
                type_: g.type_,
                size: g.size,
            })
        }
    };
    TxParse::Packet(TxPacket {
        slots,
        extras,
        len: usize::from(first.size),
        first_len,
        flags: first.flags,
        gso,
        mcast: None,
    })
}

/// A TX ring slot holding `e` (the slot is larger; the rest is zero), as a frontend writes it.
pub fn extra_slot(e: &NetifExtraInfo) -> NetifTxRequest {
    // netif_extra_info is 8 bytes: type, flags, then the 6-byte union, over the request's
    // gref (4 bytes), offset and flags (2 each).
    let [u0, u1, u2] = e.u.map(u16::to_le_bytes);
    NetifTxRequest {
        gref: u32::from_le_bytes([e.type_, e.flags, u0[0], u0[1]]),
        offset: u16::from_le_bytes(u1),
        flags: u16::from_le_bytes(u2),
        id: 0,
        size: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(size: u16, flags: u16) -> NetifTxRequest {
        NetifTxRequest {
            gref: 1,
            offset: 0,
            flags,
            id: 0,
            size,
        }
    }

    fn extra(e: NetifExtraInfo) -> NetifTxRequest {
        extra_slot(&e)
    }

    #[test]
    fn test_parse_single_slot_packet() {
        let p = parse_tx(&[slot(60, 0)]);
        assert!(matches!(
            p,
            TxParse::Packet(TxPacket {
                slots: 1,
                len: 60,
                first_len: 60,
                ..
            })
        ));
    }

    #[test]
    fn test_parse_zero_size_follow_ons_are_part_of_the_packet() {
        let p = parse_tx(&[
            slot(60, NETTXF_MORE_DATA),
            slot(0, NETTXF_MORE_DATA),
            slot(0, NETTXF_MORE_DATA),
            slot(0, 0),
        ]);
        assert!(matches!(
            p,
            TxParse::Packet(TxPacket {
                slots: 4,
                len: 60,
                first_len: 60,
                ..
            })
        ));
    }

    #[test]
    fn test_parse_slot_counts_drop_then_fatal() {
        let mk = |n: usize| {
            let mut v = vec![slot(14 + n as u16, NETTXF_MORE_DATA)];
            for i in 0..n {
                v.push(slot(1, if i + 1 < n { NETTXF_MORE_DATA } else { 0 }));
            }
            v
        };
        assert!(matches!(
            parse_tx(&mk(18)),
            TxParse::Packet(TxPacket { slots: 19, .. })
        ));
        assert!(matches!(
            parse_tx(&mk(19)),
            TxParse::Drop {
                slots: 20,
                why: TxDrop::TooManySlots,
                ..
            }
        ));
        assert!(matches!(parse_tx(&mk(20)), TxParse::Drop { slots: 21, .. }));
        assert!(matches!(
            parse_tx(&mk(21)),
            TxParse::Fatal(TxFatal::MaliciousSlots(_))
        ));
    }

    #[test]
    fn test_parse_gso_extra_zero_size_is_fatal() {
        let g = NetifExtraInfo::new_gso(
            0,
            &NetifExtraGso {
                size: 0,
                type_: XEN_NETIF_GSO_TYPE_TCPV4,
                pad: 0,
                features: 0,
            },
        );
        let p = parse_tx(&[slot(60, NETTXF_EXTRA_INFO), extra(g)]);
        assert_eq!(p, TxParse::Fatal(TxFatal::GsoSizeZero));
    }

    /// The fuzz target's invariants over many pseudo-random slot runs biased towards the
    /// interesting values (small sizes, page edges, flag combinations, extra slots).
    #[test]
    fn test_parse_random_slot_runs_keep_the_invariants() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pick = |r: u64, v: &[u16]| v[(r % v.len() as u64) as usize];
        for _ in 0..20_000 {
            let n = 1 + (next() % 30) as usize;
            let reqs: Vec<NetifTxRequest> = (0..n)
                .map(|_| {
                    let r = next();
                    if r % 7 == 0 {
                        let g = NetifExtraInfo::new_gso(
                            (r >> 8) as u8 & 1,
                            &NetifExtraGso {
                                size: pick(r >> 16, &[0, 1, 1448]),
                                type_: (r >> 24) as u8 % 4,
                                pad: 0,
                                features: 0,
                            },
                        );
                        let mut e = extra_slot(&g);
                        e.gref = (e.gref & !0xff) | ((r >> 32) as u32 % 6);
                        return e;
                    }
                    NetifTxRequest {
                        gref: 1,
                        offset: pick(r >> 8, &[0, 1, 2048, 4082, 4095, 4096]),
                        flags: (r >> 24) as u16 & 0xf,
                        id: 0,
                        size: pick(r >> 32, &[0, 1, 7, 13, 14, 60, 1514, 4096, 65535]),
                    }
                })
                .collect();
            let mut pos = 0;
            while pos < reqs.len() {
                match parse_tx(&reqs[pos..]) {
                    TxParse::Packet(p) => {
                        assert!(p.slots >= 1 && pos + p.slots <= reqs.len());
                        if p.mcast.is_none() {
                            assert!(p.slots - p.frags_start() <= MAX_SLOTS_DROP);
                            assert!(p.first_len >= ETH_HLEN);
                            assert!(usize::from(reqs[pos].offset) + p.first_len <= PAGE_SIZE);
                            let frags: usize = reqs[pos + p.frags_start()..pos + p.slots]
                                .iter()
                                .map(|r| {
                                    assert!(
                                        usize::from(r.offset) + usize::from(r.size) <= PAGE_SIZE
                                    );
                                    usize::from(r.size)
                                })
                                .sum();
                            assert_eq!(p.first_len + frags, p.len);
                            assert!(p.gso.is_none_or(|g| g.size != 0));
                        }
                        pos += p.slots;
                    }
                    TxParse::Drop { slots, extras, .. } => {
                        assert!(slots >= 1 && pos + slots <= reqs.len() && extras < slots);
                        pos += slots;
                    }
                    TxParse::Incomplete | TxParse::Fatal(_) => break,
                }
            }
        }
    }
}

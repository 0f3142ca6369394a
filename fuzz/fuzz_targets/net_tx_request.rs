//! Arbitrary bytes as a run of netif TX ring slots (12 bytes each, as copied out of the ring):
//! `parse_tx` must never panic, and whatever it accepts must satisfy what netback's TX path
//! relies on (every data slot inside its page, the data adding up to the frame, the slot and
//! extra counts within Linux's limits, a consumed count within the slots given).
#![no_main]

use backends::net::request::{
    parse_tx, TxParse, ETH_HLEN, MAX_EXTRAS, MAX_PACKET_SLOTS, MAX_SLOTS_DROP,
};
use libfuzzer_sys::fuzz_target;
use xen::abi::netif::*;
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let reqs: Vec<NetifTxRequest> = data
        .chunks_exact(12)
        .filter_map(|c| NetifTxRequest::read_from_bytes(c).ok())
        .collect();
    let mut pos = 0;
    // Parse packets one after another, as the ring thread does.
    while pos < reqs.len() {
        match parse_tx(&reqs[pos..]) {
            TxParse::Packet(p) => {
                assert!(p.slots >= 1 && pos + p.slots <= reqs.len());
                assert!(p.slots <= MAX_PACKET_SLOTS && p.extras <= MAX_EXTRAS);
                if p.mcast.is_some() {
                    assert_eq!(p.slots, 1 + p.extras);
                } else {
                    assert!(p.slots - p.frags_start() <= MAX_SLOTS_DROP);
                    assert!(p.first_len >= ETH_HLEN);
                    let first = reqs[pos];
                    assert!(usize::from(first.offset) + p.first_len <= 4096);
                    let frags: usize = reqs[pos + p.frags_start()..pos + p.slots]
                        .iter()
                        .map(|r| {
                            assert!(usize::from(r.offset) + usize::from(r.size) <= 4096);
                            usize::from(r.size)
                        })
                        .sum();
                    assert_eq!(p.first_len + frags, p.len);
                    if let Some(g) = p.gso {
                        assert!(g.size != 0);
                        assert!(
                            g.type_ == XEN_NETIF_GSO_TYPE_TCPV4
                                || g.type_ == XEN_NETIF_GSO_TYPE_TCPV6
                        );
                    }
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
});

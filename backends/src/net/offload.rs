//! Checksum and GSO metadata between netif flags and `virtio_net_hdr`, as Linux netback's
//! `checksum_setup` (`skb_checksum_setup`) and `xenvif_set_skb_gso` do: the L4 header is found
//! by parsing the frame (Ethernet, one optional 802.1Q tag, IPv4 or IPv6 with its extension
//! headers), never trusted from the guest.

use super::engine::VirtioNetHdr;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
/// IP protocol numbers.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offset of the checksum in a TCP header.
pub const TCP_CSUM_OFFSET: u16 = 16;
/// Offset of the checksum in a UDP header.
pub const UDP_CSUM_OFFSET: u16 = 6;

/// Why a frame's offload metadata cannot be set up (the frame is dropped and counted, the
/// guest's request still answered OKAY, as Linux does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Not IPv4/IPv6, truncated headers, a fragment, or an L4 protocol without a checksum
    /// offload (only TCP and UDP).
    #[error("cannot locate a TCP/UDP header for checksum offload")]
    NoL4,
    /// GSO on something that is not TCP of the announced IP version.
    #[error("GSO type does not match the frame")]
    GsoMismatch,
}

/// Where the L3/L4 headers of a frame are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4 {
    /// Offset of the IP header.
    pub l3: usize,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    /// Offset of the L4 header.
    pub l4: usize,
    /// IP protocol of the L4 header.
    pub proto: u8,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses Ethernet (with at most one VLAN tag) and IP headers.
pub fn locate_l4(frame: &[u8]) -> Option<L4> {
    let mut l3 = 14;
    let mut et = be16(frame, 12)?;
    if et == ETHERTYPE_VLAN {
        et = be16(frame, 16)?;
        l3 = 18;
    }
    match et {
        ETHERTYPE_IPV4 => {
            let vihl = *frame.get(l3)?;
            if vihl >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(vihl & 0xf) * 4;
            if ihl < 20 {
                return None;
            }
            let frag = be16(frame, l3 + 6)?;
            // More fragments, or a non-zero fragment offset: no L4 header to offload.
            if frag & 0x3fff != 0 {
                return None;
            }
            let proto = *frame.get(l3 + 9)?;
            let l4 = l3 + ihl;
            (l4 <= frame.len()).then_some(L4 {
                l3,
                ipv6: false,
                l4,
                proto,
            })
        }
        ETHERTYPE_IPV6 => {
            let mut next = *frame.get(l3 + 6)?;
            let mut off = l3 + 40;
            // Hop-by-hop, routing, destination options, AH: bounded walk.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        next = *frame.get(off)?;
                        off += (usize::from(*frame.get(off + 1)?) + 1) * 8;
                    }
                    51 => {
                        next = *frame.get(off)?;
                        off += (usize::from(*frame.get(off + 1)?) + 2) * 4;
                    }
                    44 => return None, // fragment
                    _ => break,
                }
            }
            (off <= frame.len()).then_some(L4 {
                l3,
                ipv6: true,
                l4: off,
                proto: next,
            })
        }
        _ => None,
    }
}

/// One's-complement sum of `data` (network byte order) added to `sum`.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        if sum & 0x8000_0000 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

/// Folds a sum to 16 bits.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The (uncomplemented, folded) pseudo-header sum of the L4 segment at `h`.
fn pseudo_sum(frame: &[u8], h: &L4) -> Option<u16> {
    let len = frame.len().checked_sub(h.l4)?;
    let mut s = if h.ipv6 {
        csum_add(0, frame.get(h.l3 + 8..h.l3 + 40)?)
    } else {
        csum_add(0, frame.get(h.l3 + 12..h.l3 + 20)?)
    };
    s = s.wrapping_add(u32::from(h.proto));
    s = s.wrapping_add(len as u32);
    Some(csum_fold(s))
}

fn csum_offset_of(proto: u8) -> Option<u16> {
    match proto {
        IPPROTO_TCP => Some(TCP_CSUM_OFFSET),
        IPPROTO_UDP => Some(UDP_CSUM_OFFSET),
        _ => None,
    }
}

/// The `virtio_net_hdr` of a frame the guest sent with NETTXF flags `csum_blank` /
/// `data_validated` and GSO `gso` (XEN_NETIF_GSO_TYPE_*, size). For GSO without a blank
/// checksum, the pseudo-header checksum is written into the frame and the checksum marked
/// partial (Linux's "GSO without partial checksum" fixup).
pub fn tx_header(
    frame: &mut [u8],
    csum_blank: bool,
    data_validated: bool,
    gso: Option<(u8, u16)>,
) -> Result<VirtioNetHdr, OffloadError> {
    let mut hdr = VirtioNetHdr::default();
    if !csum_blank && gso.is_none() {
        if data_validated {
            hdr.flags = VirtioNetHdr::F_DATA_VALID;
        }
        return Ok(hdr);
    }
    let h = locate_l4(frame).ok_or(OffloadError::NoL4)?;
    let off = csum_offset_of(h.proto).ok_or(OffloadError::NoL4)?;
    let field = h.l4 + usize::from(off);
    if field + 2 > frame.len() {
        return Err(OffloadError::NoL4);
    }
    let csum_start = u16::try_from(h.l4).map_err(|_| OffloadError::NoL4)?;
    hdr.flags = VirtioNetHdr::F_NEEDS_CSUM;
    hdr.csum_start = csum_start;
    hdr.csum_offset = off;
    if let Some((type_, size)) = gso {
        let want_v6 = type_ == xen::abi::netif::XEN_NETIF_GSO_TYPE_TCPV6;
        if h.proto != IPPROTO_TCP || h.ipv6 != want_v6 {
            return Err(OffloadError::GsoMismatch);
        }
        let doff = usize::from(frame.get(h.l4 + 12).copied().ok_or(OffloadError::NoL4)? >> 4) * 4;
        let hdr_len = h.l4 + doff.max(20);
        if hdr_len > frame.len() {
            return Err(OffloadError::NoL4);
        }
        hdr.gso_type = if want_v6 {
            VirtioNetHdr::GSO_TCPV6
        } else {
            VirtioNetHdr::GSO_TCPV4
        };
        hdr.gso_size = size;
        hdr.hdr_len = hdr_len as u16;
        if !csum_blank {
            let p = pseudo_sum(frame, &h).ok_or(OffloadError::NoL4)?;
            frame[field..field + 2].copy_from_slice(&p.to_be_bytes());
        }
    }
    Ok(hdr)
}

/// Completes a partial checksum in software (for a frontend that cannot take a blank one):
/// the field at `csum_start + csum_offset` holds the pseudo-header sum.
pub fn complete_checksum(frame: &mut [u8], csum_start: u16, csum_offset: u16) -> bool {
    let start = usize::from(csum_start);
    let field = start + usize::from(csum_offset);
    if start > frame.len() || field + 2 > frame.len() {
        return false;
    }
    let s = csum_fold(csum_add(0, &frame[start..]));
    let mut c = !s;
    if c == 0 && csum_offset == UDP_CSUM_OFFSET {
        c = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Whether the frame is IPv6 (for `feature-ipv6-csum-offload`).
pub fn is_ipv6(frame: &[u8]) -> bool {
    locate_l4(frame).is_some_and(|h| h.ipv6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_tcp(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        let tot = (20 + 20 + payload) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f[23] = IPPROTO_TCP;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34 + 12] = 5 << 4;
        f
    }

    #[test]
    fn test_tx_header_csum_blank_tcp_points_at_tcp_checksum() {
        let mut f = ipv4_tcp(10);
        let h = tx_header(&mut f, true, false, None).unwrap();
        assert_eq!(h.flags, VirtioNetHdr::F_NEEDS_CSUM);
        assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    }

    #[test]
    fn test_tx_header_gso_sets_hdr_len_and_mss() {
        let mut f = ipv4_tcp(3000);
        let h = tx_header(&mut f, true, false, Some((1, 1448))).unwrap();
        assert_eq!(h.gso_type, VirtioNetHdr::GSO_TCPV4);
        assert_eq!((h.gso_size, h.hdr_len), (1448, 54));
        assert_eq!(
            tx_header(&mut f, true, false, Some((2, 1448))),
            Err(OffloadError::GsoMismatch)
        );
    }

    #[test]
    fn test_complete_checksum_verifies_to_zero() {
        let mut f = ipv4_tcp(33);
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let h = locate_l4(&f).unwrap();
        let p = pseudo_sum(&f, &h).unwrap();
        f[50..52].copy_from_slice(&p.to_be_bytes());
        assert!(complete_checksum(&mut f, 34, 16));
        // Verify: pseudo + segment sums to 0xffff.
        let mut s = csum_add(0, &f[26..34]);
        s += u32::from(IPPROTO_TCP) + (f.len() - 34) as u32;
        s = csum_add(s, &f[34..]);
        assert_eq!(csum_fold(s), 0xffff);
    }

    /// Guest frames are hostile: random headers (biased to IPv4/IPv6/VLAN ethertypes, short
    /// lengths and extension-header chains) never make the parsers panic, and whatever header
    /// comes out points inside the frame.
    #[test]
    fn test_random_frames_never_panic_and_offsets_stay_inside() {
        let mut x: u64 = 0x0123_4567_89ab_cdef;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let len = (next() % 160) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 14 {
                let et: [u16; 4] = [ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, 0x0806];
                f[12..14].copy_from_slice(&et[(next() % 4) as usize].to_be_bytes());
            }
            if len > 20 && next() % 2 == 0 {
                f[14] = 0x45 + (next() % 3) as u8;
            }
            let gso = match next() % 3 {
                0 => None,
                1 => Some((1, 1448)),
                _ => Some((2, 1440)),
            };
            if let Ok(h) = tx_header(&mut f, next() % 2 == 0, next() % 2 == 0, gso) {
                if h.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 {
                    let field = usize::from(h.csum_start) + usize::from(h.csum_offset);
                    assert!(field + 2 <= f.len());
                }
                assert!(usize::from(h.hdr_len) <= f.len());
            }
            let start = (next() % 200) as u16;
            let _ = complete_checksum(&mut f, start, (next() % 20) as u16);
            let _ = is_ipv6(&f);
        }
    }
}

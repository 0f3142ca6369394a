//! Arbitrary bytes as a blkif ring slot (native or x86_32 layout), arbitrary disk limits and an
//! arbitrary indirect page: `Request::parse` and `Request::parse_indirect` must never panic,
//! and whatever they accept must satisfy the invariants the rest of blkback relies on.
#![no_main]

use backends::blk::request::{DiskLimits, Request, Segments, MAX_INDIRECT_SEGMENTS};
use libfuzzer_sys::fuzz_target;
use xen::abi::blkif::*;
use zerocopy::FromBytes;

fn check(req: &Request, segs: &[backends::blk::request::Seg], disk: &DiskLimits) {
    for s in segs {
        assert!(s.first_sect <= s.last_sect && s.last_sect < 8);
    }
    if !segs.is_empty() {
        let total: u64 = segs.iter().map(|s| s.sectors()).sum();
        assert_eq!(total, req.nr_sectors);
        assert!(req.sector.checked_add(total).is_some_and(|e| e <= disk.sectors));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, rest) = data.split_at(12);
    let disk = DiskLimits {
        sectors: u64::from_le_bytes(head[..8].try_into().unwrap()) >> (head[8] % 64),
        read_only: head[9] & 1 != 0,
        discard: head[9] & 2 != 0,
        secure_discard: head[9] & 4 != 0,
        barrier: head[9] & 8 != 0,
        flush: head[9] & 16 != 0,
        max_indirect_segments: u16::from_le_bytes([head[10], head[11]]) % (MAX_INDIRECT_SEGMENTS + 2),
    };
    let x86_32 = head[9] & 32 != 0;
    let mut slot = [0u8; 112];
    let n = rest.len().min(112);
    slot[..n].copy_from_slice(&rest[..n]);
    let indirect_bytes = &rest[n..];

    let parsed = if x86_32 {
        let Ok(raw) = BlkifX86_32Request::read_from_bytes(&slot[..108]) else {
            return;
        };
        Request::parse_x86_32(&raw, &disk)
    } else {
        let Ok(raw) = BlkifRequest::read_from_bytes(&slot[..]) else {
            return;
        };
        Request::parse(&raw, &disk)
    };
    let Ok(mut req) = parsed else {
        return;
    };
    match req.segments {
        Segments::Indirect { nr_segments, .. } => {
            assert!(nr_segments >= 1 && nr_segments <= disk.max_indirect_segments);
            let segs: Vec<BlkifRequestSegment> = indirect_bytes
                .chunks_exact(8)
                .map(|c| BlkifRequestSegment {
                    gref: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    first_sect: c[4],
                    last_sect: c[5],
                    _pad: [0; 2],
                })
                .collect();
            let mut out = Vec::new();
            if req.parse_indirect(&segs, &disk, &mut out).is_ok() {
                assert_eq!(out.len(), usize::from(nr_segments));
                check(&req, &out, &disk);
            }
        }
        _ => check(&req, req.direct_segments(), &disk),
    }
});

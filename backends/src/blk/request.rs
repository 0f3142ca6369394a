//! The one place where a guest's block request becomes a trusted value.
//!
//! The ring thread copies each slot once out of shared memory (`BackRing::copy_request`,
//! XSA-155), converts the 32-bit layout to the native one field by field, and hands the private
//! copy to [`Request::parse`]. Everything the rest of blkback uses (operation, sectors,
//! segments) comes out of this module already checked: operation known, segment counts within
//! the protocol and what we advertised, `first_sect <= last_sect <= 7`, the sector range inside
//! the disk with checked `u64` arithmetic, no writes to a read-only disk. Indirect segments are
//! validated by [`Request::parse_indirect`] from a private copy of the indirect pages.
//!
//! Nothing here panics on any input (the fuzz target `fuzz/fuzz_targets/blkif_request.rs`
//! feeds it arbitrary bytes).

use xen::abi::blkif::*;

/// Segments an indirect request may carry at most (our `feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;

/// Indirect pages needed for [`MAX_INDIRECT_SEGMENTS`].
pub const MAX_INDIRECT_PAGES: usize =
    (MAX_INDIRECT_SEGMENTS as usize).div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME);

/// What a request may do on this disk: the limits it is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Disk size in 512-byte sectors.
    pub sectors: u64,
    /// Writes and discards are refused.
    pub read_only: bool,
    /// `feature-discard` was advertised.
    pub discard: bool,
    /// `discard-secure` was advertised.
    pub secure_discard: bool,
    /// `feature-barrier` was advertised.
    pub barrier: bool,
    /// `feature-flush-cache` was advertised.
    pub flush: bool,
    /// Our `feature-max-indirect-segments` (0 disables indirect requests).
    pub max_indirect_segments: u16,
}

/// One validated data segment: a granted page and the sectors of it to transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seg {
    /// The grant of the data page.
    pub gref: u32,
    /// First sector in the page (0..=7).
    pub first_sect: u8,
    /// Last sector in the page (first_sect..=7).
    pub last_sect: u8,
}

impl Seg {
    /// Byte offset of the data in the page.
    pub fn offset(&self) -> usize {
        usize::from(self.first_sect) * BLKIF_SECTOR_SIZE as usize
    }
    /// Sectors transferred.
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }
    /// Bytes transferred.
    pub fn len(&self) -> usize {
        self.sectors() as usize * BLKIF_SECTOR_SIZE as usize
    }
    /// Always false: a segment moves at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a request does, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read the sectors into the segments.
    Read,
    /// Write the segments. `flush`: make them (and every completed write) durable before
    /// answering (BLKIF_OP_FLUSH_DISKCACHE with data, as Linux's blkfront sends it).
    Write {
        /// Durable before the response.
        flush: bool,
    },
    /// Make completed writes durable (no data).
    Flush,
    /// BLKIF_OP_WRITE_BARRIER: everything before it completes first; its data (if any) is
    /// durable before anything after it starts.
    Barrier,
    /// Deallocate a sector range.
    Discard {
        /// BLKIF_DISCARD_SECURE was set.
        secure: bool,
    },
}

impl Op {
    /// Whether the engine writes into the guest's pages (so they must be mapped writable).
    pub fn device_writes_memory(&self) -> bool {
        matches!(self, Op::Read)
    }
}

/// Where the segments of a request are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segments {
    /// In the request itself (`nr` of `segs` are valid).
    Direct {
        /// The segments.
        segs: [Seg; BLKIF_MAX_SEGMENTS_PER_REQUEST],
        /// How many are valid.
        nr: u8,
    },
    /// In indirect pages that still have to be copied and checked with
    /// [`Request::parse_indirect`].
    Indirect {
        /// Grants of the indirect pages (`nr_pages` valid).
        pages: [u32; MAX_INDIRECT_PAGES],
        /// Indirect pages used.
        nr_pages: u8,
        /// Segments across them.
        nr_segments: u16,
    },
    /// None (flush, barrier without data, discard).
    None,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The guest's cookie, echoed in the response.
    pub id: u64,
    /// The operation byte to echo in the response (the inner operation for an indirect
    /// request, as Linux blkback answers and blkfront checks).
    pub rsp_op: u8,
    /// What to do.
    pub op: Op,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Sectors to transfer (read/write) or discard. For an indirect request this is known
    /// only after [`Request::parse_indirect`].
    pub nr_sectors: u64,
    /// The data segments.
    pub segments: Segments,
}

/// Why a request was refused. The response is [`BadRequest::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadReason {
    /// The operation is unknown or not advertised.
    #[error("operation {0} is not supported")]
    UnsupportedOp(u8),
    /// The indirect request's inner operation is not READ or WRITE.
    #[error("indirect operation {0} is not READ or WRITE")]
    BadIndirectOp(u8),
    /// `nr_segments` out of range.
    #[error("nr_segments {nr} is outside 1..={max}")]
    BadSegmentCount {
        /// What the guest sent.
        nr: u16,
        /// Our maximum.
        max: u16,
    },
    /// A segment whose sectors are out of order or outside the page.
    #[error("segment {index}: first_sect {first} last_sect {last} (need first <= last <= 7)")]
    BadSegment {
        /// Index of the segment.
        index: u16,
        /// first_sect.
        first: u8,
        /// last_sect.
        last: u8,
    },
    /// The sector range is beyond the disk (or wraps).
    #[error("sectors {sector}+{count} are beyond the disk's {disk} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
        /// Disk size.
        disk: u64,
    },
    /// A write or discard to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The indirect pages could not be read.
    #[error("indirect pages unreadable")]
    IndirectPages,
}

/// A refused request, with what is needed to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request id {id:#x} op {op}: {reason}")]
pub struct BadRequest {
    /// The guest's cookie.
    pub id: u64,
    /// The operation byte to echo.
    pub op: u8,
    /// Why.
    pub reason: BadReason,
}

impl BadRequest {
    /// The response status: EOPNOTSUPP for an operation we do not do, ERROR otherwise.
    pub fn status(&self) -> i16 {
        match self.reason {
            BadReason::UnsupportedOp(_) => BLKIF_RSP_EOPNOTSUPP,
            _ => BLKIF_RSP_ERROR,
        }
    }
}

/// Validates one segment.
fn check_seg(index: u16, s: &BlkifRequestSegment) -> Result<Seg, BadReason> {
    if s.first_sect > s.last_sect || s.last_sect >= BLKIF_SECTORS_PER_PAGE {
        return Err(BadReason::BadSegment {
            index,
            first: s.first_sect,
            last: s.last_sect,
        });
    }
    Ok(Seg {
        gref: s.gref,
        first_sect: s.first_sect,
        last_sect: s.last_sect,
    })
}

/// Checks `sector..sector+count` against the disk with checked arithmetic.
fn check_range(sector: u64, count: u64, disk: u64) -> Result<(), BadReason> {
    match sector.checked_add(count) {
        Some(end) if end <= disk => Ok(()),
        _ => Err(BadReason::OutOfRange {
            sector,
            count,
            disk,
        }),
    }
}

impl Request {
    /// Validates a private copy of a ring slot (native layout; convert 32-bit slots with
    /// `to_native` first). For an indirect request the segments are still to be checked with
    /// [`Request::parse_indirect`].
    pub fn parse(raw: &BlkifRequest, disk: &DiskLimits) -> Result<Request, BadRequest> {
        let bad = |op: u8, reason| BadRequest {
            id: raw.id,
            op,
            reason,
        };
        match raw.operation {
            BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE => {
                Self::parse_direct(raw, disk).map_err(|r| bad(raw.operation, r))
            }
            BLKIF_OP_DISCARD => {
                let d = raw.as_discard();
                Self::parse_discard(&d, disk).map_err(|r| bad(raw.operation, r))
            }
            BLKIF_OP_INDIRECT => {
                let ind = raw.as_indirect();
                let op = ind.indirect_op;
                Self::parse_indirect_header(&ind, disk).map_err(|r| bad(op, r))
            }
            other => Err(bad(other, BadReason::UnsupportedOp(other))),
        }
    }

    /// [`Request::parse`] for a private copy of a slot of an `x86_32-abi` ring: each variant
    /// is converted to the native layout field by field, then validated the same way.
    pub fn parse_x86_32(
        raw: &BlkifX86_32Request,
        disk: &DiskLimits,
    ) -> Result<Request, BadRequest> {
        let id = raw.id;
        let bad = |op: u8, reason| BadRequest { id, op, reason };
        match raw.operation {
            BLKIF_OP_DISCARD => Self::parse_discard(&raw.as_discard().to_native(), disk)
                .map_err(|r| bad(BLKIF_OP_DISCARD, r)),
            BLKIF_OP_INDIRECT => {
                let ind = raw.as_indirect().to_native();
                Self::parse_indirect_header(&ind, disk).map_err(|r| bad(ind.indirect_op, r))
            }
            _ => Self::parse(&raw.to_native(), disk),
        }
    }

    fn parse_direct(raw: &BlkifRequest, disk: &DiskLimits) -> Result<Request, BadReason> {
        let op = match raw.operation {
            BLKIF_OP_READ => Op::Read,
            BLKIF_OP_WRITE => Op::Write { flush: false },
            BLKIF_OP_WRITE_BARRIER if disk.barrier => Op::Barrier,
            BLKIF_OP_FLUSH_DISKCACHE if disk.flush => {
                if raw.nr_segments == 0 {
                    Op::Flush
                } else {
                    Op::Write { flush: true }
                }
            }
            other => return Err(BadReason::UnsupportedOp(other)),
        };
        let nr = raw.nr_segments;
        let data_optional = matches!(op, Op::Flush | Op::Barrier);
        let max = BLKIF_MAX_SEGMENTS_PER_REQUEST as u8;
        if nr > max || (nr == 0 && !data_optional) {
            return Err(BadReason::BadSegmentCount {
                nr: u16::from(nr),
                max: u16::from(max),
            });
        }
        if nr > 0 && !matches!(op, Op::Read) && disk.read_only {
            return Err(BadReason::ReadOnly);
        }
        let mut segs = [Seg::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        let mut total = 0u64;
        for (i, (out, raw_seg)) in segs
            .iter_mut()
            .zip(&raw.seg)
            .take(usize::from(nr))
            .enumerate()
        {
            let s = check_seg(i as u16, raw_seg)?;
            total += s.sectors();
            *out = s;
        }
        if nr > 0 {
            check_range(raw.sector_number, total, disk.sectors)?;
        }
        Ok(Request {
            id: raw.id,
            rsp_op: raw.operation,
            op,
            sector: raw.sector_number,
            nr_sectors: total,
            segments: if nr == 0 {
                Segments::None
            } else {
                Segments::Direct { segs, nr }
            },
        })
    }

    fn parse_discard(d: &BlkifRequestDiscard, disk: &DiskLimits) -> Result<Request, BadReason> {
        let secure = d.flag & BLKIF_DISCARD_SECURE != 0;
        if !disk.discard || (secure && !disk.secure_discard) {
            return Err(BadReason::UnsupportedOp(BLKIF_OP_DISCARD));
        }
        if disk.read_only {
            return Err(BadReason::ReadOnly);
        }
        check_range(d.sector_number, d.nr_sectors, disk.sectors)?;
        Ok(Request {
            id: d.id,
            rsp_op: BLKIF_OP_DISCARD,
            op: Op::Discard { secure },
            sector: d.sector_number,
            nr_sectors: d.nr_sectors,
            segments: Segments::None,
        })
    }

    fn parse_indirect_header(
        ind: &BlkifRequestIndirect,
        disk: &DiskLimits,
    ) -> Result<Request, BadReason> {
        if disk.max_indirect_segments == 0 {
            return Err(BadReason::UnsupportedOp(BLKIF_OP_INDIRECT));
        }
        let op = match ind.indirect_op {
            BLKIF_OP_READ => Op::Read,
            BLKIF_OP_WRITE => Op::Write { flush: false },
            other => return Err(BadReason::BadIndirectOp(other)),
        };
        let nr = ind.nr_segments;
        let max = disk.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
        if nr == 0 || nr > max {
            return Err(BadReason::BadSegmentCount { nr, max });
        }
        if !matches!(op, Op::Read) && disk.read_only {
            return Err(BadReason::ReadOnly);
        }
        let nr_pages = usize::from(nr).div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME);
        let mut pages = [0u32; MAX_INDIRECT_PAGES];
        pages[..nr_pages].copy_from_slice(&ind.indirect_grefs[..nr_pages]);
        Ok(Request {
            id: ind.id,
            rsp_op: ind.indirect_op,
            op,
            sector: ind.sector_number,
            nr_sectors: 0,
            segments: Segments::Indirect {
                pages,
                nr_pages: nr_pages as u8,
                nr_segments: nr,
            },
        })
    }

    /// Validates the segments of an indirect request from a private copy of its indirect
    /// pages (`copied` holds at least `nr_segments` entries, read once from the mapping),
    /// appending them to `out` (cleared first). Sets `nr_sectors`.
    pub fn parse_indirect(
        &mut self,
        copied: &[BlkifRequestSegment],
        disk: &DiskLimits,
        out: &mut Vec<Seg>,
    ) -> Result<(), BadRequest> {
        let bad = |reason| BadRequest {
            id: self.id,
            op: self.rsp_op,
            reason,
        };
        out.clear();
        let Segments::Indirect { nr_segments, .. } = self.segments else {
            return Ok(());
        };
        let nr = usize::from(nr_segments);
        let Some(raw) = copied.get(..nr) else {
            return Err(bad(BadReason::IndirectPages));
        };
        let mut total = 0u64;
        for (i, s) in raw.iter().enumerate() {
            let s = check_seg(i as u16, s).map_err(bad)?;
            total += s.sectors();
            out.push(s);
        }
        check_range(self.sector, total, disk.sectors).map_err(bad)?;
        self.nr_sectors = total;
        Ok(())
    }

    /// The direct segments (empty for indirect requests and requests without data).
    pub fn direct_segments(&self) -> &[Seg] {
        match &self.segments {
            Segments::Direct { segs, nr } => &segs[..usize::from(*nr).min(segs.len())],
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> DiskLimits {
        DiskLimits {
            sectors: 2048,
            read_only: false,
            discard: true,
            secure_discard: false,
            barrier: true,
            flush: true,
            max_indirect_segments: MAX_INDIRECT_SEGMENTS,
        }
    }

    fn rw(op: u8, sector: u64, segs: &[(u32, u8, u8)]) -> BlkifRequest {
        let mut r = BlkifRequest {
            operation: op,
            nr_segments: segs.len() as u8,
            id: 77,
            sector_number: sector,
            ..Default::default()
        };
        for (i, (g, f, l)) in segs.iter().enumerate() {
            r.seg[i] = BlkifRequestSegment {
                gref: *g,
                first_sect: *f,
                last_sect: *l,
                _pad: [0; 2],
            };
        }
        r
    }

    #[test]
    fn test_parse_read_two_segments_counts_sectors() {
        let r = Request::parse(&rw(BLKIF_OP_READ, 8, &[(9, 0, 7), (10, 2, 3)]), &disk()).unwrap();
        assert_eq!(r.op, Op::Read);
        assert_eq!(r.nr_sectors, 10);
        assert_eq!(r.direct_segments().len(), 2);
        assert_eq!(r.direct_segments()[1].offset(), 1024);
        assert_eq!(r.direct_segments()[1].len(), 1024);
    }

    #[test]
    fn test_parse_malformed_fields_each_refused() {
        let d = disk();
        let cases: Vec<(BlkifRequest, BadReason)> = vec![
            (
                rw(BLKIF_OP_READ, 0, &[(1, 5, 4)]),
                BadReason::BadSegment {
                    index: 0,
                    first: 5,
                    last: 4,
                },
            ),
            (
                rw(BLKIF_OP_READ, 0, &[(1, 0, 8)]),
                BadReason::BadSegment {
                    index: 0,
                    first: 0,
                    last: 8,
                },
            ),
            (
                rw(BLKIF_OP_READ, 2047, &[(1, 0, 1)]),
                BadReason::OutOfRange {
                    sector: 2047,
                    count: 2,
                    disk: 2048,
                },
            ),
            (
                rw(BLKIF_OP_READ, u64::MAX, &[(1, 0, 0)]),
                BadReason::OutOfRange {
                    sector: u64::MAX,
                    count: 1,
                    disk: 2048,
                },
            ),
            (
                rw(BLKIF_OP_READ, 0, &[]),
                BadReason::BadSegmentCount { nr: 0, max: 11 },
            ),
            (
                {
                    let mut r = rw(BLKIF_OP_READ, 0, &[(1, 0, 0)]);
                    r.nr_segments = 12;
                    r
                },
                BadReason::BadSegmentCount { nr: 12, max: 11 },
            ),
            (rw(4, 0, &[(1, 0, 0)]), BadReason::UnsupportedOp(4)),
            (rw(200, 0, &[(1, 0, 0)]), BadReason::UnsupportedOp(200)),
        ];
        for (raw, want) in cases {
            let e = Request::parse(&raw, &d).unwrap_err();
            assert_eq!(e.reason, want);
            assert_eq!(e.id, 77);
        }
    }

    #[test]
    fn test_parse_write_to_read_only_refused_flush_allowed() {
        let d = DiskLimits {
            read_only: true,
            ..disk()
        };
        let e = Request::parse(&rw(BLKIF_OP_WRITE, 0, &[(1, 0, 0)]), &d).unwrap_err();
        let f = Request::parse(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[]), &d).unwrap();
        assert_eq!(e.reason, BadReason::ReadOnly);
        assert_eq!(e.status(), BLKIF_RSP_ERROR);
        assert_eq!(f.op, Op::Flush);
    }

    #[test]
    fn test_parse_unknown_op_answers_eopnotsupp() {
        let e = Request::parse(&rw(9, 0, &[]), &disk()).unwrap_err();
        assert_eq!(e.status(), BLKIF_RSP_EOPNOTSUPP);
        assert_eq!(e.op, 9);
    }

    #[test]
    fn test_parse_discard_huge_refused_and_secure_unsupported() {
        let mut raw = BlkifRequest::default();
        let d = BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            flag: 0,
            id: 3,
            sector_number: 8,
            nr_sectors: u64::MAX - 4,
            ..Default::default()
        };
        zerocopy_copy(&mut raw, &d);
        let e = Request::parse(&raw, &disk()).unwrap_err();
        assert!(matches!(e.reason, BadReason::OutOfRange { .. }));
        let d2 = BlkifRequestDiscard {
            flag: BLKIF_DISCARD_SECURE,
            nr_sectors: 8,
            ..d
        };
        zerocopy_copy(&mut raw, &d2);
        let e2 = Request::parse(&raw, &disk()).unwrap_err();
        assert_eq!(e2.status(), BLKIF_RSP_EOPNOTSUPP);
    }

    fn zerocopy_copy(raw: &mut BlkifRequest, d: &BlkifRequestDiscard) {
        raw.operation = d.operation;
        raw.nr_segments = d.flag;
        raw.handle = d.handle;
        raw.id = d.id;
        raw.sector_number = d.sector_number;
        // nr_sectors overlays the first two segments' first 8 bytes.
        let n = d.nr_sectors;
        raw.seg[0].gref = n as u32;
        raw.seg[0].first_sect = (n >> 32) as u8;
        raw.seg[0].last_sect = (n >> 40) as u8;
        raw.seg[0]._pad = [(n >> 48) as u8, (n >> 56) as u8];
    }

    #[test]
    fn test_parse_indirect_counts_bounds_and_segments() {
        let d = disk();
        let mk = |nr: u16, op: u8| {
            let ind = BlkifRequestIndirect {
                operation: BLKIF_OP_INDIRECT,
                indirect_op: op,
                nr_segments: nr,
                id: 5,
                sector_number: 0,
                indirect_grefs: [11, 12, 13, 14, 15, 16, 17, 18],
                ..Default::default()
            };
            let mut raw = BlkifRequest {
                operation: ind.operation,
                nr_segments: ind.indirect_op,
                handle: ind.nr_segments,
                id: ind.id,
                sector_number: ind.sector_number,
                ..Default::default()
            };
            raw.seg[0].gref = u32::from(ind.handle);
            // indirect_grefs start at byte 28 = seg[0] byte 4 (seg[0] starts at 24).
            raw.seg[0].first_sect = 11;
            raw
        };
        for nr in [0u16, 257, 65535] {
            let e = Request::parse(&mk(nr, BLKIF_OP_READ), &d).unwrap_err();
            assert!(
                matches!(e.reason, BadReason::BadSegmentCount { .. }),
                "{nr}"
            );
        }
        let e = Request::parse(&mk(4, BLKIF_OP_DISCARD), &d).unwrap_err();
        assert_eq!(e.reason, BadReason::BadIndirectOp(BLKIF_OP_DISCARD));

        let mut r = Request::parse(&mk(3, BLKIF_OP_WRITE), &d).unwrap();
        assert_eq!(r.rsp_op, BLKIF_OP_WRITE);
        let segs = [BlkifRequestSegment {
            gref: 1,
            first_sect: 0,
            last_sect: 7,
            _pad: [0; 2],
        }; 3];
        let mut out = Vec::new();
        r.parse_indirect(&segs, &d, &mut out).unwrap();
        assert_eq!(r.nr_sectors, 24);
        assert_eq!(out.len(), 3);
        let short = r.parse_indirect(&segs[..2], &d, &mut out).unwrap_err();
        assert_eq!(short.reason, BadReason::IndirectPages);
    }
}

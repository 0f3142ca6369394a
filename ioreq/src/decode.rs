//! Decoding one ioreq: the single place where a copied `ioreq_t` becomes a validated
//! [`Request`]. A pure function over the snapshot (XSA-197: nothing is read from the shared
//! page again), so it is also the fuzz target.

use xen::abi::ioreq::{
    Ioreq, IOREQ_READ, IOREQ_TYPE_COPY, IOREQ_TYPE_INVALIDATE, IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO, IOREQ_TYPE_TIMEOFFSET,
};

use crate::handler::{IoSpace, Sbdf};
use crate::layout::RamLayout;

/// Most repetitions Xen puts in one ioreq (`hvmemul_linear_to_phys` clips rep counts to
/// 4096 so that one trap does bounded work).
pub const MAX_REP_COUNT: u32 = 4096;
/// End of the port I/O space (XSA-199: `addr + size` must not pass it).
pub const PIO_SPACE_END: u64 = 0x1_0000;
/// Size of a PCI function's (extended) configuration space.
pub const PCI_CONFIG_SPACE: u64 = 4096;

/// Direction of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The guest reads (the device model supplies the value).
    Read,
    /// The guest writes.
    Write,
}

/// Where the data of an access is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// In the ioreq itself (`data`).
    Value(u64),
    /// In guest RAM: the buffer of the first element (`data_is_ptr`).
    Ptr(u64),
}

/// A validated access of `count` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Address space; for PCI config, the function.
    pub space: IoSpace,
    /// Port, guest-physical address, or config register.
    pub addr: u64,
    /// Bytes per element: 1, 2, 4, or 8 (memory only).
    pub size: u8,
    /// Elements, 1..=[`MAX_REP_COUNT`].
    pub count: u32,
    /// Direction.
    pub dir: Dir,
    /// Decreasing addresses.
    pub df: bool,
    /// The data.
    pub data: Data,
}

impl Transfer {
    /// Device address of element `i` (ports do not move; memory steps by `size`).
    pub fn element_addr(&self, i: u32) -> u64 {
        match self.space {
            IoSpace::Mmio => step(self.addr, self.size, i, self.df),
            _ => self.addr,
        }
    }
    /// Guest buffer address of element `i` when the data is in RAM.
    pub fn element_buf(&self, i: u32) -> Option<u64> {
        match self.data {
            Data::Ptr(gpa) => Some(step(gpa, self.size, i, self.df)),
            Data::Value(_) => None,
        }
    }
}

fn step(base: u64, size: u8, i: u32, df: bool) -> u64 {
    let off = u64::from(size) * u64::from(i);
    if df {
        base.wrapping_sub(off)
    } else {
        base.wrapping_add(off)
    }
}

/// A validated ioreq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// PIO, MMIO (COPY) or PCI config access.
    Access(Transfer),
    /// Drop every mapping of guest memory.
    Invalidate,
    /// The guest's RTC moved by this many seconds.
    TimeOffset(i64),
}

/// Why an ioreq was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadIoreq {
    /// Unknown IOREQ_TYPE_*.
    #[error("unknown ioreq type {0}")]
    Type(u8),
    /// Size not 1, 2, 4 or 8 (or 8 where the space has no 8-byte accesses).
    #[error("bad size {size} for ioreq type {type_}")]
    Size {
        /// The type.
        type_: u8,
        /// The size.
        size: u32,
    },
    /// Count 0 or above [`MAX_REP_COUNT`], or above 1 for PCI config.
    #[error("bad count {0}")]
    Count(u32),
    /// Port access past 0xffff (XSA-199).
    #[error("port access {addr:#x}+{size} runs past port 0xffff")]
    PortRange {
        /// Port.
        addr: u64,
        /// Size.
        size: u32,
    },
    /// Config access past the function's config space.
    #[error("config access at register {reg:#x}+{size} runs past 4096")]
    ConfigRange {
        /// Register.
        reg: u64,
        /// Size.
        size: u32,
    },
    /// A rep transfer whose device addresses wrap around.
    #[error("memory access {addr:#x} x{count} wraps around")]
    MmioWrap {
        /// Address.
        addr: u64,
        /// Count.
        count: u32,
    },
    /// `data_is_ptr` buffer outside guest RAM.
    #[error("guest buffer {gpa:#x} ({len} bytes{dir}) is outside guest RAM ({ram:#x} bytes)")]
    Buffer {
        /// First element's buffer.
        gpa: u64,
        /// Bytes.
        len: u64,
        /// ", downwards" when df.
        dir: &'static str,
        /// RAM size.
        ram: u64,
    },
}

/// Validates a snapshot of an ioreq against a guest with `ram_bytes` of RAM starting at
/// guest-physical 0. `state` is not looked at (the caller checked READY).
pub fn decode(req: &Ioreq, ram_bytes: u64) -> Result<Request, BadIoreq> {
    decode_in(req, &RamLayout::flat(ram_bytes))
}

/// Validates a snapshot of an ioreq against a guest whose RAM is `ram`: a `data_is_ptr`
/// buffer must lie inside one RAM region.
pub fn decode_in(req: &Ioreq, ram: &RamLayout) -> Result<Request, BadIoreq> {
    let type_ = req.type_;
    let space = match type_ {
        IOREQ_TYPE_PIO => IoSpace::Port,
        IOREQ_TYPE_COPY => IoSpace::Mmio,
        IOREQ_TYPE_PCI_CONFIG => IoSpace::PciConfig(Sbdf::from_u32((req.addr >> 32) as u32)),
        IOREQ_TYPE_INVALIDATE => return Ok(Request::Invalidate),
        IOREQ_TYPE_TIMEOFFSET => return Ok(Request::TimeOffset(req.data as i64)),
        other => return Err(BadIoreq::Type(other)),
    };
    let size = req.size;
    let max_size = if space == IoSpace::Mmio { 8 } else { 4 };
    if !matches!(size, 1 | 2 | 4 | 8) || size > max_size {
        return Err(BadIoreq::Size { type_, size });
    }
    let count = req.count;
    let max_count = if matches!(space, IoSpace::PciConfig(_)) {
        1
    } else {
        MAX_REP_COUNT
    };
    if count == 0 || count > max_count {
        return Err(BadIoreq::Count(count));
    }
    let size64 = u64::from(size);
    // count <= 4096 and size <= 8: no overflow.
    let span = size64 * u64::from(count);
    let back = span - size64;
    let df = req.df();
    let addr = match space {
        IoSpace::Port => {
            if req
                .addr
                .checked_add(size64)
                .is_none_or(|e| e > PIO_SPACE_END)
            {
                return Err(BadIoreq::PortRange {
                    addr: req.addr,
                    size,
                });
            }
            req.addr
        }
        IoSpace::PciConfig(_) => {
            let reg = req.addr & 0xffff_ffff;
            if reg + size64 > PCI_CONFIG_SPACE {
                return Err(BadIoreq::ConfigRange { reg, size });
            }
            reg
        }
        IoSpace::Mmio => {
            let ok = if df {
                req.addr.checked_sub(back).is_some() && req.addr.checked_add(size64).is_some()
            } else {
                req.addr.checked_add(span).is_some()
            };
            if !ok {
                return Err(BadIoreq::MmioWrap {
                    addr: req.addr,
                    count,
                });
            }
            req.addr
        }
    };
    let data = if req.data_is_ptr() {
        let gpa = req.data;
        let (lo, dir) = if df {
            (gpa.checked_sub(back), ", downwards")
        } else {
            (Some(gpa), "")
        };
        let inside = lo.is_some_and(|lo| ram.contains(lo, span));
        if !inside {
            return Err(BadIoreq::Buffer {
                gpa,
                len: span,
                dir,
                ram: ram.total(),
            });
        }
        Data::Ptr(gpa)
    } else {
        Data::Value(req.data)
    };
    Ok(Request::Access(Transfer {
        space,
        addr,
        size: size as u8,
        count,
        dir: if req.dir() == IOREQ_READ {
            Dir::Read
        } else {
            Dir::Write
        },
        df,
        data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xen::abi::ioreq::{IOREQ_WRITE, STATE_IOREQ_READY};

    fn req(type_: u8, addr: u64, size: u32, count: u32, ptr: bool, df: bool) -> Ioreq {
        Ioreq {
            addr,
            data: 0x1000,
            count,
            size,
            bits: Ioreq::make_bits(STATE_IOREQ_READY, ptr, IOREQ_WRITE, df),
            type_,
            ..Default::default()
        }
    }

    #[test]
    fn test_decode_pio_at_top_of_port_space_refused() {
        assert!(decode(&req(IOREQ_TYPE_PIO, 0xfffc, 4, 1, false, false), 1 << 20).is_ok());
        assert_eq!(
            decode(&req(IOREQ_TYPE_PIO, 0xffff, 4, 1, false, false), 1 << 20),
            Err(BadIoreq::PortRange {
                addr: 0xffff,
                size: 4
            })
        );
        assert!(decode(&req(IOREQ_TYPE_PIO, 0x10000, 1, 1, false, false), 1 << 20).is_err());
        assert!(decode(&req(IOREQ_TYPE_PIO, u64::MAX, 1, 1, false, false), 1 << 20).is_err());
    }

    #[test]
    fn test_decode_sizes_and_types() {
        assert!(decode(&req(IOREQ_TYPE_COPY, 0, 8, 1, false, false), 1 << 20).is_ok());
        assert!(decode(&req(IOREQ_TYPE_PIO, 0, 8, 1, false, false), 1 << 20).is_err());
        assert!(decode(&req(IOREQ_TYPE_COPY, 0, 3, 1, false, false), 1 << 20).is_err());
        assert_eq!(
            decode(&req(9, 0, 4, 1, false, false), 1 << 20),
            Err(BadIoreq::Type(9))
        );
    }

    #[test]
    fn test_decode_rep_buffer_past_ram_refused_both_directions() {
        // 0x1000 + 4 * 4096 > 0x4000 bytes of RAM.
        assert!(matches!(
            decode(&req(IOREQ_TYPE_PIO, 0x60, 4, 4096, true, false), 0x4000),
            Err(BadIoreq::Buffer { .. })
        ));
        // df: 0x1000 - 4095 * 4 underflows.
        assert!(matches!(
            decode(&req(IOREQ_TYPE_PIO, 0x60, 4, 4096, true, true), 1 << 30),
            Err(BadIoreq::Buffer { .. })
        ));
        assert!(decode(&req(IOREQ_TYPE_PIO, 0x60, 4, 1026, true, true), 1 << 30).is_err());
        assert!(decode(&req(IOREQ_TYPE_PIO, 0x60, 4, 1025, true, true), 1 << 30).is_ok());
        assert!(decode(&req(IOREQ_TYPE_PIO, 0x60, 4, 1025, true, false), 1 << 30).is_ok());
        assert!(decode(&req(IOREQ_TYPE_PIO, 0x60, 4, 1024, true, false), 0x2000).is_ok());
    }

    #[test]
    fn test_decode_buffers_follow_the_hvm_ram_layout_above_4g_and_not_in_the_hole() {
        // An 8 GiB guest: RAM below 0xF000_0000 and from 4 GiB.
        let ram = RamLayout::hvm(8 << 30);
        let at = |gpa: u64| Ioreq {
            data: gpa,
            ..req(IOREQ_TYPE_PIO, 0x60, 4, 16, true, false)
        };
        assert!(decode_in(&at(5 << 30), &ram).is_ok(), "relocated RAM");
        assert!(decode_in(&at(0x1000), &ram).is_ok());
        assert!(matches!(
            decode_in(&at(0xF000_0000), &ram),
            Err(BadIoreq::Buffer { .. })
        ));
        // Straddling the start of the hole.
        assert!(matches!(
            decode_in(&at(0xF000_0000 - 32), &ram),
            Err(BadIoreq::Buffer { .. })
        ));
        // Past the end of relocated RAM.
        let end = (1u64 << 32) + (8 << 30) - 0xF000_0000;
        assert!(decode_in(&at(end - 64), &ram).is_ok());
        assert!(decode_in(&at(end - 32), &ram).is_err());
    }
}

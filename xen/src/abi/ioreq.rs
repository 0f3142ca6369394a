//! xen/hvm/ioreq.h: the synchronous ioreq page (one `ioreq_t` per vCPU) and the buffered
//! ioreq ring.
//!
//! Xen writes these pages and the device model answers through them; a hostile guest
//! influences addresses, sizes and data, so every field must be validated after copying.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Direction: the guest reads (the device model supplies `data`).
pub const IOREQ_READ: u8 = 1;
/// Direction: the guest writes.
pub const IOREQ_WRITE: u8 = 0;

/// The slot is free.
pub const STATE_IOREQ_NONE: u8 = 0;
/// Xen posted a request.
pub const STATE_IOREQ_READY: u8 = 1;
/// The device model took it.
pub const STATE_IOREQ_INPROCESS: u8 = 2;
/// The device model answered.
pub const STATE_IORESP_READY: u8 = 3;

/// Port I/O.
pub const IOREQ_TYPE_PIO: u8 = 0;
/// MMIO (`copy`).
pub const IOREQ_TYPE_COPY: u8 = 1;
/// PCI config space access (`addr` holds SBDF << 32 | register).
pub const IOREQ_TYPE_PCI_CONFIG: u8 = 2;
/// Guest changed its RTC offset.
pub const IOREQ_TYPE_TIMEOFFSET: u8 = 7;
/// Invalidate the map cache.
pub const IOREQ_TYPE_INVALIDATE: u8 = 8;

/// `struct ioreq` (`ioreq_t`): one vCPU's synchronous request slot, 32 bytes.
///
/// The C bitfield byte `state:4, data_is_ptr:1, dir:1, df:1, _pad1:1` is [`Ioreq::bits`];
/// use the accessors. `state` is read and written with atomic byte accesses at
/// [`IOREQ_STATE_OFFSET`] (it is the handshake with Xen).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Ioreq {
    /// Physical address (or port, or PCI SBDF/register).
    pub addr: u64,
    /// Data, or the guest physical address of the data if `data_is_ptr`.
    pub data: u64,
    /// Repeat count (rep prefixes).
    pub count: u32,
    /// Access size in bytes.
    pub size: u32,
    /// This vCPU's event channel: a port of the guest domain, unbound for the device model,
    /// which binds it interdomain.
    pub vp_eport: u32,
    /// Padding.
    pub _pad0: u16,
    /// The bitfield byte (state, data_is_ptr, dir, df).
    pub bits: u8,
    /// IOREQ_TYPE_*.
    pub type_: u8,
}

/// Offset of the bitfield byte holding `state` in [`Ioreq`].
pub const IOREQ_STATE_OFFSET: usize = 30;
/// Size of one [`Ioreq`].
pub const IOREQ_SIZE: usize = 32;

impl Ioreq {
    /// `state` (STATE_*).
    pub fn state(&self) -> u8 {
        self.bits & 0x0f
    }
    /// `data_is_ptr`: `data` is a guest physical address.
    pub fn data_is_ptr(&self) -> bool {
        self.bits & 0x10 != 0
    }
    /// `dir` (IOREQ_READ or IOREQ_WRITE).
    pub fn dir(&self) -> u8 {
        (self.bits >> 5) & 1
    }
    /// `df`: direction flag (rep with decreasing addresses).
    pub fn df(&self) -> bool {
        self.bits & 0x40 != 0
    }
    /// Sets `state`, keeping the other bits.
    pub fn set_state(&mut self, state: u8) {
        self.bits = (self.bits & 0xf0) | (state & 0x0f);
    }
    /// Builds the bitfield byte.
    pub fn make_bits(state: u8, data_is_ptr: bool, dir: u8, df: bool) -> u8 {
        (state & 0x0f) | (u8::from(data_is_ptr) << 4) | ((dir & 1) << 5) | (u8::from(df) << 6)
    }
}

/// `struct shared_iopage`: the synchronous ioreq page; vCPU `n` uses slot `n`
/// (the C declares `vcpu_ioreq[1]` and indexes past it).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SharedIopage {
    /// Slot of vCPU 0.
    pub vcpu_ioreq: [Ioreq; 1],
}

/// Offset of vCPU `vcpu`'s [`Ioreq`] in the shared iopage, if it fits in `page_len`.
pub fn ioreq_offset(vcpu: u32, page_len: usize) -> Option<usize> {
    let off = usize::try_from(vcpu).ok()?.checked_mul(IOREQ_SIZE)?;
    (off.checked_add(IOREQ_SIZE)? <= page_len).then_some(off)
}

/// `struct buf_ioreq` (`buf_ioreq_t`): a posted (write-only) request, 8 bytes.
///
/// The first word is the C bitfield `type:8, pad:1, dir:1, size:2, addr:20` (little-endian
/// bit order, as GCC lays it out on x86). Use the accessors.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BufIoreq {
    /// type, pad, dir, size and addr packed.
    pub word: u32,
    /// Data (low half of an 8-byte write; the next slot holds the high half).
    pub data: u32,
}

impl BufIoreq {
    /// IOREQ_TYPE_*.
    pub fn type_(&self) -> u8 {
        (self.word & 0xff) as u8
    }
    /// The pad bit.
    pub fn pad(&self) -> u8 {
        ((self.word >> 8) & 1) as u8
    }
    /// IOREQ_READ or IOREQ_WRITE (Xen only posts writes).
    pub fn dir(&self) -> u8 {
        ((self.word >> 9) & 1) as u8
    }
    /// Encoded size: 0 => 1, 1 => 2, 2 => 4, 3 => 8 bytes (8 takes two slots).
    pub fn size(&self) -> u8 {
        ((self.word >> 10) & 3) as u8
    }
    /// Size in bytes (1, 2, 4 or 8).
    pub fn size_bytes(&self) -> u32 {
        1 << self.size()
    }
    /// The low 20 bits of the address.
    pub fn addr(&self) -> u32 {
        self.word >> 12
    }
    /// Builds the packed word (out-of-range inputs are masked to their field widths).
    pub fn make(type_: u8, pad: u8, dir: u8, size: u8, addr: u32, data: u32) -> Self {
        let word = u32::from(type_)
            | (u32::from(pad & 1) << 8)
            | (u32::from(dir & 1) << 9)
            | (u32::from(size & 3) << 10)
            | ((addr & 0xf_ffff) << 12);
        BufIoreq { word, data }
    }
}

/// Slots in the buffered ring.
pub const IOREQ_BUFFER_SLOT_NUM: u32 = 511;

/// `struct buffered_iopage`: the buffered ioreq ring (one page).
///
/// Pointers are free-running; slot = pointer % [`IOREQ_BUFFER_SLOT_NUM`] (not a power of two).
/// With HVM_IOREQSRV_BUFIOREQ_ATOMIC, Xen canonicalises both pointers (subtracting a multiple
/// of the slot count with one 64-bit cmpxchg of the pair) once `read_pointer` passes
/// IOREQ_BUFFER_SLOT_NUM, so the device model must advance `read_pointer` with an atomic add,
/// never a plain store.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BufferedIopage {
    /// Consumer pointer (device model).
    pub read_pointer: u32,
    /// Producer pointer (Xen).
    pub write_pointer: u32,
    /// The slots.
    pub buf_ioreq: [BufIoreq; IOREQ_BUFFER_SLOT_NUM as usize],
}

/// Offset of `read_pointer` in the buffered page.
pub const BUFIOREQ_READ_POINTER_OFFSET: usize = 0;
/// Offset of `write_pointer` in the buffered page.
pub const BUFIOREQ_WRITE_POINTER_OFFSET: usize = 4;
/// Offset of the first slot in the buffered page.
pub const BUFIOREQ_SLOTS_OFFSET: usize = 8;
/// Size of one buffered slot.
pub const BUF_IOREQ_SIZE: usize = 8;

/// Byte offset, in the buffered page, of the slot a free-running pointer designates.
pub fn buf_ioreq_slot_offset(pointer: u32) -> usize {
    BUFIOREQ_SLOTS_OFFSET + (pointer % IOREQ_BUFFER_SLOT_NUM) as usize * BUF_IOREQ_SIZE
}

/// No buffered ring (`HVM_IOREQSRV_BUFIOREQ_OFF`).
pub const HVM_IOREQSRV_BUFIOREQ_OFF: u8 = 0;
/// Buffered ring, legacy pointer handling (`HVM_IOREQSRV_BUFIOREQ_LEGACY`).
pub const HVM_IOREQSRV_BUFIOREQ_LEGACY: u8 = 1;
/// Buffered ring, atomic pointer handling (`HVM_IOREQSRV_BUFIOREQ_ATOMIC`).
pub const HVM_IOREQSRV_BUFIOREQ_ATOMIC: u8 = 2;

/// Resource frame of an ioreq server holding the buffered page
/// (`XENMEM_resource_ioreq_server_frame_bufioreq`).
pub const XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ: u64 = 0;
/// Resource frame of the `n`th synchronous ioreq page
/// (`XENMEM_resource_ioreq_server_frame_ioreq(n)`).
pub const fn xenmem_resource_ioreq_server_frame_ioreq(n: u64) -> u64 {
    1 + n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_buf_ioreq_accessors_roundtrip_fields() {
        let b = BufIoreq::make(IOREQ_TYPE_COPY, 0, IOREQ_WRITE, 2, 0xabcde, 7);
        assert_eq!(b.type_(), IOREQ_TYPE_COPY);
        assert_eq!(b.dir(), IOREQ_WRITE);
        assert_eq!(b.size(), 2);
        assert_eq!(b.size_bytes(), 4);
        assert_eq!(b.addr(), 0xabcde);
        assert_eq!(b.pad(), 0);
    }

    #[test]
    fn test_buffered_iopage_fits_one_page() {
        assert_eq!(core::mem::size_of::<BufferedIopage>(), 4096);
        assert_eq!(buf_ioreq_slot_offset(511), 8);
        assert_eq!(
            buf_ioreq_slot_offset(u32::MAX),
            8 + (u32::MAX % 511) as usize * 8
        );
    }

    #[test]
    fn test_ioreq_bits_roundtrip_and_offset_bounds() {
        let mut r = Ioreq {
            bits: Ioreq::make_bits(STATE_IOREQ_READY, true, IOREQ_READ, true),
            ..Default::default()
        };
        assert_eq!(r.state(), STATE_IOREQ_READY);
        assert!(r.data_is_ptr() && r.df());
        assert_eq!(r.dir(), IOREQ_READ);
        r.set_state(STATE_IORESP_READY);
        assert_eq!(r.state(), STATE_IORESP_READY);
        assert!(r.data_is_ptr());
        assert_eq!(ioreq_offset(127, 4096), Some(4064));
        assert_eq!(ioreq_offset(128, 4096), None);
        assert_eq!(ioreq_offset(u32::MAX, 4096), None);
    }
}

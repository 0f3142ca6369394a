//! Memory shared with another domain.
//!
//! [`SharedMem`] is a mapping (of grants, foreign frames, an ioreq page, or guest RAM in
//! xensim) whose bytes another domain may change at any moment. No Rust reference into it is
//! ever created: every access is a bounds-checked copy in or out, or an atomic load or store of
//! an aligned word. That is what makes "copy once, then validate" (XSA-155) the only way to use
//! it. This module and the Linux `sys` module are the only places with `unsafe` code.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// An access to shared memory outside the mapping, or misaligned for an atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// `offset + len` is beyond the mapping (or overflows).
    #[error("access of {len} bytes at offset {offset:#x} is outside the {size:#x}-byte mapping")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the mapping.
        size: usize,
    },
    /// An atomic access at an offset that is not a multiple of its size.
    #[error("atomic access of {len} bytes at misaligned offset {offset:#x}")]
    Misaligned {
        /// Offset of the access.
        offset: usize,
        /// Size of the atomic.
        len: usize,
    },
}

/// Whatever keeps a mapping alive; dropping it unmaps the memory.
pub trait MapOwner: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> MapOwner for T {}

/// A mapping of memory that another domain can read and write concurrently.
///
/// The owner (an unmapper) is dropped after the last use of the pointer, because it is dropped
/// with `self`.
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    _owner: Box<dyn MapOwner>,
}

// SAFETY: SharedMem only hands out copies and atomics, never references, so sharing the pointer
// between threads is as safe as sharing the mapping itself, which is what shared memory is for.
unsafe impl Send for SharedMem {}
// SAFETY: see `Send`; all accesses are copies or atomic operations.
unsafe impl Sync for SharedMem {}

impl fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMem")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

/// Unmaps an anonymous mapping made by [`SharedMem::anonymous`] when dropped.
struct AnonMapping {
    addr: usize,
    len: usize,
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping made by `SharedMem::anonymous`, owned by this
        // value alone; the SharedMem using it is being dropped, so nothing accesses it again.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

impl SharedMem {
    /// Wraps a mapping.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped readable (and writable if `writable`) for as long as
    /// `owner` lives, and nothing else may unmap it meanwhile. If `writable` is false, the
    /// write methods refuse with `OutOfBounds { size: 0, .. }` and never touch the memory.
    pub unsafe fn from_raw(
        ptr: *mut u8,
        len: usize,
        writable: bool,
        owner: Box<dyn MapOwner>,
    ) -> Self {
        SharedMem {
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len: if ptr.is_null() { 0 } else { len },
            writable,
            _owner: owner,
        }
    }

    /// A new zero-filled mapping of `len` bytes of anonymous shared memory (rounded up to
    /// whole pages by the kernel), writable, unmapped on drop. It is what tests and xensim
    /// use where real Xen would give a grant or foreign mapping.
    pub fn anonymous(len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses: no existing
        // memory is affected. The result is checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let owner = AnonMapping {
            addr: ptr as usize,
            len,
        };
        // SAFETY: `ptr..ptr+len` was just mapped read/write and stays mapped until `owner`
        // (which only the returned SharedMem holds) is dropped.
        Ok(unsafe { SharedMem::from_raw(ptr.cast::<u8>(), len, true, Box::new(owner)) })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this mapping may be written.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The start of the mapping, for handing to the kernel (io_uring, readv). Using it is the
    /// caller's `unsafe` business.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The address of `offset`; only called after a bounds check, so it stays in the mapping
    /// (`wrapping_add` is then the same as `add`, without needing `unsafe`).
    fn at(&self, offset: usize) -> *mut u8 {
        self.ptr.as_ptr().wrapping_add(offset)
    }

    fn check(&self, offset: usize, len: usize, write: bool) -> Result<(), MemError> {
        let size = if write && !self.writable { 0 } else { self.len };
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(MemError::OutOfBounds { offset, len, size }),
        }
    }

    fn check_atomic(&self, offset: usize, len: usize, write: bool) -> Result<(), MemError> {
        self.check(offset, len, write)?;
        if !(self.ptr.as_ptr() as usize)
            .wrapping_add(offset)
            .is_multiple_of(len)
        {
            return Err(MemError::Misaligned { offset, len });
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(offset, buf.len(), false)?;
        // SAFETY: the range is inside the mapping (checked above) and stays mapped while `self`
        // lives. `buf` is private memory that cannot overlap a mapping of another domain's
        // memory. Bytes have no invalid values, so a concurrent write by the other domain can
        // only give us some mix of old and new bytes, which callers then validate.
        unsafe { std::ptr::copy_nonoverlapping(self.at(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `buf` into the mapping at `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        self.check(offset, buf.len(), true)?;
        // SAFETY: the range is inside a writable mapping (checked above); see `read`.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.at(offset), buf.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError> {
        self.check(offset, len, true)?;
        // SAFETY: the range is inside a writable mapping (checked above).
        unsafe { std::ptr::write_bytes(self.at(offset), byte, len) };
        Ok(())
    }

    /// Copies a plain-data value out of the mapping (one fetch; validate the copy).
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, MemError> {
        let mut v = T::new_zeroed();
        self.read(offset, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Copies a plain-data value into the mapping, padding included (no stale bytes leak).
    pub fn write_obj<T: IntoBytes + Immutable>(
        &self,
        offset: usize,
        v: &T,
    ) -> Result<(), MemError> {
        self.write(offset, v.as_bytes())
    }

    /// Copies bytes between two shared mappings (for example guest page to guest page).
    pub fn copy_to(
        &self,
        offset: usize,
        dst: &SharedMem,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), MemError> {
        self.check(offset, len, false)?;
        dst.check(dst_offset, len, true)?;
        // SAFETY: both ranges are inside their mappings (checked above). They may overlap if
        // both map the same frames, so use `copy` (memmove) rather than copy_nonoverlapping.
        unsafe { std::ptr::copy(self.at(offset), dst.at(dst_offset), len) };
        Ok(())
    }

    fn atomic_u8(&self, offset: usize, write: bool) -> Result<&AtomicU8, MemError> {
        self.check_atomic(offset, 1, write)?;
        // SAFETY: in bounds (checked); AtomicU8 has no alignment requirement beyond 1 and may
        // alias memory that others write atomically or not (it is the same as the kernel's
        // READ_ONCE/WRITE_ONCE on shared pages). The reference does not outlive `self`.
        Ok(unsafe { &*(self.at(offset) as *const AtomicU8) })
    }

    fn atomic_u16(&self, offset: usize, write: bool) -> Result<&AtomicU16, MemError> {
        self.check_atomic(offset, 2, write)?;
        // SAFETY: in bounds and 2-byte aligned (checked); see `atomic_u8`.
        Ok(unsafe { &*(self.at(offset) as *const AtomicU16) })
    }

    fn atomic_u32(&self, offset: usize, write: bool) -> Result<&AtomicU32, MemError> {
        self.check_atomic(offset, 4, write)?;
        // SAFETY: in bounds and 4-byte aligned (checked); see `atomic_u8`.
        Ok(unsafe { &*(self.at(offset) as *const AtomicU32) })
    }

    fn atomic_u64(&self, offset: usize, write: bool) -> Result<&AtomicU64, MemError> {
        self.check_atomic(offset, 8, write)?;
        // SAFETY: in bounds and 8-byte aligned (checked); see `atomic_u8`.
        Ok(unsafe { &*(self.at(offset) as *const AtomicU64) })
    }

    /// Atomic load of a byte.
    pub fn load_u8(&self, offset: usize, order: Ordering) -> Result<u8, MemError> {
        Ok(self.atomic_u8(offset, false)?.load(order))
    }
    /// Atomic store of a byte.
    pub fn store_u8(&self, offset: usize, v: u8, order: Ordering) -> Result<(), MemError> {
        self.atomic_u8(offset, true)?.store(v, order);
        Ok(())
    }
    /// Atomic load of an aligned u16.
    pub fn load_u16(&self, offset: usize, order: Ordering) -> Result<u16, MemError> {
        Ok(self.atomic_u16(offset, false)?.load(order))
    }
    /// Atomic store of an aligned u16.
    pub fn store_u16(&self, offset: usize, v: u16, order: Ordering) -> Result<(), MemError> {
        self.atomic_u16(offset, true)?.store(v, order);
        Ok(())
    }
    /// Compare-and-exchange of an aligned u16; returns the value found.
    pub fn cmpxchg_u16(&self, offset: usize, old: u16, new: u16) -> Result<u16, MemError> {
        let a = self.atomic_u16(offset, true)?;
        Ok(
            match a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }
    /// Atomic fetch-and of an aligned u16; returns the previous value.
    pub fn fetch_and_u16(&self, offset: usize, v: u16) -> Result<u16, MemError> {
        Ok(self
            .atomic_u16(offset, true)?
            .fetch_and(v, Ordering::SeqCst))
    }
    /// Atomic fetch-or of an aligned u16; returns the previous value.
    pub fn fetch_or_u16(&self, offset: usize, v: u16) -> Result<u16, MemError> {
        Ok(self.atomic_u16(offset, true)?.fetch_or(v, Ordering::SeqCst))
    }
    /// Atomic load of an aligned u32.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, MemError> {
        Ok(self.atomic_u32(offset, false)?.load(order))
    }
    /// Atomic store of an aligned u32.
    pub fn store_u32(&self, offset: usize, v: u32, order: Ordering) -> Result<(), MemError> {
        self.atomic_u32(offset, true)?.store(v, order);
        Ok(())
    }
    /// Compare-and-exchange of an aligned u32; returns the value found.
    pub fn cmpxchg_u32(&self, offset: usize, old: u32, new: u32) -> Result<u32, MemError> {
        let a = self.atomic_u32(offset, true)?;
        Ok(
            match a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }
    /// Atomic load of an aligned u64.
    pub fn load_u64(&self, offset: usize, order: Ordering) -> Result<u64, MemError> {
        Ok(self.atomic_u64(offset, false)?.load(order))
    }
    /// Atomic store of an aligned u64.
    pub fn store_u64(&self, offset: usize, v: u64, order: Ordering) -> Result<(), MemError> {
        self.atomic_u64(offset, true)?.store(v, order);
        Ok(())
    }
    /// Compare-and-exchange of an aligned u64; returns the value found (Xen updates the
    /// buffered ioreq ring's read/write pointer pair with one such exchange).
    pub fn cmpxchg_u64(&self, offset: usize, old: u64, new: u64) -> Result<u64, MemError> {
        let a = self.atomic_u64(offset, true)?;
        Ok(
            match a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmpxchg_u64_swaps_only_on_match_and_checks_bounds_and_alignment() {
        let m = heap_mem(32);
        m.store_u64(8, 5, Ordering::SeqCst).unwrap();
        assert_eq!(m.cmpxchg_u64(8, 4, 9).unwrap(), 5);
        assert_eq!(m.load_u64(8, Ordering::SeqCst).unwrap(), 5);
        assert_eq!(m.cmpxchg_u64(8, 5, 9).unwrap(), 5);
        assert_eq!(m.load_u64(8, Ordering::SeqCst).unwrap(), 9);
        assert!(m.cmpxchg_u64(4, 0, 1).is_err(), "misaligned");
        assert!(m.cmpxchg_u64(32, 0, 1).is_err(), "out of bounds");
    }

    fn heap_mem(len: usize) -> SharedMem {
        let buf: Box<[u64]> = vec![0u64; len.div_ceil(8)].into_boxed_slice();
        let ptr = buf.as_ptr() as *mut u8;
        // SAFETY: the boxed buffer is the owner and lives as long as the SharedMem.
        unsafe { SharedMem::from_raw(ptr, len, true, Box::new(buf)) }
    }

    #[test]
    fn test_read_past_end_is_refused() {
        let m = heap_mem(4096);
        let mut b = [0u8; 8];
        assert!(m.read(4090, &mut b).is_err());
        assert!(m.read(usize::MAX - 2, &mut b).is_err());
        assert!(m.read(4088, &mut b).is_ok());
    }

    #[test]
    fn test_atomics_check_alignment_and_roundtrip() {
        let m = heap_mem(64);
        assert_eq!(
            m.load_u32(2, Ordering::Relaxed),
            Err(MemError::Misaligned { offset: 2, len: 4 })
        );
        m.store_u32(4, 0xdead_beef, Ordering::Release).unwrap();
        assert_eq!(m.load_u32(4, Ordering::Acquire).unwrap(), 0xdead_beef);
        assert_eq!(m.cmpxchg_u16(4, 0xbeef, 1).unwrap(), 0xbeef);
        assert_eq!(m.load_u16(4, Ordering::Relaxed).unwrap(), 1);
        let v: u64 = m.read_obj(0).unwrap();
        assert_eq!(v, 0xdead_0001_0000_0000);
    }

    #[test]
    fn test_readonly_mapping_refuses_writes() {
        let buf: Box<[u64]> = vec![0u64; 8].into_boxed_slice();
        let ptr = buf.as_ptr() as *mut u8;
        // SAFETY: the boxed buffer is the owner.
        let m = unsafe { SharedMem::from_raw(ptr, 64, false, Box::new(buf)) };
        assert!(m.write(0, &[1]).is_err());
        assert!(m.store_u32(0, 1, Ordering::Relaxed).is_err());
        assert!(m.load_u32(0, Ordering::Relaxed).is_ok());
    }
}

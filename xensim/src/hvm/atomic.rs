//! The one atomic operation the simulated hypervisor needs on a shared page that
//! `xen::SharedMem` does not offer: a 64-bit compare-and-exchange (Xen canonicalises the
//! buffered ring's read/write pointer pair with one `cmpxchg` of the whole 64-bit word).

use std::sync::atomic::{AtomicU64, Ordering};

use xen::SharedMem;

/// Compare-and-exchange of the aligned u64 at `offset`; returns the value found, or `None`
/// if the word is out of bounds, misaligned or the mapping is read-only.
pub fn cmpxchg_u64(mem: &SharedMem, offset: usize, old: u64, new: u64) -> Option<u64> {
    let end = offset.checked_add(8)?;
    if end > mem.len() || !mem.is_writable() {
        return None;
    }
    let p = mem.as_ptr().wrapping_add(offset);
    if !(p as usize).is_multiple_of(8) {
        return None;
    }
    // SAFETY: `p..p+8` lies inside the writable mapping (checked above), is 8-byte aligned
    // (checked), and stays mapped while `mem` is borrowed; AtomicU64 may alias memory that
    // other parties access atomically, as Xen and the device model do with this word.
    let a = unsafe { &*(p as *const AtomicU64) };
    Some(
        match a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(v) | Err(v) => v,
        },
    )
}

//! Memory for the simulated host: memfds (guest RAM, grant tables) and mappings of them.
//!
//! This is xensim's only module with `unsafe` code: `mmap`/`munmap` of memfds, wrapped into
//! [`xen::SharedMem`] so that everything above it is safe Rust.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use xen::{SharedMem, PAGE_SIZE};

/// An `mmap`ed region; dropping it unmaps.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` was returned by mmap in this module and is unmapped exactly
        // once, here, after the SharedMem that used it has been dropped (it owns this value).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Creates an anonymous memory file of `len` bytes (sparse: pages cost nothing until touched).
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(
        &fd,
        i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    )?;
    Ok(fd)
}

fn prot(writable: bool) -> libc::c_int {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

/// Maps `len` bytes of `fd` at `offset` (shared).
pub fn map_fd(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: usize,
    writable: bool,
) -> io::Result<SharedMem> {
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
    }
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh mapping chosen by the kernel (addr NULL); no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot(writable),
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let m = Mapping {
        addr: p as usize,
        len,
    };
    // SAFETY: `p..p+len` is mapped with the requested protection and stays mapped until the
    // owner `m` is dropped together with the SharedMem.
    Ok(unsafe { SharedMem::from_raw(p.cast(), len, writable, Box::new(m)) })
}

/// Maps the pages `frames` of `fd` (page-sized units) contiguously, in order.
pub fn map_frames(fd: BorrowedFd<'_>, frames: &[u64], writable: bool) -> io::Result<SharedMem> {
    map_frames_with(fd, frames, writable, Box::new(()))
}

/// Like [`map_frames`]; `after_unmap` is dropped right after the memory is unmapped (it
/// tells the host the grants may be unpinned).
pub fn map_frames_with(
    fd: BorrowedFd<'_>,
    frames: &[u64],
    writable: bool,
    after_unmap: Box<dyn xen::mem::MapOwner>,
) -> io::Result<SharedMem> {
    let len = frames
        .len()
        .checked_mul(PAGE_SIZE)
        .filter(|l| *l > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad frame count"))?;
    // Reserve the whole range first so that the fixed mappings below replace only our own
    // reservation, never someone else's memory.
    // SAFETY: a fresh anonymous reservation chosen by the kernel.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let reservation = Mapping {
        addr: base as usize,
        len,
    };
    let mut i = 0;
    while i < frames.len() {
        // Coalesce runs of consecutive frames into one mmap.
        let mut run = 1;
        while i + run < frames.len() && frames[i + run] == frames[i].wrapping_add(run as u64) {
            run += 1;
        }
        let off = frames[i]
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame number too large"))?;
        let at = reservation.addr + i * PAGE_SIZE;
        // SAFETY: `at..at+run*PAGE_SIZE` lies inside our own reservation (i + run <= frames.len()),
        // so MAP_FIXED replaces only memory this function owns.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                run * PAGE_SIZE,
                prot(writable),
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        i += run;
    }
    // SAFETY: the whole reservation is now mapped from `fd` with the requested protection and
    // stays mapped until `reservation` is dropped with the SharedMem (tuple fields drop in
    // order: the memory is unmapped before `after_unmap` runs).
    Ok(unsafe {
        SharedMem::from_raw(
            base.cast(),
            len,
            writable,
            Box::new((reservation, after_unmap)),
        )
    })
}

/// A guest's memory file with the host's own mapping of all of it.
#[derive(Debug)]
pub struct MemFile {
    fd: OwnedFd,
    mem: SharedMem,
}

impl MemFile {
    /// A new zeroed memory file of `pages` pages, mapped read-write.
    pub fn new(name: &str, pages: u64) -> io::Result<MemFile> {
        let len = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|l| *l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad size"))?;
        let fd = memfd(name, len as u64)?;
        let mem = map_fd(fd.as_fd(), 0, len, true)?;
        Ok(MemFile { fd, mem })
    }
    /// The host's mapping.
    pub fn mem(&self) -> &SharedMem {
        &self.mem
    }
    /// The memory file (for passing to a client process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        (self.mem.len() / PAGE_SIZE) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn test_map_frames_scattered_pages_appear_in_order() {
        let f = MemFile::new("t", 8).unwrap();
        for p in 0..8u64 {
            f.mem()
                .store_u32(p as usize * PAGE_SIZE, p as u32 + 100, Ordering::Relaxed)
                .unwrap();
        }
        let m = map_frames(f.fd(), &[5, 6, 2, 7], true).unwrap();
        let got: Vec<u32> = (0..4)
            .map(|i| m.load_u32(i * PAGE_SIZE, Ordering::Relaxed).unwrap())
            .collect();
        assert_eq!(got, vec![105, 106, 102, 107]);
        m.store_u32(2 * PAGE_SIZE, 7, Ordering::Relaxed).unwrap();
        assert_eq!(
            f.mem().load_u32(2 * PAGE_SIZE, Ordering::Relaxed).unwrap(),
            7
        );
        assert_eq!(m.len(), 4 * PAGE_SIZE);
    }

    #[test]
    fn test_map_frames_readonly_refuses_writes() {
        let f = MemFile::new("t", 2).unwrap();
        let m = map_frames(f.fd(), &[1], false).unwrap();
        assert!(m.write(0, &[1]).is_err());
    }
}

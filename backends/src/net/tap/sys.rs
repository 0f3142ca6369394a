//! Every `unsafe` operation of the tap engine: the tun and interface ioctls.
//!
//! Each wrapper passes the kernel either an integer by value or a pointer to a local that
//! lives across the call and has the size the ioctl's `_IOC` size field names (`int`,
//! `unsigned int` or `struct ifreq`). Frame I/O needs no unsafe code (nix's `readv`/`writev`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::uapi;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A zeroed `struct ifreq` naming `name` (at most IFNAMSIZ - 1 bytes, checked by the caller).
pub(super) fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a byte array and a union of integers, addresses and
    // one pointer); all-zero bytes are a valid value of every field.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(uapi::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    r
}

/// The name the kernel wrote back into `r`.
pub(super) fn ifreq_name(r: &libc::ifreq) -> String {
    let bytes: Vec<u8> = r
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An ioctl whose argument is a `struct ifreq` (TUNSETIFF, TUNGETIFF, SIOC*IF*).
pub(super) fn ioctl_ifreq(fd: BorrowedFd<'_>, req: u32, r: &mut libc::ifreq) -> io::Result<()> {
    let p: *mut libc::ifreq = r;
    // SAFETY: `p` points to a live, exclusively borrowed `struct ifreq` for the whole call;
    // every request passed here reads or writes at most `sizeof(struct ifreq)` bytes.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, p) }).map(drop)
}

/// An ioctl that reads an `int` from `*arg` (TUNSETVNETHDRSZ, TUNSETVNETLE).
pub(super) fn ioctl_set_int_ptr(fd: BorrowedFd<'_>, req: u32, value: i32) -> io::Result<()> {
    let v: libc::c_int = value;
    let p: *const libc::c_int = &v;
    // SAFETY: `p` points to a live `int` for the whole call, which the kernel only reads.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, p) }).map(drop)
}

/// An ioctl that writes an `int` (or `unsigned int`) to `*arg` (TUNGETFEATURES,
/// TUNGETVNETHDRSZ).
pub(super) fn ioctl_get_int(fd: BorrowedFd<'_>, req: u32) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    let p: *mut libc::c_uint = &mut v;
    // SAFETY: `p` points to a live, exclusively borrowed 4-byte integer for the whole call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, p) })?;
    Ok(v)
}

/// An ioctl whose argument is an integer passed by value (TUNSETOFFLOAD, TUNSETPERSIST).
pub(super) fn ioctl_value(fd: BorrowedFd<'_>, req: u32, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the argument is an integer, not a pointer; the kernel dereferences nothing.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, value) }).map(drop)
}

/// The `ifru_flags` member, after SIOCGIFFLAGS or TUNGETIFF filled it.
pub(super) fn ifreq_flags(r: &libc::ifreq) -> u16 {
    // SAFETY: every member of the union is plain integers or bytes, and `r` was zeroed when
    // built, so reading the leading `short` reads initialised bytes whichever member the
    // kernel wrote.
    let f = unsafe { r.ifr_ifru.ifru_flags };
    f as u16
}

/// The `ifru_ifindex` member, after SIOCGIFINDEX.
pub(super) fn ifreq_int(r: &libc::ifreq) -> i32 {
    // SAFETY: as for `ifreq_flags`: initialised plain integer bytes.
    unsafe { r.ifr_ifru.ifru_ifindex }
}

/// The `ifru_hwaddr` member, after SIOCGIFHWADDR.
pub(super) fn ifreq_hwaddr(r: &libc::ifreq) -> [u8; 6] {
    // SAFETY: as for `ifreq_flags`: a `sockaddr` is plain integers and bytes, all initialised.
    let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *d as u8;
    }
    mac
}

//! Passing file descriptors over unix sockets (SCM_RIGHTS). The only `unsafe` here turns the
//! raw descriptors the kernel just installed in our table into owned ones.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use xen::SharedMem;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// Sends one datagram (SOCK_SEQPACKET) with `fds` attached.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short datagram send",
        ));
    }
    Ok(())
}

/// Receives one datagram into `buf`; returns its length (0 = peer closed) and the descriptors
/// that came with it. A truncated datagram is an error.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_creds_flags(sock, buf, MsgFlags::empty()).map(|(n, fds, _)| (n, fds))
}

/// Like [`recv_with_fds`], without waiting (WouldBlock when nothing is queued).
pub fn try_recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_creds_flags(sock, buf, MsgFlags::MSG_DONTWAIT).map(|(n, fds, _)| (n, fds))
}

/// Makes the kernel attach the sender's credentials (SCM_CREDENTIALS) to every datagram
/// received on `sock`, so that [`recv_with_creds`] learns which process sent each one.
pub fn pass_credentials(sock: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true)?;
    Ok(())
}

/// Like [`recv_with_fds`], also returning the sending process's pid as the kernel vouches
/// for it (SCM_CREDENTIALS, when [`pass_credentials`] is on for `sock`).
pub fn recv_with_creds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>, Option<libc::pid_t>)> {
    recv_with_creds_flags(sock, buf, MsgFlags::empty())
}

fn recv_with_creds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<(usize, Vec<OwnedFd>, Option<libc::pid_t>)> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS], libc::ucred);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )?;
    let mut fds = Vec::new();
    let mut pid = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmRights(raw) => {
                for fd in raw {
                    // SAFETY: the kernel installed `fd` in our descriptor table for this
                    // message (SCM_RIGHTS); nothing else refers to it, so we take ownership
                    // exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            ControlMessageOwned::ScmCredentials(c) => pid = Some(c.pid()),
            _ => {}
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "datagram or its descriptors were truncated",
        ));
    }
    Ok((msg.bytes, fds, pid))
}

/// A listening SOCK_SEQPACKET unix socket at `path`.
pub fn seqpacket_listen(path: &std::path::Path) -> io::Result<OwnedFd> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
    Ok(fd)
}

/// Accepts one connection.
pub fn seqpacket_accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: accept4 just created `raw` in our descriptor table and returned it to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Connects a SOCK_SEQPACKET unix socket to `path`.
pub fn seqpacket_connect(path: &std::path::Path) -> io::Result<OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// A connected SOCK_SEQPACKET pair.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// One side of a cross-process copy: an address and a length (an `iovec`).
pub type Iov = libc::iovec;

/// The local side of a cross-process copy: ranges of [`SharedMem`] mappings, bounds-checked
/// when added, and borrowed for `'a` so that they stay mapped until the copy is made.
/// Adjacent ranges merge into one entry (the kernel handles each entry separately).
pub struct LocalIovs<'a> {
    v: &'a mut Vec<Iov>,
    _mem: std::marker::PhantomData<&'a SharedMem>,
}

impl<'a> LocalIovs<'a> {
    /// An empty list that reuses `buf`'s allocation.
    pub fn new(buf: &'a mut Vec<Iov>) -> LocalIovs<'a> {
        buf.clear();
        LocalIovs {
            v: buf,
            _mem: std::marker::PhantomData,
        }
    }

    /// Adds `len` bytes at `offset` of `mem`. False (and nothing added) if the range is not
    /// inside the mapping.
    pub fn push(&mut self, mem: &'a SharedMem, offset: usize, len: usize) -> bool {
        if offset.checked_add(len).is_none_or(|e| e > mem.len()) {
            return false;
        }
        let base = mem.as_ptr().wrapping_add(offset);
        if let Some(last) = self.v.last_mut() {
            if (last.iov_base as usize).wrapping_add(last.iov_len) == base as usize {
                last.iov_len += len;
                return true;
            }
        }
        self.v.push(Iov {
            iov_base: base.cast(),
            iov_len: len,
        });
        true
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }
}

/// Copies between this process and process `pid` with one `process_vm_readv` (`into_local`:
/// from `remote` in `pid` into `local` here) or `process_vm_writev` (from `local` into
/// `remote`). Returns the bytes moved, which the caller compares with what it asked for (the
/// kernel stops at the first address that faults). At most `IOV_MAX` (1024) entries a side.
/// `remote` addresses belong to the other process: the kernel checks them, a bad one only
/// fails the copy.
pub fn process_vm_copy(
    pid: libc::pid_t,
    into_local: bool,
    local: &LocalIovs<'_>,
    remote: &[Iov],
) -> io::Result<usize> {
    let local: &[Iov] = local.v;
    if local.len() > 1024 || remote.len() > 1024 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let n = if into_local {
        // SAFETY: the kernel reads the iovec arrays (valid for their lengths, bounded above)
        // and writes only the local ranges, which `LocalIovs` checked lie inside `SharedMem`
        // mappings that it borrows (so they stay mapped for this call); `SharedMem` memory is
        // never covered by a Rust reference (only raw and atomic accesses), so the kernel's
        // writes alias nothing. Faults are reported, not taken.
        unsafe {
            libc::process_vm_readv(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        }
    } else {
        // SAFETY: as above, but the kernel only reads the local ranges and writes memory of
        // the other process.
        unsafe {
            libc::process_vm_writev(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        }
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod local_iovs_tests {
    use super::*;

    #[test]
    fn ranges_are_bounds_checked_and_adjacent_ones_merge() {
        let m = SharedMem::anonymous(8192).unwrap();
        let mut buf = Vec::new();
        let mut l = LocalIovs::new(&mut buf);
        assert!(l.is_empty());
        assert!(!l.push(&m, 8000, 200), "past the end");
        assert!(!l.push(&m, usize::MAX, 2), "overflow");
        assert!(l.is_empty());
        assert!(l.push(&m, 0, 100));
        assert!(l.push(&m, 100, 100), "adjacent: merged");
        assert!(l.push(&m, 4096, 10));
        assert_eq!(l.v.len(), 2);
        assert_eq!(l.v[0].iov_len, 200);
    }
}

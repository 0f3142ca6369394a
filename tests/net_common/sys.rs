//! The two namespace system calls the network tests need (nix's `sched` feature is not
//! enabled in this workspace).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Moves the calling thread into a new, empty network namespace.
pub fn unshare_net() -> io::Result<()> {
    // SAFETY: unshare takes a flag word and touches no memory of ours.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace `fd` refers to.
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor for the duration of the call; setns reads nothing
    // else of ours.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An ICMP datagram socket ("ping socket"), wrapped as a `UdpSocket` for its connect, send,
/// recv and timeout methods (which are the same system calls).
pub fn icmp_socket() -> io::Result<std::net::UdpSocket> {
    // SAFETY: socket takes three integers and touches no memory of ours.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nothing else.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Ok(std::net::UdpSocket::from(owned))
}

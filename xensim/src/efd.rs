//! A non-blocking eventfd: the simulated "upcall" of one event-channel port.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// An eventfd, created here or received from the host over a socket.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd with count 0.
    pub fn new() -> io::Result<EventFd> {
        use nix::sys::eventfd::{EfdFlags, EventFd as NixEventFd};
        let fd =
            NixEventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(EventFd(File::from(OwnedFd::from(fd))))
    }

    /// Adds `n` to the counter (wakes pollers).
    pub fn signal(&self) -> io::Result<()> {
        (&self.0).write_all(&1u64.to_ne_bytes())
    }

    /// Takes the counter (0 if nothing is pending).
    pub fn take(&self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        match (&self.0).read(&mut b) {
            Ok(8) => Ok(u64::from_ne_bytes(b)),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short eventfd read",
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// A duplicate descriptor (to send to another process).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.0.as_fd().try_clone_to_owned()
    }
}

impl From<OwnedFd> for EventFd {
    fn from(fd: OwnedFd) -> Self {
        EventFd(File::from(fd))
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

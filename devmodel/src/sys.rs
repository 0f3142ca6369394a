//! The few libc calls the machine needs that have no safe wrapper in our dependencies:
//! opening a pseudo-terminal pair for a `serial='pty'` console.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Opens a pty master (non-blocking) and returns it with its slave and the slave's path. The slave is
/// put into raw mode, as a serial line has no line discipline of its own.
pub fn open_pty() -> io::Result<(File, File, String)> {
    // SAFETY: posix_openpt has no memory arguments; the result is checked below.
    let fd = unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt takes a descriptor we own.
    if unsafe { libc::grantpt(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::unlockpt(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: `buf` is writable for its full length, which is what we pass.
    let rc = unsafe { libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `buf` holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(&path)?;
    make_raw(&slave)?;
    // The caller keeps the slave open: with no slave open, master reads fail with EIO and
    // the raw mode set here would be lost when the last user closes it.
    Ok((File::from(master), slave, path))
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

fn make_raw(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: `t` is a valid termios-sized buffer; the descriptor is open.
    if unsafe { libc::tcgetattr(f.as_raw_fd(), t.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr filled `t`.
    let mut t = unsafe { t.assume_init() };
    // SAFETY: `t` is an initialised termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is an initialised termios; the descriptor is open.
    if unsafe { libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

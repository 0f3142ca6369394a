//! The tests' one system call that needs `unsafe`: moving a thread into a new network
//! namespace.

/// `unshare(CLONE_NEWNET)` for the calling thread (the threads it spawns inherit it).
pub fn unshare_netns() -> std::io::Result<()> {
    // SAFETY: unshare takes no memory arguments; it moves only this thread into a new
    // network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

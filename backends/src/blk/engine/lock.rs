//! Image locking compatible with QEMU's (`block/file-posix.c`), so that domio, QEMU and
//! `qemu-img` refuse to write an image another of them uses.
//!
//! QEMU takes shared open-file-description locks on single bytes: byte `100 + p` while it
//! holds permission `p`, byte `200 + p` while it refuses to share `p` with others. Before using
//! an image it tests, with an exclusive probe, byte `200 + p` for each permission it wants and
//! byte `100 + p` for each it refuses to share. Permissions: 0 consistent read, 1 write,
//! 2 write-unchanged, 3 resize.
//!
//! domio holds "consistent read" (and "write" for a writable disk) and refuses to share
//! "write": a second writer (another domio, QEMU, `qemu-img commit`) is refused, and so is a
//! writer of a base under a read-only disk or an overlay. Resizing stays shared (domio
//! supports online resize of raw images). Engines of one process that open the same image the
//! same way (one per blkif queue) share one lock.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use nix::fcntl::{fcntl, FcntlArg};

use super::sys;
use super::EngineError;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: i64 = 0;
const WRITE: i64 = 1;

/// A held lock; released when the last engine holding it goes.
pub(crate) struct ImageLock {
    _file: File,
    key: (u64, u64, bool),
}

impl std::fmt::Debug for ImageLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageLock").field("key", &self.key).finish()
    }
}

type Registry = Mutex<HashMap<(u64, u64, bool), Weak<ImageLock>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        if let Ok(mut r) = registry().lock() {
            if r.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                r.remove(&self.key);
            }
        }
    }
}

fn perm_name(p: i64) -> &'static str {
    match p {
        READ => "consistent read",
        WRITE => "write",
        _ => "other",
    }
}

/// Locks the image at `path` for reading, and for writing if `write`. Fails, naming the
/// permission, if another process (or another open in this one with different access) uses
/// the image in a conflicting way.
pub(crate) fn lock_image(path: &str, write: bool) -> Result<Arc<ImageLock>, EngineError> {
    let file = File::open(path).map_err(|source| EngineError::Open {
        what: "open for locking",
        path: path.to_string(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| EngineError::Open {
        what: "stat for locking",
        path: path.to_string(),
        source,
    })?;
    let key = (meta.dev(), meta.ino(), write);
    let mut reg = registry().lock().map_err(|_| EngineError::Config {
        path: path.to_string(),
        why: "image lock registry poisoned".into(),
    })?;
    if let Some(held) = reg.get(&key).and_then(Weak::upgrade) {
        return Ok(held);
    }
    let held: &[i64] = if write { &[READ, WRITE] } else { &[READ] };
    let unshared: &[i64] = &[WRITE];
    let fd = file.as_raw_fd();
    let conflict = |why: String| EngineError::Config {
        path: path.to_string(),
        why: format!("{why}: the image is in use by another process (QEMU-style lock)"),
    };
    for &p in held {
        set(fd, PERM_BASE + p)
            .map_err(|e| conflict(format!("cannot lock {}: {e}", perm_name(p))))?;
    }
    for &p in unshared {
        set(fd, SHARED_BASE + p)
            .map_err(|e| conflict(format!("cannot lock shared {}: {e}", perm_name(p))))?;
    }
    for &p in held {
        if taken(fd, SHARED_BASE + p) {
            return Err(conflict(format!("failed to get \"{}\" lock", perm_name(p))));
        }
    }
    for &p in unshared {
        if taken(fd, PERM_BASE + p) {
            return Err(conflict(format!(
                "failed to get shared \"{}\" lock",
                perm_name(p)
            )));
        }
    }
    let lock = Arc::new(ImageLock { _file: file, key });
    reg.insert(key, Arc::downgrade(&lock));
    Ok(lock)
}

fn set(fd: i32, byte: i64) -> nix::Result<()> {
    let fl = sys::flock(libc::F_RDLCK, byte, 1);
    fcntl(fd, FcntlArg::F_OFD_SETLK(&fl)).map(|_| ())
}

/// Whether another open file description holds a lock on `byte`.
fn taken(fd: i32, byte: i64) -> bool {
    let mut fl = sys::flock(libc::F_WRLCK, byte, 1);
    match fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl)) {
        Ok(_) => fl.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lock_image_writer_refuses_second_writer_in_other_description() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let p = p.to_str().unwrap();
        let first = lock_image(p, true).unwrap();
        // Act: same process, same access: shared; different access: a separate description
        // that conflicts.
        let again = lock_image(p, true).unwrap();
        let reader = lock_image(p, false);
        // Assert
        assert!(Arc::ptr_eq(&first, &again));
        let e = reader.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(p) && e.contains("in use"), "{e}");
        drop((first, again));
        assert!(
            lock_image(p, false).is_ok(),
            "released with the last holder"
        );
    }
}

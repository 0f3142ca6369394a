//! The null engine: every valid request completes at once with no data moved (reads leave the
//! buffers as they are). It measures the protocol's cost without storage.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Completion, Engine, EngineError, EngineInfo, IoOp, IoRequest};

/// See the module docs.
pub struct NullEngine {
    info: EngineInfo,
    queued: VecDeque<Completion>,
    done: VecDeque<Completion>,
    efd: EventFd,
}

impl std::fmt::Debug for NullEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NullEngine")
            .field("info", &self.info)
            .finish()
    }
}

impl NullEngine {
    /// A null disk of `capacity` bytes with `queue_depth` slots.
    pub fn new(
        capacity: u64,
        queue_depth: u32,
        read_only: bool,
    ) -> Result<NullEngine, EngineError> {
        let efd =
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| {
                EngineError::Io {
                    op: "eventfd",
                    source: e.into(),
                }
            })?;
        Ok(NullEngine {
            info: EngineInfo {
                capacity,
                logical_sector: 512,
                physical_sector: 4096,
                read_only,
                discard: Some(4096),
                secure_discard: false,
                volatile_cache: false,
                queue_depth,
                describe: format!("null ({capacity} bytes)"),
            },
            queued: VecDeque::with_capacity(queue_depth as usize),
            done: VecDeque::with_capacity(queue_depth as usize),
            efd,
        })
    }
}

/// Checks a request against the disk; returns the byte count or an errno.
pub fn validate(info: &EngineInfo, req: &IoRequest) -> Result<u64, i32> {
    let sector = u64::from(info.logical_sector);
    let len = match req.op {
        IoOp::Read | IoOp::Write => req.segs.iter().map(|s| s.len() as u64).sum(),
        IoOp::Flush => return Ok(0),
        IoOp::Discard | IoOp::SecureDiscard | IoOp::WriteZeroes => req.len,
    };
    let writes = !matches!(req.op, IoOp::Read);
    if writes && info.read_only {
        return Err(libc::EROFS);
    }
    if req.op == IoOp::SecureDiscard && !info.secure_discard {
        return Err(libc::EOPNOTSUPP);
    }
    if matches!(req.op, IoOp::Discard | IoOp::SecureDiscard) && info.discard.is_none() {
        return Err(libc::EOPNOTSUPP);
    }
    if !req.offset.is_multiple_of(sector) || !len.is_multiple_of(sector) {
        return Err(libc::EINVAL);
    }
    match req.offset.checked_add(len) {
        Some(end) if end <= info.capacity => Ok(len),
        _ => Err(libc::EIO),
    }
}

impl Engine for NullEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn queue(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        if self.queued.len() + self.done.len() >= self.info.queue_depth as usize {
            return Err(req);
        }
        let result = validate(&self.info, &req);
        req.segs.clear();
        self.queued.push_back(Completion {
            tag: req.tag,
            result,
            segs: req.segs,
        });
        Ok(())
    }

    fn kick(&mut self) -> Result<(), EngineError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.done.extend(self.queued.drain(..));
        self.efd.write(1).map_err(|e| EngineError::Io {
            op: "eventfd write",
            source: e.into(),
        })?;
        Ok(())
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, EngineError> {
        let _ = self.efd.read();
        let n = self.done.len();
        out.extend(self.done.drain(..));
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.done.len()
    }

    fn refresh_capacity(&mut self) -> Result<u64, EngineError> {
        Ok(self.info.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::engine::IoSeg;
    use std::sync::Arc;
    use xen::SharedMem;

    fn seg(len: usize) -> IoSeg {
        let m: Arc<SharedMem> = Arc::new(SharedMem::anonymous(4096).unwrap());
        IoSeg::new(m, 0, len, true).unwrap()
    }

    #[test]
    fn test_null_engine_completes_valid_and_refuses_invalid_with_errno() {
        let mut e = NullEngine::new(1 << 20, 8, false).unwrap();
        let mk = |tag, op, offset, segs: Vec<IoSeg>, len| IoRequest {
            tag,
            op,
            offset,
            len,
            segs,
            fua: false,
        };
        e.queue(mk(1, IoOp::Read, 0, vec![seg(4096)], 0)).unwrap();
        e.queue(mk(2, IoOp::Read, (1 << 20) - 512, vec![seg(4096)], 0))
            .unwrap();
        e.queue(mk(3, IoOp::Write, 3, vec![seg(512)], 0)).unwrap();
        e.queue(mk(4, IoOp::Discard, 4096, vec![], 8192)).unwrap();
        e.kick().unwrap();
        let mut out = Vec::new();
        assert_eq!(e.reap(&mut out).unwrap(), 4);
        let r: Vec<(u64, Result<u64, i32>)> = out.iter().map(|c| (c.tag, c.result)).collect();
        assert_eq!(
            r,
            vec![
                (1, Ok(4096)),
                (2, Err(libc::EIO)),
                (3, Err(libc::EINVAL)),
                (4, Ok(8192))
            ]
        );
        assert!(out
            .iter()
            .all(|c| c.segs.is_empty() && c.segs.capacity() > 0 || c.tag == 4));
    }

    #[test]
    fn test_null_engine_read_only_refuses_writes_and_full_queue_returns_request() {
        let mut e = NullEngine::new(1 << 20, 1, true).unwrap();
        let w = IoRequest {
            tag: 1,
            op: IoOp::Write,
            offset: 0,
            len: 0,
            segs: vec![seg(512)],
            fua: false,
        };
        e.queue(w).unwrap();
        let again = IoRequest {
            tag: 2,
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            segs: vec![],
            fua: false,
        };
        assert!(e.queue(again).is_err());
        e.kick().unwrap();
        let mut out = Vec::new();
        e.reap(&mut out).unwrap();
        assert_eq!(out[0].result, Err(libc::EROFS));
    }

    #[test]
    fn test_ioseg_refuses_out_of_bounds_and_readonly_for_device_writes() {
        let m: Arc<SharedMem> = Arc::new(SharedMem::anonymous(4096).unwrap());
        assert!(IoSeg::new(m.clone(), 4000, 200, false).is_err());
        assert!(IoSeg::new(m.clone(), 0, 0, false).is_err());
        assert!(IoSeg::new(m, usize::MAX, 2, false).is_err());
    }
}
